"""Scenarios across hosts and backends, against the real servers (contract 2).

- Handoff: two hosts (two DurableSessionStores, separate queue files) on one
  backend; A writes, B continues the same key after A's entries, and a late
  retry from A (its reply was lost) does not duplicate anything.
- Fan-out: Redis and S3 behind one store, S3 down for a while: Redis stays
  current, S3 catches up, both end equal to what was appended.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk.types import SessionKey, SessionStore
from s3_server import MotoServer

from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore
from walmirror.backends.postgres import PostgresStore
from walmirror.backends.redis import RedisStore
from walmirror.backends.s3 import S3Store
from walmirror.faults import FaultyStore

REDIS_URL = os.environ.get("WALMIRROR_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("WALMIRROR_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
S3_ENDPOINT = os.environ.get("WALMIRROR_S3_ENDPOINT")
S3_BUCKET = os.environ.get("WALMIRROR_S3_BUCKET", "walmirror-tests")
S3_CREDENTIALS = {
    "aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
    "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
    "region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
}

KEY: SessionKey = {"project_key": "proj", "session_id": "handoff"}
SUB: SessionKey = {**KEY, "subpath": "subagents/agent-1"}
TUNING = {"backoff_initial": 0.01, "backoff_max": 0.1, "call_timeout": 5.0}
HANG_GUARD = 60.0  # waits fail only after this long: a guard, not a timing

# A backend kind: given a namespace (prefix / table / directory), build a new
# client on the shared storage; plus a cleanup for that namespace.
Connect = Callable[[str], Awaitable[SessionStore]]


def entries(tag: str, count: int) -> list[Any]:
    return [{"type": "user", "uuid": f"{tag}-{i}", "n": i} for i in range(count)]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    if S3_ENDPOINT:
        yield S3_ENDPOINT
        return
    with MotoServer() as server:
        yield server.endpoint_url


async def _s3(endpoint: str, prefix: str) -> S3Store:
    store = await S3Store.connect(S3_BUCKET, prefix, endpoint_url=endpoint, **S3_CREDENTIALS)
    try:
        await store.client.head_bucket(Bucket=S3_BUCKET)
    except Exception:
        await store.client.create_bucket(Bucket=S3_BUCKET)
    return store


@pytest.fixture(params=["file", "redis", "postgres", "s3"])
async def backend_kind(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Connect, list[SessionStore]]]:
    """``connect(namespace)`` makes a new client on one shared storage; all are closed after."""
    made: list[SessionStore] = []
    namespace = f"wm_t{uuid.uuid4().hex[:12]}"

    async def connect(_: str = namespace) -> SessionStore:
        store: Any
        if request.param == "file":
            store = FileStore(tmp_path / "files")
        elif request.param == "redis":
            store = RedisStore.from_url(f"{REDIS_URL}?prefix={namespace}")
        elif request.param == "postgres":
            store = await PostgresStore.connect(POSTGRES_DSN, table=namespace)
        else:
            store = await _s3(request.getfixturevalue("s3_endpoint"), f"{namespace}/")
        made.append(store)
        return store

    yield connect, made
    if made:  # delete what the test wrote, then close every client
        cleaner: Any = made[0]
        for key in (SUB, KEY):
            await cleaner.delete(key)
        if request.param == "postgres":
            await cleaner.drop_schema()
    for store in made:
        for close in ("aclose", "close"):
            method = getattr(store, close, None)
            if method is not None:
                result = method()
                if asyncio.iscoroutine(result):
                    await result
                break


async def test_a_session_handed_to_another_host_continues_and_late_retries_do_not_duplicate(
    backend_kind: tuple[Connect, list[SessionStore]], tmp_path: Path
) -> None:
    # contract 2: a session resumed on another host continues the key's offsets.
    connect, _ = backend_kind
    host_a = FaultyStore(await connect(""), lost_reply_rate=1.0, writes_only=True)
    a = DurableSessionStore(host_a, tmp_path / "a.db", **TUNING)
    b = DurableSessionStore(await connect(""), tmp_path / "b.db", **TUNING)
    try:
        await a.append(KEY, entries("a", 3))
        await a.append(SUB, entries("a-sub", 2))
        async with asyncio.timeout(HANG_GUARD):  # A's writes land, their replies are lost
            while host_a.injected["lost_reply"] < 2:
                await asyncio.sleep(0.01)
        # Host B takes the session over and continues it.
        await b.append(KEY, entries("b", 2))
        await b.append(SUB, entries("b-sub", 1))
        await b.flush(timeout=HANG_GUARD)
        # A's retry now repeats offsets B has already built on: a no-op.
        host_a.lost_reply_rate = 0.0
        await a.flush(timeout=HANG_GUARD)
        reader = await connect("")
        assert await reader.load(KEY) == entries("a", 3) + entries("b", 2)
        assert await reader.load(SUB) == entries("a-sub", 2) + entries("b-sub", 1)
        assert not (await a.status())["backends"][0]["parked"]
    finally:
        await a.close(timeout=1)
        await b.close(timeout=1)


async def test_fan_out_keeps_redis_current_while_s3_is_down_then_s3_catches_up(
    s3_endpoint: str, tmp_path: Path
) -> None:
    # contract 2, fan-out: one cursor per backend, each exactly once.
    namespace = f"wm_fan{uuid.uuid4().hex[:12]}"
    redis = RedisStore.from_url(f"{REDIS_URL}?prefix={namespace}")
    s3_inner = await _s3(s3_endpoint, f"{namespace}/")
    s3 = FaultyStore(s3_inner)
    store = DurableSessionStore([redis, s3], tmp_path / "q.db", **TUNING)
    try:
        s3.down()
        appended: list[Any] = []
        for i in range(10):
            batch = entries(f"b{i}", 5)
            appended += batch
            await store.append(KEY, batch)
        async with asyncio.timeout(HANG_GUARD):  # Redis is current while S3 is down
            while (await redis.load(KEY) or []) != appended:
                await asyncio.sleep(0.02)
        status = {b["name"]: b for b in (await store.status())["backends"]}
        assert status[store.backend_names[1]]["pending_entries"] == len(appended)
        s3.up()
        await store.flush(timeout=HANG_GUARD)
        assert await s3_inner.load(KEY) == appended
        assert await redis.load(KEY) == appended
    finally:
        await store.close(timeout=1)
        await redis.delete(KEY)
        await s3_inner.delete(KEY)
        await redis.aclose()
        await s3_inner.close()
