"""Tests for walmirror.backends.redis.RedisStore, against real Redis servers.

Most tests use the machine's Redis on 127.0.0.1:6379, each under its own random
key prefix, deleted afterwards. Tests that kill a server or change its settings
start a private ``redis-server`` on a free port instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.testing.session_store_conformance import run_session_store_conformance
from claude_agent_sdk.types import SessionKey
from redis.exceptions import RedisError

from walmirror import DurableSessionStore
from walmirror.backends import redis as redis_module
from walmirror.backends.redis import CorruptTranscriptError, RedisStore, WrongTypeError
from walmirror.errors import (
    InvalidEntryError,
    InvalidKeyError,
    MarkBehindError,
    PermanentBackendError,
)
from walmirror.faultproxy import FaultProxy
from walmirror.protocol import MAX_SEQ, Batch, Receipt, is_producer_store

# The server under test; the same tests run against another deployment by env var.
_SERVER = urlsplit(os.environ.get("WALMIRROR_REDIS_URL", "redis://127.0.0.1:6379/0"))
HOST = _SERVER.hostname or "127.0.0.1"
PORT = _SERVER.port or 6379
URL = f"redis://{HOST}:{PORT}/0"

KEY: SessionKey = {"project_key": "proj", "session_id": "sess"}
SUB: SessionKey = {"project_key": "proj", "session_id": "sess", "subpath": "subagents/agent-1"}

MakeStore = Callable[..., RedisStore]


def entries(count: int, start: int = 0) -> list[Any]:
    return [{"type": "user", "uuid": f"u{i}", "n": i} for i in range(start, start + count)]


def batch(first: int, items: list[Any], expect: int | None = None, producer: str = "pa") -> Batch:
    """``items`` as one producer's batch with seqs ``first`` ..."""
    return Batch.of(producer, first, items, expect)


def skey(key: SessionKey) -> str:
    return repr(sorted(key.items()))


# A wait for something that must happen fails only after this long: a hang guard, not
# a timing (the suite must pass on a saturated machine).
HANG_GUARD = 60.0


async def until(condition: Callable[[], Any], what: str, timeout: float = HANG_GUARD) -> None:
    """Poll ``condition`` (a function or a coroutine function) until it is true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert asyncio.get_running_loop().time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


# --- Fixtures -------------------------------------------------------------


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A plain client on the shared server, for looking behind the store's back."""
    client = aioredis.Redis(host=HOST, port=PORT)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(raw: aioredis.Redis) -> AsyncIterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    name = f"wmtest:{uuid.uuid4().hex[:12]}"
    yield name
    async for key in raw.scan_iter(match=f"{name}:*", count=1000):
        await raw.delete(key)


@pytest.fixture
async def make_store(prefix: str) -> AsyncIterator[MakeStore]:
    """Build RedisStores (default: the shared server, the test's prefix); close them all."""
    made: list[RedisStore] = []

    def make(url: str = URL, sub: str | None = None, **kwargs: Any) -> RedisStore:
        kwargs.setdefault("prefix", prefix if sub is None else f"{prefix}:{sub}")
        store = RedisStore.from_url(url, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture
def store(make_store: MakeStore) -> RedisStore:
    return make_store()


async def names_under(raw: aioredis.Redis, prefix: str) -> list[str]:
    return sorted([k.decode() async for k in raw.scan_iter(match=f"{prefix}:*", count=1000)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server subprocess of this test's own, which it may kill and restart."""

    def __init__(self, directory: Path, *settings: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.settings = settings
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server must be installed (see .ci/run)"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)),
            *("--daemonize", "no", "--save", "", "--appendonly", "no"),
            *self.settings,  # later options win
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = aioredis.Redis(port=self.port, socket_connect_timeout=1.0, socket_timeout=5.0)
        deadline = asyncio.get_running_loop().time() + HANG_GUARD  # an AOF replay, a busy box
        try:
            while asyncio.get_running_loop().time() < deadline:
                if self.proc.returncode is not None:
                    break  # it exited (a port taken meanwhile, a bad option)
                with contextlib.suppress(OSError, aioredis.RedisError):
                    if await client.ping():
                        return
                await asyncio.sleep(0.025)
        finally:
            await client.aclose()
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    async def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            await self.proc.wait()
        self.proc = None


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await private_redis(*settings)`` starts a private server; all are killed at teardown."""
    servers: list[PrivateRedis] = []

    async def start(*settings: str) -> PrivateRedis:
        server = PrivateRedis(tmp_path / f"redis-{len(servers)}", *settings)
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.stop()


# --- The SDK's contract ---------------------------------------------------


async def test_passes_sdk_conformance_suite(make_store: MakeStore) -> None:
    stores = itertools.count()
    await run_session_store_conformance(lambda: make_store(sub=str(next(stores))))


async def test_passes_sdk_conformance_suite_inside_durable_store(
    make_store: MakeStore, make_durable: Callable[..., DurableSessionStore]
) -> None:
    stores = itertools.count()
    await run_session_store_conformance(lambda: make_durable(make_store(sub=str(next(stores)))))


def test_is_a_producer_store(store: RedisStore) -> None:
    assert is_producer_store(store)


# --- Layout, URL, names ----------------------------------------------------


async def test_layout_is_the_documented_key_scheme(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.append_batch(KEY, batch(7, [{"type": "user", "text": "héllo"}]))
    await store.append_batch(SUB, batch(0, entries(1), producer="pb"))
    assert await names_under(raw, prefix) == sorted(
        [
            f"{prefix}:t:{{proj}}:sess",
            f"{prefix}:u:{{proj}}:sess:subagents%2Fagent-1",
            f"{prefix}:p:{{proj}}:sess",
            f"{prefix}:q:{{proj}}:sess:subagents%2Fagent-1",
            f"{prefix}:k:{{proj}}:sess",
            f"{prefix}:m:{{proj}}:sess",
            f"{prefix}:i:{{proj}}",
        ]
    )
    # One canonical JSON text per element, as FileStore writes a line.
    assert await raw.lrange(f"{prefix}:t:{{proj}}:sess", 0, -1) == [
        '{"type":"user","text":"héllo"}'.encode()
    ]
    assert await raw.smembers(f"{prefix}:k:{{proj}}:sess") == {b"subagents%2Fagent-1"}
    # Marks are decimal text, per key and producer.
    assert await raw.hgetall(f"{prefix}:p:{{proj}}:sess") == {b"pa": b"7"}
    assert await raw.hgetall(f"{prefix}:q:{{proj}}:sess:subagents%2Fagent-1") == {b"pb": b"0"}
    summary = await raw.hgetall(f"{prefix}:m:{{proj}}:sess")
    assert set(summary) == {b"data", b"mtime", b"folded", b"v"}
    assert summary[b"folded"] == b"1"
    score = await raw.zscore(f"{prefix}:i:{{proj}}", "sess")
    assert score is not None and int(score) == int(summary[b"mtime"])


def test_cursor_name_has_no_password(make_store: MakeStore, prefix: str) -> None:
    store = make_store(f"redis://user:hunter2@{HOST}:{PORT}/3")
    assert store.cursor_name == f"redis://{HOST}:{PORT}/3/{prefix}"
    tls = make_store("rediss://:hunter2@cache.example:6380/0", prefix="team-a")
    assert tls.cursor_name == "rediss://cache.example:6380/0/team-a"
    assert "hunter2" not in repr(store) + repr(tls)


def test_from_url_reads_prefix_and_ttl_from_query(make_store: MakeStore) -> None:
    store = make_store(f"{URL}?prefix=team-b&ttl=60&socket_timeout=2", prefix=None)
    assert (store.prefix, store.ttl) == ("team-b", 60.0)
    assert store.client.connection_pool.connection_kwargs["socket_timeout"] == 2.0
    # redis-py's own retries are off: walmirror retries with marks.
    assert store.client.get_retry().get_retries() == 0  # type: ignore[union-attr]


async def test_from_url_reads_the_client_library_version_once(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py given no driver_info reads its package metadata for every connection it
    opens (tens of ms of the event loop each); a from_url store's pool shares one."""
    import redis.utils

    calls: list[int] = []
    real = redis.utils.get_lib_version

    def counting() -> str:
        calls.append(1)
        return str(real())

    monkeypatch.setattr(redis.utils, "get_lib_version", counting)
    redis_module._driver_info.cache_clear()
    store = make_store()
    await asyncio.gather(*(store.length(KEY) for _ in range(4)))  # several connections
    assert store.client.connection_pool.connection_kwargs["driver_info"].lib_version == real()
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        ("http://user:hunter2@host/0", {}),
        ("redis://user:hunter2@host/0?prefix=a", {"prefix": "b"}),
        ("redis://user:hunter2@host/0?ttl=soon", {}),
        ("redis://user:hunter2@host/0", {"prefix": "has{brace}"}),
        ("redis://user:hunter2@host/0", {"prefix": ""}),
        ("redis://user:hunter2@host/0", {"ttl": 0}),
        ("redis://user:hunter2@host/0", {"decode_responses": True}),
    ],
)
def test_from_url_refuses_bad_arguments_without_echoing_the_url(
    url: str, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError) as info:
        RedisStore.from_url(url, **kwargs)
    assert "hunter2" not in str(info.value)


async def test_client_with_decoded_responses_is_refused() -> None:
    client = aioredis.Redis(host=HOST, port=PORT, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisStore(client)
    finally:
        await client.aclose()


async def test_store_given_a_client_does_not_close_it(raw: aioredis.Redis, prefix: str) -> None:
    store = RedisStore(raw, prefix)
    await store.append(KEY, entries(1))
    await store.aclose()
    assert await raw.ping()


# --- The atomic step: marks ----------------------------------------------------


async def test_a_batch_is_stored_as_its_encoded_bytes(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    encoded = [b'{"type":"user","uuid":"u0","n":0}', b'{"n":1,"type":"user","uuid":"u1"}']
    receipt = await store.append_batch(KEY, Batch("pa", 0, encoded))
    assert receipt == Receipt(appended=2, mark=1, length=2)
    assert await raw.lrange(f"{prefix}:t:{{proj}}:sess", 0, -1) == encoded
    assert await store.load(KEY) == entries(2)


async def test_a_repeated_batch_changes_nothing_not_even_the_mtime(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    # contract 2: a retry after a lost reply is a no-op.
    await store.append_batch(KEY, batch(0, entries(3)))
    before = {name: await raw.dump(name) for name in await names_under(raw, prefix)}
    [listed] = await store.list_sessions("proj")
    assert await store.append_batch(KEY, batch(0, entries(3))) == Receipt(0, 2, 3)
    assert await store.append_batch(KEY, batch(1, entries(2, start=1))) == Receipt(0, 2, 3)
    assert {name: await raw.dump(name) for name in await names_under(raw, prefix)} == before
    assert await store.list_sessions("proj") == [listed]  # a repeat is not a modification


async def test_mark_behind_writes_nothing(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.append_batch(KEY, batch(0, entries(3)))
    before = {name: await raw.dump(name) for name in await names_under(raw, prefix)}
    with pytest.raises(MarkBehindError) as info:
        await store.append_batch(KEY, batch(5, entries(2, start=5), expect=4))
    assert (info.value.mark, info.value.expect) == (2, 4)
    assert not isinstance(info.value, PermanentBackendError)  # the flusher repairs it
    assert {name: await raw.dump(name) for name in await names_under(raw, prefix)} == before


async def test_mark_behind_on_an_unknown_key_creates_nothing(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    for key in (KEY, SUB):
        with pytest.raises(MarkBehindError):
            await store.append_batch(key, batch(1, entries(1), expect=0))
    assert await names_under(raw, prefix) == []


@pytest.mark.parametrize("base", [2**53 - 2, 2**62, MAX_SEQ - 3], ids=["2^53", "2^62", "max"])
async def test_seqs_compare_exactly_up_to_2_63(
    store: RedisStore, raw: aioredis.Redis, prefix: str, base: int
) -> None:
    # Lua numbers are doubles: 2**62 + 1 and 2**62 + 2 are the same double.
    await store.append_batch(KEY, batch(base, entries(2)))
    assert await raw.hget(f"{prefix}:p:{{proj}}:sess", "pa") == str(base + 1).encode()
    assert (await store.append_batch(KEY, batch(base + 1, entries(1, start=1)))).appended == 0
    with pytest.raises(MarkBehindError):
        await store.append_batch(KEY, batch(base + 3, entries(1, start=3), expect=base + 2))
    receipt = await store.append_batch(KEY, batch(base + 1, entries(3, start=1), expect=base + 1))
    assert receipt == Receipt(appended=2, mark=base + 3, length=4)
    assert await store.producer_mark(KEY, "pa") == base + 3
    assert await store.load(KEY) == entries(4)


async def test_a_batch_ending_at_the_last_seq_is_accepted_once(store: RedisStore) -> None:
    assert await store.append_batch(KEY, batch(MAX_SEQ - 1, entries(2))) == Receipt(2, MAX_SEQ, 2)
    assert await store.append_batch(KEY, batch(MAX_SEQ, entries(1, start=1))) == Receipt(
        0, MAX_SEQ, 2
    )


async def test_plain_append_continues_after_a_batch(store: RedisStore) -> None:
    await store.append_batch(KEY, batch(0, entries(2)))
    await store.append(KEY, entries(1, start=2))
    assert (await store.append_batch(KEY, batch(2, entries(1, start=3), expect=1))).length == 4
    assert await store.load(KEY) == entries(4)


async def test_producer_mark_refuses_a_bad_producer_id(store: RedisStore) -> None:
    for producer in ("", "bad id", "x" * 65, "a:b"):
        with pytest.raises(ValueError):
            await store.producer_mark(KEY, producer)


async def test_an_encoded_entry_that_is_not_json_is_refused_on_a_main_key(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    with pytest.raises(InvalidEntryError):
        await store.append_batch(KEY, Batch("pa", 0, [b'{"type":"x"}', b"{not json"]))
    assert await names_under(raw, prefix) == []


async def test_appends_in_one_round_trip_in_steady_state(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain append is one EVALSHA; a batch that skips nothing one MULTI/EXEC
    transaction (its entries RPUSHed, then the script that checks and finishes)."""
    trips: list[str] = []
    real = store.client.execute_command
    real_execute = aioredis.client.Pipeline.execute

    async def counting(*args: Any, **kwargs: Any) -> Any:
        trips.append(str(args[0]))
        return await real(*args, **kwargs)

    async def counting_pipeline(self: Any, *args: Any, **kwargs: Any) -> Any:
        names = [str(command[0][0]) for command in self.command_stack]
        trips.append(" ".join(["MULTI" if self.is_transaction else "PIPELINE", *names]))
        return await real_execute(self, *args, **kwargs)

    monkeypatch.setattr(store.client, "execute_command", counting)
    monkeypatch.setattr(aioredis.client.Pipeline, "execute", counting_pipeline)
    await store.append_batch(KEY, batch(0, entries(2)))
    await store.append_batch(KEY, batch(2, entries(3, start=2), expect=1))
    await store.append(KEY, entries(1, start=5))
    await store.append_batch(KEY, batch(5, entries(1, start=6), expect=4))
    await store.append_batch(SUB, batch(0, entries(2)))
    pushed = "MULTI RPUSH EVAL"
    assert trips == [pushed, pushed, "EVALSHA", pushed, pushed]
    [summary] = await store.list_session_summaries("proj")
    assert summary["data"] == fold_session_summary(None, KEY, entries(7))["data"]


# --- Key encoding: no collisions, no escape ----------------------------------

TRICKY: list[SessionKey] = [
    {"project_key": "p:t", "session_id": "s"},
    {"project_key": "p", "session_id": "t:s"},
    {"project_key": "p", "session_id": "s"},
    {"project_key": "p", "session_id": "s", "subpath": "a:b"},
    {"project_key": "p", "session_id": "s:a", "subpath": "b"},
    {"project_key": "p", "session_id": "s", "subpath": "a/b"},
    {"project_key": "p", "session_id": "s", "subpath": "a%2Fb"},
    {"project_key": "p", "session_id": "s", "subpath": "..a/b..c/...x"},
    {"project_key": "{p}", "session_id": "s"},
    {"project_key": "%7Bp%7D", "session_id": "s"},
    {"project_key": "p}{", "session_id": "{s}"},
    {"project_key": "проект", "session_id": "é"},
    {"project_key": "проект", "session_id": "e\u0301"},  # NFD of the one above
    {"project_key": "p", "session_id": "'; DROP TABLE sessions; --"},
    {"project_key": "p", "session_id": "*", "subpath": "?/[ab]"},
    {"project_key": "p*", "session_id": "s"},
    {"project_key": "p", "session_id": "s", "subpath": "emoji/🦀:{x}%"},
    {"project_key": "p p", "session_id": "s s"},
]


async def test_tricky_keys_each_land_in_their_own_key(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    for i, key in enumerate(TRICKY):
        await store.append(key, [{"type": "x", "owner": i}])
    for i, key in enumerate(TRICKY):
        assert await store.load(key) == [{"type": "x", "owner": i}], key
        assert await store.length(key) == 1
    for project in {k["project_key"] for k in TRICKY}:
        mains = {
            k["session_id"] for k in TRICKY if k["project_key"] == project and "subpath" not in k
        }
        listed = await store.list_sessions(project)
        assert sorted(s["session_id"] for s in listed) == sorted(mains), project
        summaries = await store.list_session_summaries(project)
        assert sorted(s["session_id"] for s in summaries) == sorted(mains), project
    for key in TRICKY:
        expected = sorted(
            k["subpath"]
            for k in TRICKY
            if "subpath" in k
            and (k["project_key"], k["session_id"]) == (key["project_key"], key["session_id"])
        )
        assert await store.list_subkeys(key) == expected, key
    # Names are plain ASCII: nothing of a key part reaches the name unencoded.
    for name in await names_under(raw, prefix):
        tail = name[len(prefix) + 1 :]
        assert tail.isascii() and tail.count("{") == 1 and tail.count("}") == 1, name


async def test_deleting_one_tricky_session_leaves_the_others(store: RedisStore) -> None:
    for i, key in enumerate(TRICKY):
        await store.append(key, [{"type": "x", "owner": i}])
    await store.delete({"project_key": "p", "session_id": "s"})
    for i, key in enumerate(TRICKY):
        gone = (key["project_key"], key["session_id"]) == ("p", "s")
        assert await store.load(key) == (None if gone else [{"type": "x", "owner": i}]), key
    assert await store.list_subkeys({"project_key": "p", "session_id": "s:a"}) == ["b"]
    await store.delete({"project_key": "p", "session_id": "s:a", "subpath": "b"})
    assert await store.list_subkeys({"project_key": "p", "session_id": "s:a"}) == []
    assert await store.load({"project_key": "p", "session_id": "t:s"}) == [
        {"type": "x", "owner": 1}
    ]


@pytest.mark.parametrize(
    "key",
    [
        {"project_key": "proj", "session_id": "sess", "subpath": ""},
        {"project_key": "proj", "session_id": "sess", "subpath": "../../escape"},
        {"project_key": "proj", "session_id": "sess", "subpath": "a/../b"},
        {"project_key": "proj", "session_id": ".."},
        {"project_key": "proj", "session_id": "se\x00ss"},
        {"project_key": "proj", "session_id": "sess", "subpath": "/etc/x"},
        {"project_key": "a/b", "session_id": "sess"},
        {"project_key": "", "session_id": "sess"},
        {"project_key": "proj", "session_id": "lone-\ud800-surrogate"},
        {"project_key": "proj", "session_id": "sess", "extra": "x"},
    ],
    ids=repr,
)
async def test_invalid_key_raises_and_creates_nothing(
    store: RedisStore, raw: aioredis.Redis, prefix: str, key: Any
) -> None:
    calls = [
        store.append(key, entries(1)),
        store.append_batch(key, batch(0, entries(1))),
        store.producer_mark(key, "pa"),
        store.length(key),
        store.load(key),
        store.delete(key),
        store.list_subkeys(key),
    ]
    for call in calls:
        with pytest.raises(InvalidKeyError):
            await call
    assert await names_under(raw, prefix) == []


@pytest.mark.parametrize("project_key", ["", "..", "a/b", "x\x00"])
async def test_invalid_project_key_in_listings_raises(store: RedisStore, project_key: str) -> None:
    with pytest.raises(InvalidKeyError):
        await store.list_sessions(project_key)
    with pytest.raises(InvalidKeyError):
        await store.list_session_summaries(project_key)


# --- Bad input, foreign data -------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "x", "secret": {1, 2}},
        {"type": "x", "secret": float("nan")},
        {"type": "x", "secret": object()},
        ["not", "a", "dict"],
    ],
    ids=["set", "nan", "object", "list"],
)
async def test_unserialisable_entry_raises_and_writes_nothing(
    store: RedisStore, raw: aioredis.Redis, prefix: str, bad: Any
) -> None:
    await store.append(KEY, entries(1))
    before = await raw.lrange(f"{prefix}:t:{{proj}}:sess", 0, -1)
    with pytest.raises(InvalidEntryError) as info:
        await store.append(KEY, [*entries(1, start=1), bad])
    assert "secret" not in str(info.value)
    assert await raw.lrange(f"{prefix}:t:{{proj}}:sess", 0, -1) == before


async def test_a_string_with_a_lone_surrogate_round_trips(store: RedisStore) -> None:
    # contract 11: what the SDK's own stores accept, walmirror accepts.
    entry = {"type": "x", "text": "half \ud800 a pair"}
    await store.append(KEY, [entry])
    await store.append_batch(SUB, batch(0, [entry]))
    assert await store.load(KEY) == [entry]
    assert await store.load(SUB) == [entry]


async def test_corrupt_element_raises_without_content(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await raw.rpush(f"{prefix}:t:{{proj}}:sess", b'{"type":"x"}', b"secret-garbage")
    with pytest.raises(CorruptTranscriptError, match="element 1") as info:
        await store.load(KEY)
    assert "secret" not in str(info.value)


async def test_foreign_key_type_is_a_permanent_error(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await raw.set(f"{prefix}:t:{{proj}}:sess", b"someone else's string")
    with pytest.raises(WrongTypeError) as info:
        await store.append_batch(KEY, batch(0, entries(1)))
    assert isinstance(info.value, PermanentBackendError)
    assert "someone" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "kind"),
    [(KEY, "p"), (KEY, "i"), (KEY, "m"), (SUB, "q"), (SUB, "k")],
    ids=["marks", "index", "summary", "subkey-marks", "subkey-set"],
)
async def test_a_foreign_type_beside_the_list_fails_the_batch_before_it_writes(
    store: RedisStore, raw: aioredis.Redis, prefix: str, key: SessionKey, kind: str
) -> None:
    """The batch's entries go to the list first (MULTI: RPUSH, then the script); when
    another key of the step holds a type RedisStore did not write, they come off again."""
    await store.append_batch(key, batch(0, entries(2)))
    [name] = [n for n in await names_under(raw, prefix) if n.startswith(f"{prefix}:{kind}:")]
    await raw.delete(name)
    await raw.set(name, b"someone else's string")
    before = {n: await raw.dump(n) for n in await names_under(raw, prefix)}
    with pytest.raises(WrongTypeError):
        await store.append_batch(key, batch(2, entries(3, start=2), expect=1))
    assert {n: await raw.dump(n) for n in await names_under(raw, prefix)} == before
    assert await store.load(key) == entries(2)


# --- Reads in chunks, delete ------------------------------------------------


async def test_reads_go_in_chunks(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_module, "_CHUNK", 3)
    await store.append(KEY, entries(10))
    assert await store.load(KEY) == entries(10)
    sessions = [f"s{i}" for i in range(7)]
    for sid in sessions:
        await store.append({"project_key": "many", "session_id": sid}, entries(1))
    assert sorted(s["session_id"] for s in await store.list_sessions("many")) == sessions
    summaries = await store.list_session_summaries("many")
    assert sorted(s["session_id"] for s in summaries) == sessions


async def test_load_of_a_long_transcript(store: RedisStore) -> None:
    long = entries(5000)
    receipt = await store.append_batch(KEY, batch(0, long))  # more than one RPUSH in the script
    assert receipt == Receipt(appended=5000, mark=4999, length=5000)
    assert await store.load(KEY) == long


async def test_delete_of_main_key_cascades(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    other: SessionKey = {"project_key": "proj", "session_id": "other"}
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(1))
    await store.append({**KEY, "subpath": "subagents/agent-2"}, entries(1))
    await store.append(other, entries(1))
    await store.delete(KEY)
    assert await names_under(raw, prefix) == sorted(
        [f"{prefix}:t:{{proj}}:other", f"{prefix}:m:{{proj}}:other", f"{prefix}:i:{{proj}}"]
    )
    assert await store.length(KEY) == 0
    assert [s["session_id"] for s in await store.list_session_summaries("proj")] == ["other"]
    assert [s["session_id"] for s in await store.list_sessions("proj")] == ["other"]


async def test_delete_keeps_the_marks_of_the_main_key_and_every_subkey(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    # contract 5: the marks are the tombstone.
    sub2: SessionKey = {**KEY, "subpath": "subagents/agent-2"}
    for key in (KEY, SUB, sub2):
        await store.append_batch(key, batch(0, entries(2)))
    await store.delete(KEY)
    assert await names_under(raw, prefix) == sorted(
        [
            f"{prefix}:p:{{proj}}:sess",
            f"{prefix}:q:{{proj}}:sess:subagents%2Fagent-1",
            f"{prefix}:q:{{proj}}:sess:subagents%2Fagent-2",
        ]
    )
    for key in (KEY, SUB, sub2):
        assert await store.producer_mark(key, "pa") == 1
        assert (await store.append_batch(key, batch(0, entries(2)))).appended == 0
        assert await store.load(key) is None


async def test_a_removed_tombstone_lets_an_old_batch_in_again(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    # What the docstring tells an operator to do once no queue holds the key.
    await store.append_batch(KEY, batch(0, entries(2)))
    await store.append_batch(SUB, batch(0, entries(1)))
    await store.delete(KEY)
    await raw.delete(f"{prefix}:p:{{proj}}:sess")
    async for name in raw.scan_iter(match=f"{prefix}:q:{{proj}}:sess:*"):
        await raw.delete(name)
    assert await names_under(raw, prefix) == []
    assert (await store.append_batch(KEY, batch(0, entries(2)))).appended == 2


async def test_delete_of_subpath_keeps_main_transcript_and_summary(store: RedisStore) -> None:
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(1))
    await store.delete(SUB)
    assert await store.load(SUB) is None
    assert await store.list_subkeys(KEY) == []
    assert await store.load(KEY) == entries(2)
    assert len(await store.list_session_summaries("proj")) == 1


# --- Summaries ----------------------------------------------------------------

TITLED = [
    [{"type": "user", "timestamp": "2024-01-01T00:00:00.000Z", "customTitle": "one"}],
    [{"type": "user", "timestamp": "2024-01-01T00:00:01.000Z", "customTitle": "two"}],
    [{"type": "user", "timestamp": "2024-01-01T00:00:02.000Z", "customTitle": "three"}],
]


def folded(batches: list[list[Any]], key: SessionKey = KEY) -> dict[str, Any]:
    flat = [e for batch in batches for e in batch]
    return fold_session_summary(None, key, flat)["data"]


async def only_summary(store: RedisStore, project: str = "proj") -> dict[str, Any]:
    summaries = await store.list_session_summaries(project)
    assert len(summaries) == 1
    return dict(summaries[0])


async def test_summary_is_the_fold_of_all_entries(store: RedisStore) -> None:
    for batch in TITLED:
        await store.append(KEY, batch)
    summary = await only_summary(store)
    assert summary["data"] == folded(TITLED)
    assert set(summary) == {"session_id", "mtime", "data"}
    [listed] = await store.list_sessions("proj")
    assert summary["mtime"] == listed["mtime"] > 1e12


async def test_subpath_appends_do_not_touch_the_summary(store: RedisStore) -> None:
    await store.append(KEY, TITLED[0])
    before = await only_summary(store)
    await store.append(SUB, TITLED[1])
    assert await only_summary(store) == before
    assert [s["session_id"] for s in await store.list_sessions("proj")] == ["sess"]


async def test_repeats_never_fold_twice(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.append_batch(KEY, batch(0, TITLED[0]))
    await store.append_batch(KEY, batch(1, TITLED[1], expect=0))
    assert (await store.append_batch(KEY, batch(1, TITLED[1], expect=0))).appended == 0
    assert (await store.append_batch(KEY, batch(0, TITLED[0] + TITLED[1]))).appended == 0
    # A repeat of an older batch must not fold it again ("one" would win).
    assert (await store.append_batch(KEY, batch(0, TITLED[0]))).appended == 0
    summary = await only_summary(store)
    assert summary["data"] == folded(TITLED[:2])
    assert summary["data"]["custom_title"] == "two"
    assert await raw.hget(f"{prefix}:m:{{proj}}:sess", "folded") == b"2"


async def test_a_partial_repeat_folds_only_the_new_suffix(store: RedisStore) -> None:
    await store.append_batch(KEY, batch(0, TITLED[0] + TITLED[1]))
    await store.append_batch(KEY, batch(1, TITLED[1] + TITLED[2], expect=1))
    assert (await only_summary(store))["data"] == folded(TITLED)


async def test_a_retry_by_a_store_that_never_saw_the_reply_folds_nothing_twice(
    make_store: MakeStore,
) -> None:
    # contract 2: the write landed, its reply was lost, the queue resends from
    # another process (a fresh store: no remembered mark or summary to guess from).
    landed, resent = make_store(), make_store()
    await landed.append_batch(KEY, batch(0, TITLED[0]))
    await landed.append_batch(KEY, batch(1, TITLED[1], expect=0))
    assert (await resent.append_batch(KEY, batch(1, TITLED[1] + TITLED[2], expect=0))) == Receipt(
        appended=1, mark=2, length=3
    )
    assert (await only_summary(resent))["data"] == folded(TITLED)


@pytest.mark.parametrize("crash", ["summary-missing", "summary-rolled-back"])
async def test_summary_catches_up_after_a_lost_summary_write(
    store: RedisStore, raw: aioredis.Redis, prefix: str, crash: str
) -> None:
    name = f"{prefix}:m:{{proj}}:sess"
    await store.append_batch(KEY, batch(0, TITLED[0]))
    old = await raw.dump(name)
    await store.append_batch(KEY, batch(1, TITLED[1], expect=0))
    # The transcript write of TITLED[1] landed; its summary write did not.
    if crash == "summary-missing":
        await raw.delete(name)
    else:
        await raw.restore(name, 0, old, replace=True)
    # The flusher's retry is a repeat: nothing new is written, the summary catches up.
    assert await store.append_batch(KEY, batch(1, TITLED[1], expect=0)) == Receipt(0, 1, 2)
    assert (await only_summary(store))["data"] == folded(TITLED[:2])
    await store.append_batch(KEY, batch(2, TITLED[2], expect=1))
    assert (await only_summary(store))["data"] == folded(TITLED)
    assert await raw.hget(name, "folded") == b"3"


async def test_summary_is_rebuilt_when_corrupt(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.append(KEY, TITLED[0])
    await store.append(KEY, TITLED[1])
    await raw.hset(f"{prefix}:m:{{proj}}:sess", "data", b"{not json")
    await store.append(KEY, TITLED[2])
    assert (await only_summary(store))["data"] == folded(TITLED)


async def test_summary_follows_another_writer(make_store: MakeStore) -> None:
    mine, theirs = make_store(), make_store()
    await mine.append(KEY, TITLED[0])
    await theirs.append(KEY, TITLED[1])  # mine's remembered summary is now stale
    await mine.append(KEY, TITLED[2])
    assert (await only_summary(mine))["data"] == folded(TITLED)


async def test_summary_of_a_recreated_session_starts_fresh(make_store: MakeStore) -> None:
    mine, theirs = make_store(), make_store()
    await mine.append(KEY, TITLED[0])
    await theirs.delete(KEY)
    await theirs.append(KEY, TITLED[1])
    await mine.append(KEY, TITLED[2])
    assert (await only_summary(mine))["data"] == folded(TITLED[1:])


async def test_failed_summary_catch_up_does_not_fail_the_append(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.append(KEY, TITLED[0])

    async def broken(*args: Any) -> None:
        raise ConnectionError("redis went away")

    monkeypatch.setattr(store, "_catch_up", broken)
    monkeypatch.setattr(store, "_summaries", type(store._summaries)())  # force the slow path
    await store.append(KEY, TITLED[1])  # stored: raising would make the SDK resend it
    monkeypatch.undo()
    assert await store.load(KEY) == TITLED[0] + TITLED[1]
    await store.append(KEY, TITLED[2])
    assert (await only_summary(store))["data"] == folded(TITLED)


async def test_concurrent_appenders_fold_every_entry_once_in_stored_order(
    make_store: MakeStore, raw: aioredis.Redis, prefix: str
) -> None:
    shared = make_store()
    writers = [shared, shared, make_store(), make_store(), make_store()]  # 3 "hosts"
    rounds = 12

    async def appender(w: int, store: RedisStore) -> None:
        for r in range(rounds):
            batch = [
                {
                    "type": "user",
                    "uuid": f"w{w}-r{r}-{j}",
                    "timestamp": f"2024-01-01T00:{w:02d}:{r:02d}.00{j}Z",
                    "customTitle": f"w{w}-r{r}-{j}",
                    "message": {"role": "user", "content": f"prompt from w{w} r{r}"},
                }
                for j in range(1 + (w + r) % 3)
            ]
            await store.append(KEY, batch)

    await asyncio.gather(*(appender(w, s) for w, s in enumerate(writers)))
    stored = await shared.load(KEY)
    assert stored is not None
    assert len(stored) == sum(1 + (w + r) % 3 for w in range(len(writers)) for r in range(rounds))
    assert len({e["uuid"] for e in stored}) == len(stored)
    summary = await only_summary(shared)
    assert summary["data"] == fold_session_summary(None, KEY, stored)["data"]
    assert int(await raw.hget(f"{prefix}:m:{{proj}}:sess", "folded") or 0) == len(stored)
    [listed] = await shared.list_sessions("proj")
    assert summary["mtime"] == listed["mtime"]


# --- Retention -------------------------------------------------------------------


# Expiry runs on the server's clock. The tests read it (PTTL) instead of sleeping a
# fixed time: "has expired" is waited for, "has not expired yet" is checked right
# after the write, with the whole TTL as the margin.
TTL = 1.0


async def pttls(raw: aioredis.Redis, prefix: str) -> dict[str, int]:
    return {name: await raw.pttl(name) for name in await names_under(raw, prefix)}


async def all_expired(raw: aioredis.Redis, prefix: str) -> None:
    async def gone() -> bool:
        return await names_under(raw, prefix) == []

    await until(gone, "every key expired")


async def test_ttl_expires_idle_sessions(
    make_store: MakeStore, raw: aioredis.Redis, prefix: str
) -> None:
    store = make_store(ttl=TTL)
    await store.append_batch(KEY, batch(0, TITLED[0]))
    await store.append_batch(SUB, batch(0, entries(1)))
    ttls = await pttls(raw, prefix)
    assert len(ttls) == 7  # transcripts, marks, subkey set, summary, index
    for name, left in ttls.items():
        assert 0 < left <= TTL * 1000, name
    assert len(await store.list_sessions("proj")) == 1
    await all_expired(raw, prefix)
    assert await store.load(KEY) is None
    assert await store.list_sessions("proj") == []
    assert await store.list_session_summaries("proj") == []
    assert await store.list_subkeys(KEY) == []
    assert await names_under(raw, prefix) == []


async def test_marks_expire_with_the_data_and_a_deleted_keys_tombstone_with_its_ttl(
    make_store: MakeStore, raw: aioredis.Redis, prefix: str
) -> None:
    store = make_store(ttl=TTL)
    await store.append_batch(KEY, batch(0, entries(2)))
    await store.append(KEY, entries(1, start=2))  # a plain append slides the marks too
    await store.delete(KEY)
    assert 0 < await raw.pttl(f"{prefix}:p:{{proj}}:sess") <= TTL * 1000
    assert (await store.append_batch(KEY, batch(0, entries(2)))).appended == 0
    await all_expired(raw, prefix)
    # An expired key is a deleted key whose tombstone expired too.
    with pytest.raises(MarkBehindError):
        await store.append_batch(KEY, batch(2, entries(1, start=2), expect=1))


async def test_ttl_slides_with_each_append(
    make_store: MakeStore, raw: aioredis.Redis, prefix: str
) -> None:
    # Each round waits (on the server's clock) until 40 % of the TTL is gone from
    # every key, then appends: every key's TTL is full again. After three rounds more
    # than the TTL has passed since the first append, and nothing expired.
    ttl_ms = 1500
    half_gone = ttl_ms * 0.6
    store = make_store(ttl=ttl_ms / 1000)
    await store.append(KEY, entries(1))
    names = set(await pttls(raw, prefix))
    for i in range(1, 4):

        async def aged() -> bool:
            return all(0 < left < half_gone for left in (await pttls(raw, prefix)).values())

        await until(aged, "the keys' TTLs ran down")
        await store.append(KEY, entries(1, start=i))
        ttls = await pttls(raw, prefix)
        assert set(ttls) == names
        for name, left in ttls.items():
            assert half_gone < left <= ttl_ms, name  # reset by the append
    assert await store.load(KEY) == entries(4)
    assert len(await store.list_sessions("proj")) == 1


# --- Server checks --------------------------------------------------------------


async def test_check_server_warns_about_evicting_policies(
    make_store: MakeStore, private_redis: Callable[..., Any]
) -> None:
    server = await private_redis(
        "--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "allkeys-lru"
    )
    store, with_ttl = make_store(server.url), make_store(server.url, ttl=3600)
    [warning] = await store.check_server()
    assert "allkeys-lru" in warning and "noeviction" in warning
    await store.client.config_set("maxmemory-policy", "noeviction")
    assert await store.check_server() == []
    await store.client.config_set("maxmemory-policy", "volatile-lru")
    assert await store.check_server() == []  # keys without a TTL are never evicted
    [warning] = await with_ttl.check_server()
    assert "volatile-lru" in warning
    await store.client.config_set("maxmemory-policy", "noeviction")
    await store.client.config_set("appendfsync", "everysec")
    [warning] = await store.check_server()
    assert "appendfsync is everysec" in warning


async def test_check_server_warns_about_missing_persistence(
    make_store: MakeStore, private_redis: Callable[..., Any]
) -> None:
    server = await private_redis()  # --save "" --appendonly no
    [warning] = await make_store(server.url).check_server()
    assert "no persistence" in warning


# --- Real faults, the atomic step alone ----------------------------------------------


async def call_until_it_lands(store: RedisStore, key: SessionKey, sent: Batch) -> Receipt:
    """What a flusher does: send the same batch again until a reply comes back."""
    deadline = asyncio.get_running_loop().time() + HANG_GUARD
    while True:
        try:
            return await store.append_batch(key, sent)
        except (RedisError, OSError):
            assert asyncio.get_running_loop().time() < deadline, "the batch never landed"
            await asyncio.sleep(0.01)


# A proxy delay far past the client's socket timeout: the reply cannot come back in
# time, however loaded the machine (the client closes the connection on its timeout,
# so the held reply costs nothing).
PROXY_DELAY = 10.0


@pytest.mark.parametrize("mode", ["reset", "blackhole", "delay", "drop_replies"])
async def test_a_failed_call_then_its_retry_stores_the_batch_exactly_once(
    make_store: MakeStore, mode: str
) -> None:
    # contract 2: after a lost reply (delay, drop_replies) the retry is a no-op;
    # after a call that never arrived (reset, blackhole) it appends.
    proxy = await FaultProxy.start(HOST, PORT)
    try:
        proxied = make_store(
            f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=1.0, socket_connect_timeout=1.0
        )
        direct = make_store()
        # A pooled connection, warm (retried: a healthy call may be slow on a busy machine).
        await call_until_it_lands(proxied, KEY, batch(0, TITLED[0]))
        sent = batch(1, TITLED[1] + TITLED[2], expect=0)
        if mode == "delay":
            proxy.set_mode("delay", seconds=PROXY_DELAY)  # far past the socket timeout
        else:
            proxy.set_mode(mode)  # type: ignore[arg-type]
        with pytest.raises((RedisError, OSError)):
            await proxied.append_batch(KEY, sent)
        landed = mode in ("delay", "drop_replies")
        if landed:  # the request reached the server: wait until it is applied

            async def applied() -> bool:
                return await direct.length(KEY) == 3

            await until(applied, "the write landed")
        else:  # the request never reached the server (reset, blackhole)
            assert await direct.length(KEY) == 1
        proxy.set_mode("pass")
        receipt = await call_until_it_lands(proxied, KEY, sent)
        assert receipt == Receipt(appended=0 if landed else 2, mark=2, length=3)
        assert await direct.load(KEY) == TITLED[0] + TITLED[1] + TITLED[2]
        assert (await only_summary(direct))["data"] == folded(TITLED)
    finally:
        await proxy.close()


async def test_concurrent_producers_through_a_flapping_network_land_exactly_once(
    make_store: MakeStore,
) -> None:
    # contract 2: four hosts write one key at once while the network resets,
    # swallows and delays; each retries its batch until a reply comes back.
    proxy = await FaultProxy.start(HOST, PORT)
    rng = random.Random(11)
    per_producer = 30

    def entry(producer: str, n: int) -> dict[str, Any]:
        return {"type": "user", "customTitle": f"{producer}-{n}", "p": producer, "n": n}

    async def produce(producer: str, store: RedisStore) -> Batch:
        seq, expect, sent = 0, None, None
        while seq < per_producer:
            size = min(rng.randint(1, 5), per_producer - seq)
            sent = batch(
                seq, [entry(producer, n) for n in range(seq, seq + size)], expect, producer
            )
            receipt = await call_until_it_lands(store, KEY, sent)
            assert receipt.mark == sent.last_seq
            seq, expect = seq + size, sent.last_seq
        assert sent is not None
        return sent

    async def flap(stop: asyncio.Event) -> None:
        while not stop.is_set():
            mode = rng.choice(["pass", "pass", "reset", "drop_replies", "blackhole", "delay"])
            if mode == "delay":
                proxy.set_mode("delay", seconds=PROXY_DELAY)
            else:
                proxy.set_mode(mode)  # type: ignore[arg-type]
            await asyncio.sleep(rng.uniform(0.02, 0.15))
        proxy.set_mode("pass")

    try:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        hosts = {
            f"p{i}": make_store(url, socket_timeout=0.3, socket_connect_timeout=0.3)
            for i in range(4)
        }
        stop = asyncio.Event()
        flapping = asyncio.create_task(flap(stop))
        try:
            last = await asyncio.gather(*(produce(p, s) for p, s in hosts.items()))
        finally:
            stop.set()
            await flapping
        assert proxy.resets > 0
        # A summary catch-up lost to the network is redone by the next call: a repeat.
        for store, sent in zip(hosts.values(), last, strict=True):
            assert (await call_until_it_lands(store, KEY, sent)).appended == 0
        stored = await make_store().load(KEY)
        assert stored is not None and len(stored) == 4 * per_producer
        for producer in hosts:
            mine = [e for e in stored if e["p"] == producer]
            assert mine == [entry(producer, n) for n in range(per_producer)]
        summary = await only_summary(make_store())
        assert summary["data"] == fold_session_summary(None, KEY, stored)["data"]
    finally:
        await proxy.close()


async def test_a_restart_without_persistence_ends_in_mark_behind(
    make_store: MakeStore, private_redis: Callable[..., Any]
) -> None:
    # A restart that loses acknowledged entries loses their marks with them, and
    # the producer that was told "stored" learns it (contract 2: repaired or reported).
    server = await private_redis()  # --save "" --appendonly no
    # A killed server refuses or resets at once: no timeout is part of the fault.
    store = make_store(server.url, socket_timeout=5.0, socket_connect_timeout=5.0)
    await store.append_batch(KEY, batch(0, entries(3)))
    await store.append_batch(SUB, batch(0, entries(2)))
    await server.stop(signal.SIGKILL)
    await server.start()
    for key, acknowledged in ((KEY, 2), (SUB, 1)):
        sent = batch(acknowledged + 1, entries(1, start=9), expect=acknowledged)
        with pytest.raises(MarkBehindError) as info:
            await call_until_it_lands(store, key, sent)
        assert (info.value.mark, info.value.expect) == (None, acknowledged)
        assert await store.load(key) is None


async def test_a_restart_with_aof_keeps_the_marks(
    make_store: MakeStore, private_redis: Callable[..., Any]
) -> None:
    server = await private_redis("--appendonly", "yes", "--appendfsync", "always")
    # A killed server refuses or resets at once: no timeout is part of the fault.
    store = make_store(server.url, socket_timeout=5.0, socket_connect_timeout=5.0)
    await store.append_batch(KEY, batch(0, entries(3)))
    await store.delete(KEY)  # the tombstone survives the restart too
    await server.stop(signal.SIGKILL)
    await server.start()
    assert (await call_until_it_lands(store, KEY, batch(0, entries(3)))).appended == 0
    receipt = await store.append_batch(KEY, batch(3, entries(1, start=3), expect=2))
    assert receipt == Receipt(appended=1, mark=3, length=1)


# --- Real faults, exactly once, through DurableSessionStore ------------------------

FAULT_KEYS: list[SessionKey] = [
    KEY,
    SUB,
    {"project_key": "proj", "session_id": "second"},
]


class Appender:
    """Appends numbered entries (every fourth without a uuid) and remembers what it sent."""

    def __init__(self, store: DurableSessionStore) -> None:
        self.store = store
        self.sent: dict[str, list[Any]] = {skey(k): [] for k in FAULT_KEYS}
        self.n = 0

    async def round(self) -> None:
        for key in FAULT_KEYS:
            batch = []
            for _ in range(3):
                self.n += 1
                entry: dict[str, Any] = {"type": "user", "n": self.n, "pad": "x" * 200}
                if self.n % 4:
                    entry["uuid"] = f"e{self.n}"
                batch.append(entry)
            await self.store.append(key, batch)
            self.sent[skey(key)].extend(batch)

    async def rounds(self, count: int, pause: float) -> None:
        for _ in range(count):
            await self.round()
            await asyncio.sleep(pause)


async def retries(store: DurableSessionStore) -> int:
    return int((await store.status())["backends"][0]["retries"])


async def wait_for_retries(store: DurableSessionStore, at_least: int) -> None:
    async def enough() -> bool:
        return await retries(store) >= at_least

    await until(enough, "the fault hit the flusher")


async def assert_exactly_once(direct: RedisStore, appender: Appender) -> None:
    for key in FAULT_KEYS:
        assert await direct.load(key) == appender.sent[skey(key)], key
    main = appender.sent[skey(KEY)]
    summaries = {s["session_id"]: s for s in await direct.list_session_summaries("proj")}
    assert summaries["sess"]["data"] == fold_session_summary(None, KEY, main)["data"]


@pytest.mark.parametrize("mode", ["reset", "blackhole", "delay", "drop_replies"])
async def test_exactly_once_through_network_faults(
    make_store: MakeStore, make_durable: Callable[..., DurableSessionStore], mode: str
) -> None:
    proxy = await FaultProxy.start(HOST, PORT)
    try:
        backend = make_store(
            f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=0.3, socket_connect_timeout=0.3
        )
        direct = make_store()  # same keys, no proxy in between
        durable = make_durable(
            backend, call_timeout=1.0, max_batch_entries=5, batch_linger=0.0, backoff_max=0.05
        )
        appender = Appender(durable)
        await appender.rounds(3, 0.0)
        await durable.flush(timeout=HANG_GUARD)
        landed_before = await direct.length(KEY)

        if mode == "delay":
            proxy.set_mode("delay", seconds=PROXY_DELAY)  # far past the socket timeout
        else:
            proxy.set_mode(mode)  # type: ignore[arg-type]
        await appender.rounds(4, 0.05)
        await wait_for_retries(durable, 2)
        if mode in ("delay", "drop_replies"):

            async def landed() -> bool:  # writes landed, their replies did not
                return await direct.length(KEY) > landed_before

            await until(landed, "a write whose reply was lost landed")
        else:
            assert await direct.length(KEY) == landed_before  # nothing got through
        if mode == "blackhole":
            assert proxy.bytes_dropped > 0
        if mode in ("reset", "drop_replies"):
            assert proxy.resets > 0

        proxy.set_mode("pass")
        await appender.rounds(2, 0.0)
        await durable.flush(timeout=HANG_GUARD)
        await assert_exactly_once(direct, appender)
        assert (await durable.status())["backends"][0]["parked"] == []
        await durable.close(timeout=5)
    finally:
        await proxy.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_exactly_once_across_a_redis_restart_mid_drain(
    make_store: MakeStore,
    make_durable: Callable[..., DurableSessionStore],
    private_redis: Callable[..., Any],
    sig: int,
) -> None:
    # A non-persistent Redis forgets everything on restart; this one keeps every
    # acknowledged write (AOF, fsync before each reply).
    server = await private_redis("--appendonly", "yes", "--appendfsync", "always")
    # A stopped server refuses or resets at once: no timeout is part of the fault.
    backend = make_store(server.url, socket_timeout=5.0, socket_connect_timeout=5.0)
    direct = make_store(server.url)
    assert await direct.check_server() == []
    durable = make_durable(
        backend, call_timeout=10.0, max_batch_entries=7, batch_linger=0.0, backoff_max=0.05
    )
    appender = Appender(durable)
    restarted = asyncio.Event()

    async def write() -> None:  # before, during and after the outage
        while not restarted.is_set():
            await appender.rounds(1, 0.02)
        await appender.rounds(10, 0.02)

    async def delivering() -> bool:
        return bool((await durable.status())["backends"][0]["delivered"])

    writing = asyncio.create_task(write())
    try:
        await until(delivering, "the drain got under way")
        failed_before = await retries(durable)
        await server.stop(sig)
        # Appends go on (the agent never waits on the backend) and the flusher meets
        # the dead server.
        await wait_for_retries(durable, failed_before + 1)
        await asyncio.sleep(0.1)
        await server.start()  # same port, same directory: the AOF is replayed
        restarted.set()
        await writing
    finally:
        writing.cancel()
    await durable.flush(timeout=HANG_GUARD)
    await assert_exactly_once(direct, appender)
    await durable.close(timeout=5)
