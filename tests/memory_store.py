"""``MemoryStore``: the delivery protocol in a few lines of Python, for engine tests.

The SDK's ``InMemorySessionStore`` plus ``walmirror.protocol``'s atomic step:
per key a transcript and each producer's mark; ``delete`` keeps the marks.
Several ``MemoryStore`` objects may share one ``MemoryStorage`` (several hosts,
one backend). Every call yields to the event loop once, as a remote one would.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk.types import SessionKey, SessionStoreEntry

from walmirror.keys import describe_key
from walmirror.protocol import Batch, Receipt, check_batch, skip_count


def _ident(key: SessionKey) -> tuple[str, str, str]:
    return key["project_key"], key["session_id"], key.get("subpath") or ""


@dataclass
class MemoryStorage:
    """What one backend holds: transcripts (an SDK in-memory store) and marks."""

    data: Any = field(default_factory=InMemorySessionStore)
    marks: dict[tuple[str, str, str], dict[str, int]] = field(default_factory=dict)

    def lose_everything(self) -> None:
        """A restart without persistence."""
        self.data = InMemorySessionStore()
        self.marks.clear()


class MemoryStore:
    """A protocol-speaking ``SessionStore`` over a ``MemoryStorage``."""

    def __init__(self, storage: MemoryStorage | None = None) -> None:
        self.storage = storage or MemoryStorage()

    async def append_batch(self, key: SessionKey, batch: Batch) -> Receipt:
        desc = describe_key(key)
        check_batch(desc, batch)
        await asyncio.sleep(0)
        marks = self.storage.marks.setdefault(_ident(key), {})
        mark = marks.get(batch.producer)
        skip = skip_count(desc, batch, mark)
        new = batch.entries[skip:]
        if new:
            await self.storage.data.append(key, new)
            marks[batch.producer] = batch.last_seq
        length = len(await self.storage.data.load(key) or [])
        return Receipt(appended=len(new), mark=marks.get(batch.producer, -1), length=length)

    async def ping(self) -> None:
        await asyncio.sleep(0)

    async def producer_mark(self, key: SessionKey, producer: str) -> int | None:
        await asyncio.sleep(0)
        return self.storage.marks.get(_ident(key), {}).get(producer)

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        await asyncio.sleep(0)
        await self.storage.data.append(key, entries)

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        await asyncio.sleep(0)
        result: list[SessionStoreEntry] | None = await self.storage.data.load(key)
        return result

    async def list_sessions(self, project_key: str) -> Any:
        return await self.storage.data.list_sessions(project_key)

    async def list_session_summaries(self, project_key: str) -> Any:
        return await self.storage.data.list_session_summaries(project_key)

    async def list_subkeys(self, key: Any) -> Any:
        return await self.storage.data.list_subkeys(key)

    async def delete(self, key: SessionKey) -> None:
        await asyncio.sleep(0)
        await self.storage.data.delete(key)  # the marks stay: the tombstone


class GatedStore(MemoryStore):
    """Takes ``allowed`` batches, then fails (retryably) until ``allowed`` is raised."""

    def __init__(self, storage: MemoryStorage | None = None) -> None:
        super().__init__(storage)
        self.allowed = 0

    async def append_batch(self, key: SessionKey, batch: Batch) -> Receipt:
        if self.allowed <= 0:
            raise ConnectionError("gate closed (test)")
        self.allowed -= 1
        return await super().append_batch(key, batch)


class SlowSessionStore(MemoryStore):
    """Holds every batch of session ``slow`` until ``release`` is set."""

    def __init__(self, storage: MemoryStorage | None = None) -> None:
        super().__init__(storage)
        self.release = asyncio.Event()

    async def append_batch(self, key: SessionKey, batch: Batch) -> Receipt:
        if key["session_id"] == "slow":
            await self.release.wait()
        return await super().append_batch(key, batch)
