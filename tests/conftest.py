"""Shared fixtures: fresh queue paths, and stores that are always closed after the test."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

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
