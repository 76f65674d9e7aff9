"""One system of a ``walmirror bench --scenario`` run, in a process of its own.

``python -m walmirror.bench.scenario_worker CONFIG.json`` runs the simulated
sessions (``scenario_workload``) through the SDK's own
``TranscriptMirrorBatcher``, one batcher per session, into either

* ``sdk``: the backend itself (what users have without walmirror), or
* ``walmirror``: ``DurableSessionStore(backend, queue file)``,

where "the backend" is ``FaultyStore(from_url(url))``: the wrapper injects the
scenario's faults on its timetable (``windows``) and counts every request;
with ``--faults proxy`` the parent switches a TCP fault proxy instead and the
wrapper only counts.

Each system has a process of its own so that its peak RSS is its own and a
SIGKILL (the crash-restart scenario) hits one mirroring process as a crash
would. Talking to the parent: the worker prints ``{"ready": ...}`` once set
up, waits for ``go <monotonic start>`` on stdin (one clock for every process
of the run), prints a ``{"p": ...}`` progress line per sample and
``{"done": ...}`` at the end.

Everything it measures goes to an event log (JSON arrays, one per line,
``O_APPEND``, written before the event's effect is visible to anyone), read
by ``scenario_analysis``; times are seconds after the run's start:

``["E", t, key, first, count]``      the CLI emitted a frame (entries sent)
``["A", t, seconds, [[key, first, count]...]]``  an ``append`` returned (acknowledged;
                                     fsynced when ``durable_acks``)
``["F", t, seconds, [[key, first, count]...]]``  an ``append`` raised
``["D", t, [[key, first, count]...]]``  the batcher gave up on a batch (``on_error``,
                                     what the SDK turns into a ``MirrorErrorMessage``)
``["L", t, [[key, first, count]...]]``  a backend write returned: these entries landed
``["W", t, seconds]``                the receive loop waited this long on ``flush()``
``["S", t, {...}]``                  a sample: queue depth, lag, queue file bytes, RSS,
                                     backend requests, injected faults
``["X", t, {...}]``                  the end: drained or not, final figures
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from claude_agent_sdk._internal.transcript_mirror_batcher import TranscriptMirrorBatcher
from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry

from walmirror import telemetry
from walmirror.bench.scenario_workload import (
    Frame,
    Workload,
    file_path,
    key_for,
    make_entries,
    parse_id,
    schedule,
)

__all__ = ["EventLog", "id_ranges", "main"]

Span = list[int]  # [key, first, count]


def id_ranges(tag: int, entries: Sequence[Any]) -> list[Span]:
    """The entries' ids as runs of consecutive positions per transcript."""
    spans: list[Span] = []
    for entry in entries:
        parsed = parse_id(tag, entry)
        if parsed is None:
            continue
        key, n = parsed
        if spans and spans[-1][0] == key and spans[-1][1] + spans[-1][2] == n:
            spans[-1][2] += 1
        else:
            spans.append([key, n, 1])
    return spans


_ID_FIELDS = (b'"uuid":"', b'"messageId":"')


def ids_of(encoded: Sequence[bytes]) -> list[dict[str, str]]:
    """What ``parse_id`` reads of each encoded entry (its ``uuid``, else its
    ``messageId``), found in the bytes: parsing every delivered batch to log it
    would cost walmirror's process more than walmirror's own delivery does. The
    workload writes either field before any nested one, and no text holds them."""
    found: list[dict[str, str]] = []
    for body in encoded:
        for field in _ID_FIELDS:
            at = body.find(field)
            if at >= 0:
                start = at + len(field)
                found.append({"uuid": body[start : start + 36].decode(errors="replace")})
                break
        else:
            found.append({})
    return found


class EventLog:
    """The worker's event log: one JSON array per line.

    ``durable`` (the crash scenario): each record is appended with one ``write``
    before its effect is visible, and ``sync`` records are fsynced, so a SIGKILL
    loses nothing logged. Otherwise records are buffered and written ~64 KiB at a
    time (and at every ``sync`` record, the last of which ends the run): a
    ``write`` per record cost the worker's event loop more than walmirror did."""

    _BUFFER_BYTES = 64 << 10

    def __init__(self, path: str, *, durable: bool) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.durable = durable
        self.start = time.monotonic()
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def now(self) -> float:
        return time.monotonic() - self.start

    def write(self, record: list[Any], *, sync: bool = False) -> None:
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if self.durable:
            os.write(self.fd, line)
            if sync:
                os.fsync(self.fd)
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        if sync or self._pending_bytes >= self._BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            os.write(self.fd, b"".join(self._pending))
            self._pending.clear()
            self._pending_bytes = 0

    def close(self) -> None:
        self.flush()
        os.close(self.fd)


def record_landings(backend: SessionStore, log: EventLog, tag: int) -> None:
    """Log an ``L`` event whenever one of the backend's writes returns.

    Patched on the instance, so the set of methods the backend offers (which the
    SDK, ``FaultyStore`` and walmirror probe on its class) stays the same.
    """
    plain = backend.append

    async def append(key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        await plain(key, entries)
        log.write(["L", round(log.now(), 4), id_ranges(tag, entries)])

    setattr(backend, "append", append)  # noqa: B010 - an instance attribute, on purpose
    batch_call: Callable[..., Awaitable[Any]] | None = getattr(backend, "append_batch", None)
    if callable(batch_call):
        original = batch_call

        async def append_batch(key: SessionKey, batch: Any) -> Any:
            receipt = await original(key, batch)
            log.write(["L", round(log.now(), 4), id_ranges(tag, ids_of(batch.encoded))])
            return receipt

        setattr(backend, "append_batch", append_batch)  # noqa: B010


class Observer(SessionStore):
    """What the batcher calls: times every ``append`` and logs what it acknowledged."""

    def __init__(self, inner: SessionStore, log: EventLog, tag: int) -> None:
        self.inner = inner
        self.log = log
        self.tag = tag
        self.last_failed: dict[tuple[str, str, str], list[Span]] = {}
        self.sent = self.acked = 0

    # The protocol's own defaults (the batcher calls append only), named so that
    # type checkers see a concrete class.
    list_sessions = SessionStore.list_sessions
    list_session_summaries = SessionStore.list_session_summaries
    delete = SessionStore.delete
    list_subkeys = SessionStore.list_subkeys

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        spans = id_ranges(self.tag, entries)
        started = time.perf_counter()
        try:
            await self.inner.append(key, entries)
        except BaseException:
            took = time.perf_counter() - started
            self.last_failed[_key_id(key)] = spans
            self.log.write(["F", round(self.log.now(), 4), round(took, 6), spans])
            raise
        took = time.perf_counter() - started
        self.acked += len(entries)
        self.log.write(["A", round(self.log.now(), 4), round(took, 6), spans], sync=True)

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        return await self.inner.load(key)


def _key_id(key: SessionKey | None) -> tuple[str, str, str]:
    if key is None:
        return ("", "", "")
    return (key["project_key"], key["session_id"], key.get("subpath") or "")


def _rss_kb() -> tuple[int, int]:
    """(current, peak) resident set size in KiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        peak //= 1024  # bytes there, KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        current = peak
    return current, peak


def _queue_bytes(queue: str | None) -> int:
    if not queue:
        return 0
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.path.getsize(queue + suffix)
        except OSError:
            pass
    return total


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.system: str = config["system"]
        self.w = Workload(**config["workload"])
        self.log = EventLog(config["events"], durable=bool(config.get("durable_acks")))
        self.project_key: str = config["project_key"]
        self.projects_dir: str = config["projects_dir"]
        self.sent = 0
        self.landed = 0
        self.errors = 0
        self.finished = False
        from walmirror.backends import from_url
        from walmirror.faults import FaultyStore

        self.backend = from_url(config["backend_url"])
        record_landings(self.backend, self.log, self.w.tag)
        self.faulty = FaultyStore(self.backend, seed=config.get("fault_seed"))
        self.store: Any = None  # the DurableSessionStore, for walmirror
        self.queue_open = False
        self.observer: Observer | None = None
        self.resume_at = 0.0

    # -- the run ---------------------------------------------------------------------

    async def run(self, start: float, resume_at: float) -> dict[str, Any]:
        self.log.start = start
        self.resume_at = resume_at
        target: SessionStore = self.faulty
        if self.system == "walmirror":
            from walmirror import DurableSessionStore

            self.store = DurableSessionStore(
                self.faulty,
                self.config["queue"],
                backend_names=("bench",),
                **self.config.get("tuning", {}),
            )
            await self.store.start()
            self.queue_open = True
            target = self.store
        self.observer = Observer(target, self.log, self.w.tag)
        sampler = asyncio.create_task(self._sample_loop())
        faults = asyncio.create_task(self._apply_faults())
        try:
            await asyncio.gather(*(self._session(s) for s in range(self.w.sessions)))
            faults.cancel()
            self.faulty.reset_faults()  # the run is over: the backend is healthy again
            final = await self._finish()
        finally:
            self.finished = True
            faults.cancel()
            await asyncio.gather(sampler, faults, return_exceptions=True)
        await self._sample()
        final["calls"] = dict(self.faulty.calls)
        final["injected"] = dict(self.faulty.injected)
        final["rss_kb"], final["rss_peak_kb"] = _rss_kb()
        self.log.write(["X", round(self.log.now(), 4), final], sync=True)
        await _close(self.backend)
        return final

    async def _finish(self) -> dict[str, Any]:
        if self.store is None:
            return {"drained": True, "drain_s": 0.0}
        from walmirror import FlushBlockedError, FlushTimeoutError

        started = time.monotonic()
        drained = True
        try:
            await self.store.flush(timeout=float(self.config.get("drain_timeout", 120.0)))
        except (FlushTimeoutError, FlushBlockedError):
            drained = False
        drain_s = time.monotonic() - started
        await self._sample()
        self.queue_open = False
        report = await self.store.close(timeout=5.0 if drained else 0.0)
        delivered = sum(int(getattr(f, "delivered_total", 0)) for f in self.store.flushers)
        return {
            "drained": drained and bool(report.drained),
            "drain_s": round(drain_s, 4),
            "delivered": delivered,
            "pending_after": sum(report.pending_entries.values()),
        }

    async def _session(self, session: int) -> None:
        """One CLI writing frames on its clock, and the SDK's receive loop feeding a batcher."""
        assert self.observer is not None
        observer = self.observer
        pipe: asyncio.Queue[Frame | str | None] = asyncio.Queue()

        async def on_error(key: SessionKey | None, message: str) -> None:
            self.errors += 1
            spans = observer.last_failed.pop(_key_id(key), [])
            self.log.write(["D", round(self.log.now(), 4), spans])

        batcher = TranscriptMirrorBatcher(
            store=observer, projects_dir=self.projects_dir, on_error=on_error
        )
        paths = {
            k: file_path(self.w, self.projects_dir, self.project_key, k)
            for k in (2 * session, 2 * session + 1)
        }

        async def cli() -> None:
            for item in schedule(self.w, session):
                if item.t < self.resume_at:
                    continue  # before this process existed (a restart): never written
                delay = item.t - self.log.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                if isinstance(item, Frame):
                    self.log.write(
                        ["E", round(self.log.now(), 4), item.key, item.first, item.count]
                    )
                    self.sent += item.count
                    pipe.put_nowait(item)
                else:
                    pipe.put_nowait("turn")
            pipe.put_nowait(None)  # the CLI exits

        async def receive_loop() -> None:
            while (item := await pipe.get()) is not None:
                if isinstance(item, Frame):
                    batcher.enqueue(paths[item.key], make_entries(self.w, item))
                else:
                    started = time.perf_counter()
                    await batcher.flush()
                    waited = time.perf_counter() - started
                    self.log.write(["W", round(self.log.now(), 4), round(waited, 6)])
            await batcher.close()  # the final flush at teardown

        await asyncio.gather(cli(), receive_loop())

    async def _apply_faults(self) -> None:
        """Switch the wrapper's faults on the scenario's timetable."""
        edges: list[tuple[float, int, str, float]] = []
        for kind, begin, end, value in self.config.get("windows", []):
            edges.append((float(begin), 1, str(kind), float(value)))
            edges.append((float(end), 0, str(kind), float(value)))
        edges.sort(key=lambda e: (e[0], e[1]))
        f = self.faulty
        for at, on, kind, value in edges:
            delay = at - self.log.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if kind == "down":
                f.down() if on else f.up()
            elif kind == "slow":
                f.latency, f.jitter = (value, value / 4) if on else (0.0, 0.0)
            elif kind == "lost_replies":
                f.lost_reply_rate = value if on else 0.0
            elif kind == "errors":
                f.error_rate = value if on else 0.0

    async def _sample_loop(self) -> None:
        interval = float(self.config.get("sample_interval", 0.25))
        while not self.finished:
            await self._sample()
            await asyncio.sleep(interval)

    async def _sample(self) -> None:
        pending, lag, parked = 0, 0.0, 0
        if self.store is not None and self.queue_open:
            try:
                pending, lag, parked = await self.store.queue.depth(self.store.backend_names[0])
            except Exception:  # the queue closing under us: the last figures stand
                pending = -1
        rss, peak = _rss_kb()
        calls = sum(self.faulty.calls.values())
        sample: dict[str, Any] = {
            "queue_pending": pending,
            "parked": parked,
            "queue_bytes": _queue_bytes(self.config.get("queue")),
            "rss_kb": rss,
            "rss_peak_kb": peak,
            "requests": calls,
        }
        if self.store is not None:  # the queue's lag, as status() reports it
            sample["queue_lag_s"] = round(lag, 4)
        t = round(self.log.now(), 4)
        self.log.write(["S", t, sample])
        acked = self.observer.acked if self.observer else 0
        progress = {"t": t, "sent": self.sent, "acked": acked, "errors": self.errors, **sample}
        print(json.dumps({"p": progress}), flush=True)


async def _close(backend: SessionStore) -> None:
    close = getattr(backend, "aclose", None) or getattr(backend, "close", None)
    if callable(close):
        try:
            result = close()
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            pass


async def _main(config: dict[str, Any]) -> None:
    worker = Worker(config)
    for k in range(worker.w.keys):  # the SDK must map every path back to its key
        path = file_path(worker.w, worker.projects_dir, worker.project_key, k)
        from claude_agent_sdk._internal.session_store import file_path_to_session_key

        expected = key_for(worker.w, worker.project_key, k)
        if file_path_to_session_key(path, worker.projects_dir) != expected:
            raise RuntimeError(f"the SDK maps transcript {k} to another key")
    _, peak = _rss_kb()
    print(json.dumps({"ready": {"pid": os.getpid(), "rss_kb": peak}}), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    words = line.split()
    if not words or words[0] != "go":
        return  # the parent went away
    resume_at = float(words[2]) if len(words) > 2 else 0.0
    try:
        final = await worker.run(float(words[1]), resume_at)
    finally:
        worker.log.close()  # what is still buffered goes to the file
    print(json.dumps({"done": final}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config = json.loads(Path(args[0]).read_text())
    # The batcher logs every dropped batch and walmirror every breaker change: the
    # event log counts them; stderr goes to a file the parent shows only on failure.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    logging.getLogger("claude_agent_sdk").setLevel(logging.CRITICAL)
    logging.getLogger("walmirror").setLevel(logging.CRITICAL)
    otel = os.environ.get("WALMIRROR_BENCH_OTEL")  # walmirror bench --otel KIND
    stop_otel = telemetry.configure_exporters(otel) if otel else None
    try:
        asyncio.run(_main(config))
    finally:
        if stop_otel is not None:
            stop_otel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
