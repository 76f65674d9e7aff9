"""``FileStore``: session transcripts as JSONL files, in the Claude CLI's own layout.

Storage layout under ``root``::

    {root}/
      {project_key}/
        {session_id}.jsonl                      main transcript
        {session_id}/
          subagents/agent-1.jsonl               subpath "subagents/agent-1"
        .walmirror/
          {session_id}.summary.json             summary sidecar (main keys only)

Every transcript line is one entry: ``json.dumps(entry, ensure_ascii=False,
separators=(",", ":"))`` followed by ``"\\n"``, exactly what the CLI writes, so
``root`` can serve as a ``projects`` directory for the CLI itself. Sidecars
live in the hidden ``.walmirror`` directory and do not end in ``.jsonl``, so
the CLI never mistakes them for transcripts. A sidecar holds the
``SessionSummaryEntry`` plus ``folded``: how many transcript entries it covers.

Retention: the SDK never deletes from a store, and ``FileStore`` deletes only
when ``delete()`` is called (a main key takes its subagent directory and its
sidecar with it; a subpath key removes that one file). Anything else (TTL,
compliance windows) is the operator's job: a cron ``find -mtime`` over
``root`` is enough, sidecars included.

Durability and concurrency (``root`` may be a volume shared between hosts):

* A batch is written with one ``write()`` on an ``O_APPEND`` descriptor, then
  ``fsync``; creating a file or directory also fsyncs its parent directory.
  An append that fails midway is truncated back before the error propagates.
* A crash mid-write can leave a torn last line (no trailing ``"\\n"``). Its
  append was never acknowledged; the next call that opens the file truncates
  it back to the last ``"\\n"``. A power loss can also keep complete lines of
  an unacknowledged batch; ``append_at`` retries see them as a matching
  overlap and append only the rest.
* Every operation on a file holds an exclusive ``flock`` on it (``flock`` is
  emulated with POSIX locks on NFS, so hosts serialise too) and an
  ``asyncio.Lock`` per file in the process, so waiting never ties up threads.
  After locking, the descriptor is checked against the path: a file deleted
  while we waited is reopened, never written to.
* All blocking I/O runs in ``asyncio.to_thread``.

Besides the SDK's ``SessionStore`` methods, ``FileStore`` implements the
offset interface of ``walmirror.backend`` (``append_at``, ``length``).
``length`` is O(1) when the file did not change: the line count is cached per
file by (device, inode, size), and only bytes another writer added are counted.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)

from walmirror.backend import check_append_at
from walmirror.errors import (
    InvalidEntryError,
    InvalidKeyError,
    OffsetConflictError,
    OffsetGapError,
    WalmirrorError,
)
from walmirror.keys import describe_key, validate_key

__all__ = ["SIDECAR_DIR", "CorruptTranscriptError", "FileStore"]

logger = logging.getLogger(__name__)

SIDECAR_DIR = ".walmirror"
"""Hidden per-project directory holding summary sidecars."""

_JSONL = ".jsonl"
_SUMMARY = ".summary.json"
_CHUNK = 1 << 20  # read size when scanning files
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC


class CorruptTranscriptError(WalmirrorError):
    """A complete line of a transcript file is not a JSON object.

    Torn last lines are repaired silently; this is damage in the middle of a
    file, which ``FileStore`` never writes. The file is left untouched.
    """


@dataclass(frozen=True, slots=True)
class _LineCount:
    """A file's line count, valid while the file keeps this identity and size."""

    dev: int
    ino: int
    size: int
    lines: int


class FileStore(SessionStore):
    """A ``SessionStore`` (and offset-aware backend) keeping JSONL files under ``root``.

    ``file_mode`` and ``dir_mode`` apply to files and directories this store
    creates (the process umask still applies). Transcripts hold conversation
    content, so the defaults are owner-only.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
    ) -> None:
        self._root = Path(os.path.abspath(root))
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._counts: dict[Path, _LineCount] = {}
        # One asyncio.Lock per file; dropped once nobody holds or awaits it.
        self._locks: weakref.WeakValueDictionary[Path, asyncio.Lock] = weakref.WeakValueDictionary()

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
        """Append ``entries`` at the key's current end (``append_at`` at ``length``)."""
        k = self._check_key(key)
        if not entries:
            return  # must not even create the file
        path = self._transcript_path(k)
        async with self._lock(path):
            await asyncio.to_thread(self._write_batch, k, path, None, entries)

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """All entries of ``key`` in order, or ``None`` if it holds none."""
        k = self._check_key(key)
        path = self._transcript_path(k)
        async with self._lock(path):
            return await asyncio.to_thread(self._load_sync, path)

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """Main transcripts directly under the project directory; ``mtime`` in epoch ms."""
        project_dir = self._project_dir(project_key)
        return await asyncio.to_thread(self._list_sessions_sync, project_key, project_dir)

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """The stored summary sidecars of the project's sessions."""
        project_dir = self._project_dir(project_key)
        return await asyncio.to_thread(self._list_summaries_sync, project_dir / SIDECAR_DIR)

    async def delete(self, key: SessionKey) -> None:
        """Delete a transcript; a main key also takes its subagent files and sidecar."""
        k = self._check_key(key)
        path = self._transcript_path(k)
        async with self._lock(path):
            if "subpath" in k:
                await asyncio.to_thread(self._unlink_locked, path)
            else:
                await asyncio.to_thread(self._delete_session_sync, k, path)

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """Subpaths of the session's subagent transcripts, sorted."""
        k = self._check_key(key)  # a stray subpath is validated, then ignored
        session_dir = self._project_dir(k["project_key"]) / k["session_id"]
        return await asyncio.to_thread(self._list_subkeys_sync, k, session_dir)

    # ------------------------------------------------------------------
    # Offset interface (walmirror.backend.OffsetStore)
    # ------------------------------------------------------------------

    async def append_at(
        self,
        key: SessionKey,
        offset: int,
        entries: list[SessionStoreEntry],
        *,
        encoded: Sequence[bytes] | None = None,
    ) -> int:
        """Store ``entries`` at ``offset``; see ``walmirror.backend``. Returns the new length.

        ``encoded``: each entry's JSON as the queue holds it (this store's own
        line format), written as is instead of serialising ``entries`` again.
        """
        k = self._check_key(key)
        check_append_at(k, offset, entries, encoded)
        lines = None if encoded is None else [b + b"\n" for b in encoded]
        path = self._transcript_path(k)
        async with self._lock(path):
            return await asyncio.to_thread(self._write_batch, k, path, offset, entries, lines)

    async def length(self, key: SessionKey) -> int:
        """How many entries ``key`` holds (0 if never written or deleted)."""
        k = self._check_key(key)
        path = self._transcript_path(k)
        async with self._lock(path):
            return await asyncio.to_thread(self._length_sync, path)

    # ------------------------------------------------------------------
    # Keys and paths
    # ------------------------------------------------------------------

    def _check_key(self, key: Any) -> SessionKey:
        """``validate_key`` plus the names this layout cannot store unambiguously."""
        k = validate_key(key)
        session_id = k["session_id"]
        if session_id == SIDECAR_DIR:
            raise InvalidKeyError(f"session_id {SIDECAR_DIR!r} is reserved by FileStore")
        # "s.jsonl" would use directory "s.jsonl/", which is session "s"'s transcript.
        if session_id.endswith(_JSONL):
            raise InvalidKeyError(f"session_id must not end with {_JSONL!r} in FileStore")
        subpath = k.get("subpath")
        if subpath is not None and any(p.endswith(_JSONL) for p in subpath.split("/")[:-1]):
            raise InvalidKeyError(f"subpath directories must not end with {_JSONL!r} in FileStore")
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

    def _sidecar_path(self, key: SessionKey) -> Path:
        path = self._root / key["project_key"] / SIDECAR_DIR / (key["session_id"] + _SUMMARY)
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
    # Blocking work (always called through asyncio.to_thread)
    # ------------------------------------------------------------------

    def _write_batch(
        self,
        key: SessionKey,
        path: Path,
        offset: int | None,
        entries: list[SessionStoreEntry],
        lines: list[bytes] | None = None,
    ) -> int:
        """Append ``entries`` at ``offset`` (``None``: at the end); return the new length.
        ``lines``: the entries already serialised, one line each."""
        if lines is None:
            lines = _serialise(key, entries)  # raises before anything is touched
        create = bool(lines) and offset in (None, 0)
        fd = self._open_locked(path, create=create)
        if fd is None:  # nothing stored and nothing to create
            if offset:
                raise OffsetGapError(describe_key(key), offset, 0)
            return 0
        try:
            before = self._count(fd, path)
            start = before.lines if offset is None else offset
            if start > before.lines:
                raise OffsetGapError(describe_key(key), start, before.lines)
            overlap = min(before.lines - start, len(lines))
            if overlap:
                stored = _tail_lines(path, fd, before.size, before.lines - start)[:overlap]
                _check_overlap(key, start, before.lines, stored, lines[:overlap])
            new_entries = entries[overlap:]
            data = b"".join(lines[overlap:])
            if data:
                self._write_all(fd, path, data, before.size)
                self._counts[path] = _LineCount(
                    before.dev, before.ino, before.size + len(data), before.lines + len(new_entries)
                )
            if "subpath" not in key:
                self._update_summary_safely(key, fd, path, before, new_entries)
            return before.lines + len(new_entries)
        finally:
            os.close(fd)  # releases the flock

    def _length_sync(self, path: Path) -> int:
        fd = self._open_locked(path, create=False)
        if fd is None:
            return 0
        try:
            return self._count(fd, path).lines
        finally:
            os.close(fd)

    def _load_sync(self, path: Path) -> list[SessionStoreEntry] | None:
        fd = self._open_locked(path, create=False)
        if fd is None:
            return None
        try:
            state = self._count(fd, path)
            raw_lines = _read_range(fd, 0, state.size).split(b"\n")[:-1]
        finally:
            os.close(fd)
        if not raw_lines:
            return None  # created but no append ever completed
        return [_parse_line(path, n, raw) for n, raw in enumerate(raw_lines, start=1)]

    def _list_sessions_sync(
        self, project_key: str, project_dir: Path
    ) -> list[SessionStoreListEntry]:
        try:
            scan = list(os.scandir(project_dir))
        except (FileNotFoundError, NotADirectoryError):
            return []
        sessions: list[SessionStoreListEntry] = []
        for item in scan:
            if not item.name.endswith(_JSONL) or not item.is_file(follow_symlinks=False):
                continue
            session_id = item.name[: -len(_JSONL)]
            try:
                self._check_key({"project_key": project_key, "session_id": session_id})
                st = item.stat(follow_symlinks=False)
            except (InvalidKeyError, FileNotFoundError):
                continue  # not a name we could load, or deleted while scanning
            if st.st_size == 0:
                continue  # created, but no append ever completed
            sessions.append({"session_id": session_id, "mtime": st.st_mtime_ns // 1_000_000})
        return sessions

    def _list_summaries_sync(self, sidecar_dir: Path) -> list[SessionSummaryEntry]:
        try:
            names = os.listdir(sidecar_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        summaries: list[SessionSummaryEntry] = []
        for name in names:
            if name.endswith(_SUMMARY):  # not the .tmp files of a write in progress
                summary, _ = _read_sidecar(sidecar_dir / name)
                if summary is not None:
                    summaries.append(summary)
        return summaries

    def _list_subkeys_sync(self, key: SessionKey, session_dir: Path) -> list[str]:
        subkeys: list[str] = []
        for dirpath, _dirs, files in os.walk(session_dir):
            for name in files:
                if not name.endswith(_JSONL):
                    continue
                file = Path(dirpath, name)
                subpath = "/".join(file.relative_to(session_dir).parts)[: -len(_JSONL)]
                try:
                    self._check_key({**key, "subpath": subpath})
                    if file.stat().st_size == 0:
                        continue  # created, but no append ever completed
                except (InvalidKeyError, FileNotFoundError):
                    continue
                subkeys.append(subpath)
        return sorted(subkeys)

    def _delete_session_sync(self, key: SessionKey, path: Path) -> None:
        project_dir = path.parent
        fd = self._open_locked(path, create=False)
        try:
            # Sidecar first: a crash midway leaves a transcript without a sidecar,
            # which the next append rebuilds, never a summary of a deleted session.
            self._remove_sidecar(key)
            if fd is not None:
                os.unlink(path)
                self._counts.pop(path, None)
        finally:
            if fd is not None:
                os.close(fd)
        session_dir = project_dir / key["session_id"]
        if session_dir.is_dir() and not session_dir.is_symlink():
            # Lock each subagent file before unlinking it so writers in flight
            # finish first, and writers waiting notice the file is gone.
            for dirpath, _dirs, files in os.walk(session_dir):
                for name in files:
                    if name.endswith(_JSONL):
                        self._unlink_locked(Path(dirpath, name))
            shutil.rmtree(session_dir, ignore_errors=True)
        if project_dir.is_dir():
            _fsync_dir(project_dir)

    def _unlink_locked(self, path: Path) -> None:
        fd = self._open_locked(path, create=False)
        if fd is None:
            return
        try:
            os.unlink(path)
            self._counts.pop(path, None)
            _fsync_dir(path.parent)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------

    def _open_locked(self, path: Path, *, create: bool) -> int | None:
        """Open ``path`` and hold an exclusive flock on it; ``None`` if it does not exist.

        Loops until the locked descriptor is the file currently at ``path``: a
        delete while we waited for the lock must not swallow our writes.
        """
        while True:
            try:
                fd = os.open(path, _OPEN_FLAGS)
            except FileNotFoundError:
                if not create:
                    return None
                self._make_dirs(path.parent)
                try:
                    fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, self._file_mode)
                except (FileExistsError, FileNotFoundError):
                    continue  # another writer created it, or a delete removed the directory
                _fsync_dir(path.parent)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = os.fstat(fd)
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
            except BaseException:
                os.close(fd)
                raise
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

    def _count(self, fd: int, path: Path) -> _LineCount:
        """Repair a torn tail, then count lines, reusing the cache when it still applies."""
        st = os.fstat(fd)
        size = _repair_torn_tail(path, fd, st.st_size)
        cached = self._counts.get(path)
        if (
            cached is not None
            and (cached.dev, cached.ino) == (st.st_dev, st.st_ino)
            and cached.size <= size
        ):
            lines = cached.lines + _count_newlines(fd, cached.size, size)
        else:  # unknown, replaced or shrunk: count from scratch
            lines = _count_newlines(fd, 0, size)
        state = _LineCount(st.st_dev, st.st_ino, size, lines)
        self._counts[path] = state
        return state

    def _write_all(self, fd: int, path: Path, data: bytes, size_before: int) -> None:
        """Write and fsync ``data``; on failure truncate back so nothing is half-written."""
        try:
            view = memoryview(data)
            while view:  # one write() in practice; loop only on a short write
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            self._counts.pop(path, None)
            try:
                os.ftruncate(fd, size_before)
                os.fsync(fd)
            except OSError:
                logger.exception("%s: could not roll back a failed append", path)
            raise

    # ------------------------------------------------------------------
    # Summary sidecars
    # ------------------------------------------------------------------

    def _update_summary_safely(
        self,
        key: SessionKey,
        fd: int,
        path: Path,
        before: _LineCount,
        new_entries: list[SessionStoreEntry],
    ) -> None:
        """``_update_summary``, but a failure is logged, not raised.

        The entries are durable by now; raising would make the SDK retry a plain
        ``append`` and duplicate them. The sidecar heals itself on the next
        append, and meanwhile its older ``mtime`` tells the SDK it is stale.
        Runs on pure repeats too: that is when a sidecar left behind by a crash
        after the transcript write gets caught up.
        """
        try:
            self._update_summary(key, fd, path, before, new_entries)
        except (OSError, WalmirrorError):
            logger.warning("%s: could not update the summary sidecar", path, exc_info=True)

    def _update_summary(
        self,
        key: SessionKey,
        fd: int,
        path: Path,
        before: _LineCount,
        new_entries: list[SessionStoreEntry],
    ) -> None:
        """Fold every entry into the sidecar exactly once. Called under the transcript's lock."""
        sidecar = self._sidecar_path(key)
        summary, folded = _read_sidecar(sidecar)
        if folded > before.lines:  # sidecar of an earlier file at this path
            summary, folded = None, 0
        missing = before.lines - folded
        if not missing and not new_entries:
            return
        backlog: list[SessionStoreEntry] = []
        if missing:  # a crash hit between a transcript write and its sidecar write
            logger.warning("%s: summary sidecar is %d entries behind; catching up", path, missing)
            raw = _tail_lines(path, fd, before.size, missing)
            backlog = [_parse_line(path, folded + i + 1, line) for i, line in enumerate(raw)]
        summary = fold_session_summary(summary, key, backlog + new_entries)
        # Same clock as list_sessions(): the transcript's own mtime after the write.
        summary["mtime"] = os.fstat(fd).st_mtime_ns // 1_000_000
        self._write_sidecar(sidecar, summary, before.lines + len(new_entries))

    def _write_sidecar(self, sidecar: Path, summary: SessionSummaryEntry, folded: int) -> None:
        """Replace the sidecar atomically: tmp file, rename.

        No fsync: a sidecar is derived data. One lost or torn by a power cut is
        unreadable or behind the transcript, and the next append rebuilds or
        catches it up from the transcript (``_update_summary``), so paying two
        more fsyncs per append would buy nothing.
        """
        self._make_dirs(sidecar.parent)
        data = _dumps({**summary, "folded": folded})
        tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self._file_mode)
        try:
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, sidecar)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _remove_sidecar(self, key: SessionKey) -> None:
        sidecar = self._sidecar_path(key)
        try:
            names = os.listdir(sidecar.parent)
        except (FileNotFoundError, NotADirectoryError):
            return
        leftover = re.compile(re.escape(f".{sidecar.name}.") + r"\d+\.[0-9a-f]{8}\.tmp")
        for name in names:  # the sidecar, and tmp files a crash left behind
            if name == sidecar.name or leftover.fullmatch(name):
                (sidecar.parent / name).unlink(missing_ok=True)
        _fsync_dir(sidecar.parent)


# ----------------------------------------------------------------------
# Helpers without state
# ----------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _serialise(key: SessionKey, entries: list[SessionStoreEntry]) -> list[bytes]:
    """One JSONL line per entry, or ``InvalidEntryError`` naming only index and type."""
    if not isinstance(entries, list):
        raise InvalidEntryError(f"{describe_key(key)}: entries must be a list")
    lines: list[bytes] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InvalidEntryError(
                f"{describe_key(key)}: entry {i} is a {type(entry).__name__}, not a JSON object"
            )
        try:
            lines.append(_dumps(entry) + b"\n")
        except (TypeError, ValueError, RecursionError) as exc:
            # The message of a json/encoding error can quote content; keep only its type.
            raise InvalidEntryError(
                f"{describe_key(key)}: entry {i} is not JSON-serialisable ({type(exc).__name__})"
            ) from None
    return lines


def _check_overlap(
    key: SessionKey, offset: int, length: int, stored: list[bytes], incoming: list[bytes]
) -> None:
    """Raise ``OffsetConflictError`` unless the repeated entries equal the stored ones."""
    for old, new in zip(stored, incoming, strict=True):
        # Bytes differ when another writer serialised differently (key order):
        # the contract is deep equality of the parsed JSON.
        if old + b"\n" != new and json.loads(old) != json.loads(new):
            raise OffsetConflictError(describe_key(key), offset, length)


def _parse_line(path: Path, line_number: int, raw: bytes) -> SessionStoreEntry:
    try:
        entry = json.loads(raw)
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        raise CorruptTranscriptError(f"{path}: line {line_number} is not a JSON object")
    return cast(SessionStoreEntry, entry)


def _read_sidecar(sidecar: Path) -> tuple[SessionSummaryEntry | None, int]:
    """The stored summary (without ``folded``) and ``folded``; ``(None, 0)`` if absent or bad."""
    try:
        doc = json.loads(sidecar.read_bytes())
    except FileNotFoundError:
        return None, 0
    except ValueError:
        doc = None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("folded"), int)
        or not isinstance(doc.get("session_id"), str)
        or not isinstance(doc.get("mtime"), int)
        or not isinstance(doc.get("data"), dict)
    ):
        logger.warning("%s: unreadable summary sidecar; it will be rebuilt", sidecar)
        return None, 0
    summary: SessionSummaryEntry = {
        "session_id": doc["session_id"],
        "mtime": doc["mtime"],
        "data": doc["data"],
    }
    return summary, doc["folded"]


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


def _count_newlines(fd: int, start: int, end: int) -> int:
    count = 0
    while start < end:
        stop = min(end, start + _CHUNK)
        count += _read_range(fd, start, stop).count(b"\n")
        start = stop
    return count


def _tail_lines(path: Path, fd: int, end: int, count: int) -> list[bytes]:
    """The last ``count`` lines (without ``"\\n"``) of the bytes before ``end``."""
    if count <= 0:
        return []
    chunks: list[bytes] = []
    newlines = 0
    pos = end
    # count + 1 newlines pin down where the first wanted line starts.
    while pos > 0 and newlines <= count:
        start = max(0, pos - _CHUNK)
        chunk = _read_range(fd, start, pos)
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
        pos = start
    lines = b"".join(reversed(chunks)).split(b"\n")[:-1]
    if len(lines) < count:
        raise CorruptTranscriptError(f"{path}: expected {count} lines, found {len(lines)}")
    return lines[len(lines) - count :]


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
