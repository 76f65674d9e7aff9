"""DurableSessionStore behaviour, one contract point at a time (see ../shared/DESIGN.md)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk.types import SessionKey

from walmirror import (
    BackendUnavailableError,
    DurableSessionStore,
    FlushBlockedError,
    FlushTimeoutError,
    InvalidEntryError,
    InvalidKeyError,
    QueueClosedError,
    QueueFullError,
    WalmirrorError,
)
from walmirror.faults import FaultyStore

Make = Callable[..., DurableSessionStore]

KEY: SessionKey = {"project_key": "proj", "session_id": "sess"}
SUB: SessionKey = {**KEY, "subpath": "subagents/agent-1"}


def entries(n: int, prefix: str = "e", pad: int = 0) -> list[Any]:
    return [{"type": "x", "uuid": f"{prefix}{i}", "n": i, "pad": "p" * pad} for i in range(n)]


# -- contract 3: the agent never waits on the backend ------------------------------


async def test_append_returns_while_backend_hangs_forever(make_durable: Make) -> None:
    backend = FaultyStore(InMemorySessionStore(), hang_rate=1.0, hang_seconds=3600)
    store = make_durable(backend)
    # Generous bound: an append that waited on the backend would never finish.
    async with asyncio.timeout(10):
        for i in range(20):
            await store.append(KEY, entries(17, prefix=f"b{i}-"))
    async with asyncio.timeout(10):  # and the flusher is stuck in the backend meanwhile
        while backend.injected["hang"] == 0:
            await asyncio.sleep(0.01)


async def test_append_returns_while_backend_is_down(make_durable: Make) -> None:
    backend = FaultyStore(InMemorySessionStore())
    backend.down()
    store = make_durable(backend)
    async with asyncio.timeout(10):
        await store.append(KEY, entries(5))
    status = await store.status()
    assert status["backends"][0]["pending_entries"] == 5


# -- contract 2: in order, exactly once, for a foreign store too ---------------------


async def test_lost_replies_do_not_duplicate_in_a_foreign_store(make_durable: Make) -> None:
    inner = InMemorySessionStore()
    backend = FaultyStore(inner, seed=1, lost_reply_rate=0.5)
    store = make_durable(backend, max_batch_entries=3)
    for i in range(10):
        await store.append(KEY, entries(3, prefix=f"b{i}-"))
    await store.flush(timeout=30)
    assert backend.injected["lost_reply"] > 0
    stored = inner.get_entries(KEY)
    assert [e["uuid"] for e in stored] == [f"b{i}-{j}" for i in range(10) for j in range(3)]


async def test_entries_reach_the_backend_in_append_order(make_durable: Make) -> None:
    inner = InMemorySessionStore()
    store = make_durable(inner, max_batch_entries=7)
    expected = []
    for i in range(30):
        batch = entries(4, prefix=f"b{i}-")
        expected += batch
        await store.append(KEY, batch)
    await store.flush(timeout=10)
    assert inner.get_entries(KEY) == expected


async def test_concurrent_sessions_each_keep_their_order(make_durable: Make) -> None:
    # contract 10: many sessions appending at once share commits, none interferes.
    inner = InMemorySessionStore()
    store = make_durable(inner)
    keys: list[SessionKey] = [{"project_key": "proj", "session_id": f"s{i}"} for i in range(50)]

    async def session(key: SessionKey) -> None:
        for i in range(10):
            await store.append(key, entries(5, prefix=f"{key['session_id']}-{i}-"))

    await asyncio.gather(*(session(k) for k in keys))
    await store.flush(timeout=30)
    for key in keys:
        sid = key["session_id"]
        assert [e["uuid"] for e in inner.get_entries(key)] == [
            f"{sid}-{i}-{j}" for i in range(10) for j in range(5)
        ]


# -- uuid is an idempotency key -------------------------------------------------------


async def test_an_entry_whose_uuid_the_key_holds_is_skipped(make_durable: Make) -> None:
    inner = InMemorySessionStore()
    store = make_durable(inner)
    await store.append(KEY, entries(3))
    await store.append(KEY, entries(5))  # e0..e2 again, then e3, e4
    await store.append(KEY, [{"type": "title", "t": 1}, {"type": "title", "t": 1}])
    await store.flush(timeout=10)
    stored = inner.get_entries(KEY)
    assert [e.get("uuid") for e in stored] == ["e0", "e1", "e2", "e3", "e4", None, None]


async def test_uuid_dedupe_is_per_key(make_durable: Make) -> None:
    inner = InMemorySessionStore()
    store = make_durable(inner)
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(2))
    await store.flush(timeout=10)
    assert len(inner.get_entries(KEY)) == 2
    assert len(inner.get_entries(SUB)) == 2


async def test_uuid_dedupe_survives_compaction(make_durable: Make) -> None:
    inner = InMemorySessionStore()
    store = make_durable(inner, retention_seconds=0)
    await store.append(KEY, entries(3))
    await store.flush(timeout=10)
    assert await store.queue.compact(0) == 3
    await store.append(KEY, entries(4))
    await store.flush(timeout=10)
    assert [e["uuid"] for e in inner.get_entries(KEY)] == ["e0", "e1", "e2", "e3"]


# -- contract 4: read your writes ---------------------------------------------------------


async def test_load_includes_entries_still_queued(make_durable: Make) -> None:
    backend = FaultyStore(InMemorySessionStore(), ops={"append"})
    store = make_durable(backend)
    await store.append(KEY, entries(2, prefix="a"))
    await store.flush(timeout=10)
    backend.down()  # appends fail, reads work
    await store.append(KEY, entries(2, prefix="b"))
    loaded = await store.load(KEY)
    assert [e["uuid"] for e in loaded or []] == ["a0", "a1", "b0", "b1"]
    assert [s["session_id"] for s in await store.list_sessions("proj")] == ["sess"]


async def test_listing_includes_queued_sessions_and_subkeys(make_durable: Make) -> None:
    backend = FaultyStore(InMemorySessionStore(), ops={"append"})
    backend.down()
    store = make_durable(backend)
    await store.append(KEY, entries(1))
    await store.append(SUB, entries(1))
    await store.append({"project_key": "proj", "session_id": "other"}, entries(1))
    listed = await store.list_sessions("proj")
    assert sorted(s["session_id"] for s in listed) == ["other", "sess"]
    assert all(s["mtime"] > 1e12 for s in listed)
    assert await store.list_subkeys({"project_key": "proj", "session_id": "sess"}) == [
        "subagents/agent-1"
    ]


async def test_summaries_fold_queued_entries(make_durable: Make) -> None:
    backend = FaultyStore(InMemorySessionStore(), ops={"append"})
    store = make_durable(backend)
    await store.append(KEY, [{"type": "x", "customTitle": "first"}])
    await store.flush(timeout=10)
    backend.down()
    await store.append(KEY, [{"type": "x", "customTitle": "second"}])
    (summary,) = await store.list_session_summaries("proj")
    assert summary["session_id"] == "sess"
    assert summary["data"].get("custom_title") == "second"


async def test_load_during_outage_answers_from_complete_local_history(make_durable: Make) -> None:
    backend = FaultyStore(InMemorySessionStore())
    store = make_durable(backend, retention_seconds=3600)
    await store.append(KEY, entries(3))
    await store.flush(timeout=10)  # the backend held nothing before: local history is complete
    backend.down()
    await store.append(KEY, entries(5))
    loaded = await store.load(KEY)
    assert [e["uuid"] for e in loaded or []] == ["e0", "e1", "e2", "e3", "e4"]


async def test_load_during_outage_without_complete_history_raises(make_durable: Make) -> None:
    inner = InMemorySessionStore()
    await inner.append(KEY, entries(2, prefix="elsewhere"))  # written by another host
    backend = FaultyStore(inner)
    store = make_durable(backend, retention_seconds=3600)
    await store.append(KEY, entries(1))
    await store.flush(timeout=10)
    backend.down()
    with pytest.raises(BackendUnavailableError, match="complete history"):
        await store.load(KEY)


async def test_load_during_outage_after_compaction_raises(make_durable: Make) -> None:
    backend = FaultyStore(InMemorySessionStore())
    store = make_durable(backend, retention_seconds=0)
    await store.append(KEY, entries(3))
    await store.flush(timeout=10)
    await store.queue.compact(0)
    backend.down()
    with pytest.raises(BackendUnavailableError):
        await store.load(KEY)


async def test_a_session_resumed_from_the_backend_continues_after_its_entries(
    make_durable: Make,
) -> None:
    # contract 2: a key new to this host continues the backend's transcript.
    inner = InMemorySessionStore()
    await inner.append(KEY, entries(2, prefix="host-a-"))
    store = make_durable(inner)
    await store.append(KEY, entries(2, prefix="host-b-"))
    await store.flush(timeout=10)
    assert [e["uuid"] for e in inner.get_entries(KEY)] == [
        "host-a-0",
        "host-a-1",
        "host-b-0",
        "host-b-1",
    ]
    loaded = await store.load(KEY)
    assert loaded == inner.get_entries(KEY)


# -- contract 5: delete wins --------------------------------------------------------------


async def test_delete_while_queued_and_backend_down_stays_deleted(make_durable: Make) -> None:
    inner = InMemorySessionStore()
    backend = FaultyStore(inner)
    store = make_durable(backend)
    await store.append(KEY, entries(2, prefix="old"))
    await store.append(SUB, entries(2, prefix="old"))
    await store.flush(timeout=10)
    backend.down()
    await store.append(KEY, entries(3, prefix="queued"))
    await store.append(SUB, entries(3, prefix="queued"))
    await store.delete(KEY)
    assert await store.load(KEY) is None
    assert await store.load(SUB) is None
    backend.up()
    await store.flush(timeout=10)
    assert inner.get_entries(KEY) == []
    assert inner.get_entries(SUB) == []
    assert await store.load(KEY) is None
    assert await store.list_sessions("proj") == []


async def test_appends_after_a_pending_delete_start_a_fresh_transcript(make_durable: Make) -> None:
    inner = InMemorySessionStore()
    backend = FaultyStore(inner)
    store = make_durable(backend)
    await store.append(KEY, entries(2, prefix="old"))
    await store.flush(timeout=10)
    backend.down()
    await store.delete(KEY)
    await store.append(KEY, entries(2, prefix="new"))
    assert [e["uuid"] for e in await store.load(KEY) or []] == ["new0", "new1"]
    backend.up()
    await store.flush(timeout=10)
    assert [e["uuid"] for e in inner.get_entries(KEY)] == ["new0", "new1"]


async def test_deleting_a_subkey_keeps_the_main_transcript(make_durable: Make) -> None:
    inner = InMemorySessionStore()
    store = make_durable(inner)
    await store.append(KEY, entries(1))
    await store.append(SUB, entries(1))
    await store.delete(SUB)
    await store.flush(timeout=10)
    assert inner.get_entries(SUB) == []
    assert len(inner.get_entries(KEY)) == 1
    assert await store.list_subkeys({"project_key": "proj", "session_id": "sess"}) == []


# -- contract 6: bounded resources ---------------------------------------------------------


async def test_queue_full_with_raise_policy_refuses_and_keeps_what_it_had(
    make_durable: Make,
) -> None:
    backend = FaultyStore(InMemorySessionStore())
    backend.down()
    store = make_durable(backend, max_queue_bytes=4000, full_policy="raise")
    await store.append(KEY, entries(2, pad=1000))
    with pytest.raises(QueueFullError, match="not stored"):
        await store.append(KEY, entries(3, prefix="x", pad=1000))
    status = await store.status()
    assert status["backends"][0]["pending_entries"] == 2


async def test_queue_full_with_wait_policy_proceeds_once_backend_drains(
    make_durable: Make,
) -> None:
    inner = InMemorySessionStore()
    backend = FaultyStore(inner)
    backend.down(0.5)
    store = make_durable(
        backend, max_queue_bytes=4000, full_policy="wait", full_timeout=20, retention_seconds=3600
    )
    await store.append(KEY, entries(3, pad=1000))
    await store.append(KEY, entries(3, prefix="x", pad=1000))  # waits for the heal
    await store.flush(timeout=10)
    assert len(inner.get_entries(KEY)) == 6


async def test_queue_full_with_wait_policy_times_out_with_a_clear_error(
    make_durable: Make,
) -> None:
    backend = FaultyStore(InMemorySessionStore())
    backend.down()
    store = make_durable(backend, max_queue_bytes=4000, full_policy="wait", full_timeout=0.3)
    await store.append(KEY, entries(3, pad=1000))
    with pytest.raises(QueueFullError):
        await store.append(KEY, entries(3, prefix="x", pad=1000))


async def test_acknowledged_entries_are_compacted(make_durable: Make) -> None:
    store = make_durable(InMemorySessionStore(), retention_seconds=0, compact_interval=0.05)
    await store.append(KEY, entries(10, pad=100))
    await store.flush(timeout=10)
    async with asyncio.timeout(10):
        while store.queue.stored_bytes:
            await asyncio.sleep(0.05)
    assert (await store.status())["queue"]["stored_bytes"] == 0


async def test_entries_of_a_lagging_fan_out_backend_are_not_compacted(make_durable: Make) -> None:
    fast, slow_inner = InMemorySessionStore(), InMemorySessionStore()
    slow = FaultyStore(slow_inner)
    slow.down()
    store = make_durable([fast, slow], retention_seconds=0)
    await store.append(KEY, entries(4))
    async with asyncio.timeout(10):
        while len(fast.get_entries(KEY)) < 4:
            await asyncio.sleep(0.02)
    await store.queue.compact(0)
    slow.up()
    await store.flush(timeout=10)
    assert slow_inner.get_entries(KEY) == fast.get_entries(KEY) == entries(4)


# -- contract 7: poison is contained --------------------------------------------------------


async def test_a_permanently_rejected_key_is_parked_and_others_flow(make_durable: Make) -> None:
    inner = InMemorySessionStore()
    backend = FaultyStore(inner)
    backend.reject(lambda k: k["session_id"] == "poison")
    store = make_durable(backend)
    poison: SessionKey = {"project_key": "proj", "session_id": "poison"}
    await store.append(poison, entries(2))
    await store.append(KEY, entries(2))
    with pytest.raises(FlushBlockedError, match="parked"):
        await store.flush(timeout=10)
    assert len(inner.get_entries(KEY)) == 2
    status = (await store.status())["backends"][0]
    assert [p["key"] for p in status["parked"]] == [poison]
    assert "PermanentBackendError" in status["parked"][0]["error"]
    # The operator fixes the backend and re-queues: the parked entries go out.
    backend.accept_all()
    assert await store.requeue(poison) == 1
    await store.flush(timeout=10)
    assert inner.get_entries(poison) == entries(2)


async def test_errors_in_status_carry_no_transcript_content(make_durable: Make) -> None:
    class LeakyStore(InMemorySessionStore):
        async def append(self, key: SessionKey, batch: list[Any]) -> None:
            raise ValueError(f"rejected {json.dumps(batch)}")

    store = make_durable(LeakyStore())
    await store.append(KEY, [{"type": "x", "secret": "TOP-SECRET-PROMPT"}])
    with pytest.raises(FlushBlockedError):
        await store.flush(timeout=10)
    assert "TOP-SECRET" not in json.dumps(await store.status())


# -- contract 8: lifecycle -------------------------------------------------------------------


async def test_flush_is_a_barrier_for_every_backend(make_durable: Make) -> None:
    a, b = InMemorySessionStore(), InMemorySessionStore()
    store = make_durable([a, b])
    await store.append(KEY, entries(5))
    await store.flush(timeout=10)
    assert a.get_entries(KEY) == b.get_entries(KEY) == entries(5)


async def test_flush_times_out_while_the_backend_is_down(make_durable: Make) -> None:
    backend = FaultyStore(InMemorySessionStore())
    backend.down()
    store = make_durable(backend)
    await store.append(KEY, entries(1))
    with pytest.raises(FlushTimeoutError):
        await store.flush(timeout=0.3)


async def test_close_reports_what_remains_and_refuses_more(tmp_path: Path) -> None:
    backend = FaultyStore(InMemorySessionStore())
    backend.down()
    store = DurableSessionStore(backend, tmp_path / "q.db", backoff_max=0.1)
    await store.append(KEY, entries(3))
    report = await store.close(timeout=0.3)
    assert not report.drained
    assert report.pending_entries == {store.backend_names[0]: 3}
    with pytest.raises(QueueClosedError):
        await store.append(KEY, entries(1))


async def test_async_with_drains_on_exit(tmp_path: Path) -> None:
    inner = InMemorySessionStore()
    async with DurableSessionStore(inner, tmp_path / "q.db") as store:
        await store.append(KEY, entries(3))
    assert inner.get_entries(KEY) == entries(3)


async def test_a_new_store_drains_what_the_previous_one_left(tmp_path: Path) -> None:
    backend = FaultyStore(InMemorySessionStore())
    backend.down()
    first = DurableSessionStore(backend, tmp_path / "q.db", backoff_max=0.1)
    await first.append(KEY, entries(3))
    await first.close(timeout=0.1)
    healthy = InMemorySessionStore()
    async with DurableSessionStore(healthy, tmp_path / "q.db") as second:
        await second.flush(timeout=10)
    assert healthy.get_entries(KEY) == entries(3)


# -- contract 11: bad input gets a clear error and nothing is lost ---------------------------


@pytest.mark.parametrize(
    "bad_key",
    [
        {"project_key": "proj", "session_id": "sess", "subpath": ""},
        {"project_key": "proj", "session_id": ".."},
        {"project_key": "proj", "session_id": "sess", "subpath": "subagents/../../etc"},
        {"project_key": "proj", "session_id": "sess", "subpath": "/etc/passwd"},
        {"project_key": "pr\x00oj", "session_id": "sess"},
        {"project_key": "a/b", "session_id": "sess"},
        {"project_key": "", "session_id": "sess"},
        {"project_key": "proj"},
        "proj/sess",
    ],
)
async def test_invalid_keys_are_refused(make_durable: Make, bad_key: Any) -> None:
    inner = InMemorySessionStore()
    store = make_durable(inner)
    with pytest.raises(InvalidKeyError):
        await store.append(bad_key, entries(1))
    assert inner.size == 0


@pytest.mark.parametrize(
    "bad_entry",
    [{"type": "x", "s": {1, 2}}, {"type": "x", "f": float("nan")}, "not a dict", 42],
)
async def test_unserialisable_entries_refuse_the_whole_batch(
    make_durable: Make, bad_entry: Any
) -> None:
    inner = InMemorySessionStore()
    store = make_durable(inner)
    await store.append(KEY, entries(1, prefix="before"))
    with pytest.raises(InvalidEntryError, match="entry 1 of the batch"):
        await store.append(KEY, [{"type": "x", "uuid": "ok"}, bad_entry])
    await store.flush(timeout=10)
    assert [e["uuid"] for e in inner.get_entries(KEY)] == ["before0"]


async def test_oversized_entry_is_refused(make_durable: Make) -> None:
    store = make_durable(InMemorySessionStore(), max_entry_bytes=1000)
    with pytest.raises(InvalidEntryError, match="max_entry_bytes"):
        await store.append(KEY, entries(1, pad=2000))


def test_bad_tuning_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        DurableSessionStore(InMemorySessionStore(), tmp_path / "q.db", batch_size=3)
    with pytest.raises(ValueError, match="full_policy"):
        DurableSessionStore(InMemorySessionStore(), tmp_path / "q.db", full_policy="drop")
    with pytest.raises(ValueError, match="at least one backend"):
        DurableSessionStore([], tmp_path / "q.db")
    with pytest.raises(TypeError, match="not a SessionStore"):
        DurableSessionStore(object(), tmp_path / "q.db")  # type: ignore[arg-type]


def test_a_store_used_from_a_second_event_loop_says_so(tmp_path: Path) -> None:
    store = DurableSessionStore(InMemorySessionStore(), tmp_path / "q.db")

    async def first() -> None:
        await store.append(KEY, entries(1))
        await store.flush(timeout=10)

    async def second() -> None:
        with pytest.raises(WalmirrorError, match="one store per event loop"):
            await store.append(KEY, entries(1, prefix="x"))

    asyncio.run(first())
    asyncio.run(second())


async def test_a_backend_added_after_compaction_is_parked_not_fed_a_partial_transcript(
    tmp_path: Path,
) -> None:
    first = InMemorySessionStore()
    async with DurableSessionStore(first, tmp_path / "q.db", backend_names=("a",)) as store:
        await store.append(KEY, entries(5))
        await store.flush(timeout=10)
        await store.queue.compact(0)
        await store.append(KEY, entries(8))  # e5..e7 are new
        await store.flush(timeout=10)
    second = InMemorySessionStore()
    store = DurableSessionStore([first, second], tmp_path / "q.db", backend_names=("a", "b"))
    async with store:
        with pytest.raises(FlushBlockedError):
            await store.flush(timeout=10)
        (backend_b,) = [b for b in (await store.status())["backends"] if b["name"] == "b"]
        assert "compacted" in backend_b["parked"][0]["error"]
    assert second.get_entries(KEY) == []
    assert first.get_entries(KEY) == entries(8)


async def test_wrapping_a_backend_in_faults_keeps_its_cursor(tmp_path: Path) -> None:
    from walmirror.backends.file import FileStore

    root = tmp_path / "files"
    async with DurableSessionStore(FileStore(root), tmp_path / "q.db") as store:
        await store.append(KEY, entries(3))
    async with DurableSessionStore(FaultyStore(FileStore(root)), tmp_path / "q.db") as store:
        await store.append(KEY, entries(5))
    assert await FileStore(root).load(KEY) == entries(5)


async def test_the_flusher_hands_the_queue_bytes_to_the_backend(
    make_durable: Make, tmp_path: Path
) -> None:
    from walmirror.backends.file import FileStore

    seen: list[list[bytes]] = []

    class Spy(FileStore):
        async def append_batch(self, key: Any, batch: Any) -> Any:
            seen.append(list(batch.encoded))
            return await super().append_batch(key, batch)

    store = make_durable(Spy(tmp_path / "files"))
    await store.append(KEY, entries(3))
    await store.flush(timeout=10)
    assert [json.loads(b) for batch in seen for b in batch] == entries(3)
    assert await FileStore(tmp_path / "files").load(KEY) == entries(3)


async def test_a_key_the_backend_lost_is_restored_from_the_queue_without_a_park(
    make_durable: Make, tmp_path: Path
) -> None:
    # contract 2: a backend that lost acknowledged data is repaired from the queue.
    from walmirror.backends.file import FileStore

    files = FileStore(tmp_path / "files")
    store = make_durable(files)
    await store.append(KEY, entries(3))
    await store.flush(timeout=10)
    shutil.rmtree(tmp_path / "files")  # the backend loses everything behind our back
    await store.append(KEY, entries(5))
    await store.flush(timeout=10)
    assert await files.load(KEY) == entries(5)
    (backend,) = (await store.status())["backends"]
    assert backend["parked"] == []
    assert [(loss["restored"], loss["lost"]) for loss in backend["losses"]] == [(3, 0)]


async def test_a_renamed_backend_cursor_does_not_resend_what_the_backend_holds(
    tmp_path: Path,
) -> None:
    # contract 2: the same backend under a new cursor name (re-addressed, renamed)
    # skips this queue's entries by its producer mark instead of appending them again.
    from walmirror.backends.file import FileStore

    root = tmp_path / "files"
    store = DurableSessionStore(FileStore(root), tmp_path / "q.db", backend_names=("old",))
    async with store:
        await store.append(KEY, entries(3))
    async with DurableSessionStore(FileStore(root), tmp_path / "q.db", backend_names=("new",)) as s:
        await s.append(KEY, entries(5))
    assert await FileStore(root).load(KEY) == entries(5)
