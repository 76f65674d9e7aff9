"""``walmirror bench --scale``: a million entries queued, then drained.

In one process, in one run:

a. the baseline: the same N rows (SDK-shaped 17-entry batches of ~1 KB
   entries, ``sessions`` sessions taking turns, 50 x 17 = 850 rows per
   commit) inserted one row per entry into a fresh SQLite file through the
   stdlib (WAL, ``synchronous=FULL``), each entry built and ``json.dumps``-ed
   as walmirror's ingest loop has to: entries/s and the file's size;
b. a direct-write baseline for the drain: the backend's own ``append`` of a
   sample of the same entries (up to 50,000) in 500-entry batches, 16
   session loops at once;
c. ingest: ``sessions`` concurrent sessions append their share of N entries
   in 17-entry batches to a ``DurableSessionStore`` whose backend
   (``FaultyStore`` around a ``FileStore`` in a temp dir, or ``--backend URL``)
   is ``down()``: entries/s, the process's peak RSS (``VmHWM``, reset before
   the phase where Linux allows) against its RSS before the phase, and the
   queue file's size on disk (``.db`` + ``-wal`` + ``-shm``);
d. drain: ``up()``, then ``flush()``: time to the first entry landing in the
   backend, time to drained, entries/s, peak RSS while draining;
e. correctness: every session's transcript is read back from the backend and
   its uuids compared, in order, with what was appended (exactly once).

The queue's disk cap is lifted (``max_queue_bytes=None``): the default 1 GiB
would hold about 1M entries of 1 KB and no more. Goals (DESIGN.md): RSS
<= 150 MB with 1M entries queued; ingest >= 100k entries/s; drain >= 1.0x the
backend's own append with 500-entry batches (DESIGN.md states it against the
SDK's reference adapters; ``--drain`` measures those).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import resource
import secrets
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry

from walmirror import DurableSessionStore
from walmirror.bench.append import BATCH, INGEST_GOAL_X_RAW, LandingWatch, machine, make_batch
from walmirror.faults import FaultyStore

DEFAULT_ENTRIES = 1_000_000
QUICK_ENTRIES = 50_000
SESSIONS = 50
DIRECT_SAMPLE = 50_000  # entries the backend's own append writes for the drain baseline
DIRECT_BATCH = 500
DIRECT_LOOPS = 16
GOALS = {
    "peak_rss_mb": 150.0,  # with 1M entries queued
    "ingest_entries_per_s": 100_000.0,
    "drain_x_direct": 1.0,
}
GOAL_RSS_AT = 1_000_000
log = logging.getLogger("walmirror.bench.scale")


class ScaleError(Exception):
    """Bad options (the CLI prints them as a usage error)."""


@dataclass(frozen=True)
class Workload:
    """N entries over ``sessions`` sessions of one run (``tag``)."""

    entries: int
    sessions: int
    tag: str

    def keys(self) -> list[SessionKey]:
        return [
            {"project_key": f"bench-scale-{self.tag}", "session_id": f"s{i:03d}-{self.tag}"}
            for i in range(self.sessions)
        ]

    def counts(self) -> list[int]:
        share, extra = divmod(self.entries, self.sessions)
        return [share + (1 if i < extra else 0) for i in range(self.sessions)]

    def batches(self, key: SessionKey, count: int) -> Iterator[list[SessionStoreEntry]]:
        """The session's entries in SDK-sized batches, made as they are needed (the
        bench's own memory stays flat, so the RSS measured is walmirror's)."""
        for start in range(0, count, BATCH):
            yield make_batch(key["session_id"], start, min(BATCH, count - start))

    def uuids(self, key: SessionKey, count: int) -> list[str]:
        return [f"{key['session_id']}-{seq:012d}" for seq in range(count)]


# -- process and file measurements ------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else round(kb / 1024, 1)


def peak_rss_mb() -> float:
    """The process's peak RSS: ``VmHWM`` (since the last reset), else ``ru_maxrss``."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return round(kb / 1024, 1)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``;
    ``ru_maxrss`` follows it), so each phase's peak is its own. False where not allowed:
    then every peak is the process's since it started."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def file_sizes(path: Path) -> dict[str, int]:
    """The SQLite file and its ``-wal`` and ``-shm`` companions, bytes; and the total."""
    sizes = {}
    for suffix in ("", "-wal", "-shm"):
        try:
            sizes[suffix.lstrip("-") or "db"] = os.stat(f"{path}{suffix}").st_size
        except FileNotFoundError:
            sizes[suffix.lstrip("-") or "db"] = 0
    sizes["total"] = sum(sizes.values())
    return sizes


# -- (a) raw SQLite -------------------------------------------------------------------


def raw_bulk(path: Path, work: Workload) -> dict[str, Any]:
    """The same rows, one per entry, 850 per commit (each session's next batch in turn)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(
            "CREATE TABLE entries (id INTEGER PRIMARY KEY, key_id INTEGER, seq INTEGER,"
            " body BLOB, UNIQUE (key_id, seq))"
        )
        streams = [
            (i, work.batches(key, count))
            for i, (key, count) in enumerate(zip(work.keys(), work.counts(), strict=True))
        ]
        seqs = [0] * work.sessions
        written = payload = 0
        started = time.perf_counter()
        while streams:
            rows: list[tuple[int, int, bytes]] = []
            alive = []
            for index, stream in streams:
                batch = next(stream, None)
                if batch is None:
                    continue
                alive.append((index, stream))
                for entry in batch:
                    body = json.dumps(entry).encode()
                    rows.append((index, seqs[index], body))
                    seqs[index] += 1
                    payload += len(body)
            streams = alive
            if rows:
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO entries (key_id, seq, body) VALUES (?, ?, ?)", rows)
                conn.execute("COMMIT")
                written += len(rows)
        elapsed = time.perf_counter() - started
        sizes = file_sizes(path)
    finally:
        conn.close()
    return {
        "method": "stdlib sqlite3, WAL, synchronous=FULL, one row per entry, "
        f"{work.sessions} x {BATCH} rows per commit, json.dumps of each entry included",
        "entries": written,
        "payload_bytes": payload,
        "seconds": round(elapsed, 3),
        "entries_per_s": round(written / elapsed),
        "file_bytes": sizes,
    }


# -- (b) the backend's own append -----------------------------------------------------


async def direct_append(backend: SessionStore, work: Workload) -> dict[str, Any]:
    """The backend's own ``append``, 500-entry batches, 16 loops at once, on a sample."""
    sample = Workload(
        entries=min(work.entries, DIRECT_SAMPLE),
        sessions=min(DIRECT_LOOPS, work.sessions, max(1, work.entries)),
        tag=f"{work.tag}-direct",
    )

    async def loop(key: SessionKey, count: int) -> None:
        for start in range(0, count, DIRECT_BATCH):
            entries: list[SessionStoreEntry] = []
            for first in range(start, min(count, start + DIRECT_BATCH), BATCH):
                entries += make_batch(key["session_id"], first, min(BATCH, count - first))
            await backend.append(key, entries)

    started = time.perf_counter()
    await asyncio.gather(*(loop(k, n) for k, n in zip(sample.keys(), sample.counts(), strict=True)))
    elapsed = time.perf_counter() - started
    return {
        "method": f"the backend's own append, {DIRECT_BATCH}-entry batches, "
        f"{sample.sessions} session loops at once",
        "entries": sample.entries,
        "seconds": round(elapsed, 3),
        "entries_per_s": round(sample.entries / elapsed),
    }


# -- (c)-(e) walmirror ----------------------------------------------------------------


async def ingest(store: DurableSessionStore, work: Workload) -> dict[str, Any]:
    async def session(key: SessionKey, count: int) -> None:
        for batch in work.batches(key, count):
            await store.append(key, batch)

    started = time.perf_counter()
    await asyncio.gather(*(session(k, n) for k, n in zip(work.keys(), work.counts(), strict=True)))
    elapsed = time.perf_counter() - started
    return {
        "entries": work.entries,
        "sessions": work.sessions,
        "seconds": round(elapsed, 3),
        "entries_per_s": round(work.entries / elapsed),
    }


async def verify(backend: SessionStore, work: Workload) -> dict[str, Any]:
    """Read every session back from the backend: each uuid once, in append order."""
    held = missing = extra = 0
    exact = True
    for key, count in zip(work.keys(), work.counts(), strict=True):
        entries = await backend.load(key) or []
        got = [cast(dict[str, Any], e).get("uuid") for e in entries]
        held += len(got)
        expected = work.uuids(key, count)
        if got != expected:
            exact = False
            have = set(got)
            lost = sum(1 for u in expected if u not in have)
            missing += lost
            extra += len(got) - (count - lost)  # copies and strangers
    return {"held": held, "missing": missing, "extra": extra, "exact": exact}


async def measure(
    entries: int, sessions: int, directory: Path, backend_url: str | None, keep: bool
) -> dict[str, Any]:
    from walmirror.backends import from_url
    from walmirror.backends.file import FileStore
    from walmirror.bench.scenarios import Namespace, ScenarioError, redact

    work = Workload(entries, min(sessions, entries), secrets.token_hex(4))
    namespace = None
    if backend_url is not None:
        try:
            namespace = Namespace.make(backend_url, int(work.tag, 16), directory)
        except ScenarioError as exc:
            raise ScaleError(str(exc)) from None
        await namespace.prepare()
        inner = from_url(namespace.url)
        backend_label = redact(namespace.url)
    else:
        inner = FileStore(directory / "backend")
        backend_label = "FileStore in a temp dir"
    raw_path = directory / "raw-baseline.db"
    try:
        log.info("raw SQLite baseline: %d rows", entries)
        raw = await asyncio.to_thread(raw_bulk, raw_path, work)
        for name in (raw_path, Path(f"{raw_path}-wal"), Path(f"{raw_path}-shm")):
            name.unlink(missing_ok=True)  # its disk space is the queue's now
        watch = LandingWatch()
        watch.watch(inner)
        direct = await direct_append(inner, work)
        baseline_peak = peak_rss_mb()  # process start to here (no reset yet)
        faulty = FaultyStore(inner)
        faulty.down()
        queue_path = directory / "scale.db"
        store = DurableSessionStore(faulty, queue_path, max_queue_bytes=None)
        await store.start()
        try:
            gc.collect()
            start_rss = rss_mb()
            peak_resets = reset_peak_rss()
            log.info("ingest: %d entries, backend down", entries)
            ingested = await ingest(store, work)
            ingest_peak = peak_rss_mb()
            after_ingest = rss_mb()
            queued = await store.status()
            queue_bytes = file_sizes(queue_path)
            reset_peak_rss()
            log.info("drain")
            started = watch.arm()
            faulty.up()
            await store.flush(timeout=max(600.0, entries / 1000))
            drained_at = time.perf_counter()
            drain_peak = peak_rss_mb()
            done = await store.status()
            first = (watch.first_at or drained_at) - started
            total = drained_at - started
            drain = {
                "entries": entries,
                "first_delivery_s": round(first, 4),
                "drained_s": round(total, 3),
                "entries_per_s": round(entries / total),
                "entries_per_s_from_first_delivery": round(entries / max(total - first, 1e-9)),
                "delivered": done["backends"][0]["delivered"],
                "pending_after": done["backends"][0]["pending_entries"],
            }
            queue_after = file_sizes(queue_path)
            reset_peak_rss()
        finally:
            report = await store.close(timeout=60.0)
        close_peak = peak_rss_mb()
        log.info("verify")
        reset_peak_rss()
        checked = await verify(inner, work)
        verify_peak = peak_rss_mb()
        checked["drained"] = report.drained
    finally:
        try:
            from walmirror.store import close_backends

            await close_backends([inner])
        finally:
            if namespace is not None and not keep:
                await namespace.cleanup()
    rss = {
        "baselines_peak_mb": baseline_peak,
        "start_mb": start_rss,
        "ingest_peak_mb": ingest_peak,
        "after_ingest_mb": after_ingest,
        "drain_peak_mb": drain_peak,
        "close_peak_mb": close_peak,
        "peak_mb": max(ingest_peak, drain_peak, close_peak),
        "verify_peak_mb": verify_peak,
        "peak_is_per_phase": peak_resets,
    }
    pending = queued["backends"][0]
    results: dict[str, Any] = {
        "bench": "scale",
        "entries": entries,
        "sessions": work.sessions,
        "batch_entries": BATCH,
        "entry_bytes": round(raw["payload_bytes"] / max(1, raw["entries"])),
        "machine": machine(directory),
        "backend": backend_label,
        "backend_kept": namespace.url if namespace is not None and keep else None,
        "ingest": ingested,
        "queued": {
            "pending_entries": pending["pending_entries"],
            "pending_bytes": pending["pending_bytes"],
            "file_bytes": queue_bytes,
            "file_bytes_after_drain": queue_after,
        },
        "rss": rss,
        "drain": drain,
        "baseline": {"sqlite": raw, "direct_append": direct},
        "verified": checked,
        "goals": dict(GOALS, ingest_x_raw=INGEST_GOAL_X_RAW, rss_goal_at_entries=GOAL_RSS_AT),
    }
    results["checks"] = checks(results)
    return results


def checks(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each figure beside its same-run baseline, the ratio, the goal and the verdict."""
    raw, direct, g = r["baseline"]["sqlite"], r["baseline"]["direct_append"], GOALS
    rss, queue = r["rss"], r["queued"]["file_bytes"]["total"]
    rate, drain = r["ingest"]["entries_per_s"], r["drain"]["entries_per_s"]
    start = rss["start_mb"]
    return [
        {
            "measure": "ingest (entries/s)",
            "value": rate,
            "baseline": raw["entries_per_s"],
            "baseline_label": "raw SQLite per-row bulk insert of the same rows",
            "ratio": round(rate / raw["entries_per_s"], 3),
            "goal": f">= {g['ingest_entries_per_s']:,.0f}/s (~{INGEST_GOAL_X_RAW:g}x raw)",
            "met": rate >= g["ingest_entries_per_s"],
            "met_ratio": rate / raw["entries_per_s"] >= INGEST_GOAL_X_RAW,
        },
        {
            "measure": "peak RSS, ingest and drain (MB)",
            "value": rss["peak_mb"],
            "baseline": start,
            "baseline_label": "RSS before ingest (imports, store open, nothing queued)",
            "ratio": round(rss["peak_mb"] / start, 3) if start else None,
            "goal": f"<= {g['peak_rss_mb']:g} MB with {GOAL_RSS_AT:,} queued",
            "met": rss["peak_mb"] <= g["peak_rss_mb"],
            "goal_applies": r["entries"] >= GOAL_RSS_AT,
        },
        {
            "measure": "queue file size, N queued (bytes)",
            "value": queue,
            "baseline": raw["file_bytes"]["total"],
            "baseline_label": "raw SQLite file of the same rows (db + wal + shm)",
            "ratio": round(queue / raw["file_bytes"]["total"], 3),
            "goal": None,
            "met": None,
        },
        {
            "measure": "drain, up() to drained (entries/s)",
            "value": drain,
            "baseline": direct["entries_per_s"],
            "baseline_label": f"the backend's own append, {DIRECT_BATCH}-entry batches",
            "ratio": round(drain / direct["entries_per_s"], 3),
            "goal": f">= {g['drain_x_direct']:g}x direct append@{DIRECT_BATCH}",
            "met": drain / direct["entries_per_s"] >= g["drain_x_direct"],
        },
    ]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def table(r: dict[str, Any]) -> str:
    m, d, v = r["machine"], r["drain"], r["verified"]
    rows = [("measure", "value", "same-run baseline", "ratio", "goal", "")]
    for c in r["checks"]:
        if c["met"] is None:
            verdict = ""
        else:
            verdict = "met" if c["met"] else "MISSED"
            if "met_ratio" in c:
                verdict += f" (ratio {'met' if c['met_ratio'] else 'missed'})"
            if c.get("goal_applies") is False:
                verdict += f" (goal is for {GOAL_RSS_AT:,} queued)"
        if "bytes" in c["measure"]:
            value, base = _mb(c["value"]), _mb(c["baseline"])
        elif "MB" in c["measure"]:
            value, base = f"{c['value']:.1f}", f"{c['baseline']} MB (start)"
        else:
            value, base = f"{c['value']:,}", f"{c['baseline']:,}/s"
        ratio = "" if c["ratio"] is None else f"{c['ratio']:.2f}x"
        rows.append((c["measure"], value, base, ratio, c["goal"] or "", verdict))
    rss = r["rss"]
    rows += [
        (
            "RSS: start / after ingest / peak in ingest, drain, close (MB)",
            f"{rss['start_mb']} / {rss['after_ingest_mb']} / {rss['ingest_peak_mb']}, "
            f"{rss['drain_peak_mb']}, {rss['close_peak_mb']}",
            "",
            "",
            "",
            "",
        ),
        ("drain: up() to first delivery (s)", f"{d['first_delivery_s']:.3f}", "", "", "", ""),
        ("drain: up() to drained (s)", f"{d['drained_s']:.2f}", "", "", "", ""),
        (
            "drain from first delivery (entries/s)",
            f"{d['entries_per_s_from_first_delivery']:,}",
            "",
            "",
            "",
            "",
        ),
        (
            "queue file after drain (retention)",
            _mb(r["queued"]["file_bytes_after_drain"]["total"]),
            "",
            "",
            "",
            "",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    load = m.get("load_average")
    q = r["queued"]
    lines = [
        f"walmirror bench --scale: {r['entries']:,} entries of ~{r['entry_bytes']} bytes, "
        f"{r['sessions']} sessions appending {r['batch_entries']}-entry batches; backend "
        f"{r['backend']}; {m['cpus']} CPUs, Python {m['python']}, queue on {m['filesystem']}"
        + (f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""),
        f"queued with the backend down: {q['pending_entries']:,} entries, "
        f"{_mb(q['pending_bytes'])} of entry bytes, queue file {_mb(q['file_bytes']['total'])} "
        f"(db {_mb(q['file_bytes']['db'])}, wal {_mb(q['file_bytes']['wal'])})",
        "",
    ]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    verdict = (
        "every entry delivered exactly once, in order"
        if v["exact"] and d["pending_after"] == 0
        else f"NOT EXACT: backend holds {v['held']:,}, {v['missing']:,} missing, "
        f"{v['extra']:,} extra; {d['pending_after']:,} still pending"
    )
    lines += [
        "",
        f"verified: {verdict} ({v['held']:,} read back from the backend; the read-back, "
        f"one whole session at a time, peaked at {rss['verify_peak_mb']} MB RSS and is not "
        "part of the figures).",
        "Baselines from this run: raw stdlib sqlite3 inserts of the same rows; the backend's own "
        f"append of {r['baseline']['direct_append']['entries']:,} of them; RSS before ingest.",
    ]
    return "\n".join(lines)


async def run(
    *,
    quick: bool = False,
    as_json: bool = False,
    out: Path | None = None,
    directory: Path | None,
    entries: int | None = None,
    sessions: int | None = None,
    backend: str | None = None,
    keep: bool = False,
) -> int:
    """Measure, print (table or JSON), optionally write JSON to ``out``.

    Exit code 0, or 1 when an entry was not delivered exactly once."""
    count = entries if entries is not None else QUICK_ENTRIES if quick else DEFAULT_ENTRIES
    if count < 1:
        raise ScaleError("--entries must be at least 1")
    if sessions is not None and sessions < 1:
        raise ScaleError("--sessions must be at least 1")
    logging.getLogger("walmirror").setLevel(logging.ERROR)  # "backend down" is the point here
    if sys.stderr.isatty():
        log.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="walmirror-scale-", dir=directory) as tmp:
        results = await measure(count, sessions or SESSIONS, Path(tmp), backend, keep)
    results["mode"] = "quick" if quick else "full"
    if out is not None:
        await asyncio.to_thread(out.write_text, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2) if as_json else table(results))
    exact = results["verified"]["exact"] and results["drain"]["pending_after"] == 0
    return 0 if exact else 1
