"""Exceptions walmirror raises.

Every message here names keys, files and counts, never transcript content
(contract 9): error text ends up in logs, status output and telemetry.
"""

from __future__ import annotations


class WalmirrorError(Exception):
    """Base class for every error walmirror raises on purpose."""


class InvalidKeyError(WalmirrorError, ValueError):
    """A ``SessionKey`` that is malformed or could escape its storage location."""


class InvalidEntryError(WalmirrorError, ValueError):
    """An entry that is not a JSON object, cannot be serialised, or is too large."""


class QueueFullError(WalmirrorError):
    """The local queue reached its configured byte cap (or the disk is full).

    Raised by ``append`` when the full-policy is ``"raise"``, or when the
    ``"wait"`` policy's timeout passes. Nothing of the rejected batch was stored.
    """


class QueueLockedError(WalmirrorError):
    """Another process holds the queue file; two processes never share one."""


class QueuePathError(WalmirrorError):
    """The queue file cannot live where ``wal_path`` says: a directory, a read-only
    filesystem, no permission. Nothing was created or changed there."""


class CorruptQueueError(WalmirrorError):
    """The queue file is not a walmirror queue or is damaged. It is left untouched."""


class QueueClosedError(WalmirrorError):
    """The store was closed; it accepts no more calls."""


class BackendUnavailableError(WalmirrorError):
    """A read needed the backend, the backend failed, and local data is not enough."""


class BackendError(WalmirrorError):
    """Base for errors a backend raises about the delivery protocol."""


class PermanentBackendError(BackendError):
    """The backend rejected a batch for good (validation, size, permission).

    Backends raise it (or a subclass) to ask the flusher to park the key
    instead of retrying. Retrying cannot help.
    """


class CorruptTranscriptError(PermanentBackendError):
    """A backend holds a transcript it cannot read back (a line or object that is not
    a JSON entry, pieces that do not join). Retrying cannot fix it: the key is parked."""


class MarkBehindError(BackendError):
    """The backend's mark for this producer is below what it acknowledged before.

    Raised by ``append_batch`` (nothing written) when the backend lost entries
    it had stored: ``mark`` is what it still knows (``None``: nothing). The
    flusher re-sends what its queue retains and reports what it cannot.
    """

    def __init__(self, key_desc: str, mark: int | None, expect: int) -> None:
        known = "no mark" if mark is None else f"mark {mark}"
        super().__init__(
            f"{key_desc}: the backend holds {known} for this producer but acknowledged "
            f"seq {expect} before; it lost data"
        )
        self.mark = mark
        self.expect = expect


class FlushTimeoutError(WalmirrorError, TimeoutError):
    """``flush(timeout)`` passed its timeout before every backend acknowledged."""


class FlushBlockedError(WalmirrorError):
    """``flush()`` cannot complete: keys it waits for are parked."""
