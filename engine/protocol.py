"""The delivery protocol: exactly once, in order, with any number of hosts writing a key.

This module is the one description of the protocol; every backend implements
its atomic step (``ProducerStore.append_batch``) and nothing else of it.

Producers and sequence numbers
------------------------------
Every queue file is a *producer*: at creation it draws a random id (kept in
the queue's meta table; see ``walmirror.queue``). The queue numbers each key's
entries with a *seq*: strictly increasing per key, never reused by that
producer for that key, even after the key was deleted or its bookkeeping
compacted (a key new to the queue starts at the queue's ``seq_floor``, which
is above every seq the queue ever handed out). Within one run of a key's
bookkeeping the seqs are consecutive, so a batch is ``first_seq`` plus a list
of entries.

What a backend keeps
--------------------
Per key, beside the transcript: each producer's *mark*, the highest seq of
that producer it has stored for the key. That is all: a few dozen bytes per
producer that ever wrote the key.

The atomic step: ``append_batch(key, batch)``
---------------------------------------------
In one atomic step (a Lua call, a SQL function, a flock, a conditional put):

1. ``mark`` := the producer's mark for the key (``None`` if it has none).
2. If ``batch.expect`` is not ``None`` and ``mark`` is ``None`` or below
   ``expect``: raise ``MarkBehindError(mark)`` and change nothing. The
   producer was told earlier that entries up to ``expect`` were stored; the
   backend has lost them (a Redis restart without persistence, a truncated
   table). The flusher re-sends what its queue retains and reports the rest.
3. Skip the batch's leading entries whose seq is at or below ``mark``: they
   are repeats (a retry after a lost reply, a resend after a crash, a late
   write of a call that timed out). See ``skip_count``.
4. Append the rest at the transcript's current end, whatever other producers
   appended meanwhile, and set the mark to the batch's last seq.

Return a ``Receipt``. A retry, a crash-resend, a late write or a resend after a
re-learned position is a no-op whatever other producers did in between, and it
needs no ``uuid``: the seq is the identity.

Order: one producer's entries land in its append order (the queue sends a
key's batches one at a time, in seq order). Across producers the order is the
order in which the backend committed their batches (the SDK's own rule for
concurrent writers).

Deletes fence
-------------
``delete(key)`` removes the transcript (a main key: its subkeys too) but keeps
every producer's mark for it: the marks are the key's tombstone. A retry of a
batch written before the delete is at or below its producer's mark and is
skipped, so it cannot resurrect anything; a new append after the delete, from
any host, has higher seqs and starts a fresh transcript. A tombstone lives as
long as the backend keeps the key's marks: until an operator removes them (a
few dozen bytes per producer and key; see each backend's docstring for
where they live). Removing them is safe once no queue that wrote the key
still holds undelivered entries for it.

Reads
-----
``producer_mark(key, producer)`` returns the mark (``None`` if none). A host
merging its queue into a read shows its queued entries with seq above its
mark: the backend holds the others.

Health
------
``ping()`` (optional, on any store): the backend's cheapest call that proves it
answers (Redis ``PING``, PostgreSQL ``SELECT 1``, S3 ``HeadBucket``, a stat of
FileStore's root). While a backend is failing, the flusher probes it with
``ping`` rather than with real batches, and asks it whether a key that keeps
failing is the key's problem or the backend's. See ``has_ping``.

Foreign stores
--------------
A ``SessionStore`` without ``append_batch`` gets plain ``append`` calls:
at-least-once, with a ``uuid`` check of the backend's tail before a resend
(see ``walmirror.flusher``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson
from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry

from .errors import InvalidEntryError, MarkBehindError

__all__ = [
    "MAX_ENTRY_DEPTH",
    "MAX_SEQ",
    "PRODUCER_PATTERN",
    "Batch",
    "MarkBehindError",
    "ProducerStore",
    "Receipt",
    "check_batch",
    "check_encodable",
    "decode_array",
    "decode_entry",
    "encode_checked",
    "encode_entry",
    "implements",
    "is_producer_store",
    "skip_count",
    "summary_hint",
    "too_deep",
]

PRODUCER_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a producer id may be: it becomes part of Redis fields, SQL rows and S3 metadata."""

MAX_SEQ = (1 << 63) - 1
"""Seqs fit a signed 64-bit integer (PostgreSQL ``bigint``, Lua's integers)."""


# -- the canonical encoding -------------------------------------------------------

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)
# Subclasses, dataclasses and dates go to orjson's ``default`` (none: it raises), so
# the stdlib decides about them as it always has.
_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)


def encode_entry(entry: Any) -> bytes:
    """An entry's canonical JSON as UTF-8: what the queue holds, FileStore writes as a
    line, Redis keeps as an element, PostgreSQL as a ``json`` value and S3 in a part.

    ``json.dumps(entry, ensure_ascii=False, separators=(",", ":"), allow_nan=False)``;
    a string holding a lone surrogate (what a truncated UTF-16 string becomes)
    cannot be UTF-8, so such an entry is written with ``\\uXXXX`` escapes
    instead: still valid JSON, and ``json.loads`` gives back the same value.
    Raises ``TypeError``/``ValueError``/``RecursionError`` like ``json.dumps``.

    Most entries take a fast path (``_fast_encode``) that gives the same JSON value
    (the same bytes, but for how a float's exponent is spelled) in a third of the time.
    """
    body = _fast_encode(entry)
    return body if body is not None else _stdlib_encode(entry)


def _stdlib_encode(entry: Any) -> bytes:
    text = _ENCODER.encode(entry)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _ASCII_ENCODER.encode(entry).encode()


def _fast_encode(entry: Any) -> bytes | None:
    """orjson's encoding of ``entry`` when it is exactly the entry's JSON value, else
    None (the stdlib then decides). orjson refuses lone surrogates, integers past 64
    bits, non-string keys and nesting past 254 levels; but it writes NaN and the
    infinities as ``null`` and accepts UUIDs, enums and ``orjson.Fragment``, all of
    which ``json.dumps`` refuses. So its bytes are read back and must give a value
    equal to the entry: that holds for plain JSON values, and for nothing the stdlib
    would refuse, but for an ``Enum`` member made to compare equal to its value
    (stored as that value)."""
    try:
        body = orjson.dumps(entry, option=_ORJSON_OPTIONS)
        if orjson.loads(body) != entry:
            return None
    except Exception:  # what orjson refuses, a Fragment's bad bytes, an __eq__ that raises
        return None
    # orjson writes into a buffer larger than the result and shrinks it in place: a
    # body kept while the next ones are made pins the rest of that buffer (8,000
    # bodies held at once cost ~60 MB more RSS than their size). An exact copy frees it.
    return bytes(memoryview(body))


def decode_entry(body: bytes) -> SessionStoreEntry:
    entry: SessionStoreEntry = decode_array(body)
    return entry


# A byte per byte: "0" for a digit, " " for the rest (``bytes.translate``).
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_NUMBER = b"0" * 19


def decode_array(text: bytes) -> Any:
    """``json.loads(text)``: the same values of the same types, in half the time.

    orjson parses it where it reads JSON as the stdlib does. Where it would not, it
    refuses (a lone surrogate escaped, ``NaN``, a number past a double) and the
    stdlib decides; or it reads an integer past 64 bits as a float: so text with a
    run of 19 digits anywhere (a string's included) goes to the stdlib at once.
    Raises ``ValueError`` (``RecursionError`` too deep) like ``json.loads``.
    """
    if _LONG_NUMBER not in text.translate(_DIGITS):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


MAX_ENTRY_DEPTH = 500
"""How deeply an entry's objects and arrays may nest. ``json`` parses recursively,
so an entry nested close to Python's recursion limit (1000) encodes at ``append``
and then fails to parse deeper in a call stack (the flusher's, a backend's, the
caller's ``load``). 500 leaves the other half of the limit to the callers; real
transcript entries nest a few dozen levels at most."""


def too_deep(entry: Any, body: bytes) -> bool:
    """True when ``entry`` (encoded as ``body``) nests deeper than ``MAX_ENTRY_DEPTH``.
    Cheap for almost every entry: fewer brackets than the limit settles it."""
    if body.count(b"[") + body.count(b"{") <= MAX_ENTRY_DEPTH:
        return False
    stack: list[tuple[Any, int]] = [(entry, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_ENTRY_DEPTH:
            return True
        if isinstance(value, dict):
            stack.extend(
                (v, depth + 1) for v in value.values() if isinstance(v, dict | list | tuple)
            )
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list | tuple))
    return False


# -- summary hints ----------------------------------------------------------------
#
# A main key's backend folds each appended entry into the session's summary
# (``walmirror.backends.fold_summary``), and once a session's summary has settled
# almost no entry can change it. Parsing a 500-entry batch only to learn that costs
# more than the rest of its delivery. So ``append`` notes, per entry, the few
# features the fold reads (a bit each, from the dict it has in hand), the queue
# stores these hints beside the batch's bytes (under the batch's checksum), and the
# backend parses only the entries whose hints say they can matter.

SUMMARY_FIELDS = ("customTitle", "aiTitle", "lastPrompt", "summary", "gitBranch")
"""The last-wins fields of the SDK's summary fold (as of claude-agent-sdk 0.2.x).
Queue files keep hints made with this list: changing it (or any bit below) changes
what they mean, so it needs a schema step that drops the hints of older batches."""

HINT_TAG = 1  # "type" is "tag": sets or clears the summary's tag
HINT_USER = 2  # "type" is "user": may set the first prompt
HINT_TIMESTAMP = 4  # has "timestamp": may set created_at
HINT_CWD = 8  # a non-empty "cwd": may set cwd
HINT_FIELD = {name: 16 << i for i, name in enumerate(SUMMARY_FIELDS)}
"""The bit of each last-wins field, set when the entry holds it as a string."""


HINT_PARSE = 16 << len(SUMMARY_FIELDS)
"""An entry to parse whatever the summary holds (its other bits are not set)."""

_PLAIN = frozenset({str, int, float, bool, type(None), list, dict})
_SUMMARY_FIELD_SET = frozenset(SUMMARY_FIELDS)


def summary_hint(entry: dict[str, Any]) -> int:
    """The hint bits of one entry (see above): what the summary fold would read of it.

    Read from the dict before it is encoded, so only for an entry whose JSON reads
    back equal to it (``encode_checked``'s fast path: plain string keys, no
    duplicates). A value the fold reads that is not of a plain JSON type (a str
    subclass, an enum member) may compare unlike its JSON text: such an entry gets
    ``HINT_PARSE``.
    """
    kind = entry.get("type")
    cwd = entry.get("cwd")
    if type(kind) not in _PLAIN or type(cwd) not in _PLAIN:
        return HINT_PARSE
    hint = HINT_USER if kind == "user" else HINT_TAG if kind == "tag" else 0
    if "timestamp" in entry:
        hint |= HINT_TIMESTAMP
    if cwd:
        hint |= HINT_CWD
    for name in _SUMMARY_FIELD_SET.intersection(entry):  # ~1 µs an entry in all
        value = entry[name]
        if type(value) is str:
            hint |= HINT_FIELD[name]
        elif isinstance(value, str):
            return HINT_PARSE
    return hint


def uuids_of(entries: Iterable[Any]) -> set[str]:
    """The uuids ``entries`` carry. JSON lets ``uuid`` be anything: only a non-empty
    string counts as one (the ledger and every uuid check agree on that)."""
    return {u for e in entries if isinstance(e, dict) and isinstance(u := e.get("uuid"), str) and u}


def held_uuid(entry: Any, held: set[str]) -> bool:
    """``entry`` carries a uuid, and ``held`` has it."""
    uuid = entry.get("uuid") if isinstance(entry, dict) else None
    return isinstance(uuid, str) and uuid in held


def check_encodable(index: int, entry: Any) -> bytes:
    """``encode_entry`` for a batch's ``index``-th entry, or ``InvalidEntryError``
    with a message that names the problem and never quotes the entry."""
    return encode_checked(index, entry)[0]


def encode_checked(index: int, entry: Any) -> tuple[bytes, bool]:
    """``check_encodable``, and whether the entry took the fast path: its JSON then
    reads back equal to it (``summary_hint`` may read the dict for the JSON)."""
    if not isinstance(entry, dict):
        raise InvalidEntryError(
            f"entry {index} of the batch must be a JSON object (dict), got {type(entry).__name__}"
        )
    body = _fast_encode(entry)
    if body is not None:  # at most 254 levels deep: no depth to check
        return body, True
    try:
        body = _stdlib_encode(entry)
    except RecursionError:
        body = b""  # nested far too deep for json.dumps itself
    except (TypeError, ValueError) as exc:
        # The message of a json error can quote content (contract 9): its type only.
        raise InvalidEntryError(
            f"entry {index} of the batch is not JSON-serialisable ({type(exc).__name__})"
        ) from None
    if not body or too_deep(entry, body):
        raise InvalidEntryError(
            f"entry {index} of the batch nests objects and arrays deeper than "
            f"{MAX_ENTRY_DEPTH} levels (walmirror.protocol.MAX_ENTRY_DEPTH)"
        )
    return body, False


# -- the atomic step ----------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One producer's consecutive entries of one key: seqs ``first_seq`` .. ``last_seq``.

    ``encoded`` holds each entry's canonical JSON (``encode_entry``): backends
    store these bytes. ``entries`` parses them on first use (for summaries).
    ``expect``: the producer's last seq this backend acknowledged for the key,
    or ``None`` when the producer does not know of any (see the module docstring).
    ``hints``: each entry's ``summary_hint``, when the producer knows them (the
    queue does for a main key's entries): the summary fold then parses only the
    entries that can change the summary (``walmirror.backends.fold_batch``).
    """

    producer: str
    first_seq: int
    encoded: Sequence[bytes]
    expect: int | None = None
    hints: Sequence[int] | None = field(default=None, repr=False, compare=False)
    _entries: list[SessionStoreEntry] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.encoded) - 1

    @property
    def entries(self) -> list[SessionStoreEntry]:
        if self._entries is None:  # one parse of the whole batch: ~5x cheaper than one per entry
            try:
                entries = decode_array(b"[" + b",".join(self.encoded) + b"]")
            except (ValueError, RecursionError):
                entries = None
            if not isinstance(entries, list) or len(entries) != len(self.encoded):
                entries = [self._decode(i) for i in range(len(self.encoded))]
            object.__setattr__(self, "_entries", entries)
        assert self._entries is not None
        return self._entries

    def entries_at(self, indices: Sequence[int]) -> list[SessionStoreEntry]:
        """The entries at ``indices`` (ascending), parsing only those."""
        if self._entries is not None or len(indices) == len(self.encoded):
            entries = self.entries
            return [entries[i] for i in indices]
        if not indices:
            return []
        try:
            parsed = decode_array(b"[" + b",".join(self.encoded[i] for i in indices) + b"]")
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, list) and len(parsed) == len(indices):
            return parsed
        return [self._decode(i) for i in indices]

    def _decode(self, index: int) -> SessionStoreEntry:
        try:
            return decode_entry(self.encoded[index])
        except (ValueError, RecursionError):
            # From the flusher, this means the producer's queue file is damaged.
            raise InvalidEntryError(
                f"the entry at seq {self.first_seq + index} of the batch is not valid JSON"
            ) from None

    @classmethod
    def of(
        cls,
        producer: str,
        first_seq: int,
        entries: Sequence[SessionStoreEntry],
        expect: int | None = None,
    ) -> Batch:
        """A batch from entries (encoding them); tests and foreign callers use this."""
        encoded = [check_encodable(index, entry) for index, entry in enumerate(entries)]
        return cls(producer, first_seq, encoded, expect, None, list(entries))


@dataclass(frozen=True)
class Receipt:
    """What ``append_batch`` did: ``appended`` entries went to the end (the batch's
    last ``appended``); the producer's ``mark`` and the transcript's ``length`` after."""

    appended: int
    mark: int
    length: int


def check_batch(key_desc: str, batch: object) -> Batch:
    """The argument checks every ``append_batch`` makes; raises ``ValueError``."""
    if not isinstance(batch, Batch):
        raise ValueError(f"{key_desc}: append_batch takes a walmirror.protocol.Batch")
    if not isinstance(batch.producer, str) or not PRODUCER_PATTERN.fullmatch(batch.producer):
        raise ValueError(f"{key_desc}: producer id must match {PRODUCER_PATTERN.pattern}")
    for name, value in (("first_seq", batch.first_seq), ("expect", batch.expect)):
        if value is None and name == "expect":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
            raise ValueError(f"{key_desc}: {name} must be an int in 0..2**63-1")
    if not batch.encoded:
        raise ValueError(f"{key_desc}: a batch holds at least one entry")
    if batch.last_seq > MAX_SEQ:
        raise ValueError(f"{key_desc}: the batch's seqs pass 2**63-1")
    if not all(isinstance(b, bytes) for b in batch.encoded):
        raise ValueError(f"{key_desc}: encoded must hold one bytes object per entry")
    hints = batch.hints
    if hints is not None and (
        len(hints) != len(batch.encoded) or not all(type(h) is int for h in hints)
    ):
        raise ValueError(f"{key_desc}: hints must hold one int per entry (or be None)")
    return batch


def skip_count(key_desc: str, batch: Batch, mark: int | None) -> int:
    """Steps 2 and 3 of the atomic step: how many leading entries of ``batch`` the
    backend already holds, given the producer's ``mark``; ``MarkBehindError`` when
    the backend lost what it acknowledged. Backends written in Python call this;
    the Lua and SQL versions say the same in their own language."""
    if batch.expect is not None and (mark is None or mark < batch.expect):
        raise MarkBehindError(key_desc, mark, batch.expect)
    if mark is None:
        return 0
    return max(0, min(len(batch), mark - batch.first_seq + 1))


@runtime_checkable
class ProducerStore(Protocol):
    """The methods that make a ``SessionStore`` a walmirror backend (see the module)."""

    async def append_batch(self, key: SessionKey, batch: Batch) -> Receipt: ...

    async def producer_mark(self, key: SessionKey, producer: str) -> int | None: ...


def is_producer_store(store: SessionStore) -> bool:
    """True when ``store`` speaks the protocol (``append_batch`` and ``producer_mark``)."""
    return callable(getattr(store, "append_batch", None)) and callable(
        getattr(store, "producer_mark", None)
    )


def has_ping(store: SessionStore) -> bool:
    """True when ``store`` offers the health call ``ping()`` (see the module)."""
    return callable(getattr(store, "ping", None))


def implements(store: SessionStore, method: str) -> bool:
    """True when ``store`` overrides an optional ``SessionStore`` method.

    Mirrors the SDK's own probe: a method inherited from the ``SessionStore``
    Protocol (which raises ``NotImplementedError``) does not count.
    """
    if getattr(store, method, None) is None:
        return False
    return getattr(type(store), method, None) is not getattr(SessionStore, method, None)
