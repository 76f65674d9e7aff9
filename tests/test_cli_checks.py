"""``walmirror verify`` and ``status --backend`` report backends' health-check warnings.

Runs a private ``redis-server`` that evicts keys (``allkeys-lru``) and keeps
nothing on disk, so ``RedisStore.check_server()`` has something to say.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from claude_agent_sdk.types import SessionKey

from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore
from walmirror.faults import FaultyStore

KEY: SessionKey = {"project_key": "proj", "session_id": "s1"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALMIRROR_")}
    return subprocess.run(
        [sys.executable, "-m", "walmirror.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


async def _fill(queue: Path, root: Path) -> None:
    """Queue 15 entries while the (file) backend is down, then stop."""
    backend = FaultyStore(FileStore(root))
    backend.down()
    store = DurableSessionStore(backend, queue, backoff_initial=0.01, backoff_max=0.05)
    entries = [{"type": "user", "uuid": f"e-{i}", "message": {"content": "x"}} for i in range(15)]
    await store.append(KEY, entries)  # type: ignore[arg-type]
    await store.close(timeout=0.2)


@pytest.fixture
def pending(tmp_path: Path) -> tuple[Path, Path]:
    """A queue holding 15 undelivered entries, and an empty backend directory."""
    queue, root = tmp_path / "queue.db", tmp_path / "backend"
    asyncio.run(_fill(queue, root))
    return queue, root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def evicting_redis(tmp_path: Path) -> Iterator[str]:
    """A private redis-server with an evicting policy and no persistence; its URL."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is needed (the machine's Redis service provides it)"
    port = _free_port()
    # (we hold no socket on the port now; a race with another process is unlikely)
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "allkeys-lru",
            "--dir",
            str(tmp_path),
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert server.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_verify_prints_redis_warnings(pending: tuple[Path, Path], evicting_redis: str) -> None:
    queue, _ = pending
    # The queue's only cursor belongs to a FileStore: name it so verify checks Redis
    # against it (everything is pending, so no entry is compared).
    name = json.loads(cli("status", "--queue", str(queue), "--json").stdout)["backends"][0]
    args = ["--queue", str(queue), "--backend", evicting_redis, "--name", name["name"]]
    result = cli("verify", *args)
    assert result.returncode == 0, result.stderr
    warnings = _warning_lines(result.stderr)
    assert any(
        line.startswith(f"warning: {name['name']}: ") and "maxmemory-policy" in line
        for line in warnings
    ), result.stderr
    assert any("persistence" in line for line in warnings), result.stderr
    assert "unclosed" not in result.stderr.lower(), result.stderr
    assert "warning" not in result.stdout  # the report stays on stdout, warnings on stderr

    as_json = cli("verify", *args, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert isinstance(json.loads(as_json.stdout), list)  # unchanged shape
    assert any("maxmemory-policy" in line for line in _warning_lines(as_json.stderr))


def test_verify_on_fresh_queue_names_the_redis_cursor(tmp_path: Path, evicting_redis: str) -> None:
    queue = tmp_path / "queue.db"
    queue.touch()
    result = cli("verify", "--queue", str(queue), "--backend", evicting_redis)
    assert result.returncode == 0, result.stderr
    policy = [line for line in _warning_lines(result.stderr) if "maxmemory-policy" in line]
    assert policy and policy[0].startswith("warning: redis://127.0.0.1:"), result.stderr
    assert "allkeys-lru" in policy[0]


def test_status_json_has_warnings(pending: tuple[Path, Path], evicting_redis: str) -> None:
    queue, _ = pending
    plain = json.loads(cli("status", "--queue", str(queue), "--json").stdout)
    assert plain["warnings"] == []  # no --backend: the queue only, no checks
    name = plain["backends"][0]["name"]
    args = ["status", "--queue", str(queue), "--backend", evicting_redis, "--name", name]

    result = cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert any(
        w["backend"] == name and "maxmemory-policy" in w["text"] for w in report["warnings"]
    ), report
    assert report["backends"][0]["pending_entries"] == 15  # the usual report is still there
    assert "unclosed" not in result.stderr.lower(), result.stderr

    table = cli(*args)
    assert table.returncode == 0, table.stderr  # warnings never change status's exit code
    assert "pending" in table.stdout and "warning:" not in table.stdout
    assert any(
        line.startswith(f"warning: {name}: ") and "maxmemory-policy" in line
        for line in _warning_lines(table.stderr)
    ), table.stderr
