"""The write-ahead queue: a SQLite file where every entry is durable before ``append`` returns.

Layout (schema version 5)::

    meta       name -> value: schema_version, producer_id, seq_floor
    keys       key_id, project_key, session_id, subpath ('' = main),
               first_seq, next_seq, updated_at; a key_id is never reused (whatever
               still holds the id of a key deleted or forgotten finds nothing)
    batches    id, key_id, first_seq, count, appended_at, nbytes, body, crc, hints
               UNIQUE(key_id, first_seq); one row per append: seqs first_seq ..
               first_seq + count - 1, body their encoded JSON joined by b"\n",
               hints their summary hints (a main key's; NULL for a subkey's), crc
               the crc32 of body and then hints (NULL in batches of schema 4)
    ledger     id, key_id, uuids     the idempotency ledger: the uuids of one append
               (a JSON array); lives as long as its key (``walmirror.ledger``)
    cursors    (backend, key_id) -> acked, confirmed, solo_length, legacy_base
    parked     (backend, key_id) -> error, parked_at
    tombstones id, backend, project_key, session_id, subpath ('' = whole session),
               parked_error, parked_at (a delete the backend refused for good)
    losses     id, backend, key, first_seq, last_seq, restored, detected_at

The queue file is one *producer* of the delivery protocol (``walmirror.protocol``):
``producer_id`` is drawn at creation. A key's entries are numbered by ``seq``
from its ``first_seq``, consecutively. A key's row is dropped by ``delete``, and
by ``compact`` once the key is idle (no append for the retention period) and
every backend acknowledged all of it (its bookkeeping is forgotten, so a host
that served a million sessions is as fast as a new one); ``seq_floor`` then
rises past its last seq and a key created later starts there, so this producer
never reuses a seq for a key. A backend's cursor says
which seqs it acknowledged: every seq below ``acked``; ``confirmed`` is the
last of them as the backend reported it (the next batch's ``expect``), and
``solo_length`` the transcript's length when it held nothing but this
producer's entries of this key (``load`` may then answer from the queue while
the backend is down). ``legacy_base`` is the offset base of a cursor migrated
from schema 1. ``losses`` records what a backend lost that the queue could not
restore (and what it restored). A batch whose entries every configured backend
acknowledged is deleted by ``compact`` after the retention period (a batch
acknowledged in part stays whole; reads start inside it); the ledger stays as
long as the key's row, so an entry replayed while the session is active (the
SDK's retries) is still recognised.

Compact JSON (``encode_entry``) never holds a raw newline byte, so a batch's
body splits back into its entries at b"\n"; a body that does not split into
``count`` entries, or whose checksum does not match, is damage, reported as
``CorruptQueueError``. The checksum is what lets a backend store a batch's bytes
and parse only the entries its hints name (``walmirror.backends.fold_batch``):
damage no longer needs a parse to show.

Concurrency: the queue owns two SQLite connections (``walmirror.connection``),
each on its own thread: the writer (every transaction) and the reader (WAL
lets it read a consistent snapshot while the writer commits). Appends from
many sessions are gathered while a commit is in flight and written by the
next one (group commit), so one fsync covers many callers. The file itself,
its lock (one process per queue file) and its schema migrations are
``walmirror.schema``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import sys
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from claude_agent_sdk.types import SessionKey

from .connection import WAL_PAGES, Connection, Synchronous, settle
from .errors import CorruptQueueError, QueueClosedError, QueueFullError, QueuePathError
from .ledger import Row, UuidLedger
from .schema import SCHEMA_VERSION, QueueFile

logger = logging.getLogger("walmirror.queue")

T = TypeVar("T")


@dataclass(frozen=True)
class KeyRow:
    """A key as the queue knows it."""

    key_id: int
    project_key: str
    session_id: str
    subpath: str  # '' for the main transcript

    def session_key(self) -> SessionKey:
        key: SessionKey = {"project_key": self.project_key, "session_id": self.session_id}
        if self.subpath:
            key["subpath"] = self.subpath
        return key


@dataclass(frozen=True)
class Cursor:
    """What one backend has acknowledged of one key (see the module docstring)."""

    first_seq: int  # the key's first seq in this queue
    acked: int  # every seq below this one is acknowledged
    confirmed: int | None  # the expect of the next batch
    solo_length: int | None
    legacy_base: int | None


@dataclass(frozen=True)
class Loss:
    """Entries a backend lost: seqs ``first_seq..last_seq`` of ``key`` by this producer;
    ``restored`` of them were re-sent from the queue, the rest were gone from it too."""

    key: SessionKey
    first_seq: int
    last_seq: int
    restored: int
    detected_at: float

    @property
    def lost(self) -> int:
        return self.last_seq - self.first_seq + 1 - self.restored


@dataclass(frozen=True)
class LocalView:
    """Everything ``load`` needs to merge local entries with a backend's."""

    key_id: int
    next_seq: int
    lowest_held_seq: int | None  # None: no entries held locally
    cursor: Cursor
    updated_at: float

    @property
    def complete(self) -> bool:
        """The queue holds every entry the key's transcript has: the backend held
        nothing but this queue's entries, and none of them were compacted yet."""
        cursor = self.cursor
        return (
            self.lowest_held_seq == cursor.first_seq
            and cursor.solo_length is not None
            and cursor.solo_length == cursor.acked - cursor.first_seq
        )


@dataclass(frozen=True)
class LocalSession:
    session_id: str
    updated_at: float
    key_id: int
    acked: int


@dataclass(frozen=True)
class Tombstone:
    id: int
    key: SessionKey  # a main key means the whole session
    parked: str | None = None  # the error, when the backend refused it for good


@dataclass(frozen=True)
class NextBatch:
    """A key's next delivery as the queue sees it (``WriteAheadQueue.next_batch``)."""

    cursor: Cursor
    fenced: bool  # a delete of the key waits for this backend: it goes first
    first: int  # the seq of bodies[0]; above cursor.acked only if those were compacted
    bodies: list[bytes]
    hints: list[int] | None = None  # the bodies' summary hints (None unless each has one)


@dataclass
class BackendStats:
    pending_entries: int = 0
    pending_bytes: int = 0
    pending_keys: int = 0
    lag_seconds: float = 0.0
    parked: list[dict[str, Any]] = field(default_factory=list)
    pending_deletes: int = 0
    parked_deletes: list[dict[str, Any]] = field(default_factory=list)
    losses: list[Loss] = field(default_factory=list)


# The batch holding a cursor's first unacknowledged seq (c.acked), as a subquery: one
# index seek. Only meaningful where c.acked < k.next_seq.
_BATCH_AT_ACKED = """(SELECT b.appended_at FROM batches b
    WHERE b.key_id = c.key_id AND b.first_seq <= c.acked
    ORDER BY b.first_seq DESC LIMIT 1)"""

# Batches of key ?1 holding seqs from ?2 on, oldest first (one index seek to the
# batch holding ?2, or the first after it).
_BATCHES_FROM = """SELECT first_seq, count, body, crc, hints FROM batches WHERE key_id = ?1
    AND first_seq >= COALESCE(
        (SELECT MAX(first_seq) FROM batches WHERE key_id = ?1 AND first_seq <= ?2), ?2)
    ORDER BY first_seq"""


def batch_crc(body: bytes, hints: bytes | None) -> int:
    """A batch row's checksum: crc32 of its body, then of its hints."""
    crc = zlib.crc32(body)
    return crc if hints is None else zlib.crc32(hints, crc)


def pack_hints(hints: Iterable[int]) -> bytes:
    packed = array("H", hints)
    if sys.byteorder == "big":
        packed.byteswap()  # stored little-endian: a queue file may move between machines
    return packed.tobytes()


def unpack_hints(blob: bytes) -> array[int]:
    hints = array("H", blob)
    if sys.byteorder == "big":
        hints.byteswap()
    return hints


def _entries_from(
    conn: sqlite3.Connection, key_id: int, from_seq: int
) -> Iterator[tuple[int, bytes, int | None]]:
    """(seq, encoded entry, summary hint or None) of ``key_id`` from ``from_seq`` on, in
    order, read lazily (stop iterating to stop reading); a damaged batch is
    ``CorruptQueueError``."""
    for first, count, body, crc, blob in conn.execute(_BATCHES_FROM, (key_id, from_seq)):
        pieces = body.split(b"\n") if isinstance(body, bytes) else []
        if len(pieces) != count:
            raise CorruptQueueError(
                f"the queued batch at seq {first} of this key holds {len(pieces)} entries "
                f"where {count} were stored (the queue file is damaged)"
            )
        hints: array[int] | None = None
        if crc is not None:
            if not isinstance(blob, bytes | None) or batch_crc(body, blob) != crc:
                raise CorruptQueueError(
                    f"the queued batch at seq {first} of this key does not match its "
                    "checksum (the queue file is damaged)"
                )
            if blob is not None:
                if len(blob) != 2 * count:
                    raise CorruptQueueError(
                        f"the queued batch at seq {first} of this key holds {len(blob)} "
                        f"bytes of hints for {count} entries (the queue file is damaged)"
                    )
                hints = unpack_hints(blob)
        for i in range(max(0, from_seq - first), count):
            yield first + i, pieces[i], None if hints is None else hints[i]


# A cursor with its key's first seq: ``Cursor(*row[:5])``.
_CURSOR_COLUMNS = "k.first_seq, c.acked, c.confirmed, c.solo_length, c.legacy_base"
_CURSOR_SELECT = f"SELECT {_CURSOR_COLUMNS} FROM cursors c JOIN keys k ON k.key_id = c.key_id"


def _losses(conn: sqlite3.Connection, backend: str) -> list[Loss]:
    return [
        Loss(KeyRow(0, *r[:3]).session_key(), *r[3:])
        for r in conn.execute(
            "SELECT project_key, session_id, subpath, first_seq, last_seq, restored,"
            " detected_at FROM losses WHERE backend = ? ORDER BY id",
            (backend,),
        )
    ]


def rollback(conn: sqlite3.Connection) -> None:
    """Undo the open transaction, if SQLite has not already: after some errors (a full
    disk, I/O errors) it rolls back by itself, and a second ROLLBACK would raise
    "cannot rollback - no transaction is active" over the real error."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


RESERVE_BYTES = 2 * WAL_PAGES * 4096
"""Disk space the queue sets aside beside its file (``<queue>.reserve``) for the
writes that move entries out or free space (acks, compaction, deletes). SQLite
needs room for those too (WAL frames); when the disk fills up, the reserve is
given back so that draining (and so freeing) keeps working. It is set aside again
when a compaction has freed entries and the disk has the room."""


COMPACT_CHUNK = 100
"""Batches one compaction transaction deletes at most."""


class DiskReserve:
    """The reserve file (see ``RESERVE_BYTES``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fill(self) -> bool:
        """Set the space aside, unless it already is; False when the disk has no room."""
        if self.path.exists():
            return True
        partial = self.path.with_name(self.path.name + ".new")
        try:
            fd = os.open(partial, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            os.replace(partial, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            return False
        return True

    def release(self) -> bool:
        """Give the space back to the disk; False when there was none set aside."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        logger.warning("the disk holding %s is full: its reserve is released", self.path)
        return True


def _disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL: the disk (or a size limit) has no room for the write."""
    return isinstance(exc, sqlite3.OperationalError) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc).lower()
    )


BATCH_ROW_BYTES = 4 << 20
"""An append bigger than this is stored as several batch rows of about this size:
a row is read whole, and SQLite refuses values past its length limit (1 GB)."""


def _row_chunks(rows: list[Row]) -> Iterator[list[Row]]:
    """``rows`` in consecutive chunks of at most ``BATCH_ROW_BYTES`` (at least one row
    each)."""
    chunk: list[Row] = []
    size = 0
    for row in rows:
        if chunk and size + len(row[1]) > BATCH_ROW_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += len(row[1]) + 1
    if chunk:
        yield chunk


_ROWS_PER_STATEMENT = 100


def _parts(rows: list[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        yield rows[start : start + _ROWS_PER_STATEMENT]


def _insert(conn: sqlite3.Connection, into: str, rows: list[tuple[Any, ...]]) -> None:
    """``INSERT INTO {into}`` of ``rows`` with one multi-row statement per 100 rows."""
    for part in _parts(rows):
        one = "(" + ", ".join("?" * len(part[0])) + ")"
        conn.execute(
            f"INSERT INTO {into} VALUES {', '.join([one] * len(part))}",
            [value for row in part for value in row],
        )


# An ack: (acked, confirmed, solo_length, backend, key_id, acked). An ack never moves a
# cursor back (only a rewind does), so acks pending together may share any transaction.
_ACK_UPDATE = (
    "UPDATE cursors SET acked = ?, confirmed = ?, solo_length = ?,"
    " legacy_base = NULL WHERE backend = ? AND key_id = ? AND acked <= ?"
)


def _settle_all(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        settle(future, None, error)


def split_key(key: SessionKey) -> tuple[str, str, str]:
    return key["project_key"], key["session_id"], key.get("subpath") or ""


@dataclass
class _AppendRequest:
    key: tuple[str, str, str]
    rows: list[Row]
    nbytes: int
    future: asyncio.Future[int]


class WriteAheadQueue:
    """The local SQLite queue. All methods are coroutines; SQLite work runs off the event loop."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "FULL",
        max_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self.max_bytes = max_bytes
        # Checkpoints (each copies ~4 MiB and syncs: on the commit path they were a
        # large part of append's p99) run on the checkpointer's thread once the writer
        # has written about WAL_PAGES pages. The writer's own commits checkpoint only
        # past twice that: when writes never pause, a checkpoint alongside them
        # cannot finish (nor the WAL restart), and the WAL must not grow for ever.
        self._writer = Connection(
            self.path, synchronous, "walmirror-writer", autocheckpoint=2 * WAL_PAGES
        )
        self._reader = Connection(self.path, synchronous, "walmirror-reader")
        self._checkpointer = Connection(self.path, synchronous, "walmirror-checkpointer")
        self._wal_bytes = 0  # loop-owned: written since the last checkpoint was asked for
        self._checkpointing = False  # loop-owned: a checkpoint is under way
        self._file = QueueFile(self.path)
        self._reserve = DiskReserve(self.path.with_name(self.path.name + ".reserve"))
        self._disk_pressure = False  # writer-thread owned: the disk filled up, not yet freed
        self._backends: tuple[str, ...] = ()
        self._pending: deque[_AppendRequest] = deque()  # appended on the loop, taken by the writer
        # Cursor updates, the same way, each with the future its ``ack`` awaits.
        self._acks: deque[tuple[tuple[Any, ...], asyncio.Future[None]]] = deque()
        # Writer-thread state: (project, session, subpath) -> [key_id, next_seq].
        self._key_cache: dict[tuple[str, str, str], list[int]] = {}
        self._ledger = UuidLedger(self._ledger_uuids)  # writer-thread owned
        self._seq_floor = 0  # writer-thread owned: where a key new to the queue starts
        self.producer_id = ""  # this queue's id in the delivery protocol (set by open)
        self.stored_bytes = 0  # sum of nbytes of entries held; writer-thread owned
        self._queued_bytes = 0  # bytes of requests waiting for the next group commit
        self._closed = False
        self.on_commit: Callable[[], None] | None = None

    # -- lifecycle ---------------------------------------------------------

    async def open(self, backends: Iterable[str]) -> None:
        self._backends = tuple(backends)
        self._file.lock()
        try:
            self._file.check_header()
            await self._writer.open()
            await self._writer.run(lambda: self._file.migrate(self._writer.conn, self._backends))
            await self._reader.open()
            await self._checkpointer.open()
            self.stored_bytes = await self._writer.run(self._sum_bytes)
            self.producer_id, self._seq_floor = await self._writer.run(self._producer_state)
            await self._writer.run(self._reserve.fill)
        except sqlite3.DatabaseError as exc:
            await self._close_connections()
            self._file.unlock()
            raise CorruptQueueError(
                f"queue file {self.path} is not a readable walmirror queue ({exc}); "
                "it was left untouched"
            ) from exc
        except BaseException:
            await self._close_connections()
            self._file.unlock()
            raise

    async def open_read_only(self) -> None:
        """Open for inspection (``walmirror status``) while another process may hold the
        queue: no lock, nothing written, only the reader connection (read-only)."""
        if not self.path.is_file():
            raise QueuePathError(f"no queue file at {self.path}")
        self._reader = Connection(self.path, self.synchronous, "walmirror-reader", read_only=True)
        try:
            await self._reader.open()
            version = await self._reader.run(self._schema_version)
        except sqlite3.DatabaseError as exc:
            await self._reader.close()
            raise CorruptQueueError(
                f"queue file {self.path} is not a readable walmirror queue ({exc})"
            ) from exc
        if version != SCHEMA_VERSION:
            await self._reader.close()
            raise CorruptQueueError(
                f"queue file {self.path} has schema {version}, this walmirror reads "
                f"{SCHEMA_VERSION}: open it once with this version (or use the one that wrote it)"
            )
        self.stored_bytes = await self._reader.run(
            lambda: int(
                self._reader.conn.execute(
                    "SELECT COALESCE(SUM(nbytes), 0) FROM batches"
                ).fetchone()[0]
            )
        )

    def _schema_version(self) -> int:
        row = self._reader.conn.execute(
            "SELECT value FROM meta WHERE name = 'schema_version'"
        ).fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pending:  # let the commit in flight finish and report
            await self._writer.run(lambda: None)
        await self._close_connections()
        self._file.unlock()

    async def _close_connections(self) -> None:
        await self._writer.close()
        await self._reader.close()
        await self._checkpointer.close()

    def _wrote(self, nbytes: int) -> None:
        """Loop: the writer committed ``nbytes`` of entries (or a small write). Past
        ``WAL_PAGES`` pages of WAL since the last checkpoint (about half that in entry
        bytes: a commit's WAL frames hold its b-tree pages too), the checkpointer
        thread runs one (PASSIVE: it never blocks the writer)."""
        self._wal_bytes += nbytes
        if self._checkpointing or self._closed or self._wal_bytes < WAL_PAGES * 4096 // 2:
            return
        self._wal_bytes = 0
        self._checkpointing = True
        loop = asyncio.get_running_loop()

        def checkpoint() -> None:
            try:
                self._checkpointer.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:  # the next one catches up
                logger.debug("queue %s: checkpoint failed: %s", self.path, exc)
            finally:
                loop.call_soon_threadsafe(self._checkpoint_done)

        self._checkpointer.submit(checkpoint)

    def _checkpoint_done(self) -> None:
        self._checkpointing = False

    def _producer_state(self) -> tuple[str, int]:
        meta = dict(self._writer.conn.execute("SELECT name, value FROM meta"))
        return str(meta["producer_id"]), int(meta["seq_floor"])

    def _sum_bytes(self) -> int:
        row = self._writer.conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM batches").fetchone()
        return int(row[0])

    async def _drain_write(self, fn: Callable[[], T]) -> T:
        """A write on the draining side (an ack, a compaction, a delete...). On a full
        disk, room is made (``_make_disk_room``) and the write tried again: what frees
        the disk must not need free disk. Until the disk has room again, each such
        write is followed by a truncating checkpoint, so the WAL never grows."""

        def write() -> T:
            result = fn()
            if self._disk_pressure:
                self._checkpoint_truncate()
            return result

        for _ in range(2):
            try:
                result = await self._writer.run(write)
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    raise
                await self._writer.run(self._make_disk_room)
            else:
                self._wrote(4096)  # an ack or a delete: a page or so of WAL
                return result
        result = await self._writer.run(write)
        self._wrote(4096)
        return result

    def _make_disk_room(self) -> None:
        """Writer thread, the disk is full: give the reserve back, and move the WAL's
        frames into the database file and cut the WAL to nothing (the WAL only shrinks
        that way; it is where a full disk mostly went)."""
        self._disk_pressure = True
        self._reserve.release()
        self._checkpoint_truncate()

    def _checkpoint_truncate(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _refill_reserve(self) -> None:
        """Writer thread, after a compaction: set the reserve aside again if the disk has
        the room (then the pressure is over)."""
        if self._reserve.fill():
            self._disk_pressure = False

    # -- append (group commit) ---------------------------------------------

    async def append(self, key: SessionKey, rows: list[Row]) -> int:
        """Durably store ``rows`` (uuid, body) for ``key``; return how many were new.

        Entries whose uuid the key already holds are skipped (the ledger).
        Returns once the commit holding them is on disk.
        """
        if self._closed:
            raise QueueClosedError("the queue is closed")
        nbytes = sum(len(row[1]) for row in rows)
        if self.max_bytes is not None and (
            self.stored_bytes + self._queued_bytes + nbytes > self.max_bytes
        ):
            raise QueueFullError(
                f"queue {self.path} holds {self.stored_bytes} bytes; "
                f"{nbytes} more would pass the cap of {self.max_bytes}"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append(_AppendRequest(split_key(key), rows, nbytes, future))
        self._queued_bytes += nbytes
        # Group commit: the first job to run takes every request pending by then;
        # the jobs behind it find the deque empty and return at once.
        self._writer.submit(lambda: self._commit_pending(loop))
        return await future

    def would_overflow(self, nbytes: int) -> bool:
        return self.max_bytes is not None and (
            self.stored_bytes + self._queued_bytes + nbytes > self.max_bytes
        )

    def _commit_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        """Writer thread: commit every pending append in one transaction, then report
        back to the event loop in one call. Pending acks (see ``ack``) ride in the
        same transaction. When it fails, the acks are committed alone and the group
        again without them: neither part fails for the other's fault."""
        acks = self._take_acks()
        if not self._pending:
            self._settle_acks(loop, acks)
            return
        group: list[_AppendRequest] = []
        while self._pending:
            group.append(self._pending.popleft())
        if acks:
            try:
                results = self._commit_group(group, [row for row, _ in acks])
            except Exception:
                self._settle_acks(loop, acks)
            else:
                loop.call_soon_threadsafe(self._report, group, results, None)
                loop.call_soon_threadsafe(_settle_all, [done for _, done in acks], None)
                return
        self._commit_appends(loop, group)

    def _commit_appends(self, loop: asyncio.AbstractEventLoop, group: list[_AppendRequest]) -> None:
        """Writer thread: commit ``group`` in one transaction; if that fails, each request
        alone (unless it was the only one, or the disk is full)."""
        try:
            results = self._commit_group(group)
        except Exception as exc:
            if len(group) == 1 or _disk_full(exc):
                loop.call_soon_threadsafe(self._report, group, None, self._explain(exc))
                return
            # Something in one caller's input (or a bug): never fail the others for
            # it. Commit each alone, so only the one at fault gets the error.
            for request in group:
                try:
                    alone = self._commit_group([request])
                except Exception as exc:
                    loop.call_soon_threadsafe(self._report, [request], None, self._explain(exc))
                else:
                    loop.call_soon_threadsafe(self._report, [request], alone, None)
        else:
            loop.call_soon_threadsafe(self._report, group, results, None)

    def _explain(self, exc: Exception) -> Exception:
        if _disk_full(exc):
            return QueueFullError(
                f"the disk holding queue {self.path} is full; the batch was not stored"
            )
        return exc

    def _report(
        self,
        group: list[_AppendRequest],
        results: list[int] | None,
        error: BaseException | None,
    ) -> None:
        nbytes = sum(r.nbytes for r in group)
        self._queued_bytes -= nbytes
        for i, request in enumerate(group):
            settle(request.future, None if results is None else results[i], error)
        if results is not None:
            self._wrote(nbytes)
            if self.on_commit is not None:
                self.on_commit()

    def _commit_group(
        self, group: list[_AppendRequest], acks: list[tuple[Any, ...]] | None = None
    ) -> list[int]:
        conn = self._writer.conn
        now = time.time()
        accepted: list[int] = []
        touched: dict[tuple[str, str, str], list[int]] = {}
        batches: list[tuple[Any, ...]] = []
        ledger: list[tuple[Any, ...]] = []
        added_bytes = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for request in group:
                state = touched.get(request.key) or self._key_state(request.key, now)
                key_id, next_seq = state
                rows = self._ledger.claim(key_id, request.rows)
                seq = next_seq
                for chunk in _row_chunks(rows):
                    nbytes = sum(len(row[1]) for row in chunk)
                    body = b"\n".join([row[1] for row in chunk])
                    hints = None if request.key[2] else pack_hints(row[2] for row in chunk)
                    crc = batch_crc(body, hints)
                    batches.append((key_id, seq, len(chunk), now, nbytes, body, crc, hints))
                    seq += len(chunk)
                    added_bytes += nbytes
                uuids = [row[0] for row in rows if row[0] is not None]
                if uuids:
                    ledger.append((key_id, json.dumps(uuids)))
                touched[request.key] = [key_id, seq]
                accepted.append(len(rows))
            # Few statements for the whole group: each is one round trip for the GIL,
            # which an event loop busy with callers can hold for a switch interval.
            _insert(
                conn,
                "batches (key_id, first_seq, count, appended_at, nbytes, body, crc, hints)",
                batches,
            )
            _insert(conn, "ledger (key_id, uuids)", ledger)
            for part in _parts([(k, n) for k, n in touched.values()]):
                conn.execute(
                    "UPDATE keys SET next_seq = v.column2, updated_at = ?"
                    f" FROM (VALUES {', '.join(['(?, ?)'] * len(part))}) AS v"
                    " WHERE keys.key_id = v.column1",
                    (now, *(value for row in part for value in row)),
                )
            if acks:
                conn.executemany(_ACK_UPDATE, acks)
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            # The caches may hold keys and uuids of the rolled-back transaction.
            self._key_cache.clear()
            self._ledger.clear()
            raise
        self._ledger.saved()
        self._key_cache.update(touched)
        self.stored_bytes += added_bytes
        return accepted

    def _key_state(self, key: tuple[str, str, str], now: float) -> list[int]:
        cached = self._key_cache.get(key)
        if cached is not None:
            return cached
        conn = self._writer.conn
        row = conn.execute(
            "SELECT key_id, next_seq FROM keys"
            " WHERE project_key = ? AND session_id = ? AND subpath = ?",
            key,
        ).fetchone()
        if row is not None:
            return [row[0], row[1]]
        floor = self._seq_floor
        cur = conn.execute(
            "INSERT INTO keys (project_key, session_id, subpath, first_seq, next_seq, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (*key, floor, floor, now),
        )
        key_id = int(cur.lastrowid or 0)
        conn.executemany(
            "INSERT INTO cursors (backend, key_id, acked) VALUES (?, ?, ?)",
            [(backend, key_id, floor) for backend in self._backends],
        )
        return [key_id, floor]

    def _ledger_uuids(self, key_id: int) -> list[str]:
        """Writer thread: every uuid the key's ledger holds (``UuidLedger`` reads these)."""
        uuids: list[str] = []
        for (text,) in self._writer.conn.execute(
            "SELECT uuids FROM ledger WHERE key_id = ?", (key_id,)
        ):
            uuids.extend(json.loads(text))
        return uuids

    # -- the flusher's view ------------------------------------------------

    async def pending_keys(
        self,
        backend: str,
        limit: int,
        exclude: Collection[int] = (),
        appended_before: float | None = None,
    ) -> list[KeyRow]:
        """Keys ``backend`` has not fully acknowledged, oldest first, parked ones and
        those in ``exclude`` (key ids) left out; with ``appended_before`` (a
        ``time.time()``), only keys whose oldest pending entry was appended by then."""

        def query() -> list[KeyRow]:
            rows = self._reader.conn.execute(
                f"""SELECT k.key_id, k.project_key, k.session_id, k.subpath
                   FROM cursors c JOIN keys k ON k.key_id = c.key_id
                   WHERE c.backend = ? AND c.acked < k.next_seq
                     AND NOT EXISTS (SELECT 1 FROM parked p
                                     WHERE p.backend = c.backend AND p.key_id = c.key_id)
                     AND c.key_id NOT IN (SELECT value FROM json_each(?))
                     AND (? IS NULL OR {_BATCH_AT_ACKED} <= ?)
                   ORDER BY {_BATCH_AT_ACKED}
                   LIMIT ?""",
                (backend, json.dumps(list(exclude)), appended_before, appended_before, limit),
            ).fetchall()
            return [KeyRow(*r) for r in rows]

        return await self._reader.run(query)

    async def oldest_pending_age(self, backend: str) -> float | None:
        """Seconds since the oldest entry ``backend`` has not acknowledged was appended."""

        def query() -> float | None:
            row = self._reader.conn.execute(
                f"""SELECT MIN({_BATCH_AT_ACKED}) FROM cursors c
                   JOIN keys k ON k.key_id = c.key_id
                   WHERE c.backend = ? AND c.acked < k.next_seq""",
                (backend,),
            ).fetchone()
            return None if row[0] is None else max(0.0, time.time() - row[0])

        return await self._reader.run(query)

    async def depth(self, backend: str) -> tuple[int, float, int]:
        """Cheap figures for the gauges: (pending entries, lag seconds, parked keys)."""

        def query() -> tuple[int, float, int]:
            conn = self._reader.conn
            pending = conn.execute(
                """SELECT COALESCE(SUM(k.next_seq - c.acked), 0) FROM cursors c
                   JOIN keys k ON k.key_id = c.key_id
                   WHERE c.backend = ? AND c.acked < k.next_seq""",
                (backend,),
            ).fetchone()[0]
            oldest = conn.execute(
                f"""SELECT MIN({_BATCH_AT_ACKED}) FROM cursors c
                   JOIN keys k ON k.key_id = c.key_id
                   WHERE c.backend = ? AND c.acked < k.next_seq""",
                (backend,),
            ).fetchone()[0]
            parked = conn.execute(
                "SELECT COUNT(*) FROM parked WHERE backend = ?", (backend,)
            ).fetchone()[0]
            lag = 0.0 if oldest is None else max(0.0, time.time() - oldest)
            return int(pending), lag, int(parked)

        return await self._reader.run(query)

    async def cursor(self, backend: str, key_id: int) -> Cursor | None:
        def query() -> Cursor | None:
            row = self._reader.conn.execute(
                _CURSOR_SELECT + " WHERE c.backend = ? AND c.key_id = ?", (backend, key_id)
            ).fetchone()
            return None if row is None else Cursor(*row)

        return await self._reader.run(query)

    async def read_batch(
        self, key_id: int, from_seq: int, max_entries: int, max_bytes: int
    ) -> tuple[int, list[bytes]]:
        """Entries of ``key_id`` from ``from_seq`` on, bounded by count and bytes (at
        least one), with the seq of the first. It is above ``from_seq`` only when
        entries were compacted before this reader got them."""
        first, bodies, _ = await self._reader.run(
            lambda: self._read_batch(key_id, from_seq, max_entries, max_bytes)
        )
        return first, bodies

    def _read_batch(
        self, key_id: int, from_seq: int, max_entries: int, max_bytes: int
    ) -> tuple[int, list[bytes], list[int] | None]:
        """``read_batch``, with the entries' summary hints (None unless all have one)."""
        first = from_seq
        bodies: list[bytes] = []
        hints: list[int] | None = []
        total = 0
        for seq, body, hint in _entries_from(self._reader.conn, key_id, from_seq):
            if not bodies:
                first = seq
            elif total + len(body) > max_bytes:
                break
            bodies.append(body)
            if hints is not None:
                if hint is None:
                    hints = None
                else:
                    hints.append(hint)
            total += len(body)
            if len(bodies) >= max_entries:
                break
        return first, bodies, hints

    async def next_batch(
        self, backend: str, key: KeyRow, max_entries: int, max_bytes: int
    ) -> NextBatch | None:
        """What the flusher needs to deliver ``key`` next, in one read (one snapshot,
        one hop to the reader thread): the cursor, whether a delete of the key waits
        for ``backend`` (then no entries are read), and the batch from the cursor on
        (``read_batch``). None when the key is gone (deleted)."""

        def query() -> NextBatch | None:
            conn = self._reader.conn
            conn.execute("BEGIN")
            try:
                row = conn.execute(
                    _CURSOR_SELECT + " WHERE c.backend = ? AND c.key_id = ?",
                    (backend, key.key_id),
                ).fetchone()
                if row is None:
                    return None
                cursor = Cursor(*row)
                fenced = self._tombstoned(backend, key.project_key, key.session_id, key.subpath)
                if fenced:
                    return NextBatch(cursor, True, cursor.acked, [])
                first, bodies, hints = self._read_batch(
                    key.key_id, cursor.acked, max_entries, max_bytes
                )
                return NextBatch(cursor, False, first, bodies, hints)
            finally:
                conn.execute("COMMIT")

        return await self._reader.run(query)

    async def ack(
        self,
        backend: str,
        key_id: int,
        acked: int,
        confirmed: int | None,
        solo_length: int | None,
    ) -> None:
        """Advance a cursor after a delivery. Committed without its own fsync: an ack
        lost to a power cut only means a redelivery, which the backend skips (its
        mark) or the flusher skips (uuid tail check); the next append's commit syncs
        it anyway. Acks made while the writer is busy share one transaction (as
        appends share a group commit): many keys delivering at once cost the writer
        one job, not one each.

        An ack does not wait for its place in the writer's line: the next job the
        writer runs commits every pending ack and settles them (an append's group
        commit takes them into its own transaction). The delivery that waits on it
        holds its key and a flusher slot, so an ack behind a line of group commits
        (each an fsync) would hold back every key's next delivery. A failed ack is
        not kept for later (``_settle_acks``)."""
        if self._closed:
            raise QueueClosedError("the queue is closed")
        row = (acked, confirmed, solo_length, backend, key_id, acked)
        loop = asyncio.get_running_loop()
        for attempt in range(3):
            done: asyncio.Future[None] = loop.create_future()
            self._acks.append((row, done))
            self._writer.submit(lambda: self._commit_acks(loop))
            try:
                await done
            except sqlite3.OperationalError as exc:
                # A full disk: room is made (``_drain_write``) and the ack tried again.
                if not _disk_full(exc) or attempt == 2:
                    raise
                await self._writer.run(self._make_disk_room)
            else:
                self._wrote(4096)
                return

    def _commit_acks(self, loop: asyncio.AbstractEventLoop) -> None:
        """Writer thread: commit every pending ack in one transaction, then settle each
        ack's future."""
        self._settle_acks(loop, self._take_acks())

    def _take_acks(self) -> list[tuple[tuple[Any, ...], asyncio.Future[None]]]:
        taken = []
        while self._acks:
            taken.append(self._acks.popleft())
        return taken

    def _settle_acks(
        self,
        loop: asyncio.AbstractEventLoop,
        taken: list[tuple[tuple[Any, ...], asyncio.Future[None]]],
    ) -> None:
        """Commit ``taken`` acks in a transaction of their own, then settle them (with
        the error, when it failed: each ``ack`` raises it, or tries again)."""
        if not taken:
            return
        error: BaseException | None = None
        try:
            self._commit_ack_rows([row for row, _ in taken])
        except BaseException as exc:  # each ack's caller gets it; the writer goes on
            # Not kept for a later transaction: an ack must never outlive the delivery
            # that made it. A rewind of the key (the backend lost data) may move its
            # cursor back meanwhile, and a stale ack committed after it would skip what
            # must be re-sent. An ack that failed is a delivery to make again, which
            # the backend's mark (or the uuid tail check) turns into a no-op.
            error = exc
        loop.call_soon_threadsafe(_settle_all, [done for _, done in taken], error)

    def _commit_ack_rows(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self._writer.conn
        try:
            if self.synchronous == "FULL":
                conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_ACK_UPDATE, rows)
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
        finally:
            if self.synchronous == "FULL":
                conn.execute("PRAGMA synchronous = FULL")
        if self._disk_pressure:
            self._checkpoint_truncate()  # as every drain-side write does (_drain_write)

    async def rewind(self, backend: str, key_id: int, mark: int | None) -> Loss | None:
        """``backend`` lost entries it acknowledged and now holds this producer's
        entries of the key only up to ``mark``. Move the cursor back so what the queue
        still holds is sent again, and record the loss (what was restored, what was
        not). Returns the record, or ``None`` when the key is gone (deleted)."""

        def run() -> Loss | None:
            conn = self._writer.conn
            row = conn.execute(
                "SELECT k.project_key, k.session_id, k.subpath, k.first_seq, c.acked,"
                " (SELECT MIN(first_seq) FROM batches b WHERE b.key_id = k.key_id), k.next_seq"
                " FROM keys k JOIN cursors c ON c.key_id = k.key_id"
                " WHERE c.backend = ? AND k.key_id = ?",
                (backend, key_id),
            ).fetchone()
            if row is None:
                return None
            project_key, session_id, subpath, first_seq, acked, lowest, next_seq = row
            # The seqs the backend should hold but does not: from past its mark (or
            # the key's first seq in this queue) up to what it acknowledged.
            wanted = first_seq if mark is None else max(first_seq, mark + 1)
            if wanted >= acked:
                return None
            held_from = next_seq if lowest is None else lowest
            resume = max(wanted, min(held_from, acked))
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "UPDATE cursors SET acked = ?, confirmed = ?, solo_length = NULL"
                    " WHERE backend = ? AND key_id = ?",
                    (resume, mark, backend, key_id),
                )
                conn.execute(
                    "INSERT INTO losses (backend, project_key, session_id, subpath, first_seq,"
                    " last_seq, restored, detected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        backend,
                        project_key,
                        session_id,
                        subpath,
                        wanted,
                        acked - 1,
                        acked - resume,
                        now,
                    ),
                )
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
            key = KeyRow(key_id, project_key, session_id, subpath).session_key()
            return Loss(key, wanted, acked - 1, acked - resume, now)

        return await self._drain_write(run)

    async def park(self, backend: str, key_id: int, error: str) -> None:
        await self._write(
            "INSERT OR REPLACE INTO parked (backend, key_id, error, parked_at) VALUES (?, ?, ?, ?)",
            (backend, key_id, error, time.time()),
        )

    async def requeue(self, backend: str | None = None, key: SessionKey | None = None) -> int:
        """Un-park keys and deletes (all, one backend's, or one key's); return how many
        were un-parked."""
        where, args = ["1"], []
        if backend is not None:
            where.append("backend = ?")
            args.append(backend)
        if key is not None:
            where.append(
                "key_id = (SELECT key_id FROM keys"
                " WHERE project_key = ? AND session_id = ? AND subpath = ?)"
            )
            args.extend(split_key(key))

        deletes, delete_args = ["parked_error IS NOT NULL"], []
        if backend is not None:
            deletes.append("backend = ?")
            delete_args.append(backend)
        if key is not None:
            # A delete of the key, or of its whole session.
            deletes.append("project_key = ? AND session_id = ? AND subpath IN (?, '')")
            delete_args.extend(split_key(key))

        def run() -> int:
            conn = self._writer.conn
            cur = conn.execute(f"DELETE FROM parked WHERE {' AND '.join(where)}", args)
            keys = int(cur.rowcount)
            cur = conn.execute(
                "UPDATE tombstones SET parked_error = NULL, parked_at = NULL"
                f" WHERE {' AND '.join(deletes)}",
                delete_args,
            )
            return keys + int(cur.rowcount)

        return await self._drain_write(run)

    async def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        def run() -> None:
            self._writer.conn.execute(sql, args)  # autocommit: one statement, one transaction

        await self._drain_write(run)

    # -- delete --------------------------------------------------------------

    async def delete(self, key: SessionKey) -> None:
        """Drop ``key``'s queued entries (a main key: the whole session) and leave a
        tombstone per backend, in one transaction. The flusher applies the tombstones
        before it delivers anything else, so nothing queued can resurrect the key."""
        project_key, session_id, subpath = split_key(key)

        def run() -> None:
            conn = self._writer.conn
            if subpath:
                selector = "project_key = ? AND session_id = ? AND subpath = ?"
                args: tuple[str, ...] = (project_key, session_id, subpath)
            else:
                selector = "project_key = ? AND session_id = ?"
                args = (project_key, session_id)
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = conn.execute(f"SELECT key_id, next_seq FROM keys WHERE {selector}", args)
                rows = found.fetchall()
                ids = [r[0] for r in rows]
                # This producer never reuses a seq for a key: a later row starts past these.
                floor = max([self._seq_floor, *(r[1] for r in rows)])
                conn.execute("UPDATE meta SET value = ? WHERE name = 'seq_floor'", (str(floor),))
                freed = 0
                for key_id in ids:
                    row = conn.execute(
                        "SELECT COALESCE(SUM(nbytes), 0) FROM batches WHERE key_id = ?", (key_id,)
                    ).fetchone()
                    freed += int(row[0])
                    for table in ("batches", "ledger", "cursors", "parked", "keys"):
                        conn.execute(f"DELETE FROM {table} WHERE key_id = ?", (key_id,))
                now = time.time()
                conn.executemany(
                    "INSERT INTO tombstones (backend, project_key, session_id, subpath, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(b, project_key, session_id, subpath, now) for b in self._backends],
                )
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                self._ledger.clear()
                raise
            finally:
                self._key_cache.clear()
            for key_id in ids:
                self._ledger.forget(key_id)
            self._seq_floor = floor
            self.stored_bytes -= freed

        await self._drain_write(run)

    async def tombstones(self, backend: str) -> list[Tombstone]:
        """Deletes waiting to reach ``backend``, oldest first, parked ones included."""

        def query() -> list[Tombstone]:
            rows = self._reader.conn.execute(
                "SELECT id, project_key, session_id, subpath, parked_error FROM tombstones"
                " WHERE backend = ? ORDER BY id",
                (backend,),
            ).fetchall()
            out = []
            for tid, project_key, session_id, subpath, parked in rows:
                key: SessionKey = {"project_key": project_key, "session_id": session_id}
                if subpath:
                    key["subpath"] = subpath
                out.append(Tombstone(tid, key, parked))
            return out

        return await self._reader.run(query)

    async def park_delete(self, tombstone_id: int, error: str) -> None:
        """The backend refused this delete for good: keep it (it still fences its key)
        but stop sending it until ``requeue``."""
        await self._write(
            "UPDATE tombstones SET parked_error = ?, parked_at = ? WHERE id = ?",
            (error, time.time(), tombstone_id),
        )

    async def drop_tombstone(self, tombstone_id: int) -> None:
        await self._write("DELETE FROM tombstones WHERE id = ?", (tombstone_id,))

    async def is_tombstoned(self, backend: str, key: SessionKey) -> bool:
        """True while a delete covering ``key`` waits to reach ``backend``."""
        return await self._reader.run(lambda: self._tombstoned(backend, *split_key(key)))

    def _tombstoned(self, backend: str, project_key: str, session_id: str, subpath: str) -> bool:
        row = self._reader.conn.execute(
            "SELECT 1 FROM tombstones WHERE backend = ? AND project_key = ?"
            " AND session_id = ? AND (subpath = '' OR subpath = ?) LIMIT 1",
            (backend, project_key, session_id, subpath),
        ).fetchone()
        return row is not None

    async def tombstoned_sessions(self, backend: str, project_key: str) -> set[str]:
        """Sessions of ``project_key`` whose whole-session delete waits to reach ``backend``."""

        def query() -> set[str]:
            return {
                r[0]
                for r in self._reader.conn.execute(
                    "SELECT session_id FROM tombstones"
                    " WHERE backend = ? AND project_key = ? AND subpath = ''",
                    (backend, project_key),
                )
            }

        return await self._reader.run(query)

    async def tombstoned_subpaths(
        self, backend: str, project_key: str, session_id: str
    ) -> set[str]:
        def query() -> set[str]:
            return {
                r[0]
                for r in self._reader.conn.execute(
                    "SELECT subpath FROM tombstones"
                    " WHERE backend = ? AND project_key = ? AND session_id = ?",
                    (backend, project_key, session_id),
                )
            }

        return await self._reader.run(query)

    # -- reads for the wrapper -------------------------------------------------

    async def local_view(self, key: SessionKey, backend: str) -> LocalView | None:
        def query() -> LocalView | None:
            conn = self._reader.conn
            row = conn.execute(
                f"""SELECT {_CURSOR_COLUMNS}, k.key_id, k.next_seq, k.updated_at,
                          (SELECT MIN(first_seq) FROM batches b WHERE b.key_id = k.key_id)
                   FROM cursors c JOIN keys k ON k.key_id = c.key_id
                   WHERE c.backend = ? AND k.project_key = ? AND k.session_id = ?
                     AND k.subpath = ?""",
                (backend, *split_key(key)),
            ).fetchone()
            if row is None:
                return None
            key_id, next_seq, updated_at, lowest = row[5:]
            return LocalView(key_id, next_seq, lowest, Cursor(*row[:5]), updated_at)

        return await self._reader.run(query)

    async def read_whole(self, key_id: int, from_seq: int) -> list[bytes] | None:
        """Entries of ``key_id`` from ``from_seq`` on, or None unless the queue still
        holds them all from exactly ``from_seq`` (compaction may have run since the
        caller looked): one query, one snapshot."""

        def query() -> list[bytes] | None:
            bodies: list[bytes] = []
            for seq, body, _ in _entries_from(self._reader.conn, key_id, from_seq):
                if seq != from_seq + len(bodies):
                    return None
                bodies.append(body)
            return bodies

        return await self._reader.run(query)

    async def read_from(self, key_id: int, from_seq: int) -> list[bytes]:
        def query() -> list[bytes]:
            return [body for _, body, _ in _entries_from(self._reader.conn, key_id, from_seq)]

        return await self._reader.run(query)

    async def local_sessions(self, project_key: str, backend: str) -> list[LocalSession]:
        """Main keys of ``project_key`` with entries ``backend`` has not acknowledged yet,
        with its cursor. (What it acknowledged is in its own listing, or was deleted
        there by another host.)"""

        def query() -> list[LocalSession]:
            return [
                LocalSession(*r)
                for r in self._reader.conn.execute(
                    """SELECT k.session_id, k.updated_at, k.key_id, c.acked
                       FROM keys k JOIN cursors c ON c.key_id = k.key_id AND c.backend = ?
                       WHERE k.project_key = ? AND k.subpath = '' AND c.acked < k.next_seq""",
                    (backend, project_key),
                )
            ]

        return await self._reader.run(query)

    async def local_subkeys(self, project_key: str, session_id: str, backend: str) -> list[str]:
        """Subpaths of the session with entries ``backend`` has not acknowledged yet."""

        def query() -> list[str]:
            return [
                r[0]
                for r in self._reader.conn.execute(
                    "SELECT k.subpath FROM keys k JOIN cursors c"
                    " ON c.key_id = k.key_id AND c.backend = ?"
                    " WHERE k.project_key = ? AND k.session_id = ? AND k.subpath != ''"
                    " AND c.acked < k.next_seq",
                    (backend, project_key, session_id),
                )
            ]

        return await self._reader.run(query)

    # -- barrier, compaction, status ----------------------------------------------

    async def unacked_targets(self, backend: str, project_key: str | None = None) -> dict[int, int]:
        """key_id -> next_seq for every key (of ``project_key``, if given) ``backend``
        has not fully acknowledged."""

        def query() -> dict[int, int]:
            sql = (
                "SELECT k.key_id, k.next_seq FROM cursors c JOIN keys k ON k.key_id = c.key_id"
                " WHERE c.backend = ? AND c.acked < k.next_seq"
            )
            args: tuple[str, ...] = (backend,)
            if project_key is not None:
                sql += " AND k.project_key = ?"
                args += (project_key,)
            return {r[0]: r[1] for r in self._reader.conn.execute(sql, args)}

        return await self._reader.run(query)

    async def unmet(
        self, backend: str, targets: dict[int, int]
    ) -> tuple[dict[int, int], list[int]]:
        """The part of ``targets`` ``backend`` has not reached yet, and which of those are
        parked (or wait behind a parked delete).

        A key deleted since counts as reached: there is nothing left to deliver.
        """

        def query() -> tuple[dict[int, int], list[int]]:
            conn = self._reader.conn
            short: dict[int, int] = {}
            parked: list[int] = []
            for key_id, target in targets.items():
                row = conn.execute(
                    """SELECT c.acked, p.key_id IS NOT NULL OR EXISTS (
                           SELECT 1 FROM tombstones t JOIN keys k ON k.key_id = c.key_id
                           WHERE t.backend = c.backend AND t.parked_error IS NOT NULL
                             AND t.project_key = k.project_key
                             AND t.session_id = k.session_id
                             AND t.subpath IN ('', k.subpath))
                       FROM cursors c
                       LEFT JOIN parked p ON p.backend = c.backend AND p.key_id = c.key_id
                       WHERE c.backend = ? AND c.key_id = ?""",
                    (backend, key_id),
                ).fetchone()
                if row is not None and row[0] < target:
                    short[key_id] = target
                    if row[1]:
                        parked.append(key_id)
            return short, parked

        return await self._reader.run(query)

    async def compact(
        self, retention_seconds: float, forget_after: float | None = None, for_append: bool = False
    ) -> int:
        """Delete the batches whose entries every backend acknowledged, appended more
        than ``retention_seconds`` ago; return how many entries went. Keys idle for
        ``forget_after`` seconds (``None``: never) with nothing left to deliver are
        forgotten: their row, cursors and uuid ledger go.

        "Every backend" means every cursor in the file, including those of
        backends this process was not given: their entries are not ours to drop.
        Deleted in chunks of ``COMPACT_CHUNK``, each its own transaction: appends
        get the writer in between, and each needs little room on a full disk.
        ``for_append``: an append looking for room; it never takes the disk reserve
        (that is for draining) and, on a full disk, gives up quietly.
        """
        cutoff = time.time() - retention_seconds
        idle_since = None if forget_after is None else time.time() - forget_after

        def chunk() -> tuple[int, int]:
            """Batches every backend acknowledged, past retention (one chunk): (rows, entries)."""
            conn = self._writer.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Key by key, only the batches below what every backend acknowledged
                # (an index range each): a scan of all batches cost ~60 ms per
                # compaction with 1M entries queued, on the writer thread.
                rows = conn.execute(
                    """WITH k AS MATERIALIZED (
                           SELECT key_id, (SELECT MIN(c.acked) FROM cursors c
                                           WHERE c.key_id = keys.key_id) AS done
                           FROM keys)
                       SELECT b.id, b.nbytes, b.count FROM k CROSS JOIN batches b
                         ON b.key_id = k.key_id AND b.first_seq < k.done
                       WHERE b.first_seq + b.count <= k.done AND b.appended_at <= ?
                       LIMIT ?""",
                    (cutoff, COMPACT_CHUNK),
                ).fetchall()
                if rows:  # (writing nothing needs no room on a full disk)
                    conn.executemany("DELETE FROM batches WHERE id = ?", [(r[0],) for r in rows])
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
            self.stored_bytes -= sum(r[1] for r in rows)
            return len(rows), sum(r[2] for r in rows)

        def forget() -> tuple[int, int]:
            """Idle keys every backend has all of: their bookkeeping goes (one chunk)."""
            conn = self._writer.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(
                    """SELECT k.key_id, k.next_seq, k.project_key, k.session_id, k.subpath
                       FROM keys k WHERE k.updated_at <= ?
                         AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.key_id = k.key_id)
                         AND NOT EXISTS (SELECT 1 FROM cursors c WHERE c.key_id = k.key_id
                                         AND c.acked < k.next_seq)
                         AND NOT EXISTS (SELECT 1 FROM parked p WHERE p.key_id = k.key_id)
                       LIMIT ?""",
                    (idle_since, COMPACT_CHUNK),
                ).fetchall()
                if rows:
                    # This producer never reuses a seq for a key: a later row starts past these.
                    floor = max([self._seq_floor, *(r[1] for r in rows)])
                    conn.execute(
                        "UPDATE meta SET value = ? WHERE name = 'seq_floor'", (str(floor),)
                    )
                    ids = [(r[0],) for r in rows]
                    for table in ("ledger", "cursors", "keys"):
                        conn.executemany(f"DELETE FROM {table} WHERE key_id = ?", ids)
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
            if rows:
                self._seq_floor = floor
                for row in rows:
                    self._key_cache.pop((row[2], row[3], row[4]), None)
                    self._ledger.forget(row[0])
            return len(rows), 0

        total = 0  # entries deleted
        for step in (chunk,) if idle_since is None else (chunk, forget):
            while True:
                try:
                    rows, entries = await (
                        self._writer.run(step) if for_append else self._drain_write(step)
                    )
                except sqlite3.OperationalError as exc:
                    if for_append and _disk_full(exc):
                        return total  # no room to compact in; draining will make some
                    raise
                total += entries
                if rows < COMPACT_CHUNK:
                    break
        if total:
            await self._writer.run(self._refill_reserve)
        return total

    async def stats(self, backend: str) -> BackendStats:
        def query() -> BackendStats:
            conn = self._reader.conn
            stats = BackendStats()
            row = conn.execute(
                """SELECT COALESCE(SUM(k.next_seq - c.acked), 0), COUNT(*)
                   FROM cursors c JOIN keys k ON k.key_id = c.key_id
                   WHERE c.backend = ? AND c.acked < k.next_seq""",
                (backend,),
            ).fetchone()
            stats.pending_entries, stats.pending_keys = int(row[0]), int(row[1])
            row = conn.execute(
                # A batch acknowledged in part counts for its unacknowledged share.
                """SELECT COALESCE(SUM(b.nbytes * (b.first_seq + b.count
                                     - MAX(b.first_seq, c.acked)) / b.count), 0),
                          MIN(b.appended_at)
                   FROM cursors c JOIN batches b
                     ON b.key_id = c.key_id AND b.first_seq + b.count > c.acked
                   WHERE c.backend = ?""",
                (backend,),
            ).fetchone()
            stats.pending_bytes = int(row[0])
            stats.lag_seconds = 0.0 if row[1] is None else max(0.0, time.time() - row[1])
            stats.parked = [
                {
                    "key": KeyRow(*r[:4]).session_key(),
                    "error": r[4],
                    "parked_at": r[5],
                }
                for r in conn.execute(
                    """SELECT k.key_id, k.project_key, k.session_id, k.subpath, p.error,
                              p.parked_at
                       FROM parked p JOIN keys k ON k.key_id = p.key_id
                       WHERE p.backend = ? ORDER BY p.parked_at""",
                    (backend,),
                )
            ]
            stats.losses = _losses(conn, backend)
            stats.pending_deletes = int(
                conn.execute(
                    "SELECT COUNT(*) FROM tombstones WHERE backend = ?", (backend,)
                ).fetchone()[0]
            )
            stats.parked_deletes = [
                {
                    "key": Tombstone(0, KeyRow(0, *r[:3]).session_key()).key,
                    "error": r[3],
                    "parked_at": r[4],
                }
                for r in conn.execute(
                    """SELECT project_key, session_id, subpath, parked_error, parked_at
                       FROM tombstones WHERE backend = ? AND parked_error IS NOT NULL
                       ORDER BY id""",
                    (backend,),
                )
            ]
            return stats

        return await self._reader.run(query)

    async def losses(self, backend: str) -> list[Loss]:
        """What ``backend`` was found to have lost, oldest first."""
        return await self._reader.run(lambda: _losses(self._reader.conn, backend))

    async def all_keys(self) -> list[tuple[KeyRow, int]]:
        """Every key with its next_seq (for ``verify``)."""

        def query() -> list[tuple[KeyRow, int]]:
            return [
                (KeyRow(*r[:4]), r[4])
                for r in self._reader.conn.execute(
                    "SELECT key_id, project_key, session_id, subpath, next_seq FROM keys"
                    " ORDER BY key_id"
                )
            ]

        return await self._reader.run(query)
