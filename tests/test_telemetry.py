"""contract 9: spans and metrics are there, and carry no transcript content."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from claude_agent_sdk import InMemorySessionStore
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from walmirror import DurableSessionStore
from walmirror.faults import FaultyStore

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
