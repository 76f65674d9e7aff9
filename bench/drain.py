"""``walmirror bench --drain``: backend drain throughput, next to the SDK's reference adapters.

For each real backend (Redis, PostgreSQL, S3 on a private moto server), in
one run:

a. walmirror drain: N transcript-like entries (~1 KB, 16 sessions) are queued
   in a ``DurableSessionStore`` whose backend (behind a ``FaultyStore``) is
   ``down()``; then it comes ``up()`` and ``flush()`` is timed from the first
   delivery call until every entry is acknowledged (producer-protocol
   delivery, cursors committed: the exactly-once bookkeeping is part of the
   figure). The wait from ``up()`` to that first call (the breaker's next
   probe, up to ``probe_interval``) is reported apart as ``probe_wait_s``:
   ``walmirror bench`` measures it as heal to first delivery. Run with
   ``max_batch_entries`` 17 and 500. Afterwards each session's length on the
   backend is checked against N / 16.
b. the SDK's reference adapters (``examples/session_stores/*_session_store.py``
   from the ``claude-agent-sdk`` sdist of the installed version, downloaded
   at bench time into ``~/.cache/walmirror-bench`` and imported from there):
   raw ``append`` of the same N entries in batches of 17 and 500, one loop per
   session, the 16 loops concurrent (as walmirror's flusher delivers 16 keys
   at once). No queue, no offsets, no retries.

Each row runs (a) and (b) three times, alternating (``--quick``: once), and
shows the median run of each: one run of 40,000 entries lasts well under a
second at batch 500, and moves by a tenth or more from run to run.

Everything the bench creates (Redis keys under its prefixes, PostgreSQL
tables, the moto server) is removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.metadata
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from claude_agent_sdk.types import SessionKey, SessionStoreEntry

from walmirror import DurableSessionStore
from walmirror.bench.append import LandingWatch
from walmirror.faults import FaultyStore

REDIS_URL = os.environ.get("WALMIRROR_BENCH_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get(
    "WALMIRROR_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
CACHE_DIR = Path.home() / ".cache" / "walmirror-bench"
SESSIONS = 16
BATCHES = (17, 500)
BACKENDS = ("redis", "postgres", "s3")
# Drain targets (entries/s) and the reference adapters' raw append on the design
# machine, at batches of 17 and 500.
TARGETS = {"redis": 100_000, "postgres": 60_000, "s3": 45_000}
REFERENCE_DESIGN = {
    "redis": {17: 31_000, 500: 61_000},
    "postgres": {17: 14_000, 500: 29_000},
    "s3": {17: 2_500, 500: 46_000},
}
S3_CREDENTIALS = {
    "aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
    "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
    "region_name": "us-east-1",
}
_TEXT = ("The agent reads the failing test, opens the parser and proposes a patch. " * 12)[:900]
log = logging.getLogger("walmirror.bench.drain")


@dataclass(frozen=True)
class Sizes:
    per_session: int  # entries per session; N = SESSIONS * per_session
    trials: int  # runs of each side per row, alternating; the median is shown


FULL = Sizes(per_session=2500, trials=3)  # N = 40,000
QUICK = Sizes(per_session=60, trials=1)  # N = 960


def make_entries(session_id: str, count: int) -> list[SessionStoreEntry]:
    """``count`` transcript-like entries of ~1 KB, unique uuids."""
    return [
        cast(
            SessionStoreEntry,
            {
                "type": "assistant" if seq % 2 else "user",
                "uuid": f"{session_id}-{seq:012d}",
                "timestamp": "2025-01-01T00:00:00.000Z",
                "sessionId": session_id,
                "message": {"role": "user", "content": _TEXT},
            },
        )
        for seq in range(count)
    ]


def workload(per_session: int) -> list[tuple[SessionKey, list[SessionStoreEntry]]]:
    run = uuid.uuid4().hex[:8]
    work = []
    for i in range(SESSIONS):
        key: SessionKey = {"project_key": "bench-drain", "session_id": f"s{i:02d}-{run}"}
        work.append((key, make_entries(key["session_id"], per_session)))
    return work


def chunks(entries: list[SessionStoreEntry], size: int) -> list[list[SessionStoreEntry]]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]


# -- the SDK's reference adapters -------------------------------------------------------


def reference_modules(cache: Path = CACHE_DIR) -> tuple[dict[str, ModuleType], str]:
    """Download the sdist (once per version), extract the three adapters, import them."""
    version = importlib.metadata.version("claude-agent-sdk")
    target = cache / f"claude-agent-sdk-{version}"
    names = {b: f"{b}_session_store.py" for b in BACKENDS}
    if not all((target / f).is_file() for f in names.values()):
        cache.mkdir(parents=True, exist_ok=True)
        sdist = next(iter(cache.glob(f"claude_agent_sdk-{version}.tar.gz")), None)
        if sdist is None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"claude-agent-sdk=={version}",
                    "-d",
                    str(cache),
                ],
                check=True,
                capture_output=True,
                timeout=300,
            )
            sdist = next(iter(cache.glob(f"claude_agent_sdk-{version}.tar.gz")))
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if parts[1:3] == ["examples", "session_stores"] and parts[-1] in names.values():
                    data = tar.extractfile(member)
                    if data is not None:
                        (target / parts[-1]).write_bytes(data.read())
    modules = {}
    for backend, filename in names.items():
        spec = importlib.util.spec_from_file_location(
            f"_walmirror_bench_ref_{backend}", target / filename
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {target / filename}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        modules[backend] = module
    return modules, version


# -- moto -------------------------------------------------------------------------------


class Moto:
    """A private ``moto.server`` on a free local port (in-memory: stopping it cleans up)."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with status {self.proc.returncode}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
            try:
                conn.request("GET", "/moto-api/")
                if conn.getresponse().status < 500:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("moto server did not answer")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def boto3_client(endpoint_url: str) -> Any:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    config = Config(max_pool_connections=SESSIONS)  # one connection per session loop
    return boto3.client("s3", endpoint_url=endpoint_url, config=config, **S3_CREDENTIALS)


# -- backends: make one, clean it up ----------------------------------------------------


Cleanup = Callable[[], Awaitable[None]]


async def _redis_cleanup(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        names = [name async for name in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(names), 1000):
            await client.delete(*names[i : i + 1000])
    finally:
        await client.aclose()


async def walmirror_backend(kind: str, tag: str, s3: Moto | None) -> tuple[Any, Cleanup]:
    """A fresh walmirror backend store and the coroutine that removes what it wrote."""
    if kind == "redis":
        from walmirror.backends.redis import RedisStore

        prefix = f"wmbench-{tag}"
        store = RedisStore.from_url(f"{REDIS_URL}?prefix={prefix}")

        async def clean_redis() -> None:
            await store.aclose()
            await _redis_cleanup(prefix)

        return store, clean_redis
    if kind == "postgres":
        from walmirror.backends.postgres import PostgresStore

        pg = await PostgresStore.connect(POSTGRES_DSN, table=f"wmbench_{tag}", max_size=16)

        async def clean_pg() -> None:
            try:
                await pg.drop_schema()
            finally:
                await pg.close()

        return pg, clean_pg
    from walmirror.backends.s3 import S3Store

    assert s3 is not None
    credentials: dict[str, Any] = dict(S3_CREDENTIALS)  # client options, passed through
    s3store = await S3Store.connect(
        "wmbench", f"walmirror-{tag}", endpoint_url=s3.endpoint_url, **credentials
    )

    async def clean_s3() -> None:
        await s3store.close()  # the moto server's memory goes when it stops

    return s3store, clean_s3


async def reference_backend(
    kind: str, module: ModuleType, tag: str, s3: Moto | None
) -> tuple[Any, Cleanup]:
    """A reference adapter built as its docstring says, and its cleanup."""
    if kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        prefix = f"wmbench-ref-{tag}"
        store = module.RedisSessionStore(client, prefix=prefix)

        async def clean_redis() -> None:
            await client.aclose()
            await _redis_cleanup(prefix)

        return store, clean_redis
    if kind == "postgres":
        import asyncpg  # type: ignore[import-untyped]

        pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=1, max_size=SESSIONS)
        table = f"wmbench_ref_{tag}"
        pg = module.PostgresSessionStore(pool, table=table)
        await pg.create_schema()

        async def clean_pg() -> None:
            try:
                await pool.execute(f"DROP TABLE IF EXISTS {table}")
            finally:
                await pool.close()

        return pg, clean_pg
    assert s3 is not None
    s3store = module.S3SessionStore(
        bucket="wmbench", prefix=f"ref-{tag}", client=boto3_client(s3.endpoint_url)
    )

    async def clean_s3() -> None:
        return None

    return s3store, clean_s3


# -- the measurements -------------------------------------------------------------------


async def walmirror_drain(
    kind: str, batch: int, per_session: int, directory: Path, s3: Moto | None
) -> dict[str, Any]:
    """(a) Queue N entries with the backend down, bring it up, time ``flush()``."""
    tag = f"{batch}_{uuid.uuid4().hex[:8]}"
    backend, cleanup = await walmirror_backend(kind, tag, s3)
    try:
        faulty = FaultyStore(backend)
        faulty.down()
        store = DurableSessionStore(
            faulty,
            directory / f"drain-{kind}-{tag}.db",
            max_batch_entries=batch,
            backoff_initial=0.001,
            backoff_max=0.005,
        )
        work = workload(per_session)
        await store.start()

        async def fill(key: SessionKey, entries: list[SessionStoreEntry]) -> None:
            for part in chunks(entries, 17):  # the SDK's batch size
                await store.append(key, part)

        await asyncio.gather(*(fill(k, e) for k, e in work))
        total = sum(len(e) for _, e in work)
        watch = LandingWatch()
        watch.watch(backend)
        healed = watch.arm()
        faulty.up()
        await store.flush(timeout=600.0)
        ended = time.perf_counter()
        started = watch.first_call_at or healed
        elapsed = ended - started
        delivered = sum(f.delivered_total for f in store.flushers)
        calls = faulty.calls.get("append_batch", 0) + faulty.calls.get("append", 0)
        report = await store.close(timeout=30.0)
        lengths = [await backend.length(k) for k, _ in work]
        return {
            "entries": total,
            "seconds": round(elapsed, 4),
            "entries_per_s": round(total / elapsed),
            "probe_wait_s": round(started - healed, 4),
            "delivered": delivered,
            "backend_calls_total": calls,
            "drained": report.drained,
            "exact": all(n == per_session for n in lengths),
        }
    finally:
        await cleanup()


async def reference_append(
    kind: str, module: ModuleType, batch: int, per_session: int, s3: Moto | None
) -> dict[str, Any]:
    """(b) Raw ``append`` of the same N entries, one loop per session, 16 concurrent."""
    tag = f"{batch}_{uuid.uuid4().hex[:8]}"
    store, cleanup = await reference_backend(kind, module, tag, s3)
    try:
        work = workload(per_session)
        total = sum(len(e) for _, e in work)

        async def loop(key: SessionKey, entries: list[SessionStoreEntry]) -> None:
            for part in chunks(entries, batch):
                await store.append(key, part)

        started = time.perf_counter()
        await asyncio.gather(*(loop(k, e) for k, e in work))
        elapsed = time.perf_counter() - started
        return {
            "entries": total,
            "seconds": round(elapsed, 4),
            "entries_per_s": round(total / elapsed),
        }
    finally:
        await cleanup()


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, with every run's rate (``trials``) and every run
    whole (``runs``, to explain an outlier); a run that failed is the result. For
    walmirror, ``drained`` and ``exact`` must hold in all."""
    failed = next((run for run in runs if "entries_per_s" not in run), None)
    if failed is not None:
        return failed
    ranked = sorted(runs, key=lambda run: run["entries_per_s"])
    result = dict(ranked[(len(ranked) - 1) // 2])
    result["trials"] = [run["entries_per_s"] for run in runs]
    result["runs"] = [dict(run) for run in runs]
    for flag in ("drained", "exact"):
        if flag in result:
            result[flag] = all(run[flag] for run in runs)
    return result


async def _guard(what: str, call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await call
    except Exception as exc:  # one backend failing must not sink the others
        log.debug("%s failed", what, exc_info=True)
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


async def measure(quick: bool, directory: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    references: dict[str, ModuleType] = {}
    sdk_version = importlib.metadata.version("claude-agent-sdk")
    reference_error = None
    try:
        references, sdk_version = await asyncio.to_thread(reference_modules)
    except Exception as exc:
        reference_error = f"{type(exc).__name__}: {exc}"[:300]
    moto = Moto()
    rows: list[dict[str, Any]] = []
    try:
        try:
            await asyncio.to_thread(moto.start)
            await asyncio.to_thread(boto3_client(moto.endpoint_url).create_bucket, Bucket="wmbench")
            s3: Moto | None = moto
        except Exception as exc:
            s3, s3_error = None, f"moto: {type(exc).__name__}: {exc}"
        for kind in BACKENDS:
            for batch in BATCHES:
                row: dict[str, Any] = {"backend": kind, "batch": batch, "target": TARGETS[kind]}
                row["reference_design_machine"] = REFERENCE_DESIGN[kind][batch]
                if kind == "s3" and s3 is None:
                    row["walmirror"] = row["reference"] = {"error": s3_error}
                else:
                    mine: list[dict[str, Any]] = []
                    theirs: list[dict[str, Any]] = []
                    for _ in range(sizes.trials):  # alternating, so drift hits both alike
                        mine.append(
                            await _guard(
                                f"{kind} drain",
                                walmirror_drain(kind, batch, sizes.per_session, directory, s3),
                            )
                        )
                        if kind in references:
                            module = references[kind]
                            theirs.append(
                                await _guard(
                                    f"{kind} reference",
                                    reference_append(kind, module, batch, sizes.per_session, s3),
                                )
                            )
                    row["walmirror"] = median_run(mine)
                    if kind in references:
                        row["reference"] = median_run(theirs)
                    else:
                        row["reference"] = {"error": f"unavailable: {reference_error}"}
                w = row["walmirror"].get("entries_per_s")
                r = row["reference"].get("entries_per_s")
                row["ratio"] = round(w / r, 2) if w and r else None
                row["met"] = bool(w and w >= TARGETS[kind])
                rows.append(row)
    finally:
        await asyncio.to_thread(moto.stop)
    return {
        "mode": "quick" if quick else "full",
        "sessions": SESSIONS,
        "entries": SESSIONS * sizes.per_session,
        "trials": sizes.trials,
        "entry_bytes": len(json.dumps(make_entries("x" * 12, 1)[0]).encode()),
        "sdk_version": sdk_version,
        "reference_available": reference_error is None,
        "reference_error": reference_error,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "rows": rows,
    }


def table(r: dict[str, Any]) -> str:
    def rate(cell: dict[str, Any]) -> str:
        return f"{cell['entries_per_s']:,}" if "entries_per_s" in cell else "n/a"

    header = (
        "backend",
        "batch",
        "walmirror drain/s",
        "reference append/s",
        "ratio",
        "target",
        "",
        "ref (design machine)",
    )
    rows = [header]
    for row in r["rows"]:
        w = row["walmirror"]
        verdict = "ok" if row["met"] else "MISSED"
        if "entries_per_s" in w and not (w.get("drained") and w.get("exact")):
            verdict += " (NOT EXACT)"
        rows.append(
            (
                row["backend"],
                str(row["batch"]),
                rate(w),
                rate(row["reference"]),
                f"{row['ratio']:.2f}x" if row["ratio"] else "",
                f">= {row['target']:,}",
                verdict,
                f"{row['reference_design_machine']:,}",
            )
        )
    widths = [max(len(x[i]) for x in rows) for i in range(len(header))]
    lines = [
        f"walmirror bench --drain ({r['mode']}): {r['entries']:,} entries of ~{r['entry_bytes']} "
        f"bytes in {r['sessions']} sessions; {r['machine']['cpus']} CPUs, Python "
        f"{r['machine']['python']}; reference adapters: claude-agent-sdk {r['sdk_version']} sdist",
        "",
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in rows]
    lines.append("")
    if not r["reference_available"]:
        lines.append(f"reference column unavailable: {r['reference_error']}")
    for row in r["rows"]:
        for side in ("walmirror", "reference"):
            shown = side == "walmirror" or r["reference_available"]
            if shown and "error" in row[side]:
                error = row[side]["error"]
                lines.append(f"{row['backend']} batch {row['batch']} {side}: {error}")
    lines.append(
        "walmirror: queued with the backend down, then up() and flush() timed until every entry "
        "is acknowledged (producer marks + cursors); reference: raw append, 16 concurrent "
        "session loops, "
        "S3 on a private moto server."
    )
    if r.get("trials", 1) > 1:
        lines.append(
            f"Each rate is the median of {r['trials']} runs, the two sides alternating "
            "(every run's rate: 'trials' in the JSON)."
        )
    return "\n".join(lines)


async def run(
    *, quick: bool = False, as_json: bool = False, out: Path | None = None, directory: Path | None
) -> int:
    """Measure, print (table or JSON), optionally write JSON to ``out``. Always exit 0."""
    logging.getLogger("walmirror").setLevel(logging.ERROR)  # "backend down" is the point here
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="walmirror-drain-", dir=directory)
        )
        results = await measure(quick, Path(tmp))
    if out is not None:
        await asyncio.to_thread(out.write_text, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2) if as_json else table(results))
    return 0
