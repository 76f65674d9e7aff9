"""A fault-injecting ``SessionStore`` wrapper for tests, ``walmirror demo`` and benchmarks.

``FaultyStore(inner)`` forwards every call to ``inner`` and, on the way, can
inject the trouble a remote backend gives in production. Every fault can be
combined with the others and switched on or off at any time (they are plain
attributes and methods on the store):

``down(duration=None)`` / ``up()``
    The backend is unreachable (server stopped, network partition, DNS gone):
    every call raises ``ConnectionError("backend down (injected)")`` before
    reaching the inner store. With a duration it heals by itself afterwards.

``outage(start, duration)`` / ``schedule_outage(after, duration)``
    The same, on a timetable: down from ``start`` to ``start + duration``
    seconds after the store's clock started (``started_at``, reset by
    ``restart_clock()``), or from ``after`` seconds from now. A demo can say
    "down from t=2 s to t=7 s".

``error_rate``
    A flaky backend (dropped connections, 5xx, throttling): each call fails
    with ``ConnectionError`` with this probability, before the inner store is
    touched, so nothing lands.

``latency`` / ``jitter``
    A slow or distant backend: ``latency`` seconds (plus a uniform random
    ``0..jitter``) are slept before each call.

``lost_reply_rate``
    A timeout whose write landed: a write call reaches the inner store and
    succeeds, then the caller gets ``ConnectionError("reply lost (injected)")``.
    The caller cannot tell this from a failed write; retrying naively
    duplicates entries.

``hang_rate`` / ``hang_next(n)`` / ``hang_after_write``
    A backend that accepts the connection and never answers: the call sleeps
    ``hang_seconds`` (default an hour, far past any caller timeout; cancelling
    the task ends it). With ``hang_after_write`` set, write calls hang *after*
    the write landed (an ambiguous timeout); reads always hang before.

``hold_next(n)`` / ``release_held()``
    A write that arrives late: the next ``n`` write calls in scope fail at
    once with ``ConnectionError("write held (injected)")`` (the caller sees a
    timeout) while the write itself is kept, unsent; ``release_held()`` sends
    the held writes now, in order, long after the caller gave up on them
    (say, after a delete).

``reject(predicate)``
    A backend that refuses one key's batch for good (validation, size,
    permission): calls whose key matches raise
    ``walmirror.errors.PermanentBackendError("rejected (injected)")``. By
    default only writes are rejected; pass ``ops`` to widen it.

Scope: the transient faults (down, outages, error rate, latency, hangs) apply
to the operations in ``store.ops`` (default: all of them; ``writes_only=True``
means ``append``, ``append_batch`` and ``delete``). Lost replies and hangs after
the write apply only to write operations in scope. Rejection has its own
``ops`` set, given to ``reject()``.

Counters: ``store.calls`` counts calls per operation (whether or not a fault
hit them) and ``store.injected`` counts injected faults per kind (``"down"``,
``"error"``, ``"lost_reply"``, ``"hang"``, ``"hang_after_write"``,
``"reject"``, ``"held"``). Random faults draw from ``random.Random(seed)``, so a seeded
store injects the same sequence of faults for the same sequence of calls.

Method mirroring: the SDK and walmirror probe a store's optional methods by
checking whether ``type(store).method`` overrides the ``SessionStore``
protocol's default, and the delivery protocol by
``callable(getattr(store, "append_batch", None))``. So a wrapper must expose
exactly the methods its inner store has. ``FaultyStore.__new__`` does this: it
looks at which optional methods ``inner`` implements and instantiates a
subclass that combines ``FaultyStore`` (``append`` and ``load`` only) with one
small mixin per such method (built once per method set and cached). The
result is still an instance of ``FaultyStore``; a missing method is simply not
on the class, so no ``__getattr__`` tricks are involved.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar, cast

from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)

from .errors import PermanentBackendError
from .protocol import Batch, ProducerStore, Receipt, implements

__all__ = ["ALL_OPS", "READ_OPS", "WRITE_OPS", "FaultyStore", "KeyPredicate"]

T = TypeVar("T")
KeyPredicate = Callable[[SessionKey], bool]

WRITE_OPS: frozenset[str] = frozenset({"append", "append_batch", "delete"})
READ_OPS: frozenset[str] = frozenset(
    {
        "load",
        "length",
        "producer_mark",
        "list_sessions",
        "list_session_summaries",
        "list_subkeys",
        "ping",
    }
)
ALL_OPS: frozenset[str] = WRITE_OPS | READ_OPS

_SDK_OPTIONAL = ("list_sessions", "list_session_summaries", "delete", "list_subkeys")
_PROTOCOL_METHODS = ("append_batch", "producer_mark", "length", "ping")


def _check_ops(ops: Iterable[str]) -> frozenset[str]:
    result = frozenset(ops)
    unknown = result - ALL_OPS
    if unknown:
        raise ValueError(f"unknown operations: {sorted(unknown)}")
    return result


def _check_rate(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
    return value


class FaultyStore(SessionStore):
    """Wraps ``inner`` and injects faults; see the module docstring."""

    def __new__(cls, inner: SessionStore, *args: Any, **kwargs: Any) -> FaultyStore:
        target = _class_for(_methods_of(inner)) if cls is FaultyStore else cls
        return super().__new__(target)

    def __init__(
        self,
        inner: SessionStore,
        *,
        seed: int | None = None,
        ops: Iterable[str] | None = None,
        writes_only: bool = False,
        latency: float = 0.0,
        jitter: float = 0.0,
        error_rate: float = 0.0,
        lost_reply_rate: float = 0.0,
        hang_rate: float = 0.0,
        hang_after_write: bool = False,
        hang_seconds: float = 3600.0,
    ) -> None:
        if ops is not None and writes_only:
            raise ValueError("pass either ops or writes_only, not both")
        self.inner = inner
        self.ops: frozenset[str] = _check_ops(
            WRITE_OPS if writes_only else ALL_OPS if ops is None else ops
        )
        self.latency = latency
        self.jitter = jitter
        self.error_rate = _check_rate("error_rate", error_rate)
        self.lost_reply_rate = _check_rate("lost_reply_rate", lost_reply_rate)
        self.hang_rate = _check_rate("hang_rate", hang_rate)
        self.hang_after_write = hang_after_write
        self.hang_seconds = hang_seconds
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.started_at = time.monotonic()
        self._random = random.Random(seed)
        self._down_until = 0.0
        self._outages: list[tuple[float, float]] = []
        self._hangs_pending = 0
        self._rejects: list[tuple[KeyPredicate, frozenset[str], Callable[[], Exception]]] = []
        self._holds_pending = 0
        self._held: list[Callable[[], Awaitable[Any]]] = []

    # The protocol's own defaults, named here so type checkers see a concrete
    # class. They are the very same objects, so the SDK's probe
    # (``type(store).delete is not SessionStore.delete``) still sees no override;
    # the mixins below replace them when ``inner`` has the method.
    list_sessions = SessionStore.list_sessions
    list_session_summaries = SessionStore.list_session_summaries
    delete = SessionStore.delete
    list_subkeys = SessionStore.list_subkeys

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r})"

    # -- switching faults -------------------------------------------------

    @property
    def cursor_name(self) -> str | None:
        """The inner store's cursor name: wrapping a backend in faults keeps its cursor."""
        name = getattr(self.inner, "cursor_name", None)
        return name if isinstance(name, str) else None

    def down(self, duration: float | None = None) -> None:
        """Fail every call in scope until ``up()``, or for ``duration`` seconds."""
        self._down_until = float("inf") if duration is None else time.monotonic() + duration

    def up(self) -> None:
        """End a ``down()`` and cancel every scheduled outage."""
        self._down_until = 0.0
        self._outages.clear()

    def restart_clock(self) -> None:
        """Make now ``t=0`` for ``outage()`` and ``elapsed()``."""
        self.started_at = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the store's clock started."""
        return time.monotonic() - self.started_at

    def outage(self, start: float, duration: float) -> None:
        """Be down from ``start`` to ``start + duration`` seconds after ``started_at``."""
        begin = self.started_at + start
        self._outages.append((begin, begin + duration))

    def schedule_outage(self, after: float, duration: float) -> None:
        """Be down from ``after`` seconds from now, for ``duration`` seconds."""
        begin = time.monotonic() + after
        self._outages.append((begin, begin + duration))

    @property
    def is_down(self) -> bool:
        """True while ``down()`` or a scheduled outage is in effect."""
        now = time.monotonic()
        return now < self._down_until or any(a <= now < b for a, b in self._outages)

    def hang_next(self, n: int = 1) -> None:
        """Make the next ``n`` calls in scope hang (after the write if ``hang_after_write``)."""
        self._hangs_pending += n

    def hold_next(self, n: int = 1) -> None:
        """Keep the next ``n`` writes in scope unsent; their callers see a failure now."""
        self._holds_pending += n

    @property
    def held(self) -> int:
        """Writes held by ``hold_next`` and not yet released."""
        return len(self._held)

    async def release_held(self) -> list[Any]:
        """Send the held writes now, in the order they were made; return each result
        (or the exception it raised)."""
        held, self._held = self._held, []
        results: list[Any] = []
        for call in held:
            try:
                results.append(await call())
            except Exception as exc:
                results.append(exc)
        return results

    def reject(
        self,
        predicate: KeyPredicate,
        *,
        ops: Iterable[str] = WRITE_OPS,
        error: Callable[[], Exception] | None = None,
    ) -> None:
        """Reject calls in ``ops`` whose key matches ``predicate``, every time.

        The error is ``PermanentBackendError("rejected (injected)")`` unless
        ``error`` makes another (say, a ``ConnectionError``: one key that keeps
        failing in a way that looks retryable). ``list_subkeys`` passes its
        ``{project_key, session_id}`` key; the project-wide listings and ``ping``
        have no key and are never rejected.
        """
        make = error or (lambda: PermanentBackendError("rejected (injected)"))
        self._rejects.append((predicate, _check_ops(ops), make))

    def accept_all(self) -> None:
        """Drop every ``reject()`` rule."""
        self._rejects.clear()

    def reset_faults(self) -> None:
        """Switch every fault off (counters are kept)."""
        self.up()
        self.accept_all()
        self._hangs_pending = self._holds_pending = 0
        self.latency = self.jitter = 0.0
        self.error_rate = self.lost_reply_rate = self.hang_rate = 0.0

    def reset_counters(self) -> None:
        self.calls.clear()
        self.injected.clear()

    # -- the one place faults happen ------------------------------------------

    def _chance(self, rate: float) -> bool:
        return rate > 0.0 and self._random.random() < rate

    async def _hang(self, kind: str) -> None:
        self.injected[kind] += 1
        await asyncio.sleep(self.hang_seconds)
        raise ConnectionError("hang ended (injected)")

    async def _run(self, op: str, key: SessionKey | None, call: Callable[[], Awaitable[T]]) -> T:
        self.calls[op] += 1
        in_scope = op in self.ops
        is_write = op in WRITE_OPS
        if in_scope and self.is_down:
            self.injected["down"] += 1
            raise ConnectionError("backend down (injected)")
        if key is not None:
            for predicate, ops, make_error in self._rejects:
                if op in ops and predicate(key):
                    self.injected["reject"] += 1
                    raise make_error()
        if in_scope and is_write and self._holds_pending > 0:
            self._holds_pending -= 1
            self.injected["held"] += 1
            self._held.append(call)
            raise ConnectionError("write held (injected)")
        hang = False
        if in_scope:
            if self.latency > 0.0 or self.jitter > 0.0:
                await asyncio.sleep(self.latency + self._random.uniform(0.0, self.jitter))
            if self._chance(self.error_rate):
                self.injected["error"] += 1
                raise ConnectionError("backend error (injected)")
            if self._hangs_pending > 0:
                self._hangs_pending -= 1
                hang = True
            else:
                hang = self._chance(self.hang_rate)
        after_write = hang and is_write and self.hang_after_write
        if hang and not after_write:
            await self._hang("hang")
        result = await call()
        if after_write:
            await self._hang("hang_after_write")
        if in_scope and is_write and self._chance(self.lost_reply_rate):
            self.injected["lost_reply"] += 1
            raise ConnectionError("reply lost (injected)")
        return result

    # -- required SessionStore methods ----------------------------------------

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        await self._run("append", key, lambda: self.inner.append(key, entries))

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        return await self._run("load", key, lambda: self.inner.load(key))


# -- optional methods, one mixin each; FaultyStore.__new__ picks the set -------


class _ListSessions(FaultyStore):
    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        return await self._run("list_sessions", None, lambda: self.inner.list_sessions(project_key))


class _ListSessionSummaries(FaultyStore):
    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        return await self._run(
            "list_session_summaries", None, lambda: self.inner.list_session_summaries(project_key)
        )


class _Delete(FaultyStore):
    async def delete(self, key: SessionKey) -> None:
        await self._run("delete", key, lambda: self.inner.delete(key))


class _ListSubkeys(FaultyStore):
    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        as_key: SessionKey = {"project_key": key["project_key"], "session_id": key["session_id"]}
        return await self._run("list_subkeys", as_key, lambda: self.inner.list_subkeys(key))


class _AppendBatch(FaultyStore):
    async def append_batch(self, key: SessionKey, batch: Batch) -> Receipt:
        inner = cast(ProducerStore, self.inner)
        return await self._run("append_batch", key, lambda: inner.append_batch(key, batch))


class _ProducerMark(FaultyStore):
    async def producer_mark(self, key: SessionKey, producer: str) -> int | None:
        inner = cast(ProducerStore, self.inner)
        return await self._run("producer_mark", key, lambda: inner.producer_mark(key, producer))


class _Length(FaultyStore):
    async def length(self, key: SessionKey) -> int:
        inner: Any = self.inner  # length() is an optional extra of the backends
        return int(await self._run("length", key, lambda: inner.length(key)))


class _Ping(FaultyStore):
    async def ping(self) -> None:
        inner: Any = self.inner  # ping() is the backends' optional health call
        await self._run("ping", None, inner.ping)


_MIXINS: dict[str, type[FaultyStore]] = {
    "list_sessions": _ListSessions,
    "list_session_summaries": _ListSessionSummaries,
    "delete": _Delete,
    "list_subkeys": _ListSubkeys,
    "append_batch": _AppendBatch,
    "producer_mark": _ProducerMark,
    "length": _Length,
    "ping": _Ping,
}


def _methods_of(inner: SessionStore) -> tuple[str, ...]:
    """The optional methods ``inner`` really has, probed the way the SDK probes."""
    sdk = [m for m in _SDK_OPTIONAL if implements(inner, m)]
    protocol = [m for m in _PROTOCOL_METHODS if callable(getattr(inner, m, None))]
    return (*sdk, *protocol)


@functools.cache
def _class_for(methods: tuple[str, ...]) -> type[FaultyStore]:
    if not methods:
        return FaultyStore
    bases = tuple(_MIXINS[m] for m in methods)
    # Named plainly: the name shows up in cursor names, status and logs.
    namespace = {"__module__": __name__, "__qualname__": "FaultyStore"}
    return cast(type[FaultyStore], type("FaultyStore", bases, namespace))
