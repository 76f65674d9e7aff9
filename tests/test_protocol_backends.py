"""The delivery protocol's atomic step, the same suite for every backend (contract 2 and 5).

``walmirror.protocol`` describes the rule: per key and producer the backend keeps
a mark; ``append_batch`` skips entries at or below it and appends the rest at
the current end, in one atomic step; ``delete`` keeps the marks (a tombstone).
Each test here is one sentence of that description, run against FileStore,
Redis, PostgreSQL and S3 on the real servers.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.types import SessionKey
from conftest import Connect

from walmirror.protocol import (
    Batch,
    MarkBehindError,
    Receipt,
    encode_entry,
    has_ping,
    is_producer_store,
    summary_hint,
)

KEY: SessionKey = {"project_key": "proj", "session_id": "sess"}
SUB: SessionKey = {**KEY, "subpath": "subagents/agent-1"}


def entries(tag: str, first: int, count: int) -> list[dict[str, Any]]:
    """Entries without a uuid: the protocol must not need one (half of what the CLI mirrors)."""
    return [{"type": "progress", "tag": tag, "n": n} for n in range(first, first + count)]


def batch(producer: str, first: int, count: int, expect: int | None = None) -> Batch:
    return Batch.of(producer, first, entries(producer, first, count), expect)


async def test_every_backend_speaks_the_protocol(connect_backend: Connect) -> None:
    assert is_producer_store(await connect_backend())


async def test_every_backend_has_a_health_call(connect_backend: Connect) -> None:
    store = await connect_backend()
    assert has_ping(store)
    await store.ping()  # type: ignore[attr-defined]


async def test_a_batch_is_appended_and_the_receipt_says_so(connect_backend: Connect) -> None:
    store: Any = await connect_backend()
    receipt = await store.append_batch(KEY, batch("pa", 0, 3))
    assert receipt == Receipt(appended=3, mark=2, length=3)
    assert await store.load(KEY) == entries("pa", 0, 3)
    assert await store.producer_mark(KEY, "pa") == 2
    assert await store.producer_mark(KEY, "pb") is None


async def test_a_repeated_batch_is_a_no_op(connect_backend: Connect) -> None:
    # contract 2: a retry after a lost reply, or a resend after a crash.
    store: Any = await connect_backend()
    await store.append_batch(KEY, batch("pa", 0, 3))
    receipt = await store.append_batch(KEY, batch("pa", 0, 3))
    assert receipt == Receipt(appended=0, mark=2, length=3)
    assert await store.load(KEY) == entries("pa", 0, 3)


async def test_only_the_part_past_the_mark_is_appended(connect_backend: Connect) -> None:
    store: Any = await connect_backend()
    await store.append_batch(KEY, batch("pa", 0, 5))
    receipt = await store.append_batch(KEY, batch("pa", 3, 5, expect=4))
    assert receipt == Receipt(appended=3, mark=7, length=8)
    assert await store.load(KEY) == entries("pa", 0, 8)


async def test_a_late_retry_after_another_producer_appended_is_a_no_op(
    connect_backend: Connect,
) -> None:
    # contract 2: hand-off A -> B -> A with A's old write arriving late.
    a: Any = await connect_backend()
    b: Any = await connect_backend()
    await a.append_batch(KEY, batch("pa", 0, 3))
    await b.append_batch(KEY, batch("pb", 0, 2))
    assert (await a.append_batch(KEY, batch("pa", 0, 3))).appended == 0  # the late retry
    await a.append_batch(KEY, batch("pa", 3, 2, expect=2))
    assert await b.load(KEY) == entries("pa", 0, 3) + entries("pb", 0, 2) + entries("pa", 3, 2)


async def test_a_producer_may_start_at_any_seq_and_skip_ahead(connect_backend: Connect) -> None:
    # A queue that compacted a key's bookkeeping numbers it again from its seq floor.
    store: Any = await connect_backend()
    await store.append_batch(KEY, batch("pa", 0, 2))
    receipt = await store.append_batch(KEY, batch("pa", 1000, 2))
    assert receipt == Receipt(appended=2, mark=1001, length=4)


async def test_a_backend_that_lost_acknowledged_entries_says_so_and_writes_nothing(
    connect_backend: Connect,
) -> None:
    store: Any = await connect_backend()
    with pytest.raises(MarkBehindError) as caught:
        await store.append_batch(KEY, batch("pa", 5, 2, expect=4))
    assert caught.value.mark is None and caught.value.expect == 4
    await store.append_batch(KEY, batch("pa", 0, 2))
    with pytest.raises(MarkBehindError) as caught:
        await store.append_batch(KEY, batch("pa", 5, 2, expect=4))
    assert caught.value.mark == 1
    assert await store.load(KEY) == entries("pa", 0, 2)
    assert await store.producer_mark(KEY, "pa") == 1


async def test_delete_keeps_the_marks_so_nothing_written_before_it_comes_back(
    connect_backend: Connect,
) -> None:
    # contract 5: a retry from before the delete is fenced; new appends start afresh.
    a: Any = await connect_backend()
    b: Any = await connect_backend()
    await a.append_batch(KEY, batch("pa", 0, 3))
    await a.append_batch(SUB, batch("pa", 0, 2))
    await b.delete(KEY)
    assert await a.load(KEY) is None and await a.load(SUB) is None
    assert (await a.append_batch(KEY, batch("pa", 0, 3))).appended == 0
    assert (await a.append_batch(SUB, batch("pa", 0, 2))).appended == 0
    assert await a.load(KEY) is None and await a.load(SUB) is None
    assert await a.producer_mark(KEY, "pa") == 2
    # A continues (it never saw the delete), B starts: a fresh transcript.
    receipt = await a.append_batch(KEY, batch("pa", 3, 2, expect=2))
    assert receipt == Receipt(appended=2, mark=4, length=2)
    await b.append_batch(KEY, batch("pb", 0, 1))
    assert await b.load(KEY) == entries("pa", 3, 2) + entries("pb", 0, 1)


async def test_a_subkey_delete_leaves_the_main_transcript(connect_backend: Connect) -> None:
    store: Any = await connect_backend()
    await store.append_batch(KEY, batch("pa", 0, 2))
    await store.append_batch(SUB, batch("pa", 0, 2))
    await store.delete(SUB)
    assert await store.load(SUB) is None
    assert await store.load(KEY) == entries("pa", 0, 2)
    assert (await store.append_batch(SUB, batch("pa", 0, 2))).appended == 0


async def test_plain_appends_mix_with_producer_batches(connect_backend: Connect) -> None:
    # A host without walmirror (the SDK's own path) may write the same key.
    store: Any = await connect_backend()
    await store.append_batch(KEY, batch("pa", 0, 2))
    await store.append(KEY, entries("plain", 0, 1))
    await store.append_batch(KEY, batch("pa", 0, 3))
    assert await store.load(KEY) == entries("pa", 0, 2) + entries("plain", 0, 1) + entries(
        "pa", 2, 1
    )


async def test_concurrent_producers_each_land_exactly_once_in_their_own_order(
    connect_backend: Connect,
) -> None:
    # contract 2: two to four hosts writing one key at once, with retries.
    hosts = [await connect_backend() for _ in range(4)]
    rng = random.Random(7)

    async def produce(index: int, store: Any) -> None:
        producer, seq, expect = f"p{index}", 0, None
        while seq < 40:
            count = min(rng.randint(1, 6), 40 - seq)
            receipt = await store.append_batch(KEY, batch(producer, seq, count, expect))
            if rng.random() < 0.3:  # the reply was "lost": send it again
                again = await store.append_batch(KEY, batch(producer, seq, count, expect))
                assert again.appended == 0
            assert receipt.mark == seq + count - 1
            seq, expect = seq + count, seq + count - 1

    await asyncio.gather(*(produce(i, s) for i, s in enumerate(hosts)))
    stored = await hosts[0].load(KEY)
    assert stored is not None and len(stored) == 4 * 40
    for index in range(4):
        mine = [e for e in stored if e["tag"] == f"p{index}"]
        assert mine == entries(f"p{index}", 0, 40)


async def test_summaries_fold_every_stored_entry_exactly_once(connect_backend: Connect) -> None:
    a: Any = await connect_backend()
    b: Any = await connect_backend()
    await a.append_batch(KEY, batch("pa", 0, 3))
    await b.append_batch(KEY, batch("pb", 0, 2))
    await a.append_batch(KEY, batch("pa", 0, 4))  # one repeat, one new entry
    await b.append_batch(KEY, batch("pb", 2, 1, expect=1))
    stored = await a.load(KEY)
    assert stored is not None and len(stored) == 7
    for host in (a, b):  # a store that buffers summary writes writes them before listing
        await host.list_session_summaries(KEY["project_key"])
    summaries = await (await connect_backend()).list_session_summaries(KEY["project_key"])
    expected = fold_session_summary(None, KEY, stored)
    assert [s["data"] for s in summaries] == [expected["data"]]


def transcript(producer: str, first: int, count: int) -> list[dict[str, Any]]:
    """CLI-shaped entries: every one with a cwd and a git branch, now and then a title,
    a tag or a cleared tag (the fields the summary fold reads)."""
    out: list[dict[str, Any]] = []
    for n in range(first, first + count):
        entry: dict[str, Any] = {
            "type": "user" if n % 3 == 0 else "assistant",
            "timestamp": f"2025-01-01T00:00:{n % 60:02d}.000Z",
            "cwd": "/work",
            "gitBranch": f"{producer}-{n // 4}",
            "message": {"role": "user", "content": f"{producer} prompt {n}"},
        }
        if n % 7 == 3:
            entry["customTitle"] = f"{producer} title {n}"
        if n % 11 == 5:
            entry = {"type": "tag", "tag": "" if n % 2 else f"t{n}"}
        out.append(entry)
    return out


def hinted(producer: str, first: int, count: int, expect: int | None = None) -> Batch:
    """A batch as the queue sends it: bytes and hints, nothing parsed yet."""
    items = transcript(producer, first, count)
    encoded = [encode_entry(e) for e in items]
    return Batch(producer, first, encoded, expect, [summary_hint(e) for e in items])


async def test_summaries_of_hinted_batches_are_the_sdk_fold_of_what_is_stored(
    connect_backend: Connect,
) -> None:
    """Batches carrying hints (the backend parses only what can change the summary),
    from two hosts, with repeats: the summary is the SDK's fold of the transcript."""
    a: Any = await connect_backend()
    b: Any = await connect_backend()
    seqs = {"pa": 0, "pb": 0}
    rng = random.Random(3)
    for turn in range(16):
        # One writer first (a backend folds on what it cached), then both at once.
        producer, host = ("pa", a) if turn < 8 else rng.choice([("pa", a), ("pb", b)])
        if turn == 8:
            await _same_summary_as_the_sdk_fold(connect_backend, a)
        seq = seqs[producer]
        count = rng.randint(1, 9)
        expect = seq - 1 if seq else None
        await host.append_batch(KEY, hinted(producer, seq, count, expect))
        seq += count
        if rng.random() < 0.4:  # overlapping what is stored: its first entry repeats
            await host.append_batch(KEY, hinted(producer, seq - 1, 3, seq - 1))
            seq += 2
        seqs[producer] = seq
    assert len(await a.load(KEY)) == sum(seqs.values())
    await _same_summary_as_the_sdk_fold(connect_backend, a, b)


async def _same_summary_as_the_sdk_fold(connect_backend: Connect, *hosts: Any) -> None:
    for host in hosts:  # a store that buffers summary writes writes them before listing
        await host.list_session_summaries(KEY["project_key"])
    fresh: Any = await connect_backend()
    stored = await fresh.load(KEY)
    expected = fold_session_summary(None, KEY, stored)
    summaries = await fresh.list_session_summaries(KEY["project_key"])
    assert [s["data"] for s in summaries] == [expected["data"]]
    assert "custom_title" in expected["data"] and "git_branch" in expected["data"]


async def test_bad_batches_are_refused_with_a_clear_error(connect_backend: Connect) -> None:
    store: Any = await connect_backend()
    for bad in (
        Batch("bad id!", 0, [b"{}"]),
        Batch("pa", -1, [b"{}"]),
        Batch("pa", 0, []),
        Batch("pa", 0, [b"{}"], expect=-2),
        Batch("pa", 0, [b"{}"], hints=[0, 0]),
        Batch("pa", 0, [b"{}"], hints=["0"]),  # type: ignore[list-item]
    ):
        with pytest.raises(ValueError):
            await store.append_batch(KEY, bad)
    assert await store.load(KEY) is None
