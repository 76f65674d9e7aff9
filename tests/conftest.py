"""Shared fixtures: fresh queue paths, and stores that are always closed after the test."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk.types import SessionStore

from walmirror import DurableSessionStore

_counter = itertools.count()


@pytest.fixture
async def make_durable(tmp_path: Path) -> AsyncIterator[Callable[..., DurableSessionStore]]:
    """Build DurableSessionStores on fresh queue files; close them all at teardown."""
    made: list[DurableSessionStore] = []

    def make(backends: Any, wal_path: Path | None = None, **tuning: Any) -> DurableSessionStore:
        tuning.setdefault("backoff_initial", 0.01)
        tuning.setdefault("backoff_max", 0.1)
        tuning.setdefault("call_timeout", 2.0)
        path = wal_path or tmp_path / f"queue-{next(_counter)}.db"
        store = DurableSessionStore(backends, path, **tuning)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close(timeout=0.5)


# -- every backend, on the real servers ------------------------------------------------

REDIS_URL = os.environ.get("WALMIRROR_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("WALMIRROR_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
S3_ENDPOINT = os.environ.get("WALMIRROR_S3_ENDPOINT")
S3_BUCKET = os.environ.get("WALMIRROR_S3_BUCKET", "walmirror-tests")
S3_CREDENTIALS = {
    "aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
    "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
    "region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
}

# "memory": the protocol in a few lines (tests/memory_store.py), to tell an engine
# bug from a backend bug.
BACKEND_KINDS = ["memory", "file", "redis", "postgres", "s3"]

# Given nothing, a new client on the test's one shared storage (directory,
# Redis prefix, PostgreSQL table, S3 prefix): each client is another "host".
Connect = Callable[[], Awaitable[SessionStore]]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    if S3_ENDPOINT:
        yield S3_ENDPOINT
        return
    from s3_server import MotoServer

    with MotoServer() as server:
        yield server.endpoint_url


async def connect_s3(endpoint: str, prefix: str) -> Any:
    from walmirror.backends.s3 import S3Store

    store = await S3Store.connect(S3_BUCKET, prefix, endpoint_url=endpoint, **S3_CREDENTIALS)
    try:
        await store.client.head_bucket(Bucket=S3_BUCKET)
    except Exception:
        await store.client.create_bucket(Bucket=S3_BUCKET)
    return store


async def close_backend(store: Any) -> None:
    for close in ("aclose", "close"):
        method = getattr(store, close, None)
        if method is not None:
            result = method()
            if asyncio.iscoroutine(result):
                await result
            return


@pytest.fixture(params=BACKEND_KINDS)
async def connect_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Connect]:
    """``await connect_backend()``: a new client on one storage private to the test.
    Every client is closed after the test, and the namespace dropped where that is cheap."""
    made: list[Any] = []
    namespace = f"wm_t{uuid.uuid4().hex[:12]}"
    kind = request.param
    from memory_store import MemoryStorage, MemoryStore

    storage = MemoryStorage()

    async def connect() -> SessionStore:
        store: Any
        if kind == "memory":
            store = MemoryStore(storage)
        elif kind == "file":
            from walmirror.backends.file import FileStore

            store = FileStore(tmp_path / "files")
        elif kind == "redis":
            from walmirror.backends.redis import RedisStore

            store = RedisStore.from_url(f"{REDIS_URL}?prefix={namespace}")
        elif kind == "postgres":
            from walmirror.backends.postgres import PostgresStore

            store = await PostgresStore.connect(POSTGRES_DSN, table=namespace)
        else:
            store = await connect_s3(request.getfixturevalue("s3_endpoint"), f"{namespace}/")
        made.append(store)
        return store

    yield connect
    if made and kind == "postgres":
        await made[0].drop_schema()
    if made and kind == "redis":
        client = made[0].client
        async for name in client.scan_iter(match=f"{namespace}:*", count=1000):
            await client.delete(name)
    for store in made:
        await close_backend(store)
