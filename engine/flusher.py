"""The flusher: one drain loop per backend, moving queued entries out in order, exactly once.

A round of the loop:

1. apply pending deletes (tombstones) for this backend, oldest first: nothing
   queued after a delete may reach the backend before the delete does;
2. pick up to ``max_parallel_keys`` keys with unacknowledged entries, oldest
   first, skipping parked keys;
3. for each key, concurrently: read one batch (bounded by entries and bytes),
   send it, and record the new cursor in the queue.

Backends that speak the delivery protocol (``walmirror.protocol``) get
``append_batch(key, Batch(producer, first_seq, bodies, expect))``: the backend
skips what it already holds of this producer (a resend after a lost reply, a
crash or a timeout) and appends the rest at the transcript's end, whatever
other hosts wrote. A ``MarkBehindError`` (the backend lost acknowledged
entries) moves the cursor back to what the queue still holds and records the
loss (``WriteAheadQueue.rewind``). A key with a delete waiting for this backend
is not delivered until the delete is. Foreign stores get plain ``append``; the
first delivery of a key in this process, and every delivery after a failed
one, first loads the key and skips entries whose ``uuid`` the backend already
holds (at-least-once, no duplicates for entries with uuids).

Failures: a permanent error (``Tuning.is_permanent``) parks the key with its
error and the other keys keep flowing; anything else backs the whole backend
off (exponential, full jitter, capped) and, past ``breaker_threshold``
consecutive failures, opens the breaker: one key per ``backoff_max`` probes
the backend until a call succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from claude_agent_sdk.types import SessionKey, SessionStore

from . import telemetry
from .config import Tuning
from .errors import MarkBehindError, PermanentBackendError, WalmirrorError
from .keys import describe_key
from .protocol import Batch, Receipt, decode_entry, implements, is_producer_store
from .queue import Cursor, KeyRow, WriteAheadQueue

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
    rewound: bool = False  # the backend lost data; the key goes again at once


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
        self.speaks_protocol = is_producer_store(backend)
        self.consecutive_failures = 0
        self.breaker: BreakerState = "closed"
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.delivered_total = 0
        self.retries_total = 0
        # Figures the telemetry gauges read: (depth, lag seconds, parked keys).
        self.gauges: tuple[int, float, int] = (0, 0.0, 0)
        self._verified: set[int] = set()  # foreign stores: keys whose tail was checked
        # Batches whose delivery failed ambiguously (they may still land), by key. A
        # delete made on this host sends them once more first: a late copy is then
        # below the producer's mark, which the backend keeps through the delete.
        self._in_doubt: dict[tuple[str, str, str], tuple[SessionKey, Batch]] = {}
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
        elif delivered or any(o.permanent or o.rewound for o in outcomes):
            self._record_success()
        if delivered:
            self.on_progress()
        return delivered > 0 or any(o.permanent or o.rewound for o in outcomes)

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
                        await self._fence_in_doubt(tombstone.key)
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
            self.on_progress()
        return True

    async def _fence_in_doubt(self, deleted: SessionKey) -> None:
        """Before ``deleted`` goes: settle every batch of it (a main key: of its whole
        session) whose delivery failed ambiguously, so a copy still on its way
        cannot land after the delete (it will be at or below the producer's mark)."""
        backend: Any = self.backend
        for ident, (session_key, batch) in list(self._in_doubt.items()):
            same = ident[:2] == (deleted["project_key"], deleted["session_id"])
            if same and deleted.get("subpath") in (None, ident[2]):
                fence = Batch(batch.producer, batch.first_seq, batch.encoded, None)
                try:
                    await self._call("append_batch", backend.append_batch(session_key, fence))
                except Exception as exc:
                    if not self.tuning.is_permanent(exc):
                        raise  # the delete waits: retried with backoff
                    # Refused for good: it cannot land later either.
                del self._in_doubt[ident]

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
                if await self.queue.is_tombstoned(self.name, session_key):
                    return _Outcome()  # a delete made since goes first (next round)
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
                span.set_attribute("walmirror.batch.entries", len(bodies))
                try:
                    if self.speaks_protocol:
                        if cursor.legacy_base is not None:
                            skipped = await self._reconcile_legacy(key, session_key, cursor, bodies)
                            if skipped:
                                return _Outcome(delivered=skipped)
                        await self._send_batch(key, session_key, cursor, bodies)
                    else:
                        await self._send_foreign(key, session_key, cursor, bodies)
                except MarkBehindError as exc:
                    loss = await self.queue.rewind(self.name, key.key_id, exc.mark)
                    if loss is not None:
                        telemetry.entries_lost.add(loss.lost, {"backend": self.name})
                        logger.error(
                            "flusher %s: backend lost entries of %s: re-sending %d from the "
                            "queue, %d no longer held",
                            self.name,
                            describe_key(session_key),
                            loss.restored,
                            loss.lost,
                        )
                    return _Outcome(rewound=True)
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
        self.delivered_total += len(bodies)
        telemetry.entries_delivered.add(len(bodies), {"backend": self.name})
        return _Outcome(delivered=len(bodies))

    async def _send_batch(
        self, key: KeyRow, session_key: SessionKey, cursor: Cursor, bodies: list[bytes]
    ) -> None:
        """One protocol delivery, then the cursor moves past it."""
        batch = Batch(self.queue.producer_id, cursor.acked, bodies, cursor.confirmed)
        backend: Any = self.backend
        ident = (key.project_key, key.session_id, key.subpath)
        self._in_doubt[ident] = (session_key, batch)
        try:
            receipt: Receipt = await self._call(
                "append_batch", backend.append_batch(session_key, batch)
            )
        except (MarkBehindError, PermanentBackendError):
            del self._in_doubt[ident]  # refused: nothing of it was written
            raise
        del self._in_doubt[ident]
        # Does the transcript still hold nothing but this queue's entries of the key?
        # (Then ``load`` may answer from the queue while the backend is down.)
        before = 0 if cursor.acked == cursor.first_seq else cursor.solo_length
        solo = (
            receipt.length
            if before is not None and receipt.length == before + receipt.appended
            else None
        )
        await self.queue.ack(self.name, key.key_id, batch.last_seq + 1, batch.last_seq, solo)

    async def _reconcile_legacy(
        self, key: KeyRow, session_key: SessionKey, cursor: Cursor, bodies: list[bytes]
    ) -> int:
        """A cursor migrated from schema 1 with entries not yet acknowledged: the
        old protocol may have stored some of them (a reply lost before the
        upgrade) at offsets ``legacy_base + seq``. Acknowledge those that the
        backend holds there, equal, without sending them again; return how many."""
        assert cursor.legacy_base is not None
        stored = await self._call("load", self.backend.load(session_key)) or []
        tail = stored[cursor.legacy_base + cursor.acked :]
        held = 0
        for entry, body in zip(tail, bodies, strict=False):
            if entry != decode_entry(body):
                break
            held += 1
        # The old protocol left no mark for this producer: the next batch expects none.
        await self.queue.ack(self.name, key.key_id, cursor.acked + held, None, None)
        return held

    async def _send_foreign(
        self, key: KeyRow, session_key: SessionKey, cursor: Cursor, bodies: list[bytes]
    ) -> None:
        entries = [decode_entry(b) for b in bodies]
        to_send = entries
        # Does the backend hold nothing but this queue's entries of the key (``solo``)?
        solo = cursor.acked == cursor.first_seq or cursor.solo_length is not None
        if key.key_id not in self._verified:
            # A previous attempt (or a previous process) may have landed: skip
            # what the backend already holds, by uuid, before resending.
            stored = await self._call("load", self.backend.load(session_key)) or []
            held = {e.get("uuid") for e in stored if isinstance(e, dict) and e.get("uuid")}
            to_send = [e for e in entries if not (e.get("uuid") and e.get("uuid") in held)]
            landed = len(entries) - len(to_send)
            solo = solo and len(stored) == cursor.acked - cursor.first_seq + landed
        if to_send:
            await self._call("append", self.backend.append(session_key, to_send))
        self._verified.add(key.key_id)
        last = cursor.acked + len(bodies) - 1
        length = last + 1 - cursor.first_seq if solo else None
        await self.queue.ack(self.name, key.key_id, last + 1, last, length)

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
