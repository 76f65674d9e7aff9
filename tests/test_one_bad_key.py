"""One bad key never stops the others (contract 7; issue 7, item 1).

A key (or a delete) the backend keeps refusing, retryably or for good, must not
hold up the other sessions: permanent refusals park it with its error, other
failures cool that one item down while the rest flows. While a backend is down
the breaker probes it with its health call (``ping``), never with real batches,
and a backend without one is probed with a different queued item each time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk.types import SessionKey, SessionStore
from memory_store import MemoryStore

from walmirror import DurableSessionStore, FlushBlockedError, InvalidEntryError
from walmirror.faults import FaultyStore
from walmirror.protocol import MAX_ENTRY_DEPTH

BAD: SessionKey = {"project_key": "proj", "session_id": "bad"}
TUNING: dict[str, Any] = {
    "backoff_initial": 0.01,
    "backoff_max": 0.2,
    "breaker_threshold": 2,
    "probe_interval": 0.02,
}


def key(n: int) -> SessionKey:
    return {"project_key": "proj", "session_id": f"good-{n}"}


def is_bad(k: SessionKey) -> bool:
    return k["session_id"] == "bad"


def refused() -> Exception:
    return ConnectionError("refused (injected)")


class WithoutPing(MemoryStore):
    """A protocol store with no health call."""

    ping = None  # type: ignore[assignment]


async def eventually(check: Callable[[], Awaitable[bool]], guard: float = 60.0) -> None:
    """Wait until ``check()`` holds; ``guard`` only stops a hang (no timing asserted)."""
    deadline = time.monotonic() + guard
    while not await check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def holds(backend: SessionStore, k: SessionKey, count: int) -> bool:
    return len(await backend.load(k) or []) == count


def inner_of(kind: str) -> SessionStore:
    if kind == "protocol+ping":
        return MemoryStore()
    if kind == "protocol":
        return WithoutPing()
    return InMemorySessionStore()


@pytest.mark.parametrize("kind", ["protocol+ping", "protocol", "foreign"])
async def test_a_key_that_keeps_failing_does_not_stop_the_others(
    make_durable: Callable[..., DurableSessionStore], kind: str
) -> None:
    inner = inner_of(kind)
    faulty = FaultyStore(inner)
    faulty.reject(is_bad, ops={"append", "append_batch", "load"}, error=refused)
    store = make_durable(faulty, **TUNING)
    await store.append(BAD, [{"type": "user", "n": 0}])
    # Long enough for the breaker to open on the bad key alone (threshold 2).
    await eventually(lambda: asyncio.sleep(0, faulty.injected["reject"] >= 4))
    for n in range(20):
        await store.append(key(n), [{"type": "user", "n": n}, {"type": "p"}])
    for n in range(20):
        await eventually(lambda n=n: holds(inner, key(n), 2))  # type: ignore[misc]
    assert await inner.load(BAD) is None
    # The last good key's ack may trail its write in the backend by a moment.
    await eventually(lambda: _pending_keys_are(store, 1))  # the bad one, still queued
    assert (await store.status())["backends"][0]["parked"] == []  # not parked, not lost
    # Once the backend takes it, it goes: nobody had to requeue anything.
    faulty.accept_all()
    await store.flush(60)
    assert await inner.load(BAD) == [{"type": "user", "n": 0}]


async def test_an_open_breaker_probes_with_ping_not_with_batches(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    store = make_durable(faulty, **TUNING)
    await store.append(key(0), [{"n": 0}])
    await store.flush(30)
    faulty.down()
    await store.append(key(0), [{"n": 1}])
    await eventually(lambda: _breaker_is(store, "open"))
    batches, pings = faulty.calls["append_batch"], faulty.calls["ping"]
    await eventually(lambda: asyncio.sleep(0, faulty.calls["ping"] >= pings + 5))
    assert faulty.calls["append_batch"] == batches  # no real batch went out as a probe
    faulty.up()
    await store.flush(30)
    assert await inner.load(key(0)) == [{"n": 0}, {"n": 1}]
    assert (await store.status())["backends"][0]["breaker"] == "closed"


async def _pending_keys_are(store: DurableSessionStore, n: int) -> bool:
    return bool((await store.status())["backends"][0]["pending_keys"] == n)


async def _breaker_is(store: DurableSessionStore, state: str) -> bool:
    return bool((await store.status())["backends"][0]["breaker"] == state)


async def test_a_delete_refused_for_good_is_parked_and_the_rest_flows(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    faulty.reject(is_bad, ops={"delete"})
    store = make_durable(faulty, **TUNING)
    await store.append(BAD, [{"n": 0}])
    await store.append(key(0), [{"n": 0}])
    await store.flush(30)
    await store.delete(BAD)
    await store.append(BAD, [{"n": "after the delete"}])  # must wait for the delete
    await store.append(key(0), [{"n": 1}])
    await store.delete(key(1))
    await eventually(lambda: holds(inner, key(0), 2))
    status = (await store.status())["backends"][0]
    assert [p["key"] for p in status["parked_deletes"]] == [BAD]
    assert status["parked_deletes"][0]["error"] == ("PermanentBackendError: rejected (injected)")
    with pytest.raises(FlushBlockedError):
        await store.flush(30)
    # The entries appended after the delete never reached the backend before it.
    assert await inner.load(BAD) == [{"n": 0}]
    faulty.accept_all()
    assert await store.requeue(BAD) == 1
    await store.flush(30)
    assert await inner.load(BAD) == [{"n": "after the delete"}]
    assert (await store.status())["backends"][0]["parked_deletes"] == []


async def test_a_delete_that_keeps_failing_does_not_stop_the_others(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    faulty.reject(is_bad, ops={"delete"}, error=refused)
    store = make_durable(faulty, **TUNING)
    await store.append(BAD, [{"n": 0}])
    await store.flush(30)
    await store.delete(BAD)
    await eventually(lambda: asyncio.sleep(0, faulty.injected["reject"] >= 4))
    for n in range(5):
        await store.append(key(n), [{"n": n}])
    for n in range(5):
        await eventually(lambda n=n: holds(inner, key(n), 1))  # type: ignore[misc]
    faulty.accept_all()
    await store.flush(60)
    assert await inner.load(BAD) is None


_CHECKSUM = "CorruptQueueError: the queued batch at seq 0 of this key does not match its checksum"


@pytest.mark.parametrize(
    ("kind", "legacy", "error"),
    [
        ("protocol+ping", False, _CHECKSUM),
        ("foreign", False, _CHECKSUM),
        # A batch of schema 4 has no checksum: its parse finds the damage.
        ("protocol+ping", True, "InvalidEntryError: the entry at seq 0"),
        ("foreign", True, "CorruptQueueError: the queued entry at seq 0"),
    ],
)
async def test_a_damaged_queue_entry_parks_its_key_with_a_clear_error(
    make_durable: Callable[..., DurableSessionStore], kind: str, legacy: bool, error: str
) -> None:
    inner = inner_of(kind)
    faulty = FaultyStore(inner)
    faulty.down()  # keep both keys queued while one is damaged
    store = make_durable(faulty, **TUNING)
    await store.append(BAD, [{"type": "user", "n": 0}])
    await store.append(key(0), [{"n": 0}])
    queue = store.queue
    await queue._writer.run(
        lambda: queue._writer.conn.execute(
            "UPDATE batches SET body = ?"
            + (", crc = NULL, hints = NULL" if legacy else "")
            + " WHERE key_id = (SELECT key_id FROM keys WHERE session_id = 'bad')",
            (b'{"type": "us',),
        )
    )
    faulty.up()
    await eventually(lambda: holds(inner, key(0), 1))
    await eventually(lambda: _parked_count(store, 1))
    parked = (await store.status())["backends"][0]["parked"]
    assert parked[0]["key"] == BAD
    assert parked[0]["error"].startswith(error)
    assert '"us' not in parked[0]["error"]  # never the content


async def _parked_count(store: DurableSessionStore, n: int) -> bool:
    return len((await store.status())["backends"][0]["parked"]) == n


async def test_an_internal_error_for_one_key_cools_it_and_parks_nothing(
    make_durable: Callable[..., DurableSessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = MemoryStore()
    store = make_durable(inner, **TUNING)
    await store.start()
    queue = store.queue
    real = queue.next_batch
    bad_ids: set[int] = set()
    calls = {"bad": 0}

    async def next_batch(backend: str, key: Any, *args: Any) -> Any:
        if key.key_id in bad_ids:
            calls["bad"] += 1
            raise TypeError("a walmirror bug (injected)")
        return await real(backend, key, *args)

    monkeypatch.setattr(queue, "next_batch", next_batch)
    await store.append(BAD, [{"n": 0}])
    bad_ids.update(k.key_id for k, _ in await queue.all_keys())
    await eventually(lambda: asyncio.sleep(0, calls["bad"] >= 3))
    await store.append(key(0), [{"n": 0}])
    await eventually(lambda: holds(inner, key(0), 1))
    status = (await store.status())["backends"][0]
    assert status["parked"] == []
    assert status["breaker"] == "closed"
    bad_ids.clear()  # "the bug is fixed": the key goes by itself
    await store.flush(60)
    assert await inner.load(BAD) == [{"n": 0}]


def nested(depth: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"leaf": True}
    for _ in range(depth - 1):
        entry = {"d": entry}
    return entry


async def test_deep_entries_are_delivered_up_to_the_limit_and_refused_past_it(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    store = make_durable(inner, **TUNING)
    deepest = nested(MAX_ENTRY_DEPTH)
    await store.append(key(0), [deepest])
    await store.flush(30)
    assert await inner.load(key(0)) == [deepest]
    assert await store.load(key(0)) == [deepest]
    for depth in (MAX_ENTRY_DEPTH + 1, 984, 5000):
        with pytest.raises(InvalidEntryError, match="deeper than 500 levels") as info:
            await store.append(key(1), [{"ok": 1}, nested(depth)])
        assert "entry 1 of the batch" in str(info.value)
        assert "nothing of the batch was stored" in str(info.value)
    assert await store.load(key(1)) is None


@pytest.mark.parametrize("kind", ["protocol", "foreign"])
async def test_more_bad_keys_than_a_round_holds_do_not_stop_the_others_without_ping(
    make_durable: Callable[..., DurableSessionStore], kind: str
) -> None:
    """Without a health call nobody can tell a bad key from a down backend: the keys
    that failed cool down too, so the next round (or probe) reaches the others, even
    when more bad keys than ``max_parallel_keys`` are the oldest in the queue."""
    inner = inner_of(kind)
    faulty = FaultyStore(inner)
    faulty.reject(
        lambda k: k["session_id"].startswith("bad"),
        ops={"append", "append_batch", "load"},
        error=refused,
    )
    store = make_durable(faulty, **{**TUNING, "max_parallel_keys": 4})
    for n in range(10):
        await store.append({"project_key": "proj", "session_id": f"bad-{n}"}, [{"n": n}])
    await eventually(lambda: asyncio.sleep(0, faulty.injected["reject"] >= 10))
    for n in range(10):
        await store.append(key(n), [{"n": n}])
    for n in range(10):
        await eventually(lambda n=n: holds(inner, key(n), 1))  # type: ignore[misc]


async def test_a_cancelled_error_leaking_from_a_backend_does_not_end_the_flusher(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    faulty.reject(is_bad, ops={"append_batch"}, error=asyncio.CancelledError)
    store = make_durable(faulty, **TUNING)
    await store.append(BAD, [{"n": 0}])
    await eventually(lambda: asyncio.sleep(0, faulty.injected["reject"] >= 3))
    await store.append(key(0), [{"n": 0}])
    await eventually(lambda: holds(inner, key(0), 1))
    faulty.accept_all()
    await store.flush(60)
    assert await inner.load(BAD) == [{"n": 0}]


async def test_a_delete_that_keeps_failing_does_not_hold_up_other_deletes_or_listings(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """While the backend answers but one delete keeps failing, ``delete()`` of
    another key and the listings do not wait out ``call_timeout`` (here far longer
    than the guard)."""
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    faulty.reject(is_bad, ops={"delete"}, error=refused)
    store = make_durable(faulty, **{**TUNING, "call_timeout": 3600.0})
    await store.append(BAD, [{"n": 0}])
    await store.append(key(0), [{"n": 0}])
    await store.append({"project_key": "other", "session_id": "s"}, [{"n": 0}])
    await store.flush(60)
    await store.delete(BAD)  # the backend answers: this one waits until it failed once
    await eventually(lambda: asyncio.sleep(0, faulty.injected["reject"] >= 2))
    await asyncio.wait_for(store.delete(key(0)), 60)
    assert await inner.load(key(0)) is None
    assert await asyncio.wait_for(store.list_sessions("other"), 60)
    assert await asyncio.wait_for(store.list_sessions("proj"), 60) == []


async def test_a_very_long_outage_does_not_overflow_the_backoff(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """2 ** (failures - 1) overflows a float after 1025 failures (about 85 minutes of
    outage at the defaults): the flusher must still deliver once the backend heals."""
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    faulty.down()
    store = make_durable(
        faulty, backoff_initial=0.0001, backoff_max=0.0001, breaker_threshold=10**6
    )
    await store.append(key(0), [{"n": 0}])
    await eventually(lambda: asyncio.sleep(0, faulty.calls["append_batch"] >= 1100), guard=120)
    faulty.up()
    await store.flush(60)
    assert await inner.load(key(0)) == [{"n": 0}]
