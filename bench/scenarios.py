"""``walmirror bench --scenario NAME``: outages beside the SDK's own mirror path.

One run drives two systems side by side, with the same simulated sessions
(``scenario_workload``) and the same fault timetable:

* ``sdk``: the SDK's ``TranscriptMirrorBatcher`` calling the backend directly
  (what users have without walmirror);
* ``walmirror``: the same batcher calling ``DurableSessionStore(backend, queue)``.

Each system runs in a worker process of its own (``scenario_worker``): its
own peak RSS, and a SIGKILL hits it as a crash would. Both write to the same
backend URL, each under a project key of its own (``bench-<run>-<system>``),
inside a namespace made for the run (a directory, a Redis prefix, a
PostgreSQL table, an S3 prefix) that is removed afterwards unless ``keep``.
At the end the parent reads what the backend holds for each system and
counts (``scenario_analysis``).

Scenarios (``SCENARIOS``; every time and rate is a knob):

``steady``        no faults: the baseline cost of each path.
``flapping``      short outages every few seconds.
``long-outage``   one outage (60 s by default) in the middle of the run.
``slow-backend``  every backend call takes longer (added latency) for a stretch.
``lost-replies``  for a stretch, a share of writes land but their reply is lost.
``crash-restart`` the mirroring processes are SIGKILLed mid-run (during an
                  outage, so walmirror's queue holds a backlog) and restarted
                  on the same queue file; what ``append`` acknowledged is
                  logged durably by the worker and checked afterwards.

Faults come from ``walmirror.faults.FaultyStore`` around any backend
(``faults="wrapper"``) or, for network backends, from
``walmirror.faultproxy.FaultProxy`` between the client and the real server
(``faults="proxy"``): down = connections reset, slow = replies delayed, lost
replies = the server's replies dropped (the connection reset after the write
reached the server) in random slices of the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from claude_agent_sdk._internal import transcript_mirror_batcher as sdk_batcher

from walmirror import Tuning
from walmirror.bench.scenario_analysis import Generation, analyze
from walmirror.bench.scenario_workload import Workload, key_for, parse_id

__all__ = [
    "SCENARIOS",
    "SYSTEMS",
    "Preset",
    "ScenarioError",
    "Settings",
    "parse_tuning",
    "run_scenario",
]

SYSTEMS = ("sdk", "walmirror")
SYSTEM_LABELS = {
    "sdk": "SDK batcher -> backend",
    "walmirror": "SDK batcher -> walmirror -> backend",
}
FAULT_KINDS = ("down", "slow", "lost_replies", "crash")

Progress = Callable[[str, dict[str, Any]], None]


class ScenarioError(Exception):
    """Bad settings, or a run that could not be carried out (shown as a usage error)."""


@dataclass(frozen=True)
class Preset:
    """A scenario's defaults: (full run, ``quick`` run) for each time."""

    description: str
    duration: tuple[float, float]
    outage_start: tuple[float, float] = (0.0, 0.0)
    outage_seconds: tuple[float, float] = (0.0, 0.0)
    flap_every: tuple[float, float] = (0.0, 0.0)
    latency: tuple[float, float] = (0.0, 0.0)
    lost_reply_rate: tuple[float, float] = (0.0, 0.0)
    crash_at: tuple[float, float] | None = None
    restart_delay: tuple[float, float] = (1.0, 0.3)


SCENARIOS: dict[str, Preset] = {
    "steady": Preset("no faults", duration=(30.0, 4.0)),
    "flapping": Preset(
        "the backend goes down for a moment every few seconds",
        duration=(40.0, 6.0),
        outage_start=(5.0, 1.0),
        outage_seconds=(2.5, 1.8),
        flap_every=(6.0, 3.0),
    ),
    "long-outage": Preset(
        "the backend is down for a long stretch in the middle of the run",
        duration=(90.0, 6.0),
        outage_start=(10.0, 1.0),
        outage_seconds=(60.0, 3.0),
    ),
    "slow-backend": Preset(
        "every backend call takes longer for a stretch",
        duration=(30.0, 5.0),
        outage_start=(5.0, 1.0),
        outage_seconds=(20.0, 3.0),
        latency=(1.0, 0.6),
    ),
    "lost-replies": Preset(
        "for a stretch, writes land but a share of their replies is lost",
        duration=(30.0, 4.5),
        outage_start=(3.0, 0.5),
        outage_seconds=(24.0, 3.5),
        lost_reply_rate=(0.2, 0.3),
    ),
    "crash-restart": Preset(
        "the mirroring process is SIGKILLed during an outage and restarted on its queue",
        duration=(30.0, 6.0),
        outage_start=(8.0, 1.5),
        outage_seconds=(10.0, 2.5),
        crash_at=(13.0, 2.5),
        restart_delay=(1.0, 0.3),
    ),
}

# The workload when no knob says otherwise: (full run, quick run).
WORKLOAD_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "sessions": (10, 4),
    "entries_per_s": (1000.0, 200.0),
}


@dataclass
class Settings:
    """Everything a scenario run needs; ``None`` means the scenario's default."""

    scenario: str = "steady"
    backend: str | None = None  # a backend URL; None: FileStore in the run directory
    faults: str = "wrapper"  # or "proxy"
    quick: bool = False
    sessions: int | None = None
    entries_per_s: float | None = None
    entry_bytes: int = 1000
    duration: float | None = None
    subagent_share: float = 0.2
    uuidless_share: float = 0.3
    turn_seconds: float = 1.0
    seed: int = 1
    outage_start: float | None = None
    outage_seconds: float | None = None
    flap_every: float | None = None
    latency: float | None = None
    lost_reply_rate: float | None = None
    crash_at: float | None = None
    restart_delay: float | None = None
    tuning: dict[str, Any] = field(default_factory=dict)
    systems: tuple[str, ...] = SYSTEMS
    sample_interval: float | None = None
    drain_timeout: float = 120.0
    directory: Path | None = None
    keep: bool = False

    @property
    def preset(self) -> Preset:
        try:
            return SCENARIOS[self.scenario]
        except KeyError:
            raise ScenarioError(
                f"unknown scenario {self.scenario!r}; choose from {', '.join(SCENARIOS)}"
            ) from None

    def _pick(self, given: Any, pair: tuple[Any, Any]) -> Any:
        return pair[1 if self.quick else 0] if given is None else given

    def workload(self, tag: int = 0) -> Workload:
        p = self.preset
        return Workload(
            sessions=int(self._pick(self.sessions, WORKLOAD_DEFAULTS["sessions"])),
            entries_per_s=float(self._pick(self.entries_per_s, WORKLOAD_DEFAULTS["entries_per_s"])),
            entry_bytes=self.entry_bytes,
            duration=float(self._pick(self.duration, p.duration)),
            subagent_share=self.subagent_share,
            uuidless_share=self.uuidless_share,
            turn_seconds=self.turn_seconds,
            seed=self.seed,
            tag=tag,
        )

    def windows(self) -> list[dict[str, Any]]:
        """The fault timetable: ``{"kind", "start", "end", "value"}`` per window."""
        p = self.preset
        duration = self.workload().duration
        start = float(self._pick(self.outage_start, p.outage_start))
        length = float(self._pick(self.outage_seconds, p.outage_seconds))
        windows: list[dict[str, Any]] = []

        def add(kind: str, begin: float, end: float, value: float = 1.0) -> None:
            end = min(end, duration)
            if end > begin:
                windows.append(
                    {"kind": kind, "start": round(begin, 4), "end": round(end, 4), "value": value}
                )

        if self.scenario == "flapping":
            every = float(self._pick(self.flap_every, p.flap_every))
            if every <= length:
                raise ScenarioError("--flap-every must be longer than --outage-seconds")
            begin = start
            while begin + length <= duration:
                add("down", begin, begin + length)
                begin += every
        elif self.scenario in ("long-outage", "crash-restart"):
            add("down", start, start + length)
        elif self.scenario == "slow-backend":
            add("slow", start, start + length, float(self._pick(self.latency, p.latency)))
        elif self.scenario == "lost-replies":
            rate = float(self._pick(self.lost_reply_rate, p.lost_reply_rate))
            add("lost_replies", start, start + length, rate)
        return windows

    def crash(self) -> tuple[float, float] | None:
        """(SIGKILL at, restart after) for crash-restart, else None."""
        p = self.preset
        if p.crash_at is None:
            return None
        return (
            float(self._pick(self.crash_at, p.crash_at)),
            float(self._pick(self.restart_delay, p.restart_delay)),
        )

    def step(self) -> float:
        if self.sample_interval is not None:
            return self.sample_interval
        return max(0.1, min(0.5, self.workload().duration / 200))

    def check(self) -> None:
        self.preset  # noqa: B018 - raises for an unknown scenario
        try:
            self.workload().check()
            Tuning(**self.tuning)
        except (ValueError, TypeError) as exc:
            raise ScenarioError(str(exc)) from None
        if self.faults not in ("wrapper", "proxy"):
            raise ScenarioError("--faults is 'wrapper' or 'proxy'")
        if not self.systems or any(s not in SYSTEMS for s in self.systems):
            raise ScenarioError(f"--systems takes a comma-separated subset of {SYSTEMS}")
        crash = self.crash()
        duration = self.workload().duration
        if crash is not None and not 0 < crash[0] < duration:
            raise ScenarioError("--crash-at must fall inside the run")
        if self.step() <= 0 or self.drain_timeout <= 0:
            raise ScenarioError("--sample-interval and --drain-timeout must be positive")
        for w in self.windows():
            if w["kind"] == "lost_replies" and not 0 <= w["value"] <= 1:
                raise ScenarioError("--lost-reply-rate must be between 0 and 1")
            if w["kind"] == "slow" and w["value"] < 0:
                raise ScenarioError("--latency must not be negative")

    def to_json(self) -> dict[str, Any]:
        """Every setting the run used, resolved (the backend URL without its password)."""
        workload = self.workload().to_json()
        workload.pop("tag")
        defaults = {
            f.name: getattr(Tuning(), f.name)
            for f in dataclasses.fields(Tuning)
            if f.name not in ("backend_names", "is_permanent")
        }
        crash = self.crash()
        return {
            "scenario": self.scenario,
            "description": self.preset.description,
            "backend": redact(self.backend) if self.backend else "file:// (temporary directory)",
            "faults": self.faults,
            "quick": self.quick,
            "workload": workload,
            "windows": self.windows(),
            "crash_at": crash[0] if crash else None,
            "restart_delay": crash[1] if crash else None,
            "tuning": {**defaults, **self.tuning},
            "tuning_overrides": dict(self.tuning),
            "systems": list(self.systems),
            "sample_interval": self.step(),
            "drain_timeout": self.drain_timeout,
            "sdk_batcher": {
                "max_attempts": sdk_batcher.MIRROR_APPEND_MAX_ATTEMPTS,
                "backoff_s": list(sdk_batcher.MIRROR_APPEND_BACKOFF_S),
                "send_timeout_s": sdk_batcher.SEND_TIMEOUT_SECONDS,
                "max_pending_entries": sdk_batcher.MAX_PENDING_ENTRIES,
                "max_pending_bytes": sdk_batcher.MAX_PENDING_BYTES,
            },
        }


def parse_tuning(items: Sequence[str]) -> dict[str, Any]:
    """``["max_batch_entries=100", ...]`` as Tuning keywords, each parsed by its field's type."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ScenarioError(f"{item!r}: expected KNOB=VALUE")
        out[name.strip()] = parse_knob(name.strip(), raw.strip())
    return out


def tunable_fields() -> dict[str, dataclasses.Field[Any]]:
    return {
        f.name: f
        for f in dataclasses.fields(Tuning)
        if f.name not in ("backend_names", "is_permanent")
    }


def parse_knob(name: str, raw: str) -> Any:
    """One value of a ``Tuning`` field, parsed by the type of its default."""
    fields = tunable_fields()
    if name not in fields:
        raise ScenarioError(f"unknown tuning knob {name!r}; knobs: {', '.join(fields)}")
    f = fields[name]
    default = f.default
    if raw.lower() == "none" and "None" in str(f.type):
        return None
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(float(raw)) if raw.replace(".", "", 1).isdigit() else int(raw, 0)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ScenarioError(f"{name}={raw}: not a number") from None
    return raw


def redact(url: str) -> str:
    """``url`` without a password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# -- the run's backend namespace ------------------------------------------------------


@dataclass
class Namespace:
    """Where a run's transcripts go, and how to remove them afterwards."""

    kind: str  # file, redis, postgres, s3
    url: str  # the namespaced URL (the real server, never the proxy)
    target: tuple[str, int] | None = None  # host and port a proxy forwards to

    @classmethod
    def make(cls, url: str | None, tag: int, run_dir: Path) -> Namespace:
        name = f"walmirror-bench-{tag:08x}"
        if url is None:
            return cls("file", f"file://{run_dir / 'backend'}")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        query = parse_qsl(parts.query, keep_blank_values=True)
        if scheme == "file":
            if parts.query:
                raise ScenarioError("file:// backend URLs take no query")
            return cls("file", urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}")))
        if scheme in ("redis", "rediss", "unix"):
            given = dict(query).get("prefix")
            prefix = f"{given}-bench-{tag:08x}" if given else name
            query = [(k, v) for k, v in query if k != "prefix"] + [("prefix", prefix)]
            port = parts.port or 6379
            target = (parts.hostname, port) if scheme != "unix" and parts.hostname else None
            return cls("redis", urlunsplit(parts._replace(query=urlencode(query))), target)
        if scheme in ("postgresql", "postgres"):
            table = dict(query).get("table", "walmirror")
            query = [(k, v) for k, v in query if k != "table"]
            query.append(("table", f"{table}_bench_{tag:08x}"))  # dropped afterwards
            target = (parts.hostname or "127.0.0.1", parts.port or 5432)
            return cls("postgres", urlunsplit(parts._replace(query=urlencode(query))), target)
        if scheme == "s3":
            path = f"{parts.path.rstrip('/')}/{name}"
            endpoint = dict(query).get("endpoint_url")
            target = None
            if endpoint:
                e = urlsplit(endpoint)
                if e.hostname:
                    target = (e.hostname, e.port or (443 if e.scheme == "https" else 80))
            return cls("s3", urlunsplit(parts._replace(path=path)), target)
        raise ScenarioError(f"backend scheme {scheme!r} is not supported by the bench")

    def through(self, host: str, port: int) -> str:
        """The namespaced URL with its server replaced by a proxy at ``host:port``."""
        parts = urlsplit(self.url)
        if self.kind == "s3":
            query = []
            for k, v in parse_qsl(parts.query, keep_blank_values=True):
                if k == "endpoint_url":
                    e = urlsplit(v)
                    v = urlunsplit(e._replace(netloc=f"{host}:{port}"))
                query.append((k, v))
            return urlunsplit(parts._replace(query=urlencode(query)))
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@{host}:{port}" if user else f"{host}:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def path(self) -> Path:
        return Path(unquote(urlsplit(self.url).path))

    async def prepare(self) -> None:
        if self.kind == "s3":
            async with self._s3_client() as (client, bucket, _):
                try:
                    await client.head_bucket(Bucket=bucket)
                except Exception:
                    await client.create_bucket(Bucket=bucket)

    async def cleanup(self) -> None:
        """Remove everything the run wrote under its namespace."""
        if self.kind == "file":
            await asyncio.to_thread(shutil.rmtree, self.path(), True)
        elif self.kind == "redis":
            from walmirror.backends.redis import RedisStore

            store = RedisStore.from_url(self.url)
            try:
                names = [n async for n in store.client.scan_iter(match=f"{store.prefix}*")]
                for i in range(0, len(names), 1000):
                    await store.client.delete(*names[i : i + 1000])
            finally:
                await store.aclose()
        elif self.kind == "postgres":
            from walmirror.backends.postgres import PostgresStore

            pg = PostgresStore.from_url(self.url)
            try:
                await pg.drop_schema()
            finally:
                await pg.close()
        elif self.kind == "s3":
            async with self._s3_client() as (client, bucket, prefix):
                paginator = client.get_paginator("list_objects_v2")
                async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                    objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                    if objects:
                        await client.delete_objects(Bucket=bucket, Delete={"Objects": objects})

    @contextlib.asynccontextmanager
    async def _s3_client(self) -> Any:
        from aiobotocore.session import get_session  # type: ignore[import-untyped]

        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        options: dict[str, Any] = {}
        if query.get("endpoint_url"):
            options["endpoint_url"] = query["endpoint_url"]
        if query.get("region"):
            options["region_name"] = query["region"]
        async with get_session().create_client("s3", **options) as client:
            yield client, parts.netloc, unquote(parts.path).strip("/") + "/"


async def load_system(
    namespace: Namespace, workload: Workload, project_key: str
) -> dict[int, list[int | None]]:
    """What the backend holds for each of a system's transcripts, as entry positions."""
    from walmirror.backends import from_url

    store = from_url(namespace.url)
    try:
        out: dict[int, list[int | None]] = {}
        for k in range(workload.keys):
            entries = await store.load(key_for(workload, project_key, k)) or []
            positions: list[int | None] = []
            for entry in entries:
                parsed = parse_id(workload.tag, entry)
                positions.append(parsed[1] if parsed and parsed[0] == k else None)
            out[k] = positions
        return out
    finally:
        close = getattr(store, "aclose", None) or getattr(store, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                await close()


# -- worker processes -----------------------------------------------------------------


class WorkerProcess:
    """One ``scenario_worker`` process: start it, tell it to go, read its lines."""

    def __init__(self, system: str, generation: int, config: dict[str, Any], run_dir: Path):
        self.system = system
        self.generation = generation
        self.config = config
        self.config_path = run_dir / f"worker-{system}-{generation}.json"
        self.stderr_path = run_dir / f"worker-{system}-{generation}.stderr"
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.done: dict[str, Any] | None = None
        self.killed = False

    async def start(self, timeout: float = 120.0) -> None:
        await asyncio.to_thread(self.config_path.write_text, json.dumps(self.config))
        err = os.open(self.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "walmirror.bench.scenario_worker",
                str(self.config_path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                limit=1 << 20,
            )
        finally:
            os.close(err)
        async with asyncio.timeout(timeout):
            while True:
                message = await self._next()
                if message is None:
                    raise ScenarioError(f"{self.system} worker exited early: {self.stderr()}")
                if "ready" in message:
                    self.ready = message["ready"]
                    return

    async def go(self, start: float, resume_at: float = 0.0) -> None:
        """Start writing: ``start`` is the run's t=0 (monotonic clock); frames due
        before ``resume_at`` (run seconds) are skipped: this process did not exist."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"go {start!r} {resume_at!r}\n".encode())
        await self.proc.stdin.drain()

    async def _next(self) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            return None
        try:
            message: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            return {}
        return message

    async def pump(self, progress: Progress | None) -> None:
        """Read progress lines until the worker ends."""
        assert self.proc is not None
        while (message := await self._next()) is not None:
            if "p" in message and progress is not None:
                progress(self.system, message["p"])
            elif "done" in message:
                self.done = message["done"]
        await self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.killed = True
            self.proc.kill()  # SIGKILL

    def stderr(self) -> str:
        try:
            text = self.stderr_path.read_text()
        except OSError:
            return ""
        return text.strip()[-2000:]


# -- the run --------------------------------------------------------------------------


def project_key(tag: int, system: str) -> str:
    return f"bench-{tag:08x}-{system}"


async def run_scenario(settings: Settings, progress: Progress | None = None) -> dict[str, Any]:
    """Run one scenario; every figure and setting, as ``--json`` writes them."""
    settings.check()
    tag = secrets.randbits(32)
    keep_dir = settings.directory is not None
    if settings.directory is not None:
        settings.directory.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="walmirror-scenario-", dir=settings.directory))
    namespace = Namespace.make(settings.backend, tag, run_dir)
    if settings.faults == "proxy" and namespace.target is None:
        raise ScenarioError(
            "--faults proxy needs a network backend (redis://, postgresql://, or s3:// with "
            "endpoint_url); use --faults wrapper for file://"
        )
    started_wall = time.time()
    try:
        await namespace.prepare()
        result = await _run(settings, tag, run_dir, namespace, progress)
    finally:
        if not settings.keep:
            with contextlib.suppress(Exception):
                await namespace.cleanup()
        if not keep_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    result["wall_seconds"] = round(time.time() - started_wall, 2)
    result["started_at"] = datetime.fromtimestamp(started_wall, UTC).isoformat(timespec="seconds")
    result["run_directory"] = str(run_dir) if keep_dir else None
    result["backend_kept"] = namespace.url if settings.keep else None
    return result


async def _run(
    settings: Settings,
    tag: int,
    run_dir: Path,
    namespace: Namespace,
    progress: Progress | None,
) -> dict[str, Any]:
    workload = settings.workload(tag)
    windows = settings.windows()
    crash = settings.crash()
    proxies: dict[str, Any] = {}
    if settings.faults == "proxy":
        from walmirror.faultproxy import FaultProxy

        assert namespace.target is not None
        for system in settings.systems:
            proxies[system] = await FaultProxy.start(*namespace.target)

    def config(system: str, generation: int) -> dict[str, Any]:
        proxy = proxies.get(system)
        return {
            "system": system,
            "generation": generation,
            "workload": workload.to_json(),
            "project_key": project_key(tag, system),
            "projects_dir": str(run_dir / f"projects-{system}"),
            "backend_url": namespace.through(proxy.host, proxy.port) if proxy else namespace.url,
            "queue": str(run_dir / f"queue-{system}.db") if system == "walmirror" else None,
            "tuning": settings.tuning,
            "windows": (
                [] if proxy else [[w["kind"], w["start"], w["end"], w["value"]] for w in windows]
            ),
            "events": str(run_dir / f"events-{system}-{generation}.jsonl"),
            "durable_acks": crash is not None,
            "sample_interval": settings.step(),
            "drain_timeout": settings.drain_timeout,
            "fault_seed": settings.seed,
        }

    workers: dict[str, list[WorkerProcess]] = {s: [] for s in settings.systems}
    generations: dict[str, list[Generation]] = {s: [] for s in settings.systems}
    pumps: list[asyncio.Task[None]] = []
    crash_window: dict[str, Any] | None = None
    try:
        first = [WorkerProcess(s, 0, config(s, 0), run_dir) for s in settings.systems]
        await asyncio.gather(*(w.start() for w in first))
        start = time.monotonic() + 0.2
        for w in first:
            workers[w.system].append(w)
            generations[w.system].append(
                Generation(
                    Path(w.config["events"]),
                    started_at=0.0,
                    ready_rss_kb=int(w.ready.get("rss_kb", 0)),
                )
            )
            await w.go(start)
            pumps.append(asyncio.create_task(w.pump(progress)))
        chaos = asyncio.create_task(_proxy_faults(proxies, windows, start, settings.seed))
        if crash is not None:
            crash_at, delay = crash
            await asyncio.sleep(max(0.0, start + crash_at - time.monotonic()))
            killed_at = time.monotonic() - start
            for s in settings.systems:
                workers[s][0].kill()
                generations[s][0].killed_at = round(killed_at, 4)
            await asyncio.gather(*pumps, return_exceptions=True)
            pumps.clear()
            await asyncio.sleep(delay)
            second = [WorkerProcess(s, 1, config(s, 1), run_dir) for s in settings.systems]
            await asyncio.gather(*(w.start() for w in second))
            restarted_at = time.monotonic() - start
            for w in second:
                workers[w.system].append(w)
                generations[w.system].append(
                    Generation(
                        Path(w.config["events"]),
                        started_at=round(restarted_at, 4),
                        ready_rss_kb=int(w.ready.get("rss_kb", 0)),
                    )
                )
                await w.go(start, resume_at=restarted_at)
                pumps.append(asyncio.create_task(w.pump(progress)))
            crash_window = {
                "kind": "crash",
                "start": round(killed_at, 4),
                "end": round(restarted_at, 4),
                "value": 1.0,
            }
        deadline = workload.duration + settings.drain_timeout + 60.0
        try:
            async with asyncio.timeout(max(1.0, start + deadline - time.monotonic())):
                await asyncio.gather(*pumps)
        except TimeoutError:
            for procs in workers.values():
                procs[-1].kill()
            await asyncio.gather(*pumps, return_exceptions=True)
            raise ScenarioError("a worker did not finish in time") from None
        chaos.cancel()
        await asyncio.gather(chaos, return_exceptions=True)
    finally:
        for t in pumps:
            t.cancel()
        for procs in workers.values():
            for w in procs:
                w.kill()
        for proxy in proxies.values():
            await proxy.close()
    failed = [w for procs in workers.values() for w in procs if not w.killed and w.done is None]
    if failed:
        raise ScenarioError(f"the {failed[0].system} worker failed: {failed[0].stderr()}")
    all_windows = windows + ([crash_window] if crash_window else [])
    systems: dict[str, Any] = {}
    for s in settings.systems:
        stored = await load_system(namespace, workload, project_key(tag, s))
        systems[s] = analyze(
            generations=generations[s], stored=stored, windows=all_windows, step=settings.step()
        )
    if proxies:
        for s, proxy in proxies.items():
            systems[s]["proxy"] = {
                "connections": proxy.connections,
                "resets": proxy.resets,
                "bytes_up": proxy.bytes_up,
                "bytes_down": proxy.bytes_down,
            }
    result: dict[str, Any] = {
        "scenario": settings.scenario,
        "settings": settings.to_json(),
        "machine": machine(),
        "windows": all_windows,
        "systems": systems,
    }
    result["settings"]["workload"]["tag"] = f"{tag:08x}"
    result["verdict"] = verdict(systems)
    return result


async def _proxy_faults(
    proxies: dict[str, Any], windows: list[dict[str, Any]], start: float, seed: int
) -> None:
    """Switch the fault proxies on the timetable (``faults="proxy"``)."""
    if not proxies:
        return
    rng = random.Random(seed)
    slice_s = 0.2  # lost replies: each slice of the window drops replies with the rate
    edges: list[tuple[float, str, float]] = []
    for w in windows:
        if w["kind"] == "lost_replies":
            t = w["start"]
            while t < w["end"]:
                drop = rng.random() < w["value"]
                edges.append((t, "drop_replies" if drop else "pass", 0.0))
                t += slice_s
        else:
            edges.append((w["start"], "reset" if w["kind"] == "down" else "delay", w["value"]))
        edges.append((w["end"], "pass", 0.0))
    edges.sort(key=lambda e: e[0])
    for at, mode, value in edges:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        for proxy in proxies.values():
            if mode == "delay":
                proxy.set_mode("delay", seconds=value)
            else:
                proxy.set_mode(mode)


def machine() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "walmirror": version("walmirror"),
        "claude_agent_sdk": version("claude-agent-sdk"),
    }


def exactly_once(figures: dict[str, Any]) -> bool:
    return bool(
        figures["lost"] == 0
        and figures["lost_acknowledged"] == 0
        and figures["duplicated"] == 0
        and figures["out_of_order"] == 0
        and figures["unknown_stored"] == 0
    )


def verdict(systems: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, figures in systems.items():
        out[name] = {
            "exactly_once": exactly_once(figures),
            "text": (
                f"{figures['lost']} lost, {figures['duplicated']} duplicated, "
                f"{figures['out_of_order']} out of order"
            ),
        }
    return out
