"""``DurableSessionStore``: the SessionStore the agent talks to.

``append`` commits entries to the local write-ahead queue and returns; the
flushers (one per backend) deliver them. Reads merge what the first backend
holds with what is still queued, so a caller always reads its own writes.
``delete`` drops queued entries and leaves a tombstone that reaches each
backend before anything appended later. See ``docs/architecture.md`` for how
each point of the contract maps to code and tests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)

from . import telemetry
from .config import Tuning
from .errors import (
    BackendUnavailableError,
    FlushBlockedError,
    FlushTimeoutError,
    InvalidEntryError,
    QueueClosedError,
    QueueFullError,
    WalmirrorError,
)
from .flusher import Flusher, SessionLocks, describe_error
from .keys import describe_key, validate_key, validate_project_key
from .ledger import Row
from .loop_thread import (
    LoopThread,
    call_from_asyncio,
    call_from_trio,
    current_library,
    unsupported,
)
from .protocol import (
    HINT_PARSE,
    decode_entry,
    encode_checked,
    held_uuid,
    implements,
    is_producer_store,
    summary_hint,
    uuids_of,
)
from .queue import WriteAheadQueue

logger = logging.getLogger("walmirror")


@dataclass
class CloseReport:
    """What ``close()`` could not deliver. ``drained`` is True when nothing remains."""

    drained: bool
    pending_entries: dict[str, int] = field(default_factory=dict)
    parked_keys: dict[str, int] = field(default_factory=dict)


def default_cursor_name(index: int, backend: SessionStore) -> str:
    """The queue's name for a backend's cursor. It must outlive the process: a
    backend may say who it is (``cursor_name``, e.g. "file:///mnt/transcripts");
    else its place in the list and its class."""
    name = getattr(backend, "cursor_name", None)
    return name if isinstance(name, str) and name else f"{index}:{type(backend).__name__}"


def serialize_entries(entries: Any, max_entry_bytes: int, hinted: bool = True) -> list[Row]:
    """Validate and encode a batch: (uuid, JSON bytes, summary hint) per entry, or raise
    before storing any. ``hinted``: compute the hints (a main key's; a subkey's are 0)."""
    if not isinstance(entries, list | tuple):
        raise InvalidEntryError(f"entries must be a list, got {type(entries).__name__}")
    rows: list[Row] = []
    for index, entry in enumerate(entries):
        try:
            body, plain = encode_checked(index, entry)
        except InvalidEntryError as exc:
            raise InvalidEntryError(f"{exc}; nothing of the batch was stored") from None
        if len(body) > max_entry_bytes:
            raise InvalidEntryError(
                f"entry {index} of the batch is {len(body)} bytes, over the limit of "
                f"{max_entry_bytes} (max_entry_bytes); nothing of the batch was stored"
            )
        uuid = entry.get("uuid")
        if isinstance(uuid, str) and type(uuid) is not str:
            uuid = str.__str__(uuid)  # a str subclass: its text, as JSON holds it
        hint = 0 if not hinted else summary_hint(entry) if plain else HINT_PARSE
        rows.append((uuid if isinstance(uuid, str) and uuid else None, body, hint))
    return rows


async def close_backends(backends: Sequence[SessionStore]) -> None:
    """Close backends' clients (``aclose()``, else ``close()``); best effort: a failure
    is logged (its type only), never raised."""
    for backend in backends:
        close = getattr(backend, "aclose", None) or getattr(backend, "close", None)
        if not callable(close):
            continue
        try:
            result = close()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                await result
        except Exception as exc:
            logger.debug("closing %s: %s", type(backend).__name__, describe_error(exc))


Method = TypeVar("Method", bound=Callable[..., Coroutine[Any, Any, Any]])


def _on_engine_loop(method: Method) -> Method:
    """A public coroutine method of the store. Under asyncio it runs on the caller's
    loop; under trio (or from another asyncio loop once the store runs on its own),
    on the store's own loop thread (``walmirror.loop_thread``)."""

    @functools.wraps(method)
    async def call(self: DurableSessionStore, *args: Any, **kwargs: Any) -> Any:
        library = current_library()
        thread = self._loop_thread
        if thread is None:
            if library == "asyncio":
                return await method(self, *args, **kwargs)
            if library != "trio":
                raise unsupported(library)
            thread = self._loop_thread = LoopThread(f"walmirror-engine-{id(self):x}")
        elif thread.is_current():
            return await method(self, *args, **kwargs)
        elif self._closed:  # its loop has ended
            if method.__name__ == "close":
                return CloseReport(drained=True)
            raise QueueClosedError("this DurableSessionStore was closed")
        coro = method(self, *args, **kwargs)
        try:
            if library == "trio":
                return await call_from_trio(thread, coro)
            if library == "asyncio":
                return await call_from_asyncio(thread, coro)
            coro.close()
            raise unsupported(library)
        finally:
            if method.__name__ == "close" and self._closed:
                thread.stop()  # nothing more runs there

    return cast(Method, call)


class DurableSessionStore(SessionStore):
    """A ``SessionStore`` that never loses or duplicates an acknowledged entry.

    ``backends``: one ``SessionStore`` or a list of them (fan-out, one cursor
    each; the first answers reads). ``wal_path``: the local queue file, one
    per process. ``tuning``: the fields of :class:`walmirror.config.Tuning`.

    The flushers start on first use (so the store can go straight into
    ``ClaudeAgentOptions(session_store=...)``) or on ``async with``.
    """

    def __init__(
        self,
        backends: SessionStore | Sequence[SessionStore],
        wal_path: str | os.PathLike[str],
        **tuning: Any,
    ) -> None:
        self.tuning = Tuning(**tuning)
        self.backends: list[SessionStore] = (
            list(backends) if isinstance(backends, list | tuple) else [backends]  # type: ignore[list-item]
        )
        if not self.backends:
            raise ValueError("DurableSessionStore needs at least one backend")
        for backend in self.backends:
            if not (
                callable(getattr(backend, "append", None))
                and callable(getattr(backend, "load", None))
            ):
                raise TypeError(
                    f"{type(backend).__name__} is not a SessionStore (needs append and load)"
                )
        names = self.tuning.backend_names or tuple(
            default_cursor_name(i, b) for i, b in enumerate(self.backends)
        )
        if len(names) != len(self.backends) or len(set(names)) != len(names):
            raise ValueError("backend_names must name every backend once")
        self.backend_names: tuple[str, ...] = tuple(names)
        self.queue = WriteAheadQueue(
            wal_path,
            synchronous=self.tuning.synchronous,
            max_bytes=self.tuning.max_queue_bytes,
        )
        self.flushers: list[Flusher] = []
        self._locks = SessionLocks()
        self._progress = asyncio.Event()
        self._start_lock: asyncio.Lock | None = None
        self._started = False
        self._closed = False
        self._gauges: telemetry.GaugeSource | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Under trio: the asyncio loop (on a thread of its own) the engine runs on.
        self._loop_thread: LoopThread | None = None
        # Appends past their checks and not yet committed: close() waits for them.
        self._appending = 0
        self._appends_done = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------

    @_on_engine_loop
    async def start(self) -> None:
        """Open the queue and start the flushers; what a previous process left drains now."""
        if self._closed:
            raise QueueClosedError("this DurableSessionStore was closed")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            await self.queue.open(self.backend_names)
            self.flushers = [
                Flusher(name, backend, self.queue, self.tuning, self._locks, self._progress.set)
                for name, backend in zip(self.backend_names, self.backends, strict=True)
            ]
            self.queue.on_commit = self._wake_flushers
            for flusher in self.flushers:
                flusher.start()
            flushers = self.flushers
            # The telemetry module holds sources weakly: this reference keeps ours alive.
            self._gauges = telemetry.GaugeSource(lambda: {f.name: f.gauges for f in flushers})
            self._loop = asyncio.get_running_loop()
            self._started = True

    async def _ensure_started(self) -> None:
        if self._closed:
            raise QueueClosedError("this DurableSessionStore was closed")
        if not self._started:
            await self.start()
        elif asyncio.get_running_loop() is not self._loop:
            raise WalmirrorError(
                "this DurableSessionStore runs its flushers on the event loop that started "
                "it; use one store per event loop (close() it before that loop ends)"
            )

    def _wake_flushers(self) -> None:
        for flusher in self.flushers:
            flusher.wake()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @_on_engine_loop
    async def flush(self, timeout: float | None = None) -> None:
        """Barrier: return once every backend acknowledged everything appended (and
        every delete made) before this call. Raises ``FlushTimeoutError`` when
        ``timeout`` passes first, ``FlushBlockedError`` when parked keys stand in the way.
        """
        await self._ensure_started()
        await self._flush(timeout)

    async def _flush(
        self,
        timeout: float | None,
        flushers: list[Flusher] | None = None,
        project_key: str | None = None,
        give_up_on_failure: bool = False,
    ) -> None:
        flushers = self.flushers if flushers is None else flushers
        deadline = None if timeout is None else time.monotonic() + timeout
        targets = {f.name: await self.queue.unacked_targets(f.name, project_key) for f in flushers}
        tombstone_marks = {
            f.name: max((t.id for t in await self.queue.tombstones(f.name)), default=0)
            for f in flushers
        }
        self._wake_flushers()
        while True:
            short_total, parked, deletes, parked_deletes = 0, 0, 0, 0
            for flusher in flushers:
                short, parked_ids = await self.queue.unmet(flusher.name, targets[flusher.name])
                targets[flusher.name] = short
                short_total += len(short)
                parked += len(parked_ids)
                mark = tombstone_marks[flusher.name]
                waiting = [t for t in await self.queue.tombstones(flusher.name) if t.id <= mark]
                deletes += len(waiting)
                parked_deletes += sum(1 for t in waiting if t.parked is not None)
            if short_total == 0 and deletes == 0:
                return
            if short_total == parked and deletes == parked_deletes:
                raise FlushBlockedError(
                    f"{parked} key(s) and {parked_deletes} delete(s) are parked after a "
                    "permanent backend error; see status() and requeue()"
                )
            failing = give_up_on_failure and any(f.troubled for f in flushers)
            if failing or (deadline is not None and time.monotonic() >= deadline):
                raise FlushTimeoutError(
                    f"flush timed out with {short_total} key(s) and {deletes} delete(s) "
                    "not yet acknowledged"
                )
            self._progress.clear()
            wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(self._progress.wait(), wait)
            except TimeoutError:
                pass

    async def _settle(self, project_key: str) -> None:
        """Before listing: give the reading backend a moment to take this project's
        queued entries, so listings come from one consistent source. Skipped while
        that backend is failing; whatever is still queued is merged in anyway."""
        reader = self.flushers[0]
        if reader.troubled:
            return
        try:
            await self._flush(
                self.tuning.call_timeout, [reader], project_key, give_up_on_failure=True
            )
        except (FlushTimeoutError, FlushBlockedError):
            pass

    @_on_engine_loop
    async def close(
        self, timeout: float | None = 30.0, *, close_backends: bool = False
    ) -> CloseReport:
        """Stop accepting appends, drain for up to ``timeout`` seconds, stop, and
        report what remains queued (it drains on the next start).

        ``close_backends``: also close the backends' clients (their ``aclose()`` or
        ``close()``). Under trio pass it: the clients live on the store's own loop,
        which ends here."""
        if self._closed:
            return CloseReport(drained=True)
        if not self._started:
            self._closed = True
            if close_backends:
                await self._close_backends()
            return CloseReport(drained=True)
        self._closed = True  # no new append gets in; those already in finish first
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._appending:
            self._appends_done.clear()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._appends_done.wait(), left)
            except TimeoutError:
                break  # still waiting for room; the report counts what is queued
        try:
            await self._flush(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except (FlushTimeoutError, FlushBlockedError) as exc:
            logger.warning("close: %s", exc)
        for flusher in self.flushers:
            await flusher.stop()
        report = CloseReport(drained=True)
        for flusher in self.flushers:
            stats = await self.queue.stats(flusher.name)
            report.pending_entries[flusher.name] = stats.pending_entries
            report.parked_keys[flusher.name] = len(stats.parked)
            if stats.pending_entries or stats.pending_deletes:
                report.drained = False
        if self._appending:  # still waiting for room: it may yet be committed
            report.drained = False
        await self.queue.close()
        if close_backends:
            await self._close_backends()
        return report

    async def _close_backends(self) -> None:
        await close_backends(self.backends)

    # -- SessionStore: writes ----------------------------------------------------------

    @_on_engine_loop
    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Commit ``entries`` to the local queue (on disk when this returns).

        Entries whose ``uuid`` the key already holds are skipped. Never waits on
        a backend; may wait (``full_policy="wait"``) when the queue is at its cap.
        """
        key = validate_key(key)
        rows = serialize_entries(entries, self.tuning.max_entry_bytes, not key.get("subpath"))
        if not rows:
            return
        await self._ensure_started()
        started = time.perf_counter()
        self._appending += 1  # no await since _ensure_started: close() cannot slip between
        try:
            with telemetry.span("walmirror.append") as span:
                if span.is_recording():  # no digest work when nobody records
                    span.set_attributes(
                        {
                            telemetry.KEY_DIGEST: telemetry.key_digest(key),
                            telemetry.ENTRIES: len(rows),
                            telemetry.BYTES: sum(len(row[1]) for row in rows),
                        }
                    )
                try:
                    accepted = await self._append_with_room(key, rows)
                except Exception as exc:
                    outcome = "full" if isinstance(exc, QueueFullError) else "error"
                    telemetry.set_error(span, exc, outcome)
                    raise
                span.set_attributes(
                    {telemetry.OUTCOME: "ok", "walmirror.entries.accepted": accepted}
                )
        finally:
            self._appending -= 1
            if not self._appending:
                self._appends_done.set()
        telemetry.append_duration.record(time.perf_counter() - started)
        telemetry.entries_appended.add(accepted)

    async def _append_with_room(self, key: SessionKey, rows: list[Row]) -> int:
        """Commit ``rows``. When the queue is at its cap or its disk is full: make room
        (acknowledged entries go now, retention or not) and, under
        ``full_policy="wait"``, wait up to ``full_timeout`` for the backends to take some."""
        nbytes = sum(len(row[1]) for row in rows)
        deadline = time.monotonic() + self.tuning.full_timeout
        while True:
            if self.queue.would_overflow(nbytes):
                full = QueueFullError(
                    f"queue {self.queue.path} is full ({self.queue.stored_bytes} of "
                    f"{self.tuning.max_queue_bytes} bytes held, backends behind); "
                    "the batch was not stored"
                )
            else:
                try:
                    return await self.queue.append(key, rows)
                except QueueFullError as exc:  # the disk is full, not the cap
                    full = exc
            if await self.queue.compact(0.0, self.tuning.forget_after, for_append=True):
                continue  # room was made: try again at once
            if self.tuning.full_policy == "raise" or time.monotonic() >= deadline:
                raise full
            await asyncio.sleep(0.05)

    @_on_engine_loop
    async def delete(self, key: SessionKey) -> None:
        """Delete a key everywhere. Queued entries go at once; each backend gets the
        delete before anything appended later (a main key takes its subkeys with it).
        Returns once every healthy backend applied it (at most ``call_timeout``)."""
        key = validate_key(key)
        await self._ensure_started()
        async with self._locks(key):
            await self.queue.delete(key)
        self._wake_flushers()
        await self._settle_deletes(self.tuning.call_timeout)

    async def _settle_deletes(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until every healthy backend applied the deletes
        made so far. Then an append another host makes after ``delete`` returned
        lands after the delete in the backend too (contract 5). A backend that is
        failing, or a delete that failed on its own and waits for its retry, is not
        waited for: it stays queued and goes first when it can."""
        deadline = time.monotonic() + timeout
        marks = {
            f.name: max((t.id for t in await self.queue.tombstones(f.name)), default=0)
            for f in self.flushers
        }
        while time.monotonic() < deadline:
            waiting = [
                f
                for f in self.flushers
                if not f.consecutive_failures
                and any(
                    t.id <= marks[f.name] and t.parked is None and not f.cooling(t)
                    for t in await self.queue.tombstones(f.name)
                )
            ]
            if not waiting:
                return
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), 0.05)
            except TimeoutError:
                pass

    @_on_engine_loop
    async def requeue(self, key: SessionKey | None = None, backend: str | None = None) -> int:
        """Un-park keys and deletes (all, or one key's / one backend's); return how many."""
        await self._ensure_started()
        count = await self.queue.requeue(backend, None if key is None else validate_key(key))
        self._wake_flushers()
        return count

    # -- SessionStore: reads -----------------------------------------------------------

    @property
    def _reader(self) -> tuple[str, SessionStore]:
        return self.backend_names[0], self.backends[0]

    async def _read_backend(self, op: str, call: Any) -> Any:
        name, _ = self._reader
        try:
            async with asyncio.timeout(self.tuning.call_timeout):
                return await call
        except Exception as exc:
            raise BackendUnavailableError(
                f"{op}: backend {name} failed ({describe_error(exc)})"
            ) from exc

    @_on_engine_loop
    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """The key's transcript: the first backend's entries, then those still queued.

        A queued entry shows once: the backend's mark for this queue (the protocol)
        says which of them it holds, whatever other hosts appended meanwhile.
        """
        key = validate_key(key)
        await self._ensure_started()
        name, backend = self._reader
        async with self._locks(key):  # no delivery of this session moves under us
            view = await self.queue.local_view(key, name)
            mark: int | None = None
            if await self.queue.is_tombstoned(name, key):
                remote: list[SessionStoreEntry] | None = None  # its backend copy is deleted
            else:
                try:
                    if view is not None and is_producer_store(backend):
                        # Mark first: a write landing between the two calls is then
                        # shown twice (local, and the backend), never hidden.
                        mark = await self._read_backend(
                            "producer_mark",
                            backend.producer_mark(key, self.queue.producer_id),  # type: ignore[attr-defined]
                        )
                    remote = await self._read_backend("load", backend.load(key))
                except BackendUnavailableError:
                    # Look again: compaction may have run while the backend was failing.
                    view = await self.queue.local_view(key, name)
                    if view is not None and view.complete:
                        bodies = await self.queue.read_whole(view.key_id, view.cursor.first_seq)
                        if (
                            bodies is not None
                            and len(bodies) >= view.next_seq - view.cursor.first_seq
                        ):
                            return [decode_entry(body) for body in bodies]
                    raise BackendUnavailableError(
                        f"cannot load {describe_key(key)}: backend {name} is unreachable and "
                        "the local queue does not hold the key's complete history"
                    ) from None
            if view is None or view.next_seq == view.cursor.first_seq:
                return remote
            if is_producer_store(backend):
                first_unstored = view.cursor.first_seq if mark is None else mark + 1
                first_unstored = max(first_unstored, view.cursor.first_seq)
            else:
                first_unstored = view.cursor.acked
            local = await self._local_entries(view.key_id, first_unstored)
        if remote and local:
            # A write that landed between the mark and the load, or, on a foreign
            # store, one whose ack was lost: count entries with a uuid once.
            held = uuids_of(remote)
            local = [e for e in local if not held_uuid(e, held)]
        if remote is None and not local:
            return None
        return (remote or []) + local

    async def _local_entries(self, key_id: int, from_seq: int) -> list[SessionStoreEntry]:
        return [decode_entry(body) for body in await self.queue.read_from(key_id, from_seq)]

    @_on_engine_loop
    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        validate_project_key(project_key)
        await self._ensure_started()
        name, backend = self._reader
        await self._settle(project_key)
        if not implements(backend, "list_sessions"):
            raise NotImplementedError(f"backend {name} does not implement list_sessions")
        remote = await self._read_backend("list_sessions", backend.list_sessions(project_key))
        dead = await self.queue.tombstoned_sessions(name, project_key)
        mtimes = {e["session_id"]: e["mtime"] for e in remote if e["session_id"] not in dead}
        for local in await self.queue.local_sessions(project_key, name):
            mtime = int(local.updated_at * 1000)
            mtimes[local.session_id] = max(mtimes.get(local.session_id, 0), mtime)
        return [{"session_id": sid, "mtime": mtime} for sid, mtime in mtimes.items()]

    @_on_engine_loop
    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """The backend's summaries with queued entries folded in (``fold_session_summary``)."""
        validate_project_key(project_key)
        await self._ensure_started()
        name, backend = self._reader
        await self._settle(project_key)
        # Cursors first, backend second: an entry delivered in between is then
        # folded twice, never missed, and folding is idempotent for a replayed
        # suffix (every summary field is set-once or last-wins).
        queued = await self.queue.local_sessions(project_key, name)
        if implements(backend, "list_session_summaries"):
            remote = await self._read_backend(
                "list_session_summaries", backend.list_session_summaries(project_key)
            )
        elif implements(backend, "list_sessions"):
            remote = await self._fold_from_backend(project_key)
        else:
            raise NotImplementedError(f"backend {name} does not implement list_sessions")
        dead = await self.queue.tombstoned_sessions(name, project_key)
        summaries = {s["session_id"]: s for s in remote if s["session_id"] not in dead}
        for local in queued:
            key: SessionKey = {"project_key": project_key, "session_id": local.session_id}
            summary = summaries.get(local.session_id)
            start = local.acked
            while True:  # fold queued entries in bounded chunks: memory stays flat
                _, bodies = await self.queue.read_batch(local.key_id, start, 1000, 8 << 20)
                if not bodies:
                    break
                summary = fold_session_summary(summary, key, [decode_entry(b) for b in bodies])
                start += len(bodies)
            if summary is not None:
                summary = {**summary}
                summary["mtime"] = max(summary["mtime"], int(local.updated_at * 1000))
                summaries[local.session_id] = summary
        return list(summaries.values())

    async def _fold_from_backend(self, project_key: str) -> list[SessionSummaryEntry]:
        """Summaries for a backend without them: load and fold each session (slow, correct)."""
        _, backend = self._reader
        out: list[SessionSummaryEntry] = []
        listed = await self._read_backend("list_sessions", backend.list_sessions(project_key))
        for item in listed:
            key: SessionKey = {"project_key": project_key, "session_id": item["session_id"]}
            entries = await self._read_backend("load", backend.load(key)) or []
            summary = fold_session_summary(None, key, entries)
            summary["mtime"] = item["mtime"]
            out.append(summary)
        return out

    @_on_engine_loop
    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        checked = validate_key(dict(key))
        await self._ensure_started()
        name, backend = self._reader
        if not implements(backend, "list_subkeys"):
            raise NotImplementedError(f"backend {name} does not implement list_subkeys")
        project_key, session_id = checked["project_key"], checked["session_id"]
        remote = await self._read_backend(
            "list_subkeys",
            backend.list_subkeys({"project_key": project_key, "session_id": session_id}),
        )
        dead = await self.queue.tombstoned_subpaths(name, project_key, session_id)
        subkeys = set() if "" in dead else {s for s in remote if s not in dead}
        subkeys.update(await self.queue.local_subkeys(project_key, session_id, name))
        return sorted(subkeys)

    # -- operations ---------------------------------------------------------------------

    @_on_engine_loop
    async def status(self) -> dict[str, Any]:
        """Per backend: pending entries and bytes, lag, parked keys, breaker, last error."""
        await self._ensure_started()
        backends = []
        for flusher in self.flushers:
            stats = await self.queue.stats(flusher.name)
            backends.append(
                {
                    "name": flusher.name,
                    "speaks_protocol": flusher.speaks_protocol,
                    "pending_entries": stats.pending_entries,
                    "pending_bytes": stats.pending_bytes,
                    "pending_keys": stats.pending_keys,
                    "pending_deletes": stats.pending_deletes,
                    "lag_seconds": round(stats.lag_seconds, 3),
                    "parked": stats.parked,
                    "parked_deletes": stats.parked_deletes,
                    # What the backend lost after acknowledging it (contract 2): per
                    # key, seqs of this queue, how many were restored and lost.
                    "losses": [
                        {
                            "key": loss.key,
                            "seqs": [loss.first_seq, loss.last_seq],
                            "restored": loss.restored,
                            "lost": loss.lost,
                            "detected_at": loss.detected_at,
                        }
                        for loss in stats.losses
                    ],
                    "breaker": flusher.breaker,
                    "consecutive_failures": flusher.consecutive_failures,
                    "last_error": flusher.last_error,
                    "delivered": flusher.delivered_total,
                    "retries": flusher.retries_total,
                }
            )
        return {
            "queue": {
                "path": str(self.queue.path),
                "producer_id": self.queue.producer_id,
                "stored_bytes": self.queue.stored_bytes,
                "max_bytes": self.tuning.max_queue_bytes,
                "synchronous": self.tuning.synchronous,
            },
            "backends": backends,
        }
