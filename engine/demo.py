"""``walmirror demo``: simulated agents keep writing while the backend goes down.

K sessions (plus one subagent transcript) append transcript-like entries in
small batches every ~100 ms through
``DurableSessionStore(FaultyStore(FileStore(dir/backend)), dir/queue.db)``.
The ``FaultyStore`` is down for a stretch in the middle of the run and loses
a few replies after the write landed (the case that makes naive retries
duplicate). After the run the backend is healthy again; the demo flushes,
then reads the backend's JSONL files and compares them with what every
``append`` call acknowledged: lost, duplicated, out of order.

Only the runtime dependencies are needed (the SDK and opentelemetry-api).
Output holds keys, counts and durations, never entry content.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from claude_agent_sdk.types import SessionKey, SessionStoreEntry

from walmirror.backends.file import FileStore

from .faults import FaultyStore
from .keys import describe_key
from .store import DurableSessionStore

BACKEND_NAME = "0:FileStore"  # what the CLI calls a lone FileStore: status/verify just work

_WORDS = (
    "the agent reads the failing test and opens the module where the parser splits "
    "each record before it checks the schema then it proposes a smaller patch runs "
    "the suite again and reports which cases still fail with their line numbers"
).split()


@dataclass
class DemoOptions:
    seconds: float = 10.0
    outage_start: float = 3.0
    outage_seconds: float = 4.0
    sessions: int = 4
    directory: Path | None = None
    lost_reply_rate: float = 0.03
    seed: int | None = None

    def check(self) -> None:
        if self.seconds <= 0:
            raise ValueError("--seconds must be positive")
        if not 1 <= self.sessions <= 1000:
            raise ValueError("--sessions must be between 1 and 1000")
        if self.outage_start < 0 or self.outage_seconds < 0:
            raise ValueError("--outage-start and --outage-seconds must not be negative")


@dataclass
class Workload:
    """What the simulated agents sent, per key, and how long each ``append`` took."""

    sent: dict[str, tuple[SessionKey, list[SessionStoreEntry]]] = field(default_factory=dict)
    latency_up: list[float] = field(default_factory=list)
    latency_down: list[float] = field(default_factory=list)
    failed_appends: int = 0

    @property
    def appended(self) -> int:
        return sum(len(entries) for _, entries in self.sent.values())


@dataclass
class Outcome:
    """The backend's files compared with what was acknowledged."""

    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0  # includes entries stored with different content, or never sent


def make_entry(
    rng: random.Random, kind: str, key: SessionKey, parent: str | None
) -> SessionStoreEntry:
    """One transcript line shaped like the Claude CLI's, about 1 KB."""
    words = rng.choices(_WORDS, k=160)
    text = " ".join(words)[:800]
    entry: dict[str, Any] = {
        "parentUuid": parent,
        "isSidechain": "subpath" in key,
        "userType": "external",
        "cwd": "/home/dev/project",
        "sessionId": key["session_id"],
        "version": "2.0.0",
        "type": kind,
        "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if kind == "user":
        entry["message"] = {"role": "user", "content": text}
    else:
        entry["message"] = {
            "id": f"msg_{rng.getrandbits(64):016x}",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": rng.randint(500, 5000), "output_tokens": len(words)},
        }
        entry["requestId"] = f"req_{rng.getrandbits(64):016x}"
    return cast(SessionStoreEntry, entry)


async def agent(
    store: DurableSessionStore,
    faulty: FaultyStore,
    keys: list[SessionKey],
    work: Workload,
    rng: random.Random,
    until: float,
) -> None:
    """One session: a batch of 1-3 entries every ~100 ms, rotating over ``keys``."""
    parents: dict[str, str | None] = {}
    turn = 0
    await asyncio.sleep(rng.uniform(0, 0.1))
    while time.monotonic() < until:
        key = keys[turn % len(keys)]
        name = describe_key(key)
        batch: list[SessionStoreEntry] = []
        for _ in range(rng.randint(1, 3)):
            kind = "user" if len(work.sent.get(name, (key, []))[1]) % 2 == 0 else "assistant"
            entry = make_entry(rng, kind, key, parents.get(name))
            parents[name] = entry["uuid"]
            batch.append(entry)
        down = faulty.is_down
        started = time.perf_counter()
        try:
            await store.append(key, batch)
        except Exception:
            work.failed_appends += 1  # not acknowledged: not expected in the backend
        else:
            (work.latency_down if down else work.latency_up).append(time.perf_counter() - started)
            work.sent.setdefault(name, (key, []))[1].extend(batch)
        turn += 1
        await asyncio.sleep(rng.uniform(0.08, 0.12))


async def monitor(
    store: DurableSessionStore,
    faulty: FaultyStore,
    backend: FileStore,
    work: Workload,
    until: float,
    max_lag: list[float],
) -> None:
    """Sample the lag every 100 ms; print a progress line every second."""
    started = time.monotonic()
    next_print = started + 1.0
    while time.monotonic() < until:
        await asyncio.sleep(0.1)
        pending, lag, _parked = await store.queue.depth(BACKEND_NAME)
        max_lag[0] = max(max_lag[0], lag)
        if time.monotonic() >= next_print - 0.01:
            next_print += 1.0
            stored = sum([await backend.length(key) for key, _ in list(work.sent.values())])
            state = "DOWN" if faulty.is_down else "up"
            print(
                f"  t={time.monotonic() - started:4.1f}s  appended {work.appended:5d}  "
                f"in backend {stored:5d}  queued {pending:5d}  lag {lag:5.2f} s  "
                f"backend {state}",
                flush=True,
            )


def compare(sent: list[SessionStoreEntry], stored: list[SessionStoreEntry]) -> Outcome:
    """Count what went wrong between what one key was sent and what its backend holds."""
    out = Outcome(stored=len(stored))
    by_uuid = {e["uuid"]: e for e in sent}
    counts = Counter(e.get("uuid") for e in stored)
    out.lost = sum(1 for u in by_uuid if counts[u] == 0)
    out.duplicated = sum(c - 1 for u, c in counts.items() if u in by_uuid and c > 1)
    seen: set[str] = set()
    order: list[str] = []
    for entry in stored:
        u = entry.get("uuid")
        if u not in by_uuid or entry != by_uuid[u]:
            out.out_of_order += 1  # never sent, or altered
        elif u not in seen:
            seen.add(u)
            order.append(u)
    expected = [u for u in by_uuid if u in seen]
    out.out_of_order += sum(1 for a, b in zip(order, expected, strict=True) if a != b)
    return out


async def demo(options: DemoOptions) -> int:
    """Run the demo and print its report; 0 when nothing was lost, duplicated or reordered."""
    directory = options.directory or Path(tempfile.mkdtemp(prefix="walmirror-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(options.seed)
    backend = FileStore(directory / "backend")
    faulty = FaultyStore(backend, seed=rng.getrandbits(32), lost_reply_rate=options.lost_reply_rate)
    store = DurableSessionStore(
        faulty, directory / "queue.db", backend_names=(BACKEND_NAME,), backoff_max=1.0
    )
    # The breaker's warnings would interleave with the progress lines; the lines say it.
    logging.getLogger("walmirror.flusher").setLevel(logging.ERROR)
    outage_end = options.outage_start + options.outage_seconds
    print(
        f"walmirror demo: {options.sessions} sessions + 1 subagent for {options.seconds:g} s, "
        f"backend down from {options.outage_start:g} s to {outage_end:g} s, "
        f"{options.lost_reply_rate:.0%} of write replies lost"
    )
    print(f"  files in {directory} (queue.db, backend/)")

    work = Workload()
    max_lag = [0.0]
    project = "demo-project"
    sessions: list[list[SessionKey]] = [
        [{"project_key": project, "session_id": str(uuid.uuid4())}] for _ in range(options.sessions)
    ]
    subagent: SessionKey = {
        **sessions[0][0],
        "subpath": f"subagents/agent-{rng.getrandbits(32):08x}",
    }
    sessions[0].append(subagent)
    async with store:
        faulty.restart_clock()
        faulty.outage(options.outage_start, options.outage_seconds)
        until = time.monotonic() + options.seconds
        tasks = [
            agent(store, faulty, keys, work, random.Random(rng.getrandbits(64)), until)
            for keys in sessions
        ]
        await asyncio.gather(monitor(store, faulty, backend, work, until, max_lag), *tasks)
        faulty.up()  # the run is over: any outage still scheduled ends now
        started = time.monotonic()
        await store.flush(timeout=60)
        print(
            f"after the run: backend healthy, queue drained in {time.monotonic() - started:.1f} s"
        )

    total = Outcome()
    for key, sent in work.sent.values():
        result = compare(sent, await backend.load(key) or [])
        total.stored += result.stored
        total.lost += result.lost
        total.duplicated += result.duplicated
        total.out_of_order += result.out_of_order
    _report(work, total, max_lag[0], faulty)
    print(
        f"  inspect: walmirror verify --queue {directory / 'queue.db'} "
        f"--backend file://{directory / 'backend'}"
    )
    print(
        "  the same outage beside the SDK's own mirror path, with a plot: "
        "walmirror bench --scenario long-outage --plot out.png (pip install 'walmirror[bench]')"
    )
    bad = total.lost or total.duplicated or total.out_of_order or work.failed_appends
    return 1 if bad else 0


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.2f}"


def _report(work: Workload, total: Outcome, max_lag: float, faulty: FaultyStore) -> None:
    every = work.latency_up + work.latency_down
    rows = [
        ("entries appended (acknowledged)", str(work.appended)),
        ("entries stored in the backend", str(total.stored)),
        ("lost", str(total.lost)),
        ("duplicated", str(total.duplicated)),
        ("out of order", str(total.out_of_order)),
        (
            "append latency p50 / p99",
            f"{_ms(every, 0.5)} / {_ms(every, 0.99)} ms "
            f"(backend up: {_ms(work.latency_up, 0.5)} / {_ms(work.latency_up, 0.99)}, "
            f"down: {_ms(work.latency_down, 0.5)} / {_ms(work.latency_down, 0.99)})",
        ),
        ("mean append latency", f"{statistics.fmean(every) * 1000:.2f} ms" if every else "-"),
        ("max lag (oldest entry not yet in the backend)", f"{max_lag:.2f} s"),
        (
            "faults injected",
            f"{faulty.injected['down']} calls refused while down, "
            f"{faulty.injected['lost_reply']} replies lost after the write landed",
        ),
    ]
    if work.failed_appends:
        rows.append(("appends that raised", str(work.failed_appends)))
    width = max(len(label) for label, _ in rows)
    print()
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    print()
    if total.lost == 0 and total.duplicated == 0 and total.out_of_order == 0:
        print(
            "0 lost, 0 duplicated: every acknowledged entry reached the backend exactly once, "
            "in order."
        )
    else:
        print(
            f"{total.lost} lost, {total.duplicated} duplicated, {total.out_of_order} out of "
            "order: the backend does NOT hold exactly what was acknowledged."
        )
