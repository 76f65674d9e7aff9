"""OpenTelemetry spans and metrics. Only names, counts and durations: never transcript content.

Spans: ``walmirror.append``, ``walmirror.flush_batch``, ``walmirror.backend_call``.
Metrics: ``walmirror.append.duration`` (histogram, s), ``walmirror.entries.appended``,
``walmirror.entries.delivered``, ``walmirror.backend.retries``,
``walmirror.entries.lost`` (entries a backend lost after acknowledging them that
the queue no longer held to re-send) (counters), and the
observable gauges ``walmirror.queue.depth`` (entries), ``walmirror.queue.lag``
(seconds), ``walmirror.parked_keys``, each per backend.

The gauges read figures each flusher refreshes after a round, so an exporter
thread never touches SQLite.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics, trace

tracer = trace.get_tracer("walmirror")
_meter = metrics.get_meter("walmirror")

append_duration = _meter.create_histogram(
    "walmirror.append.duration", unit="s", description="Durable append latency"
)
entries_appended = _meter.create_counter(
    "walmirror.entries.appended", description="Entries committed to the local queue"
)
entries_delivered = _meter.create_counter(
    "walmirror.entries.delivered", description="Entries acknowledged by a backend"
)
entries_lost = _meter.create_counter(
    "walmirror.entries.lost",
    description="Entries a backend lost after acknowledging them, gone from the queue too",
)
backend_retries = _meter.create_counter(
    "walmirror.backend.retries", description="Failed backend calls that will be retried"
)

# Sources register a callable returning {backend: (depth, lag, parked)}.
_sources: weakref.WeakSet[Any] = weakref.WeakSet()


class GaugeSource:
    """Something whose per-backend figures the observable gauges report."""

    def __init__(self, read: Callable[[], dict[str, tuple[int, float, int]]]) -> None:
        self.read = read
        _sources.add(self)


def _observe(index: int) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
    def callback(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for source in list(_sources):
            for backend, figures in source.read().items():
                yield metrics.Observation(figures[index], {"backend": backend})

    return callback


_meter.create_observable_gauge(
    "walmirror.queue.depth", [_observe(0)], description="Entries not yet acknowledged"
)
_meter.create_observable_gauge(
    "walmirror.queue.lag",
    [_observe(1)],
    unit="s",
    description="Age of the oldest entry not yet acknowledged",
)
_meter.create_observable_gauge(
    "walmirror.parked_keys", [_observe(2)], description="Keys parked after a permanent error"
)
