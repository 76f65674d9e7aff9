"""The ``walmirror`` command, run in subprocesses as a user would run it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk.types import SessionKey, SessionStoreEntry

from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore
from walmirror.cli import UsageError, resolve_names
from walmirror.demo import Outcome, compare
from walmirror.faults import FaultyStore

MAIN: SessionKey = {"project_key": "proj", "session_id": "s1"}
SUB: SessionKey = {"project_key": "proj", "session_id": "s1", "subpath": "subagents/agent-1"}
COMMANDS = ["status", "drain", "requeue", "verify", "demo", "bench"]


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALMIRROR_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "walmirror.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def entries(prefix: str, n: int) -> list[SessionStoreEntry]:
    return [
        {"type": "user", "uuid": f"{prefix}-{i}", "message": {"content": f"x{i}"}} for i in range(n)
    ]


async def _fill(queue: Path, root: Path, *, reject_sub: bool = False) -> None:
    """Queue 10 + 5 entries while the backend is down (or rejects SUB), then stop."""
    backend = FaultyStore(FileStore(root))
    if reject_sub:
        backend.reject(lambda key: key.get("subpath") is not None)
    else:
        backend.down()
    store = DurableSessionStore(backend, queue, backoff_initial=0.01, backoff_max=0.05)
    await store.append(MAIN, entries("main", 10))
    await store.append(SUB, entries("sub", 5))
    if reject_sub:
        deadline = time.monotonic() + 10
        while not (await store.status())["backends"][0]["parked"]:
            assert time.monotonic() < deadline, "SUB was never parked"
            await asyncio.sleep(0.02)
    await store.close(timeout=0.2)


@pytest.fixture
def pending(tmp_path: Path) -> tuple[Path, Path]:
    """A queue holding 15 undelivered entries (2 keys), and an empty backend directory."""
    queue, root = tmp_path / "queue.db", tmp_path / "backend"
    asyncio.run(_fill(queue, root))
    return queue, root


def store_args(queue: Path, root: Path) -> list[str]:
    return ["--queue", str(queue), "--backend", f"file://{root}"]


def jsonl(root: Path, key: SessionKey) -> Path:
    return root / key["project_key"] / f"{key['session_id']}.jsonl"


# -- help and usage ------------------------------------------------------------------


def test_help_for_every_command() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALMIRROR_")}
    runs = {  # in parallel: each run spends ~1 s importing the SDK
        command: subprocess.Popen(
            [sys.executable, "-m", "walmirror.cli", *([command] if command else []), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for command in ["", *COMMANDS]
    }
    helps = {}
    for command, run in runs.items():
        helps[command], stderr = run.communicate(timeout=120)
        assert run.returncode == 0, (command, stderr)
        assert f"usage: walmirror {command}".strip() in helps[command]
    assert all(command in helps[""] for command in COMMANDS)


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    no_queue = cli("status")
    assert no_queue.returncode == 2 and "--queue" in no_queue.stderr
    missing = cli("status", "--queue", str(tmp_path / "nope.db"))
    assert missing.returncode == 2 and "no queue file" in missing.stderr
    (tmp_path / "q.db").touch()
    scheme = cli("drain", "--queue", str(tmp_path / "q.db"), "--backend", "ftp://h/x")
    assert scheme.returncode == 2 and "file://" in scheme.stderr


def test_resolve_names() -> None:
    one = [FileStore("/tmp/x")]
    assert resolve_names([], one, None, require_all=True) == ("file:///tmp/x",)
    assert resolve_names(["file:///tmp/x"], one, None, require_all=True) == ("file:///tmp/x",)
    assert resolve_names(["0:FaultyStore"], one, None, require_all=True) == ("0:FaultyStore",)
    with pytest.raises(UsageError, match="--name"):
        resolve_names(["a", "b"], one, None, require_all=False)
    assert resolve_names(["a", "b"], one, ["b"], require_all=False) == ("b",)
    with pytest.raises(UsageError, match="also feeds a"):
        resolve_names(["a", "b"], one, ["b"], require_all=True)
    with pytest.raises(UsageError, match="no cursor named c"):
        resolve_names(["a", "b"], one, ["c"], require_all=False)


# -- status, drain, verify ----------------------------------------------------------------


def test_status_json_shows_pending(pending: tuple[Path, Path]) -> None:
    queue, _ = pending
    result = cli("status", "--queue", str(queue), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["queue"]["keys"] == 2
    [backend] = report["backends"]
    assert backend["pending_entries"] == 15
    assert backend["pending_keys"] == 2
    assert backend["parked"] == []
    table = cli("status", "--queue", str(queue))
    assert table.returncode == 0 and "pending" in table.stdout and "15" in table.stdout


async def test_status_reads_a_queue_a_live_process_holds(tmp_path: Path) -> None:
    """An operator watches a running host: status neither needs the queue's lock nor
    writes anything."""
    faulty = FaultyStore(FileStore(tmp_path / "root"))
    faulty.down()
    queue = tmp_path / "q.db"
    async with DurableSessionStore(faulty, queue, backoff_max=0.1) as store:
        await store.append(MAIN, [{"type": "user", "n": n} for n in range(4)])
        result = await asyncio.to_thread(cli, "status", "--queue", str(queue), "--json")
        assert result.returncode == 0, result.stderr
        [backend] = json.loads(result.stdout)["backends"]
        assert backend["pending_entries"] == 4
        faulty.up()


def test_drain_delivers_then_verify_is_clean(pending: tuple[Path, Path]) -> None:
    queue, root = pending
    result = cli("drain", *store_args(queue, root), "--timeout", "30")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "delivered 15 entries" in result.stdout and "drained" in result.stdout
    stored = asyncio.run(FileStore(root).load(MAIN)) or []
    assert [e["uuid"] for e in stored] == [f"main-{i}" for i in range(10)]
    status = json.loads(cli("status", "--queue", str(queue), "--json").stdout)
    assert status["backends"][0]["pending_entries"] == 0

    from_env = {"WALMIRROR_QUEUE": str(queue), "WALMIRROR_BACKEND": f"file://{root}"}
    clean = cli("verify", env=from_env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "15 entries checked" in clean.stdout and "clean" in clean.stdout
    reports = json.loads(cli("verify", *store_args(queue, root), "--json").stdout)
    assert len(reports) == 2 and all(r["ok"] for r in reports)


def test_drain_reports_what_remains(pending: tuple[Path, Path], tmp_path: Path) -> None:
    queue, _ = pending
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")  # FileStore cannot create directories under it: every call fails
    result = cli("drain", *store_args(queue, not_a_dir), "--timeout", "1")
    assert result.returncode == 1
    assert "15 remain queued" in result.stdout and "not drained" in result.stdout


@pytest.mark.parametrize("tamper", ["delete", "duplicate"])
def test_verify_reports_tampered_backend(pending: tuple[Path, Path], tamper: str) -> None:
    queue, root = pending
    assert cli("drain", *store_args(queue, root)).returncode == 0
    path = jsonl(root, MAIN)
    lines = path.read_text().splitlines(keepends=True)
    if tamper == "delete":
        del lines[4]
    else:
        lines.insert(6, lines[2])
    path.write_text("".join(lines))

    result = cli("verify", *store_args(queue, root))
    assert result.returncode == 1, result.stdout
    assert ("missing" if tamper == "delete" else "duplicated") in result.stdout
    assert "proj/s1:" in result.stdout and "subagents" not in result.stdout
    reports = {
        r["key_text"]: r
        for r in json.loads(cli("verify", *store_args(queue, root), "--json").stdout)
    }
    bad = reports["proj/s1"]
    assert bad["first_bad_offset"] == (4 if tamper == "delete" else 6)
    if tamper == "delete":
        assert bad["missing"] == 1
    else:
        assert bad["duplicated"] == 1
    assert reports["proj/s1/subagents/agent-1"]["ok"]
    assert "x4" not in result.stdout  # never entry content


# -- requeue ----------------------------------------------------------------------------


def test_requeue_unparks_a_rejected_key(tmp_path: Path) -> None:
    queue, root = tmp_path / "queue.db", tmp_path / "backend"
    asyncio.run(_fill(queue, root, reject_sub=True))
    status = json.loads(cli("status", "--queue", str(queue), "--json").stdout)
    [parked] = status["backends"][0]["parked"]
    assert parked["key_text"] == "proj/s1/subagents/agent-1"
    assert "PermanentBackendError" in parked["error"]

    blocked = cli("drain", *store_args(queue, root), "--timeout", "5")
    assert blocked.returncode == 1 and "parked" in blocked.stdout

    args = ["--project", "proj", "--session", "s1", "--subpath", "subagents/agent-1"]
    result = cli("requeue", "--queue", str(queue), *args)
    assert result.returncode == 0, result.stderr
    assert "un-parked 1 key" in result.stdout
    assert cli("drain", *store_args(queue, root)).returncode == 0
    assert len(asyncio.run(FileStore(root).load(SUB)) or []) == 5
    assert cli("verify", *store_args(queue, root)).returncode == 0


def test_requeue_needs_project_and_session(tmp_path: Path) -> None:
    result = cli("requeue", "--queue", str(tmp_path / "q.db"), "--project", "p")
    assert result.returncode == 2 and "--session" in result.stderr


# -- demo and bench -----------------------------------------------------------------------


def test_demo_through_an_outage(tmp_path: Path) -> None:
    result = cli(
        "demo",
        "--seconds",
        "4",
        "--outage-start",
        "1",
        "--outage-seconds",
        "2",
        "--dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 lost" in result.stdout and "0 duplicated" in result.stdout
    assert "backend DOWN" in result.stdout
    assert (tmp_path / "queue.db").exists() and (tmp_path / "backend").is_dir()


def test_bench_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = cli("bench", "--quick", "--json", "--out", str(out), "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert json.loads(out.read_text()) == report
    assert report["mode"] == "quick"
    for state in ("healthy", "down"):
        assert {"p50_ms", "p99_ms", "mean_ms", "count"} <= set(report["append"][state])
    assert "down_over_healthy_p50" in report["append"]
    for sessions in ("sessions_1", "sessions_50"):
        assert report["ingest"][sessions]["entries_per_s"] > 0
    assert report["ingest"]["sessions_50"]["sessions"] == 50
    assert "p50_ms" in report["baseline"]["sqlite_commit_17"]
    assert {c["measure"] for c in report["checks"]} >= {
        "ingest, 50 sessions (entries/s)",
        "queue lag p99 at 10,000/s, redis (ms)",  # the tests have a Redis
    }
    runs = report["lag"]["runs"]
    assert [run["rate"] for run in runs] == [1_000, 10_000]
    assert all(run["exact"] and run["drained"] and run["lag_samples"] > 0 for run in runs)
    assert all(isinstance(c["met"], bool) for c in report["checks"])


def test_bench_otel_console_exports_walmirror_spans_and_metrics(tmp_path: Path) -> None:
    result = cli("bench", "--quick", "--otel", "console", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert '"name": "walmirror.append"' in result.stdout  # the console span exporter
    assert '"name": "walmirror.entries.appended"' in result.stdout  # and the metrics


def test_demo_checker_catches_loss_duplicates_and_reordering() -> None:
    sent = entries("e", 4)
    a, b, c, d = sent
    assert compare(sent, [a, b, c, d]) == Outcome(stored=4)
    assert compare(sent, [a, c, d]) == Outcome(stored=3, lost=1)
    assert compare(sent, [a, b, b, c, d]) == Outcome(stored=5, duplicated=1)
    assert compare(sent, [b, a, c, d]).out_of_order == 2
    altered = {**c, "message": {"content": "changed"}}
    assert compare(sent, [a, b, altered, d]).out_of_order == 1


# -- a backend that lost data -----------------------------------------------------------


async def _lose_backend_data(queue: Path, root: Path) -> None:
    """Deliver 4 entries, compact them away, wipe the backend, deliver 1 more."""
    store = DurableSessionStore(
        FileStore(root), queue, retention_seconds=0.0, compact_interval=0.05, backoff_max=0.1
    )
    async with store:
        await store.append(MAIN, [{"type": "user", "uuid": f"l{i}"} for i in range(4)])
        await store.flush(timeout=30)
        async with asyncio.timeout(10):
            while (await store.status())["queue"]["stored_bytes"]:
                await asyncio.sleep(0.02)
        shutil.rmtree(root)
        await store.append(MAIN, [{"type": "user", "uuid": "after"}])
        await store.flush(timeout=30)


def test_status_reports_what_a_backend_lost_and_the_queue_could_not_restore(
    tmp_path: Path,
) -> None:
    # contract 2: a loss is reported, never silent; verify counts it too.
    queue, root = tmp_path / "queue.db", tmp_path / "backend"
    asyncio.run(_lose_backend_data(queue, root))
    status = json.loads(cli("status", "--queue", str(queue), "--json").stdout)
    [loss] = status["backends"][0]["losses"]
    assert loss["key_text"] == "proj/s1" and loss["lost"] == 4 and loss["restored"] == 0
    text = cli("status", "--queue", str(queue)).stdout
    assert "0 re-sent from the queue, 4 no longer held" in text
    result = cli("verify", *store_args(queue, root))
    assert result.returncode == 1 and "lost by the backend" in result.stdout
