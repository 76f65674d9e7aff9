"""The SDK's own SessionStore contract suite, run against walmirror's stores."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk.testing import run_session_store_conformance

from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore
from walmirror.faults import FaultyStore


async def test_file_store_alone(tmp_path: Path) -> None:
    roots = itertools.count()
    await run_session_store_conformance(lambda: FileStore(tmp_path / f"root-{next(roots)}"))


async def test_durable_over_file_store(
    make_durable: Callable[..., DurableSessionStore], tmp_path: Path
) -> None:
    roots = itertools.count()
    await run_session_store_conformance(
        lambda: make_durable(FileStore(tmp_path / f"root-{next(roots)}"))
    )


async def test_durable_over_sdk_in_memory_store(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    await run_session_store_conformance(lambda: make_durable(InMemorySessionStore()))


async def test_durable_over_faulty_store_that_heals(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    # Each store's backend refuses writes for its first 0.2 s and fails 20 % of
    # them after that. The suite reads right after writing, so reads must
    # include entries still queued (contract 4) and deletes must win over them
    # (contract 5).
    def make() -> DurableSessionStore:
        faulty = FaultyStore(InMemorySessionStore(), seed=7, error_rate=0.2, writes_only=True)
        faulty.down(0.2)
        faulty.ops = frozenset({"append", "delete"})
        return make_durable(faulty)

    await run_session_store_conformance(make)


async def test_durable_over_faulty_file_store_that_heals(
    make_durable: Callable[..., DurableSessionStore], tmp_path: Path
) -> None:
    roots = itertools.count()

    def make() -> DurableSessionStore:
        faulty = FaultyStore(
            FileStore(tmp_path / f"root-{next(roots)}"), seed=3, lost_reply_rate=0.3
        )
        faulty.ops = frozenset({"append_batch", "delete"})  # writes fail, reads work
        faulty.down(0.2)
        return make_durable(faulty)

    await run_session_store_conformance(make)
