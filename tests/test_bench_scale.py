"""``walmirror bench --scale`` and the heal figure of ``walmirror bench``, run tiny:
structure and correctness (every entry delivered once, counts right), never a timing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from walmirror.bench.append import heal_to_first_delivery
from walmirror.bench.scale import Workload
from walmirror.cli import main

REDIS_URL = os.environ.get("WALMIRROR_REDIS_URL", "redis://127.0.0.1:6379/0")


def _scale(capsys: pytest.CaptureFixture[str], tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "scale.json"
    args = ["bench", "--scale", "--entries", "2000", "--json", "--out", str(out)]
    assert main([*args, "--dir", str(tmp_path), *extra]) == 0
    printed: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    return printed


def _check_scale(r: dict[str, Any], entries: int, sessions: int) -> None:
    assert r["bench"] == "scale" and r["mode"] == "full"
    assert r["entries"] == entries and r["sessions"] == sessions
    assert r["batch_entries"] == 17
    assert r["ingest"]["entries"] == entries and r["ingest"]["entries_per_s"] > 0
    # everything was queued while the backend was down, then all of it delivered
    assert r["queued"]["pending_entries"] == entries
    assert r["queued"]["file_bytes"]["total"] > r["queued"]["pending_bytes"] > 0
    assert r["drain"]["delivered"] == entries
    assert r["drain"]["pending_after"] == 0
    assert r["verified"] == {
        "held": entries,
        "missing": 0,
        "extra": 0,
        "exact": True,
        "drained": True,
    }
    assert r["baseline"]["sqlite"]["entries"] == entries
    assert r["baseline"]["direct_append"]["entries"] == min(entries, 50_000)
    rss = r["rss"]
    assert rss["peak_mb"] == max(rss["ingest_peak_mb"], rss["drain_peak_mb"], rss["close_peak_mb"])
    assert rss["start_mb"] > 0 and rss["verify_peak_mb"] > 0
    assert {c["measure"] for c in r["checks"]} == {
        "ingest (entries/s)",
        "peak RSS, ingest and drain (MB)",
        "queue file size, N queued (bytes)",
        "drain, up() to drained (entries/s)",
    }
    for c in r["checks"]:
        assert c["baseline"] and c["ratio"] is not None
        assert c["met"] is None or isinstance(c["met"], bool)
    rss_check = next(c for c in r["checks"] if c["measure"].startswith("peak RSS"))
    assert rss_check["goal_applies"] is False  # 2,000 entries, not the 1M the goal is for
    assert isinstance(r["machine"]["cpus"], int)


def test_bench_scale_tiny_file_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    r = _scale(capsys, tmp_path)
    _check_scale(r, 2000, 50)
    assert r["backend"] == "FileStore in a temp dir"
    assert list(tmp_path.iterdir()) == [tmp_path / "scale.json"]  # the temp dir is gone


def test_bench_scale_uneven_sessions_and_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """1,001 entries over 7 sessions: shares of 143, batches with a short last one."""
    assert (
        main(["bench", "--scale", "--entries", "1001", "--sessions", "7", "--dir", str(tmp_path)])
        == 0
    )
    text = capsys.readouterr().out
    assert "walmirror bench --scale: 1,001 entries" in text
    assert "every entry delivered exactly once, in order" in text
    for measure in ("ingest (entries/s)", "peak RSS", "queue file size", "drain, up() to drained"):
        assert measure in text


def test_bench_scale_tiny_redis_cleans_up(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import redis

    r = _scale(capsys, tmp_path, "--backend", f"{REDIS_URL}?prefix=wmtest-scale")
    _check_scale(r, 2000, 50)
    assert "redis://" in r["backend"] and r["backend_kept"] is None
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert not list(client.scan_iter(match="wmtest-scale*"))  # the run's namespace is gone
    finally:
        client.close()


def test_workload_shares() -> None:
    work = Workload(entries=1001, sessions=7, tag="t")
    counts = work.counts()
    assert sum(counts) == 1001 and max(counts) - min(counts) <= 1
    key = work.keys()[0]
    batches = list(work.batches(key, counts[0]))
    assert [len(b) for b in batches] == [17] * (counts[0] // 17) + [counts[0] % 17]
    flat = [e["uuid"] for b in batches for e in b]
    assert flat == work.uuids(key, counts[0])


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "--entries", "10"],
        ["bench", "--scale", "--drain"],
        ["bench", "--scale", "--entries", "0"],
        ["bench", "--scale", "--scenario", "steady"],
    ],
)
def test_bench_scale_usage_errors(
    args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*args, "--dir", str(tmp_path)]) == 2
    assert "walmirror: error:" in capsys.readouterr().err


async def test_heal_to_first_delivery_file_store(tmp_path: Path) -> None:
    h = await heal_to_first_delivery("file", tmp_path, trials=2, settle=0.8, window=0.2)
    assert h["trials"] == 2 and len(h["heal_s"]) == 2
    assert h["max_s"] >= h["median_s"] > 0
    assert h["entries"] == 17 + 2 * h["queued_per_trial"]
    assert h["delivered"] == h["entries"] and h["exact"]
    down = h["calls_while_down"]
    assert down["seconds"] > 0 and down["per_s"] >= 0
    assert set(down["by_op"]) <= {"ping", "append", "append_batch", "producer_mark", "length"}
    assert h["direct_append_17"]["count"] == 20
