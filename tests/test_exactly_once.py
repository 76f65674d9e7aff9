"""Exactly once, in order (contract 2) and read your writes (contract 4) under random faults.

Hypothesis draws a schedule: appends to several keys (main keys and subagent
``subpath`` keys), interleaved with fault switches on a ``FaultyStore`` that
wraps the backend: error rate, lost replies (the write lands, the reply is
lost), hangs past the caller's timeout (before and after the write lands),
outages, pauses that let the flusher run into those faults, and restarts of
the mirroring store on the same queue file. Then every fault is healed, the
store is flushed, and each key's transcript is read from the *inner* store
(never through the wrapper) and compared with what was appended.

Two backends: ``FileStore`` (offset-aware: exactly once for every entry, with
or without ``uuid``) and the SDK's ``InMemorySessionStore`` (a foreign store:
at-least-once plus a uuid tail check, so exactly once for entries with uuids).

Each hypothesis example runs in its own event loop (``asyncio.run``) and its
own temporary directory, and closes its store.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore
from walmirror.faults import FaultyStore

KEYS: list[SessionKey] = [
    {"project_key": "proj", "session_id": "s1"},
    {"project_key": "proj", "session_id": "s1", "subpath": "subagents/agent-1"},
    {"project_key": "proj", "session_id": "s1", "subpath": "subagents/agent-2"},
    {"project_key": "proj", "session_id": "s2"},
    {"project_key": "other", "session_id": "s1"},
]

# Small timeouts and backoff: a hang costs one call_timeout, a failure a few ms.
# Small batches and a tiny linger so one schedule makes many backend calls.
# A healthy call that outlives call_timeout on a busy machine is one more ambiguous
# failure, which exactly-once must survive anyway. Reads through the wrapper are bound
# by it too, and in the read tests nothing faults them: a backend read there takes
# ~15 ms at worst with both CPUs saturated (measured), far inside 0.25 s. A larger
# call_timeout costs one call_timeout per injected hang: 1 s made the suite ~30 s slower.
TUNING: dict[str, Any] = {
    "call_timeout": 0.25,
    "backoff_initial": 0.005,
    "backoff_max": 0.05,
    "batch_linger": 0.0,
    "max_batch_entries": 3,
    "compact_interval": 0.05,
    "retention_seconds": 0.0,  # acknowledged entries leave the queue at once
}
# After the schedule, the faults in force keep acting this long before the heal, so
# a fault switched on by the last operations still meets the flusher.
FAULTY_TAIL = 0.15
# Hang guards, not timings: a healthy drain or read takes milliseconds, but the suite
# must pass on a saturated machine.
FLUSH_TIMEOUT = 60.0
READ_TIMEOUT = 60.0

BackendFactory = Callable[[Path], SessionStore]


def file_backend(tmp: Path) -> SessionStore:
    return FileStore(tmp / "backend")


def memory_backend(tmp: Path) -> SessionStore:
    return InMemorySessionStore()


def make_entry(key_index: int, n: int, with_uuid: bool) -> SessionStoreEntry:
    """Entry ``n`` of key ``key_index``: distinct from every other entry, uuid or not."""
    entry: dict[str, Any] = {"type": "user" if n % 2 == 0 else "assistant", "k": key_index, "n": n}
    if with_uuid:
        entry["uuid"] = f"k{key_index}-e{n}"
    return entry  # type: ignore[return-value]


def describe(entries: list[SessionStoreEntry]) -> list[tuple[Any, Any]]:
    """(key index, counter) per entry: short enough to read in a failure message."""
    return [(e.get("k"), e.get("n")) for e in entries]


# -- the schedule -------------------------------------------------------------------
#
# A schedule is a list of phases. A phase switches the backend into one fault
# state, then the session appends (and, for the read tests, reads) with short
# pauses, so the flusher meets that state; some phases end with a restart of
# the mirroring store on the same queue file.

# Hypothesis leans towards the first element of sampled_from: a fault first.
RATES_ERROR = st.sampled_from([0.3, 0.0, 0.6])
RATES_LOST = st.sampled_from([0.5, 0.0, 0.8])
RATES_HANG = st.sampled_from([0.2, 0.0, 0.4])
PHASE_TAIL = 0.03  # each phase's fault state also acts this long after its last step

append_op = st.tuples(
    st.just("append"),
    st.integers(0, len(KEYS) - 1),
    st.lists(st.booleans(), min_size=1, max_size=5),  # per entry: does it carry a uuid?
)
read_op = st.tuples(st.just("read"), st.integers(0, len(KEYS) - 1))


def schedules(
    *, reads: bool = False, restarts: bool = True, ambiguous: bool = True
) -> st.SearchStrategy[list[Any]]:
    """Lists of phases. ``ambiguous=False`` leaves out the failures after which the
    write may have landed (lost replies, hangs after the write); ``restarts=False``
    leaves out restarts, which can also cut a delivery between the backend's
    commit and the local ack."""
    after_write = st.booleans() if ambiguous else st.just(False)
    lost = RATES_LOST if ambiguous else st.just(0.0)
    fault_state = st.one_of(
        st.tuples(st.just("flaky"), RATES_ERROR, lost, RATES_HANG, after_write),
        st.tuples(st.just("hang_next"), st.integers(1, 2), after_write),
        st.just(("down",)),  # an outage for the whole phase
        st.just(("down_for", 0.04)),  # a short outage that heals by itself mid-phase
        st.just(("healthy",)),
    )
    step = st.one_of(append_op, append_op, read_op) if reads else append_op
    restart = st.sampled_from([False, False, False, True]) if restarts else st.just(False)
    phase = st.tuples(
        fault_state,
        st.lists(step, min_size=1, max_size=6),
        st.sampled_from([0.01, 0.0, 0.03]),  # pause after each step
        restart,
    )
    return st.lists(phase, min_size=2, max_size=8)


class Run:
    """One schedule against one backend: the store, its faults and what was appended."""

    def __init__(self, tmp: Path, make_backend: BackendFactory, *, writes_only: bool = False):
        self.tmp = tmp
        self.inner = make_backend(tmp)
        self.faulty = FaultyStore(self.inner, seed=1, writes_only=writes_only)
        self.wal = tmp / "queue.db"
        self.store = DurableSessionStore(self.faulty, self.wal, **TUNING)
        self.expected: list[list[SessionStoreEntry]] = [[] for _ in KEYS]

    async def append(self, key_index: int, uuid_flags: list[bool]) -> None:
        start = len(self.expected[key_index])
        batch = [make_entry(key_index, start + i, flag) for i, flag in enumerate(uuid_flags)]
        await self.store.append(KEYS[key_index], batch)
        self.expected[key_index].extend(batch)

    def set_faults(self, state: tuple[Any, ...]) -> None:
        faulty = self.faulty
        faulty.reset_faults()
        kind = state[0]
        if kind == "flaky":
            _, faulty.error_rate, faulty.lost_reply_rate, faulty.hang_rate = state[:4]
            faulty.hang_after_write = state[4]
        elif kind == "hang_next":
            faulty.hang_after_write = state[2]
            faulty.hang_next(state[1])
        elif kind == "down":
            faulty.down()
        elif kind == "down_for":
            faulty.down(state[1])
        elif kind != "healthy":  # pragma: no cover - a typo in the strategies
            raise AssertionError(f"unknown fault state {kind}")

    async def run_phases(self, phases: list[Any], *, all_uuids: bool) -> None:
        for state, steps, pause, restart in phases:
            self.set_faults(state)
            for step in steps:
                if step[0] == "append":
                    flags = [True] * len(step[2]) if all_uuids else step[2]
                    await self.append(step[1], flags)
                else:
                    await self.check_read(step[1])
                await asyncio.sleep(pause)
            await asyncio.sleep(PHASE_TAIL)
            if restart:
                await self.restart()

    async def restart(self) -> None:
        """The mirroring process goes away without draining; a new one opens the same
        queue file and must pick up where the last one left off."""
        await self.store.close(timeout=0)
        self.store = DurableSessionStore(self.faulty, self.wal, **TUNING)

    async def heal_and_flush(self, *, in_hypothesis: bool = False) -> None:
        await asyncio.sleep(FAULTY_TAIL)
        if in_hypothesis:
            self.record_coverage()
        self.faulty.reset_faults()
        await self.store.flush(timeout=FLUSH_TIMEOUT)

    async def check_backend(self) -> None:
        """Every key in the inner store equals what was appended: none missing, none twice."""
        for index, key in enumerate(KEYS):
            stored = await self.inner.load(key) or []
            assert describe(stored) == describe(self.expected[index]), f"key {key}"
            assert stored == self.expected[index], f"key {key}: contents differ"

    async def check_read(self, key_index: int) -> None:
        """Reading through the wrapper returns exactly the appended entries, in order."""
        key = KEYS[key_index]
        loaded = await asyncio.wait_for(self.store.load(key), READ_TIMEOUT) or []
        assert describe(loaded) == describe(self.expected[key_index]), f"load({key})"
        assert loaded == self.expected[key_index], f"load({key}): contents differ"

    def record_coverage(self) -> None:
        """Tell hypothesis which faults hit a call (``--hypothesis-show-statistics``)."""
        for kind, count in sorted(self.faulty.injected.items()):
            if count:
                event(f"injected: {kind}")

    async def close(self) -> None:
        await self.store.close(timeout=5)


def run_in_tmp(body: Callable[[Path], Any]) -> None:
    """Run ``body(tmp)`` in a fresh event loop and a fresh temporary directory."""
    tmp = Path(tempfile.mkdtemp(prefix="walmirror-eo-"))
    try:
        asyncio.run(body(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def exactly_once(
    tmp: Path, make_backend: BackendFactory, phases: list[Any], *, all_uuids: bool
) -> None:
    run = Run(tmp, make_backend)
    try:
        await run.run_phases(phases, all_uuids=all_uuids)
        await run.heal_and_flush(in_hypothesis=True)
        await run.check_backend()
    finally:
        await run.close()


PROPERTY = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Reads wait for in-flight deliveries (hangs last a call_timeout): fewer examples.
READ_PROPERTY = settings(PROPERTY, max_examples=15)


# -- contract 2: exactly once, in order ----------------------------------------------


@PROPERTY
@given(phases=schedules())
def test_file_store_gets_every_entry_exactly_once_in_order(phases: list[Any]) -> None:
    # contract 2: exactly once, in order -- offset-aware backend, entries with and
    # without uuid, after errors, lost replies, hangs before/after the write,
    # outages and restarts.
    run_in_tmp(lambda tmp: exactly_once(tmp, file_backend, phases, all_uuids=False))


@PROPERTY
@given(phases=schedules())
def test_foreign_store_gets_every_uuid_entry_exactly_once_in_order(phases: list[Any]) -> None:
    # contract 2: a foreign SessionStore (no offsets) gets at-least-once delivery
    # plus a uuid tail check before resending: exactly once for entries with uuids.
    run_in_tmp(lambda tmp: exactly_once(tmp, memory_backend, phases, all_uuids=True))


async def wait_injected(faulty: FaultyStore, kind: str, before: int) -> None:
    """Wait until the flusher ran into the fault ``kind`` (so the fault really bit)."""
    async with asyncio.timeout(60):  # a hang guard
        while faulty.injected[kind] <= before:
            await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    ("make_backend", "all_uuids"),
    [(file_backend, False), (memory_backend, True)],
    ids=["file-store", "foreign-store"],
)
def test_each_fault_kind_hits_delivery_and_still_exactly_once(
    make_backend: BackendFactory, all_uuids: bool
) -> None:
    # contract 2: every ambiguous and unambiguous failure, one after another, each
    # one confirmed to have hit a delivery (so a schedule that dodges the faults
    # cannot make this pass), then exactly once after healing.
    async def body(tmp: Path) -> None:
        run = Run(tmp, make_backend)
        faulty = run.faulty
        flags = [True, all_uuids, True]
        try:

            def errors() -> None:
                faulty.error_rate = 1.0

            def lost_replies() -> None:
                faulty.lost_reply_rate = 1.0

            def hang_before_write() -> None:
                faulty.hang_after_write = False
                faulty.hang_next(1)

            def hang_after_write() -> None:
                faulty.hang_after_write = True
                faulty.hang_next(1)

            steps: list[tuple[str, Callable[[], None]]] = [
                ("error", errors),
                ("lost_reply", lost_replies),
                ("hang", hang_before_write),
                ("hang_after_write", hang_after_write),
                ("down", faulty.down),
            ]
            for kind, switch_on in steps:
                before = faulty.injected[kind]
                switch_on()
                for key_index in range(len(KEYS)):
                    await run.append(key_index, flags)
                await wait_injected(faulty, kind, before)
                faulty.reset_faults()
                await run.store.flush(timeout=FLUSH_TIMEOUT)
                await run.check_backend()
            # All at once, with lost replies on every write until healed.
            faulty.lost_reply_rate = 1.0
            faulty.error_rate = 0.3
            for key_index in range(len(KEYS)):
                await run.append(key_index, flags)
            await wait_injected(faulty, "lost_reply", faulty.injected["lost_reply"])
            await run.heal_and_flush()
            await run.check_backend()
        finally:
            await run.close()

    run_in_tmp(body)


# -- contract 4: read your writes through the wrapper during faults ------------------


async def read_your_writes(
    tmp: Path, make_backend: BackendFactory, phases: list[Any], *, all_uuids: bool
) -> None:
    # Faults hit writes only: reads reach the backend, so load must merge the
    # backend's copy with what is still queued, without gaps or repeats.
    run = Run(tmp, make_backend, writes_only=True)
    try:
        await run.run_phases(phases, all_uuids=all_uuids)
        for key_index in range(len(KEYS)):  # still faulty here: nothing healed yet
            await run.check_read(key_index)
        await run.heal_and_flush(in_hypothesis=True)
        for key_index in range(len(KEYS)):
            await run.check_read(key_index)
    finally:
        await run.close()


@READ_PROPERTY
@given(phases=schedules(reads=True))
def test_file_store_load_through_wrapper_reads_your_writes_during_faults(
    phases: list[Any],
) -> None:
    # contract 4: read your writes -- load on the wrapper equals what was
    # appended while writes fail, hang (before or after landing), lose replies
    # or the backend is down for writes (offset-aware backend: merge by offset).
    run_in_tmp(lambda tmp: read_your_writes(tmp, file_backend, phases, all_uuids=False))


@READ_PROPERTY
@given(phases=schedules(reads=True, ambiguous=True, restarts=True))
def test_foreign_store_load_through_wrapper_reads_your_writes_during_faults(
    phases: list[Any],
) -> None:
    # contract 4: read your writes -- the same for a foreign store, whose merge
    # cannot use offsets and skips queued entries the backend holds by uuid,
    # under every fault kind, ambiguous ones and restarts included.
    run_in_tmp(lambda tmp: read_your_writes(tmp, memory_backend, phases, all_uuids=True))


async def load_after_lost_reply(tmp: Path, make_backend: BackendFactory) -> None:
    """Append, let the first write land with its reply lost, read through the wrapper
    while the flusher backs off (breaker open after one failure, 30 s probe interval:
    the read is deterministically inside the window before the retry). No call may
    time out here (nothing hangs): a healthy call cut short on a busy machine would
    open the breaker before the lost reply and leave it open for 30 s."""
    inner = make_backend(tmp)
    faulty = FaultyStore(inner, writes_only=True, lost_reply_rate=1.0)
    tuning = {
        **TUNING,
        "call_timeout": 30.0,
        "breaker_threshold": 1,
        "backoff_max": 30.0,
        "probe_interval": 30.0,
    }
    store = DurableSessionStore(faulty, tmp / "queue.db", **tuning)
    key = KEYS[1]
    entries = [make_entry(1, n, True) for n in range(3)]
    try:
        await store.append(key, entries)
        await wait_injected(faulty, "lost_reply", 0)
        assert await inner.load(key) == entries  # the write landed; walmirror cannot know
        loaded = await asyncio.wait_for(store.load(key), READ_TIMEOUT)
        assert describe(loaded or []) == describe(entries)
    finally:
        await store.close(timeout=0)


def test_file_store_load_after_lost_reply_has_no_repeats() -> None:
    # contract 4: read your writes -- after a write landed but its reply was lost,
    # the offset-aware merge shows each entry once (backend length beats the cursor).
    run_in_tmp(lambda tmp: load_after_lost_reply(tmp, file_backend))


def test_foreign_store_load_after_lost_reply_has_no_repeats() -> None:
    # contract 4: read your writes -- a foreign store after a write that landed with
    # its reply lost: load must not return the landed entries twice.
    run_in_tmp(lambda tmp: load_after_lost_reply(tmp, memory_backend))


async def load_after_restart_mid_delivery(tmp: Path, make_backend: BackendFactory) -> None:
    """A delivery lands in the backend and the process goes away before the local ack
    (a write that hangs after landing, then close without draining); the next process
    on the same queue file cannot deliver (backend down for writes) and is read."""
    inner = make_backend(tmp)
    faulty = FaultyStore(inner, writes_only=True, hang_after_write=True)
    tuning = {
        **TUNING,
        "call_timeout": 30.0,
        "breaker_threshold": 1,
        "backoff_max": 30.0,
        "probe_interval": 30.0,
    }
    key = KEYS[1]
    landed = [make_entry(1, n, True) for n in range(3)]
    queued = [make_entry(1, 3, True)]
    first = DurableSessionStore(faulty, tmp / "queue.db", **tuning)
    try:
        faulty.hang_next(1)
        await first.append(key, landed)
        await wait_injected(faulty, "hang_after_write", 0)  # landed, reply never comes
        await first.append(key, queued)
        assert await inner.load(key) == landed
    finally:
        await first.close(timeout=0)  # the process goes away before the ack
    faulty.reset_faults()
    faulty.down()
    second = DurableSessionStore(faulty, tmp / "queue.db", **tuning)
    try:
        loaded = await asyncio.wait_for(second.load(key), READ_TIMEOUT)
        assert describe(loaded or []) == describe(landed + queued)
    finally:
        await second.close(timeout=0)


def test_file_store_load_after_restart_mid_delivery_has_no_repeats() -> None:
    # contract 4: read your writes, across a restart that cut a delivery between
    # the backend's commit and the local ack (offset-aware: merge by length).
    run_in_tmp(lambda tmp: load_after_restart_mid_delivery(tmp, file_backend))


def test_foreign_store_load_after_restart_mid_delivery_has_no_repeats() -> None:
    # contract 4: read your writes -- the same across a restart, for a foreign store.
    run_in_tmp(lambda tmp: load_after_restart_mid_delivery(tmp, memory_backend))
