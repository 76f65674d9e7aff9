"""``walmirror bench``'s steady-rate lag run (``walmirror.bench.lag``): what it offers,
what it samples, and that it checks delivery. Structure only, no timings."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk.types import SessionKey, SessionStoreEntry

from walmirror.backends.file import FileStore
from walmirror.bench.append import BATCH, _lag_checks, make_batch
from walmirror.bench.lag import LagRun, steady_lag


def _due_batches(run: LagRun) -> int:
    """Batches the open-loop clock schedules: session i's k-th at (k + i/n) * period."""
    period = run.sessions * BATCH / run.rate
    return sum(
        sum(1 for k in range(10_000) if (k + i / run.sessions) * period < run.seconds)
        for i in range(run.sessions)
    )


async def test_steady_lag_offers_every_scheduled_batch_and_checks_delivery(
    tmp_path: Path,
) -> None:
    run = LagRun(rate=2_000, sessions=4, seconds=0.6, interval=0.02)
    backend = FileStore(tmp_path / "backend")
    r = await steady_lag(backend, tmp_path / "queue.db", run, "bench-lag-test")
    assert r["entries"] == _due_batches(run) * BATCH  # late batches still go: open loop
    assert r["drained"] and r["exact"] and r["delivered"] == r["entries"]
    assert r["lag_samples"] >= 1
    assert 0 <= r["lag"]["p50_ms"] <= r["lag"]["p99_ms"] <= r["lag"]["max_ms"]
    assert r["append"]["p50_ms"] > 0 and r["cpu_share"] > 0


async def test_steady_lag_exact_is_false_when_the_backend_drops_entries(
    tmp_path: Path,
) -> None:
    class Forgetful(FileStore):
        """Acknowledges every write, then holds nothing: a backend that lost its data."""

        async def length(self, key: SessionKey) -> int:
            return 0

        async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
            return None

    run = LagRun(rate=2_000, sessions=2, seconds=0.2, interval=0.02)
    r = await steady_lag(Forgetful(tmp_path / "b"), tmp_path / "q.db", run, "bench-lag-test")
    assert r["entries"] > 0 and r["delivered"] == 0 and not r["exact"]
    low = {**r, "rate": 1_000}
    high = {**r, "rate": 10_000, "lag": {**r["lag"], "p99_ms": 1.0}}
    (check,) = _lag_checks({"runs": [low, high]})
    assert not check["met"]  # a fast lag does not pass when entries went missing


@pytest.mark.parametrize("field", ["rate", "sessions", "seconds", "interval"])
async def test_steady_lag_refuses_non_positive_settings(tmp_path: Path, field: str) -> None:
    settings = {"rate": 1_000, "sessions": 2, "seconds": 0.1, "interval": 0.02, field: 0}
    with pytest.raises(ValueError, match="must be positive"):
        await steady_lag(FileStore(tmp_path / "b"), tmp_path / "q.db", LagRun(**settings), "p")


async def test_steady_lag_stops_its_sampler_when_a_session_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import walmirror.bench.lag as lag

    made = 0

    def failing_batch(prefix: str, start: int) -> Any:
        nonlocal made
        made += 1
        if made > 3:  # the warm-up and a few batches, then the load generator breaks
            raise RuntimeError("injected: the generator failed")
        return make_batch(prefix, start)

    monkeypatch.setattr(lag, "make_batch", failing_batch)
    run = LagRun(rate=2_000, sessions=2, seconds=1.0, interval=0.01)
    with pytest.raises(RuntimeError, match="injected"):
        await steady_lag(FileStore(tmp_path / "b"), tmp_path / "q.db", run, "p")
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in others if "sample" in repr(t.get_coro())]
