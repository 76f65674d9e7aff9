"""contract 9: spans, span events and metrics are there, and carry no transcript content.

The global OpenTelemetry providers can be set once per process: they are set here,
at import, and ``tests/test_telemetry_leaks.py`` imports ``SPANS`` and ``METRICS``
from this module rather than setting its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk.types import SessionKey
from memory_store import MemoryStore
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from walmirror import DurableSessionStore, telemetry
from walmirror.faults import FaultyStore
from walmirror.telemetry import configure_exporters, key_digest

# Global providers can be set once per process; walmirror's proxies pick them up.
SPANS = InMemorySpanExporter()
_tracer_provider = TracerProvider()
_tracer_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_tracer_provider)
METRICS = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[METRICS]))

SECRET = "TOP-SECRET-PROMPT-TEXT"
KEY: Any = {"project_key": "proj", "session_id": "sess"}


def metric_points() -> dict[str, list[Any]]:
    data = METRICS.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


def metric_total(name: str, **attributes: Any) -> float:
    """Sum of a counter's points (a histogram's: of their counts) whose attributes
    include ``attributes``. Cumulative: tests filter on a backend name of their own."""
    total = 0.0
    for point in metric_points().get(name, []):
        if all(point.attributes.get(k) == v for k, v in attributes.items()):
            total += point.count if hasattr(point, "count") else point.value
    return total


def metric_units() -> dict[str, str | None]:
    data = METRICS.get_metrics_data()
    return {
        metric.name: metric.unit
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


async def eventually(check: Callable[[], Any], guard: float = 20.0) -> None:
    """Wait until ``check()`` (a value or an awaitable) is truthy; ``guard`` only stops
    a hang (no timing asserted)."""
    deadline = time.monotonic() + guard
    while True:
        result = check()
        if await result if asyncio.iscoroutine(result) else result:
            return
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def spans_of(backend: str, name: str) -> list[ReadableSpan]:
    return [
        s
        for s in SPANS.get_finished_spans()
        if s.name == name and attrs(s).get("walmirror.backend") == backend
    ]


def events_of(spans: list[ReadableSpan], name: str) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for s in spans for e in s.events if e.name == name]


def children(parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        s
        for s in SPANS.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def transitions(spans: list[ReadableSpan]) -> set[tuple[str, str]]:
    return {
        (e["walmirror.breaker.from"], e["walmirror.breaker.to"])
        for e in events_of(spans, "walmirror.breaker")
    }


class WithoutPing(MemoryStore):
    """A protocol store with no health call: the breaker probes with a queued item."""

    ping = None  # type: ignore[assignment]


# Small backoffs, a breaker that opens after two failed rounds, fast probes.
OUTAGE_TUNING: dict[str, Any] = {
    "backoff_initial": 0.01,
    "backoff_max": 0.05,
    "breaker_threshold": 2,
    "probe_interval": 0.02,
}


async def test_append_and_delivery_emit_spans_without_content(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    SPANS.clear()
    store = make_durable(InMemorySessionStore())
    await store.append(KEY, [{"type": "user", "uuid": "u1", "text": SECRET}])
    await store.flush(timeout=10)
    spans = SPANS.get_finished_spans()
    names = {s.name for s in spans}
    assert {"walmirror.append", "walmirror.flush_batch", "walmirror.backend_call"} <= names
    dumped = json.dumps([{**dict(s.attributes or {}), "name": s.name} for s in spans])
    assert SECRET not in dumped


async def test_metrics_report_depth_lag_retries_and_append_latency(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    backend = FaultyStore(InMemorySessionStore())
    backend.down()
    store = make_durable(backend, backend_names=("metrics-test",))
    await store.append(KEY, [{"type": "user", "uuid": "u1", "text": SECRET}])
    flusher = store.flushers[0]
    async with asyncio.timeout(10):  # the gauges refresh about once a second
        while not (flusher.retries_total and flusher.gauges[0]):
            await asyncio.sleep(0.05)
    points = metric_points()
    for name in (
        "walmirror.append.duration",
        "walmirror.entries.appended",
        "walmirror.backend.retries",
        "walmirror.queue.depth",
        "walmirror.queue.lag",
        "walmirror.parked_keys",
    ):
        assert name in points, name
    depth = [
        p.value
        for p in points["walmirror.queue.depth"]
        if p.attributes == {"backend": "metrics-test"}
    ]
    assert depth == [1]
    assert SECRET not in repr(points)


def user_entries(start: int, count: int) -> list[Any]:
    return [{"type": "user", "uuid": f"u{n}", "text": SECRET} for n in range(start, start + count)]


async def test_scripted_outage_gives_the_span_tree_events_and_metrics(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """A healthy delivery; the backend goes down (retries, breaker open, ping probes);
    it comes back (breaker closed, caught up); then a key and a delete are parked."""
    SPANS.clear()
    name = f"outage-{uuid.uuid4().hex[:8]}"
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    store = make_durable(faulty, backend_names=(name,), **OUTAGE_TUNING)
    parked_key: SessionKey = {"project_key": "proj", "session_id": "refused"}
    doomed: SessionKey = {"project_key": "proj", "session_id": "doomed"}

    await store.append(KEY, user_entries(0, 3))
    await store.flush(10)
    flusher = store.flushers[0]
    faulty.down()
    await store.append(KEY, user_entries(3, 2))
    await eventually(lambda: flusher.breaker == "open")
    pings = faulty.calls["ping"]
    await eventually(lambda: faulty.calls["ping"] >= pings + 3)  # probes while open
    faulty.up()
    await store.flush(10)
    await eventually(
        lambda: metric_total("walmirror.backend.heal_to_caught_up.duration", backend=name) >= 1
    )
    faulty.reject(lambda k: k["session_id"] == "refused")  # PermanentBackendError
    await store.append(parked_key, user_entries(0, 1))
    await store.append(doomed, user_entries(0, 1))
    await eventually(lambda: inner.load(doomed))
    faulty.reject(lambda k: k["session_id"] == "doomed", ops={"delete"})
    await store.delete(doomed)

    async def both_parked() -> bool:
        status = (await store.status())["backends"][0]
        return bool(status["parked"] and status["parked_deletes"])

    await eventually(both_parked)
    assert await inner.load(KEY) == user_entries(0, 5)

    finished = SPANS.get_finished_spans()
    batches = spans_of(name, "walmirror.flush_batch")
    rounds = spans_of(name, "walmirror.flush_round")
    probes = spans_of(name, "walmirror.probe")
    of_key = [b for b in batches if attrs(b)["walmirror.key.digest"] == key_digest(KEY)]
    ok = [b for b in of_key if attrs(b)["walmirror.outcome"] == "ok"]
    retried = [b for b in of_key if attrs(b)["walmirror.outcome"] == "retry"]

    # Healthy: round -> batch -> backend call, with entries, bytes and attempt.
    first = ok[0]
    assert attrs(first)["walmirror.batch.entries"] == 3
    assert attrs(first)["walmirror.batch.bytes"] > 0
    assert attrs(first)["walmirror.attempt"] == 1
    assert first.parent is not None
    assert first.parent.span_id in {r.context.span_id for r in rounds if r.context}
    calls = children(first)
    # The key is new to this queue and its entries carry uuids: the backend's uuids
    # are read once first (a replay from another host is not stored twice).
    assert [attrs(c)["walmirror.op"] for c in calls] == ["load", "append_batch"]
    assert all(attrs(c)["walmirror.outcome"] == "ok" for c in calls)

    # Down: failed attempts, each with its error type (no message) and a retry event.
    assert len(retried) >= 2
    for span in retried:
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "ConnectionError"
        assert attrs(span)["walmirror.error.type"] == "ConnectionError"
        (failed_call,) = children(span)
        assert attrs(failed_call)["walmirror.outcome"] == "error"
        assert attrs(failed_call)["walmirror.error.type"] == "ConnectionError"
    retry_events = events_of(retried, "walmirror.retry")
    assert sorted(e["walmirror.attempt"] for e in retry_events) == list(range(1, len(retried) + 1))
    assert events_of(rounds, "walmirror.backoff")
    assert ("closed", "open") in transitions(rounds)

    # Open: ping probes fail, then one answers and closes the breaker.
    failed_probes = [p for p in probes if attrs(p)["walmirror.outcome"] == "failed"]
    healed = [p for p in probes if attrs(p)["walmirror.outcome"] == "ok"]
    assert len(failed_probes) >= 3 and len(healed) == 1
    assert [attrs(c)["walmirror.op"] for c in children(healed[0])] == ["ping"]
    assert transitions(healed) == {("open", "closed")}

    # Back: the rest goes, its attempt counting the failed ones.
    after = ok[-1]
    assert attrs(after)["walmirror.batch.entries"] == 2
    assert attrs(after)["walmirror.attempt"] == len(retried) + 1

    # Parked: a key, and a delete.
    (parked,) = [b for b in batches if attrs(b)["walmirror.outcome"] == "parked"]
    assert attrs(parked)["walmirror.key.digest"] == key_digest(parked_key)
    assert events_of([parked], "walmirror.parked") == [
        {"walmirror.item.kind": "key", "walmirror.error.type": "PermanentBackendError"}
    ]
    deletes = spans_of(name, "walmirror.flush_delete")
    (parked_delete,) = [d for d in deletes if attrs(d)["walmirror.outcome"] == "parked"]
    assert attrs(parked_delete)["walmirror.key.digest"] == key_digest(doomed)
    assert events_of([parked_delete], "walmirror.parked") == [
        {"walmirror.item.kind": "delete", "walmirror.error.type": "PermanentBackendError"}
    ]
    assert [attrs(c)["walmirror.op"] for c in children(parked_delete)] == ["delete"]

    # No span recorded an exception (its message and stack trace) by itself.
    assert not [e for s in finished for e in s.events if e.name == "exception"]

    # Metrics after it.
    assert metric_total("walmirror.entries.delivered", backend=name) == 6  # 5 + doomed's 1
    assert metric_total("walmirror.bytes.delivered", backend=name) > 0
    assert metric_total("walmirror.backend.retries", backend=name) >= len(retried)
    requests = "walmirror.backend.requests"
    assert metric_total(requests, backend=name, op="append_batch", outcome="ok") >= 3
    assert metric_total(requests, backend=name, op="append_batch", outcome="error") >= 2
    assert metric_total(requests, backend=name, op="ping", outcome="error") >= 3
    assert metric_total(requests, backend=name, op="ping", outcome="ok") >= 1
    assert metric_total(requests, backend=name, op="delete", outcome="error") == 1
    assert metric_total("walmirror.items.parked", backend=name, kind="key") == 1
    assert metric_total("walmirror.items.parked", backend=name, kind="delete") == 1
    assert metric_total("walmirror.breaker.transitions", backend=name, state="open") == 1
    assert metric_total("walmirror.breaker.transitions", backend=name, state="closed") == 1
    assert metric_total("walmirror.backend.heal_to_caught_up.duration", backend=name) == 1


async def test_breaker_without_ping_goes_half_open_with_one_queued_item(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    SPANS.clear()
    name = f"half-open-{uuid.uuid4().hex[:8]}"
    faulty = FaultyStore(WithoutPing())
    store = make_durable(faulty, backend_names=(name,), **OUTAGE_TUNING)
    faulty.down()
    await store.append(KEY, user_entries(0, 2))
    flusher = store.flushers[0]
    await eventually(lambda: flusher.breaker == "open")
    await eventually(
        lambda: ("half-open", "open") in transitions(spans_of(name, "walmirror.flush_round"))
    )
    faulty.up()
    await store.flush(10)
    rounds = spans_of(name, "walmirror.flush_round")
    seen = transitions(rounds)
    assert {("closed", "open"), ("open", "half-open"), ("half-open", "closed")} <= seen
    probe_rounds = [r for r in rounds if attrs(r)["walmirror.round.probe"]]
    assert probe_rounds and all(attrs(r)["walmirror.round.keys"] <= 1 for r in probe_rounds)
    await eventually(
        lambda: metric_total("walmirror.backend.heal_to_caught_up.duration", backend=name) >= 1
    )


def test_every_instrument_has_a_unit() -> None:
    # Touch every instrument (on a series of its own) so that each reports.
    mark = {"test": "units"}
    for histogram in (telemetry.append_duration, telemetry.heal_to_caught_up):
        histogram.record(0.0, mark)
    for counter in (
        telemetry.entries_appended,
        telemetry.entries_delivered,
        telemetry.bytes_delivered,
        telemetry.entries_lost,
        telemetry.backend_retries,
        telemetry.backend_requests,
        telemetry.items_parked,
        telemetry.breaker_transitions,
    ):
        counter.add(0, mark)
    source = telemetry.GaugeSource(lambda: {"units-test": (0, 0.0, 0)})
    units = metric_units()
    del source
    assert units == {
        "walmirror.append.duration": "s",
        "walmirror.backend.heal_to_caught_up.duration": "s",
        "walmirror.entries.appended": "{entry}",
        "walmirror.entries.delivered": "{entry}",
        "walmirror.bytes.delivered": "By",
        "walmirror.entries.lost": "{entry}",
        "walmirror.backend.retries": "{retry}",
        "walmirror.backend.requests": "{request}",
        "walmirror.items.parked": "{item}",
        "walmirror.breaker.transitions": "{transition}",
        "walmirror.queue.depth": "{entry}",
        "walmirror.queue.lag": "s",
        "walmirror.parked_keys": "{key}",
    }


def test_configure_exporters_refuses_unknown_kinds_and_set_providers() -> None:
    with pytest.raises(ValueError, match="console"):
        configure_exporters("zipkin")
    # This process set its providers at import: OpenTelemetry would silently keep them.
    with pytest.raises(RuntimeError, match="already set"):
        configure_exporters("console")


def test_configure_exporters_otlp_without_the_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if the otel extra were not installed (whether or not it is here).
    for package in ("http", "grpc"):
        for module in ("trace_exporter", "metric_exporter"):
            name = f"opentelemetry.exporter.otlp.proto.{package}.{module}"
            monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeError, match=r"walmirror\[otel\]"):
        configure_exporters("otlp")


CONSOLE_SCRIPT = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from memory_store import MemoryStore
from walmirror import DurableSessionStore
from walmirror.telemetry import configure_exporters

async def main() -> None:
    shutdown = configure_exporters("console")
    async with DurableSessionStore(MemoryStore(), sys.argv[1]) as store:
        await store.append({"project_key": "p", "session_id": "s"}, [{"type": "user"}])
        await store.flush(10)
    shutdown()
    shutdown()  # a second call does nothing

asyncio.run(main())
"""


def test_configure_exporters_console_prints_spans_and_metrics(tmp_path: Path) -> None:
    env = {**os.environ, "OTEL_METRIC_EXPORT_INTERVAL": "600000"}
    env.pop("OTEL_SERVICE_NAME", None)
    result = subprocess.run(
        [sys.executable, "-c", CONSOLE_SCRIPT, str(tmp_path / "q.db"), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in (
        "walmirror.append",
        "walmirror.flush_round",
        "walmirror.flush_batch",
        "walmirror.backend_call",
        "walmirror.entries.delivered",
        "walmirror.backend.requests",
    ):
        assert f'"name": "{name}"' in result.stdout, name
    assert '"service.name": "walmirror"' in result.stdout
