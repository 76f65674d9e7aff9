"""Tuning: every knob ``DurableSessionStore(..., **tuning)`` accepts, with its default and why."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

from .errors import CorruptQueueError, PermanentBackendError


def default_is_permanent(exc: BaseException) -> bool:
    """Errors that retrying cannot fix: the backend said no, or the batch is malformed.

    Everything else (connection errors, timeouts, unknown exceptions) is
    retried: dropping is never the safe default. Only what a backend call raised
    is judged here; an error in walmirror's own code is never parked for.
    """
    return isinstance(
        exc,
        PermanentBackendError | CorruptQueueError | PermissionError | ValueError | TypeError,
    )


@dataclass(frozen=True)
class Tuning:
    # Durability of the local commit: FULL fsyncs every commit; NORMAL may lose
    # the last commits on power loss (not on a process crash).
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # One backend call carries at most this many entries / bytes of one key.
    max_batch_entries: int = 500
    max_batch_bytes: int = 4 << 20
    # A batch waits at most this long for more entries before it is sent. Longer
    # lingers mean fewer, larger deliveries: less flusher work competing with
    # appends (measured: at 5 ms a healthy FileStore doubled append p50 against a
    # down one; at 20 ms they match), at the price of that much lag.
    batch_linger: float = 0.02
    # Keys delivered concurrently to one backend.
    max_parallel_keys: int = 16
    # A backend call that takes longer is abandoned and retried (producer marks make
    # the retry safe; foreign stores get a uuid tail check first).
    call_timeout: float = 30.0
    # Exponential backoff with full jitter: sleep uniform(0, min(max, initial * 2**n)).
    backoff_initial: float = 0.05
    backoff_max: float = 5.0
    # After this many consecutive failures the breaker opens: no real batch is sent
    # until a probe succeeds. A backend with a health call (``ping``: Redis PING,
    # PostgreSQL SELECT 1, S3 HeadBucket, a stat) is probed every probe_interval
    # seconds, each probe given probe_timeout; one without is probed with one
    # queued item (a key's batch or a delete, in turn) per backoff_max.
    breaker_threshold: int = 5
    probe_interval: float = 0.25
    probe_timeout: float = 2.0
    # Entries stay queued this long after their append (and at least until every
    # backend acknowledged them), so reads can answer from the queue in an outage.
    retention_seconds: float = 60.0
    compact_interval: float = 5.0
    # A key idle this long whose entries every backend acknowledged is forgotten: its
    # row, cursors and uuid ledger go (a host stays as fast as a new one). The SDK's
    # own retries come within seconds; an entry replayed later than this through
    # plain append (the SDK's import_session_to_store re-run) is stored again.
    # (`walmirror import` reads the backend first and needs no ledger.)
    forget_after: float = 3600.0
    # Disk cap for queued entry bytes (None: unbounded) and what append does when full.
    max_queue_bytes: int | None = 1 << 30
    full_policy: Literal["wait", "raise"] = "wait"
    full_timeout: float = 30.0
    # A single entry larger than this is refused with a clear error.
    max_entry_bytes: int = 16 << 20
    # Names of the backends' cursors in the queue; default "<index>:<class name>".
    backend_names: tuple[str, ...] | None = None
    is_permanent: Callable[[BaseException], bool] = default_is_permanent

    def __post_init__(self) -> None:
        if self.synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        if self.full_policy not in ("wait", "raise"):
            raise ValueError("full_policy must be 'wait' or 'raise'")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{f.name} must not be negative, got {value}")
        for name in (
            "max_batch_entries",
            "max_batch_bytes",
            "max_parallel_keys",
            "breaker_threshold",
            "max_entry_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("call_timeout", "backoff_max", "probe_interval", "probe_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.compact_interval < 0.01:
            # It is also the idle loop's sleep: zero would spin a CPU.
            raise ValueError(
                f"compact_interval must be at least 0.01 s, got {self.compact_interval}"
            )
