"""Tests for walmirror.faultproxy.FaultProxy, against an echo server and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from walmirror.faultproxy import FaultProxy

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# Waits for something that must happen fail only after this long: a hang guard, not a
# timing. Short timeouts below are ones that must fire (the proxy never forwards, or
# holds the reply far longer), so a slow machine only makes them fire later.
HANG_GUARD = 30.0


async def until(condition: Callable[[], bool], timeout: float = HANG_GUARD) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class EchoServer:
    """Echoes every chunk back and records what it received."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def wait_received(self, data: bytes, timeout: float = HANG_GUARD) -> None:
        async with asyncio.timeout(timeout):
            while data not in self.received:
                await asyncio.sleep(0.01)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    assert server.server is not None
    server.server.close()
    await server.server.wait_closed()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with await FaultProxy.start("127.0.0.1", echo.port) as p:
        yield p


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def connect(proxy: FaultProxy) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        yield reader, writer
    finally:
        writer.close()


@pytest.fixture
async def conn(proxy: FaultProxy) -> AsyncIterator[Conn]:
    async with connect(proxy) as c:
        yield c


async def roundtrip(conn: Conn, data: bytes, timeout: float = HANG_GUARD) -> bytes:
    reader, writer = conn
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), timeout)


async def test_pass_forwards_both_ways(proxy: FaultProxy, conn: Conn, echo: EchoServer) -> None:
    assert await roundtrip(conn, b"hello") == b"hello"
    assert echo.received == b"hello"
    assert (proxy.connections, proxy.bytes_up, proxy.bytes_down) == (1, 5, 5)
    assert proxy.url_for("redis://user:pw@db.example:6379/0") == (
        f"redis://user:pw@127.0.0.1:{proxy.port}/0"
    )


async def test_blackhole_times_out_then_pass_resumes(
    proxy: FaultProxy, conn: Conn, echo: EchoServer
) -> None:
    assert await roundtrip(conn, b"one") == b"one"
    proxy.set_mode("blackhole")
    with pytest.raises(TimeoutError):
        await roundtrip(conn, b"lost", timeout=0.3)
    await until(lambda: proxy.bytes_dropped == 4)  # the proxy read it, and dropped it
    assert b"lost" not in echo.received
    proxy.set_mode("pass")
    assert await roundtrip(conn, b"again") == b"again"


async def test_blackhole_holds_new_connections_open(proxy: FaultProxy) -> None:
    proxy.set_mode("blackhole")
    async with connect(proxy) as c:
        with pytest.raises(TimeoutError):
            await roundtrip(c, b"x", timeout=0.3)
        assert proxy.active == 1


async def test_reset_aborts_existing_connection(proxy: FaultProxy, conn: Conn) -> None:
    assert await roundtrip(conn, b"one") == b"one"
    proxy.set_mode("reset")
    with pytest.raises(ConnectionResetError):
        await roundtrip(conn, b"two")
    assert proxy.resets == 1


async def test_reset_rejects_new_connections(proxy: FaultProxy) -> None:
    proxy.set_mode("reset")
    with pytest.raises(ConnectionResetError):
        async with connect(proxy) as c:
            await roundtrip(c, b"x")
    assert (proxy.connections, proxy.resets, proxy.active) == (1, 1, 0)


async def test_delay_request_lands_reply_times_out(
    proxy: FaultProxy, conn: Conn, echo: EchoServer
) -> None:
    proxy.set_mode("delay", seconds=0.5)
    with pytest.raises(TimeoutError):  # the proxy holds the reply 5x longer
        await roundtrip(conn, b"ping", timeout=0.1)
    await echo.wait_received(b"ping")
    # The reply was late, not lost.
    assert await asyncio.wait_for(conn[0].readexactly(4), HANG_GUARD) == b"ping"


async def test_drop_replies_write_lands_client_sees_reset(
    proxy: FaultProxy, conn: Conn, echo: EchoServer
) -> None:
    proxy.set_mode("drop_replies")
    with pytest.raises(ConnectionResetError):
        await roundtrip(conn, b"write")
    assert echo.received == b"write"
    assert proxy.resets == 1


async def test_many_concurrent_connections(proxy: FaultProxy) -> None:
    async def one(i: int) -> bytes:
        async with connect(proxy) as c:
            return await roundtrip(c, b"%d" % i * 100)

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert results == [b"%d" % i * 100 for i in range(50)]
    assert proxy.connections == 50
    await until(lambda: not proxy.active)


async def test_close_closes_open_connections(echo: EchoServer) -> None:
    proxy = await FaultProxy.start("127.0.0.1", echo.port)
    async with connect(proxy) as c:
        assert await roundtrip(c, b"hi") == b"hi"
        await proxy.close()
        assert proxy.active == 0
        assert await asyncio.wait_for(c[0].read(), HANG_GUARD) == b""
    with pytest.raises(OSError):
        await asyncio.open_connection(proxy.host, proxy.port)


async def test_unreachable_target_resets_client() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with await FaultProxy.start("127.0.0.1", dead_port) as proxy:
        with pytest.raises(ConnectionResetError):
            async with connect(proxy) as c:
                await roundtrip(c, b"x")


def test_set_mode_validates_arguments() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(ValueError):
        proxy.set_mode("delay")
    with pytest.raises(ValueError):
        proxy.set_mode("pass", seconds=1.0)
    with pytest.raises(ValueError):
        proxy.set_mode("nonsense")  # type: ignore[arg-type]
    proxy.set_mode("delay", seconds=0.2)
    assert (proxy.mode, proxy.delay) == ("delay", 0.2)


# Real-world check: redis-py through the proxy.


@pytest.fixture
async def redis_proxy() -> AsyncIterator[FaultProxy]:
    # Redis is a service the test suite requires (.ci/run starts it): no skip.
    _, w = await asyncio.wait_for(asyncio.open_connection(REDIS_HOST, REDIS_PORT), 10)
    w.close()
    async with await FaultProxy.start(REDIS_HOST, REDIS_PORT) as p:
        yield p


@pytest.fixture
async def key() -> AsyncIterator[str]:
    name = f"walmirror:test:faultproxy:{uuid.uuid4().hex}"
    yield name
    direct = Redis(host=REDIS_HOST, port=REDIS_PORT)
    await direct.delete(name)
    await direct.aclose()


@pytest.fixture
async def client(redis_proxy: FaultProxy) -> AsyncIterator[Redis]:
    # No retries: one attempt, so the test sees exactly what the proxy did. The socket
    # timeout fires only in blackhole; it is long enough that a loaded machine does
    # not hit it on a healthy call.
    c = Redis(
        host=redis_proxy.host,
        port=redis_proxy.port,
        socket_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )
    yield c
    await c.aclose()


async def test_redis_set_works_in_pass(client: Redis, key: str) -> None:
    assert await client.set(key, b"v") is True
    assert await client.get(key) == b"v"


async def test_redis_set_fails_in_reset(redis_proxy: FaultProxy, client: Redis, key: str) -> None:
    await client.ping()
    redis_proxy.set_mode("reset")
    with pytest.raises(RedisConnectionError):
        await client.set(key, b"v")
    direct = Redis(host=REDIS_HOST, port=REDIS_PORT)
    assert await direct.get(key) is None
    await direct.aclose()


async def test_redis_drop_replies_write_lands_client_sees_error(
    redis_proxy: FaultProxy, client: Redis, key: str
) -> None:
    await client.ping()  # connect (and handshake) while the replies still flow
    redis_proxy.set_mode("drop_replies")
    with pytest.raises(RedisConnectionError):
        await client.set(key, b"landed")
    direct = Redis(host=REDIS_HOST, port=REDIS_PORT)
    assert await direct.get(key) == b"landed"
    await direct.aclose()


async def test_redis_blackhole_hits_socket_timeout(
    redis_proxy: FaultProxy, client: Redis, key: str
) -> None:
    await client.ping()
    redis_proxy.set_mode("blackhole")
    with pytest.raises(RedisTimeoutError):
        await client.set(key, b"v")
