"""Hostile tests for the shared cursor acks of ``WriteAheadQueue`` (session 7).

An ``ack()`` no longer waits for a writer job of its own: it queues (row, future) on
``_acks`` and the next writer job of any kind commits every pending ack, an append's
group commit taking them into its own transaction. A failed group commit commits the
acks alone and the appends again without them; a failed ack transaction settles its
futures with the error and keeps nothing for later; ``ack()`` retries twice after a
full disk. (Two of the bugs these tests found were fixed before the change landed: an
ack failing in a one-append group failed the append, and a failed ack kept for the
next transaction undid a later rewind, which session 6's code did too.)

What must hold, whatever the interleaving or the injected fault:

* every entry that ``append`` acknowledged reaches every backend exactly once, in
  order, and after ``flush()`` ``status()`` shows nothing pending;
* an ack's failure is never an append's failure (an append fails only for its own
  transaction), and acks riding in a failed group commit still land;
* an ack transaction that fails (any error, or a full disk past the retries) leaves
  the cursor to advance with a later delivery, with no duplicate in the backend, and
  never undoes later cursor moves (a rewind after a backend lost entries);
* a cancelled ``ack`` is still committed and never wedges the writer;
* ``close()`` during deliveries and acks never hangs and loses nothing acknowledged
  (reopening the same queue file with a new store delivers the rest); an ack that
  races a closing queue ends promptly with ``QueueClosedError``;
* SIGKILL in the middle of deliveries: nothing acknowledged lost, nothing twice.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk.types import SessionKey
from memory_store import MemoryStorage, MemoryStore
from test_crash import check_crash_run

from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore
from walmirror.errors import QueueClosedError
from walmirror.queue import WriteAheadQueue
from walmirror.store import serialize_entries

T = TypeVar("T")

GUARD = 60.0  # hang guard for every await that could wedge; never a timing assertion
REDIS_URL = os.environ.get("WALMIRROR_REDIS_URL", "redis://127.0.0.1:6379/0")
_NS = uuid.UUID("0b3c0a4e-7f55-4d8f-a1c9-2f8e8f0c1d07")

# A fault SQLite could raise mid-transaction that is not a full disk.
IO_ERROR = "disk I/O error"
DISK_FULL = "database or disk is full"


# -- helpers -------------------------------------------------------------------------------


async def guarded(aw: Awaitable[T], what: str = "operation") -> T:
    try:
        return await asyncio.wait_for(aw, GUARD)
    except TimeoutError:
        raise AssertionError(f"{what} hung for {GUARD} s") from None


def skey(n: int) -> SessionKey:
    return {"project_key": "proj", "session_id": f"s{n}"}


def entry(n: int, i: int) -> dict[str, Any]:
    return {
        "type": "user",
        "uuid": str(uuid.uuid5(_NS, f"{n}:{i}")),
        "n": n,
        "i": i,
        "message": {"role": "user", "content": f"entry {i} of {n} " + "x" * (i % 13)},
    }


def rows_of(n: int, first: int, count: int) -> list[Any]:
    return serialize_entries([entry(n, i) for i in range(first, first + count)], 1 << 20)


async def append_all(
    store: DurableSessionStore,
    sessions: int,
    per_session: int,
    chunk: int,
    retry_failed: bool = False,
    first: int = 0,
) -> list[BaseException]:
    """Each session appends its entries ``first``..``per_session - 1`` in chunks, all
    sessions at once. Returns the append errors (a failed chunk is retried when
    ``retry_failed``)."""
    errors: list[BaseException] = []

    async def one(n: int) -> None:
        i = first
        while i < per_session:
            count = min(chunk, per_session - i)
            try:
                await store.append(skey(n), [entry(n, j) for j in range(i, i + count)])
            except Exception as exc:
                errors.append(exc)
                if not retry_failed:
                    raise
                continue
            i += count
            if i % (3 * chunk) == 0:
                await asyncio.sleep(0)

    await guarded(asyncio.gather(*(one(n) for n in range(sessions))), "appends")
    return errors


async def assert_exactly_once(backend: Any, sessions: int, per_session: int) -> None:
    for n in range(sessions):
        stored = list(await backend.load(skey(n)) or [])
        want = [entry(n, i) for i in range(per_session)]
        if stored != want:
            got = [e.get("i") for e in stored]
            raise AssertionError(
                f"session {n}: backend holds seqs {got[:40]}... ({len(got)}), "
                f"want 0..{per_session - 1} exactly once in order"
            )


async def assert_nothing_pending(store: DurableSessionStore) -> None:
    status = await guarded(store.status(), "status")
    for backend in status["backends"]:
        assert backend["pending_entries"] == 0, backend
        assert backend["pending_keys"] == 0, backend
        assert backend["parked"] == [], backend


class ConnProxy:
    """Stands in for the writer's ``sqlite3.Connection`` (whose methods cannot be
    patched) to fail chosen statements."""

    def __init__(self, real: sqlite3.Connection, fail: Callable[[str], BaseException | None]):
        self._real = real
        self._fail = fail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def execute(self, sql: str, *args: Any) -> Any:
        error = self._fail(sql)
        if error is not None:
            raise error
        return self._real.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> Any:
        error = self._fail(sql)
        if error is not None:
            raise error
        return self._real.executemany(sql, rows)


def is_ack_update(sql: str) -> bool:
    return sql.startswith("UPDATE cursors SET acked = ?, confirmed = ?, solo_length = ?")


async def open_queue(path: Path, backends: tuple[str, ...] = ("b",)) -> WriteAheadQueue:
    queue = WriteAheadQueue(path)
    await guarded(queue.open(backends), "queue open")
    return queue


def block_writer(queue: WriteAheadQueue) -> threading.Event:
    """Hold the writer thread until the returned event is set."""
    gate = threading.Event()
    queue._writer.submit(lambda: gate.wait(GUARD))
    return gate


async def key_id_of(queue: WriteAheadQueue, backend: str = "b") -> int:
    keys = await queue.pending_keys(backend, 100)
    assert len(keys) == 1, keys
    return keys[0].key_id


async def let_tasks_run() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- 1. many keys delivering while many sessions append ----------------------------------


@pytest.mark.parametrize("kind", ["memory+file", "redis"])
async def test_many_keys_deliver_while_many_sessions_append_exactly_once_in_order(
    make_durable: Callable[..., DurableSessionStore], tmp_path: Path, kind: str
) -> None:
    closers: list[Any] = []
    if kind == "redis":
        from walmirror.backends.redis import RedisStore

        prefix = f"wm_s7{uuid.uuid4().hex[:10]}"
        backends: list[Any] = [RedisStore.from_url(f"{REDIS_URL}?prefix={prefix}")]
        closers.append(backends[0])
    else:
        # A protocol backend and a foreign one (the SDK's in-memory store: no marks).
        backends = [MemoryStore(), FileStore(tmp_path / "files"), InMemorySessionStore()]
    store = make_durable(backends, max_batch_entries=4, batch_linger=0.0)
    queue = store.queue
    rode = 0
    original = queue._commit_group

    def counting(group: Any, acks: Any = None) -> list[int]:
        nonlocal rode
        if acks:
            rode += 1
        return original(group, acks)

    queue._commit_group = counting  # type: ignore[method-assign]
    try:
        sessions, per_round, per_session = 40, 60, 0
        for _ in range(10):  # until acks rode in group commits (the first round, mostly)
            per_session += per_round
            await append_all(store, sessions, per_session, chunk=3, first=per_session - per_round)
            if rode:
                break
        await guarded(store.flush(), "flush")
        await assert_nothing_pending(store)
        for backend in backends:
            await assert_exactly_once(backend, sessions, per_session)
        # The run did what it claims: acks rode in append group commits.
        assert rode > 0, "no ack ever rode in a group commit: the test proved nothing"
        assert not queue._acks, "acks left pending after flush"
    finally:
        await guarded(store.close(), "close")
        for backend in closers:
            client = backend.client
            async for name in client.scan_iter(match=f"{prefix}:*", count=1000):
                await client.delete(name)
            await backend.aclose()


# -- 2. an ack's failure is not an append's ----------------------------------------------


@pytest.mark.parametrize("appenders", [1, 3])
async def test_an_ack_failing_inside_a_group_commit_fails_no_append(
    tmp_path: Path, appenders: int
) -> None:
    """The ack statement of a group commit fails once: the acks must land on their own
    and the appends that shared the transaction must still be stored (the error is the
    ack's, not theirs)."""
    queue = await open_queue(tmp_path / "q.db")
    try:
        await queue.append(skey(0), rows_of(0, 0, 5))
        kid = await key_id_of(queue)
        failed = 0

        def fail(sql: str) -> BaseException | None:
            nonlocal failed
            if is_ack_update(sql) and failed == 0:
                failed += 1
                return sqlite3.OperationalError(IO_ERROR)
            return None

        queue._writer._conn = ConnProxy(queue._writer.conn, fail)  # type: ignore[assignment]
        gate = block_writer(queue)
        # Appends first, then the ack: the appends' group commit (the writer's next
        # job) takes the pending ack into its own transaction.
        appends = [
            asyncio.create_task(queue.append(skey(n), rows_of(n, 0, 2)))
            for n in range(1, 1 + appenders)
        ]
        await let_tasks_run()
        ack = asyncio.create_task(queue.ack("b", kid, 5, 4, None))
        await let_tasks_run()
        gate.set()
        results = await guarded(
            asyncio.gather(*appends, ack, return_exceptions=True), "appends and ack"
        )
        assert failed == 1, "the fault was not injected into a group commit"
        cursor = await queue.cursor("b", kid)
        assert cursor is not None and cursor.acked == 5, f"the ack did not land: {cursor}"
        append_errors = [r for r in results[:-1] if isinstance(r, BaseException)]
        assert not append_errors, (
            f"an append failed because an ack riding in its group commit failed: {append_errors!r}"
        )
        assert results[:-1] == [2] * appenders
        assert results[-1] is None, f"the ack itself failed though it landed: {results[-1]!r}"
    finally:
        await guarded(queue.close(), "close")


async def test_group_commits_failing_with_acks_riding_lose_no_ack_and_no_entry(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """The whole group transaction fails (six times) while acks ride in it: the acks
    are committed alone, appends retried by their callers land once, in order."""
    go = asyncio.Event()

    class HeldStore(MemoryStore):
        async def append_batch(self, key: SessionKey, batch: Any) -> Any:
            await go.wait()
            return await super().append_batch(key, batch)

    backend = HeldStore()
    store = make_durable(backend, max_batch_entries=3, batch_linger=0.0)
    sessions, per_session = 25, 45
    for n in range(sessions):  # committed; their deliveries wait at the backend
        await store.append(skey(n), [entry(n, 0), entry(n, 1)])
    queue = store.queue
    original = queue._commit_group
    fired = 0

    def failing(group: Any, acks: Any = None) -> list[int]:
        nonlocal fired
        if acks and fired < 6:
            fired += 1
            raise sqlite3.OperationalError(IO_ERROR)
        return original(group, acks)

    queue._commit_group = failing  # type: ignore[method-assign]
    # A group commit of many appends is in line first; the deliveries' acks queue
    # behind it, so it takes them into its transaction, which fails.
    gate = block_writer(queue)
    held = [
        asyncio.create_task(store.append(skey(n), [entry(n, 2), entry(n, 3)]))
        for n in range(sessions)
    ]
    await let_tasks_run()
    go.set()
    while not queue._acks:  # deliveries done, their acks wait for the writer
        await guarded(asyncio.sleep(0.005), "acks")
    assert not any(t.done() for t in held)
    gate.set()
    results = await guarded(asyncio.gather(*held, return_exceptions=True), "held appends")
    assert fired >= 1, "no group commit carried acks: the fault was never injected"
    assert results == [None] * sessions, f"appends of a multi-request group failed: {results}"

    async def rest(n: int) -> None:
        i = 4
        while i < per_session:
            count = min(3, per_session - i)
            try:
                await store.append(skey(n), [entry(n, j) for j in range(i, i + count)])
            except sqlite3.OperationalError as exc:  # a single-request group failed
                errors.append(exc)
                continue
            i += count

    errors: list[BaseException] = []
    await guarded(asyncio.gather(*(rest(n) for n in range(sessions))), "appends")
    await guarded(store.flush(), "flush")
    await assert_nothing_pending(store)
    await assert_exactly_once(backend, sessions, per_session)
    assert len(errors) <= fired, errors
    assert not queue._acks


# -- 3. a failed ack transaction ---------------------------------------------------------


@pytest.mark.parametrize("message", [IO_ERROR, DISK_FULL])
async def test_failed_ack_transactions_advance_the_cursor_later_without_duplicates(
    make_durable: Callable[..., DurableSessionStore], tmp_path: Path, message: str
) -> None:
    """The first seven ack transactions fail (a full disk fails more than the two
    retries cover): every delivery still ends acknowledged, nothing is stored twice,
    and no append fails."""
    protocol, foreign = MemoryStore(), InMemorySessionStore()
    store = make_durable([protocol, foreign], max_batch_entries=5, batch_linger=0.0)
    await store.start()
    queue = store.queue
    original = queue._commit_ack_rows
    failures = 0
    rooms = 0

    def failing(rows: list[Any]) -> None:
        nonlocal failures
        if failures < 7:
            failures += 1
            raise sqlite3.OperationalError(message)
        original(rows)

    original_room = queue._make_disk_room

    def counting_room() -> None:
        nonlocal rooms
        rooms += 1
        original_room()

    queue._commit_ack_rows = failing  # type: ignore[method-assign]
    queue._make_disk_room = counting_room  # type: ignore[method-assign]
    sessions, per_session = 12, 30
    errors = await append_all(store, sessions, per_session, chunk=2)
    assert not errors
    await guarded(store.flush(), "flush")
    await assert_nothing_pending(store)
    await assert_exactly_once(protocol, sessions, per_session)
    await assert_exactly_once(foreign, sessions, per_session)
    assert failures == 7
    if message == DISK_FULL:
        assert rooms > 0, "a full disk in an ack commit never made room"
    # Reopened, the queue has nothing to send again.
    await guarded(store.close(), "close")
    again = make_durable([protocol, foreign], wal_path=queue.path)
    await guarded(again.flush(), "flush after reopen")
    await assert_nothing_pending(again)
    await assert_exactly_once(protocol, sessions, per_session)
    await assert_exactly_once(foreign, sessions, per_session)


async def test_a_disk_full_ack_is_retried_and_lands_before_ack_returns(tmp_path: Path) -> None:
    queue = await open_queue(tmp_path / "q.db")
    try:
        await queue.append(skey(0), rows_of(0, 0, 4))
        kid = await key_id_of(queue)
        original = queue._commit_ack_rows
        calls = 0

        def failing(rows: list[Any]) -> None:
            nonlocal calls
            calls += 1
            if calls <= 2:
                raise sqlite3.OperationalError(DISK_FULL)
            original(rows)

        queue._commit_ack_rows = failing  # type: ignore[method-assign]
        await guarded(queue.ack("b", kid, 4, 3, None), "ack")
        cursor = await queue.cursor("b", kid)
        assert cursor is not None and cursor.acked == 4 and cursor.confirmed == 3
        assert calls == 3
        assert not queue._acks, f"rows left in the ack line: {list(queue._acks)}"
        # Full-disk failures past the two retries: the ack gives up with the error and
        # is not kept for later (a stale ack could undo a rewind); the writer keeps
        # serving, and the cursor stays where the last ack that landed put it.
        await queue.append(skey(0), rows_of(0, 4, 3))

        def full(rows: list[Any]) -> None:
            raise sqlite3.OperationalError(DISK_FULL)

        queue._commit_ack_rows = full  # type: ignore[method-assign]
        with pytest.raises(sqlite3.OperationalError):
            await guarded(queue.ack("b", kid, 7, 6, None), "ack")
        queue._commit_ack_rows = original  # type: ignore[method-assign]
        assert await guarded(queue.append(skey(1), rows_of(1, 0, 1)), "append") == 1
        assert not queue._acks
        cursor = await queue.cursor("b", kid)
        assert cursor is not None and cursor.acked == 4, cursor
    finally:
        await guarded(queue.close(), "close")


async def test_a_failed_ack_does_not_undo_a_later_rewind(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """The ack of seqs 10..14 fails and the backend then loses everything it held. The
    flusher rewinds the cursor to 0 and resends from there; the failed ack must never
    land afterwards (were it kept for a later transaction, it would move the cursor
    past seqs the backend no longer holds): after flush() the backend holds all 15."""
    storage = MemoryStorage()
    backend = MemoryStore(storage)
    store = make_durable(backend, max_batch_entries=5, batch_linger=0.0, retention_seconds=3600)
    await store.append(skey(0), [entry(0, i) for i in range(10)])
    await guarded(store.flush(), "flush")
    queue = store.queue
    loop = asyncio.get_running_loop()
    original = queue._commit_ack_rows
    failed = 0

    def failing(rows: list[Any]) -> None:
        nonlocal failed
        if failed == 0:
            failed += 1
            # The backend restarts without persistence before the flusher hears back.
            loop.call_soon_threadsafe(storage.lose_everything)
            raise sqlite3.OperationalError(IO_ERROR)
        original(rows)

    queue._commit_ack_rows = failing  # type: ignore[method-assign]
    await store.append(skey(0), [entry(0, i) for i in range(10, 15)])
    await guarded(store.flush(), "flush")
    assert failed == 1
    status = await guarded(store.status(), "status")
    assert status["backends"][0]["losses"], "the backend's loss was never detected"
    await assert_nothing_pending(store)
    await assert_exactly_once(backend, 1, 15)


# -- 4. cancellation -------------------------------------------------------------------------


async def test_a_cancelled_ack_is_still_committed_and_the_writer_goes_on(tmp_path: Path) -> None:
    queue = await open_queue(tmp_path / "q.db")
    try:
        await queue.append(skey(0), rows_of(0, 0, 6))
        kid = await key_id_of(queue)
        gate = block_writer(queue)
        task = asyncio.create_task(queue.ack("b", kid, 3, 2, None))
        await let_tasks_run()
        task.cancel()
        await let_tasks_run()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await guarded(task, "cancelled ack")
        # The writer still serves acks and appends, and the cancelled ack landed.
        assert await guarded(queue.append(skey(1), rows_of(1, 0, 2)), "append") == 2
        cursor = await queue.cursor("b", kid)
        assert cursor is not None and cursor.acked == 3, cursor
        await guarded(queue.ack("b", kid, 6, 5, None), "ack")
        cursor = await queue.cursor("b", kid)
        assert cursor is not None and cursor.acked == 6, cursor
        assert not queue._acks
    finally:
        await guarded(queue.close(), "close")


async def test_cancelling_many_acks_mid_flight_then_acking_again(tmp_path: Path) -> None:
    """Half of forty acks (on forty keys) are cancelled while the writer is held; the
    cursors all advance, and a stale ack committed after a newer one never moves a
    cursor back."""
    queue = await open_queue(tmp_path / "q.db")
    try:
        for n in range(40):
            await queue.append(skey(n), rows_of(n, 0, 4))
        ids = [k.key_id for k in await queue.pending_keys("b", 100)]
        assert len(ids) == 40
        gate = block_writer(queue)
        tasks = [asyncio.create_task(queue.ack("b", kid, 2, 1, None)) for kid in ids]
        # Newer acks queued behind the older ones, and an append between them.
        newer = [asyncio.create_task(queue.ack("b", kid, 4, 3, None)) for kid in ids[::2]]
        appending = asyncio.create_task(queue.append(skey(99), rows_of(99, 0, 1)))
        await let_tasks_run()
        for task in tasks[1::2]:
            task.cancel()
        gate.set()
        results = await guarded(
            asyncio.gather(*tasks, *newer, appending, return_exceptions=True), "acks"
        )
        for task, result in zip(tasks, results, strict=False):
            if not task.cancelled():
                assert result is None, result
        assert results[-1] == 1
        for i, kid in enumerate(ids):
            cursor = await queue.cursor("b", kid)
            want = 4 if i % 2 == 0 else 2
            assert cursor is not None and cursor.acked == want, (i, cursor)
    finally:
        await guarded(queue.close(), "close")


# -- 5. close while deliveries and acks are in flight ---------------------------------------


class SlowStore(MemoryStore):
    """Each batch takes a little while: deliveries are in flight when close() comes."""

    async def append_batch(self, key: SessionKey, batch: Any) -> Any:
        await asyncio.sleep(0.003)
        return await super().append_batch(key, batch)


async def test_close_during_deliveries_and_slow_acks_loses_nothing_after_reopen(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    storage = MemoryStorage()
    store = make_durable(SlowStore(storage), max_batch_entries=3, batch_linger=0.0)
    await store.start()
    queue = store.queue
    original = queue._commit_ack_rows

    def slow(rows: list[Any]) -> None:
        threading.Event().wait(0.002)  # acks take a while: some are in line at close()
        original(rows)

    queue._commit_ack_rows = slow  # type: ignore[method-assign]
    sessions, per_session = 20, 30
    await append_all(store, sessions, per_session, chunk=2)
    # Deliveries (slow) and acks (slow) are in flight: close() cuts the drain short.
    await guarded(store.close(timeout=0.01), "close")
    again = make_durable(MemoryStore(storage), wal_path=queue.path)
    await guarded(again.flush(), "flush after reopen")
    await assert_nothing_pending(again)
    await assert_exactly_once(MemoryStore(storage), sessions, per_session)


async def test_close_while_the_writer_is_held_with_acks_and_appends_in_line(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """close() comes while acks and appends wait behind a held writer: nothing hangs,
    and after reopening every entry whose append returned is delivered exactly once,
    in order (and nothing that was never appended)."""
    storage = MemoryStorage()
    store = make_durable(MemoryStore(storage), max_batch_entries=2, batch_linger=0.0)
    await store.start()
    queue = store.queue
    sessions = 10
    acked = dict.fromkeys(range(sessions), 0)

    async def appender(n: int) -> None:
        while acked[n] < 10_000:
            i = acked[n]
            try:
                await store.append(skey(n), [entry(n, i), entry(n, i + 1), entry(n, i + 2)])
            except QueueClosedError:
                return
            acked[n] = i + 3
            await asyncio.sleep(0)

    appending = asyncio.gather(*(appender(n) for n in range(sessions)))
    while min(acked.values()) < 6:
        await guarded(asyncio.sleep(0.002), "first appends")
    gate = block_writer(queue)
    closing = asyncio.create_task(store.close(timeout=0.05))
    await asyncio.sleep(0.05)
    gate.set()
    await guarded(closing, "close")
    await guarded(appending, "appends")
    again = make_durable(MemoryStore(storage), wal_path=queue.path)
    await guarded(again.flush(), "flush after reopen")
    await assert_nothing_pending(again)
    for n in range(sessions):
        stored = list(await MemoryStore(storage).load(skey(n)) or [])
        # Acknowledged entries all there; at most the batch cut by close() beyond them.
        assert len(stored) in (acked[n], acked[n] + 3), (n, acked[n], len(stored))
        assert stored == [entry(n, i) for i in range(len(stored))], n


async def test_an_ack_racing_close_ends_with_queue_closed_error(tmp_path: Path) -> None:
    queue = await open_queue(tmp_path / "q.db")
    await queue.append(skey(0), rows_of(0, 0, 3))
    kid = await key_id_of(queue)
    closing = asyncio.create_task(queue.close())
    await asyncio.sleep(0)  # close() is past its first await: the writer is closing
    results = await guarded(
        asyncio.gather(closing, queue.ack("b", kid, 3, 2, None), return_exceptions=True),
        "close and ack",
    )
    assert results[0] is None
    assert results[1] is None or isinstance(results[1], QueueClosedError), (
        f"an ack racing close() raised {results[1]!r}, not QueueClosedError"
    )
    with pytest.raises(QueueClosedError):
        await guarded(queue.ack("b", kid, 3, 2, None), "ack after close")


# -- 6. SIGKILL in the middle of deliveries ------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "redis"])
async def test_sigkill_during_deliveries_with_shared_acks(tmp_path: Path, kind: str) -> None:
    run = await guarded(check_crash_run(tmp_path, trials=12, kind=kind), "crash run")
    assert run.trials == 12
