"""The offset-aware backend interface every walmirror backend implements.

A backend is a full ``SessionStore`` (the SDK's protocol) plus two methods
that make exactly-once delivery possible. An entry's *offset* is its index in
its key's transcript: the first entry ever stored for a key has offset 0.

``append_at(key, offset, entries)``
    Store ``entries`` at offsets ``offset .. offset + len(entries) - 1``.

    * ``offset == length``: the entries are appended.
    * ``offset < length``: the part of the batch the backend already holds is
      a repeat (a retry after a lost reply, a crash between the backend's
      commit and walmirror's ack). It must be a no-op, and only the part past
      ``length`` is appended. A backend that can compare the overlap with what
      it holds raises ``OffsetConflictError`` when they differ (another writer
      appended to the key); it never merges silently.
    * ``offset > length``: raise ``OffsetGapError``; entries would be missing.

    Returns the key's length after the call. Must be atomic per call: either
    the whole new suffix lands or none of it does.

    Optional keyword ``encoded``: a backend whose ``append_at`` accepts it gets
    each entry's JSON as the queue holds it (UTF-8 bytes of
    ``json.dumps(entry, ensure_ascii=False, separators=(",", ":"))``) and may
    store those bytes instead of serialising ``entries`` again.

``length(key)``
    How many entries the backend holds for ``key`` (0 if never written, or
    deleted).

How a key new to this host learns its base offset: the flusher asks
``length(key)`` once, before it first delivers that key, and persists the
answer in the local queue (the cursor's *base*) before sending anything. Local
entry number ``seq`` then goes to offset ``base + seq``. A session resumed on
another host therefore continues after the entries already stored, and a
retry after a crash resends the same offsets, which the backend ignores.

Backends that do not implement these two methods (any foreign
``SessionStore``) still work: they get at-least-once delivery, and after an
ambiguous failure walmirror reads the key's tail and skips entries the
backend already holds (by ``uuid``, and by exact match of the tail) before
resending.

Errors: raise ``PermanentBackendError`` (or a subclass) for a batch that can
never succeed; the flusher parks that key. Anything else is retried with
backoff.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry

from .keys import describe_key


@runtime_checkable
class OffsetStore(Protocol):
    """The two methods that make a ``SessionStore`` offset-aware."""

    async def append_at(
        self, key: SessionKey, offset: int, entries: list[SessionStoreEntry]
    ) -> int: ...  # optionally also: *, encoded: Sequence[bytes] | None = None

    async def length(self, key: SessionKey) -> int: ...


def is_offset_aware(store: SessionStore) -> bool:
    """True when ``store`` implements ``append_at`` and ``length``."""
    return callable(getattr(store, "append_at", None)) and callable(getattr(store, "length", None))


def check_append_at(
    key: SessionKey,
    offset: object,
    entries: Sequence[SessionStoreEntry],
    encoded: Sequence[bytes] | None,
) -> None:
    """The argument checks every ``append_at`` makes: a non-negative int offset, and
    ``encoded`` (when given) one bytes object per entry. Raises ``ValueError``."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{describe_key(key)}: offset must be a non-negative int")
    if encoded is not None and (
        len(encoded) != len(entries) or not all(isinstance(b, bytes) for b in encoded)
    ):
        raise ValueError(f"{describe_key(key)}: encoded must hold one bytes object per entry")


def accepts_encoded(store: object) -> bool:
    """True when ``store.append_at`` takes the queue's bytes (``encoded=``)."""
    append_at = getattr(store, "append_at", None)
    if append_at is None:
        return False
    try:
        return "encoded" in inspect.signature(append_at).parameters
    except (TypeError, ValueError):
        return False


def implements(store: SessionStore, method: str) -> bool:
    """True when ``store`` overrides an optional ``SessionStore`` method.

    Mirrors the SDK's own probe: a method inherited from the ``SessionStore``
    Protocol (which raises ``NotImplementedError``) does not count.
    """
    if getattr(store, method, None) is None:
        return False
    return getattr(type(store), method, None) is not getattr(SessionStore, method, None)
