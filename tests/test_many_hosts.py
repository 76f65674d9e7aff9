"""Many hosts, one session: exactly once under any hand-off pattern (contract 2 and 5).

Each "host" is a ``DurableSessionStore`` with its own queue file and its own
backend client (wrapped in ``FaultyStore`` where a turn needs a fault), all on
one backend storage: FileStore, Redis, PostgreSQL and S3 on the real servers.
Half of the entries carry no ``uuid``, as in what the CLI mirrors: exactly-once
must not depend on it.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk.types import SessionKey, SessionStore
from conftest import Connect

from walmirror import BackendUnavailableError, DurableSessionStore
from walmirror.faults import FaultyStore
from walmirror.verify import verify

KEY: SessionKey = {"project_key": "proj", "session_id": "pool"}
SUB: SessionKey = {**KEY, "subpath": "subagents/agent-1"}
TUNING = {"backoff_initial": 0.01, "backoff_max": 0.1, "call_timeout": 5.0}
FLUSH = 60.0


def turn_entries(tag: str, count: int) -> list[dict[str, Any]]:
    """Every other entry has a uuid (the CLI's progress and meta entries have none)."""
    return [
        {"type": "user", "uuid": f"{tag}-{i}", "n": i}
        if i % 2 == 0
        else {"type": "p", "tag": tag} | {"n": i}
        for i in range(count)
    ]


class Hosts:
    """Builds hosts on the test's one backend storage; closes them all at the end."""

    def __init__(self, connect: Connect, tmp_path: Path) -> None:
        self.connect = connect
        self.tmp_path = tmp_path
        self.stores: list[DurableSessionStore] = []

    async def host(self, name: str, **tuning: Any) -> tuple[DurableSessionStore, FaultyStore]:
        faulty = FaultyStore(await self.connect(), seed=len(self.stores))
        store = DurableSessionStore(faulty, self.tmp_path / f"{name}.db", **{**TUNING, **tuning})
        self.stores.append(store)
        return store, faulty

    async def reader(self) -> SessionStore:
        return await self.connect()

    async def close(self) -> None:
        for store in self.stores:
            await store.close(timeout=1)


@pytest.fixture
async def hosts(connect_backend: Connect, tmp_path: Path) -> AsyncIterator[Hosts]:
    pool = Hosts(connect_backend, tmp_path)
    yield pool
    await pool.close()


async def compact_if_s3(backend: Any, *keys: SessionKey) -> None:
    """S3 merges parts into segments: do it between turns, as a busy key would."""
    inner = getattr(backend, "inner", backend)
    if hasattr(inner, "compact"):
        for key in keys:
            await inner.compact(key)


async def no_parked(*stores: DurableSessionStore) -> None:
    for store in stores:
        for backend in (await store.status())["backends"]:
            assert backend["parked"] == [], backend["parked"]


async def test_ping_pong_between_hosts_keeps_every_turn_in_order(hosts: Hosts) -> None:
    # contract 2: a worker pool, A B A C B A C, resuming with load each turn, with
    # lost replies, an outage, a late write and (S3) compaction between turns.
    pool = {name: await hosts.host(name) for name in "ABC"}
    reader = await hosts.reader()
    expected: list[Any] = []
    expected_sub: list[Any] = []
    for turn, name in enumerate("ABACBAC"):
        store, faulty = pool[name]
        assert await store.load(KEY) == (expected or None)  # resume
        if turn == 1:
            faulty.lost_reply_rate = 0.7  # writes land, replies are lost
        if turn == 3:
            faulty.down()  # the backend is down for the whole turn
        if turn == 5:
            faulty.hold_next(1)  # one write arrives late, after the next turn
        batch = turn_entries(f"t{turn}{name}", 7)
        await store.append(KEY, batch[:3])
        await store.append(KEY, batch[3:])
        await store.append(SUB, batch[:2])
        expected += batch
        expected_sub += batch[:2]
        if turn == 3:  # others wrote the key: without the backend, a clear error
            with pytest.raises(BackendUnavailableError):
                await store.load(KEY)
            faulty.up()
        await store.flush(timeout=FLUSH)
        faulty.lost_reply_rate = 0.0
        if turn == 6:
            await pool["A"][1].release_held()  # turn 5's write lands now: a no-op
        await compact_if_s3(faulty, KEY, SUB)
    assert await reader.load(KEY) == expected
    assert await reader.load(SUB) == expected_sub
    for store, _ in pool.values():
        assert await store.load(KEY) == expected
        assert await store.load(SUB) == expected_sub
    await no_parked(*(store for store, _ in pool.values()))


async def test_concurrent_writers_each_land_exactly_once_in_their_own_order(
    hosts: Hosts,
) -> None:
    # contract 2: three hosts append to one session at the same time, with faults.
    pool = [await hosts.host(f"w{i}") for i in range(3)]
    pool[0][1].lost_reply_rate = 0.3
    pool[1][1].error_rate = 0.3
    rng = random.Random(3)
    sent: dict[str, list[Any]] = {}

    async def write(index: int, store: DurableSessionStore) -> None:
        mine: list[Any] = []
        for step in range(25):
            batch = [
                {"type": "p", "w": index, "n": len(mine) + i} for i in range(rng.randint(1, 4))
            ]
            if step % 3 == 0:
                batch[0]["uuid"] = f"w{index}-{len(mine)}"
            mine += batch
            await store.append(KEY, batch)
            await asyncio.sleep(rng.uniform(0, 0.01))
        sent[f"w{index}"] = mine
        await store.flush(timeout=FLUSH)

    await asyncio.gather(*(write(i, store) for i, (store, _) in enumerate(pool)))
    stored = await (await hosts.reader()).load(KEY) or []
    assert len(stored) == sum(len(v) for v in sent.values())
    for index in range(3):
        assert [e for e in stored if e["w"] == index] == sent[f"w{index}"]
    await no_parked(*(store for store, _ in pool))
    for store, faulty in pool:
        faulty.reset_faults()
        assert await store.load(KEY) == stored


async def test_a_delete_on_one_host_and_appends_on_another_start_a_fresh_transcript(
    hosts: Hosts,
) -> None:
    # contract 5: A never saw B's delete; its later entries are a new transcript.
    a, _ = await hosts.host("A")
    b, _ = await hosts.host("B")
    await a.append(KEY, turn_entries("old", 4))
    await a.append(SUB, turn_entries("old-sub", 2))
    await a.flush(timeout=FLUSH)
    await b.delete(KEY)
    await b.flush(timeout=FLUSH)
    assert await a.load(KEY) is None
    await a.append(KEY, turn_entries("a-new", 3))
    await a.flush(timeout=FLUSH)
    await b.append(KEY, turn_entries("b-new", 2))
    await b.flush(timeout=FLUSH)
    reader = await hosts.reader()
    expected = turn_entries("a-new", 3) + turn_entries("b-new", 2)
    assert await reader.load(KEY) == expected
    assert await reader.load(SUB) is None
    assert await a.load(KEY) == expected and await b.load(KEY) == expected
    await no_parked(a, b)


async def test_a_delete_then_an_immediate_re_append_keeps_only_the_new_entries(
    hosts: Hosts,
) -> None:
    # contract 5: the flusher applies a delete before the entries appended after it,
    # even when it picks keys while that delete is on its way (a slow backend delete).
    store, faulty = await hosts.host("A")
    other: SessionKey = {"project_key": "proj", "session_id": "other"}
    await store.append(KEY, turn_entries("one", 3))
    await store.append(other, turn_entries("other", 1))
    await store.flush(timeout=FLUSH)
    faulty.ops = frozenset({"delete"})
    faulty.latency = 0.3  # deletes are slow: the flusher is busy with the first one
    await store.delete(other)
    await asyncio.sleep(0.1)
    # Between the flusher's look at pending deletes and its look at pending keys:
    await store.delete(KEY)
    await store.append(KEY, turn_entries("two", 2))
    await store.flush(timeout=FLUSH)
    assert await (await hosts.reader()).load(KEY) == turn_entries("two", 2)
    assert await store.load(KEY) == turn_entries("two", 2)


async def test_a_write_delayed_past_a_delete_does_not_resurrect_anything(
    hosts: Hosts,
) -> None:
    # contract 5: A's first write is held in flight; B deletes; the write lands late.
    a, faulty = await hosts.host("A")
    b, _ = await hosts.host("B")
    faulty.hold_next(1)
    await a.append(KEY, turn_entries("early", 3))
    await a.flush(timeout=FLUSH)  # the retry delivered it; the first attempt is held
    assert faulty.held == 1
    await b.delete(KEY)
    await b.flush(timeout=FLUSH)
    [late] = await faulty.release_held()
    assert late.appended == 0  # the producer's mark survived the delete
    reader = await hosts.reader()
    assert await reader.load(KEY) is None
    await a.append(KEY, turn_entries("after", 2))
    await a.flush(timeout=FLUSH)
    assert await reader.load(KEY) == turn_entries("after", 2)


# -- a backend that lost data ------------------------------------------------------------


async def wipe(backend: Any) -> None:
    """Lose everything the backend stored (a restart without persistence, a truncate)."""
    store = getattr(backend, "inner", backend)
    kind = type(store).__name__
    if kind == "MemoryStore":
        store.storage.lose_everything()
    elif kind == "FileStore":
        shutil.rmtree(store.root)
    elif kind == "RedisStore":
        async for name in store.client.scan_iter(match=f"{store.prefix}:*", count=1000):
            await store.client.delete(name)
    elif kind == "PostgresStore":
        async with store.pool.acquire() as conn:
            tables = [
                r[0]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = $1"
                    " AND (tablename = $2 OR tablename LIKE $2 || '\\_\\_%')",
                    store.schema,
                    store.table,
                )
            ]
            await conn.execute("TRUNCATE " + ", ".join(f'"{store.schema}"."{t}"' for t in tables))
    elif kind == "S3Store":
        await _wipe_s3(store)
        # S3 has no multi-object condition: a writer trusts its cached end of a key
        # for length_cache_ttl seconds, then confirms it. The loss shows after that.
        await asyncio.sleep(store._length_cache_ttl + 0.1)
    else:  # pragma: no cover - a new backend needs its own wipe
        raise AssertionError(kind)


async def _wipe_s3(store: Any) -> None:
    client, bucket, prefix = store.client, store.bucket, store.prefix
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            await client.delete_object(Bucket=bucket, Key=item["Key"])


async def test_entries_a_backend_lost_are_restored_from_the_queue(hosts: Hosts) -> None:
    # contract 2: the backend forgot acknowledged entries; the queue still holds them.
    store, faulty = await hosts.host("A")
    await store.append(KEY, turn_entries("before", 6))
    await store.flush(timeout=FLUSH)
    await wipe(faulty)
    await store.append(KEY, turn_entries("after", 3))
    await store.flush(timeout=FLUSH)
    expected = turn_entries("before", 6) + turn_entries("after", 3)
    assert await (await hosts.reader()).load(KEY) == expected
    [backend] = (await store.status())["backends"]
    [loss] = backend["losses"]
    assert loss["restored"] == 6 and loss["lost"] == 0
    assert backend["parked"] == []


async def test_entries_a_backend_lost_that_the_queue_compacted_are_reported(
    hosts: Hosts,
) -> None:
    # contract 2: what cannot be restored is reported (status, verify), never hidden.
    store, faulty = await hosts.host("A", retention_seconds=0.0, compact_interval=0.05)
    await store.append(KEY, turn_entries("before", 5))
    await store.flush(timeout=FLUSH)
    async with asyncio.timeout(FLUSH):  # acknowledged entries are compacted away
        while (await store.queue.read_from(1, 0)) != []:
            await asyncio.sleep(0.02)
    await wipe(faulty)
    await store.append(KEY, turn_entries("after", 2))
    await store.flush(timeout=FLUSH)
    assert await (await hosts.reader()).load(KEY) == turn_entries("after", 2)
    [backend] = (await store.status())["backends"]
    [loss] = backend["losses"]
    assert loss["lost"] == 5 and loss["restored"] == 0 and loss["key"] == KEY
    [report] = await verify(store)
    assert report.lost == 5 and not report.ok


async def test_appends_made_elsewhere_after_a_delete_returned_are_never_lost(
    hosts: Hosts,
) -> None:
    # contract 5: delete() returns once the backend applied it, so B's later
    # entries come after the delete in the backend too.
    a, a_faulty = await hosts.host("A")
    b, _ = await hosts.host("B")
    await a.append(KEY, turn_entries("old", 3))
    await a.flush(timeout=FLUSH)
    a_faulty.ops = frozenset({"delete"})
    a_faulty.latency = 0.2  # a slow delete
    await a.delete(KEY)
    await b.append(KEY, turn_entries("b", 2))
    await b.flush(timeout=FLUSH)
    await a.flush(timeout=FLUSH)
    assert await (await hosts.reader()).load(KEY) == turn_entries("b", 2)


async def test_a_write_in_doubt_on_the_deleting_host_cannot_come_back(hosts: Hosts) -> None:
    # contract 5: A's own delivery failed ambiguously (held in flight), then A
    # deletes the key: the late copy must not resurrect it.
    a, faulty = await hosts.host("A")
    faulty.hold_next(1)
    await a.append(KEY, turn_entries("doubt", 3))
    async with asyncio.timeout(FLUSH):
        while faulty.held < 1:
            await asyncio.sleep(0.005)
    faulty.down()  # the retry cannot land: the entries stay in doubt
    await a.delete(KEY)  # returns at once: the backend is failing
    faulty.up()
    await a.flush(timeout=FLUSH)
    [late] = await faulty.release_held()
    assert late.appended == 0
    assert await (await hosts.reader()).load(KEY) is None
    assert await a.load(KEY) is None


async def test_a_session_deleted_on_another_host_leaves_every_listing(hosts: Hosts) -> None:
    # contract 4 and 5: listings show what is queued here, not what was delivered here.
    a, _ = await hosts.host("A")
    b, _ = await hosts.host("B")
    await a.append(KEY, turn_entries("a", 2))
    await a.append(SUB, turn_entries("a-sub", 1))
    await a.flush(timeout=FLUSH)
    assert [s["session_id"] for s in await a.list_sessions("proj")] == ["pool"]
    await b.delete(KEY)
    assert await a.list_sessions("proj") == []
    assert await a.list_subkeys({"project_key": "proj", "session_id": "pool"}) == []
    assert await a.list_session_summaries("proj") == []
