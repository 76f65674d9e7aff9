"""The queue's batch rows and its in-memory uuid ledger (schemas 4 and 5).

One queue row holds one append's entries, and one ledger row its uuids; the
ledger in memory holds 64-bit hashes. What must hold: a hash collision never
drops an entry, the ledger survives restarts and evictions, a batch
acknowledged in part is read from the middle and kept until all of it is
acknowledged, a damaged batch parks only its key (its checksum finds damage a
parse would not), and a schema-3 file (one row per entry, one per uuid) keeps
its entries and its ledger across the upgrades.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk.types import SessionKey
from memory_store import GatedStore, MemoryStore, SlowSessionStore

import walmirror.queue
from walmirror import DurableSessionStore, flusher, ledger
from walmirror.connection import WAL_PAGES
from walmirror.errors import QueueClosedError
from walmirror.faults import FaultyStore
from walmirror.ledger import UuidLedger
from walmirror.protocol import HINT_FIELD, HINT_TIMESTAMP, HINT_USER

KEY: SessionKey = {"project_key": "proj", "session_id": "s"}
TUNING: dict[str, Any] = {"backoff_initial": 0.01, "backoff_max": 0.1}


def key(n: int) -> SessionKey:
    return {"project_key": "proj", "session_id": f"s{n}"}


# -- the ledger on its own -------------------------------------------------------------


def _rows(*uuids: str | None) -> list[tuple[str | None, bytes, int]]:
    return [(u, json.dumps({"uuid": u}).encode(), 0) for u in uuids]


def test_a_hash_collision_never_drops_an_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every uuid hashes alike: only the exact comparison tells them apart.
    monkeypatch.setattr(ledger, "hash", lambda _: 7, raising=False)
    persisted: list[str] = []
    held = UuidLedger(lambda key_id: list(persisted))
    first = held.claim(1, _rows("a", "b", "a", None, None))
    assert [r[0] for r in first] == ["a", "b", None, None]
    persisted.extend(["a", "b"])
    second = held.claim(1, _rows("c", "a", "d", "b"))
    assert [r[0] for r in second] == ["c", "d"]


def test_the_ledger_reloads_evicted_keys_and_still_knows_their_uuids() -> None:
    persisted: dict[int, list[str]] = {}
    loads: list[int] = []

    def load(key_id: int) -> list[str]:
        loads.append(key_id)
        return list(persisted.get(key_id, []))

    held = UuidLedger(load, max_hashes=30)
    for key_id in range(5):  # 5 keys x 20 uuids: more than 30 hashes fit
        uuids = [f"{key_id}-{n}" for n in range(20)]
        assert len(held.claim(key_id, _rows(*uuids))) == 20
        persisted[key_id] = uuids
    for key_id in range(5):
        again = held.claim(key_id, _rows(*persisted[key_id], f"{key_id}-new"))
        assert [r[0] for r in again] == [f"{key_id}-new"]
    assert loads.count(0) >= 2  # key 0 was evicted and read again


def test_a_key_with_more_uuids_than_a_merge_holds_keeps_them_all() -> None:
    held = UuidLedger(lambda key_id: [])
    uuids = [f"u{n}" for n in range(5000)]  # several merges of recent into sorted
    for start in range(0, 5000, 17):
        held.claim(1, _rows(*uuids[start : start + 17]))
    # Every one is now held (a hit reads the persisted ledger, empty here, so an exact
    # hit would come back as new: the point is that none is lost from the hashes).
    hashes = held._keys[1]
    assert all(hash(u) in hashes for u in uuids)
    assert len(hashes) == 5000


# -- batch rows in the queue ----------------------------------------------------------


async def _queue_rows(store: DurableSessionStore, sql: str) -> list[Any]:
    queue: Any = store.queue
    return list(await queue._reader.run(lambda: queue._reader.conn.execute(sql).fetchall()))


async def test_one_append_is_one_batch_row_and_one_ledger_row(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    faulty = FaultyStore(MemoryStore())
    faulty.down()
    store = make_durable(faulty, **TUNING)
    entries = [{"uuid": f"u{n}", "n": n} for n in range(17)] + [{"type": "title"}]
    await store.append(KEY, entries)
    assert await _queue_rows(store, "SELECT first_seq, count FROM batches") == [(0, 18)]
    ledger_rows = await _queue_rows(store, "SELECT uuids FROM ledger")
    assert [json.loads(r[0]) for r in ledger_rows] == [[f"u{n}" for n in range(17)]]
    faulty.up()
    await store.flush(30)
    assert await faulty.inner.load(KEY) == entries


async def test_the_ledger_survives_a_restart(
    tmp_path: Path, make_durable: Callable[..., DurableSessionStore]
) -> None:
    inner = MemoryStore()
    path = tmp_path / "q.db"
    store = make_durable(inner, path, **TUNING)
    entries = [{"uuid": f"u{n}", "n": n} for n in range(10)]
    await store.append(KEY, entries)
    await store.close(timeout=10)
    again = make_durable(inner, path, **TUNING)
    # The SDK's retry after an ambiguous failure, and a partial overlap.
    await again.append(KEY, entries)
    await again.append(KEY, [*entries[5:], {"uuid": "u10", "n": 10}])
    await again.flush(30)
    assert await inner.load(KEY) == [*entries, {"uuid": "u10", "n": 10}]


async def test_a_batch_acknowledged_in_part_is_read_from_its_middle_and_kept(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = GatedStore()
    store = make_durable(inner, max_batch_entries=5, retention_seconds=0, **TUNING)
    entries = [{"uuid": f"u{n}", "n": n} for n in range(17)]
    await store.append(KEY, entries)
    before = (await store.status())["backends"][0]["pending_bytes"]
    inner.allowed = 1  # one 5-entry delivery goes through
    for _ in range(1000):
        if (await store.status())["backends"][0]["pending_entries"] == 12:
            break
        await asyncio.sleep(0.005)
    assert await inner.load(KEY) == entries[:5]
    await store.queue.compact(0.0)  # 12 entries of the batch unacknowledged: it stays
    assert await _queue_rows(store, "SELECT count FROM batches") == [(17,)]
    status = (await store.status())["backends"][0]
    assert status["pending_entries"] == 12
    assert 0 < status["pending_bytes"] < before
    assert await store.load(KEY) == entries  # its backend refusing: the queue answers
    inner.allowed = 1000
    await store.flush(30)
    assert await inner.load(KEY) == entries
    await store.queue.compact(0.0)
    assert await _queue_rows(store, "SELECT count FROM batches") == []


SUB: SessionKey = {"project_key": "proj", "session_id": "s", "subpath": "agents/a"}


async def _deliver_damaged(
    make_durable: Callable[..., DurableSessionStore], target: SessionKey, damage: str
) -> tuple[MemoryStore, list[dict[str, Any]]]:
    """Queue two entries of ``target`` and one of another key with the backend down,
    apply ``damage`` (``SET`` clauses) to ``target``'s batch, bring the backend up and
    wait until the other key is delivered and a key is parked: (backend, parked)."""
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    faulty.down()
    store = make_durable(faulty, **TUNING)
    await store.append(target, [{"n": 0}, {"n": 1}])
    await store.append(key(1), [{"n": 0}])
    queue: Any = store.queue
    await queue._writer.run(
        lambda: queue._writer.conn.execute(
            f"UPDATE batches SET {damage} WHERE key_id ="
            " (SELECT key_id FROM keys WHERE session_id = 's')"
        )
    )
    faulty.up()
    deadline = time.monotonic() + 30  # a guard against a hang, not a timing
    while True:
        parked: list[dict[str, Any]] = (await store.status())["backends"][0]["parked"]
        if parked and await inner.load(key(1)):
            return inner, parked
        assert time.monotonic() < deadline, "the other key was not delivered, or none parked"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("damage", "found"),
    [("CAST(body || x'0a7b7d' AS BLOB)", "holds 3 entries"), ("'text'", "holds 0 entries")],
)
async def test_a_batch_that_does_not_split_into_its_count_parks_its_key(
    make_durable: Callable[..., DurableSessionStore], damage: str, found: str
) -> None:
    inner, parked = await _deliver_damaged(make_durable, KEY, f"body = {damage}")
    assert await inner.load(key(1)) == [{"n": 0}]
    assert parked[0]["key"] == KEY
    assert parked[0]["error"].startswith(
        f"CorruptQueueError: the queued batch at seq 0 of this key {found} where 2 were"
    )
    assert await inner.load(KEY) is None


@pytest.mark.parametrize(
    ("target", "damage"),
    [
        # Valid JSON, the same count: only the checksum tells (a subkey is never parsed).
        (SUB, "body = CAST('{\"n\":9}' || x'0a' || '{\"n\":8}' AS BLOB)"),
        (KEY, "body = CAST('{\"n\":9}' || x'0a' || '{\"n\":8}' AS BLOB)"),
        # The hints tell the backend which entries to parse: they are checked too.
        (KEY, "hints = x'01000100'"),
        (KEY, "crc = crc + 1"),
    ],
)
async def test_a_batch_that_does_not_match_its_checksum_parks_its_key(
    make_durable: Callable[..., DurableSessionStore], target: SessionKey, damage: str
) -> None:
    inner, parked = await _deliver_damaged(make_durable, target, damage)
    assert await inner.load(key(1)) == [{"n": 0}]
    assert parked[0]["key"] == target
    assert parked[0]["error"] == (
        "CorruptQueueError: the queued batch at seq 0 of this key does not match its "
        "checksum (the queue file is damaged)"
    )
    assert await inner.load(target) is None


async def test_a_main_key_batch_holds_its_entries_hints_and_a_subkey_batch_none(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    store = make_durable(MemoryStore(), **TUNING)
    await store.append(KEY, [{"type": "user", "timestamp": "t"}, {"gitBranch": "main"}])
    await store.append(SUB, [{"type": "user"}])
    rows = await _queue_rows(store, "SELECT hints FROM batches ORDER BY id")
    assert rows[0][0] == walmirror.queue.pack_hints(
        [HINT_USER | HINT_TIMESTAMP, HINT_FIELD["gitBranch"]]
    )
    assert rows[0][0] == bytes([6, 0, 0, 1])  # little-endian, two bytes an entry
    assert rows[1][0] is None


# -- the upgrade from one row per entry ---------------------------------------------------


def _write_schema_3_queue(path: Path, acked: int) -> None:
    """A schema-3 queue: one key, five entries with uuids (one row each, one ledger row
    each), a cursor of backend 'mem' that acknowledged ``acked`` of them."""
    from walmirror.schema import MIGRATIONS

    conn = sqlite3.connect(path)
    for step in MIGRATIONS[:3]:
        for statement in step:
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    conn.execute(
        "INSERT INTO keys (key_id, project_key, session_id, subpath, first_seq, next_seq,"
        " updated_at) VALUES (1, 'proj', 's', '', 0, 5, ?)",
        (time.time(),),
    )
    for seq in range(5):
        body = json.dumps({"uuid": f"u{seq}", "n": seq}, separators=(",", ":")).encode()
        conn.execute(
            "INSERT INTO entries (key_id, seq, appended_at, nbytes, body) VALUES (1, ?, ?, ?, ?)",
            (seq, time.time(), len(body), body),
        )
        conn.execute("INSERT INTO uuids VALUES (1, ?)", (f"u{seq}",))
    conn.execute(
        "INSERT INTO cursors (backend, key_id, acked, confirmed) VALUES ('mem', 1, ?, ?)",
        (acked, acked - 1 if acked else None),
    )
    conn.commit()
    conn.close()


async def test_a_schema_3_queue_keeps_its_entries_and_its_ledger(
    tmp_path: Path, make_durable: Callable[..., DurableSessionStore]
) -> None:
    from walmirror.schema import SCHEMA_VERSION

    path = tmp_path / "old.db"
    _write_schema_3_queue(path, acked=0)
    inner = MemoryStore()
    store = make_durable(inner, path, backend_names=("mem",), **TUNING)
    entries = [{"uuid": f"u{n}", "n": n} for n in range(5)]
    await store.append(KEY, [*entries[2:], {"uuid": "u5", "n": 5}])  # u2..u4 held already
    await store.flush(30)
    assert await inner.load(KEY) == [*entries, {"uuid": "u5", "n": 5}]
    version = await _queue_rows(store, "SELECT value FROM meta WHERE name = 'schema_version'")
    assert int(version[0][0]) == SCHEMA_VERSION == 5
    tables = {r[0] for r in await _queue_rows(store, "SELECT name FROM sqlite_master")}
    assert "entries" not in tables and "uuids" not in tables


# -- the flusher: the keys of a round keep going while one call hangs ------------------------


@pytest.mark.parametrize("round_seconds", [0.0, flusher.ROUND_SECONDS])
async def test_the_keys_of_a_round_keep_delivering_while_one_call_hangs(
    make_durable: Callable[..., DurableSessionStore],
    monkeypatch: pytest.MonkeyPatch,
    round_seconds: float,
) -> None:
    """Also past the round's budget (``ROUND_SECONDS``; 0 makes every turn late, as
    a loaded machine can): the round cannot end before the held call returns, so
    free slots keep taking keys."""
    monkeypatch.setattr(flusher, "ROUND_SECONDS", round_seconds)
    inner = SlowSessionStore()
    faulty = FaultyStore(inner)
    faulty.down()  # both keys queued, so that one round picks both
    store = make_durable(faulty, max_batch_entries=2, call_timeout=60, **TUNING)
    slow: SessionKey = {"project_key": "proj", "session_id": "slow"}
    await store.append(slow, [{"n": 0}])
    fast = [{"n": n} for n in range(10)]
    for entry in fast:
        await store.append(KEY, [entry])
    faulty.up()
    # Five batches of the fast key go while the slow key's one call is held (it
    # would hold a round barrier up to call_timeout, 60 s; 20 s only guards a hang).
    for _ in range(2000):
        if await inner.load(KEY) == fast:
            break
        await asyncio.sleep(0.01)
    assert await inner.load(KEY) == fast
    assert await inner.load(slow) is None
    inner.release.set()
    await store.flush(30)
    assert await inner.load(slow) == [{"n": 0}]


# -- acks share a transaction ----------------------------------------------------------------


async def test_acks_made_while_the_writer_is_busy_share_one_transaction(
    make_durable: Callable[..., DurableSessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    faulty = FaultyStore(MemoryStore())
    faulty.down()  # the flusher acks nothing itself
    store = make_durable(faulty, **TUNING)
    for n in range(50):
        await store.append(key(n), [{"n": 0}, {"n": 1}])
    queue: Any = store.queue
    backend = store.backend_names[0]
    ids = {k.session_id: k.key_id for k, _ in await queue.all_keys()}
    taken: list[int] = []
    real = queue._commit_acks

    def commit_acks(loop: asyncio.AbstractEventLoop) -> None:
        taken.append(len(queue._acks))
        real(loop)

    monkeypatch.setattr(queue, "_commit_acks", commit_acks)
    busy = threading.Event()
    blocker = asyncio.ensure_future(queue._writer.run(busy.wait))  # the writer is busy
    acks = asyncio.gather(*(queue.ack(backend, ids[f"s{n}"], 2, 1, 2) for n in range(50)))
    await asyncio.sleep(0.05)
    busy.set()
    await blocker
    await acks
    assert [n for n in taken if n] == [50]  # one transaction for all fifty
    for n in range(50):
        cursor = await queue.cursor(backend, ids[f"s{n}"])
        assert (cursor.acked, cursor.confirmed, cursor.solo_length) == (2, 1, 2)


async def test_a_failed_ack_raises_and_is_not_kept_for_a_later_transaction(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    faulty = FaultyStore(MemoryStore())
    faulty.down()
    store = make_durable(faulty, **TUNING)
    await store.append(key(1), [{"n": 0}])
    await store.append(key(2), [{"n": 0}])
    queue: Any = store.queue
    backend = store.backend_names[0]
    ids = {k.session_id: k.key_id for k, _ in await queue.all_keys()}
    before = (await queue.cursor(backend, ids["s1"])).acked
    # A transaction left open on the writer (it is rolled back): the ack fails...
    await queue._writer.run(lambda: queue._writer.conn.execute("BEGIN"))
    with pytest.raises(sqlite3.OperationalError):
        await queue.ack(backend, ids["s1"], before + 1, 0, 1)
    # ...and stays undone: a later transaction commits only its own ack. (Kept, it
    # could land after a rewind of its key and skip entries that must be re-sent:
    # tests/test_attack_session7.py.)
    await queue.ack(backend, ids["s2"], before + 1, 0, 1)
    assert (await queue.cursor(backend, ids["s1"])).acked == before
    assert (await queue.cursor(backend, ids["s2"])).acked == before + 1
    assert not queue._acks


async def _one_key_store(
    make_durable: Callable[..., DurableSessionStore],
) -> tuple[DurableSessionStore, Any, str, int]:
    """A store whose backend is down (its flusher acks nothing itself) holding one key:
    the store, its queue, the backend's cursor name and the key's id."""
    faulty = FaultyStore(MemoryStore())
    faulty.down()
    store = make_durable(faulty, **TUNING)
    await store.append(key(1), [{"n": 0}])
    queue: Any = store.queue
    (key_id,) = [k.key_id for k, _ in await queue.all_keys()]
    return store, queue, store.backend_names[0], key_id


async def _until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds (a hang guard, not a timing)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


async def test_an_ack_is_committed_by_the_writers_next_job_not_its_own_turn(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    # A delivery holds its key and a flusher slot until its ack is in: the ack must
    # not wait behind the writer's line of group commits (each an fsync).
    store, queue, backend, key_id = await _one_key_store(make_durable)
    first, second = threading.Event(), threading.Event()
    queue._writer.submit(first.wait)  # the writer is busy...
    append = asyncio.ensure_future(store.append(key(2), [{"n": 0}]))
    await _until(lambda: bool(queue._pending))  # ...its group commit is in line...
    queue._writer.submit(second.wait)  # ...then another job...
    ack = asyncio.ensure_future(queue.ack(backend, key_id, 1, 0, 1))
    await _until(lambda: bool(queue._acks))  # ...then the ack's own job
    first.set()
    try:
        # The group commit takes the ack into its transaction: the ack returns while
        # its own job still waits behind ``second``.
        await asyncio.wait_for(asyncio.gather(append, ack), 30)
        assert not second.is_set()
        assert (await queue.cursor(backend, key_id)).acked == 1
    finally:
        second.set()


async def test_a_failed_group_commit_with_acks_riding_commits_both_apart(
    make_durable: Callable[..., DurableSessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Either part may be at fault: the acks go alone, then the appends without them.
    store, queue, backend, key_id = await _one_key_store(make_durable)
    real = queue._commit_group
    riders: list[int] = []

    def failing_group(group: list[Any], acks: Any = None) -> list[int]:
        if acks:
            riders.append(len(acks))
            raise sqlite3.OperationalError("injected: the group's transaction failed")
        return list(real(group, acks))

    monkeypatch.setattr(queue, "_commit_group", failing_group)
    busy = threading.Event()
    queue._writer.submit(busy.wait)
    append = asyncio.ensure_future(store.append(key(2), [{"n": 0}]))
    ack = asyncio.ensure_future(queue.ack(backend, key_id, 1, 0, 1))
    await _until(lambda: bool(queue._pending and queue._acks))
    busy.set()
    await asyncio.wait_for(asyncio.gather(append, ack), 30)
    assert riders == [1]
    assert (await queue.cursor(backend, key_id)).acked == 1
    stored = "SELECT b.count FROM batches b JOIN keys k ON k.key_id = b.key_id"
    assert await _queue_rows(store, f"{stored} WHERE k.session_id = 's2'") == [(1,)]


async def test_an_ack_after_the_queue_closed_raises_instead_of_hanging(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    store, queue, backend, key_id = await _one_key_store(make_durable)
    await store.close(timeout=0)
    with pytest.raises(QueueClosedError):
        await asyncio.wait_for(queue.ack(backend, key_id, 1, 0, 1), 30)


async def test_a_big_append_is_stored_as_several_rows_and_read_across_them(
    make_durable: Callable[..., DurableSessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(walmirror.queue, "BATCH_ROW_BYTES", 40)
    inner = GatedStore()
    store = make_durable(inner, max_batch_entries=3, **TUNING)
    entries = [{"uuid": f"u{n}", "n": n} for n in range(10)]  # ~20 bytes each
    await store.append(KEY, entries)
    rows = await _queue_rows(store, "SELECT first_seq, count FROM batches ORDER BY first_seq")
    assert len(rows) > 3
    assert [r[0] for r in rows] == [sum(c for _, c in rows[:i]) for i in range(len(rows))]
    assert sum(c for _, c in rows) == 10
    inner.allowed = 1  # one delivery of 3 entries: the cursor stops inside a row
    for _ in range(1000):
        if (await store.status())["backends"][0]["pending_entries"] == 7:
            break
        await asyncio.sleep(0.005)
    assert await store.load(KEY) == entries  # backend's 3, then the queue's 7
    inner.allowed = 1000
    await store.flush(30)
    assert await inner.load(KEY) == entries
    assert await store.append(KEY, entries) is None  # all held: nothing new
    await store.flush(30)
    assert await inner.load(KEY) == entries


async def test_a_uuid_repeated_within_one_group_commit_is_stored_once(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """The SDK's retry can share a group commit with the append it repeats: the ledger
    rows of a group are written after all of it is claimed, and must still count."""
    inner = MemoryStore()
    store = make_durable(inner, **TUNING)
    await store.append(KEY, [{"uuid": "u0", "n": 0}])  # the key is known, its ledger loaded
    queue: Any = store.queue
    busy = threading.Event()
    blocker = asyncio.ensure_future(queue._writer.run(busy.wait))  # appends gather behind it
    first = [{"uuid": "u1", "n": 1}, {"uuid": "u2", "n": 2}]
    appends = asyncio.gather(
        store.append(KEY, first),
        store.append(KEY, first),  # the retry
        store.append(KEY, [{"uuid": "u2", "n": 2}, {"uuid": "u3", "n": 3}]),
    )
    await asyncio.sleep(0.05)
    busy.set()
    await blocker
    await appends
    await store.flush(30)
    assert await inner.load(KEY) == [{"uuid": f"u{n}", "n": n} for n in range(4)]


# -- checkpoints run off the commit path --------------------------------------------------


async def test_the_wal_is_checkpointed_by_its_own_thread_not_by_commits(
    tmp_path: Path, make_durable: Callable[..., DurableSessionStore]
) -> None:
    faulty = FaultyStore(MemoryStore())
    faulty.down()
    path = tmp_path / "q.db"
    store = make_durable(faulty, path, **TUNING)
    await store.start()
    queue: Any = store.queue
    pragma = "PRAGMA wal_autocheckpoint"
    writer = await queue._writer.run(lambda: queue._writer.conn.execute(pragma).fetchone()[0])
    assert writer == 2 * WAL_PAGES  # the writer only as a backstop
    text = "x" * 1000
    for n in range(150):  # WAL ~5 MB: past WAL_PAGES, short of the writer's backstop
        await store.append(KEY, [{"n": n, "i": i, "text": text} for i in range(17)])
    # Only a checkpoint moves pages from the WAL into the database file.
    for _ in range(2000):
        if path.stat().st_size > 2 << 20:
            break
        await asyncio.sleep(0.01)
    assert path.stat().st_size > 2 << 20
    faulty.up()
    await store.flush(60)
    assert len(await faulty.inner.load(KEY) or []) == 150 * 17
