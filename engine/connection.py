"""One sqlite3 connection owned by one thread, fed by a queue of jobs.

The aiosqlite design: SQLite connections belong to the thread that made them,
so each ``Connection`` runs its own thread, and a coroutine hands it whole
functions (``run``). A job is a whole transaction of many statements: it costs
one hop to the thread and one back, not one per statement. ``submit`` hands a
job that reports back on its own (group commit uses it).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from .errors import QueueClosedError

T = TypeVar("T")

Synchronous = Literal["FULL", "NORMAL"]

logger = logging.getLogger("walmirror.queue")

WAL_PAGES = 1000
"""The WAL is checkpointed once about this many pages were written to it (SQLite's
default; ~4 MiB at 4 KiB pages), by the queue's checkpointer thread, off the commit
path (``WriteAheadQueue``); the writer's own commits do it only past twice this (a
checkpoint that runs while commits go on cannot finish, so under sustained writes
the WAL would grow without bound). At 256, ingest with 50 sessions fell by a
quarter."""

WAL_FILE_PAGES = 4 * WAL_PAGES
"""How large the WAL file is left when the WAL restarts (``journal_size_limit``):
above what it holds between checkpoints, so that commits overwrite frames already on
disk. Cut back to WAL_PAGES, the file grew again in every checkpoint cycle, and a
commit that grows the file waits for its new size to be synced too."""


class Connection:
    """One sqlite3 connection owned by one thread, fed by a queue of jobs (the aiosqlite
    design), where a job is a whole function: a transaction of many statements costs one
    hop to the thread and one back, not one per statement."""

    def __init__(
        self,
        path: Path,
        synchronous: Synchronous,
        name: str,
        read_only: bool = False,
        autocheckpoint: int = WAL_PAGES,
    ) -> None:
        self._path = path
        self._read_only = read_only
        self._autocheckpoint = autocheckpoint
        self._synchronous = synchronous
        self._name = name
        self._jobs: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except RuntimeError:
                # The loop that asked is closed (a store left open when its event
                # loop ended): nobody waits for this answer. Keep serving.
                logger.debug("%s: a job's event loop is closed", self._name)

    def _open(self) -> None:
        if self._read_only:  # inspection of a queue another process may be writing
            uri = f"file:{quote(str(self._path.resolve()))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        # journal_mode changes the file: it is set by _migrate, once the file is known
        # to be ours (a foreign database must be left byte for byte as it was).
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        # A bounded WAL: this connection's commits checkpoint it past ``autocheckpoint``
        # pages. On a full disk, a checkpoint needs room for what the WAL holds; the
        # queue's disk reserve (2 * WAL_PAGES) is sized for it. The file itself is kept
        # (up to WAL_FILE_PAGES) when the WAL restarts: a commit that overwrites frames
        # already on disk syncs data only, one that grows the file syncs its size too.
        conn.execute(f"PRAGMA wal_autocheckpoint = {self._autocheckpoint}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_FILE_PAGES * 4096}")
        self._conn = conn

    async def open(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()
        await self.run(self._open)

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the connection's thread; it reports back on its own."""
        if self._thread is None:  # a job nobody would ever run: fail now, not hang
            raise QueueClosedError(f"the queue's {self._name} connection is not open")
        self._jobs.put(job)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:  # a job nobody would ever run: fail now, not hang
            raise QueueClosedError(f"the queue's {self._name} connection is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(settle, future, result, None)

        self._jobs.put(job)
        return await future

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "connection used before open()"
        return self._conn

    async def close(self) -> None:
        if self._thread is None:
            return
        if self._conn is not None:
            await self.run(self._conn.close)
            self._conn = None
        # The thread ends at this sentinel. Nothing joins it: that would take a thread
        # of the event loop's default executor, which a backend may have used up.
        self._jobs.put(None)
        self._thread = None


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the work is done all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
