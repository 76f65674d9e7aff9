"""Smoke test for ``walmirror bench --drain --quick --json``: structure only, no timings."""

from __future__ import annotations

import json

import pytest

from walmirror.bench.drain import median_run
from walmirror.cli import main


def test_bench_drain_quick_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--drain", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "quick"
    assert result["sessions"] == 16
    assert {"entries", "entry_bytes", "sdk_version", "reference_available", "rows"} <= set(result)
    rows = result["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [
        (backend, batch) for backend in ("redis", "postgres", "s3") for batch in (17, 500)
    ]
    for row in rows:
        assert {"walmirror", "reference", "ratio", "target", "met"} <= set(row)
        for side in ("walmirror", "reference"):
            assert "entries_per_s" in row[side] or "error" in row[side]
        w = row["walmirror"]
        if "entries_per_s" in w:
            assert w["entries"] == result["entries"]
            assert w["drained"] and w["exact"]
        if not result["reference_available"]:
            assert "error" in row["reference"]


def test_a_row_shows_the_median_run_and_every_trial() -> None:
    runs = [
        {"entries_per_s": 90, "drained": True, "exact": True},
        {"entries_per_s": 120, "drained": True, "exact": False},
        {"entries_per_s": 100, "drained": True, "exact": True},
    ]
    row = median_run(runs)
    assert row["entries_per_s"] == 100
    assert row["trials"] == [90, 120, 100]
    assert row["runs"] == runs
    assert row["drained"] and not row["exact"]  # one run not exact: the row is not
    assert median_run([*runs, {"error": "Boom"}]) == {"error": "Boom"}
