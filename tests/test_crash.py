"""SIGKILL at random instants: nothing acknowledged is lost, nothing is delivered twice.

A worker process (``crash_worker.py``) appends to a ``DurableSessionStore`` over
a backend (FileStore, Redis, PostgreSQL: the real servers) and logs, fsynced,
which entries each ``append`` acknowledged.
The parent SIGKILLs it at a random (seeded) instant and starts the next worker
on the same queue file, many times over. The workers are forked from a warm
fork server (``crash_worker.py``, imports done once), so a trial costs its
random lifetime and not the interpreter and SDK start-up.

Between kills the parent checks that the local ack never runs ahead of the
backend and counts kills that landed between a backend write and its local
ack (the window exactly-once delivery has to survive): the backend's mark for
the queue's producer is compared with the queue's cursor. After the last kill
it drains the queue with a fresh ``DurableSessionStore`` and checks the
backend's transcripts entry by entry.

``WALMIRROR_CRASH_SEED`` overrides the seed; ``-m long`` runs the soak variants.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from crash_worker import expected_entry, parse_log

from walmirror import DurableSessionStore
from walmirror.backends import from_url

WORKER = Path(__file__).with_name("crash_worker.py")
SEED = int(os.environ.get("WALMIRROR_CRASH_SEED", "20240611"))

KEYS: list[dict[str, str]] = [
    {"project_key": "proj", "session_id": "s-a"},
    {"project_key": "proj", "session_id": "s-a", "subpath": "subagents/agent-1"},
    {"project_key": "proj", "session_id": "s-b"},
    {"project_key": "other-proj", "session_id": "s-c"},
]

# A worker lives uniform(0, MAX_LIFETIME) seconds after its fork: short lives end
# in start() (draining what the previous worker left), longer ones in steady traffic.
MAX_LIFETIME = 0.6
TIMEOUT = 60.0  # generous: the machine is shared; only here to avoid a hang


REDIS_URL = os.environ.get("WALMIRROR_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("WALMIRROR_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def backend_url(kind: str, tmp_path: Path) -> str:
    namespace = f"wm_crash{uuid.uuid4().hex[:10]}"
    if kind == "file":
        return (tmp_path / "files").as_uri()
    if kind == "redis":
        return f"{REDIS_URL}?prefix={namespace}"
    return f"{POSTGRES_DSN}?table={namespace}"


async def _close(store: Any) -> None:
    for name in ("aclose", "close"):
        if callable(getattr(store, name, None)):
            await getattr(store, name)()
            return


async def _marks(url: str, producer: str, keys: list[dict[str, str]]) -> list[int | None]:
    store: Any = from_url(url)
    try:
        return [await store.producer_mark(key, producer) for key in keys]
    finally:
        await _close(store)


async def drop_namespace(url: str) -> None:
    store: Any = from_url(url)
    try:
        if hasattr(store, "drop_schema"):
            await store.drop_schema()
        elif hasattr(store, "client"):
            async for name in store.client.scan_iter(match=f"{store.prefix}:*", count=1000):
                await store.client.delete(name)
    finally:
        await _close(store)


class ForkServer:
    """crash_worker.py: imports once, then forks one worker process per trial."""

    def __init__(self, stderr_path: Path) -> None:
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.stderr_path = stderr_path
        assert self._reply() == "ready", "the fork server did not start"

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        line = self.proc.stdout.readline().decode() if ready else ""
        assert line, f"fork server silent or gone:\n{self.stderr_path.read_text()[-3000:]}"
        return line.strip()

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._reply()

    def start_worker(self, config: dict[str, Any]) -> int:
        reply = self._ask("run " + json.dumps(config))
        assert reply.startswith("pid "), reply
        return int(reply.split()[1])

    def kill_worker(self, pid: int) -> int:
        """SIGKILL the worker; return its wait status."""
        os.kill(pid, signal.SIGKILL)
        reply = self._ask(f"reap {pid}")
        assert reply.startswith("status "), reply
        return int(reply.split()[1])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


@dataclass
class CrashRun:
    trials: int = 0
    acked: int = 0
    lost_replies: int = 0
    # Kills after which a backend held entries the local cursor had not acked yet.
    kills_between_write_and_ack: int = 0
    logs: list[str] = field(default_factory=list)


def backend_vs_cursor(queue: Path, url: str, scratch: Path) -> tuple[int, list[str]]:
    """After a kill: (keys whose backend is ahead of the local ack, keys acked beyond it).

    Reads a copy of the queue files (the original stays exactly as the kill left
    it for the next worker) and asks the backend for the producer's marks.
    """
    scratch.mkdir(exist_ok=True)
    for suffix in ("", "-wal"):
        src = Path(str(queue) + suffix)
        dst = scratch / ("copy.db" + suffix)
        dst.unlink(missing_ok=True)
        if src.exists():
            shutil.copyfile(src, dst)
    (scratch / "copy.db-shm").unlink(missing_ok=True)
    conn = sqlite3.connect(scratch / "copy.db")
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        rows, producer = [], None
        if "losses" in tables:  # else killed before the schema was committed
            found = conn.execute("SELECT value FROM meta WHERE name = 'producer_id'").fetchone()
            producer = found[0] if found else None
            rows = conn.execute(
                "SELECT k.project_key, k.session_id, k.subpath, k.first_seq, c.acked"
                " FROM cursors c JOIN keys k ON k.key_id = c.key_id WHERE c.backend = 'files'"
            ).fetchall()
    finally:
        conn.close()
    if producer is None or not rows:
        return 0, []
    keys: list[dict[str, str]] = []
    for project_key, session_id, subpath, _, _ in rows:
        key = {"project_key": project_key, "session_id": session_id}
        if subpath:
            key["subpath"] = subpath
        keys.append(key)
    marks = asyncio.run(_marks(url, producer, keys))
    ahead, behind = 0, []
    for key, (*_, first_seq, acked), mark in zip(keys, rows, marks, strict=True):
        held = first_seq - 1 if mark is None else mark  # the last seq the backend holds
        if held >= acked:
            ahead += 1
        elif held < acked - 1:
            behind.append(f"{key}: cursor acked up to {acked - 1}, backend mark {mark}")
    return ahead, behind


def run_kill_trials(
    tmp_path: Path, url: str, trials: int, seed: int, lost_reply_rate: float
) -> CrashRun:
    queue = tmp_path / "queue.db"
    rng = random.Random(seed)
    run = CrashRun()

    server = ForkServer(tmp_path / "fork-server-stderr.txt")
    try:
        for trial in range(trials):
            generation = trial + 1
            log = tmp_path / f"acks-{generation}.log"
            stderr = tmp_path / f"stderr-{generation}.txt"
            run.logs.append(str(log))
            config = {
                "generation": generation,
                "seed": seed * 1000 + generation,
                "queue": str(queue),
                "backend_url": url,
                "log": str(log),
                "stderr": str(stderr),
                "keys": KEYS,
                "lost_reply_rate": lost_reply_rate,
            }
            pid = server.start_worker(config)
            time.sleep(rng.uniform(0.0, MAX_LIFETIME))
            status = server.kill_worker(pid)
            # A worker that ended by itself hit an error: a failure, not a crash trial.
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"trial {trial}: worker ended by itself (wait status {status}):\n"
                + (stderr.read_text()[-3000:] if stderr.exists() else "")
            )
            run.trials += 1
            # contract 2: the local ack is recorded only after the backend holds the batch.
            ahead, behind = backend_vs_cursor(queue, url, tmp_path / "scratch")
            assert not behind, f"trial {trial}: local ack ahead of the backend: {behind}"
            run.kills_between_write_and_ack += ahead > 0
    finally:
        server.close()
    return run


@dataclass
class Expectation:
    intents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    acked: dict[int, set[int]] = field(default_factory=dict)


def read_logs(run: CrashRun) -> Expectation:
    expect = Expectation({i: [] for i in range(len(KEYS))}, {i: set() for i in range(len(KEYS))})
    for log in run.logs:
        if not os.path.exists(log):
            continue  # killed before it opened its log
        intents, acks, lost = parse_log(Path(log).read_text())
        run.lost_replies += lost
        for index, first, count in intents:
            expect.intents[index].append((first, count))
        for index, first, count in acks:
            expect.acked[index].update(range(first, first + count))
            run.acked += count
    return expect


async def drain_and_load(tmp_path: Path, url: str) -> list[list[dict[str, Any]]]:
    """Open the queue the way the next process would, drain it, read the backend directly."""
    writer = from_url(url)
    store = DurableSessionStore(writer, tmp_path / "queue.db", backend_names=("files",))
    try:
        async with store:
            await store.flush(timeout=120)
    finally:
        await _close(writer)
    reader: Any = from_url(url)
    try:
        return [list(await reader.load(key) or []) for key in KEYS]
    finally:
        await _close(reader)


def transcript_problems(stored: list[list[dict[str, Any]]], expect: Expectation) -> list[str]:
    """Everything wrong with the transcripts, per key; empty when exactly once, in order."""
    problems: list[str] = []
    for index, entries in enumerate(stored):
        name = f"key {index} {KEYS[index]}"
        for entry in entries:
            seq = entry.get("seq")
            if not isinstance(seq, int) or entry != expected_entry(index, seq):
                problems.append(f"{name}: unexpected entry {entry!r:.200}")
        ints = [e["seq"] for e in entries if isinstance(e.get("seq"), int)]
        seen: set[int] = set()
        for a, b in zip([None, *ints], ints, strict=False):
            if b in seen:
                problems.append(f"{name}: seq {b} stored twice")
            elif a is not None and b <= a:
                problems.append(f"{name}: seq {b} stored after {a} (out of order)")
            seen.add(b)
        have = set(ints)
        missing = sorted(expect.acked[index] - have)
        if missing:
            problems.append(f"{name}: {len(missing)} acknowledged entries missing: {missing[:10]}")
        intended = {
            s for first, count in expect.intents[index] for s in range(first, first + count)
        }
        phantom = sorted(have - intended)
        if phantom:
            problems.append(f"{name}: entries never appended: {phantom[:10]}")
        for first, count in expect.intents[index]:
            landed = sum(1 for s in range(first, first + count) if s in have)
            if landed not in (0, count):
                problems.append(f"{name}: batch at seq {first} landed {landed} of {count} entries")
    return problems


async def check_crash_run(
    tmp_path: Path, trials: int, lost_reply_rate: float = 0.0, kind: str = "file"
) -> CrashRun:
    url = backend_url(kind, tmp_path)
    try:
        return await _check_crash_run(tmp_path, url, trials, lost_reply_rate)
    finally:
        await drop_namespace(url)


async def _check_crash_run(
    tmp_path: Path, url: str, trials: int, lost_reply_rate: float
) -> CrashRun:
    run = await asyncio.to_thread(run_kill_trials, tmp_path, url, trials, SEED, lost_reply_rate)
    stored = await drain_and_load(tmp_path, url)
    expect = read_logs(run)
    problems = transcript_problems(stored, expect)
    assert not problems, (
        f"seed {SEED}, {run.trials} kills: {len(problems)} problems:\n" + "\n".join(problems[:30])
    )
    # The run really did what it claims (else the checks above prove little).
    assert run.trials == trials
    assert all(expect.acked[i] for i in range(len(KEYS))), "some key never got an ack"
    return run


# contract 1: durable before ack; contract 2: exactly once, in order, across SIGKILLs
# at any instant (including between the backend's commit and the local ack).
async def test_sigkill_at_random_instants_loses_nothing_acked_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    run = await check_crash_run(tmp_path, trials=36)
    assert run.kills_between_write_and_ack >= 1, (
        "no kill landed between a backend write and its local ack; the trial timing "
        "no longer exercises that window"
    )


# contract 1 and 2 on the remote backends: kills during deliveries to Redis and PostgreSQL.
@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_sigkill_during_remote_deliveries_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, kind: str
) -> None:
    run = await check_crash_run(tmp_path, trials=24, lost_reply_rate=0.2, kind=kind)
    assert run.kills_between_write_and_ack >= 1 or run.lost_replies > 0


# contract 2: lost replies (the write landed, the caller saw an error) are retried
# as the same producer seqs, across SIGKILLs too, without duplicates.
async def test_sigkill_with_lost_replies_still_delivers_exactly_once(tmp_path: Path) -> None:
    run = await check_crash_run(tmp_path, trials=20, lost_reply_rate=0.3)
    assert run.lost_replies > 0, "the FaultyStore injected no lost reply"


@pytest.mark.long
async def test_sigkill_soak_many_trials(tmp_path: Path) -> None:  # contract 1, 2
    run = await check_crash_run(tmp_path, trials=400)
    assert run.kills_between_write_and_ack >= 1


@pytest.mark.long
async def test_sigkill_soak_with_lost_replies(tmp_path: Path) -> None:  # contract 2
    run = await check_crash_run(tmp_path, trials=250, lost_reply_rate=0.3)
    assert run.lost_replies > 0
