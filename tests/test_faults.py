"""Tests for walmirror.faults.FaultyStore."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk.testing.session_store_conformance import run_session_store_conformance
from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry
from memory_store import MemoryStore

import walmirror.faults
from walmirror.errors import PermanentBackendError
from walmirror.faults import FaultyStore
from walmirror.protocol import Batch, implements, is_producer_store

KEY: SessionKey = {"project_key": "proj", "session_id": "s1"}
OTHER: SessionKey = {"project_key": "proj", "session_id": "s2"}


def entry(n: int) -> SessionStoreEntry:
    return {"type": "user", "uuid": f"u{n}", "n": n}


class Clock:
    """A monotonic clock the test moves by hand: outage windows are checked at exact
    instants, whatever the machine's load (a busy machine only lengthens real sleeps)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """FaultyStore's clock (and only its clock) under the test's control."""
    fake = Clock()
    monkeypatch.setattr(walmirror.faults, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


class MinimalStore:
    """Only the two required methods, not subclassing SessionStore."""

    def __init__(self) -> None:
        self.data: dict[str, list[SessionStoreEntry]] = {}

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        self.data.setdefault(key["session_id"], []).extend(entries)

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        return self.data.get(key["session_id"])


async def test_down_raises_and_heals_after_duration(clock: Clock) -> None:
    store = FaultyStore(InMemorySessionStore())
    store.down(0.1)
    with pytest.raises(ConnectionError, match="backend down"):
        await store.append(KEY, [entry(1)])
    clock.advance(0.09)  # still inside the outage
    with pytest.raises(ConnectionError, match="backend down"):
        await store.load(KEY)
    clock.advance(0.02)  # past it: healed by itself
    assert not store.is_down
    await store.append(KEY, [entry(1)])
    assert await store.load(KEY) == [entry(1)]
    assert store.injected["down"] == 2


async def test_down_without_duration_until_up(clock: Clock) -> None:
    store = FaultyStore(InMemorySessionStore())
    store.down()
    clock.advance(1e9)  # no end of its own
    assert store.is_down
    with pytest.raises(ConnectionError):
        await store.append(KEY, [entry(1)])
    store.up()
    await store.append(KEY, [entry(1)])


async def test_scheduled_outage_window(clock: Clock) -> None:
    store = FaultyStore(InMemorySessionStore())
    store.schedule_outage(after=0.2, duration=0.6)
    clock.advance(0.19)
    await store.append(KEY, [entry(1)])  # before the window
    clock.advance(0.02)
    with pytest.raises(ConnectionError, match="backend down"):
        await store.append(KEY, [entry(2)])  # inside, near its start
    clock.advance(0.58)
    with pytest.raises(ConnectionError, match="backend down"):
        await store.append(KEY, [entry(2)])  # inside, near its end
    clock.advance(0.02)
    await store.append(KEY, [entry(3)])  # after
    assert await store.load(KEY) == [entry(1), entry(3)]


async def test_outage_relative_to_clock_start(clock: Clock) -> None:
    store = FaultyStore(InMemorySessionStore())
    clock.advance(5.0)
    store.restart_clock()
    assert store.elapsed() == 0.0
    store.outage(start=1.0, duration=2.0)  # from t=1 s to t=3 s after the restart
    clock.advance(0.99)
    assert not store.is_down
    clock.advance(0.02)
    assert store.is_down
    clock.advance(1.97)
    assert store.is_down and store.elapsed() == pytest.approx(2.98)
    clock.advance(0.02)
    assert not store.is_down
    store.outage(start=0.0, duration=60.0)
    assert store.is_down
    store.up()
    assert not store.is_down


async def test_error_rate_zero_never_fails_and_one_always_fails() -> None:
    ok = FaultyStore(InMemorySessionStore(), error_rate=0.0)
    for i in range(50):
        await ok.append(KEY, [entry(i)])
    assert ok.injected["error"] == 0

    inner = InMemorySessionStore()
    bad = FaultyStore(inner, error_rate=1.0)
    for i in range(20):
        with pytest.raises(ConnectionError, match="backend error"):
            await bad.append(KEY, [entry(i)])
    assert await inner.load(KEY) is None  # nothing landed
    assert bad.injected["error"] == 20
    assert bad.calls["append"] == 20


async def _failure_pattern(seed: int) -> list[bool]:
    store = FaultyStore(InMemorySessionStore(), seed=seed, error_rate=0.5)
    pattern = []
    for i in range(60):
        try:
            await store.append(KEY, [entry(i)])
            pattern.append(False)
        except ConnectionError:
            pattern.append(True)
    return pattern


async def test_seeded_error_rate_is_reproducible() -> None:
    first = await _failure_pattern(7)
    assert first == await _failure_pattern(7)
    assert any(first) and not all(first)


async def test_lost_reply_write_lands_and_call_raises() -> None:
    inner = InMemorySessionStore()
    store = FaultyStore(inner, lost_reply_rate=1.0)
    with pytest.raises(ConnectionError, match="reply lost"):
        await store.append(KEY, [entry(1)])
    assert await inner.load(KEY) == [entry(1)]
    assert await store.load(KEY) == [entry(1)]  # reads are not affected
    assert store.injected["lost_reply"] == 1


async def test_hang_times_out_and_nothing_lands() -> None:
    inner = InMemorySessionStore()
    store = FaultyStore(inner)
    store.hang_next(1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.append(KEY, [entry(1)]), 0.05)
    assert await inner.load(KEY) is None
    await store.append(KEY, [entry(2)])  # only the next call hung
    assert store.injected["hang"] == 1


async def test_hang_rate_one_hangs() -> None:
    store = FaultyStore(InMemorySessionStore(), hang_rate=1.0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.load(KEY), 0.05)


async def test_hang_after_write_lands_then_times_out() -> None:
    inner = InMemorySessionStore()
    store = FaultyStore(inner, hang_rate=1.0, hang_after_write=True)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.append(KEY, [entry(1)]), 0.05)
    assert await inner.load(KEY) == [entry(1)]
    assert store.injected["hang_after_write"] == 1


async def test_latency_is_added(monkeypatch: pytest.MonkeyPatch) -> None:
    # What is slept is recorded, not timed: the test holds on a saturated machine.
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(seconds: float) -> None:
        slept.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(walmirror.faults, "asyncio", SimpleNamespace(sleep=recording_sleep))
    store = FaultyStore(InMemorySessionStore(), latency=0.05, jitter=0.02, seed=3)
    await store.append(KEY, [entry(1)])
    assert await store.load(KEY) == [entry(1)]
    assert len(slept) == 2 and all(0.05 <= s <= 0.07 for s in slept), slept
    assert slept[0] != slept[1]  # the jitter is drawn per call
    store.latency = store.jitter = 0.0
    await store.append(KEY, [entry(2)])
    assert len(slept) == 2  # no latency, no sleep


async def test_reject_hits_only_matching_keys() -> None:
    store = FaultyStore(InMemorySessionStore())
    store.reject(lambda key: key["session_id"] == "s1")
    with pytest.raises(PermanentBackendError, match="rejected"):
        await store.append(KEY, [entry(1)])
    await store.append(OTHER, [entry(2)])
    assert await store.load(OTHER) == [entry(2)]
    assert await store.load(KEY) is None  # reads of the key still work by default
    assert store.injected["reject"] == 1
    store.accept_all()
    await store.append(KEY, [entry(1)])


async def test_writes_only_scope_leaves_reads_alone() -> None:
    store = FaultyStore(InMemorySessionStore(), writes_only=True)
    store.down()
    with pytest.raises(ConnectionError):
        await store.append(KEY, [entry(1)])
    assert await store.load(KEY) is None
    assert store.calls["append"] == 1 and store.calls["load"] == 1


def test_unknown_op_and_bad_rate_are_refused() -> None:
    with pytest.raises(ValueError):
        FaultyStore(InMemorySessionStore(), ops={"apend"})
    with pytest.raises(ValueError):
        FaultyStore(InMemorySessionStore(), error_rate=1.5)


def test_mirrors_in_memory_store_methods() -> None:
    store = FaultyStore(InMemorySessionStore())
    assert isinstance(store, FaultyStore)
    for method in ("list_sessions", "list_session_summaries", "delete", "list_subkeys"):
        assert implements(store, method), method
    assert getattr(store, "append_batch", None) is None
    assert not is_producer_store(store)


def test_minimal_store_has_no_optional_methods() -> None:
    store = FaultyStore(MinimalStore())  # type: ignore[arg-type]
    assert getattr(store, "append_batch", None) is None
    assert getattr(store, "length", None) is None
    for method in ("list_sessions", "list_session_summaries", "delete", "list_subkeys"):
        assert not implements(store, method), method
    assert type(store).delete is SessionStore.delete


async def test_a_protocol_store_keeps_its_protocol_methods() -> None:
    store: Any = FaultyStore(MemoryStore())
    assert is_producer_store(store)
    receipt = await store.append_batch(KEY, Batch.of("p1", 0, [entry(0), entry(1)]))
    assert receipt.appended == 2
    assert (await store.append_batch(KEY, Batch.of("p1", 1, [entry(1), entry(2)]))).appended == 1
    assert await store.producer_mark(KEY, "p1") == 2
    assert store.calls["append_batch"] == 2


async def test_a_held_write_fails_now_and_lands_when_released() -> None:
    inner = MemoryStore()
    store: Any = FaultyStore(inner)
    store.hold_next(1)
    with pytest.raises(ConnectionError, match="held"):
        await store.append(KEY, [entry(0)])
    assert await inner.load(KEY) is None and store.held == 1
    await store.append(KEY, [entry(1)])  # the next write goes through
    assert await store.release_held() == [None]
    assert await inner.load(KEY) == [entry(1), entry(0)]
    assert store.held == 0 and store.injected["held"] == 1


async def test_wrapping_a_faulty_store_keeps_the_method_set() -> None:
    store = FaultyStore(FaultyStore(MemoryStore()))  # type: ignore[arg-type]
    assert is_producer_store(store)
    assert implements(store, "delete")


async def test_conformance_with_no_faults() -> None:
    await run_session_store_conformance(lambda: FaultyStore(InMemorySessionStore()))


async def test_conformance_of_a_protocol_store_wrapper() -> None:
    await run_session_store_conformance(lambda: FaultyStore(MemoryStore()))  # type: ignore[arg-type]
