"""``walmirror bench --scenario`` and ``--sweep``: short runs, counted, never timed.

Each scenario runs shortened (a few seconds, a few sessions) with both systems
side by side: the SDK's ``TranscriptMirrorBatcher`` calling the backend
directly, and the same batcher calling ``DurableSessionStore``. The
assertions are about data, not speed: walmirror delivers every entry exactly
once (contract 2) in every scenario, including after a SIGKILL (contract 1:
what ``append`` acknowledged survives); the SDK path loses entries in a long
outage and duplicates them when replies are lost; the JSON holds every field
``docs/benchmarks.md`` documents, and the PNGs are images.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from walmirror.bench.scenario_output import FIGURES
from walmirror.bench.scenario_worker import id_ranges, ids_of
from walmirror.bench.scenario_workload import Frame, Workload, make_entries, parse_id, schedule
from walmirror.bench.scenarios import SCENARIOS, Settings, run_scenario
from walmirror.cli import SCENARIO_NAMES, main
from walmirror.protocol import encode_entry

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REDIS_URL = os.environ.get("WALMIRROR_REDIS_URL", "redis://127.0.0.1:6379/0")

# Small and short: the figures are counts, so a few hundred entries do. A short breaker
# probe interval keeps the runs short (the default, 5 s, is what the docs measure).
SHORT: dict[str, Any] = {
    "sessions": 3,
    "entries_per_s": 150.0,
    "drain_timeout": 60.0,
    "tuning": {"backoff_max": 0.5},
}


def check_walmirror_exactly_once(result: dict[str, Any]) -> dict[str, Any]:
    w: dict[str, Any] = result["systems"]["walmirror"]
    assert w["sent"] > 0
    assert w["lost"] == 0, w
    assert w["lost_acknowledged"] == 0, w
    assert w["duplicated"] == 0, w
    assert w["out_of_order"] == 0, w
    assert w["unknown_stored"] == 0, w
    assert w["mirror_errors"] == 0  # append never failed: the batcher never gave up
    assert w["drained"]
    assert result["verdict"]["walmirror"]["exactly_once"]
    return w


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 100 and image.shape[1] > 100


def documented_fields(marker: str) -> list[str]:
    """The backticked names in the first column of a docs table fenced by ``marker``."""
    text = DOCS.read_text()
    match = re.search(rf"<!-- {marker} -->(.*?)<!-- /{marker} -->", text, re.S)
    assert match, f"docs/benchmarks.md has no {marker} table"
    return re.findall(r"^\| `([^`]+)`", match.group(1), re.M)


def lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        assert isinstance(data, dict) and part in data, dotted
        data = data[part]
    return data


# -- the CLI, end to end --------------------------------------------------------------


def test_long_outage_side_by_side_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # contract 2 and 3 beside the SDK's own path: same workload, same 2.5 s outage (longer
    # than the batcher's whole retry window). A comparison of counts, not of timings.
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    code = main(
        [
            "bench",
            "--scenario",
            "long-outage",
            "--duration",
            "4",
            "--outage-start",
            "0.5",
            "--outage-seconds",
            "2.5",
            "--sessions",
            "3",
            "--rate",
            "150",
            "--tune",
            "backoff_max=0.5",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "0 lost, 0 duplicated" in printed
    result = json.loads(out.read_text())
    w = check_walmirror_exactly_once(result)
    sdk = result["systems"]["sdk"]
    assert sdk["sent"] == w["sent"]  # the same workload
    assert sdk["lost"] > 0 and sdk["mirror_errors"] > 0  # the SDK path dropped batches
    assert sdk["stored"] < sdk["sent"]
    assert w["stored"] == w["sent"] == w["acknowledged"]
    assert w["catch_up_s"] is not None  # every entry sent before the heal arrived
    # The queue's own lag (status()) was sampled, and saw entries wait out the outage.
    assert w["queue_lag_s"]["count"] > 0 and w["queue_lag_s"]["max"] >= 1.0
    assert sdk["queue_lag_s"]["count"] == 0  # no queue on the SDK's own path
    assert result["windows"] == [{"kind": "down", "start": 0.5, "end": 3.0, "value": 1.0}]
    # every documented field is in the JSON
    for name in documented_fields("json-fields:system"):
        for system in ("sdk", "walmirror"):
            lookup(result["systems"][system], name)
    for name in documented_fields("json-fields:run"):
        lookup(result, name)
    for key, _, _ in FIGURES:
        assert key in w and key in sdk
    check_png(png)


def test_sweep_writes_table_json_and_heatmap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = main(
        [
            "bench",
            "--scenario",
            "long-outage",
            "--sweep",
            "max_batch_entries=500,50",
            "batch_linger=0.02,0.005",
            "--duration",
            "2",
            "--outage-start",
            "0.4",
            "--outage-seconds",
            "0.8",
            "--sessions",
            "2",
            "--rate",
            "100",
            "--tune",
            "backoff_max=0.5",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "drain rate" in printed and "max_batch_entries" in printed
    sweep = json.loads(out.read_text())
    assert [k["name"] for k in sweep["knobs"]] == ["max_batch_entries", "batch_linger"]
    assert sorted(
        (c["values"]["max_batch_entries"], c["values"]["batch_linger"]) for c in sweep["cells"]
    ) == [
        (50, 0.005),
        (50, 0.02),
        (500, 0.005),
        (500, 0.02),
    ]
    for cell in sweep["cells"]:
        assert cell["exactly_once"] and cell["lost"] == 0 and cell["duplicated"] == 0
        assert {"drain_entries_per_s", "lag_p99_s", "catch_up_s"} <= set(cell)
    assert "walmirror's default" in sweep["baseline_note"]
    for run in sweep["runs"]:
        assert list(run["systems"]) == ["walmirror"]
        assert run["settings"]["tuning"]["max_batch_entries"] in (50, 500)
        assert run["settings"]["tuning"]["backoff_max"] == 0.5  # --tune applies to every cell
    check_png(png)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--scenario", "steady", "--tune", "no_such_knob=1"]) == 2
    assert "unknown tuning knob" in capsys.readouterr().err
    assert main(["bench", "--sweep", "max_batch_entries=1,2", "a=1", "b=2"]) == 2
    assert "one or two" in capsys.readouterr().err
    assert main(["bench", "--scenario", "steady", "--faults", "proxy"]) == 2
    assert "network backend" in capsys.readouterr().err
    assert main(["bench", "--scenario", "steady", "--systems", "sdk,nope"]) == 2
    assert SCENARIO_NAMES == tuple(SCENARIOS)


# -- every scenario, in process ---------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "knobs"),
    [
        ("steady", {"duration": 2.5}),
        (
            "flapping",
            {"duration": 4.0, "outage_start": 0.4, "outage_seconds": 1.4, "flap_every": 2.0},
        ),
        (
            "slow-backend",
            {"duration": 3.0, "outage_start": 0.5, "outage_seconds": 2.0, "latency": 0.3},
        ),
        (
            "lost-replies",
            {"duration": 3.0, "outage_start": 0.3, "outage_seconds": 2.5, "lost_reply_rate": 0.5},
        ),
    ],
)
async def test_scenario_delivers_exactly_once_with_walmirror(
    tmp_path: Path, scenario: str, knobs: dict[str, Any]
) -> None:
    settings = Settings(scenario=scenario, directory=tmp_path, **SHORT, **knobs)
    result = await run_scenario(settings)
    w = check_walmirror_exactly_once(result)
    sdk = result["systems"]["sdk"]
    assert sdk["sent"] == w["sent"]
    assert result["settings"]["scenario"] == scenario
    if scenario == "lost-replies":
        # writes landed, replies lost: the batcher's retry stores them again
        assert sdk["duplicated"] > 0 and sdk["stored"] > sdk["sent"]
        assert w["faults_injected"].get("lost_reply", 0) > 0
    if scenario == "flapping":
        assert len(result["windows"]) == 2
        assert w["faults_injected"].get("down", 0) > 0


async def test_crash_restart_loses_nothing_acknowledged(tmp_path: Path) -> None:
    # contract 1: the mirroring processes are SIGKILLed during an outage (walmirror's queue
    # holds acknowledged entries the backend has not seen) and restarted on the same queue.
    settings = Settings(
        scenario="crash-restart",
        directory=tmp_path,
        duration=4.0,
        outage_start=0.5,  # more than a turn (1 s) before the kill: every session
        outage_seconds=2.3,  # flushed entries walmirror acknowledged but could not deliver
        crash_at=1.8,
        restart_delay=0.2,
        **SHORT,
    )
    result = await run_scenario(settings)
    w = check_walmirror_exactly_once(result)
    assert w["generations"] == 2
    assert [x["kind"] for x in result["windows"]] == ["down", "crash"]
    # acknowledged by the killed process, delivered by its successor: none lost
    assert w["delivered_after_restart"] > 0
    assert w["acknowledged"] == w["stored"]
    # what the SDK's batcher held in memory at the kill never reached any store: the same
    # for both systems, counted apart from losses
    assert w["in_memory_at_kill"] >= 0
    assert result["systems"]["sdk"]["lost_acknowledged"] == 0


async def test_long_outage_on_redis_through_the_fault_proxy(tmp_path: Path) -> None:
    settings = Settings(
        scenario="long-outage",
        backend=REDIS_URL,
        faults="proxy",
        directory=tmp_path,
        duration=3.5,
        outage_start=0.5,
        outage_seconds=2.5,
        **SHORT,
    )
    result = await run_scenario(settings)
    check_walmirror_exactly_once(result)
    sdk = result["systems"]["sdk"]
    assert sdk["lost"] > 0
    assert result["systems"]["walmirror"]["proxy"]["resets"] > 0
    # the run's namespace is gone afterwards
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        tag = result["settings"]["workload"]["tag"]
        assert [k async for k in client.scan_iter(match=f"*bench-{tag}*")] == []
    finally:
        await client.aclose()


def test_the_landing_log_reads_each_entry_s_id_from_its_bytes_as_parse_id_does() -> None:
    """The worker logs what a batch delivered without parsing it (``ids_of``): the
    ids must be the ones ``parse_id`` reads of the parsed entries, for every shape
    the workload writes (with a uuid, and the uuid-less snapshots)."""
    w = Workload(sessions=4, entries_per_s=400.0, duration=2.0, uuidless_share=0.4, tag=0x1234ABCD)
    for frame in [f for s in range(4) for f in schedule(w, s) if isinstance(f, Frame)][:60]:
        entries = make_entries(w, frame)
        encoded = [encode_entry(e) for e in entries]
        assert id_ranges(w.tag, ids_of(encoded)) == id_ranges(w.tag, entries)
        assert [parse_id(w.tag, e) for e in entries] == [
            parse_id(w.tag, found) for found in ids_of(encoded)
        ]
