"""Figures of one system of a scenario run, from its workers' event logs and its backend.

Pure functions: ``analyze`` takes what the workers logged
(``scenario_worker``'s event format), the fault windows and what the backend
holds at the end, and returns every figure ``docs/benchmarks.md`` describes.
Definitions, in one place:

* sent: entries the simulated CLI emitted (handed to the SDK's batcher).
* acknowledged: entries of ``append`` calls that returned (the store's promise).
* stored: entries the backend holds for the system's transcripts.
* lost: sent entries the backend does not hold, except those a SIGKILL caught
  in the SDK process's memory before any store saw them (``in_memory_at_kill``:
  the same for both systems, as the batcher sits above the store).
* lost_acknowledged: acknowledged entries the backend does not hold.
* delivered_after_restart: entries acknowledged by a process that was then
  SIGKILLed, and delivered by its successor (crash-restart).
* duplicated: extra copies of an entry in the backend.
* out_of_order: per transcript, entries not on the longest run that keeps the
  append order (the fewest entries that would have to move).
* lag: per entry, from the CLI emitting it to a backend write holding it
  returning; ``oldest_pending``: sampled over time, the age of the oldest
  entry sent and not yet in the backend (nor given up).
* catch-up: per fault window, from its end (the heal) until every entry sent
  before the heal is in the backend or was given up; drain rate: entries
  landing per second over that stretch.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Generation", "analyze", "out_of_order", "percentiles", "read_events"]

INF = math.inf


@dataclass
class Generation:
    """One worker process of a system: its event log, and how it ended."""

    events: Path
    started_at: float = 0.0  # run seconds when it got "go"
    killed_at: float | None = None  # run seconds of its SIGKILL
    ready_rss_kb: int = 0  # RSS once imported and set up, before the run


@dataclass
class _Entry:
    emit: float
    gen: int
    ack: float | None = None
    land: float | None = None
    drop: float | None = None
    resolve: float = INF


@dataclass
class _Log:
    entries: dict[tuple[int, int], _Entry] = field(default_factory=dict)
    append_s: list[float] = field(default_factory=list)
    flush_wait_s: list[float] = field(default_factory=list)
    landings: list[float] = field(default_factory=list)  # first landing time of each entry
    drops: list[tuple[float, int]] = field(default_factory=list)
    samples: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    finals: list[dict[str, Any] | None] = field(default_factory=list)
    last_samples: list[dict[str, Any] | None] = field(default_factory=list)
    append_calls: int = 0
    failed_appends: int = 0
    mirror_errors: int = 0
    end: float = 0.0


def read_events(path: Path) -> list[list[Any]]:
    """The events of one log; a torn last line (a SIGKILL mid-write) is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    events: list[list[Any]] = []
    for line in text.split("\n"):
        if not line:
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def percentiles(values: Sequence[float], scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
    """p50 / p99 / max (nearest rank) and the count, each multiplied by ``scale``."""
    if not values:
        return {"p50": None, "p99": None, "max": None, "count": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "p50": round(rank(0.50) * scale, digits),
        "p99": round(rank(0.99) * scale, digits),
        "max": round(ordered[-1] * scale, digits),
        "count": len(ordered),
    }


def out_of_order(positions: Iterable[int]) -> int:
    """Entries off the longest increasing run (first copies only): the fewest to move."""
    seen: set[int] = set()
    firsts = [n for n in positions if not (n in seen or seen.add(n))]  # type: ignore[func-returns-value]
    tails: list[int] = []
    for n in firsts:
        i = bisect.bisect_left(tails, n)
        if i == len(tails):
            tails.append(n)
        else:
            tails[i] = n
    return len(firsts) - len(tails)


def _spans(raw: Any) -> Iterable[tuple[int, int]]:
    for key, first, count in raw:
        for n in range(int(first), int(first) + int(count)):
            yield int(key), n


def _collect(generations: Sequence[Generation]) -> _Log:
    log = _Log()
    for gen_index, gen in enumerate(generations):
        final: dict[str, Any] | None = None
        last_sample: dict[str, Any] | None = None
        for event in read_events(gen.events):
            kind, t = event[0], float(event[1])
            log.end = max(log.end, t)
            if kind == "E":
                key, first, count = int(event[2]), int(event[3]), int(event[4])
                for n in range(first, first + count):
                    log.entries.setdefault((key, n), _Entry(emit=t, gen=gen_index))
            elif kind in ("A", "F"):
                log.append_calls += 1
                log.append_s.append(float(event[2]))
                if kind == "F":
                    log.failed_appends += 1
                    continue
                for ident in _spans(event[3]):
                    entry = log.entries.get(ident)
                    if entry is not None and entry.ack is None:
                        entry.ack = t
            elif kind == "D":
                log.mirror_errors += 1
                dropped = 0
                for ident in _spans(event[2]):
                    dropped += 1
                    entry = log.entries.get(ident)
                    if entry is not None and entry.drop is None:
                        entry.drop = t
                log.drops.append((t, dropped))
            elif kind == "L":
                for ident in _spans(event[2]):
                    entry = log.entries.get(ident)
                    if entry is not None and entry.land is None:
                        entry.land = t
                        log.landings.append(t)
            elif kind == "W":
                log.flush_wait_s.append(float(event[2]))
            elif kind == "S":
                log.samples.append((t, event[2]))
                last_sample = event[2]
            elif kind == "X":
                final = event[2]
        log.finals.append(final)
        log.last_samples.append(last_sample)
    log.landings.sort()
    return log


def _timeline(
    entries: Sequence[_Entry], end: float, step: float
) -> tuple[list[float], list[float], list[int]]:
    """Sampled every ``step``: (t, age of the oldest unresolved entry, unresolved count)."""
    ordered = sorted(entries, key=lambda e: e.emit)
    emits = [e.emit for e in ordered]
    resolves = sorted(e.resolve for e in ordered)
    heap: list[tuple[float, float]] = []
    ts: list[float] = []
    lags: list[float] = []
    backlog: list[int] = []
    i = 0
    steps = int(end / step) + 1 if end > 0 else 1
    for s in range(steps + 1):
        t = round(s * step, 4)
        while i < len(ordered) and ordered[i].emit <= t:
            heapq.heappush(heap, (ordered[i].emit, ordered[i].resolve))
            i += 1
        while heap and heap[0][1] <= t:
            heapq.heappop(heap)
        ts.append(t)
        lags.append(round(t - heap[0][0], 4) if heap else 0.0)
        backlog.append(bisect.bisect_right(emits, t) - bisect.bisect_right(resolves, t))
    return ts, lags, backlog


def _catch_up(
    entries: Sequence[_Entry], landings: Sequence[float], window: dict[str, Any]
) -> dict[str, Any]:
    heal = float(window["end"])
    before = [e for e in entries if e.emit < heal]
    out: dict[str, Any] = dict(window)
    out["backlog_at_heal"] = sum(1 for e in before if e.resolve > heal)
    if any(e.resolve == INF for e in before):
        out.update(catch_up_s=None, drain_entries_per_s=None)
        return out
    caught = max((e.resolve for e in before), default=heal)
    catch_up = max(0.0, caught - heal)
    out["catch_up_s"] = round(catch_up, 4)
    landed = bisect.bisect_right(landings, caught) - bisect.bisect_right(landings, heal)
    out["drain_entries_per_s"] = round(landed / catch_up) if catch_up >= 0.05 else None
    return out


def analyze(
    *,
    generations: Sequence[Generation],
    stored: dict[int, list[int | None]],
    windows: Sequence[dict[str, Any]],
    step: float,
) -> dict[str, Any]:
    """Every figure of one system (see the module docstring), plus its timeline."""
    log = _collect(generations)
    entries = log.entries
    in_backend: Counter[tuple[int, int]] = Counter()
    unknown = 0
    for key, positions in stored.items():
        for n in positions:
            if n is None:
                unknown += 1
            else:
                in_backend[(key, n)] += 1
    lost = lost_acked = killed = 0
    for ident, entry in entries.items():
        killed_at = generations[entry.gen].killed_at
        if killed_at is not None and entry.ack is None and entry.drop is None:
            entry.resolve = min(entry.land or INF, killed_at)
        else:
            entry.resolve = min(entry.land or INF, entry.drop or INF)
        if in_backend[ident]:
            continue
        if entry.ack is not None:
            lost += 1
            lost_acked += 1
        elif killed_at is not None and entry.drop is None:
            killed += 1
        else:
            lost += 1
    after_restart = sum(
        1
        for e in entries.values()
        if e.ack is not None
        and e.land is not None
        and (killed_at := generations[e.gen].killed_at) is not None
        and e.land > killed_at
    )
    stored_total = sum(len(p) for p in stored.values())
    duplicated = sum(c - 1 for c in in_backend.values() if c > 1)
    disorder = sum(
        out_of_order(n for n in positions if n is not None) for positions in stored.values()
    )
    values = list(entries.values())
    lags = [e.land - e.emit for e in values if e.land is not None]
    ts, oldest, backlog = _timeline(values, log.end, step)
    caught = [_catch_up(values, log.landings, w) for w in windows]
    finals = [f for f in log.finals if f]
    last = log.last_samples
    requests = 0
    by_op: Counter[str] = Counter()
    injected: Counter[str] = Counter()
    peak_rss = 0
    for final, sample in zip(log.finals, last, strict=True):
        if final:
            requests += sum(int(v) for v in final.get("calls", {}).values())
            by_op.update({k: int(v) for k, v in final.get("calls", {}).items()})
            injected.update({k: int(v) for k, v in final.get("injected", {}).items()})
            peak_rss = max(peak_rss, int(final.get("rss_peak_kb", 0)))
        elif sample:
            requests += int(sample.get("requests", 0))
        if sample:
            peak_rss = max(peak_rss, int(sample.get("rss_peak_kb", 0)))
    queue_bytes = [int(s.get("queue_bytes", 0)) for _, s in log.samples]
    heal_windows = [c for c in caught if c["kind"] != "crash"] or caught
    longest = max(heal_windows, key=lambda c: c["end"] - c["start"], default=None)
    catch_ups = [c["catch_up_s"] for c in caught]
    return {
        "sent": len(entries),
        "acknowledged": sum(1 for e in values if e.ack is not None),
        "stored": stored_total,
        "lost": lost,
        "lost_acknowledged": lost_acked,
        "duplicated": duplicated,
        "out_of_order": disorder,
        "unknown_stored": unknown,
        "in_memory_at_kill": killed,
        "delivered_after_restart": after_restart,
        "mirror_errors": log.mirror_errors,
        "append_calls": log.append_calls,
        "failed_appends": log.failed_appends,
        "append_ms": percentiles(log.append_s, 1000.0, 3),
        "flush_wait_ms": percentiles(log.flush_wait_s, 1000.0, 3),
        "lag_s": percentiles(lags),
        "oldest_pending_s": percentiles(oldest),
        # The queue's own lag, sampled as status() reports it (DESIGN's "steady lag"):
        # the age of the oldest entry walmirror holds and the backend does not. The
        # lag above starts earlier, at the CLI: it holds the SDK batcher's wait for
        # the turn's end too.
        "queue_lag_s": percentiles(
            [float(s["queue_lag_s"]) for _, s in log.samples if "queue_lag_s" in s]
        ),
        "catch_up_s": (
            None
            if not caught or any(c is None for c in catch_ups)
            else max(c for c in catch_ups if c is not None)
        ),
        "drain_entries_per_s": longest["drain_entries_per_s"] if longest else None,
        "windows": caught,
        "peak_rss_mb": round(peak_rss / 1024, 1),
        "start_rss_mb": round(max((g.ready_rss_kb for g in generations), default=0) / 1024, 1),
        "queue_file_peak_bytes": max(queue_bytes, default=0),
        "queue_file_final_bytes": queue_bytes[-1] if queue_bytes else 0,
        "backend_requests": requests,
        "backend_requests_by_op": dict(sorted(by_op.items())),
        "faults_injected": dict(sorted(injected.items())),
        "drained": all(bool(f.get("drained")) for f in finals) if finals else False,
        "final_drain_s": finals[-1].get("drain_s") if finals else None,
        "generations": len(generations),
        "timeline": {
            "t": ts,
            "oldest_pending_s": oldest,
            "backlog": backlog,
            "samples_t": [t for t, _ in log.samples],
            "queue_pending": [int(s.get("queue_pending", 0)) for _, s in log.samples],
            "queue_bytes": queue_bytes,
            "rss_mb": [round(int(s.get("rss_kb", 0)) / 1024, 1) for _, s in log.samples],
            "drops": [[round(t, 4), n] for t, n in log.drops],
        },
    }
