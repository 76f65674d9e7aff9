"""walmirror: a durable write-ahead mirror for Claude Agent SDK session transcripts.

``DurableSessionStore(backends, wal_path, **tuning)`` is the SessionStore to hand the
SDK; ``walmirror.backends.file.FileStore(root)`` is the embedded default backend.
"""

from .backend import OffsetStore, is_offset_aware
from .config import Tuning
from .errors import (
    BackendUnavailableError,
    CorruptQueueError,
    FlushBlockedError,
    FlushTimeoutError,
    InvalidEntryError,
    InvalidKeyError,
    OffsetConflictError,
    OffsetGapError,
    PermanentBackendError,
    QueueClosedError,
    QueueFullError,
    QueueLockedError,
    WalmirrorError,
)
from .store import CloseReport, DurableSessionStore

__all__ = [
    "BackendUnavailableError",
    "CloseReport",
    "CorruptQueueError",
    "DurableSessionStore",
    "FlushBlockedError",
    "FlushTimeoutError",
    "InvalidEntryError",
    "InvalidKeyError",
    "OffsetConflictError",
    "OffsetGapError",
    "OffsetStore",
    "PermanentBackendError",
    "QueueClosedError",
    "QueueFullError",
    "QueueLockedError",
    "Tuning",
    "WalmirrorError",
    "is_offset_aware",
]
