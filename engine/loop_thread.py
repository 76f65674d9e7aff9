"""Running the engine for callers that are not on asyncio (trio, through anyio).

walmirror's engine is asyncio: its flusher tasks, the queue's threads reporting
back with ``call_soon_threadsafe``, and the backends' clients (``redis.asyncio``,
``asyncpg``, ``aiobotocore``), which exist only for asyncio. The SDK runs on
anyio, so a user may run it under trio. Then a ``DurableSessionStore`` runs its
engine on an asyncio event loop of its own, on a thread of its own
(``LoopThread``), and each call made from trio hops there and back
(``call_from_trio``): every backend works, and the trio side never blocks.

Under asyncio nothing of this is used: the store runs on the caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import sniffio

from .errors import WalmirrorError

T = TypeVar("T")


def current_library() -> str | None:
    """``"asyncio"``, ``"trio"``, another library's name, or None outside async code."""
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None


class LoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self, name: str) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Let the loop end once what is scheduled on it has run (no join: a trio
        caller must not block on it)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)


async def call_from_trio(loop: LoopThread, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` and wait for it without blocking trio. Cancelling the
    caller cancels the coroutine (like cancelling an asyncio task: an append may
    still have been committed, and a retry is recognised by its uuid)."""
    import trio

    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass  # the trio run is over: nobody waits

    future = loop.submit(coro)
    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        future.cancel()
        raise
    return future.result()


async def call_from_asyncio(loop: LoopThread, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` from another asyncio loop."""
    return await asyncio.wrap_future(loop.submit(coro))


def unsupported(library: str | None) -> WalmirrorError:
    return WalmirrorError(
        f"DurableSessionStore runs under asyncio or trio (anyio on either); "
        f"this call came from {library or 'no async library'}"
    )
