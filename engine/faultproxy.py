"""A small TCP fault proxy to put between a client and a real server in tests.

``FaultProxy`` listens on a free local port and forwards every connection it
accepts to the target server. Its mode can be switched at any time, and the
switch applies to open connections as well as to new ones::

    async with await FaultProxy.start("127.0.0.1", 6379) as proxy:
        client = redis.asyncio.Redis(host=proxy.host, port=proxy.port, socket_timeout=0.5)
        proxy.set_mode("blackhole")
        ...

Modes and the real failure each one models:

``pass`` (the default)
    Bytes are forwarded both ways unchanged: a healthy network.

``blackhole``
    Connections stay open (new ones are accepted too) but nothing is forwarded
    either way: a network partition, a dead host behind a firewall that drops
    packets, a server frozen by a long GC pause or a full disk. Calls hang until
    the client's own timeout fires. Bytes that arrive meanwhile are dropped, so
    switching back to ``pass`` resumes forwarding on the existing connections
    but their protocol stream may be corrupt (a request or half a reply went
    missing): clients typically must reconnect. ``reset`` is the clean way to
    make them do so.

``reset``
    Every open connection is aborted with a TCP RST (``SO_LINGER`` 0) on both
    sides, and new connections are reset right after they are accepted: a
    server crash or restart, a load balancer dropping its connection table, a
    server that refuses connections. Clients see ``ConnectionResetError``.

``delay`` (``seconds=``)
    Forward both ways, but hold each server-to-client chunk for ``seconds``
    first: a slow or overloaded server. Requests land on time; replies come
    late, so a client with a shorter timeout gives up on a write that did
    happen.

``drop_replies``
    Forward client-to-server; when the server's reply arrives, reset the
    connection instead of forwarding it: the write landed, the reply was lost
    (a crash or network failure between the server's commit and its answer).
    This is the ambiguous failure that exactly-once delivery must survive.

An EOF from either side closes the whole connection (both directions); a
connection that cannot reach the target server is reset. Counters:
``connections`` (accepted), ``resets`` (connections the proxy reset),
``bytes_up`` / ``bytes_down`` (forwarded client-to-server / server-to-client),
``bytes_dropped`` (swallowed by ``blackhole``) and ``active`` (open now).
``close()`` aborts every connection and waits for all of the proxy's tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, get_args
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "Mode"]

Mode = Literal["pass", "blackhole", "reset", "delay", "drop_replies"]
_MODES: tuple[str, ...] = get_args(Mode)
_CHUNK = 64 * 1024


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Abort the connection with a TCP RST rather than a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side and, once connected, the server's."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    closed: bool = False
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """A TCP proxy from ``(host, port)`` to a target server, with switchable faults."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = ""
        self.port = 0
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.connections = 0
        self.resets = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_dropped = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(
        cls, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> FaultProxy:
        """Start a proxy to ``target_host:target_port`` listening on ``host:port`` (0: free)."""
        proxy = cls(target_host, target_port)
        proxy._server = await asyncio.start_server(proxy._accept, host, port)
        proxy.host, proxy.port = proxy._server.sockets[0].getsockname()[:2]
        return proxy

    @property
    def active(self) -> int:
        """Connections open right now."""
        return len(self._links)

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (user and path kept).

        ``proxy.url_for("redis://127.0.0.1:6379/0")`` -> ``"redis://127.0.0.1:PORT/0"``.
        """
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = f"{userinfo}@{host}:{self.port}" if userinfo else f"{host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def set_mode(self, mode: Mode, *, seconds: float | None = None) -> None:
        """Switch mode; ``seconds`` (required, >= 0) only with ``"delay"``."""
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {_MODES}")
        if (mode == "delay") != (seconds is not None):
            raise ValueError("seconds= is required with mode 'delay' and only allowed there")
        if seconds is not None and seconds < 0:
            raise ValueError("seconds must be >= 0")
        self.mode = mode
        self.delay = seconds or 0.0
        if mode == "reset":
            for link in list(self._links):
                self._reset(link)

    async def close(self) -> None:
        """Stop listening, abort every connection and wait for the proxy's tasks."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.closed = True
            link.client.transport.abort()
            if link.server is not None:
                link.server.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "reset":
            self.resets += 1
            _rst(writer)
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        try:
            try:
                up_reader, link.server = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                self._reset(link)
                return
            if link.closed:  # reset (or closed) while connecting
                _rst(link.server)
                return
            link.pumps = [
                asyncio.create_task(self._pump(link, reader, link.server, up=True)),
                asyncio.create_task(self._pump(link, up_reader, writer, up=False)),
            ]
            await asyncio.wait(link.pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in link.pumps:
                pump.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)
            sides = [w for w in (link.client, link.server) if w is not None]
            for side in sides:
                side.close()  # graceful: flushes what is buffered, then FIN
            try:
                async with asyncio.timeout(1.0):
                    for side in sides:
                        with contextlib.suppress(OSError):
                            await side.wait_closed()
            except TimeoutError:  # a peer that stopped reading: give up on it
                for side in sides:
                    side.transport.abort()
            finally:
                self._links.discard(link)

    async def _pump(
        self,
        link: _Link,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        *,
        up: bool,
    ) -> None:
        """Copy ``src`` to ``dst`` (``up``: client to server) under the current mode."""
        with contextlib.suppress(OSError):
            while data := await src.read(_CHUNK):
                mode = self.mode
                if mode == "blackhole":
                    self.bytes_dropped += len(data)
                    continue
                if mode == "reset" or (mode == "drop_replies" and not up):
                    self._reset(link)
                    return
                if mode == "delay" and not up:
                    await asyncio.sleep(self.delay)
                dst.write(data)
                await dst.drain()
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)

    def _reset(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        self.resets += 1
        _rst(link.client)
        _rst(link.server)
