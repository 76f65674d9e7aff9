"""Under trio (contract 12): the SDK runs on anyio, so a user may run it with
``anyio.run(..., backend="trio")``. ``DurableSessionStore`` then runs its engine
on an asyncio loop of its own (``walmirror.loop_thread``); every backend works.

Each test is a plain function calling ``trio.run``: the trio side never sees an
asyncio loop, as in a user's trio program.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
from claude_agent_sdk.testing import run_session_store_conformance
from claude_agent_sdk.types import SessionKey
from conftest import (
    POSTGRES_DSN,
    REDIS_URL,
    S3_BUCKET,
    S3_CREDENTIALS,
    close_backend,
    connect_s3,
)

from walmirror import DurableSessionStore, WalmirrorError
from walmirror.backends import from_url
from walmirror.faults import FaultyStore

KEY: SessionKey = {"project_key": "proj", "session_id": "trio"}
TUNING: dict[str, Any] = {"backoff_initial": 0.01, "backoff_max": 0.1, "call_timeout": 10.0}


@pytest.fixture(params=["file", "redis", "postgres", "s3"])
def backend_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[int], str]]:
    """``url(n)``: the URL of backend storage number ``n``, private to the test (the
    conformance suite wants a fresh store per contract); cleaned up after."""
    namespace = f"wm_trio{uuid.uuid4().hex[:10]}"
    kind = request.param
    if kind == "file":
        yield lambda n: f"file://{tmp_path / f'files{n}'}"
    elif kind == "redis":
        yield lambda n: f"{REDIS_URL}?prefix={namespace}n{n}"
        asyncio.run(_drop_redis(namespace))
    elif kind == "postgres":
        yield lambda n: f"{POSTGRES_DSN}?table={namespace}n{n}"
        asyncio.run(_drop_postgres(namespace))
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        asyncio.run(_ensure_bucket(endpoint))
        # from_url's client finds its credentials where any AWS client does.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["aws_access_key_id"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["aws_secret_access_key"])
        monkeypatch.setenv("AWS_DEFAULT_REGION", S3_CREDENTIALS["region_name"])
        yield lambda n: f"s3://{S3_BUCKET}/{namespace}/n{n}?endpoint_url={endpoint}"


async def _drop_redis(namespace: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    async for name in client.scan_iter(match=f"{namespace}:*", count=1000):
        await client.delete(name)
    await client.aclose()


async def _drop_postgres(table: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        for name in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE $1", f"{table}%"
        ):
            await conn.execute(f'DROP TABLE IF EXISTS "{name[0]}" CASCADE')
        for fn in await conn.fetch(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE proname LIKE $1", f"{table}%"
        ):
            await conn.execute(f"DROP FUNCTION IF EXISTS {fn[0]} CASCADE")
    finally:
        await conn.close()


async def _ensure_bucket(endpoint: str) -> None:
    store = await connect_s3(endpoint, "probe/")
    await close_backend(store)


def run_under_trio(main: Callable[[], Awaitable[None]]) -> None:
    anyio.run(main, backend="trio")


def test_the_sdk_conformance_suite_passes_under_trio_on_every_backend(
    backend_url: Callable[[int], str], tmp_path: Path
) -> None:
    queues = itertools.count()
    made: list[DurableSessionStore] = []

    async def main() -> None:
        assert anyio.get_current_task() is not None and trio.lowlevel.current_task()

        def make() -> DurableSessionStore:
            n = next(queues)
            store = DurableSessionStore(from_url(backend_url(n)), tmp_path / f"q{n}.db", **TUNING)
            made.append(store)
            return store

        try:
            await run_session_store_conformance(make)
        finally:
            for store in made:
                # The clients live on the store's engine loop, which ends here.
                await store.close(10, close_backends=True)

    run_under_trio(main)


def test_appends_reads_and_an_outage_under_trio(tmp_path: Path) -> None:
    from memory_store import MemoryStore

    inner = MemoryStore()
    faulty = FaultyStore(inner)

    async def main() -> None:
        async with DurableSessionStore(faulty, tmp_path / "q.db", **TUNING) as store:
            await store.append(KEY, [{"n": 0}])
            await store.flush(30)
            faulty.down()
            async with trio.open_nursery() as nursery:  # 20 sessions at once
                for n in range(20):
                    key: SessionKey = {"project_key": "p", "session_id": f"s{n}"}
                    nursery.start_soon(store.append, key, [{"n": n, "uuid": f"u{n}"}])
            await store.append(KEY, [{"n": 1}])
            # Read your writes with the backend down (the queue holds the key's history).
            assert await store.load(KEY) == [{"n": 0}, {"n": 1}]
            faulty.up()
            await store.flush(30)
            assert len(await store.list_sessions("p")) == 20
            status = await store.status()
            assert status["backends"][0]["pending_entries"] == 0
        for n in range(20):
            k: SessionKey = {"project_key": "p", "session_id": f"s{n}"}
            assert await inner.storage.data.load(k) == [{"n": n, "uuid": f"u{n}"}]

    run_under_trio(main)


def test_a_cancelled_append_under_trio_leaves_the_store_working(tmp_path: Path) -> None:
    from memory_store import MemoryStore

    inner = MemoryStore()

    async def main() -> None:
        store = DurableSessionStore(inner, tmp_path / "q.db", **TUNING)
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.append(KEY, [{"n": "maybe"}])  # cancelled at once
        await store.append(KEY, [{"n": 1}])
        await store.flush(30)
        stored = await inner.storage.data.load(KEY) or []  # (MemoryStore is asyncio)
        assert stored[-1] == {"n": 1} and len(stored) <= 2
        report = await store.close(10)
        assert report.drained
        with pytest.raises(WalmirrorError, match="closed"):
            await store.append(KEY, [{"n": 2}])

    run_under_trio(main)


def test_a_store_started_on_asyncio_refuses_trio_callers_clearly(tmp_path: Path) -> None:
    from memory_store import MemoryStore

    store = DurableSessionStore(MemoryStore(), tmp_path / "q.db", **TUNING)

    async def on_asyncio() -> None:
        await store.append(KEY, [{"n": 0}])

    async def on_trio() -> None:
        with pytest.raises(WalmirrorError, match="one store per event loop"):
            await store.append(KEY, [{"n": 1}])

    asyncio.run(on_asyncio())
    run_under_trio(on_trio)
