"""Hostile tests for schema 4 (batch rows, ledger rows, the in-memory uuid ledger) and
the flusher's keep-delivering rounds: try to lose, duplicate or reorder an
acknowledged entry, or to get an unclear error or a hang.

Waits are hang guards only; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk.types import SessionKey
from memory_store import GatedStore, MemoryStorage, MemoryStore, SlowSessionStore

import walmirror.queue
from walmirror import DurableSessionStore
from walmirror.faults import FaultyStore

KEY: SessionKey = {"project_key": "proj", "session_id": "s"}
TUNING: dict[str, Any] = {"backoff_initial": 0.01, "backoff_max": 0.1}


def key(n: int | str) -> SessionKey:
    return {"project_key": "proj", "session_id": f"s{n}"}


async def _rows(store: DurableSessionStore, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
    queue: Any = store.queue
    return list(await queue._reader.run(lambda: queue._reader.conn.execute(sql, args).fetchall()))


async def _until(predicate: Callable[[], Any], guard: float = 20.0) -> None:
    """Poll an async predicate until it holds (``guard`` only stops a hang)."""
    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.01)


class ForeignStore(InMemorySessionStore):
    """A SessionStore that knows nothing of walmirror's protocol."""


# -- key_id reuse: per-key state kept by key_id outlives the key ------------------------------


async def test_entries_appended_after_a_delete_reach_the_backend_when_the_key_id_is_reused(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Another host stored a and b; this host replays them (a re-import) and the flusher
    steps over them (``_held_uuids``). Then the key is deleted and written afresh with
    the same uuids: delete wins, appends after it start a fresh transcript and are
    never lost. SQLite reuses the deleted key's key_id for the new row."""
    storage = MemoryStorage()
    other = MemoryStore(storage)
    entries = [{"uuid": "a", "n": 0}, {"uuid": "b", "n": 1}]
    await other.append(KEY, entries)  # the other host's copy
    inner = MemoryStore(storage)
    store = make_durable(inner, **TUNING)
    await store.append(KEY, entries)  # replayed: the backend holds both
    await store.flush(30)
    assert await inner.load(KEY) == entries
    await store.delete(KEY)
    await store.flush(30)
    assert await inner.load(KEY) is None
    fresh = [{"uuid": "a", "n": 10}, {"uuid": "b", "n": 11}]
    await store.append(KEY, fresh)
    await store.flush(30)
    assert await inner.load(KEY) == fresh


async def test_a_forgotten_key_that_returns_is_tail_checked_on_a_foreign_store(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Foreign store: a key new to the flusher gets a uuid tail check before its first
    delivery. A key forgotten (forget_after=0) and re-created gets the same key_id
    back: its replayed entry must still not be stored twice."""
    inner = ForeignStore()
    store = make_durable(
        inner, retention_seconds=0, forget_after=0, compact_interval=0.01, **TUNING
    )
    entry = {"uuid": "a", "n": 0}
    await store.append(KEY, [entry])
    await store.flush(30)

    async def forgotten() -> bool:
        return not await _rows(store, "SELECT key_id FROM keys")

    await _until(forgotten)
    assert await forgotten()
    await store.append(KEY, [entry])  # the ledger forgot it: replayed
    await store.flush(30)
    assert await inner.load(KEY) == [entry]


async def test_a_forgotten_key_that_returns_with_a_new_key_id_is_tail_checked(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """The same as above, with another key holding a higher key_id so the returning
    key gets a new one: the control experiment (passes)."""
    inner = ForeignStore()
    store = make_durable(
        inner, retention_seconds=0, forget_after=3600, compact_interval=0.01, **TUNING
    )
    entry = {"uuid": "a", "n": 0}
    await store.append(KEY, [entry])  # key_id 1
    await store.flush(30)
    await store.queue.compact(0.0, 0.0)  # forgotten: the keys table is empty
    assert not await _rows(store, "SELECT key_id FROM keys")
    await store.append(key("o1"), [{"n": 1}])  # takes key_id 1
    await store.append(key("o2"), [{"n": 2}])  # key_id 2
    await store.append(KEY, [entry])  # key_id 3: never seen by the flusher
    await store.flush(30)
    assert await inner.load(KEY) == [entry]


# -- the ledger's uuid form --------------------------------------------------------------------


async def test_a_lone_surrogate_uuid_and_its_json_escape_are_different_uuids(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """A uuid with a lone surrogate and a uuid that is literally its JSON escape are two
    uuids (the ledger once stored the first as the second, and dropped the second)."""
    inner = MemoryStore()
    store = make_durable(inner, **TUNING)
    first = {"uuid": "\ud800", "n": 0}
    second = {"uuid": json.dumps("\ud800"), "n": 1}  # the 8 characters "\ud800" in quotes
    assert first["uuid"] != second["uuid"]
    await store.append(KEY, [first])
    await store.append(KEY, [second])
    await store.flush(30)
    assert await inner.load(KEY) == [first, second]


@pytest.mark.parametrize(
    "uuid",
    [
        "line\nbreak",
        'quote"d',
        "back\\slash",
        "\u2028sep\u2029",
        "\ud83d",  # a lone high surrogate
        "\udfff tail",
        "x" * 100_000,
        "\x00nul",
        '["a"]',
        "é",
    ],
)
async def test_odd_uuids_are_deduplicated_exactly_across_restarts(
    tmp_path: Path, make_durable: Callable[..., DurableSessionStore], uuid: str
) -> None:
    inner = MemoryStore()
    path = tmp_path / "q.db"
    store = make_durable(inner, path, **TUNING)
    entry = {"uuid": uuid, "text": "a\nb\u2028c\\n"}
    await store.append(KEY, [entry, entry])  # repeated inside one append
    await store.append(KEY, [entry])  # and across appends
    await store.close(timeout=10)
    again = make_durable(inner, path, **TUNING)
    await again.append(KEY, [entry, {"uuid": uuid + "2", "n": 2}])  # after a restart
    await again.flush(30)
    assert await inner.load(KEY) == [entry, {"uuid": uuid + "2", "n": 2}]
    assert await again.load(KEY) == [entry, {"uuid": uuid + "2", "n": 2}]


async def test_a_list_valued_uuid_on_a_foreign_store_neither_hangs_nor_breaks_load(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Entries are opaque JSON: a ``uuid`` that is not a string (here a list) is not an
    idempotency key, but it must not stop delivery (the foreign tail check hashes it)
    or make ``load`` raise."""
    inner = ForeignStore()
    store = make_durable(inner, **TUNING)
    entries = [{"uuid": ["x"], "n": 0}, {"uuid": {"y": 1}, "n": 1}, {"uuid": "z", "n": 2}]
    await store.append(KEY, entries)
    await store.flush(10)
    assert await inner.load(KEY) == entries
    await store.append(KEY, [{"uuid": "w", "n": 3}])
    assert await store.load(KEY) == [*entries, {"uuid": "w", "n": 3}]


# -- a key forgotten while this host still holds its key_id -------------------------------------


async def test_a_key_forgotten_mid_round_never_gets_another_keys_entries(
    make_durable: Callable[..., DurableSessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backend A delivers K1 batch after batch while the round's slow call is in flight
    (``_deliver_while_round_runs``). Right after A's last ack of K1, the other
    backend's compaction forgets K1 (every backend has all of it, forget_after=0) and
    a new session K2 is created: SQLite gives it K1's key_id. A's next turn for K1
    (a KeyRow holding K1's name and that key_id) must not read K2's entries and
    send them into K1's transcript."""
    slow_inner = SlowSessionStore()
    a = FaultyStore(slow_inner)
    b = MemoryStore()
    a.down()  # both keys queued for A, so that one round of A picks both
    store = make_durable(
        [a, b],
        max_batch_entries=1,
        retention_seconds=0,
        forget_after=0,
        compact_interval=3600,
        call_timeout=60,
        **TUNING,
    )
    slow: SessionKey = {"project_key": "proj", "session_id": "slow"}
    k1: SessionKey = {"project_key": "proj", "session_id": "k1"}
    k2: SessionKey = {"project_key": "proj", "session_id": "k2"}
    k1_entries = [{"uuid": "k1-0"}, {"uuid": "k1-1"}]
    k2_entries = [{"uuid": "k2-secret-0"}, {"uuid": "k2-secret-1"}]
    await store.append(slow, [{"uuid": "slow-0"}])  # key_id 1
    await store.append(k1, k1_entries)  # key_id 2 (the highest)
    queue: Any = store.queue
    ids = {k.session_id: k.key_id for k, _ in await queue.all_keys()}

    async def b_has_k1() -> bool:
        return await b.load(k1) == k1_entries

    await _until(b_has_k1)
    real_ack = queue.ack
    fired: list[bool] = []

    async def ack(backend: str, key_id: int, acked: int, *rest: Any) -> None:
        await real_ack(backend, key_id, acked, *rest)
        if not fired and backend == store.backend_names[0] and key_id == ids["k1"] and acked == 2:
            fired.append(True)
            await queue.compact(0.0, 0.0)  # what B's flusher does at its next round
            await store.append(k2, k2_entries)

    monkeypatch.setattr(queue, "ack", ack)
    a.up()

    async def a_done_with_k1() -> bool:
        return bool(fired) and await slow_inner.load(k1) is not None

    await _until(a_done_with_k1)
    await asyncio.sleep(0.2)  # let A's round run on (not an assertion on time)
    slow_inner.release.set()
    await store.flush(30)
    assert fired
    assert await slow_inner.load(k1) == k1_entries
    assert await slow_inner.load(k2) == k2_entries
    assert await b.load(k2) == k2_entries


class _HookedLoad(MemoryStore):
    """Runs ``hook`` once inside the next ``load`` (a slow remote read)."""

    hook: Callable[[], Any] | None = None

    async def load(self, key: SessionKey) -> Any:
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        return await super().load(key)


async def test_load_never_returns_another_sessions_entries_when_its_key_is_forgotten_meanwhile(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """``load`` reads the key's local view (its key_id), then asks the backend. If the
    key is forgotten meanwhile (compaction takes no session lock) and a new session
    takes its key_id, the queued entries read by key_id are the new session's."""
    inner = _HookedLoad()
    store = make_durable(inner, retention_seconds=0, forget_after=3600, **TUNING)
    k1: SessionKey = {"project_key": "proj", "session_id": "k1"}
    k2: SessionKey = {"project_key": "proj", "session_id": "k2"}
    old = [{"uuid": "k1-0"}, {"uuid": "k1-1"}]
    await store.append(k1, old)
    await store.flush(30)

    async def meanwhile() -> None:
        await store.queue.compact(0.0, 0.0)  # k1 idle and delivered: forgotten
        await store.append(k2, [{"uuid": "k2-secret"}])  # k1's key_id again

    inner.hook = meanwhile
    assert await store.load(k1) == old
    assert await store.load(k2) == [{"uuid": "k2-secret"}]


async def test_a_key_forgotten_twice_does_not_reuse_a_stale_held_uuid_set(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Protocol store, one host, forget_after=0: each time the key returns it is fresh
    and the flusher loads the uuids the backend holds (``_held_uuids``). The set kept
    from the previous incarnation (same key_id) must not stand in for a new load."""
    inner = MemoryStore()
    store = make_durable(inner, retention_seconds=0, forget_after=3600, **TUNING)
    a, c = {"uuid": "a", "n": 0}, {"uuid": "c", "n": 1}

    async def forget() -> None:
        await store.flush(30)
        await store.queue.compact(0.0, 0.0)
        assert not await _rows(store, "SELECT key_id FROM keys")

    await store.append(KEY, [a])
    await forget()
    await store.append(KEY, [c, a])  # a replayed (the flusher steps over it), c new
    await forget()
    assert await inner.load(KEY) == [a, c]
    await store.append(KEY, [c])  # c replayed
    await store.flush(30)
    assert await inner.load(KEY) == [a, c]


async def test_forgotten_keys_returning_with_replays_and_new_entries_stay_exactly_once(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """The same key forgotten and returning several times, each time replaying all it
    had and adding one entry (a re-import then a turn), new key_id each time."""
    inner = MemoryStore()
    store = make_durable(inner, retention_seconds=0, forget_after=3600, **TUNING)
    held: list[dict[str, Any]] = []
    for n in range(5):
        await store.append(key("bump"), [{"n": n}])  # keeps key_ids moving up
        entry = {"uuid": f"u{n}", "n": n}
        await store.append(KEY, [*held, entry])
        held.append(entry)
        await store.flush(30)
        assert await inner.load(KEY) == held
        await store.queue.compact(0.0, 0.0)


# -- batch rows: partial acks, compaction, data loss ------------------------------------------


async def _pending(store: DurableSessionStore, index: int = 0) -> int:
    return int((await store.status())["backends"][index]["pending_entries"])


async def test_one_entry_batches_with_compaction_between_each_ack(
    make_durable: Callable[..., DurableSessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(walmirror.queue, "BATCH_ROW_BYTES", 30)  # ~2 entries a row
    inner = GatedStore()
    store = make_durable(inner, max_batch_entries=1, retention_seconds=0, **TUNING)
    entries = [{"uuid": f"u{n}", "n": n} for n in range(9)]
    await store.append(KEY, entries[:4])
    await store.append(KEY, entries[4:])
    rows_before = len(await _rows(store, "SELECT id FROM batches"))
    assert rows_before > 2
    for n in range(1, 10):
        inner.allowed = 1

        async def moved(n: int = n) -> bool:
            return await _pending(store) == 9 - n

        await _until(moved)
        assert await _pending(store) == 9 - n
        await store.queue.compact(0.0)
        # No row with an unacknowledged entry is gone; everything unacked still reads.
        assert await store.load(KEY) == entries
        held = await _rows(store, "SELECT first_seq, count FROM batches ORDER BY first_seq")
        assert all(first + count > n for first, count in held)
        assert sum(count for _, count in held) >= 9 - n
    assert await inner.load(KEY) == entries
    assert await _rows(store, "SELECT id FROM batches") == []
    assert store.queue.stored_bytes == 0


async def test_a_backend_that_loses_data_after_partial_acks_of_a_multi_row_batch(
    make_durable: Callable[..., DurableSessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(walmirror.queue, "BATCH_ROW_BYTES", 60)
    storage = MemoryStorage()
    inner = GatedStore(storage)
    store = make_durable(inner, max_batch_entries=3, retention_seconds=0, **TUNING)
    entries = [{"uuid": f"u{n}", "n": n} for n in range(20)]
    await store.append(KEY, entries)
    inner.allowed = 3  # 9 entries acknowledged, the cursor inside a row

    async def nine() -> bool:
        return await _pending(store) == 11

    await _until(nine)
    assert await _pending(store) == 11
    await store.queue.compact(0.0)  # drops the rows fully acknowledged
    held = await _rows(store, "SELECT MIN(first_seq) FROM batches")
    lowest = held[0][0]
    assert 0 < lowest <= 9
    storage.lose_everything()
    inner.allowed = 1000
    await store.flush(30)
    losses = (await store.status())["backends"][0]["losses"]
    assert len(losses) == 1
    loss = losses[0]
    assert loss["seqs"] == [0, 8]
    assert loss["restored"] == 9 - lowest and loss["lost"] == lowest
    assert await inner.load(KEY) == entries[lowest:]


async def test_compaction_waits_for_the_slower_of_two_backends(
    make_durable: Callable[..., DurableSessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(walmirror.queue, "BATCH_ROW_BYTES", 50)
    fast = MemoryStore()
    slow = GatedStore()
    store = make_durable([fast, slow], max_batch_entries=2, retention_seconds=0, **TUNING)
    entries = [{"uuid": f"u{n}", "n": n} for n in range(12)]
    for start in range(0, 12, 4):
        await store.append(KEY, entries[start : start + 4])

    async def fast_done() -> bool:
        return await fast.load(KEY) == entries

    await _until(fast_done)
    slow.allowed = 2  # 4 entries

    async def four() -> bool:
        return await _pending(store, 1) == 8

    await _until(four)
    await store.queue.compact(0.0)
    held = await _rows(store, "SELECT first_seq, count FROM batches ORDER BY first_seq")
    assert held and held[0][0] <= 4 and sum(c for _, c in held) >= 8
    assert await store.load(KEY) == entries
    slow.allowed = 1000
    await store.flush(30)
    assert await slow.load(KEY) == entries
    await store.queue.compact(0.0)
    assert await _rows(store, "SELECT id FROM batches") == []


async def test_a_backend_down_for_good_keeps_its_entries_for_a_new_process(
    tmp_path: Path, make_durable: Callable[..., DurableSessionStore]
) -> None:
    up = MemoryStore()
    down = FaultyStore(MemoryStore())
    down.down()
    path = tmp_path / "q.db"
    store = make_durable([up, down], path, retention_seconds=0, compact_interval=0.01, **TUNING)
    entries = [{"uuid": f"u{n}", "n": n} for n in range(50)]
    for start in range(0, 50, 7):
        await store.append(KEY, entries[start : start + 7])

    async def up_done() -> bool:
        return await up.load(KEY) == entries

    await _until(up_done)
    await asyncio.sleep(0.05)  # a few compactions run
    await store.close(timeout=0.2)
    down.up()
    again = make_durable([up, down], path, **TUNING)
    await again.append(KEY, entries)  # all replays: nothing new
    await again.flush(30)
    assert await up.load(KEY) == entries
    assert await down.inner.load(KEY) == entries


# -- sizes --------------------------------------------------------------------------------------


async def test_twenty_thousand_tiny_entries_in_one_append(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    store = make_durable(inner, max_batch_entries=997, **TUNING)
    entries = [{"uuid": f"u{n}", "n": n} for n in range(20_000)]
    await store.append(KEY, entries)
    assert await store.load(KEY) == entries
    await store.append(KEY, entries[::-1])  # all repeats, in any order
    await store.flush(60)
    assert await inner.load(KEY) == entries
    assert await store.load(KEY) == entries


async def test_one_huge_entry_among_small_ones_and_rows_split_around_it(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = GatedStore()
    store = make_durable(inner, max_batch_entries=2, max_batch_bytes=1 << 20, **TUNING)
    big = {"uuid": "big", "text": "\u2028\n" * (3 << 20)}  # ~15 MiB of JSON escapes
    entries = [{"uuid": "s0"}, big, {"uuid": "s1"}, {"uuid": "s2"}]
    await store.append(KEY, entries)
    rows = await _rows(store, "SELECT first_seq, count FROM batches ORDER BY first_seq")
    assert sum(c for _, c in rows) == 4 and len(rows) >= 2
    inner.allowed = 1000
    await store.flush(60)
    assert await inner.load(KEY) == entries


# -- concurrency --------------------------------------------------------------------------------


async def test_many_tasks_appending_to_one_key_with_overlapping_uuids(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = FaultyStore(MemoryStore(), lost_reply_rate=0.3, error_rate=0.2, seed=7)
    store = make_durable(inner, max_batch_entries=5, **TUNING)

    async def writer(t: int) -> None:
        for n in range(30):
            own = {"uuid": f"t{t}-{n}", "t": t, "n": n}
            shared = {"uuid": f"shared-{n}", "n": n}  # every task sends it: kept once
            await store.append(KEY, [own, shared, own])

    await asyncio.gather(*(writer(t) for t in range(20)))
    await store.flush(60)
    stored = await inner.inner.load(KEY)
    uuids = [e["uuid"] for e in stored]
    assert len(uuids) == len(set(uuids)) == 20 * 30 + 30
    for t in range(20):
        mine = [e["n"] for e in stored if e.get("t") == t]
        assert mine == list(range(30))
    inner.reset_faults()  # a load through a 20 % error rate may fail: not what this checks
    assert await store.load(KEY) == stored


async def test_deletes_racing_appends_and_deliveries(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """One task appends (uuids repeat, so the ledger of each incarnation is exercised)
    while another deletes the key again and again. At the end the backend holds a
    suffix of what was appended (deduplicated by uuid), in order, once: everything
    whose append started after the last delete returned, nothing that was
    acknowledged before the last delete began."""
    inner = FaultyStore(MemoryStore(), latency=0.001, lost_reply_rate=0.2, seed=3)
    store = make_durable(inner, max_batch_entries=3, retention_seconds=0, **TUNING)
    log: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def appender() -> None:
        n = 0
        while not stop.is_set():
            entry = {"uuid": f"u{n % 7}", "n": n}
            await store.append(KEY, [entry])
            log.append(entry)
            n += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(appender())
    lo = hi = 0
    for _ in range(15):
        await asyncio.sleep(0.01)
        lo = len(log)  # entries 0..lo-1 were acknowledged before this delete began
        await store.delete(KEY)
        hi = len(log)  # entries from hi+1 on start after it returned
    await asyncio.sleep(0.02)
    stop.set()
    await task
    await store.flush(30)
    stored = await inner.inner.load(KEY) or []

    def dedupe(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen: set[str] = set()
        out = []
        for entry in entries:
            if entry["uuid"] not in seen:
                seen.add(entry["uuid"])
                out.append(entry)
        return out

    assert any(stored == dedupe(log[i:]) for i in range(lo, min(hi + 1, len(log)) + 1)), (
        lo,
        hi,
        [e["n"] for e in stored][:10],
    )


async def test_the_ledger_stays_exact_when_its_keys_are_evicted_under_load(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    store = make_durable(inner, **TUNING)
    await store.start()
    store.queue._ledger._max_hashes = 7  # evict constantly
    for _round in range(3):
        for k in range(10):
            await asyncio.gather(
                store.append(key(k), [{"uuid": f"{k}-{n}", "n": n} for n in range(6)]),
                store.append(key(k), [{"uuid": f"{k}-{n}", "n": n} for n in range(3, 8)]),
            )
    await store.flush(30)
    for k in range(10):
        got = await inner.load(key(k))
        assert sorted(e["n"] for e in got) == list(range(8))
        assert len(got) == 8


# -- the upgrade from schema 3 ------------------------------------------------------------------


T_KEY: SessionKey = {"project_key": "proj", "session_id": "t"}


def _write_schema_3(path: Path) -> None:
    """Two keys: s (6 entries, 'mem' acknowledged 2, a stale backend 'gone' none) and t
    (3 entries without uuids, all acknowledged by 'mem')."""
    from walmirror.schema import MIGRATIONS

    conn = sqlite3.connect(path)
    for step in MIGRATIONS[:3]:
        for statement in step:
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    now = time.time()
    conn.execute("UPDATE meta SET value = '100' WHERE name = 'seq_floor'")
    for key_id, session, count in ((1, "s", 6), (2, "t", 3)):
        conn.execute(
            "INSERT INTO keys (key_id, project_key, session_id, subpath, first_seq, next_seq,"
            " updated_at) VALUES (?, 'proj', ?, '', 100, ?, ?)",
            (key_id, session, 100 + count, now),
        )
    for seq in range(6):
        uuid = ["line\nbreak", '"q"', json.dumps("\ud800"), "u3", "u4", "u5"][seq]
        body = json.dumps({"uuid": uuid, "n": seq}, separators=(",", ":")).encode()
        conn.execute(
            "INSERT INTO entries (key_id, seq, appended_at, nbytes, body) VALUES (1, ?, ?, ?, ?)",
            (100 + seq, now, len(body), body),
        )
        conn.execute("INSERT INTO uuids VALUES (1, ?)", (uuid,))
    for seq in range(3):
        body = json.dumps({"n": seq, "t": "a\u2028b"}, ensure_ascii=False).encode()
        conn.execute(
            "INSERT INTO entries (key_id, seq, appended_at, nbytes, body) VALUES (2, ?, ?, ?, ?)",
            (100 + seq, now, len(body), body),
        )
    conn.executemany(
        "INSERT INTO cursors (backend, key_id, acked, confirmed) VALUES ('mem', ?, ?, ?)",
        [(1, 102, 101), (2, 103, 102)],
    )
    conn.execute("INSERT INTO cursors (backend, key_id, acked) VALUES ('gone', 1, 100)")
    conn.execute("INSERT INTO cursors (backend, key_id, acked) VALUES ('gone', 2, 100)")
    conn.commit()
    conn.close()


async def test_a_schema_3_queue_with_partial_acks_and_a_stale_backend_upgrades_exactly(
    tmp_path: Path, make_durable: Callable[..., DurableSessionStore]
) -> None:
    path = tmp_path / "old.db"
    _write_schema_3(path)
    inner = MemoryStore()
    # What the old process delivered before it stopped: seqs 100, 101 of s; all of t.
    from walmirror.protocol import Batch

    old_rows = (
        sqlite3.connect(path)
        .execute("SELECT key_id, seq, body FROM entries ORDER BY key_id, seq")
        .fetchall()
    )
    producer = (
        sqlite3.connect(path)
        .execute("SELECT value FROM meta WHERE name = 'producer_id'")
        .fetchone()[0]
    )
    s_bodies = [b for k, _, b in old_rows if k == 1]
    t_bodies = [b for k, _, b in old_rows if k == 2]
    await inner.append_batch(KEY, Batch(producer, 100, s_bodies[:2], None))
    await inner.append_batch(T_KEY, Batch(producer, 100, t_bodies, None))
    store = make_durable(inner, path, backend_names=("mem",), retention_seconds=0, **TUNING)
    s_entries = [json.loads(b) for b in s_bodies]
    # Replays of every old uuid (the odd ones too), and one new entry.
    await store.append(KEY, [*s_entries, {"uuid": "u6", "n": 6}])
    await store.append(T_KEY, [{"n": 3}])
    await store.flush(30)
    assert await inner.load(KEY) == [*s_entries, {"uuid": "u6", "n": 6}]
    assert await inner.load(T_KEY) == [json.loads(b) for b in t_bodies] + [{"n": 3}]
    # The stale backend's cursor keeps its entries: compaction must not drop them.
    await store.queue.compact(0.0, 0.0)
    assert len(await _rows(store, "SELECT id FROM batches")) >= 6 + 3
    status = await store.status()
    assert status["backends"][0]["pending_entries"] == 0


# -- SIGKILL mid-append, with multi-row batches, forgetting and replays across restarts ---------

_CRASH_WORKER = r"""
import asyncio, json, os, random, sys
import walmirror.queue
from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore

walmirror.queue.BATCH_ROW_BYTES = 300
queue_path, root, log_path, gen, seed = sys.argv[1:6]
gen, seed = int(gen), int(seed)
KEYS = [{"project_key": "proj", "session_id": f"s{k}"} for k in range(2)]


def entry(k, n):
    return {"uuid": f"{k}-{n}", "k": k, "n": n, "pad": "x" * (n % 53)}


async def main():
    rng = random.Random(seed)
    replay = json.loads(sys.argv[6])  # per key: the last acknowledged batch's (first, count)
    store = DurableSessionStore(
        FileStore(root), queue_path, retention_seconds=0, forget_after=0,
        compact_interval=0.01, max_batch_entries=3, backoff_initial=0.01, backoff_max=0.1,
    )
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    async def writer(k):
        first, count = replay[k]
        if count:  # the SDK re-sending the batch whose reply the killed process lost
            await store.append(KEYS[k], [entry(k, n) for n in range(first, first + count)])
        n = gen * 1_000_000
        while True:
            count = rng.randint(1, 40)
            await store.append(KEYS[k], [entry(k, m) for m in range(n, n + count)])
            os.write(fd, f"A {k} {n} {count}\n".encode())
            os.fsync(fd)
            n += count

    await asyncio.gather(writer(0), writer(1))

asyncio.run(main())
"""


async def test_sigkill_mid_append_then_reopen_is_exactly_once(tmp_path: Path) -> None:
    import os
    import random
    import signal
    import sys

    from walmirror.backends.file import FileStore

    script = tmp_path / "worker.py"
    script.write_text(_CRASH_WORKER)
    queue_path, root, log_path = tmp_path / "q.db", tmp_path / "files", tmp_path / "log"
    rng = random.Random(20250101)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    last: list[list[int]] = [[0, 0], [0, 0]]
    for gen in range(1, 7):
        errors = tmp_path / f"stderr-{gen}"
        with errors.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                str(queue_path),
                str(root),
                str(log_path),
                str(gen),
                str(gen),
                json.dumps(last),
                env=env,
                stderr=err,
            )
        # Wait for a few acknowledged appends of this generation, then kill at random.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.returncode is None:
            text = log_path.read_text() if log_path.exists() else ""
            mine = [line for line in text.splitlines() if int(line.split()[2]) >= gen * 1_000_000]
            if len(mine) >= 4:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(rng.uniform(0, 0.3))
        assert proc.returncode is None, errors.read_text()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        for line in log_path.read_text().splitlines():
            _, k, first, count = line.split()
            last[int(k)] = [int(first), int(count)]
    acked: dict[int, list[int]] = {0: [], 1: []}
    for line in log_path.read_text().splitlines():
        _, k, first, count = line.split()
        acked[int(k)].extend(range(int(first), int(first) + int(count)))
    backend = FileStore(root)
    store = DurableSessionStore(backend, queue_path, **TUNING)
    try:
        await store.flush(60)
        for k in range(2):
            stored = [e["n"] for e in await backend.load(key(k)) or []]
            assert len(stored) == len(set(stored)), f"key {k}: duplicates"
            assert stored == sorted(stored), f"key {k}: out of order"
            missing = set(acked[k]) - set(stored)
            assert not missing, f"key {k}: {len(missing)} acknowledged entries lost"
            assert await store.load(key(k)) == await backend.load(key(k))
        assert min(len(acked[0]), len(acked[1])) > 6 * 4
    finally:
        await store.close(timeout=5)
