"""walmirror: a durable write-ahead mirror for Claude Agent SDK session transcripts.

``DurableSessionStore(backends, wal_path, **tuning)`` is the SessionStore to hand the
SDK; ``walmirror.backends.file.FileStore(root)`` is the embedded default backend.
"""

from .config import Tuning
from .errors import (
    BackendUnavailableError,
    CorruptQueueError,
    CorruptTranscriptError,
    FlushBlockedError,
    FlushTimeoutError,
    InvalidEntryError,
    InvalidKeyError,
    MarkBehindError,
    PermanentBackendError,
    QueueClosedError,
    QueueFullError,
    QueueLockedError,
    QueuePathError,
    WalmirrorError,
)
from .protocol import Batch, ProducerStore, Receipt, is_producer_store
from .store import CloseReport, DurableSessionStore

__all__ = [
    "BackendUnavailableError",
    "Batch",
    "CloseReport",
    "CorruptQueueError",
    "CorruptTranscriptError",
    "DurableSessionStore",
    "FlushBlockedError",
    "FlushTimeoutError",
    "InvalidEntryError",
    "InvalidKeyError",
    "MarkBehindError",
    "PermanentBackendError",
    "ProducerStore",
    "QueueClosedError",
    "QueueFullError",
    "QueueLockedError",
    "QueuePathError",
    "Receipt",
    "Tuning",
    "WalmirrorError",
    "is_producer_store",
]
