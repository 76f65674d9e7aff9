"""The queue file: its lock, its header check and its schema with the migrations.

A queue file belongs to one process: ``QueueFile.lock`` takes an exclusive
``flock`` on ``<queue>.lock`` (a second process gets ``QueueLockedError``).
A file that is not SQLite, or SQLite but not a walmirror queue, or of a newer
schema, is refused with ``CorruptQueueError`` and left byte for byte as it
was. ``MIGRATIONS[i]`` moves the schema from version ``i`` to ``i + 1``; the
layout itself is described in ``walmirror.queue``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from .errors import CorruptQueueError, QueueLockedError, QueuePathError

logger = logging.getLogger("walmirror.queue")

SCHEMA_VERSION = 5

# Each step moves the schema from version i to i + 1; run in one transaction.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID""",
        """CREATE TABLE keys (
            key_id INTEGER PRIMARY KEY,
            project_key TEXT NOT NULL,
            session_id TEXT NOT NULL,
            subpath TEXT NOT NULL,
            next_seq INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL,
            UNIQUE (project_key, session_id, subpath))""",
        """CREATE TABLE entries (
            id INTEGER PRIMARY KEY,
            key_id INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            appended_at REAL NOT NULL,
            nbytes INTEGER NOT NULL,
            body BLOB NOT NULL,
            UNIQUE (key_id, seq))""",
        """CREATE TABLE uuids (
            key_id INTEGER NOT NULL, uuid TEXT NOT NULL,
            PRIMARY KEY (key_id, uuid)) WITHOUT ROWID""",
        """CREATE TABLE cursors (
            backend TEXT NOT NULL, key_id INTEGER NOT NULL,
            base INTEGER, acked INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (backend, key_id)) WITHOUT ROWID""",
        """CREATE INDEX cursors_by_key ON cursors (key_id)""",
        """CREATE TABLE parked (
            backend TEXT NOT NULL, key_id INTEGER NOT NULL,
            error TEXT NOT NULL, parked_at REAL NOT NULL,
            PRIMARY KEY (backend, key_id)) WITHOUT ROWID""",
        """CREATE TABLE tombstones (
            id INTEGER PRIMARY KEY, backend TEXT NOT NULL,
            project_key TEXT NOT NULL, session_id TEXT NOT NULL,
            subpath TEXT NOT NULL, created_at REAL NOT NULL)""",
    ],
    # 1 -> 2: the producer protocol. Cursors count seqs instead of offsets; a
    # schema-1 cursor keeps its offset base so its first delivery can tell what
    # the backend already holds (``Flusher._reconcile_legacy``).
    [
        """ALTER TABLE keys ADD COLUMN first_seq INTEGER NOT NULL DEFAULT 0""",
        """ALTER TABLE cursors RENAME COLUMN base TO legacy_base""",
        """ALTER TABLE cursors ADD COLUMN confirmed INTEGER""",
        """ALTER TABLE cursors ADD COLUMN solo_length INTEGER""",
        """UPDATE cursors SET legacy_base = NULL WHERE acked >= (
            SELECT next_seq FROM keys WHERE keys.key_id = cursors.key_id)""",
        """CREATE TABLE losses (
            id INTEGER PRIMARY KEY, backend TEXT NOT NULL,
            project_key TEXT NOT NULL, session_id TEXT NOT NULL, subpath TEXT NOT NULL,
            first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
            restored INTEGER NOT NULL, detected_at REAL NOT NULL)""",
        """INSERT OR IGNORE INTO meta (name, value) VALUES ('seq_floor', '0')""",
        """INSERT OR IGNORE INTO meta (name, value)
           VALUES ('producer_id', lower(hex(randomblob(12))))""",
    ],
    # 2 -> 3: a delete a backend refuses for good is parked (with its error), as a
    # key is, instead of being retried at the head of every round.
    [
        """ALTER TABLE tombstones ADD COLUMN parked_error TEXT""",
        """ALTER TABLE tombstones ADD COLUMN parked_at REAL""",
    ],
    # 3 -> 4: one row per appended batch instead of one per entry, and one ledger
    # row per append instead of one per uuid (a tenth of the writes per entry).
    # An entry row becomes a batch of one; a key's uuids become one ledger row.
    # Key ids are never reused (AUTOINCREMENT): whatever still holds the id of a
    # deleted or forgotten key (a delivery under way, a load, the flusher's
    # per-key state) finds nothing, never another session's row.
    [
        """CREATE TABLE keys_v4 (
            key_id INTEGER PRIMARY KEY AUTOINCREMENT,
            project_key TEXT NOT NULL,
            session_id TEXT NOT NULL,
            subpath TEXT NOT NULL,
            next_seq INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL,
            first_seq INTEGER NOT NULL DEFAULT 0,
            UNIQUE (project_key, session_id, subpath))""",
        """INSERT INTO keys_v4 (key_id, project_key, session_id, subpath, next_seq,
                                updated_at, first_seq)
           SELECT key_id, project_key, session_id, subpath, next_seq, updated_at, first_seq
           FROM keys""",
        """DROP TABLE keys""",
        """ALTER TABLE keys_v4 RENAME TO keys""",
        """CREATE TABLE batches (
            id INTEGER PRIMARY KEY,
            key_id INTEGER NOT NULL,
            first_seq INTEGER NOT NULL,
            count INTEGER NOT NULL,
            appended_at REAL NOT NULL,
            nbytes INTEGER NOT NULL,
            body BLOB NOT NULL,
            UNIQUE (key_id, first_seq))""",
        """INSERT INTO batches (id, key_id, first_seq, count, appended_at, nbytes, body)
           SELECT id, key_id, seq, 1, appended_at, nbytes, body FROM entries ORDER BY id""",
        """DROP TABLE entries""",
        """CREATE TABLE ledger (
            id INTEGER PRIMARY KEY, key_id INTEGER NOT NULL, uuids TEXT NOT NULL)""",
        """CREATE INDEX ledger_by_key ON ledger (key_id)""",
        """INSERT INTO ledger (key_id, uuids)
           SELECT key_id, json_group_array(uuid) FROM uuids GROUP BY key_id""",
        """DROP TABLE uuids""",
    ],
    # 4 -> 5: a batch's checksum (crc32 of its body, then of its hints) and its
    # entries' summary hints (``walmirror.protocol.summary_hint``, two bytes each,
    # little-endian; NULL for a subkey's batch). Batches written before have neither:
    # they are checked by parsing them, as before.
    [
        """ALTER TABLE batches ADD COLUMN crc INTEGER""",
        """ALTER TABLE batches ADD COLUMN hints BLOB""",
    ],
]


class QueueFile:
    """The queue file on disk, before and around its SQLite connections."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    def lock(self) -> None:
        if self.path.is_dir():
            raise QueuePathError(
                f"wal_path {self.path} is a directory; give the queue a file name in it "
                f"(e.g. {self.path / 'walmirror.db'})"
            )
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            hint = {
                "EROFS": "the filesystem is read-only",
                "EACCES": "this process may not write there",
                "EPERM": "this process may not write there",
                "ENOSPC": "the disk is full",
                "ENOTDIR": "a part of the path is a file, not a directory",
            }.get(reason, "see the error code")
            raise QueuePathError(
                f"cannot create the queue's files next to {self.path} ({reason}: {hint})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise QueueLockedError(
                f"queue file {self.path} is in use by another process (pid {holder}); "
                "give each process its own wal_path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def check_header(self) -> None:
        # Create the file ourselves so it is private (0600) from the first byte;
        # SQLite gives its -wal and -shm files the same mode.
        if not self.path.exists():
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        elif self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise CorruptQueueError(
                        f"queue file {self.path} is not a SQLite database; it was left untouched"
                    )

    def migrate(self, conn: sqlite3.Connection, backends: Iterable[str]) -> None:
        """Bring the schema to ``SCHEMA_VERSION`` (one transaction), give every backend
        in ``backends`` a cursor per key, and run SQLite's quick check."""
        backends = tuple(backends)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise CorruptQueueError(
                f"{self.path} is a SQLite database but not a walmirror queue; it was left untouched"
            )
        version = 0
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise CorruptQueueError(
                f"queue file {self.path} has schema version {version}, newer than this "
                f"walmirror understands ({SCHEMA_VERSION}); upgrade walmirror"
            )
        conn.execute("PRAGMA journal_mode = WAL")
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for step in MIGRATIONS[version:]:
                    for statement in step:
                        conn.execute(statement)
                conn.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        # A backend added since the last run gets a cursor for every key.
        conn.execute("BEGIN IMMEDIATE")
        for backend in backends:
            conn.execute(
                "INSERT OR IGNORE INTO cursors (backend, key_id, acked)"
                " SELECT ?, key_id, first_seq FROM keys",
                (backend,),
            )
        conn.execute("COMMIT")
        known = {r[0] for r in conn.execute("SELECT DISTINCT backend FROM cursors")}
        for stale in sorted(known - set(backends)):
            logger.warning(
                "queue %s has a cursor for backend %r, which this store was not given; "
                "entries it has not acknowledged are kept (compaction waits for it)",
                self.path,
                stale,
            )
        ok = conn.execute("PRAGMA quick_check").fetchone()
        if ok is None or ok[0] != "ok":
            raise CorruptQueueError(f"queue file {self.path} failed SQLite's integrity check")
