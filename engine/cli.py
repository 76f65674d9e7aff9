"""The ``walmirror`` command: status, drain, requeue, verify, demo, bench.

Operator commands work on a queue file that no process is using (the queue
takes an exclusive lock, so a live application's queue is refused with a clear
error). ``status`` and ``requeue`` need only the queue; ``drain`` and
``verify`` also need the backends, as URLs (``walmirror.backends.from_url``).

Health checks: ``verify``, and ``status`` when given ``--backend``, ask each
backend that offers one (``check_server()``, e.g. Redis, or ``check()``, e.g.
S3) for settings that can lose transcripts silently, and print each as
``warning: <cursor name>: <text>`` on stderr (``status --json``: a
``"warnings"`` list). Warnings never change the exit code.

Cursor names: the queue remembers each backend by name (default
``store.default_cursor_name``: the backend's ``cursor_name`` such as
``"file:///mnt/transcripts"``, else ``"<index>:<class name>"``). The command uses the
default names when the queue knows them, adopts the queue's only name when
there is one backend, and otherwise asks for ``--name`` per ``--backend``. It
never invents a cursor in a queue that already has some: a new cursor would
start delivering from scratch.

Exit codes: 0 success; 1 the command ran and found a problem (not drained,
verify found damage, demo lost or duplicated entries); 2 usage or setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from claude_agent_sdk.types import SessionKey, SessionStore

from walmirror.backends import from_url

from .errors import FlushBlockedError, FlushTimeoutError, WalmirrorError
from .keys import describe_key, validate_key
from .queue import WriteAheadQueue
from .store import DurableSessionStore, close_backends, default_cursor_name
from .verify import KeyReport, verify


class UsageError(Exception):
    """Bad options or setup: printed as ``walmirror: error: ...``, exit code 2."""


# -- parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walmirror",
        description="Operate a walmirror write-ahead queue: inspect, drain, verify, demo, bench.",
        epilog="Run 'walmirror COMMAND --help' for a command's options.",
    )
    _add_store_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = _command(sub, "status", "show what is queued, per backend (reads the queue only)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    drain = _command(sub, "drain", "deliver everything queued to the backends, then stop")
    drain.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="give up after S seconds (60)"
    )

    requeue = _command(sub, "requeue", "un-park keys a backend rejected (all, or one key)")
    requeue.add_argument("--project", metavar="P", help="project_key of the key to un-park")
    requeue.add_argument("--session", metavar="S", help="session_id of the key to un-park")
    requeue.add_argument("--subpath", metavar="X", help="subpath (subagent transcript)")
    requeue.add_argument(
        "--backend-name", metavar="N", help="only this backend's parked keys (see status)"
    )

    imp = _command(
        sub,
        "import",
        "copy transcripts the Claude Code CLI wrote on disk into the backends, through "
        "the queue; a second run adds nothing the backends already hold",
    )
    imp.add_argument(
        "--config-dir",
        metavar="D",
        help="the CLI's config directory (default: $CLAUDE_CONFIG_DIR, else ~/.claude)",
    )
    imp.add_argument("--project", metavar="P", help="only this project (its directory name)")
    imp.add_argument("--session", metavar="S", help="only this session id")
    imp.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="wait up to S seconds for the backends to take everything (300)",
    )

    check = _command(sub, "verify", "compare each backend with the local queue, key by key")
    check.add_argument("--json", action="store_true", help="print JSON reports")

    demo = sub.add_parser(
        "demo",
        help="simulated agents writing through a backend outage; checks nothing is lost",
        description="Concurrent simulated agent sessions append transcript entries through "
        "DurableSessionStore(FaultyStore(FileStore)) while the backend goes down and "
        "replies get lost; afterwards the backend's files are checked against what was "
        "appended. Exit code 1 if anything was lost or duplicated.",
    )
    demo.add_argument("--seconds", type=float, default=10.0, metavar="N", help="run time (10)")
    demo.add_argument(
        "--outage-start", type=float, default=3.0, metavar="S", help="backend down at S s (3)"
    )
    demo.add_argument(
        "--outage-seconds", type=float, default=4.0, metavar="S", help="outage length (4)"
    )
    demo.add_argument("--sessions", type=int, default=4, metavar="K", help="sessions (4)")
    demo.add_argument("--dir", metavar="D", help="working directory (default: a new temp dir)")

    bench = sub.add_parser(
        "bench",
        help="benchmarks: append latency and ingest, drain, or outage scenarios beside the SDK",
        description="By default: durable append latency (backend healthy and down), local "
        "ingest with 1 and 50 sessions and heal to first delivery, each beside its "
        "baseline from the same run (raw SQLite) and its goal from DESIGN.md. --drain: "
        "drain throughput. --scale: 1M entries queued, then drained. "
        "--scenario NAME: the SDK's own TranscriptMirrorBatcher writing to the backend "
        "directly and through walmirror, side by side, through the same faults "
        "(needs the bench extra: pip install 'walmirror[bench]').",
    )
    bench.add_argument("--quick", action="store_true", help="a few seconds, rough figures")
    bench.add_argument(
        "--json",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="with PATH: also write every figure and setting to PATH as JSON; "
        "without: print JSON instead of a table",
    )
    bench.add_argument("--out", metavar="FILE", help="also write the JSON results to FILE")
    bench.add_argument("--dir", metavar="D", help="where the queues go (default: a temp dir)")
    bench.add_argument(
        "--drain",
        action="store_true",
        help="instead: drain throughput to Redis, PostgreSQL and S3 (moto) against the SDK's "
        "reference adapters",
    )
    bench.add_argument(
        "--scale",
        action="store_true",
        help="instead: queue --entries entries with the backend down (ingest rate, peak RSS, "
        "queue file size), then drain them (rate, time to drained); backend: a FileStore in "
        "a temp dir, or --backend URL",
    )
    bench.add_argument(
        "--entries",
        type=int,
        metavar="N",
        help="--scale: entries to queue (1,000,000; quick 50,000)",
    )
    bench.add_argument(
        "--otel",
        choices=("console", "otlp"),
        help="also export walmirror's spans and metrics: printed, or to an OTLP collector "
        "(OTEL_EXPORTER_OTLP_ENDPOINT; needs pip install 'walmirror[otel]'); a scenario "
        "exports from its walmirror worker",
    )
    _add_scenario_options(bench)
    return parser


SCENARIO_NAMES = (
    "steady",
    "flapping",
    "long-outage",
    "slow-backend",
    "lost-replies",
    "crash-restart",
)


def _add_scenario_options(bench: argparse.ArgumentParser) -> None:
    """``walmirror bench --scenario``: see walmirror.bench.scenarios and docs/benchmarks.md."""
    g = bench.add_argument_group(
        "scenarios",
        "Outage simulations: the SDK batcher -> backend vs. SDK batcher -> walmirror -> "
        "backend, same workload, same faults. Times are seconds from the run's start; "
        "unset knobs take the scenario's defaults (shorter with --quick).",
    )
    g.add_argument("--scenario", choices=SCENARIO_NAMES, help="run this scenario")
    g.add_argument(
        "--sweep",
        nargs="+",
        metavar="KNOB=V1,V2",
        help="run the scenario (default long-outage) for every combination of one or two "
        "tuning knobs (fields of walmirror.Tuning), walmirror only unless --systems",
    )
    g.add_argument(
        "--backend",
        metavar="URL",
        action="append",
        default=argparse.SUPPRESS,
        help="backend URL (default: a FileStore in a temp dir); the run writes under a "
        "namespace of its own (directory, Redis prefix, PostgreSQL table, S3 prefix) and "
        "removes it afterwards",
    )
    g.add_argument(
        "--faults",
        choices=("wrapper", "proxy"),
        default="wrapper",
        help="inject faults with the FaultyStore wrapper (any backend; default) or a TCP "
        "fault proxy in front of a network backend's server",
    )
    g.add_argument("--plot", metavar="PATH.png", help="write the timeline (or sweep heat-map)")
    g.add_argument(
        "--sessions", type=int, metavar="N", help="concurrent sessions (10; quick 4; --scale: 50)"
    )
    g.add_argument(
        "--rate", type=float, metavar="N", help="entries/s, all sessions (1000; quick 200)"
    )
    g.add_argument("--entry-bytes", type=int, default=1000, metavar="B", help="entry size (1000)")
    g.add_argument("--duration", type=float, metavar="S", help="how long the agents write")
    g.add_argument(
        "--subagent-share",
        type=float,
        default=0.2,
        metavar="F",
        help="share of frames written to subagent transcripts (0.2)",
    )
    g.add_argument(
        "--uuidless-share",
        type=float,
        default=0.3,
        metavar="F",
        help="share of entries without a uuid (0.3)",
    )
    g.add_argument(
        "--turn-seconds",
        type=float,
        default=1.0,
        metavar="S",
        help="the SDK flushes its batcher at each turn's end, every S s (1)",
    )
    g.add_argument("--seed", type=int, default=1, metavar="N", help="workload seed (1)")
    g.add_argument("--outage-start", type=float, metavar="S", help="first fault window starts")
    g.add_argument("--outage-seconds", type=float, metavar="S", help="fault window length")
    g.add_argument("--flap-every", type=float, metavar="S", help="flapping: one outage every S s")
    g.add_argument("--latency", type=float, metavar="S", help="slow-backend: added latency")
    g.add_argument(
        "--lost-reply-rate", type=float, metavar="F", help="lost-replies: share of replies lost"
    )
    g.add_argument("--crash-at", type=float, metavar="S", help="crash-restart: SIGKILL at S")
    g.add_argument(
        "--restart-delay", type=float, metavar="S", help="crash-restart: restart S after the kill"
    )
    g.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="a walmirror tuning knob for the run (repeatable), e.g. backoff_max=1",
    )
    g.add_argument(
        "--systems",
        metavar="LIST",
        help="comma-separated: sdk,walmirror (default both; a sweep: walmirror)",
    )
    g.add_argument("--sample-interval", type=float, metavar="S", help="timeline resolution")
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="after the run, wait up to S s for walmirror to drain (120)",
    )
    g.add_argument("--keep", action="store_true", help="keep what the run wrote to the backend")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_store_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """--queue/--backend/--name, accepted before or after the command name."""
    parser.add_argument(
        "--queue",
        metavar="PATH",
        default=default,
        help="the queue file (wal_path); env WALMIRROR_QUEUE",
    )
    parser.add_argument(
        "--backend",
        metavar="URL",
        action="append",
        default=default,
        help="a backend URL, e.g. file:///srv/transcripts; repeat for fan-out; "
        "env WALMIRROR_BACKEND (space-separated)",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        action="append",
        default=default,
        help="the queue's cursor name for each --backend, in order (see status)",
    )


def _command(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
    # SUPPRESS: a value given before the command name is not reset by the subcommand.
    _add_store_options(parser, argparse.SUPPRESS)
    return parser


# -- store options ------------------------------------------------------------------


def _queue_path(args: argparse.Namespace) -> Path:
    raw = args.queue or os.environ.get("WALMIRROR_QUEUE")
    if not raw:
        raise UsageError("no queue: pass --queue PATH or set WALMIRROR_QUEUE")
    path = Path(raw)
    if not path.is_file():
        raise UsageError(f"no queue file at {path}")
    return path


def _backends(args: argparse.Namespace) -> list[SessionStore]:
    urls = args.backend or os.environ.get("WALMIRROR_BACKEND", "").split()
    if not urls:
        raise UsageError("no backend: pass --backend URL or set WALMIRROR_BACKEND")
    try:
        return [from_url(url) for url in urls]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def known_names(path: Path) -> list[str]:
    """The backend names the queue holds cursors or pending deletes for (read-only)."""
    try:
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT backend FROM cursors UNION SELECT backend FROM tombstones"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []  # empty or not a queue: opening it reports the problem
    return sorted(str(r[0]) for r in rows)


def resolve_names(
    known: Sequence[str],
    backends: Sequence[SessionStore],
    given: Sequence[str] | None,
    *,
    require_all: bool,
) -> tuple[str, ...]:
    """Match each backend to a cursor name the queue already has (see the module docstring)."""
    defaults = tuple(default_cursor_name(i, b) for i, b in enumerate(backends))
    if given and len(given) != len(backends):
        raise UsageError(f"{len(given)} --name for {len(backends)} --backend; give one each")
    if not known:
        names = tuple(given) if given else defaults
    elif given:
        unknown = [n for n in given if n not in known]
        if unknown:
            raise UsageError(
                f"the queue has no cursor named {', '.join(unknown)}; it knows: {', '.join(known)}"
            )
        names = tuple(given)
    elif set(defaults) <= set(known):
        names = defaults
    elif len(backends) == 1 and len(known) == 1:
        names = (known[0],)
    else:
        raise UsageError(
            f"the queue knows backends {', '.join(known)}; say which --backend is which "
            "with --name, in the same order"
        )
    missing = sorted(set(known) - set(names))
    if require_all and missing:
        raise UsageError(
            f"the queue also feeds {', '.join(missing)}: pass every backend (with --backend "
            "and --name), or entries those backends still need could be compacted away"
        )
    return names


def _open_store(args: argparse.Namespace, *, require_all: bool) -> DurableSessionStore:
    path = _queue_path(args)
    backends = _backends(args)
    names = resolve_names(known_names(path), backends, args.name, require_all=require_all)
    return DurableSessionStore(backends, path, backend_names=names)


# -- backend health checks -------------------------------------------------------------

CHECK_TIMEOUT = 15.0  # seconds per backend; a check that hangs becomes a warning


async def check_backends(
    backends: Sequence[SessionStore], names: Sequence[str]
) -> list[dict[str, str]]:
    """Each backend's own health warnings, as ``{"backend": name, "text": warning}``.

    Asks backends that offer ``check_server()`` (Redis) or ``check()`` (S3)
    and expects a list of strings (one string or ``None`` are accepted too). A
    check that fails or times out is itself a warning: checks are advice and
    never stop the command.
    """
    warnings: list[dict[str, str]] = []
    for name, backend in zip(names, backends, strict=True):
        check = getattr(backend, "check_server", None) or getattr(backend, "check", None)
        if not callable(check):
            continue
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                result = check()
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    result = await result
        except TimeoutError:
            texts = [f"health check did not answer within {CHECK_TIMEOUT:g} s"]
        except Exception as exc:
            texts = [f"health check failed: {type(exc).__name__}: {exc}"]
        else:
            if result is None:
                texts = []
            elif isinstance(result, str):
                texts = [result]
            else:
                texts = [str(t) for t in result]
        warnings.extend({"backend": name, "text": text} for text in texts)
    return warnings


def _print_warnings(warnings: Sequence[dict[str, str]]) -> None:
    for w in warnings:
        print(f"warning: {w['backend']}: {w['text']}", file=sys.stderr)


# -- status ---------------------------------------------------------------------------


async def status(args: argparse.Namespace) -> int:
    path = _queue_path(args)
    names = known_names(path)
    warnings: list[dict[str, str]] = []
    if getattr(args, "backend", None):  # only an explicit --backend: status stays queue-only
        backends = _backends(args)
        try:
            checked = resolve_names(names, backends, args.name, require_all=False)
            warnings = await check_backends(backends, checked)
        finally:
            await close_backends(backends)
    queue = WriteAheadQueue(path)
    await queue.open_read_only()  # a live process may hold it: status only reads
    try:
        report: dict[str, Any] = {
            "queue": {
                "path": str(path),
                "stored_bytes": queue.stored_bytes,
                "keys": len(await queue.all_keys()),
            },
            "backends": [],
            "warnings": warnings,
        }
        for name in names:
            stats = await queue.stats(name)
            report["backends"].append(
                {
                    "name": name,
                    "pending_entries": stats.pending_entries,
                    "pending_bytes": stats.pending_bytes,
                    "pending_keys": stats.pending_keys,
                    "pending_deletes": stats.pending_deletes,
                    "lag_seconds": round(stats.lag_seconds, 3),
                    "parked": [{**p, "key_text": describe_key(p["key"])} for p in stats.parked],
                    "parked_deletes": [
                        {**p, "key_text": describe_key(p["key"])} for p in stats.parked_deletes
                    ],
                    # What the backend lost after acknowledging it (restored or not).
                    "losses": [
                        {
                            "key_text": describe_key(loss.key),
                            "seqs": [loss.first_seq, loss.last_seq],
                            "restored": loss.restored,
                            "lost": loss.lost,
                            "detected_at": loss.detected_at,
                        }
                        for loss in stats.losses
                    ],
                }
            )
    finally:
        await queue.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
        _print_warnings(warnings)
    return 0


def _print_status(report: dict[str, Any]) -> None:
    q = report["queue"]
    print(f"queue {q['path']}: {q['keys']} keys, {format_bytes(q['stored_bytes'])} held")
    if not report["backends"]:
        print("no backend has a cursor yet (nothing appended)")
        return
    header = ("backend", "pending", "bytes", "keys", "deletes", "oldest", "parked")
    rows = [header] + [
        (
            b["name"],
            str(b["pending_entries"]),
            format_bytes(b["pending_bytes"]),
            str(b["pending_keys"]),
            str(b["pending_deletes"]),
            f"{b['lag_seconds']:.1f} s",
            str(len(b["parked"]) + len(b["parked_deletes"])),
        )
        for b in report["backends"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for b in report["backends"]:
        for p in b["parked"]:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["parked_at"]))
            print(f"parked on {b['name']}: {p['key_text']} since {since}: {p['error']}")
        for p in b["parked_deletes"]:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["parked_at"]))
            print(
                f"parked on {b['name']}: the delete of {p['key_text']} since {since}: {p['error']}"
            )
        for loss in b["losses"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(loss["detected_at"]))
            print(
                f"{b['name']} lost acknowledged entries of {loss['key_text']} ({when}): "
                f"{loss['restored']} re-sent from the queue, {loss['lost']} no longer held"
            )


# -- drain ----------------------------------------------------------------------------


async def drain(args: argparse.Namespace) -> int:
    store = _open_store(args, require_all=True)
    await store.start()
    started = time.monotonic()
    problem = None
    try:
        await store.flush(timeout=args.timeout)
    except FlushTimeoutError:
        problem = f"timed out after {args.timeout:g} s"
    except FlushBlockedError:
        problem = "keys are parked after a permanent backend error"
    finally:
        elapsed = time.monotonic() - started
        delivered = {f.name: f.delivered_total for f in store.flushers}
        last_errors = {f.name: f.last_error for f in store.flushers}
        if problem:
            logging.getLogger("walmirror").setLevel(logging.ERROR)  # we report it ourselves
        report = await store.close(timeout=0.0 if problem else 10.0)
        await close_backends(store.backends)
    for name in store.backend_names:
        line = (
            f"{name}: delivered {delivered.get(name, 0)} entries in {elapsed:.1f} s; "
            f"{report.pending_entries.get(name, 0)} remain queued, "
            f"{report.parked_keys.get(name, 0)} keys parked"
        )
        if report.pending_entries.get(name) and last_errors.get(name):
            line += f"; last error: {last_errors[name]}"
        print(line)
    if report.drained:
        print("drained: every queued entry reached every backend.")
        return 0
    print(f"not drained: {problem or 'entries remain'}. See 'walmirror status'.")
    return 1


# -- import -----------------------------------------------------------------------------


async def import_command(args: argparse.Namespace) -> int:
    from .importer import find_transcripts, import_transcripts

    config = args.config_dir or os.environ.get("CLAUDE_CONFIG_DIR") or Path.home() / ".claude"
    raw = args.queue or os.environ.get("WALMIRROR_QUEUE")
    path = Path(raw) if raw else Path.home() / ".cache" / "walmirror" / "import.db"
    try:
        transcripts = find_transcripts(Path(config), args.project, args.session)
    except WalmirrorError as exc:
        raise UsageError(str(exc)) from None
    if not transcripts:
        print(
            f"nothing to import under {config} (project {args.project or 'any'}, "
            f"session {args.session or 'any'})"
        )
        return 0
    backends = _backends(args)
    names = resolve_names(
        known_names(path) if path.is_file() else [], backends, args.name, require_all=False
    )
    store = DurableSessionStore(backends, path, backend_names=names)
    with _progress(len(transcripts)) as advance:
        try:
            report = await import_transcripts(
                store, transcripts, lambda t, appended, skipped: advance(describe_key(t.key))
            )
            problem = None
            try:
                await store.flush(timeout=args.timeout)
            except (FlushTimeoutError, FlushBlockedError) as exc:
                problem = str(exc)
        finally:
            closed = await store.close(timeout=0.0, close_backends=True)
    print(
        f"imported {report.sessions} session(s), {report.transcripts} transcript(s) from "
        f"{config}: {report.appended} entries appended, {report.skipped} already held"
    )
    if problem or not closed.drained:
        print(
            f"not all delivered yet ({problem or 'entries remain queued'}); they stay in "
            f"{path}: run 'walmirror drain --queue {path}' once the backends answer"
        )
        return 1
    print("every imported entry reached every backend.")
    return 0


class _progress:
    """A progress bar (rich, when installed and on a terminal), else nothing."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._bar: Any = None

    def __enter__(self) -> Callable[[str], None]:
        if sys.stderr.isatty():
            try:
                from rich.progress import Progress
            except ImportError:
                pass
            else:
                self._bar = Progress(transient=True)
                self._bar.start()
                task = self._bar.add_task("importing", total=self.total)
                return lambda what: self._bar.update(task, advance=1, description=what[:60])
        return lambda what: None

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


# -- requeue ----------------------------------------------------------------------------


async def requeue(args: argparse.Namespace) -> int:
    key: SessionKey | None = None
    if args.project or args.session or args.subpath:
        if not (args.project and args.session):
            raise UsageError("a key needs both --project and --session (and maybe --subpath)")
        raw: dict[str, str] = {"project_key": args.project, "session_id": args.session}
        if args.subpath:
            raw["subpath"] = args.subpath
        key = validate_key(raw)
    path = _queue_path(args)
    names = known_names(path)
    if args.backend_name is not None and args.backend_name not in names:
        raise UsageError(f"no backend named {args.backend_name}; the queue knows: {names}")
    queue = WriteAheadQueue(path)
    await queue.open(names)
    try:
        count = await queue.requeue(args.backend_name, key)
    finally:
        await queue.close()
    scope = describe_key(key) if key else "all keys"
    where = f"backend {args.backend_name}" if args.backend_name else "every backend"
    print(f"un-parked {count} key(s) ({scope}, {where}).")
    if count:
        print("They are delivered on the application's next start, or by 'walmirror drain'.")
    return 0


# -- verify ------------------------------------------------------------------------------


async def run_verify(args: argparse.Namespace) -> int:
    path = _queue_path(args)
    backends = _backends(args)
    try:
        names = resolve_names(known_names(path), backends, args.name, require_all=False)
        store = DurableSessionStore(backends, path, backend_names=names)
        await store.queue.open(store.backend_names)  # inspect only: no flusher runs
        try:
            warnings = await check_backends(store.backends, store.backend_names)
            reports = await verify(store)
        finally:
            await store.queue.close()
    finally:
        await close_backends(backends)
    # stderr in both forms: the --json output stays the list of key reports
    _print_warnings(warnings)
    if args.json:
        print(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        _print_verify(reports)
    if any(r.problems for r in reports):
        return 1
    return 2 if any(r.error for r in reports) else 0


def _print_verify(reports: list[KeyReport]) -> None:
    keys = {describe_key(r.key) for r in reports}
    for r in reports:
        if r.ok:
            continue
        if r.error:
            print(f"{r.backend} {describe_key(r.key)}: {r.error}")
            continue
        found = [
            f"{count} {label}"
            for count, label in (
                (r.missing, "missing"),
                (r.out_of_order, "out of order"),
                (r.duplicated, "duplicated"),
                (r.behind, "acknowledged but no longer held"),
                (r.lost, "lost by the backend (not restorable)"),
            )
            if count
        ]
        print(
            f"{r.backend} {describe_key(r.key)}: {', '.join(found)} "
            f"(first at offset {r.first_bad_offset}; backend holds {r.backend_entries})"
        )
    bad = [r for r in reports if not r.ok]
    checked = sum(r.checked for r in reports)
    pending = sum(r.pending for r in reports)
    summary = f"{len(keys)} keys, {checked} entries checked, {pending} pending"
    if bad:
        print(f"{summary}: problems in {len(bad)} key/backend pair(s).")
    else:
        print(f"{summary}: clean.")


# -- demo and bench ----------------------------------------------------------------------


async def run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, demo  # only this command needs it

    options = DemoOptions(
        seconds=args.seconds,
        outage_start=args.outage_start,
        outage_seconds=args.outage_seconds,
        sessions=args.sessions,
        directory=Path(args.dir) if args.dir else None,
    )
    try:
        options.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return await demo(options)


async def run_bench(args: argparse.Namespace) -> int:
    if args.otel and (args.scenario or args.sweep):
        # The walmirror side of a scenario runs in a worker process: it exports.
        os.environ[OTEL_ENV] = args.otel
        return await run_scenario_bench(args)
    if args.scenario or args.sweep:
        return await run_scenario_bench(args)
    stop_otel = _configure_otel(args.otel) if args.otel else None
    try:
        return await _run_plain_bench(args)
    finally:
        if stop_otel is not None:
            stop_otel()


OTEL_ENV = "WALMIRROR_BENCH_OTEL"
"""How ``bench --otel`` reaches a scenario's worker process."""


def _configure_otel(kind: str) -> Callable[[], None]:
    from . import telemetry

    try:
        return telemetry.configure_exporters(kind)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None


async def _run_plain_bench(args: argparse.Namespace) -> int:
    if args.drain and args.scale:
        raise UsageError("--drain and --scale are separate benchmarks")
    if args.entries is not None and not args.scale:
        raise UsageError("--entries goes with --scale")
    json_path = args.json if isinstance(args.json, str) else None
    out = args.out or json_path
    if args.scale:
        return await _run_scale_bench(args, Path(out) if out else None)
    if args.drain:
        from walmirror.bench.drain import run
    else:
        from walmirror.bench.append import run  # only this command needs it

    return await run(
        quick=args.quick,
        as_json=args.json is True,
        out=Path(out) if out else None,
        directory=Path(args.dir) if args.dir else None,
    )


async def _run_scale_bench(args: argparse.Namespace, out: Path | None) -> int:
    from walmirror.bench.scale import ScaleError, run

    backends = getattr(args, "backend", None) or []
    if len(backends) > 1:
        raise UsageError("bench --scale takes one --backend")
    try:
        return await run(
            quick=args.quick,
            as_json=args.json is True,
            out=out,
            directory=Path(args.dir) if args.dir else None,
            entries=args.entries,
            sessions=args.sessions,
            backend=backends[0] if backends else None,
            keep=args.keep,
        )
    except ScaleError as exc:
        raise UsageError(str(exc)) from None


async def run_scenario_bench(args: argparse.Namespace) -> int:
    try:
        from walmirror.bench.scenario_cli import run_cli
        from walmirror.bench.scenarios import ScenarioError, Settings, parse_tuning
    except ImportError as exc:
        raise UsageError(
            f"bench --scenario needs the bench extra: pip install 'walmirror[bench]' ({exc})"
        ) from None
    if args.drain or args.scale:
        raise UsageError("--drain/--scale and --scenario/--sweep are separate benchmarks")
    backends = getattr(args, "backend", None) or []
    if len(backends) > 1:
        raise UsageError("bench --scenario takes one --backend")
    json_path = args.json if isinstance(args.json, str) else args.out
    try:
        systems = (
            tuple(s.strip() for s in args.systems.split(",") if s.strip())
            if args.systems
            else (("walmirror",) if args.sweep else ("sdk", "walmirror"))
        )
        settings = Settings(
            scenario=args.scenario or "long-outage",
            backend=backends[0] if backends else None,
            faults=args.faults,
            quick=args.quick,
            sessions=args.sessions,
            entries_per_s=args.rate,
            entry_bytes=args.entry_bytes,
            duration=args.duration,
            subagent_share=args.subagent_share,
            uuidless_share=args.uuidless_share,
            turn_seconds=args.turn_seconds,
            seed=args.seed,
            outage_start=args.outage_start,
            outage_seconds=args.outage_seconds,
            flap_every=args.flap_every,
            latency=args.latency,
            lost_reply_rate=args.lost_reply_rate,
            crash_at=args.crash_at,
            restart_delay=args.restart_delay,
            tuning=parse_tuning(args.tune),
            systems=systems,
            sample_interval=args.sample_interval,
            drain_timeout=args.drain_timeout,
            directory=Path(args.dir) if args.dir else None,
            keep=args.keep,
        )
        return await run_cli(
            settings,
            sweep=args.sweep,
            json_path=Path(json_path) if json_path else None,
            print_json=args.json is True,
            plot_path=Path(args.plot) if args.plot else None,
            progress=not args.no_progress,
        )
    except ScenarioError as exc:
        raise UsageError(str(exc)) from None


COMMANDS = {
    "status": status,
    "drain": drain,
    "import": import_command,
    "requeue": requeue,
    "verify": run_verify,
    "demo": run_demo,
    "bench": run_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="walmirror: %(levelname)s: %(message)s", stream=sys.stderr
    )
    try:
        return asyncio.run(COMMANDS[args.command](args))
    except (UsageError, WalmirrorError) as exc:
        print(f"walmirror: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def format_bytes(n: int) -> str:
    """A byte count for people: 512 B, 1.5 KB, 20.0 MB."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


if __name__ == "__main__":
    raise SystemExit(main())
