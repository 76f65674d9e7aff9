"""``walmirror bench --scenario NAME`` and ``--sweep``: run, show, write.

``run_cli`` is what ``walmirror.cli`` calls. A scenario run prints the
side-by-side table (and a progress bar on stderr while it runs); ``--json
PATH`` writes every figure and setting, ``--plot PATH.png`` the timeline.
``--sweep KNOB=v1,v2 [KNOB=v1,v2]`` runs the scenario once per combination of
two ``Tuning`` knobs (walmirror only, unless ``--systems`` says otherwise) and
prints a table and, with ``--plot``, a heat-map of drain rate, lag p99 and
catch-up time.

Exit codes: 0 when walmirror delivered every entry exactly once in every run
(or walmirror was not part of the run), 1 otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from walmirror.bench.scenario_output import (
    heatmap,
    live_progress,
    plot,
    print_result,
    sweep_table,
)
from walmirror.bench.scenarios import (
    ScenarioError,
    Settings,
    exactly_once,
    parse_knob,
    run_scenario,
)

__all__ = ["parse_sweep", "run_cli", "run_sweep"]


def parse_sweep(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``["max_batch_entries=17,500", "backoff_max=0.5,5"]`` -> knobs and typed values."""
    if not 1 <= len(items) <= 2:
        raise ScenarioError("--sweep takes one or two KNOB=v1,v2,... items")
    knobs: list[tuple[str, list[Any]]] = []
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not values:
            raise ScenarioError(f"{item!r}: expected KNOB=v1,v2,...")
        parsed = [parse_knob(name, v) for v in values]
        if len(set(map(repr, parsed))) != len(parsed):
            raise ScenarioError(f"{name}: a value is repeated")
        knobs.append((name, parsed))
    if len(knobs) == 2 and knobs[0][0] == knobs[1][0]:
        raise ScenarioError("--sweep: give two different knobs")
    return knobs


async def run_sweep(
    settings: Settings,
    knobs: list[tuple[str, list[Any]]],
    console: Console | None = None,
) -> dict[str, Any]:
    """Run ``settings`` once per combination; the cells with their figures."""
    names = [n for n, _ in knobs]
    combos = list(itertools.product(*(values for _, values in knobs)))
    cells: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for index, combo in enumerate(combos, 1):
        values = dict(zip(names, combo, strict=True))
        cell_settings = dataclasses.replace(settings, tuning={**settings.tuning, **values})
        title = f"[{index}/{len(combos)}] " + " ".join(f"{k}={v}" for k, v in values.items())
        result = await _run_one(cell_settings, console, title)
        runs.append(result)
        figures = result["systems"].get("walmirror") or next(iter(result["systems"].values()))
        cells.append(
            {
                "values": values,
                "drain_entries_per_s": figures["drain_entries_per_s"],
                "lag_p99_s": figures["lag_s"]["p99"],
                "catch_up_s": figures["catch_up_s"],
                "append_p99_ms": figures["append_ms"]["p99"],
                "backend_requests": figures["backend_requests"],
                "lost": figures["lost"],
                "duplicated": figures["duplicated"],
                "exactly_once": exactly_once(figures),
                "sdk": _sdk_cell(result),
            }
        )
    first = runs[0]
    defaults = first["settings"]["tuning"]
    baseline = [
        c for c in cells if all(c["values"][n] == _default(defaults, n, settings) for n in names)
    ]
    note = (
        "baseline: the cell with walmirror's default "
        + ", ".join(f"{n}={_default(defaults, n, settings)}" for n in names)
        if baseline
        else "no cell uses walmirror's defaults for both knobs"
    )
    return {
        "title": (
            f"walmirror bench --scenario {settings.scenario} --sweep "
            + " ".join(f"{n}={','.join(map(str, v))}" for n, v in knobs)
        ),
        "knobs": [{"name": n, "values": v} for n, v in knobs],
        "cells": cells,
        "baseline_note": note,
        "settings": first["settings"],
        "machine": first["machine"],
        "runs": runs,
    }


def _default(defaults: dict[str, Any], name: str, settings: Settings) -> Any:
    from walmirror import Tuning

    return settings.tuning.get(name, getattr(Tuning(), name, defaults.get(name)))


def _sdk_cell(result: dict[str, Any]) -> dict[str, Any] | None:
    sdk = result["systems"].get("sdk")
    if sdk is None:
        return None
    return {"lost": sdk["lost"], "duplicated": sdk["duplicated"], "lag_p99_s": sdk["lag_s"]["p99"]}


async def _run_one(settings: Settings, console: Console | None, title: str) -> dict[str, Any]:
    if console is None:
        return await run_scenario(settings)
    total = settings.workload().duration
    with live_progress(total, settings.windows(), title, console) as update:
        return await run_scenario(settings, update)


async def run_cli(
    settings: Settings,
    *,
    sweep: Sequence[str] | None = None,
    json_path: Path | None = None,
    print_json: bool = False,
    plot_path: Path | None = None,
    progress: bool = True,
) -> int:
    """Run a scenario (or a sweep), print it, write what was asked for; the exit code."""
    logging.getLogger("walmirror").setLevel(logging.ERROR)
    out = Console()
    if not out.is_terminal:
        out = Console(width=120)  # a file or a pipe: keep each row on one line
    err = Console(stderr=True)
    show = err if progress else None
    if sweep:
        knobs = parse_sweep(sweep)
        settings.check()
        data = await run_sweep(settings, knobs, show)
        ok = all(c["exactly_once"] for c in data["cells"])
        if plot_path is not None:
            heatmap(data, plot_path)
        if json_path is not None:
            await asyncio.to_thread(json_path.write_text, json.dumps(data, indent=1) + "\n")
        if print_json:
            print(json.dumps(data, indent=1))
        else:
            out.print(sweep_table(data))
            if plot_path is not None:
                out.print(f"heat-map: {plot_path}", markup=False)
        return 0 if ok else 1
    settings.check()
    result = await _run_one(settings, show, f"{settings.scenario} ({', '.join(settings.systems)})")
    if plot_path is not None:
        plot(result, plot_path)
    if json_path is not None:
        await asyncio.to_thread(json_path.write_text, json.dumps(result, indent=1) + "\n")
    if print_json:
        print(json.dumps(result, indent=1))
    else:
        print_result(result, out)
        if plot_path is not None:
            out.print(f"plot: {plot_path}", markup=False)
    walmirror = result["systems"].get("walmirror")
    return 0 if walmirror is None or exactly_once(walmirror) else 1
