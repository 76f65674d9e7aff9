"""``walmirror bench``'s mirror-lag figure: walmirror's own lag at a steady rate.

``sessions`` sessions append 17-entry batches of ~1 KB entries to one
``DurableSessionStore`` in front of Redis (healthy) on an open-loop clock:
session ``i``'s ``k``-th batch is due at ``start + (k + i / sessions) * period``
whether or not its previous ``append`` returned late, so a slow store shows as
lag, not as a lower offered rate. Every ``interval`` the queue's lag is sampled:
the age of the oldest entry no backend call has acknowledged yet, the figure
``status()`` reports (``lag_seconds``).

The load generator is the appends themselves. Nothing else shares the process:
``bench --scenario steady`` runs the same rate through a simulated CLI and the
SDK's own ``TranscriptMirrorBatcher`` in walmirror's process, and on a 2-core
machine that load generator takes most of the core walmirror needs. This run
isolates what walmirror adds.

Each rate reports how much it really offered (entries appended per second, and
how late the clock's batches went out), the process's CPU share, and whether
the backend ends up holding every entry exactly once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from claude_agent_sdk.types import SessionKey, SessionStore

from walmirror import DurableSessionStore, FlushTimeoutError
from walmirror.bench.append import BATCH, make_batch, stored_length, summarise
from walmirror.store import close_backends


@dataclass(frozen=True)
class LagRun:
    rate: int  # entries per second, all sessions together
    sessions: int
    seconds: float
    interval: float  # between lag samples


def _ms(values: list[float]) -> dict[str, Any]:
    """``summarise``'s percentiles (the same rule as the append figures), and the max."""
    return {**summarise(values), "max_ms": round(max(values) * 1000, 4)}


async def steady_lag(
    backend: SessionStore, queue_path: Path, run: LagRun, project: str
) -> dict[str, Any]:
    """One steady run of ``run.rate`` entries/s into ``backend`` through a fresh queue."""
    if run.rate <= 0 or run.sessions <= 0 or run.seconds <= 0 or run.interval <= 0:
        raise ValueError("rate, sessions, seconds and interval must be positive")
    store = DurableSessionStore(backend, queue_path)
    await store.start()
    name = store.backend_names[0]
    period = run.sessions * BATCH / run.rate  # seconds between one session's batches
    keys: list[SessionKey] = [
        {"project_key": project, "session_id": f"s{i}-{uuid.uuid4().hex[:12]}"}
        for i in range(run.sessions)
    ]
    appends: list[float] = []
    late: list[float] = []  # how long after its due time each batch went out
    lags: list[float] = []
    sent = [0] * run.sessions
    done = asyncio.Event()
    sampler: asyncio.Task[None] | None = None

    async def session(i: int, start: float) -> None:
        key = keys[i]
        k = 0
        while True:
            due = start + (k + i / run.sessions) * period
            if due >= start + run.seconds:
                return
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            went = time.perf_counter()
            late.append(max(0.0, went - due))
            await store.append(key, make_batch(key["session_id"], sent[i]))
            appends.append(time.perf_counter() - went)
            sent[i] += BATCH
            k += 1

    async def sample() -> None:
        while not done.is_set():
            _, lag, _ = await store.queue.depth(name)
            lags.append(lag)
            try:
                await asyncio.wait_for(done.wait(), run.interval)
            except TimeoutError:
                pass

    try:
        # A warm-up key first: the flusher, the connections and the queue's pages exist
        # before the clock starts.
        warm: SessionKey = {"project_key": project, "session_id": "warm-up"}
        await store.append(warm, make_batch("warm-up", 0))
        await store.flush(timeout=30.0)
        cpu_before, started = time.process_time(), time.perf_counter()
        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(session(i, started + 0.01) for i in range(run.sessions)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
        done.set()
        await sampler
        try:
            await store.flush(timeout=60.0)
            drained = True
        except FlushTimeoutError:
            drained = False
    finally:
        done.set()
        if sampler is not None and not sampler.done():  # a session raised
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        await store.close(timeout=10.0)
    lengths = [await stored_length(backend, key) for key in keys]
    total = sum(sent)
    return {
        "rate": run.rate,
        "sessions": run.sessions,
        "seconds": round(elapsed, 3),
        "entries": total,
        "offered_per_s": round(total / elapsed),
        "late_start": _ms(late),
        "append": _ms(appends),
        "lag": _ms(lags),
        "lag_samples": len(lags),
        "sample_interval_s": run.interval,
        "cpu_share": round(cpu / elapsed, 3),  # of one core; >= 1 means more than one
        "drained": drained,
        "delivered": sum(lengths),
        "exact": lengths == sent,  # each key's backend length is what it appended
    }


async def lag_at_rates(redis_url: str, directory: Path, runs: list[LagRun]) -> dict[str, Any]:
    """Each run against Redis under a namespace of its own (removed afterwards);
    ``{"skipped": why}`` when no Redis answers at ``redis_url``."""
    from walmirror.backends import from_url
    from walmirror.bench.scenarios import Namespace

    namespace = Namespace.make(redis_url, secrets.randbits(32), directory)
    results: dict[str, Any] = {"backend": "RedisStore", "runs": []}
    try:
        for n, run in enumerate(runs):
            backend = from_url(namespace.url)
            if n == 0:
                try:  # "when reachable": a missing server is a skipped row, not a failure
                    await asyncio.wait_for(cast(Any, backend).ping(), 3.0)
                except Exception as exc:
                    await close_backends([backend])
                    return {"skipped": f"redis not reachable at {redis_url}: {type(exc).__name__}"}
            try:
                result = await steady_lag(backend, directory / f"lag-{n}.db", run, f"bench-lag-{n}")
            finally:
                await close_backends([backend])
            results["runs"].append(result)
    finally:
        await namespace.cleanup()
    return results
