"""The flusher: one drain loop per backend, moving queued entries out in order, exactly once.

A round of the loop:

1. apply pending deletes (tombstones) for this backend, oldest first: nothing
   queued after a delete may reach the backend before the delete does;
2. pick up to ``max_parallel_keys`` keys with unacknowledged entries, oldest
   first, skipping parked keys;
3. for each key, concurrently: read one batch (bounded by entries and bytes),
   send it, and record the new cursor in the queue.

Offset-aware backends get ``append_at(key, base + acked, batch)``: a resend
after a lost reply or a crash repeats offsets the backend already holds, which
it ignores. A key's ``base`` is learned from ``length(key)`` before its first
delivery and persisted before anything is sent. Foreign stores get plain
``append``; the first delivery of a key in this process, and every delivery
after a failed one, first loads the key and skips entries whose ``uuid`` the
backend already holds (at-least-once, no duplicates for entries with uuids).

Failures: a permanent error (``Tuning.is_permanent``) parks the key with its
error and the other keys keep flowing; anything else backs the whole backend
off (exponential, full jitter, capped) and, past ``breaker_threshold``
consecutive failures, opens the breaker: one key per ``backoff_max`` probes
the backend until a call succeeds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry

from . import telemetry
from .backend import accepts_encoded, implements, is_offset_aware
from .config import Tuning
from .errors import PermanentBackendError, WalmirrorError
from .keys import describe_key
from .queue import KeyRow, WriteAheadQueue

logger = logging.getLogger("walmirror.flusher")

T = TypeVar("T")

BreakerState = Literal["closed", "open", "half-open"]

# Exceptions whose message is an errno-style description, never payload. Other
# messages may echo what the backend was sent, so only their type is kept.
_SAFE_MESSAGE_TYPES = (WalmirrorError, OSError, TimeoutError, asyncio.TimeoutError)


def describe_error(exc: BaseException) -> str:
    """The error as status and logs show it: its type, and its message only when safe."""
    name = type(exc).__name__
    if isinstance(exc, _SAFE_MESSAGE_TYPES) and str(exc):
        return f"{name}: {str(exc)[:300]}"
    return name


class SessionLocks:
    """One asyncio.Lock per session (main key and its subkeys share it).

    Held by the flusher while it delivers, by ``delete`` and by merged reads,
    so a read never sees a batch both in the backend and in the queue, and a
    delete never races an in-flight delivery of the same session.
    """

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def __call__(self, key: SessionKey) -> asyncio.Lock:
        ident = (key["project_key"], key["session_id"])
        lock = self._locks.get(ident)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[ident] = lock
        return lock


@dataclass
class _Outcome:
    delivered: int = 0
    error: BaseException | None = None
    permanent: bool = False


class Flusher:
    """Drains the queue into one backend."""

    def __init__(
        self,
        name: str,
        backend: SessionStore,
        queue: WriteAheadQueue,
        tuning: Tuning,
        locks: SessionLocks,
        on_progress: Callable[[], None],
    ) -> None:
        self.name = name
        self.backend = backend
        self.queue = queue
        self.tuning = tuning
        self.locks = locks
        self.on_progress = on_progress
        self.offset_aware = is_offset_aware(backend)
        self.takes_bytes = accepts_encoded(backend)
        self.consecutive_failures = 0
        self.breaker: BreakerState = "closed"
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.delivered_total = 0
        self.retries_total = 0
        # Figures the telemetry gauges read: (depth, lag seconds, parked keys).
        self.gauges: tuple[int, float, int] = (0, 0.0, 0)
        self._verified: set[int] = set()  # foreign stores: keys whose tail was checked
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_compact = 0.0
        self._gauges_at = 0.0

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"walmirror-flusher-{self.name}")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # -- the loop ------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                busy = await self._round()
                if time.monotonic() - self._gauges_at >= 1.0:
                    self._gauges_at = time.monotonic()
                    self.gauges = await self.queue.depth(self.name)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in walmirror itself; keep draining, loudly
                logger.exception("flusher %s: round failed", self.name)
                busy = False
                self._record_failure(RuntimeError("internal flusher error"))
            if self.consecutive_failures:
                await self._sleep(self._backoff_delay())
            elif not busy:
                await self._sleep(self.tuning.compact_interval)

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; new work or ``stop`` wakes us early (not during backoff)."""
        if self.consecutive_failures:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    def _backoff_delay(self) -> float:
        if self.breaker != "closed":
            return self.tuning.backoff_max
        ceiling = min(
            self.tuning.backoff_max,
            self.tuning.backoff_initial * 2 ** (self.consecutive_failures - 1),
        )
        return random.uniform(0, ceiling)

    async def _round(self) -> bool:
        """One pass; True when it delivered something (so look again at once)."""
        await self._maybe_compact()
        if not await self._apply_tombstones():
            return False
        limit = self.tuning.max_parallel_keys
        if self.breaker != "closed":
            self.breaker, limit = "half-open", 1  # probe with one key
        keys = await self.queue.pending_keys(self.name, limit)
        if not keys:
            return False
        age = await self.queue.oldest_pending_age(self.name)
        if age is not None and age < self.tuning.batch_linger:
            await asyncio.sleep(self.tuning.batch_linger - age)
        outcomes = await asyncio.gather(*(self._deliver(key) for key in keys))
        delivered = sum(o.delivered for o in outcomes)
        retryable = [o.error for o in outcomes if o.error is not None and not o.permanent]
        if retryable:
            self._record_failure(retryable[0])
        elif delivered or any(o.permanent for o in outcomes):
            self._record_success()
        if delivered:
            self.on_progress()
        return delivered > 0 or any(o.permanent for o in outcomes)

    async def _maybe_compact(self) -> None:
        now = time.monotonic()
        if now - self._last_compact >= self.tuning.compact_interval:
            self._last_compact = now
            await self.queue.compact(self.tuning.retention_seconds)

    async def _apply_tombstones(self) -> bool:
        """Deliver pending deletes; False while one of them keeps failing."""
        for tombstone in await self.queue.tombstones(self.name):
            async with self.locks(tombstone.key):
                if implements(self.backend, "delete"):
                    try:
                        await self._call("delete", self.backend.delete(tombstone.key))
                    except Exception as exc:
                        self._record_failure(exc)
                        return False
                else:
                    logger.warning(
                        "flusher %s: backend has no delete(); %s stays in it",
                        self.name,
                        describe_key(tombstone.key),
                    )
                await self.queue.drop_tombstone(tombstone.id)
        return True

    # -- one key ---------------------------------------------------------------

    async def _deliver(self, key: KeyRow) -> _Outcome:
        session_key = key.session_key()
        with telemetry.tracer.start_as_current_span(
            "walmirror.flush_batch", attributes={"walmirror.backend": self.name}
        ) as span:
            async with self.locks(session_key):
                cursor = await self.queue.cursor(self.name, key.key_id)
                if cursor is None:  # deleted since it was picked
                    return _Outcome()
                first, bodies = await self.queue.read_batch(
                    key.key_id,
                    cursor.acked,
                    self.tuning.max_batch_entries,
                    self.tuning.max_batch_bytes,
                )
                if not bodies:
                    return _Outcome()
                if first != cursor.acked:
                    # A backend added after entries were compacted: sending the rest
                    # would store a transcript with its beginning missing.
                    error = (
                        f"HistoryCompacted: entries {cursor.acked}..{first - 1} of this key "
                        "were compacted before this backend received them"
                    )
                    await self.queue.park(self.name, key.key_id, error)
                    return _Outcome(error=PermanentBackendError(error), permanent=True)
                entries: list[SessionStoreEntry] = [json.loads(b) for b in bodies]
                span.set_attribute("walmirror.batch.entries", len(entries))
                try:
                    if self.offset_aware:
                        await self._send_at_offset(
                            key, session_key, cursor.base, cursor.acked, entries, bodies
                        )
                    else:
                        await self._send_foreign(key, session_key, cursor.acked, entries)
                except Exception as exc:
                    self._verified.discard(key.key_id)
                    permanent = self.tuning.is_permanent(exc)
                    error = describe_error(exc)
                    span.set_attribute("walmirror.error", error)
                    if permanent:
                        await self.queue.park(self.name, key.key_id, error)
                        self.last_error, self.last_error_at = error, time.time()
                        logger.error(
                            "flusher %s: parked %s: %s", self.name, describe_key(session_key), error
                        )
                    return _Outcome(error=exc, permanent=permanent)
                await self.queue.ack(self.name, key.key_id, cursor.acked + len(entries))
        self.delivered_total += len(entries)
        telemetry.entries_delivered.add(len(entries), {"backend": self.name})
        return _Outcome(delivered=len(entries))

    async def _send_at_offset(
        self,
        key: KeyRow,
        session_key: SessionKey,
        base: int | None,
        acked: int,
        entries: list[SessionStoreEntry],
        bodies: list[bytes],
    ) -> None:
        backend: Any = self.backend
        if base is None:
            # First delivery of this key from this host (or after a re-queue):
            # continue after what the backend holds, then remember where we start.
            length = await self._call("length", backend.length(session_key))
            base = length - acked
            if length and not acked:
                base = await self._find_own_start(session_key, entries, base)
            await self.queue.set_base(self.name, key.key_id, base)
        offset = base + acked
        if self.takes_bytes:  # the queue's bytes are the entries' canonical JSON already
            call = backend.append_at(session_key, offset, entries, encoded=bodies)
        else:
            call = backend.append_at(session_key, offset, entries)
        await self._call("append_at", call)

    async def _find_own_start(
        self, session_key: SessionKey, entries: list[SessionStoreEntry], default: int
    ) -> int:
        """Where this queue's first entry already sits in the backend, if it does.

        A backend that holds entries of a key this cursor never delivered is
        usually another host's history (continue after it: ``default``). But it
        may hold this queue's own entries, delivered under another cursor name
        (a backend renamed or re-addressed), or a replay of entries it already
        has. Then the batch belongs where its first entry's uuid is, and the
        backend's overlap check turns the resend into a no-op.
        """
        first = entries[0].get("uuid")
        if not first:
            return default
        stored = await self._call("load", self.backend.load(session_key)) or []
        for offset, entry in enumerate(stored):
            if isinstance(entry, dict) and entry.get("uuid") == first:
                return offset
        return default

    async def _send_foreign(
        self,
        key: KeyRow,
        session_key: SessionKey,
        acked: int,
        entries: list[SessionStoreEntry],
    ) -> None:
        to_send = entries
        if key.key_id not in self._verified:
            # A previous attempt (or a previous process) may have landed: skip
            # what the backend already holds, by uuid, before resending.
            stored = await self._call("load", self.backend.load(session_key)) or []
            held = {e.get("uuid") for e in stored if isinstance(e, dict) and e.get("uuid")}
            to_send = [e for e in entries if not (e.get("uuid") and e.get("uuid") in held)]
            if acked == 0:
                skipped = len(entries) - len(to_send)
                await self.queue.set_base(self.name, key.key_id, max(0, len(stored) - skipped))
        if to_send:
            await self._call("append", self.backend.append(session_key, to_send))
        self._verified.add(key.key_id)

    async def _call(self, op: str, call: Awaitable[T]) -> T:
        with telemetry.tracer.start_as_current_span(
            "walmirror.backend_call",
            attributes={"walmirror.backend": self.name, "walmirror.op": op},
        ):
            async with asyncio.timeout(self.tuning.call_timeout):
                return await call

    # -- health ------------------------------------------------------------------

    def _record_failure(self, exc: BaseException) -> None:
        self.consecutive_failures += 1
        self.retries_total += 1
        self.last_error, self.last_error_at = describe_error(exc), time.time()
        telemetry.backend_retries.add(1, {"backend": self.name})
        if self.consecutive_failures >= self.tuning.breaker_threshold:
            if self.breaker == "closed":
                logger.warning(
                    "flusher %s: breaker open after %d failures (%s)",
                    self.name,
                    self.consecutive_failures,
                    self.last_error,
                )
            self.breaker = "open"
        logger.debug("flusher %s: retryable failure: %s", self.name, self.last_error)

    def _record_success(self) -> None:
        if self.breaker != "closed":
            logger.info("flusher %s: backend answers again; breaker closed", self.name)
        self.consecutive_failures = 0
        self.breaker = "closed"

    @property
    def state(self) -> BreakerState:
        """closed: healthy; open: failing, probing one key per ``backoff_max``."""
        return self.breaker
