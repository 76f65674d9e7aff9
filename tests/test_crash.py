"""SIGKILL at random instants: nothing acknowledged is lost, nothing is delivered twice.

A worker process (``crash_worker.py``) appends to a ``DurableSessionStore`` over
a ``FileStore`` and logs, fsynced, which entries each ``append`` acknowledged.
The parent SIGKILLs it at a random (seeded) instant and starts the next worker
on the same queue file, many times over. The workers are forked from a warm
fork server (``crash_worker.py``, imports done once), so a trial costs its
random lifetime and not the interpreter and SDK start-up.

Between kills the parent checks that the local ack never runs ahead of the
backend and counts kills that landed between a backend write and its local
ack (the window exactly-once delivery has to survive). After the last kill it
drains the queue with a fresh ``DurableSessionStore`` and checks the
``FileStore`` transcripts entry by entry.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from crash_worker import expected_entry, parse_log

from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore

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


def transcript_path(root: Path, key: dict[str, str]) -> Path:
    """Where FileStore keeps ``key`` (its documented layout)."""
    if "subpath" in key:
        return root / key["project_key"] / key["session_id"] / (key["subpath"] + ".jsonl")
    return root / key["project_key"] / (key["session_id"] + ".jsonl")


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


def backend_vs_cursor(queue: Path, root: Path, scratch: Path) -> tuple[int, list[str]]:
    """After a kill: (keys whose backend is ahead of the local ack, keys acked beyond it).

    Reads a copy of the queue files (the original stays exactly as the kill
    left it for the next worker) and counts complete lines in the transcripts.
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
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        rows = []
        if tables:  # else killed before the schema was committed
            rows = conn.execute(
                "SELECT k.project_key, k.session_id, k.subpath, c.base, c.acked"
                " FROM cursors c JOIN keys k ON k.key_id = c.key_id WHERE c.backend = 'files'"
            ).fetchall()
    finally:
        conn.close()
    ahead, behind = 0, []
    for project_key, session_id, subpath, base, acked in rows:
        if base is None:
            continue  # never delivered yet
        key = {"project_key": project_key, "session_id": session_id}
        if subpath:
            key["subpath"] = subpath
        path = transcript_path(root, key)
        lines = path.read_bytes().count(b"\n") if path.exists() else 0
        if lines > base + acked:
            ahead += 1
        elif lines < base + acked:
            behind.append(f"{key}: cursor acked {base}+{acked}, backend holds {lines}")
    return ahead, behind


def run_kill_trials(tmp_path: Path, trials: int, seed: int, lost_reply_rate: float) -> CrashRun:
    queue = tmp_path / "queue.db"
    root = tmp_path / "files"
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
                "root": str(root),
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
            ahead, behind = backend_vs_cursor(queue, root, tmp_path / "scratch")
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


async def drain_and_load(tmp_path: Path) -> list[list[dict[str, Any]]]:
    """Open the queue the way the next process would, drain it, read the FileStore directly."""
    store = DurableSessionStore(
        FileStore(tmp_path / "files"), tmp_path / "queue.db", backend_names=("files",)
    )
    async with store:
        await store.flush(timeout=120)
    reader = FileStore(tmp_path / "files")
    return [list(await reader.load(key) or []) for key in KEYS]  # type: ignore[arg-type]


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


async def check_crash_run(tmp_path: Path, trials: int, lost_reply_rate: float = 0.0) -> CrashRun:
    run = await asyncio.to_thread(run_kill_trials, tmp_path, trials, SEED, lost_reply_rate)
    stored = await drain_and_load(tmp_path)
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


# contract 2: lost replies (the write landed, the caller saw an error) are retried at
# the same offsets, across SIGKILLs too, without duplicates.
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
