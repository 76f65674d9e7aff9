"""``FileStore``: session transcripts as JSONL files, in the Claude CLI's own layout.

Storage layout under ``root``::

    {root}/
      {project_key}/
        {session_id}.jsonl                        main transcript
        {session_id}/
          subagents/agent-1.jsonl                 subpath "subagents/agent-1"
        .walmirror/
          {session_id}.state.json                 the main transcript's state
          {session_id}/
            subagents/agent-1.state.json          the subagent transcript's state

A transcript holds one line per entry, the entry's canonical JSON
(``walmirror.protocol.encode_entry``) and ``"\\n"``: exactly what the CLI
writes and nothing else, so ``root`` can serve as a ``projects`` directory for
the CLI itself. Beside each transcript, in the hidden ``.walmirror``
directory, one small *state file* (never ``.jsonl``, so the CLI ignores it)::

    {"size": 5120, "lines": 17,            the transcript bytes and entries it describes
     "tail": "9f86d0...",                  a digest of the last 4 KiB of those bytes
     "marks": {"<producer>": 41, ...},     the protocol's marks (walmirror.protocol)
     "summary": {...}}                     main keys: the SessionSummaryEntry of those lines

The summary lives in the main key's state file rather than a sidecar of its
own: one state write per batch instead of a state and a sidecar write, and
the summary is replaced in the same atomic rename as the size it folds, so it
can never be behind or ahead of the transcript. State files are replaced atomically: a tmp file,
``fsync``, ``rename``, ``fsync`` of the directory.

The atomic step (``append_batch``; see ``walmirror.protocol``), under the
transcript's lock:

0. Recover. A transcript longer than the state's ``size`` whose first ``size``
   bytes still end with the ``tail`` the state recorded ends with lines of a call
   that crashed before its state write: never acknowledged, so they are
   truncated away (every call that locks a transcript does this first).
1. ``mark`` := ``marks[producer]``; ``skip_count`` raises ``MarkBehindError``
   or says how many leading entries are repeats.
2. Write the rest with one ``write()`` on the ``O_APPEND`` descriptor, ``fsync``.
3. Replace the state file: the new mark, ``size``, ``lines`` and summary. The
   call returns (the ack) only after this; if it fails before the rename, the
   transcript is truncated back and the error raised.

A key's first write creates its state file (size 0) before the transcript
grows, so a crash between 2 and 3 always finds a state to roll back to. Plain
``append`` (no producer, no dedupe) takes the same path without touching marks.

Marks unknown: when the state does not describe the transcript (no state file
beside a non-empty transcript: written by the CLI, an older FileStore, or its
state deleted by hand; a transcript shorter than ``size``: truncated, deleted
or restored from an older copy by hand; or one whose bytes up to ``size`` do
not end with the recorded ``tail``: deleted and written again by another
program, even into the same inode and to the same size), the store adopts the
transcript as it is, with no marks and a summary rebuilt from its lines. The
check is by content, not by inode or timestamps: ext4 hands a deleted file's
inode to the next file, and a copy (``cp -a``, ``rsync``) of the root changes
inodes but is still the same transcript. A
producer whose batch carries ``expect`` then gets ``MarkBehindError`` (the
backend lost what it acknowledged); a batch without ``expect`` is appended.
So remove state files only together with their transcripts, and let every
writer of a transcript go through ``FileStore`` (any number of processes and
hosts): lines another program appends past ``size`` are taken for the tail of
a crashed append and removed.

Deletes and tombstones: ``delete`` writes the state with ``size`` 0, no
summary and every mark kept, then unlinks the transcript (a main key: each of
its subagent transcripts the same way; a subpath key: that one). A state file
with marks and size 0 is a tombstone: a retry of a batch written before the
delete is at or below its mark and changes nothing. A state without marks is
removed with its transcript. Tombstones live until an operator removes them:
``rm {project}/.walmirror/{session_id}.state.json`` and ``rm -r
{project}/.walmirror/{session_id}/``, safe once no queue that wrote the key
still holds undelivered entries for it. Otherwise ``FileStore`` deletes
nothing: retention (TTL, compliance windows) is the operator's job, e.g. a
cron ``find -mtime`` over the transcripts that calls ``delete()`` for each
(keeping the tombstones) or removes each transcript with its state file.

Durability and concurrency (``root`` may be a volume shared between hosts):

* Every operation on a transcript holds an exclusive ``flock`` on it (``flock``
  is emulated with POSIX locks on NFS, so hosts serialise too) and an
  ``asyncio.Lock`` per file in the process, so a process has at most one thread
  waiting per file. After locking, the descriptor is checked against the path:
  a file deleted while we waited is reopened, never written to. A key without a
  transcript gets an empty one to lock, removed again if nothing was written.
* Lock waits are bounded and cancellable: the lock is polled (``LOCK_NB``,
  sleeps growing from 1 ms to 50 ms) for at most ``lock_timeout`` seconds, then
  ``TranscriptLockTimeoutError`` (retryable; nothing was written). A caller
  cancelled while waiting (the engine's ``call_timeout``) stops the wait at once
  and frees its thread; once the lock is held, the operation completes.
* A crash mid-write leaves bytes past ``size``, removed by step 0; creating a
  file or directory fsyncs its parent directory.
* All blocking I/O runs on the store's own pool of at most ``max_threads``
  threads, never the event loop's default executor: a stuck file cannot starve
  walmirror's queue or anyone else. ``aclose()`` shuts the pool down (a later
  call starts a new one).
* Session ids and subpath directories must not end in ``.jsonl`` or
  ``.state.json``: such a directory would collide with a file of this layout.

Errors of the filesystem come back as walmirror errors naming the key, never
transcript content: ``KeyTooLongError`` (``ENAMETOOLONG``: a session id or
subpath longer than this filesystem's names allow; permanent, and an
``InvalidKeyError``; reads of such a key find nothing),
``ReadOnlyFileSystemError`` (``EROFS``) and ``FileStorePermissionError``
(``EACCES``, ``EPERM``), both permanent: the engine parks the key; and
``FileSystemFullError`` (``ENOSPC``, ``EDQUOT``), retryable. Each is also the
``OSError`` it replaces, with its ``errno``.

``length`` (entries stored) reads the state file: O(1).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeGuard, TypeVar, cast, overload

from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)

from walmirror.errors import (
    BackendError,
    CorruptTranscriptError,
    InvalidEntryError,
    InvalidKeyError,
    PermanentBackendError,
    WalmirrorError,
)
from walmirror.keys import describe_key, validate_key
from walmirror.protocol import (
    Batch,
    Receipt,
    check_batch,
    decode_array,
    encode_entry,
    skip_count,
)

__all__ = [
    "SIDECAR_DIR",
    "CorruptTranscriptError",
    "FileStore",
    "FileStorePermissionError",
    "FileSystemFullError",
    "KeyTooLongError",
    "ReadOnlyFileSystemError",
    "TranscriptLockTimeoutError",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

SIDECAR_DIR = ".walmirror"
"""Hidden per-project directory holding the state files."""

_JSONL = ".jsonl"
_STATE = ".state.json"
_CHUNK = 1 << 20  # read size when scanning files
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
_TAIL = 4096  # bytes before a state's ``size`` that its ``tail`` digest covers
_POLL_FIRST, _POLL_MAX = 0.001, 0.05  # lock polling: first sleep, longest sleep


class TranscriptLockTimeoutError(BackendError, TimeoutError):
    """Another process held a transcript's lock for longer than ``lock_timeout``.

    Nothing was written; retrying is safe and may succeed once the holder is done.
    """


class KeyTooLongError(PermanentBackendError, InvalidKeyError):
    """A session id or subpath makes a file name longer than the filesystem allows.

    Permanent: no retry can store the key on this filesystem (the engine parks it).
    """


class ReadOnlyFileSystemError(PermanentBackendError, OSError):
    """The store's root is on a read-only filesystem (``EROFS``)."""


class FileStorePermissionError(PermanentBackendError, PermissionError):
    """The process may not write under the store's root (``EACCES``, ``EPERM``)."""


class FileSystemFullError(BackendError, OSError):
    """No space (or quota) left under the store's root (``ENOSPC``, ``EDQUOT``).

    Nothing of the call was acknowledged; retryable once space is freed.
    """


@dataclass(slots=True)
class _State:
    """What a state file says about its transcript (see the module docstring)."""

    size: int = 0
    lines: int = 0
    marks: dict[str, int] = field(default_factory=dict)
    summary: SessionSummaryEntry | None = None
    tail: str | None = None  # digest of the bytes before ``size``; None: size 0, or unknown


@dataclass(slots=True)
class _LockWait:
    """How one call may wait for transcript locks: ``timeout`` seconds per lock, and
    not at all once ``abandoned`` is set (its caller was cancelled)."""

    timeout: float
    abandoned: threading.Event = field(default_factory=threading.Event)


class _Abandoned(Exception):
    """Raised in a worker thread whose caller stopped waiting for it; nobody sees it."""


class FileStore(SessionStore):
    """A ``SessionStore`` and walmirror producer store keeping JSONL files under ``root``.

    ``file_mode`` and ``dir_mode`` apply to files and directories this store
    creates (the process umask still applies). Transcripts hold conversation
    content, so the defaults are owner-only. ``lock_timeout``: how long a call
    waits for a transcript another process has locked before it raises
    ``TranscriptLockTimeoutError``. ``max_threads``: the size of the store's own
    thread pool for blocking file I/O.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
        lock_timeout: float = 10.0,
        max_threads: int = 16,
    ) -> None:
        if (
            not isinstance(lock_timeout, int | float)
            or isinstance(lock_timeout, bool)
            or not math.isfinite(lock_timeout)
            or lock_timeout <= 0
        ):
            raise ValueError(
                f"lock_timeout must be a positive number of seconds, got {lock_timeout!r}"
            )
        if not isinstance(max_threads, int) or isinstance(max_threads, bool) or max_threads < 1:
            raise ValueError(f"max_threads must be a positive integer, got {max_threads!r}")
        self._root = Path(os.path.abspath(root))
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._lock_timeout = float(lock_timeout)
        self._max_threads = max_threads
        # One asyncio.Lock per transcript; dropped once nobody holds or awaits it.
        self._locks: weakref.WeakValueDictionary[Path, asyncio.Lock] = weakref.WeakValueDictionary()
        # Started on first use; its idle threads end when the store is collected.
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @property
    def root(self) -> Path:
        return self._root

    @property
    def cursor_name(self) -> str:
        """How a walmirror queue names its cursor for this backend: stable across
        processes and across wrappers (a FaultyStore around it keeps the name)."""
        return self._root.as_uri()

    def __repr__(self) -> str:
        return f"FileStore({str(self._root)!r})"

    # ------------------------------------------------------------------
    # SessionStore
    # ------------------------------------------------------------------

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Append ``entries`` at the key's current end (no producer, no dedupe)."""
        k = self._check_key(key)
        encoded = _encode(k, entries)  # raises before anything is touched
        if not encoded:
            return  # must not even create the file
        path = self._transcript_path(k)
        async with self._lock(path):
            await self._run(
                describe_key(k),
                lambda wait: self._append_sync(wait, k, path, None, encoded, entries),
            )

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """All entries of ``key`` in order, or ``None`` if it holds none."""
        k = self._check_key(key)
        path = self._transcript_path(k)
        async with self._lock(path):
            return await self._run(describe_key(k), lambda wait: self._load_sync(wait, k, path))

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """Main transcripts directly under the project directory; ``mtime`` in epoch ms."""
        project_dir = self._project_dir(project_key)
        return await self._run(
            f"project {project_key}",
            lambda _: self._list_sessions_sync(project_key, project_dir),
        )

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """The summaries in the state files of the project's main transcripts."""
        project_dir = self._project_dir(project_key)
        return await self._run(
            f"project {project_key}", lambda _: _list_summaries(project_dir / SIDECAR_DIR)
        )

    async def delete(self, key: SessionKey) -> None:
        """Delete a transcript, keeping its marks; a main key also takes its subagents'."""
        k = self._check_key(key)
        path = self._transcript_path(k)
        async with self._lock(path):
            await self._run(describe_key(k), lambda wait: self._delete_sync(wait, k, path))

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """Subpaths of the session's subagent transcripts, sorted."""
        k = self._check_key(key)  # a stray subpath is validated, then ignored
        session_dir = self._project_dir(k["project_key"]) / k["session_id"]
        return await self._run(describe_key(k), lambda _: self._list_subkeys_sync(k, session_dir))

    async def aclose(self) -> None:
        """Shut the store's thread pool down (calls still running finish on their own;
        lock waits end at ``lock_timeout`` or when their callers are cancelled). The
        store stays usable: a later call starts a new pool."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------
    # The delivery protocol (walmirror.protocol.ProducerStore)
    # ------------------------------------------------------------------

    async def append_batch(self, key: SessionKey, batch: Batch) -> Receipt:
        """The protocol's atomic step (see the module docstring and ``walmirror.protocol``)."""
        k = self._check_key(key)
        check_batch(describe_key(k), batch)
        path = self._transcript_path(k)
        async with self._lock(path):
            appended, state = await self._run(
                describe_key(k),
                lambda wait: self._append_sync(wait, k, path, batch, batch.encoded, None),
            )
        return Receipt(appended, state.marks[batch.producer], state.lines)

    async def producer_mark(self, key: SessionKey, producer: str) -> int | None:
        """The highest seq of ``producer`` stored for ``key`` (``None``: none, or unknown)."""
        k = self._check_key(key)
        path = self._transcript_path(k)
        async with self._lock(path):
            return await self._run(
                describe_key(k), lambda wait: self._mark_sync(wait, k, path, producer)
            )

    async def length(self, key: SessionKey) -> int:
        """How many entries ``key`` holds (0 if never written or deleted)."""
        k = self._check_key(key)
        path = self._transcript_path(k)
        async with self._lock(path):
            return await self._run(describe_key(k), lambda wait: self._length_sync(wait, k, path))

    async def ping(self) -> None:
        """The health call (``walmirror.protocol``): the root is there (made if need be)
        and is a directory this process can write into."""

        def check(_wait: _LockWait) -> None:
            self._root.mkdir(parents=True, exist_ok=True)
            if not os.access(self._root, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable", str(self._root))

        await self._run("the root directory", check)

    # ------------------------------------------------------------------
    # The thread pool
    # ------------------------------------------------------------------

    async def _run(self, what: str, work: Callable[[_LockWait], T]) -> T:
        """Run ``work`` on the store's own threads. Cancelling the caller abandons the
        work's lock waits; the filesystem's refusals become walmirror errors about
        ``what`` (a key or project, never content)."""
        wait = _LockWait(self._lock_timeout)
        future = asyncio.get_running_loop().run_in_executor(self._pool(), work, wait)
        try:
            return await future
        except asyncio.CancelledError:
            wait.abandoned.set()
            raise
        except OSError as exc:
            if isinstance(exc, WalmirrorError):
                raise
            raise _translate(exc, what, self._root) from exc

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self._max_threads, thread_name_prefix=f"walmirror-file-{id(self):x}"
                )
            return self._executor

    # ------------------------------------------------------------------
    # Keys and paths
    # ------------------------------------------------------------------

    def _check_key(self, key: Any) -> SessionKey:
        """``validate_key`` plus the names this layout cannot store unambiguously."""
        k = validate_key(key)
        session_id = k["session_id"]
        if session_id == SIDECAR_DIR:
            raise InvalidKeyError(f"session_id {SIDECAR_DIR!r} is reserved by FileStore")
        # Session "s.jsonl" would use directory "s.jsonl/", which is session "s"'s
        # transcript; "s.state.json/" would be the state file of session "s".
        for suffix in (_JSONL, _STATE):
            if session_id.endswith(suffix):
                raise InvalidKeyError(f"session_id must not end with {suffix!r} in FileStore")
            subpath = k.get("subpath")
            if subpath is not None and any(p.endswith(suffix) for p in subpath.split("/")[:-1]):
                raise InvalidKeyError(
                    f"subpath directories must not end with {suffix!r} in FileStore"
                )
        return k

    def _project_dir(self, project_key: str) -> Path:
        # validate_key checks one component; the session id here is a placeholder.
        validate_key({"project_key": project_key, "session_id": "-"})
        return self._inside_root(self._root / project_key)

    def _transcript_path(self, key: SessionKey) -> Path:
        project_dir = self._root / key["project_key"]
        subpath = key.get("subpath")
        if subpath is None:
            path = project_dir / (key["session_id"] + _JSONL)
        else:
            path = project_dir / key["session_id"] / (subpath + _JSONL)
        return self._inside_root(path)

    def _state_path(self, key: SessionKey) -> Path:
        state_dir = self._root / key["project_key"] / SIDECAR_DIR
        subpath = key.get("subpath")
        if subpath is None:
            path = state_dir / (key["session_id"] + _STATE)
        else:
            path = state_dir / key["session_id"] / (subpath + _STATE)
        return self._inside_root(path)

    def _inside_root(self, path: Path) -> Path:
        # Validated keys cannot escape; this guards against a future validation bug.
        normal = Path(os.path.normpath(path))
        if normal == self._root or not normal.is_relative_to(self._root):
            raise InvalidKeyError("session key resolves outside the store root")
        return normal

    def _lock(self, path: Path) -> asyncio.Lock:
        lock = self._locks.get(path)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[path] = lock
        return lock

    # ------------------------------------------------------------------
    # Blocking work (always called through _run, on the store's threads)
    # ------------------------------------------------------------------

    def _append_sync(
        self,
        wait: _LockWait,
        key: SessionKey,
        path: Path,
        batch: Batch | None,
        encoded: Sequence[bytes],
        entries: list[SessionStoreEntry] | None,
    ) -> tuple[int, _State]:
        """``append_batch`` (``batch`` given) or plain ``append`` (``entries`` given):
        how many entries were appended, and the state that acknowledges them."""
        fd = self._open_locked(key, path, wait, create=True)
        try:
            main = "subpath" not in key  # main keys keep a summary
            state, on_disk = self._recover(key, fd, path, fold=main)
            # 1. the mark, and how many leading entries are repeats
            mark = None if batch is None else state.marks.get(batch.producer)
            skip = 0 if batch is None else skip_count(describe_key(key), batch, mark)
            if skip == len(encoded):  # all repeats: nothing changes
                return 0, state
            count = len(encoded) - skip
            data = b"\n".join(encoded[skip:]) + b"\n"
            if data.count(b"\n") != count:
                raise ValueError(f"{describe_key(key)}: an encoded entry holds a newline")
            marks = state.marks
            if batch is not None:
                marks = {**marks, batch.producer: batch.last_seq}
            summary = state.summary
            if main:  # folded before the write: an entry that cannot be read changes nothing
                new = entries if entries is not None else _decode_lines(key, data, count)
                summary = fold_session_summary(summary, key, new)
            if not on_disk:  # a crash after step 2 must find a size to roll back to
                self._store_state(key, state)
            # 2. the new lines, one write
            self._write_all(fd, path, data, state.size)
            # 3. the state that acknowledges them
            if main and summary is not None:
                # Same clock as list_sessions(): the transcript's own mtime after the write.
                summary["mtime"] = os.fstat(fd).st_mtime_ns // 1_000_000
            size = state.size + len(data)
            after = _State(size, state.lines + count, marks, summary, _tail(fd, size))
            try:
                state_path = self._replace_state(key, after)
            except BaseException:
                _truncate(path, fd, state.size)  # not acknowledged: leave no trace
                raise
            _fsync_dir(state_path.parent)
            return count, after
        finally:
            _release(path, fd)

    def _mark_sync(self, wait: _LockWait, key: SessionKey, path: Path, producer: str) -> int | None:
        fd = self._open_locked(key, path, wait, create=False)
        if fd is None:
            state = _read_state(self._state_path(key))
            if state is None or state.size == 0:  # never written, or a tombstone
                return None if state is None else state.marks.get(producer)
            # The state describes a transcript that is not there: decide under the lock.
            fd = self._open_locked(key, path, wait, create=True)
        try:
            state, _ = self._recover(key, fd, path, fold=False)
            return state.marks.get(producer)
        finally:
            _release(path, fd)

    def _length_sync(self, wait: _LockWait, key: SessionKey, path: Path) -> int:
        fd = self._open_locked(key, path, wait, create=False)
        if fd is None:
            return 0
        try:
            return self._recover(key, fd, path, fold=False)[0].lines
        finally:
            _release(path, fd)

    def _load_sync(
        self, wait: _LockWait, key: SessionKey, path: Path
    ) -> list[SessionStoreEntry] | None:
        fd = self._open_locked(key, path, wait, create=False)
        if fd is None:
            return None
        try:
            state, _ = self._recover(key, fd, path, fold=False)
            raw_lines = _read_range(fd, 0, state.size).split(b"\n")[:-1]
        finally:
            _release(path, fd)
        if not raw_lines:
            return None
        return [_parse_line(path, n, raw) for n, raw in enumerate(raw_lines, start=1)]

    def _list_sessions_sync(
        self, project_key: str, project_dir: Path
    ) -> list[SessionStoreListEntry]:
        try:
            scan = list(os.scandir(project_dir))
        except NotADirectoryError:
            return []
        except OSError as exc:
            if _absent(exc):
                return []
            raise
        sessions: list[SessionStoreListEntry] = []
        for item in scan:
            if not item.name.endswith(_JSONL) or not item.is_file(follow_symlinks=False):
                continue
            session_id = item.name[: -len(_JSONL)]
            try:
                key = self._check_key({"project_key": project_key, "session_id": session_id})
                st = item.stat(follow_symlinks=False)
            except (InvalidKeyError, FileNotFoundError):
                continue  # not a name we could load, or deleted while scanning
            if self._holds_entries(key, st.st_size):
                sessions.append({"session_id": session_id, "mtime": st.st_mtime_ns // 1_000_000})
        return sessions

    def _list_subkeys_sync(self, key: SessionKey, session_dir: Path) -> list[str]:
        subkeys: list[str] = []
        for dirpath, _dirs, files in os.walk(session_dir):
            for name in files:
                if not name.endswith(_JSONL):
                    continue
                file = Path(dirpath, name)
                subpath = "/".join(file.relative_to(session_dir).parts)[: -len(_JSONL)]
                try:
                    sub = self._check_key({**key, "subpath": subpath})
                    size = file.stat().st_size
                except (InvalidKeyError, FileNotFoundError):
                    continue
                if self._holds_entries(sub, size):
                    subkeys.append(subpath)
        return sorted(subkeys)

    def _holds_entries(self, key: SessionKey, size: int) -> bool:
        """Whether a transcript of ``size`` bytes lists as stored: not empty, and not the
        unacknowledged bytes of a first append or a delete that crashed (state size 0)."""
        if size == 0:
            return False
        state = _read_state(self._state_path(key))
        return state is None or state.size > 0

    def _delete_sync(self, wait: _LockWait, key: SessionKey, path: Path) -> None:
        self._delete_transcript(wait, key, path)
        if "subpath" in key:
            return
        project_dir = path.parent
        session_dir = project_dir / key["session_id"]
        if _is_real_dir(session_dir):
            # Each subagent transcript under its own lock, so writers in flight
            # finish first and writers waiting notice the file is gone.
            for dirpath, _dirs, files in os.walk(session_dir):
                for name in files:
                    if not name.endswith(_JSONL):
                        continue
                    file = Path(dirpath, name)
                    subpath = "/".join(file.relative_to(session_dir).parts)[: -len(_JSONL)]
                    try:
                        sub = self._check_key({**key, "subpath": subpath})
                    except InvalidKeyError:
                        continue  # not a file this store wrote
                    self._delete_transcript(wait, sub, file)
            _remove_empty_dirs(session_dir)
        _remove_empty_dirs(project_dir / SIDECAR_DIR / key["session_id"])
        if project_dir.is_dir():
            _fsync_dir(project_dir)

    def _delete_transcript(self, wait: _LockWait, key: SessionKey, path: Path) -> None:
        """Empty one key: state to size 0 with its marks, then unlink the transcript."""
        state_path = self._state_path(key)
        state = _read_state(state_path)
        # Lock even a missing transcript when a state exists: it may hold a summary.
        fd = self._open_locked(key, path, wait, create=state is not None)
        if fd is None:
            return
        try:
            # Marks are kept whatever the transcript looks like: a tombstone that
            # fences too much is harmless, one that fences too little resurrects.
            state = _read_state(state_path)
            marks = {} if state is None else state.marks
            if marks and state != _State(marks=marks):
                self._store_state(key, _State(marks=marks))
            os.unlink(path)
            _fsync_dir(path.parent)
            if not marks:
                state_path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        _remove_leftover_tmp(state_path)

    # ------------------------------------------------------------------
    # Transcripts and state files
    # ------------------------------------------------------------------

    def _recover(self, key: SessionKey, fd: int, path: Path, *, fold: bool) -> tuple[_State, bool]:
        """Step 0 under the lock: the state describing the transcript, and whether the
        state file says so (``False``: a new key, or one adopted with marks unknown).

        ``fold``: rebuild the summary when adopting (writers of main keys need it).
        """
        size = os.fstat(fd).st_size
        state = _read_state(self._state_path(key))
        # The state describes this file if the file still holds its bytes: at least
        # ``size`` of them, ending with the recorded tail (a file deleted and written
        # again by another program, even into the same inode and to the same size,
        # does not; inode and timestamps cannot tell).
        if (
            state is not None
            and size >= state.size
            and (state.tail is None or _tail(fd, state.size) == state.tail)
        ):
            if size == state.size:
                return state, True
            if state.size == 0 or os.pread(fd, 1, state.size - 1) == b"\n":
                logger.warning(
                    "%s: removing %d bytes an interrupted append left past the acknowledged end",
                    path,
                    size - state.size,
                )
                os.ftruncate(fd, state.size)  # raises: appending after those bytes would
                os.fsync(fd)  # leave them inside the transcript
                return state, True
        # The state does not describe this transcript: adopt it with marks unknown.
        size = _repair_torn_tail(path, fd, size)
        if state is None and size == 0:
            return _State(), False  # a new key
        logger.warning(
            "%s: transcript does not match its walmirror state (changed outside FileStore);"
            " adopting it with no producer marks",
            path,
        )
        data = _read_range(fd, 0, size)
        adopted = _State(size, data.count(b"\n"), tail=_digest(data[-_TAIL:]))
        if fold and adopted.lines:
            raw_lines = data.split(b"\n")[:-1]
            parsed = [_parse_line(path, n, raw) for n, raw in enumerate(raw_lines, start=1)]
            adopted.summary = fold_session_summary(None, key, parsed)
            adopted.summary["mtime"] = os.fstat(fd).st_mtime_ns // 1_000_000
        return adopted, False

    def _store_state(self, key: SessionKey, state: _State) -> None:
        _fsync_dir(self._replace_state(key, state).parent)

    def _replace_state(self, key: SessionKey, state: _State) -> Path:
        """Write the key's state file atomically (tmp file, fsync, rename); return its
        path. The caller fsyncs the directory: until then a crash may undo the rename."""
        path = self._state_path(key)
        doc: dict[str, Any] = {"size": state.size, "lines": state.lines, "marks": state.marks}
        if state.tail is not None:
            doc["tail"] = state.tail
        if state.summary is not None:
            doc["summary"] = state.summary
        data = encode_entry(doc)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, self._file_mode)
        except FileNotFoundError:
            self._make_dirs(path.parent)
            fd = os.open(tmp, flags, self._file_mode)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @overload
    def _open_locked(
        self, key: SessionKey, path: Path, wait: _LockWait, *, create: Literal[True]
    ) -> int: ...

    @overload
    def _open_locked(
        self, key: SessionKey, path: Path, wait: _LockWait, *, create: bool
    ) -> int | None: ...

    def _open_locked(
        self, key: SessionKey, path: Path, wait: _LockWait, *, create: bool
    ) -> int | None:
        """Open ``path`` and hold an exclusive flock on it; ``None`` if it does not exist
        (or cannot: a name too long for the filesystem, when not creating).

        Loops until the locked descriptor is the file currently at ``path``: a
        delete while we waited for the lock must not swallow our writes.
        """
        while True:
            try:
                fd = os.open(path, _OPEN_FLAGS)
            except OSError as exc:
                if not create and _absent(exc):
                    return None
                if not isinstance(exc, FileNotFoundError):
                    raise
                self._make_dirs(path.parent)
                try:
                    fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, self._file_mode)
                except (FileExistsError, FileNotFoundError):
                    continue  # another writer created it, or a delete removed the directory
                _fsync_dir(path.parent)
            try:
                _flock(fd, wait, key)
                held = os.fstat(fd)
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
            except BaseException:
                os.close(fd)
                raise
            # Our descriptor pins its inode, so a file at ``path`` with the same
            # (device, inode) is this one: no other file can have been given it.
            if current is not None and (current.st_dev, current.st_ino) == (
                held.st_dev,
                held.st_ino,
            ):
                return fd
            os.close(fd)

    def _make_dirs(self, directory: Path) -> None:
        """``mkdir -p`` that fsyncs each parent so a new directory survives a crash."""
        missing: list[Path] = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for new_dir in reversed(missing):
            try:
                os.mkdir(new_dir, self._dir_mode)
            except FileExistsError:
                pass  # created concurrently
            _fsync_dir(new_dir.parent)

    def _write_all(self, fd: int, path: Path, data: bytes, size_before: int) -> None:
        """Write and fsync ``data``; on failure truncate back so nothing is half-written."""
        try:
            view = memoryview(data)
            while view:  # one write() in practice; loop only on a short write
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            _truncate(path, fd, size_before)
            raise


# ----------------------------------------------------------------------
# Helpers without state
# ----------------------------------------------------------------------


def _encode(key: SessionKey, entries: Any) -> list[bytes]:
    """Each entry's canonical JSON, or ``InvalidEntryError`` naming only index and type."""
    if not isinstance(entries, list):
        raise InvalidEntryError(f"{describe_key(key)}: entries must be a list")
    encoded: list[bytes] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InvalidEntryError(
                f"{describe_key(key)}: entry {i} is a {type(entry).__name__}, not a JSON object"
            )
        try:
            encoded.append(encode_entry(entry))
        except (TypeError, ValueError, RecursionError) as exc:
            # The message of a json/encoding error can quote content; keep only its type.
            raise InvalidEntryError(
                f"{describe_key(key)}: entry {i} is not JSON-serialisable ({type(exc).__name__})"
            ) from None
    return encoded


def _decode_lines(key: SessionKey, data: bytes, count: int) -> list[SessionStoreEntry]:
    """The entries of ``count`` lines of canonical JSON, parsed in one call (a batch's
    ``json.loads`` per entry costs five times as much)."""
    parsed = decode_array(b"[" + data[:-1].replace(b"\n", b",") + b"]")
    if len(parsed) != count or not all(isinstance(e, dict) for e in parsed):
        raise ValueError(f"{describe_key(key)}: an encoded entry is not one JSON object")
    return cast(list[SessionStoreEntry], parsed)


def _parse_line(path: Path, line_number: int, raw: bytes) -> SessionStoreEntry:
    try:
        entry = json.loads(raw)
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        raise CorruptTranscriptError(f"{path}: line {line_number} is not a JSON object")
    return cast(SessionStoreEntry, entry)


def _read_state(path: Path) -> _State | None:
    """The state file's content; ``None`` if absent or unreadable (then marks are unknown)."""
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        if _absent(exc):
            return None
        doc = None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        size, lines, marks, summary, tail = (
            doc.get(f) for f in ("size", "lines", "marks", "summary", "tail")
        )
        if (
            _is_count(size)
            and _is_count(lines)
            and isinstance(marks, dict)
            and all(isinstance(p, str) and _is_count(s) for p, s in marks.items())
            and (summary is None or _is_summary(summary))
            and (tail is None or isinstance(tail, str))
        ):
            return _State(size, lines, marks, summary, tail)
    logger.warning("%s: unreadable state file; marks unknown", path)
    return None


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_summary(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("session_id"), str)
        and isinstance(value.get("mtime"), int)
        and isinstance(value.get("data"), dict)
    )


def _list_summaries(state_dir: Path) -> list[SessionSummaryEntry]:
    try:
        names = os.listdir(state_dir)
    except NotADirectoryError:
        return []
    except OSError as exc:
        if _absent(exc):
            return []
        raise
    summaries: list[SessionSummaryEntry] = []
    for name in names:
        # Main keys' state files only: subkeys' are in directories, tmp files end in ".tmp".
        if name.endswith(_STATE):
            state = _read_state(state_dir / name)
            if state is not None and state.size and state.summary is not None:
                summaries.append(state.summary)
    return summaries


def _remove_leftover_tmp(state_path: Path) -> None:
    """Remove the tmp files a crash mid state write left beside ``state_path``."""
    try:
        names = os.listdir(state_path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return
    leftover = re.compile(re.escape(f".{state_path.name}.") + r"\d+\.[0-9a-f]{8}\.tmp")
    for name in names:
        if leftover.fullmatch(name):
            (state_path.parent / name).unlink(missing_ok=True)


def _remove_empty_dirs(top: Path) -> None:
    """``top`` and the directories under it that are empty; a subagent transcript
    appended meanwhile, or a tombstone, keeps its directory."""
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _flock(fd: int, wait: _LockWait, key: SessionKey) -> None:
    """Take an exclusive ``flock`` on ``fd``, polling so the wait is bounded by
    ``wait.timeout`` and ends as soon as ``wait.abandoned`` is set."""
    deadline = time.monotonic() + wait.timeout
    delay = _POLL_FIRST
    while True:
        if wait.abandoned.is_set():  # the caller is gone: do not start its work now
            raise _Abandoned
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise TranscriptLockTimeoutError(
                f"{describe_key(key)}: the transcript stayed locked by another process for"
                f" {wait.timeout:g} s (lock_timeout); nothing was written"
            )
        if wait.abandoned.wait(min(delay, left)):
            raise _Abandoned
        delay = min(delay * 1.5, _POLL_MAX)


def _translate(exc: OSError, what: str, root: Path) -> Exception:
    """The walmirror error for an ``OSError`` the filesystem raised, or ``exc`` itself.

    The message names the key (``what``) and the store's root, never content."""
    code = exc.errno
    if code == errno.ENAMETOOLONG:
        # The reason first: the key itself can be long enough to fill a truncated line.
        return KeyTooLongError(
            "session key too long for this filesystem (a file name under"
            f" {root} would exceed its name length limit; use a shorter session id or"
            f" subpath): {what}"
        )
    if code == errno.EROFS:
        return ReadOnlyFileSystemError(
            code, f"{what}: the FileStore root {root} is on a read-only filesystem"
        )
    if code in (errno.EACCES, errno.EPERM):
        return FileStorePermissionError(
            code, f"{what}: permission denied writing under the FileStore root {root}"
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        cause = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        return FileSystemFullError(
            code,
            f"{what}: no space left under the FileStore root {root} ({cause});"
            " nothing was acknowledged",
        )
    return exc


def _absent(exc: OSError) -> bool:
    """Whether ``exc`` means the file is not there: missing, or a name too long for the
    filesystem to hold (no such file can exist)."""
    return isinstance(exc, FileNotFoundError) or exc.errno == errno.ENAMETOOLONG


def _is_real_dir(path: Path) -> bool:
    """A directory, not a symlink to one; ``False`` for a name too long to exist."""
    try:
        return path.is_dir() and not path.is_symlink()
    except OSError as exc:
        if _absent(exc):
            return False
        raise


def _digest(data: bytes) -> str | None:
    return hashlib.blake2b(data, digest_size=16).hexdigest() if data else None


def _tail(fd: int, size: int) -> str | None:
    """The digest of the last ``_TAIL`` bytes before ``size`` (``None`` for size 0)."""
    start = max(0, size - _TAIL)
    return _digest(_read_range(fd, start, size))


def _release(path: Path, fd: int) -> None:
    """Unlock a transcript; an empty one is removed first (it only served as a lock)."""
    try:
        if os.fstat(fd).st_size == 0:
            path.unlink(missing_ok=True)  # still ours: we hold the lock
    finally:
        os.close(fd)


def _truncate(path: Path, fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:  # step 0 of the next call removes the bytes instead
        logger.exception("%s: could not roll back an unacknowledged append", path)


def _repair_torn_tail(path: Path, fd: int, size: int) -> int:
    """Truncate a last line without ``"\\n"`` (an interrupted write); return the new size."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        newline = _read_range(fd, start, end).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    os.ftruncate(fd, end)
    os.fsync(fd)
    logger.warning("%s: dropped a torn last line (%d bytes)", path, size - end)
    return end


def _read_range(fd: int, start: int, end: int) -> bytes:
    parts: list[bytes] = []
    while start < end:
        part = os.pread(fd, end - start, start)
        if not part:
            raise CorruptTranscriptError(f"file shrank while being read (fd {fd})")
        parts.append(part)
        start += len(part)
    return b"".join(parts)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
