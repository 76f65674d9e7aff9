"""The flusher: one drain loop per backend, moving queued entries out in order, exactly once.

A round of the loop:

1. apply pending deletes (tombstones) for this backend, oldest first: nothing
   queued after a delete may reach the backend before the delete does;
2. pick up to ``max_parallel_keys`` keys with unacknowledged entries, oldest
   first, skipping parked keys and keys cooling down after a failure;
3. deliver them on up to ``max_parallel_keys`` slots: a slot reads one batch of
   its key (bounded by entries and bytes), sends it and records the new cursor
   in the queue; then it takes the key whose oldest entry is now the oldest
   pending that no slot holds (its own again, when that is still it), once
   that entry is ``batch_linger`` old. So no key waits for another's slow
   call, and the oldest entries always go next.
   A round ends when no key has work for a free slot, after ``ROUND_SECONDS``
   (deletes and compaction wait for round ends; while a call that started
   before then is still out, free slots go on), or, once a key failed, when
   the keys in flight are done.

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

Failures, so that one bad key never stops the others:

* A backend call that fails permanently (``Tuning.is_permanent``) parks its
  key, or its delete, with the error; the rest keeps flowing; ``requeue``
  un-parks.
* A retryable failure is the backend's when nothing else in the round got
  through and the backend's health call (``ping``) fails too (or it has none):
  the whole backend backs off (exponential, full jitter, capped) and, past
  ``breaker_threshold`` such rounds, the breaker opens. Otherwise it is the
  item's own: that key (or delete) cools down on its own backoff while the
  others go on.
* An open breaker sends no batch: it probes the backend with ``ping`` every
  ``probe_interval`` and closes on the first answer; a backend without
  ``ping`` is probed with one queued item per ``backoff_max``, a different one
  each time.
* An error in walmirror's own code while delivering a key is logged with its
  traceback and cools that key down; it never parks a key (a fixed walmirror
  delivers it) and never counts against the backend.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry

from . import telemetry
from .config import Tuning
from .errors import CorruptQueueError, MarkBehindError, PermanentBackendError, WalmirrorError
from .keys import describe_key
from .protocol import (
    Batch,
    Receipt,
    decode_entry,
    has_ping,
    held_uuid,
    implements,
    is_producer_store,
    uuids_of,
)
from .queue import Cursor, KeyRow, Tombstone, WriteAheadQueue

logger = logging.getLogger("walmirror.flusher")

T = TypeVar("T")

BreakerState = Literal["closed", "open", "half-open"]

# What a round came to: something got done (look again at once); the backend failed
# (back off, maybe open the breaker); everything tried failed on its own while the
# backend answers (pace the rounds); nothing to do (sleep until there is).
Verdict = Literal["done", "failed", "items_failed", "idle"]

ROUND_SECONDS = 0.25
"""How long a round's slots go on taking keys: under steady appends there is always
a next batch, and deletes, compaction and the breaker's judgement wait for the
round's end."""


def describe_error(exc: BaseException) -> str:
    """The error as status, logs and telemetry show it: its type, and a message only
    when walmirror wrote it. Other messages can echo what the backend was sent, or
    name paths and hosts (an ``OSError``): of those, only the errno's name is kept."""
    name = type(exc).__name__
    if isinstance(exc, WalmirrorError) and str(exc):
        return f"{name}: {str(exc)[:300]}"
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(code, int) and code in errno.errorcode:
        return f"{name} ({errno.errorcode[code]})"
    return name


class _BackendFailed(Exception):
    """A backend call raised ``error`` (as opposed to walmirror's own code)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(type(error).__name__)
        self.error = error


@dataclass
class _Cooling:
    """An item (a key or a delete) that failed while the backend was fine."""

    failures: int
    until: float


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
    """What one item of a round (a key's batch or a delete) came to."""

    item: tuple[str, int]  # ("key", key_id) or ("delete", tombstone id)
    delivered: int = 0  # entries acknowledged (a delete counts as done via ``done``)
    done: bool = False  # the backend took it (or there was nothing to do)
    error: BaseException | None = None  # retryable, from the backend or walmirror
    internal: bool = False  # the error is walmirror's own
    permanent: bool = False  # parked
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
        self.has_ping = has_ping(backend)
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
        # Keys and deletes that failed on their own while the backend was fine.
        self._cooling: dict[tuple[str, int], _Cooling] = {}
        # Keys this queue started afresh whose backend holds uuids they replay: the
        # uuids, until the replayed part is past (see _held_uuids).
        self._dedupe: dict[int, set[str]] = {}
        # Items that probed a backend without ping since it last answered: each probe
        # takes one not tried yet, so every queued item gets its turn.
        self._probed: set[tuple[str, int]] = set()
        self._items_failing = 0  # rounds in a row where all failed, the backend answering
        # Telemetry only: each failing item's failed attempts in a row (and when the
        # last was), and when the breaker last closed after an outage while what was
        # queued then is not yet all delivered (monotonic seconds).
        self._attempts: dict[tuple[str, int], tuple[int, float]] = {}
        self._healed_at: float | None = None
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
            verdict: Verdict = "idle"
            try:
                if self.breaker == "open" and self.has_ping:
                    verdict = await self._round() if await self._probe() else "failed"
                else:
                    verdict = await self._round()
                if time.monotonic() - self._gauges_at >= 1.0:
                    self._gauges_at = time.monotonic()
                    self.gauges = await self.queue.depth(self.name)
            except asyncio.CancelledError:
                if _cancelled_from_outside():
                    raise
                # A backend client leaked a CancelledError: never let it end the flusher.
                logger.error("flusher %s: round failed: a stray CancelledError", self.name)
                self._record_failure(ConnectionError("stray CancelledError"))
            except Exception:  # a bug in walmirror itself; keep draining, loudly
                logger.exception("flusher %s: round failed", self.name)
                self._record_failure(RuntimeError("internal flusher error"))
            if self.breaker == "open" and self.has_ping:
                await asyncio.sleep(self.tuning.probe_interval)
            elif self.consecutive_failures:
                await asyncio.sleep(self._backoff_delay())
            elif verdict == "items_failed":
                # Everything tried failed though the backend answers (its writes may be
                # broken: Redis out of memory, a read-only standby): pace the rounds.
                await asyncio.sleep(self._backoff_delay(self._items_failing))
            elif verdict == "idle":
                await self._idle()

    async def _idle(self) -> None:
        """Sleep until new work, ``stop``, the next compaction or a cooled item is due."""
        seconds = self.tuning.compact_interval
        now = time.monotonic()
        due = [c.until - now for c in self._cooling.values() if c.until > now]
        if due:
            seconds = min(seconds, min(due))
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    def _backoff_delay(self, failures: int | None = None) -> float:
        if failures is None:
            if self.breaker != "closed":
                return self.tuning.backoff_max
            failures = self.consecutive_failures
        return random.uniform(0, self._ceiling(failures))

    def _ceiling(self, failures: int) -> float:
        """Exponential backoff's ceiling after ``failures`` failures (the exponent is
        capped: 2**1024 would overflow a float after a long outage)."""
        growth: float = 2.0 ** min(failures - 1, 60)
        return min(self.tuning.backoff_max, self.tuning.backoff_initial * growth)

    async def _probe(self) -> bool:
        """The breaker is open: ask the backend's health call. True (and the breaker
        closed) when it answers."""
        with telemetry.span("walmirror.probe", {telemetry.BACKEND: self.name}) as span:
            error = await self._ping()
            if error is None:
                span.set_attribute(telemetry.OUTCOME, "ok")
                self._record_success()
                return True
            telemetry.set_error(span, error, "failed")
            self._record_failure(error)
            return False

    async def _ping(self) -> Exception | None:
        """The backend's health call (only when ``has_ping``): None when it answers,
        else what it raised."""
        backend: Any = self.backend
        timeout = min(self.tuning.probe_timeout, self.tuning.call_timeout)
        with telemetry.span(
            "walmirror.backend_call", {telemetry.BACKEND: self.name, telemetry.OP: "ping"}
        ) as span:
            try:
                async with asyncio.timeout(timeout):
                    await backend.ping()
            except Exception as exc:
                self._count_call(span, "ping", exc)
                return exc
            except asyncio.CancelledError:
                if _cancelled_from_outside():
                    raise
                error = ConnectionError("the health call was cancelled")
                self._count_call(span, "ping", error)
                return error
            self._count_call(span, "ping", None)
        return None

    def _count_call(self, span: Any, op: str, exc: Exception | None) -> None:
        """Telemetry for one backend call: its span's outcome, and the request count."""
        if exc is None:
            outcome = "ok"
            span.set_attribute(telemetry.OUTCOME, outcome)
        else:
            outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
            telemetry.set_error(span, exc, outcome)
        telemetry.backend_requests.add(1, {"backend": self.name, "op": op, "outcome": outcome})

    async def _round(self) -> Verdict:
        """One pass, and what came of it (see ``Verdict``)."""
        await self._maybe_compact()
        now = time.monotonic()
        cooling = {item for item, c in self._cooling.items() if c.until > now}
        probing = self.breaker != "closed"  # no ping: one queued item is the probe
        was = self.breaker
        if probing:
            self.breaker = "half-open"
        deletes = [
            t
            for t in await self.queue.tombstones(self.name)
            if t.parked is None and ("delete", t.id) not in cooling
        ]
        limit = self.tuning.max_parallel_keys
        keys = await self.queue.pending_keys(
            self.name, limit, exclude=[i for kind, i in cooling if kind == "key"]
        )
        if probing:
            deletes, keys = await self._pick_probe(deletes, cooling)
        if not deletes and not keys:
            if probing:
                self.breaker = "open"
            else:
                self._note_backlog(None)
            return "idle"
        with telemetry.span(
            "walmirror.flush_round",
            {
                telemetry.BACKEND: self.name,
                "walmirror.round.keys": len(keys),
                "walmirror.round.deletes": len(deletes),
                "walmirror.round.probe": probing,
            },
        ):
            if probing and was != "half-open":
                self._breaker_changed(was, "half-open")
            outcomes = await self._apply_tombstones(deletes)
            if keys:  # even after a failed delete: its own key waits (``is_tombstoned``)
                age = await self.queue.oldest_pending_age(self.name)
                self._note_backlog(age)
                if age is not None and age < self.tuning.batch_linger:
                    await asyncio.sleep(self.tuning.batch_linger - age)
                skip = {i for kind, i in cooling if kind == "key"}
                outcomes += await self._deliver_keys(keys, skip, refill=not probing)
            return await self._judge(outcomes)

    async def _pick_probe(
        self, deletes: list[Tombstone], cooling: set[tuple[str, int]]
    ) -> tuple[list[Tombstone], list[KeyRow]]:
        """One item to probe a backend without ``ping`` with: the oldest not tried since
        the backend last answered, so items that fail on their own (however many)
        cannot hold the breaker open for all; once all had a turn, round again."""
        for _ in range(2):
            for tombstone in deletes:
                if ("delete", tombstone.id) not in self._probed:
                    self._probed.add(("delete", tombstone.id))
                    return [tombstone], []
            skip = [i for kind, i in cooling | self._probed if kind == "key"]
            keys = await self.queue.pending_keys(self.name, 1, exclude=skip)
            if keys:
                self._probed.add(("key", keys[0].key_id))
                return [], keys
            self._probed.clear()
        return [], []

    async def _judge(self, outcomes: list[_Outcome]) -> Verdict:
        """Settle the round: whose failures were they, the backend's or the items'?"""
        done = sum(1 for o in outcomes if o.done or o.permanent or o.rewound)
        delivered = sum(o.delivered for o in outcomes)
        failed = [o for o in outcomes if o.error is not None]
        for outcome in outcomes:
            if outcome.error is None:
                self._cooling.pop(outcome.item, None)
        backend_failed = [o for o in failed if not o.internal]
        verdict: Verdict
        if backend_failed and not done and not (self.has_ping and await self._ping() is None):
            self._record_failure(backend_failed[0].error or RuntimeError())
            if not self.has_ping:
                # Without a health call nobody can tell whose failure it was: the items
                # cool down too, as long as the backend backs off, so the next round
                # (and the next probe) tries others.
                for outcome in failed:
                    self._cool(outcome, at_least=self.consecutive_failures)
            verdict = "failed"
        else:
            for outcome in failed:  # the backend is fine: these items failed on their own
                self._cool(outcome)
            if done or backend_failed:
                self._record_success()
            verdict = "done" if done else "items_failed" if failed else "idle"
        self._items_failing = self._items_failing + 1 if verdict == "items_failed" else 0
        telemetry.current_attributes({telemetry.OUTCOME: verdict, "walmirror.entries": delivered})
        if delivered:
            self.on_progress()
        return verdict

    def cooling(self, tombstone: Tombstone) -> bool:
        """Did this delete fail on its own, and wait for its retry?"""
        state = self._cooling.get(("delete", tombstone.id))
        return state is not None and state.until > time.monotonic()

    @property
    def troubled(self) -> bool:
        """Failing, or holding items that failed on their own and wait to be retried:
        a caller waiting for this backend to catch up should not wait for long."""
        now = time.monotonic()
        return bool(self.consecutive_failures) or any(c.until > now for c in self._cooling.values())

    def _cool(self, outcome: _Outcome, at_least: int = 1) -> None:
        previous = self._cooling.get(outcome.item)
        failures = max(at_least, 1 if previous is None else previous.failures + 1)
        ceiling = self._ceiling(failures)
        until = time.monotonic() + random.uniform(ceiling / 2, ceiling)
        self._cooling[outcome.item] = _Cooling(failures, until)
        self.retries_total += 1
        assert outcome.error is not None
        self.last_error, self.last_error_at = describe_error(outcome.error), time.time()
        telemetry.backend_retries.add(1, {"backend": self.name})
        telemetry.event(
            "walmirror.cool_down",
            {
                telemetry.ITEM_KIND: outcome.item[0],
                "walmirror.failures": failures,
                "walmirror.cool_down.seconds": round(until - time.monotonic(), 6),
                "walmirror.error.internal": outcome.internal,
                **telemetry.error_attributes(outcome.error),
            },
        )

    async def _maybe_compact(self) -> None:
        now = time.monotonic()
        if now - self._last_compact >= self.tuning.compact_interval:
            self._last_compact = now
            await self.queue.compact(self.tuning.retention_seconds, self.tuning.forget_after)
            # Items that cooled long ago and never came back (deleted, delivered by a
            # requeue...): forget them.
            stale = [i for i, c in self._cooling.items() if c.until < now - 600]
            for item in stale:
                del self._cooling[item]
            for item in [i for i, (_, at) in self._attempts.items() if at < now - 600]:
                del self._attempts[item]

    async def _apply_tombstones(self, tombstones: list[Tombstone]) -> list[_Outcome]:
        """Deliver deletes, oldest first; stop at the first that fails retryably."""
        outcomes: list[_Outcome] = []
        for tombstone in tombstones:
            outcome = await self._apply_tombstone(tombstone)
            outcomes.append(outcome)
            if outcome.error is not None:
                break
        return outcomes

    async def _apply_tombstone(self, tombstone: Tombstone) -> _Outcome:
        item = ("delete", tombstone.id)
        attempt = self._attempt(item)
        with telemetry.span(
            "walmirror.flush_delete", {telemetry.BACKEND: self.name, telemetry.ATTEMPT: attempt}
        ) as span:
            if span.is_recording():
                span.set_attribute(telemetry.KEY_DIGEST, telemetry.key_digest(tombstone.key))
            async with self.locks(tombstone.key):
                if implements(self.backend, "delete"):
                    try:
                        await self._fence_in_doubt(tombstone.key)
                        await self._call("delete", self.backend.delete(tombstone.key))
                    except _BackendFailed as failed:
                        if not self.tuning.is_permanent(failed.error):
                            self._traced_retry(span, item, attempt, failed.error)
                            return _Outcome(item, error=failed.error)
                        error = describe_error(failed.error)
                        await self.queue.park_delete(tombstone.id, error)
                        self.last_error, self.last_error_at = error, time.time()
                        self._traced_park(span, item, failed.error)
                        logger.error(
                            "flusher %s: parked the delete of %s: %s",
                            self.name,
                            describe_key(tombstone.key),
                            error,
                        )
                        return _Outcome(item, permanent=True)
                    span.set_attribute(telemetry.OUTCOME, "ok")
                else:
                    span.set_attribute(telemetry.OUTCOME, "unsupported")
                    logger.warning(
                        "flusher %s: backend has no delete(); %s stays in it",
                        self.name,
                        describe_key(tombstone.key),
                    )
                await self.queue.drop_tombstone(tombstone.id)
            self._attempts.pop(item, None)
        self.on_progress()
        return _Outcome(item, done=True)

    # -- telemetry of one item -------------------------------------------------

    def _attempt(self, item: tuple[str, int]) -> int:
        """The attempt this is for ``item``: 1 + its failed attempts in a row."""
        previous = self._attempts.get(item)
        return 1 if previous is None else previous[0] + 1

    def _traced_retry(
        self, span: Any, item: tuple[str, int], attempt: int, exc: BaseException
    ) -> None:
        """``item`` failed retryably: it goes again (after a backoff or a cool-down)."""
        self._attempts[item] = (attempt, time.monotonic())
        telemetry.set_error(span, exc, "retry")
        if span.is_recording():
            span.add_event(
                "walmirror.retry",
                {telemetry.ATTEMPT: attempt, **telemetry.error_attributes(exc)},
            )

    def _traced_park(self, span: Any, item: tuple[str, int], exc: BaseException) -> None:
        """``item`` was parked after a permanent error."""
        self._attempts.pop(item, None)
        telemetry.set_error(span, exc, "parked")
        telemetry.items_parked.add(1, {"backend": self.name, "kind": item[0]})
        if span.is_recording():
            span.add_event(
                "walmirror.parked",
                {telemetry.ITEM_KIND: item[0], **telemetry.error_attributes(exc)},
            )

    async def _fence_in_doubt(self, deleted: SessionKey) -> None:
        """Before ``deleted`` goes: settle every batch of it (a main key: of its whole
        session) whose delivery failed ambiguously, so a copy still on its way
        cannot land after the delete (it will be at or below the producer's mark)."""
        backend: Any = self.backend
        for ident, (session_key, batch) in list(self._in_doubt.items()):
            same = ident[:2] == (deleted["project_key"], deleted["session_id"])
            if same and deleted.get("subpath") in (None, ident[2]):
                fence = Batch(batch.producer, batch.first_seq, batch.encoded, None, batch.hints)
                try:
                    await self._call("append_batch", backend.append_batch(session_key, fence))
                except _BackendFailed as failed:
                    if not self.tuning.is_permanent(failed.error):
                        raise  # the delete waits: retried with backoff
                    # Refused for good: it cannot land later either.
                del self._in_doubt[ident]

    # -- one key ---------------------------------------------------------------

    async def _deliver_keys(
        self, keys: list[KeyRow], skip: set[int], *, refill: bool
    ) -> list[_Outcome]:
        """Deliver ``keys`` on ``len(keys)`` slots; one outcome per key.

        With ``refill``, a slot whose key went through takes the key with the oldest
        pending entry that no slot holds and that has not stopped this round (nothing
        left, a failure, or in ``skip``), if that entry is at least ``batch_linger``
        old, until no such key is left or ``ROUND_SECONDS`` have passed (and no call
        that started before then is still out). After a retryable failure from the
        backend no slot takes another key: an outage costs one failed call per slot,
        not one per queued key."""
        start = time.monotonic()
        deadline = start + ROUND_SECONDS
        waiting = deque(keys)
        busy: dict[int, float] = {}  # key id -> when its call started (the first: start)
        stopped = set(skip)  # keys that take no more turns this round
        outcomes: dict[int, _Outcome] = {}
        refilling = asyncio.Lock()

        def may_refill() -> bool:
            if not refill or self._stopping:
                return False
            # Past the deadline the round ends once the calls in flight return; while
            # one that started before it is still out (a slow or hung call), free
            # slots go on: the round cannot end sooner anyway.
            return time.monotonic() < deadline or any(t <= deadline for t in busy.values())

        async def next_key() -> KeyRow | None:
            while True:
                while waiting:
                    key = waiting.popleft()
                    if key.key_id not in busy and key.key_id not in stopped:
                        return key
                if not may_refill():
                    return None
                async with refilling:
                    if not waiting:
                        # Entries younger than ``batch_linger`` wait for the next round
                        # (which lingers): a key that gets an append at a time would
                        # otherwise go to the backend once per append.
                        more = await self.queue.pending_keys(
                            self.name,
                            len(keys),
                            exclude=busy.keys() | stopped,
                            appended_before=time.time() - self.tuning.batch_linger,
                        )
                        if not more and not busy:
                            return None  # the round ends, and the next one lingers
                        waiting.extend(more)
                if not waiting:
                    # Nothing old enough yet, but the round cannot end before the calls
                    # in flight return (one may hang): what comes meanwhile goes too.
                    await asyncio.sleep(max(self.tuning.batch_linger, 0.005))

        async def slot() -> None:
            nonlocal refill
            first = True  # each slot's first key is one the round was given
            while (key := await next_key()) is not None:
                busy[key.key_id] = start if first else time.monotonic()
                first = False
                try:
                    outcome = await self._deliver(key)
                finally:
                    del busy[key.key_id]
                if not (outcome.done and outcome.delivered):  # this turn, not the round's
                    stopped.add(key.key_id)
                    if outcome.error is not None and not outcome.internal:
                        refill = False  # the backend may be down: judge the round first
                earlier = outcomes.get(key.key_id)
                if earlier is not None and earlier.delivered:  # it got through before
                    delivered = earlier.delivered + outcome.delivered
                    outcome = replace(outcome, delivered=delivered, done=True)
                outcomes[key.key_id] = outcome

        await asyncio.gather(*(slot() for _ in keys))
        return list(outcomes.values())

    async def _deliver(self, key: KeyRow) -> _Outcome:
        item = ("key", key.key_id)
        session_key = key.session_key()
        attempt = self._attempt(item)
        with telemetry.span(
            "walmirror.flush_batch", {telemetry.BACKEND: self.name, telemetry.ATTEMPT: attempt}
        ) as span:
            if span.is_recording():
                span.set_attribute(telemetry.KEY_DIGEST, telemetry.key_digest(session_key))
            async with self.locks(session_key):
                try:
                    delivered = await self._deliver_locked(key, session_key, span)
                except (_BackendFailed, CorruptQueueError) as failed:
                    # What the backend raised, or damage to what the queue holds for it.
                    exc = failed.error if isinstance(failed, _BackendFailed) else failed
                    if isinstance(exc, MarkBehindError):
                        self._attempts.pop(item, None)
                        await self._rewind(key, session_key, exc)
                        return _Outcome(item, rewound=True)
                    self._verified.discard(key.key_id)
                    error = describe_error(exc)
                    if not self.tuning.is_permanent(exc):
                        self._traced_retry(span, item, attempt, exc)
                        return _Outcome(item, error=exc)
                    await self.queue.park(self.name, key.key_id, error)
                    self.last_error, self.last_error_at = error, time.time()
                    self._traced_park(span, item, exc)
                    logger.error(
                        "flusher %s: parked %s: %s", self.name, describe_key(session_key), error
                    )
                    return _Outcome(item, permanent=True)
                except Exception as exc:  # walmirror's own bug: this key waits, others go
                    self._verified.discard(key.key_id)
                    logger.exception(
                        "flusher %s: internal error delivering %s",
                        self.name,
                        describe_key(session_key),
                    )
                    self._traced_retry(span, item, attempt, exc)
                    span.set_attribute("walmirror.error.internal", True)
                    return _Outcome(item, error=exc, internal=True)
            span.set_attribute(telemetry.OUTCOME, "ok" if delivered else "noop")
            self._attempts.pop(item, None)
        if delivered:
            self.delivered_total += delivered
            telemetry.entries_delivered.add(delivered, {"backend": self.name})
        return _Outcome(item, delivered=delivered, done=True)

    async def _deliver_locked(self, key: KeyRow, session_key: SessionKey, span: Any) -> int:
        """One batch of ``key`` (its session lock held); how many entries went."""
        batch = await self.queue.next_batch(
            self.name, key, self.tuning.max_batch_entries, self.tuning.max_batch_bytes
        )
        if batch is None or batch.fenced or not batch.bodies:
            return 0  # deleted since it was picked; a delete made since goes first; nothing
        cursor, first, bodies = batch.cursor, batch.first, batch.bodies
        if first != cursor.acked:
            # A backend added after entries were compacted: sending the rest
            # would store a transcript with its beginning missing.
            raise _BackendFailed(
                PermanentBackendError(
                    f"HistoryCompacted: entries {cursor.acked}..{first - 1} of this key "
                    "were compacted before this backend received them"
                )
            )
        nbytes = sum(len(body) for body in bodies)
        span.set_attributes({telemetry.ENTRIES: len(bodies), telemetry.BYTES: nbytes})
        if self.speaks_protocol:
            if cursor.legacy_base is not None:
                skipped = await self._reconcile_legacy(key, session_key, cursor, bodies)
                if skipped:
                    return skipped
            held = await self._held_uuids(key, session_key, cursor, bodies)
            if held:
                return await self._send_unheld(key, session_key, cursor, bodies, held)
            await self._send_batch(key, session_key, cursor, bodies, batch.hints)
        else:
            await self._send_foreign(key, session_key, cursor, bodies)
        telemetry.bytes_delivered.add(nbytes, {"backend": self.name})
        return len(bodies)

    async def _rewind(self, key: KeyRow, session_key: SessionKey, exc: MarkBehindError) -> None:
        loss = await self.queue.rewind(self.name, key.key_id, exc.mark)
        lost = 0 if loss is None else loss.lost
        telemetry.current_attributes({telemetry.OUTCOME: "lost" if lost else "rewound"})
        telemetry.event(
            "walmirror.rewound",
            {
                "walmirror.entries.restored": 0 if loss is None else loss.restored,
                "walmirror.entries.lost": lost,
            },
        )
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

    async def _send_batch(
        self,
        key: KeyRow,
        session_key: SessionKey,
        cursor: Cursor,
        bodies: list[bytes],
        hints: list[int] | None = None,
    ) -> None:
        """One protocol delivery, then the cursor moves past it."""
        batch = Batch(self.queue.producer_id, cursor.acked, bodies, cursor.confirmed, hints)
        backend: Any = self.backend
        ident = (key.project_key, key.session_id, key.subpath)
        self._in_doubt[ident] = (session_key, batch)
        try:
            receipt: Receipt = await self._call(
                "append_batch", backend.append_batch(session_key, batch)
            )
        except _BackendFailed as failed:
            if isinstance(failed.error, MarkBehindError | PermanentBackendError):
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

    async def _held_uuids(
        self, key: KeyRow, session_key: SessionKey, cursor: Cursor, bodies: list[bytes]
    ) -> set[str] | None:
        """The uuids the backend holds for this key, when this queue starts the key
        afresh (no delivery of it yet) and may be replaying entries that another
        queue stored (a re-import on another host, or after the key was forgotten):
        the SDK asks stores to treat ``uuid`` as an idempotency key. None otherwise."""
        if key.key_id in self._dedupe:
            return self._dedupe[key.key_id]
        fresh = cursor.acked == cursor.first_seq and cursor.confirmed is None
        if not fresh or not any(b'"uuid"' in body for body in bodies):
            return None
        stored = await self._call("load", self.backend.load(session_key)) or []
        held = {e["uuid"] for e in stored if isinstance(e, dict) and isinstance(e.get("uuid"), str)}
        if held:
            while len(self._dedupe) >= 256:  # a bounded working set
                del self._dedupe[next(iter(self._dedupe))]
            self._dedupe[key.key_id] = held
        return held or None

    async def _send_unheld(
        self,
        key: KeyRow,
        session_key: SessionKey,
        cursor: Cursor,
        bodies: list[bytes],
        held: set[str],
    ) -> int:
        """Deliver the batch's leading run of entries the backend does not hold (by
        uuid), or step over a leading run it holds without sending it (seqs may skip:
        marks only rise). One run per call; the next round goes on."""
        entries = _decode_queued(cursor.acked, bodies)
        holds = [isinstance(e.get("uuid"), str) and e["uuid"] in held for e in entries]
        if not any(holds):
            self._dedupe.pop(key.key_id, None)  # past the replayed part
        run = next((i for i, h in enumerate(holds) if h != holds[0]), len(holds))
        if holds[0]:
            await self.queue.ack(self.name, key.key_id, cursor.acked + run, cursor.confirmed, None)
            return run
        await self._send_batch(key, session_key, cursor, bodies[:run])
        return run

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
        for entry, body in zip(tail, _decode_queued(cursor.acked, bodies), strict=False):
            if entry != body:
                break
            held += 1
        # The old protocol left no mark for this producer: the next batch expects none.
        await self.queue.ack(self.name, key.key_id, cursor.acked + held, None, None)
        return held

    async def _send_foreign(
        self, key: KeyRow, session_key: SessionKey, cursor: Cursor, bodies: list[bytes]
    ) -> None:
        entries = _decode_queued(cursor.acked, bodies)
        to_send = entries
        # Does the backend hold nothing but this queue's entries of the key (``solo``)?
        solo = cursor.acked == cursor.first_seq or cursor.solo_length is not None
        if key.key_id not in self._verified:
            # A previous attempt (or a previous process) may have landed: skip
            # what the backend already holds, by uuid, before resending.
            stored = await self._call("load", self.backend.load(session_key)) or []
            held = uuids_of(stored)
            to_send = [e for e in entries if not held_uuid(e, held)]
            landed = len(entries) - len(to_send)
            solo = solo and len(stored) == cursor.acked - cursor.first_seq + landed
        if to_send:
            await self._call("append", self.backend.append(session_key, to_send))
        self._verified.add(key.key_id)
        last = cursor.acked + len(bodies) - 1
        length = last + 1 - cursor.first_seq if solo else None
        await self.queue.ack(self.name, key.key_id, last + 1, last, length)

    async def _call(self, op: str, call: Awaitable[T]) -> T:
        """A backend call, bounded by ``call_timeout``; whatever it raises comes out
        as ``_BackendFailed`` (so it is told apart from walmirror's own errors)."""
        with telemetry.span(
            "walmirror.backend_call", {telemetry.BACKEND: self.name, telemetry.OP: op}
        ) as span:
            try:
                async with asyncio.timeout(self.tuning.call_timeout):
                    result = await call
            except Exception as exc:
                self._count_call(span, op, exc)
                raise _BackendFailed(exc) from exc
            except asyncio.CancelledError:
                if _cancelled_from_outside():
                    raise
                # The client leaked a CancelledError of its own (a dropped connection).
                error = ConnectionError("the backend call was cancelled")
                self._count_call(span, op, error)
                raise _BackendFailed(error) from None
            self._count_call(span, op, None)
            return result

    # -- health ------------------------------------------------------------------

    def _record_failure(self, exc: BaseException) -> None:
        self.consecutive_failures += 1
        self.retries_total += 1
        self.last_error, self.last_error_at = describe_error(exc), time.time()
        telemetry.backend_retries.add(1, {"backend": self.name})
        telemetry.event(
            "walmirror.backoff",
            {
                "walmirror.consecutive_failures": self.consecutive_failures,
                **telemetry.error_attributes(exc),
            },
        )
        if self.consecutive_failures >= self.tuning.breaker_threshold:
            if self.breaker == "closed":
                logger.warning(
                    "flusher %s: breaker open after %d failures (%s)",
                    self.name,
                    self.consecutive_failures,
                    self.last_error,
                )
            self._set_breaker("open")
        logger.debug("flusher %s: retryable failure: %s", self.name, self.last_error)

    def _record_success(self) -> None:
        self._probed.clear()
        if self.breaker != "closed":
            logger.info("flusher %s: backend answers again; breaker closed", self.name)
        self.consecutive_failures = 0
        self._set_breaker("closed")

    def _set_breaker(self, state: BreakerState) -> None:
        previous, self.breaker = self.breaker, state
        if previous != state:
            self._breaker_changed(previous, state)

    def _breaker_changed(self, previous: BreakerState, state: BreakerState) -> None:
        """Telemetry of a breaker transition; closing after an outage starts the
        heal-to-caught-up clock, opening again stops it unrecorded."""
        telemetry.event(
            "walmirror.breaker",
            {
                "walmirror.breaker.from": previous,
                "walmirror.breaker.to": state,
                "walmirror.consecutive_failures": self.consecutive_failures,
            },
        )
        telemetry.breaker_transitions.add(1, {"backend": self.name, "state": state})
        if state == "closed":
            self._healed_at = time.monotonic()
        elif state == "open":
            self._healed_at = None

    def _note_backlog(self, oldest_age: float | None) -> None:
        """At the start of a round: has the backend caught up since its breaker
        closed, that is, is the oldest entry still to deliver (``oldest_age``
        seconds old; None: nothing deliverable) younger than that moment?"""
        if self._healed_at is None:
            return
        since = time.monotonic() - self._healed_at
        if oldest_age is None or oldest_age < since:
            self._healed_at = None
            telemetry.heal_to_caught_up.record(since, {"backend": self.name})
            telemetry.event("walmirror.caught_up", {"walmirror.heal_to_caught_up.seconds": since})

    @property
    def state(self) -> BreakerState:
        """closed: healthy; open: failing, only probes go out; half-open: a probe
        (a queued item, for a backend without ``ping``) is on its way."""
        return self.breaker


def _cancelled_from_outside() -> bool:
    """Is this task being cancelled (``stop``)? Else a CancelledError came up from a
    backend's client, and must not end the flusher."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _decode_queued(first_seq: int, bodies: list[bytes]) -> list[SessionStoreEntry]:
    """Entries as the queue holds them; ``CorruptQueueError`` names the first that
    does not parse (damage to the queue file: the key parks, the others go on)."""
    entries: list[SessionStoreEntry] = []
    for offset, body in enumerate(bodies):
        try:
            entries.append(decode_entry(body))
        except (ValueError, RecursionError):
            raise CorruptQueueError(
                f"the queued entry at seq {first_seq + offset} of this key is not valid JSON "
                "(the queue file is damaged)"
            ) from None
    return entries
