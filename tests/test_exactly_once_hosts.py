"""Exactly once with several hosts, hand-offs and deletes, under random faults (contract 2, 5).

Hypothesis draws a schedule for two or three hosts (each a ``DurableSessionStore``
with its own queue file and its own ``FaultyStore`` on one shared backend):
appends by any host to any key (half the entries without a ``uuid``), deletes
by any host, restarts of a host on its queue file, and per-host fault states
(errors, lost replies, hangs before and after the write, outages). Then every
fault heals, every host flushes, and the backend is checked:

- no entry is stored twice, and each host's entries of a key keep its append
  order;
- every entry appended after a key's last delete is stored (nothing lost);
- no entry that was acknowledged by the backend before a delete of its key is
  stored afterwards (deletes fence late writes and retries), and no entry the
  deleting host had queued before its delete is stored.

A delete is followed by a flush of the deleting host, faults paused, so the
delete has reached the backend before the schedule goes on: only then do
"after the delete" appends of other hosts have a defined meaning (the SDK's
rule: across hosts, order is the storage's commit order).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory_store import MemoryStorage, MemoryStore
from test_exactly_once import FLUSH_TIMEOUT, KEYS, RATES_ERROR, RATES_HANG, RATES_LOST, run_in_tmp

from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore
from walmirror.faults import FaultyStore

TUNING: dict[str, Any] = {
    "call_timeout": 0.25,
    "backoff_initial": 0.005,
    "backoff_max": 0.05,
    "batch_linger": 0.0,
    "max_batch_entries": 3,
    "compact_interval": 0.05,
    "retention_seconds": 0.0,
}
HOSTS = 3
STEP_TIMEOUT = 60.0  # a hang guard: a step takes milliseconds, even on a saturated machine

fault_state = st.one_of(
    st.tuples(st.just("flaky"), RATES_ERROR, RATES_LOST, RATES_HANG, st.booleans()),
    st.just(("down",)),
    st.just(("healthy",)),
)
op = st.one_of(
    st.tuples(
        st.just("append"),
        st.integers(0, HOSTS - 1),
        st.integers(0, len(KEYS) - 1),
        st.lists(st.booleans(), min_size=1, max_size=4),
    ),
    st.tuples(
        st.just("append"),
        st.integers(0, HOSTS - 1),
        st.integers(0, len(KEYS) - 1),
        st.lists(st.booleans(), min_size=1, max_size=4),
    ),
    st.tuples(st.just("delete"), st.integers(0, HOSTS - 1), st.integers(0, len(KEYS) - 1)),
    st.tuples(st.just("faults"), st.integers(0, HOSTS - 1), fault_state),
    st.tuples(st.just("restart"), st.integers(0, HOSTS - 1)),
    st.tuples(st.just("pause"), st.sampled_from([0.0, 0.02])),
)
schedules = st.lists(op, min_size=3, max_size=25)


def covers(deleted: SessionKey, key: SessionKey) -> bool:
    """A delete of a main key takes its subkeys with it."""
    same = (deleted["project_key"], deleted["session_id"]) == (
        key["project_key"],
        key["session_id"],
    )
    return same and (deleted.get("subpath") in (None, key.get("subpath")))


class Host:
    def __init__(self, index: int, tmp: Path, backend: SessionStore) -> None:
        self.index = index
        self.wal = tmp / f"host-{index}.db"
        self.faulty = FaultyStore(backend, seed=index)
        self.store = DurableSessionStore(self.faulty, self.wal, **TUNING)
        # Per key: the entries of this host's current queue row, in append order.
        self.row: list[list[SessionStoreEntry]] = [[] for _ in KEYS]

    def set_faults(self, state: tuple[Any, ...]) -> None:
        self.faulty.reset_faults()
        if state[0] == "flaky":
            _, self.faulty.error_rate, self.faulty.lost_reply_rate, self.faulty.hang_rate = state[
                :4
            ]
            self.faulty.hang_after_write = state[4]
        elif state[0] == "down":
            self.faulty.down()

    async def acknowledged(self, key_index: int) -> list[SessionStoreEntry]:
        """The entries of its current row the backend acknowledged."""
        await self.store.start()  # a host restarted and not used since opens its queue
        view = await self.store.queue.local_view(KEYS[key_index], self.store.backend_names[0])
        if view is None:
            return []
        return self.row[key_index][: view.cursor.acked - view.cursor.first_seq]

    async def restart(self) -> None:
        await self.store.close(timeout=0)
        self.store = DurableSessionStore(self.faulty, self.wal, **TUNING)


class World:
    """The hosts, and the bookkeeping the final check needs."""

    def __init__(self, tmp: Path, backend: SessionStore, make_client: Any) -> None:
        self.inner = backend
        self.hosts = [Host(i, tmp, make_client()) for i in range(HOSTS)]
        self.counter = 0
        self.must: list[set[str]] = [set() for _ in KEYS]  # appended after the last delete
        self.never: list[set[str]] = [set() for _ in KEYS]  # deleted for good

    async def append(self, host: Host, key_index: int, flags: list[bool]) -> None:
        batch: list[SessionStoreEntry] = []
        for flag in flags:
            self.counter += 1
            entry: dict[str, Any] = {"type": "user", "h": host.index, "c": self.counter}
            if flag:
                entry["uuid"] = f"u{self.counter}"
            batch.append(entry)  # type: ignore[arg-type]
        await host.store.append(KEYS[key_index], batch)
        host.row[key_index].extend(batch)
        self.must[key_index].update(_ident(e) for e in batch)

    async def delete(self, host: Host, key_index: int) -> None:
        deleted = KEYS[key_index]
        covered = [i for i, key in enumerate(KEYS) if covers(deleted, key)]
        for other in self.hosts:
            for i in covered:
                for entry in await other.acknowledged(i):
                    self.never[i].add(_ident(entry))
        for i in covered:
            self.never[i].update(_ident(e) for e in host.row[i])  # its queue drops them
            host.row[i] = []
            self.must[i].clear()
        paused = _pause(host.faulty)
        await host.store.delete(deleted)
        await host.store.flush(timeout=FLUSH_TIMEOUT)  # the delete has reached the backend
        _resume(host.faulty, paused)

    async def step(self, step: Any) -> None:
        kind = step[0]
        if kind == "append":
            await self.append(self.hosts[step[1]], step[2], step[3])
        elif kind == "delete":
            await self.delete(self.hosts[step[1]], step[2])
        elif kind == "faults":
            self.hosts[step[1]].set_faults(step[2])
        elif kind == "restart":
            await self.hosts[step[1]].restart()
        else:
            await asyncio.sleep(step[1])

    async def run(self, schedule: list[Any]) -> None:
        for number, step in enumerate(schedule):
            try:
                async with asyncio.timeout(STEP_TIMEOUT):  # a hang fails, naming its step
                    await self.step(step)
            except TimeoutError:
                raise AssertionError(f"step {number} {step!r} hung") from None
        await asyncio.sleep(0.05)
        for host in self.hosts:
            host.faulty.reset_faults()
        for host in self.hosts:
            await host.store.flush(timeout=FLUSH_TIMEOUT)

    async def check(self) -> None:
        for index, key in enumerate(KEYS):
            stored = [_ident(e) for e in await self.inner.load(key) or []]
            assert len(stored) == len(set(stored)), f"{key}: an entry is stored twice"
            assert self.must[index] <= set(stored), f"{key}: lost {self.must[index] - set(stored)}"
            assert not (self.never[index] & set(stored)), f"{key}: resurrected after a delete"
            for host in range(HOSTS):  # each host's own order
                mine = [c for h, c in (_split(s) for s in stored) if h == host]
                assert mine == sorted(mine), f"{key}: host {host} out of order"

    async def close(self) -> None:
        for host in self.hosts:
            await host.store.close(timeout=1)


def _ident(entry: Any) -> str:
    return f"{entry['h']}:{entry['c']}"


def _split(ident: str) -> tuple[int, int]:
    host, counter = ident.split(":")
    return int(host), int(counter)


def _pause(faulty: FaultyStore) -> dict[str, Any]:
    saved = {
        name: getattr(faulty, name)
        for name in ("error_rate", "lost_reply_rate", "hang_rate", "hang_after_write")
    }
    saved["down"] = faulty.is_down
    faulty.reset_faults()
    return saved


def _resume(faulty: FaultyStore, saved: dict[str, Any]) -> None:
    if saved.pop("down"):
        faulty.down()
    for name, value in saved.items():
        setattr(faulty, name, value)


PROPERTY = settings(
    max_examples=40, print_blob=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


async def _check_schedule(tmp: Path, kind: str, schedule: list[Any]) -> None:
    if kind == "memory":
        storage = MemoryStorage()
        world = World(tmp, MemoryStore(storage), lambda: MemoryStore(storage))
    else:
        world = World(tmp, FileStore(tmp / "files"), lambda: FileStore(tmp / "files"))
    try:
        await world.run(schedule)
        await world.check()
    finally:
        await world.close()


@PROPERTY
@given(schedule=schedules)
def test_hosts_with_hand_offs_and_deletes_get_every_entry_exactly_once_on_file_store(
    schedule: list[Any],
) -> None:
    # contract 2 and 5, on the embedded default backend.
    run_in_tmp(lambda tmp: _check_schedule(tmp, "file", schedule))


@PROPERTY
@given(schedule=schedules)
def test_hosts_with_hand_offs_and_deletes_get_every_entry_exactly_once_by_the_protocol(
    schedule: list[Any],
) -> None:
    # contract 2 and 5, on the protocol's reference (tests/memory_store.py).
    run_in_tmp(lambda tmp: _check_schedule(tmp, "memory", schedule))
