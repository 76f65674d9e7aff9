"""OpenTelemetry spans, span events and metrics. Names, counts, durations, error
*types* and key *digests* only: never transcript content, key ids, backend
error messages or credentials (contract 9). ``docs/observability.md`` lists
every span, event and instrument with its unit and attributes.

Spans (all started with ``record_exception=False``: an exception event would
carry a backend's message, which can echo the payload; the error type is set
by hand instead, see :func:`set_error`):

* ``walmirror.append``: one ``DurableSessionStore.append``;
* ``walmirror.flush_round``: one round of a flusher that had work, parent of
* ``walmirror.flush_batch`` (one key's batch) and ``walmirror.flush_delete``
  (one delete), each the parent of their
* ``walmirror.backend_call`` spans (one per call into a backend);
* ``walmirror.probe``: an open breaker asking the backend's health call.

The gauges read figures each flusher refreshes after a round, so an exporter
thread never touches SQLite. Nothing here needs the OpenTelemetry SDK: with only
the API installed every call is a no-op; :func:`configure_exporters` wires the
SDK's standard exporters (``pip install 'walmirror[otel]'``).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, Status, StatusCode

tracer = trace.get_tracer("walmirror")
_meter = metrics.get_meter("walmirror")

# -- attribute names ---------------------------------------------------------------

BACKEND = "walmirror.backend"  # the backend's cursor name (never holds credentials)
OP = "walmirror.op"  # the backend method: append_batch, append, load, delete, ping...
KEY_DIGEST = "walmirror.key.digest"  # key_digest(key), never the key itself
ENTRIES = "walmirror.batch.entries"
BYTES = "walmirror.batch.bytes"
ATTEMPT = "walmirror.attempt"  # 1 + this item's failed attempts in a row
OUTCOME = "walmirror.outcome"
ERROR_TYPE = "walmirror.error.type"  # the exception's class name, nothing else
ERROR_ERRNO = "walmirror.error.errno"  # an OSError's errno name (ENOSPC...), when it has one
ITEM_KIND = "walmirror.item.kind"  # "key" or "delete"

# Seconds, for latencies from ~100 µs (an append) to minutes (catching up after an
# outage). The SDK's default buckets (0, 5, 10, 25 ... 10000) are made for
# milliseconds: every append would land in the first one.
_SECONDS_BUCKETS: Sequence[float] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


def _seconds_histogram(name: str, description: str) -> metrics.Histogram:
    try:
        return _meter.create_histogram(
            name,
            unit="s",
            description=description,
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        )
    except TypeError:  # opentelemetry-api < 1.23: no bucket advice
        return _meter.create_histogram(name, unit="s", description=description)


# -- instruments ---------------------------------------------------------------------

append_duration = _seconds_histogram("walmirror.append.duration", "Durable append latency")
entries_appended = _meter.create_counter(
    "walmirror.entries.appended", unit="{entry}", description="Entries committed to the local queue"
)
entries_delivered = _meter.create_counter(
    "walmirror.entries.delivered", unit="{entry}", description="Entries acknowledged by a backend"
)
bytes_delivered = _meter.create_counter(
    "walmirror.bytes.delivered",
    unit="By",
    description="Encoded size of the entries acknowledged by a backend",
)
entries_lost = _meter.create_counter(
    "walmirror.entries.lost",
    unit="{entry}",
    description="Entries a backend lost after acknowledging them, gone from the queue too",
)
backend_retries = _meter.create_counter(
    "walmirror.backend.retries",
    unit="{retry}",
    description="Failed deliveries (batches, deletes, probes) that will be retried",
)
backend_requests = _meter.create_counter(
    "walmirror.backend.requests",
    unit="{request}",
    description="Calls the flusher made into a backend, by operation and outcome",
)
items_parked = _meter.create_counter(
    "walmirror.items.parked",
    unit="{item}",
    description="Keys and deletes parked after a permanent backend error",
)
breaker_transitions = _meter.create_counter(
    "walmirror.breaker.transitions",
    unit="{transition}",
    description="Circuit-breaker state changes, by the state entered",
)
heal_to_caught_up = _seconds_histogram(
    "walmirror.backend.heal_to_caught_up.duration",
    "From a backend's breaker closing after an outage until everything queued "
    "for it before that moment is acknowledged",
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
    "walmirror.queue.depth",
    [_observe(0)],
    unit="{entry}",
    description="Entries not yet acknowledged",
)
_meter.create_observable_gauge(
    "walmirror.queue.lag",
    [_observe(1)],
    unit="s",
    description="Age of the oldest entry not yet acknowledged",
)
_meter.create_observable_gauge(
    "walmirror.parked_keys",
    [_observe(2)],
    unit="{key}",
    description="Keys parked after a permanent error",
)


# -- helpers for the code that reports ------------------------------------------------


def key_digest(key: Mapping[str, Any]) -> str:
    """A short, stable pseudonym of a session key for telemetry: 16 hex digits of a
    BLAKE2b hash of project, session and subpath. The same key gives the same digest
    on every host, so a key can be followed across hand-offs; compute it for a key
    you know to find its spans. It is not encryption: someone who can guess a key
    can confirm the guess."""
    parts = (key["project_key"], key["session_id"], key.get("subpath") or "")
    text = "\x00".join(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=8, person=b"walmirror.key").hexdigest()


def span(name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Span]:
    """Start a current span that never records an exception (type, message and
    stack trace) by itself and never sets its status from one: :func:`set_error`
    does both, without the message."""
    return tracer.start_as_current_span(
        name,
        attributes=dict(attributes) if attributes else None,
        record_exception=False,
        set_status_on_exception=False,
    )


def error_attributes(exc: BaseException) -> dict[str, str]:
    """What telemetry says about an error: its class name (and an ``OSError``'s
    errno name). Never its message: a backend's message can echo the payload,
    name paths and hosts, or quote a credential."""
    attributes = {ERROR_TYPE: type(exc).__name__}
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(code, int) and code in errno.errorcode:
        attributes[ERROR_ERRNO] = errno.errorcode[code]
    return attributes


def set_error(target: Span, exc: BaseException, outcome: str) -> None:
    """Mark ``target`` failed with ``exc``'s type (status ERROR, its description the
    type name) and ``outcome``."""
    if not target.is_recording():
        return
    target.set_attributes({**error_attributes(exc), OUTCOME: outcome})
    target.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def current_attributes(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (a no-op outside one)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(dict(attributes))


def event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    """Add an event to the current span (a no-op outside one)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.add_event(name, dict(attributes) if attributes else None)


# -- exporters -------------------------------------------------------------------------

_MISSING_SDK = (
    "OpenTelemetry export needs the SDK and exporters: pip install 'walmirror[otel]' "
    "(opentelemetry-sdk, opentelemetry-exporter-otlp)"
)


def _load(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise RuntimeError(f"{_MISSING_SDK}; missing: {exc.name or module}") from None


def configure_exporters(kind: str) -> Callable[[], None]:
    """Send walmirror's spans and metrics somewhere with the SDK's standard exporters
    and return a function that flushes and shuts them down (call it before exit).

    ``kind``: ``"console"`` (spans and metrics printed to stdout) or ``"otlp"`` (to a
    collector; ``OTEL_EXPORTER_OTLP_ENDPOINT`` and friends configure it, and
    ``OTEL_EXPORTER_OTLP_PROTOCOL`` picks ``http/protobuf``, the default, or
    ``grpc``). ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` name the service
    (default ``walmirror``); ``OTEL_METRIC_EXPORT_INTERVAL`` sets how often metrics
    go out (ms).

    This installs the global tracer and meter providers, which OpenTelemetry lets a
    process set once: in an application that sets up OpenTelemetry itself, add
    exporters to its own providers instead (``docs/observability.md``). Raises
    ``RuntimeError`` (saying what to install) when the SDK or the OTLP exporter is
    missing, ``ValueError`` for an unknown ``kind``.
    """
    kind = kind.strip().lower()
    if kind not in ("console", "otlp"):
        raise ValueError(f"unknown OpenTelemetry exporter {kind!r}: use 'console' or 'otlp'")
    tracer_provider_class = _load("opentelemetry.sdk.trace", "TracerProvider")
    batch_processor = _load("opentelemetry.sdk.trace.export", "BatchSpanProcessor")
    meter_provider_class = _load("opentelemetry.sdk.metrics", "MeterProvider")
    periodic_reader = _load("opentelemetry.sdk.metrics.export", "PeriodicExportingMetricReader")
    resource_class = _load("opentelemetry.sdk.resources", "Resource")
    if kind == "console":
        span_exporter = _load("opentelemetry.sdk.trace.export", "ConsoleSpanExporter")()
        metric_exporter = _load("opentelemetry.sdk.metrics.export", "ConsoleMetricExporter")()
    else:
        protocol = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        if protocol not in ("http/protobuf", "grpc"):
            raise ValueError(
                f"OTLP protocol {protocol!r} is not supported here: use http/protobuf or grpc"
            )
        package = "grpc" if protocol == "grpc" else "http"
        base = f"opentelemetry.exporter.otlp.proto.{package}"
        span_exporter = _load(f"{base}.trace_exporter", "OTLPSpanExporter")()
        metric_exporter = _load(f"{base}.metric_exporter", "OTLPMetricExporter")()
    already = RuntimeError(
        "OpenTelemetry providers were already set in this process; add exporters "
        "to them instead of calling configure_exporters (docs/observability.md)"
    )
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        raise already
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = resource_class.create({} if named else {"service.name": "walmirror"})
    tracer_provider: Any = tracer_provider_class(resource=resource)
    tracer_provider.add_span_processor(batch_processor(span_exporter))
    meter_provider: Any = meter_provider_class(
        resource=resource, metric_readers=[periodic_reader(metric_exporter)]
    )
    # Tracer first: its shutdown exports the spans still batched; the meter's does a
    # last collection and export.
    providers: list[Any] = [tracer_provider, meter_provider]
    metrics.set_meter_provider(meter_provider)
    if metrics.get_meter_provider() is not meter_provider:
        for provider in providers:
            provider.shutdown()
        raise already
    trace.set_tracer_provider(tracer_provider)

    def shutdown() -> None:
        while providers:
            providers.pop(0).shutdown()

    return shutdown
