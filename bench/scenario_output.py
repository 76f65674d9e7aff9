"""What ``walmirror bench --scenario`` shows: a progress bar, a table, a plot, a heat-map.

``rich`` draws the terminal (progress and tables) and ``matplotlib`` the PNGs;
both come with the ``walmirror[bench]`` extra. ``FIGURES`` lists every
per-system figure with its label: the table's rows, and the fields
``docs/benchmarks.md`` documents (the tests check the JSON holds each one).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from walmirror.bench.scenarios import SYSTEM_LABELS
from walmirror.cli import format_bytes

__all__ = ["FIGURES", "SWEEP_METRICS", "heatmap", "live_progress", "plot", "result_table"]

# (JSON field of each system, label in the table, how to show it)
FIGURES: list[tuple[str, str, str]] = [
    ("sent", "entries sent", "int"),
    ("acknowledged", "acknowledged by append", "int"),
    ("stored", "stored in the backend", "int"),
    ("lost", "lost", "int"),
    ("lost_acknowledged", "lost after append acknowledged", "int"),
    ("duplicated", "duplicated", "int"),
    ("out_of_order", "out of order", "int"),
    ("in_memory_at_kill", "in the SDK's memory at SIGKILL", "int"),
    ("delivered_after_restart", "acknowledged, delivered after the restart", "int"),
    ("mirror_errors", "MirrorErrorMessages", "int"),
    ("append_ms", "append p50 / p99 / max (ms)", "pct"),
    ("flush_wait_ms", "turn-end flush wait p50 / p99 / max (ms)", "pct"),
    ("lag_s", "lag p50 / p99 / max (s)", "pct"),
    ("oldest_pending_s", "oldest pending over time p50 / p99 / max (s)", "pct"),
    ("queue_lag_s", "queue lag, as status() reports it, p50 / p99 / max (s)", "pct"),
    ("catch_up_s", "heal to caught up (s)", "float"),
    ("drain_entries_per_s", "drain rate while catching up (entries/s)", "int"),
    ("peak_rss_mb", "peak RSS (MB)", "float"),
    ("queue_file_peak_bytes", "queue file peak", "bytes"),
    ("backend_requests", "backend requests", "int"),
]

_CRASH_ONLY = {"in_memory_at_kill", "delivered_after_restart"}

# Sweep cells: (name, label, where in a system's figures)
SWEEP_METRICS: list[tuple[str, str]] = [
    ("drain_entries_per_s", "drain rate (entries/s)"),
    ("lag_p99_s", "lag p99 (s)"),
    ("catch_up_s", "heal to caught up (s)"),
]

_WINDOW_STYLE = {
    "down": ("0.55", "backend down"),
    "slow": ("tab:orange", "backend slow"),
    "lost_replies": ("tab:purple", "replies lost"),
    "crash": ("tab:red", "SIGKILL to restart"),
}
_COLORS = {"sdk": "tab:red", "walmirror": "tab:blue"}


def _fmt(value: Any, how: str) -> str:
    if value is None:
        return "-"
    if how == "pct":
        parts = [value.get(k) for k in ("p50", "p99", "max")]
        if all(p is None for p in parts):
            return "-"
        return " / ".join("-" if p is None else _num(p) for p in parts)
    if how == "int":
        return f"{int(value):,}"
    if how == "bytes":
        return format_bytes(int(value)) if value else "-"
    return f"{float(value):.2f}"


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def describe_run(result: dict[str, Any]) -> str:
    s = result["settings"]
    w = s["workload"]
    faults = ", ".join(
        f"{x['kind'].replace('_', ' ')} {x['start']:g}-{x['end']:g} s"
        + (f" ({x['value']:g})" if x["kind"] in ("slow", "lost_replies") else "")
        for x in result["windows"]
    )
    return (
        f"{result['scenario']}: {w['sessions']} sessions, {w['entries_per_s']:g} entries/s of "
        f"~{w['entry_bytes']} B for {w['duration']:g} s on {s['backend']}; "
        f"faults ({s['faults']}): {faults or 'none'}"
    )


def result_table(result: dict[str, Any]) -> Table:
    """Every figure, one column per system, side by side."""
    systems = list(result["systems"])
    table = Table(title=f"walmirror bench --scenario {describe_run(result)}", title_justify="left")
    table.add_column("figure")
    for s in systems:
        table.add_column(SYSTEM_LABELS.get(s, s), justify="right")
    crash = result["settings"].get("crash_at") is not None
    for key, label, how in FIGURES:
        if key in _CRASH_ONLY and not crash:
            continue
        table.add_row(label, *(_fmt(result["systems"][s].get(key), how) for s in systems))
    verdicts = result.get("verdict", {})
    table.caption = "  ".join(
        f"{s}: {v['text']}" + (" (exactly once)" if v["exactly_once"] else "")
        for s, v in verdicts.items()
    )
    return table


def windows_table(result: dict[str, Any]) -> Table | None:
    if not result["windows"]:
        return None
    systems = list(result["systems"])
    table = Table(title="per fault window: heal to caught up (s) / drain rate (entries/s)")
    table.add_column("window")
    for s in systems:
        table.add_column(s, justify="right")
    for i, w in enumerate(result["windows"]):
        cells = []
        for s in systems:
            c = result["systems"][s]["windows"][i]
            cells.append(
                f"{_fmt(c['catch_up_s'], 'float')} / {_fmt(c['drain_entries_per_s'], 'int')}"
                f" (backlog {c['backlog_at_heal']:,})"
            )
        table.add_row(f"{w['kind']} {w['start']:g}-{w['end']:g} s", *cells)
    return table


def print_result(result: dict[str, Any], console: Console) -> None:
    console.print(result_table(result))
    per_window = windows_table(result)
    if per_window is not None and len(result["windows"]) <= 12:
        console.print(per_window)
    for s, v in result.get("verdict", {}).items():
        if s == "walmirror":
            line = (
                "0 lost, 0 duplicated: every entry reached the backend exactly once, in order."
                if v["exactly_once"]
                else f"walmirror: {v['text']}: NOT exactly once."
            )
            console.print(line, markup=False)


# -- progress ----------------------------------------------------------------------------


@contextmanager
def live_progress(
    total: float, windows: Sequence[dict[str, Any]], title: str, console: Console
) -> Iterator[Any]:
    """A progress bar over the run's seconds; yields the callback the workers' lines feed."""
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:>5.1f}/{task.total:.0f} s"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task: TaskID = bar.add_task(title, total=total, status="starting workers")
        latest: dict[str, dict[str, Any]] = {}

        def update(system: str, p: dict[str, Any]) -> None:
            latest[system] = p
            t = max(float(x.get("t", 0.0)) for x in latest.values())
            active = [w["kind"] for w in windows if w["start"] <= t < w["end"]]
            parts = [("FAULT " + ",".join(active)) if active else "healthy"]
            for name, x in latest.items():
                text = f"{name}: sent {x.get('sent', 0):,} acked {x.get('acked', 0):,}"
                if x.get("errors"):
                    text += f" mirror errors {x['errors']}"
                if name == "walmirror" and x.get("queue_pending", 0) > 0:
                    text += f" queued {x['queue_pending']:,}"
                parts.append(text)
            bar.update(task, completed=min(t, total), status=" | ".join(parts))

        yield update
        bar.update(task, completed=total, status="done")


# -- plots ---------------------------------------------------------------------------------


def _shade(axes: Sequence[Any], windows: Sequence[dict[str, Any]]) -> None:
    labelled: set[str] = set()
    for w in windows:
        color, label = _WINDOW_STYLE.get(w["kind"], ("0.8", w["kind"]))
        for i, ax in enumerate(axes):
            ax.axvspan(
                w["start"],
                w["end"],
                color=color,
                alpha=0.18,
                lw=0,
                label=label if i == 0 and label not in labelled else None,
            )
        labelled.add(label)


def plot(result: dict[str, Any], path: Path) -> None:
    """Timeline PNG: lag and queue depth of both systems, fault windows shaded, losses marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    lag_ax, depth_ax, lost_ax = axes
    _shade(axes, result["windows"])
    for name, figures in result["systems"].items():
        tl = figures["timeline"]
        color = _COLORS.get(name, None)
        label = SYSTEM_LABELS.get(name, name)
        lag_ax.step(tl["t"], tl["oldest_pending_s"], where="post", color=color, label=label)
        depth_ax.step(
            tl["t"], tl["backlog"], where="post", color=color, label=f"{name}: not yet in backend"
        )
        if name == "walmirror" and tl["samples_t"]:
            depth_ax.plot(
                tl["samples_t"],
                [max(0, q) for q in tl["queue_pending"]],
                color=color,
                ls="--",
                lw=1,
                label="walmirror: queue file pending",
            )
        drops = tl["drops"]
        if drops:
            times = [d[0] for d in drops]
            counts = [d[1] for d in drops]
            at = [_value_at(tl["t"], tl["oldest_pending_s"], x) for x in times]
            lag_ax.scatter(times, at, marker="x", color="black", zorder=5, s=14, lw=0.8)
            total = 0
            xs, ys = [0.0], [0]
            for x, n in zip(times, counts, strict=True):
                total += n
                xs.append(x)
                ys.append(total)
            lost_ax.step(xs, ys, where="post", color=color, label=f"{name}: dropped by the batcher")
            lost_ax.scatter(times, ys[1:], marker="x", color=color, zorder=5, s=10, lw=0.8)
        lost = figures["lost"]
        end = tl["t"][-1] if tl["t"] else 0.0
        lost_ax.scatter(
            [end],
            [lost],
            marker="o",
            color=color,
            zorder=6,
            label=f"{name}: lost at the end = {lost:,}",
        )
    lag_ax.set_ylabel("oldest entry not yet\nin the backend (s)")
    depth_ax.set_ylabel("entries")
    lost_ax.set_ylabel("entries lost")
    lost_ax.set_xlabel("seconds since the run started")
    lag_ax.set_title(describe_run(result), fontsize=9, loc="left", wrap=True)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _value_at(ts: Sequence[float], values: Sequence[float], t: float) -> float:
    import bisect

    i = max(0, bisect.bisect_right(ts, t) - 1)
    return float(values[i]) if values else 0.0


def heatmap(sweep: dict[str, Any], path: Path) -> None:
    """One heat-map per sweep metric over the two knobs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = sweep["knobs"]
    (xname, xs), (yname, ys) = (
        (knobs[0]["name"], knobs[0]["values"]),
        ((knobs[1]["name"], knobs[1]["values"]) if len(knobs) > 1 else ("-", [None])),
    )
    fig, axes = plt.subplots(1, len(SWEEP_METRICS), figsize=(5 * len(SWEEP_METRICS), 4.2))
    for ax, (metric, label) in zip(axes, SWEEP_METRICS, strict=True):
        grid = [[math.nan for _ in xs] for _ in ys]
        for cell in sweep["cells"]:
            i = ys.index(cell["values"].get(yname)) if yname != "-" else 0
            j = xs.index(cell["values"][xname])
            value = cell.get(metric)
            grid[i][j] = math.nan if value is None else float(value)
        image = ax.imshow(grid, cmap="viridis_r" if metric != "drain_entries_per_s" else "viridis")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel(xname)
        ax.set_ylabel(yname)
        ax.set_title(label)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if math.isnan(v):
                    text, color = ("never" if metric == "catch_up_s" else "-"), "black"
                else:
                    text = f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
                    r, g, b, _ = image.cmap(image.norm(v))
                    color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(sweep["title"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_table(sweep: dict[str, Any]) -> Table:
    names = [k["name"] for k in sweep["knobs"]]
    table = Table(title=sweep["title"], title_justify="left")
    for n in names:
        table.add_column(n, justify="right")
    for _, label in SWEEP_METRICS:
        table.add_column(label, justify="right")
    table.add_column("lost / duplicated", justify="right")
    for cell in sweep["cells"]:
        row = [str(cell["values"][n]) for n in names]
        row.append(_fmt(cell["drain_entries_per_s"], "int"))
        row.append(_fmt(cell["lag_p99_s"], "float"))
        row.append("never" if cell["catch_up_s"] is None else _fmt(cell["catch_up_s"], "float"))
        row.append(f"{cell['lost']} / {cell['duplicated']}")
        table.add_row(*row)
    table.caption = sweep.get("baseline_note", "")
    return table
