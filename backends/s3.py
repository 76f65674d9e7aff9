"""``S3Store``: session transcripts as immutable part objects in an S3 bucket.

Storage layout under ``prefix`` (``"tenant-a"`` is used as ``"tenant-a/"``), with
``<P>``, ``<S>`` and ``<SUB>`` the encoded project key, session id and subpath,
and ``T`` a transcript's prefix ``{prefix}<P>/<S>/parts/`` (main key) or
``{prefix}<P>/<S>/subkeys/<SUB>/parts/`` (a subagent transcript)::

    T{first:012d}.jsonl                 part: one append (or a blank, or a guard)
    T{first:012d}-{last:012d}.jsonl     segment: compacted parts
    T{offset:012d}.marks.json           marks checkpoint: {"marks": {producer: seq}}
    {prefix}<P>/@summaries/<S>.json     summary sidecar (main keys only)

Objects hold JSONL: one entry per line, the canonical bytes of
``walmirror.protocol.encode_entry``, each followed by ``"\\n"``. Offsets are
zero-padded to 12 digits, so names sort like their offsets. A part's user
metadata says ``entries`` (its entry count) and, when a producer wrote it
through ``append_batch``, ``producer`` and ``seq`` (the batch's last seq stored
in it); plain ``append`` parts have no producer. A part's *name is never
freed* while the key exists: compaction and delete empty a part (a *blank*, 0
bytes) instead of deleting it. A *guard* is a 1-byte part (``"\\n"``) written
by ``delete``: it takes one offset, and the live transcript starts after the
newest guard. The listing's sizes tell the kinds apart (a part holds at least
``{}\\n``), so reading the layout needs no HEAD.

Key encoding. Every part of a key is percent-encoded as UTF-8, as
``urllib.parse.quote(part, safe="")`` does: each byte outside ``A-Z a-z 0-9 - . _
~`` becomes ``%XX``, ``%`` and ``/`` included, and a subpath is encoded whole
(``subagents/agent-1`` is ``subagents%2Fagent-1``). The encoding is injective and
an encoded part never contains ``/``, so no key can reach into another key's
prefix; ``validate_key`` has already refused ``.``/``..``, empty parts and control
characters. ``@`` is always encoded, so ``@summaries`` cannot be a session's
name. A key whose longest object name would pass S3's 1,024-byte limit is refused
with ``InvalidKeyError`` before anything is sent.

Marks (``walmirror.protocol``). A producer's mark as of offset ``L`` is the
newest checkpoint at or below ``L``, folded with the ``producer``/``seq``
metadata of the parts from that checkpoint up to ``L`` (one HEAD per part,
cached per object name: parts never change; a writer knows its own parts'
metadata). Checkpoints are written by compaction and delete *before* they blank
any part below them, so every blanked part's seqs are in a checkpoint. A
checkpoint's content is a function of the transcript's history up to its
offset (sorted keys), so concurrent compactors on several hosts write the same
bytes; each writes with ``IfNoneMatch`` and reuses one that exists. Marks live
in the same bucket as the entries: a bucket that loses its data loses them too
(then ``append_batch`` with ``expect`` raises ``MarkBehindError``).

The atomic step (``append_batch``) is the conditional put (``IfNoneMatch="*"``)
of the next part at ``T{end}.jsonl``, where ``end`` is the key's end. The store
decides skip / ``MarkBehindError`` / append from the producer's mark *as of
exactly that end*, then puts the part holding the entries past the mark. If the
put fails (412: another writer, or a delete's guard, took that offset) it lists
the key again, recomputes end and marks, and decides again. The put lands only
if ``end`` is still the true end: every offset a part (or guard) ever started
at keeps its name, so a put at an older end (a cached end another host wrote
past, compacted or deleted since) always fails; a landed part therefore extends
exactly the state it was decided on. The store caches each key's tail (end,
marks as of it, last object): in the steady state an append is one PUT. A key
it knows nothing of is listed first. A
decision that writes nothing (a full repeat) or raises ``MarkBehindError`` is
never taken from the cache: it is made again on a fresh listing. A cached tail
older than ``length_cache_ttl`` seconds is confirmed with a HEAD of its last
object, and any transport error (the server may have restarted) drops every
cache, so a bucket that lost its data is re-listed rather than continued with a
hole. The receipt's ``length`` counts the live transcript (from its base).

Deletes. ``delete(key)`` *seals* each transcript (the key's, and for a main key
each subkey's): it computes the marks at the end ``E``, writes the checkpoint
``T{E}.marks.json``, then puts the guard at ``T{E}.jsonl`` with ``IfNoneMatch``
(if an append took ``E`` first, it learns the new end and seals there). From
the guard on, the transcript is empty, its marks are the checkpoint's (the
tombstone), and the next append lands at ``E + 1``: a fresh transcript whose
marks start from the tombstone's, so a retry from before the delete is skipped
and a new batch (higher seqs) is kept. A writer still caching the old end
fails its put on the guard (or on an older name) and re-learns. Then (main
key) the summary sidecar is deleted, and every part below the guard is blanked
and every segment below it deleted: no entry of the deleted transcript stays
readable. What remains per transcript: the blanks and guards (0 and 1 bytes,
one per append and delete) and one checkpoint: that is the tombstone, and it
lives until an operator removes the transcript's prefix (``aws s3 rm --recursive
s3://bucket/{prefix}<P>/<S>/``), which is safe once no queue that wrote the key
still holds undelivered entries for it. A bucket lifecycle rule expiring
``{prefix}`` objects would remove tombstones and transcripts alike.

Reading. ``load`` lists the key and picks, above the newest guard, a cover: at
every offset the widest segment that starts there, else the part; parts and
segments inside a chosen segment are leftovers of a compaction. The chosen
objects are fetched concurrently (at most ``max_concurrency`` at once), their
line counts are checked against the ranges their names imply, and they must join
without a gap or overlap from the base on; if an object vanished or the pieces do
not join (a compaction ran in between) the key is listed again, a few times,
before ``CorruptTranscriptError``. A listing grows by one name per append (blanks
stay), about one LIST page per thousand appends.

Compaction keeps ``load`` fast for sessions with thousands of appends. Windows
of ``compaction_windows`` entries (default 64, 1,024, 16,384, 262,144; each a
multiple of the one before): once a window is complete (an object starts after
it) and ``compaction_fanin`` or more objects start inside it, they are merged
into one segment named by its range, up to ``max_segment_bytes``. Which parts a
window merges depends only on the parts' offsets, so two compactors (or one that
crashed and the next) write the same segments, and segments of different levels
nest. Order, safe at every crash point and with compactors on several hosts:
the segment (conditional put; an existing one with the same bytes is reused: its
ETag is their MD5), then the marks checkpoint at the segment's end, then the
parts it covers are blanked (``IfMatch`` their ETag) and the segments it covers
deleted, then checkpoints below the newest are deleted. Readers use each offset
once (the segment wins) and the next compaction finishes what a crashed one
left, and blanks or deletes what a crashed delete left below its guard. The
last part of a key is never merged, so ``list_sessions``' mtime stays the time
of the last append. A compaction runs in the background after every
``compact_every`` appends a store makes to a key (``None``: only when
``compact(key)`` is called).

Summaries, folded exactly once with the SDK's ``fold_session_summary`` (main keys
only). The sidecar holds the ``SessionSummaryEntry`` plus ``folded`` (the offset
up to which it folded the transcript) and ``base`` (the live transcript's first
offset: a sidecar that outlived its transcript, say a write from another host
racing a delete, is rebuilt rather than continued). The store folds the entries
each append stores (a batch's skipped repeats are not stored and not folded)
into the summary it last wrote, and writes the sidecar ``summary_delay`` seconds
later (one write per key per delay, not one per append), conditionally on the
ETag it last wrote. When that fails (another writer), when it does not know the
sidecar (a fresh process), or when the stored ``folded`` lags the transcript (a
crash), it reads the sidecar and folds the stored entries from ``folded`` to the
transcript's end. ``list_session_summaries`` and ``close`` write pending
sidecars first. A summary's ``mtime`` is the sidecar's ``LastModified`` as
listed; a session's ``list_sessions`` mtime is the listed ``LastModified`` of its
last part. The sidecar is written after the parts it covers, so an up-to-date
summary is never older than its session, and one left behind says "stale".

Concurrency. Within one store, calls on one transcript are serialised by an
``asyncio.Lock``. Across hosts, the conditional put of the next part orders
appends and deletes; compaction never changes what a transcript holds or its
marks. S3 has no multi-object transactions: a delete that runs while another
host appends may keep that append (it lands after the guard, in the fresh
transcript), and a subkey first written while its main key is being deleted
survives the delete.

Client: ``aiobotocore`` (native asyncio). ``S3Store.connect(bucket, prefix,
endpoint_url, **client_kwargs)`` creates and owns a client (credentials and
region from the usual AWS sources; region ``us-east-1`` if none is configured;
path-style addressing when ``endpoint_url`` is given, for MinIO and moto).
``S3Store.from_url("s3://bucket/prefix?endpoint_url=...")`` does the same on
first use (it needs no event loop to build). Or pass an existing client to
``S3Store(client, bucket, prefix)``. Either way the
store turns off botocore's ``Expect: 100-continue`` on PUTs (the wait for the
server's "100 Continue" is not covered by the read timeout: on a dead
connection the PUT would hang). Conditional
writes (``If-None-Match``, ``If-Match`` on PUT) are required: AWS S3 has them,
as do MinIO and moto 5; ``check()`` probes for them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
import weakref
from bisect import bisect_right, insort
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from itertools import pairwise
from types import TracebackType
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore.exceptions import ClientError  # type: ignore[import-untyped]
from botocore.handlers import add_expect_header  # type: ignore[import-untyped]
from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)

from walmirror.backends import fold_batch, fold_summary
from walmirror.errors import (
    CorruptTranscriptError,
    InvalidEntryError,
    InvalidKeyError,
    MarkBehindError,
    PermanentBackendError,
    WalmirrorError,
)
from walmirror.keys import describe_key, validate_key, validate_project_key
from walmirror.protocol import (
    Batch,
    Receipt,
    check_batch,
    decode_array,
    encode_entry,
    skip_count,
)

__all__ = ["CorruptTranscriptError", "S3ConcurrencyError", "S3PermanentError", "S3Store"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_OFFSET = 10**12 - 1
"""Offsets are written with 12 digits."""

_PART_NAME = re.compile(r"(\d{12})(?:-(\d{12}))?\.jsonl")
_CHECKPOINT_NAME = re.compile(r"(\d{12})\.marks\.json")
_GUARD_BODY = b"\n"  # a delete's guard: one byte (a part holds at least "{}\n", a blank 0)
_SUMMARIES = "@summaries/"
_SIDECAR_SUFFIX = ".json"
_MAX_KEY_BYTES = 1024
_LONGEST_PART_NAME = len(f"{0:012d}-{0:012d}.jsonl")
_DELETE_CHUNK = 1000  # DeleteObjects takes at most 1,000 keys
_RETRIES = 5  # re-listings after a view a compaction changed
_RACE_RETRIES = 100  # lost conditional puts in a row: each one means another writer progressed
_MAX_STATES = 4096  # per-key caches kept (least recently used beyond are dropped)
_MAX_FACTS = 65536  # part metadata and checkpoint contents cached (they never change)

# Error codes a retry cannot fix: the key is parked until an operator acts.
_PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "KeyTooLongError",
        "EntityTooLarge",
        "InvalidObjectState",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})


class S3PermanentError(PermanentBackendError):
    """S3 refused a request for a reason retrying cannot fix (permission, bucket, size)."""


class S3ConcurrencyError(WalmirrorError):
    """Other writers kept changing a key while this store tried to append to it.

    Retryable: the next attempt lists the key again.
    """


# ----------------------------------------------------------------------
# Small value types
# ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Names:
    """Where one transcript's objects live."""

    key: SessionKey
    parts: str  # prefix of the transcript's parts, segments and checkpoints, ends with "/"
    session: str  # prefix of everything of the session, ends with "/"
    sidecar: str  # the session's summary sidecar

    @property
    def main(self) -> bool:
        return "subpath" not in self.key


@dataclass(frozen=True, slots=True)
class _Object:
    """A part (``last is None``: its end follows from what comes next), a segment,
    a blank (a part emptied by compaction or delete) or a guard (a delete)."""

    key: str
    first: int
    last: int | None
    etag: str
    size: int
    modified_ms: int

    @property
    def blank(self) -> bool:
        return self.last is None and self.size == 0

    @property
    def guard(self) -> bool:
        return self.last is None and self.size == len(_GUARD_BODY)


@dataclass(frozen=True, slots=True)
class _PartFacts:
    """What a part's metadata says; fixed once the part is written."""

    count: int
    producer: str | None
    seq: int | None


@dataclass(slots=True)
class _View:
    """A listing of one transcript: the live objects that hold each offset once, and
    what the marks are computed from. Offsets are absolute (object names)."""

    cover: list[_Object]  # live, sorted by first offset
    garbage: list[_Object]  # live objects inside a chosen segment: compaction leftovers
    dead: list[_Object]  # below the newest guard: a deleted transcript's leftovers
    parts: list[_Object]  # live parts (blanks included), sorted: the marks fold over these
    checkpoints: list[tuple[int, str]]  # (offset, object name), sorted
    guard: _Object | None  # the newest delete
    end: int | None  # one past the last entry; None: the last part was not counted

    @property
    def base(self) -> int:
        """The live transcript's first offset (entries before it were deleted)."""
        return 0 if self.guard is None else self.guard.first + 1

    def ranges(self) -> list[tuple[_Object, int, int | None]]:
        """Each cover object with the offsets it must hold (``None``: open end)."""
        out: list[tuple[_Object, int, int | None]] = []
        for i, obj in enumerate(self.cover):
            if obj.last is not None:
                end: int | None = obj.last
            elif i + 1 < len(self.cover):
                end = self.cover[i + 1].first - 1
            else:
                end = None if self.end is None else self.end - 1
            out.append((obj, obj.first, end))
        return out


@dataclass(slots=True)
class _Tail:
    """What this store knows of a key's end: the state its next part extends.

    A hint: the conditional put of the part at ``end`` fails unless ``end`` is
    still the true end, and then every fact here is still true (see the module
    docstring)."""

    end: int
    base: int
    marks: dict[str, int]  # each producer's mark as of ``end``
    name: str | None  # last object (None when the key has none)
    checked: float  # time.monotonic() when S3 last confirmed it (listing, put or HEAD)


@dataclass(slots=True)
class _Summary:
    """The summary this store folded for a session, and the sidecar it builds on."""

    summary: SessionSummaryEntry | None
    folded: int  # absolute offset: entries base .. folded - 1 are in the summary
    etag: str | None  # ETag of the stored sidecar this extends; None: none stored
    dirty: bool  # folded more than the stored sidecar holds
    base: int  # the transcript's first offset: a sidecar of another base is stale


@dataclass(slots=True)
class _KeyState:
    tail: _Tail | None = None
    summary: _Summary | None = None  # None: unknown, the next sidecar write catches up
    appends: int = 0  # since the last compaction was scheduled


@dataclass(eq=False)
class _Compaction:
    aborted: bool = False


@dataclass(eq=False)
class _SidecarJob:
    names: _Names
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


# ----------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------


class S3Store(SessionStore):
    """A ``SessionStore`` (and ``walmirror.protocol.ProducerStore``) keeping transcripts in S3.

    ``client`` is an aiobotocore S3 client; the store does not close it (use
    ``connect`` or ``from_url`` for a store that owns its client). Tuning, all
    optional:

    ``compact_every``
        Appends this store makes to a key between background compactions of it
        (``None``: never in the background; call ``compact``).
    ``compaction_windows``, ``compaction_fanin``, ``max_segment_bytes``
        Which objects a compaction merges; see the module docstring.
    ``summary_delay``
        Seconds a summary sidecar write waits to take more appends along.
    ``length_cache_ttl``
        Seconds a cached key end is trusted before a HEAD confirms its last
        object still exists (a bucket that lost its data is re-listed).
    ``max_concurrency``
        Requests one ``load``, listing or compaction has in flight at once.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        compact_every: int | None = 32,
        compaction_windows: tuple[int, ...] = (64, 1024, 16384, 262144),
        compaction_fanin: int = 4,
        max_segment_bytes: int = 64 << 20,
        summary_delay: float = 1.0,
        length_cache_ttl: float = 1.0,
        max_concurrency: int = 16,
    ) -> None:
        if not isinstance(bucket, str) or not bucket:
            raise ValueError("bucket must be a non-empty string")
        if compact_every is not None and compact_every < 1:
            raise ValueError("compact_every must be at least 1, or None")
        windows = tuple(compaction_windows)
        if any(w < 2 for w in windows) or any(b % a for a, b in pairwise(windows)):
            raise ValueError(
                "compaction_windows must be increasing sizes >= 2, each a multiple of the last"
            )
        if len(set(windows)) != len(windows):
            raise ValueError("compaction_windows must not repeat a size")
        if compaction_fanin < 2 or max_segment_bytes < 1 or max_concurrency < 1:
            raise ValueError(
                "compaction_fanin must be >= 2, max_segment_bytes and max_concurrency >= 1"
            )
        if summary_delay < 0 or length_cache_ttl < 0:
            raise ValueError("summary_delay and length_cache_ttl must not be negative")
        self._client: Any = None
        self._opener: _Opener | None = None  # makes an owned client on first use
        self._opening = asyncio.Lock()
        if client is not None:
            self._use(client)
        self._bucket = bucket
        self._prefix = _normalise_prefix(prefix)
        self._compact_every = compact_every
        self._windows = windows
        self._fanin = compaction_fanin
        self._max_segment_bytes = max_segment_bytes
        self._summary_delay = summary_delay
        self._length_cache_ttl = length_cache_ttl
        self._max_concurrency = max_concurrency
        self._states: OrderedDict[str, _KeyState] = OrderedDict()
        # Part metadata and checkpoint contents by object name: written once, never
        # changed (a blank or guard is another kind of object under the same name).
        self._facts: OrderedDict[str, _PartFacts | dict[str, int]] = OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._sidecar_jobs: dict[str, _SidecarJob] = {}
        self._compactions: dict[str, tuple[_Compaction, asyncio.Future[Any]]] = {}
        self._compaction_slots = asyncio.Semaphore(2)
        self._exit_stack = AsyncExitStack()
        self._closed = False

    def _use(self, client: Any) -> None:
        # botocore sends PUTs with "Expect: 100-continue"; the wait for "100
        # Continue" escapes the read timeout, so a PUT on a dead connection would
        # hang (holding the key) until the caller gives up. Bodies here are small.
        client.meta.events.unregister("before-call.s3", add_expect_header)
        self._client = client

    @classmethod
    async def connect(
        cls,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        *,
        compact_every: int | None = 32,
        compaction_windows: tuple[int, ...] = (64, 1024, 16384, 262144),
        compaction_fanin: int = 4,
        max_segment_bytes: int = 64 << 20,
        summary_delay: float = 1.0,
        length_cache_ttl: float = 1.0,
        max_concurrency: int = 16,
        **client_kwargs: Any,
    ) -> S3Store:
        """A store with its own aiobotocore client; ``close()`` closes it.

        ``client_kwargs`` go to ``AioSession.create_client("s3", ...)``
        (``region_name``, ``aws_access_key_id``, ``config``...; ``session``: an
        ``AioSession`` to use). A ``config`` is merged over the defaults:
        connect timeout 5 s, read timeout 30 s, standard retry mode with 3
        attempts, a connection pool sized for ``max_concurrency``, path-style
        addressing with ``endpoint_url`` (and, on a plain-HTTP endpoint, no
        SHA-256 of each body: the signed CRC32 checksum header covers it, as
        botocore already does over HTTPS). Nothing is sent to S3 here:
        ``check()`` tests the bucket.
        """
        store = cls(
            None,
            bucket,
            prefix,
            compact_every=compact_every,
            compaction_windows=compaction_windows,
            compaction_fanin=compaction_fanin,
            max_segment_bytes=max_segment_bytes,
            summary_delay=summary_delay,
            length_cache_ttl=length_cache_ttl,
            max_concurrency=max_concurrency,
        )
        store._opener = _opener(endpoint_url, max_concurrency, client_kwargs)
        await store._open()
        return store

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        """The store ``s3://bucket/prefix?endpoint_url=...`` names; connects on first use.

        Query parameters (all optional): ``endpoint_url`` (else the AWS default,
        or ``AWS_ENDPOINT_URL_S3``), ``region``, and the tuning knobs
        ``compact_every`` (an int, or ``none``), ``summary_delay``,
        ``length_cache_ttl``, ``max_concurrency``. Credentials come from the
        environment (``AWS_ACCESS_KEY_ID``..., profiles, instance roles), never
        from the URL. Error messages never repeat the URL.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise ValueError("S3Store.from_url takes s3://bucket/prefix URLs")
        if "@" in parts.netloc:
            raise ValueError(
                "s3:// URLs take no credentials; they come from the environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or a role)"
            )
        if not parts.netloc:
            raise ValueError("s3:// URL has no bucket: use s3://bucket/prefix")
        if parts.fragment:
            raise ValueError("s3:// URLs take no fragment")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - _URL_PARAMETERS)
        if unknown:
            raise ValueError(
                f"s3:// URL: unknown parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(_URL_PARAMETERS))}"
            )
        if any(len(values) != 1 for values in query.values()):
            raise ValueError("s3:// URL: each parameter may be given once")
        given = {name: values[0] for name, values in query.items()}
        tuning: dict[str, Any] = {}
        try:
            if "compact_every" in given:
                every = given["compact_every"]
                tuning["compact_every"] = None if every.lower() == "none" else int(every)
            for name in ("summary_delay", "length_cache_ttl"):
                if name in given:
                    tuning[name] = float(given[name])
            if "max_concurrency" in given:
                tuning["max_concurrency"] = int(given["max_concurrency"])
        except ValueError:
            raise ValueError("s3:// URL: a tuning parameter is not a number") from None
        client_kwargs: dict[str, Any] = {}
        if given.get("region"):
            client_kwargs["region_name"] = given["region"]
        store = cls(None, parts.netloc, unquote(parts.path), **tuning)
        store._opener = _opener(
            given.get("endpoint_url") or None, store._max_concurrency, client_kwargs
        )
        return store

    async def _open(self) -> Any:
        """The client, created by ``_opener`` the first time it is needed."""
        async with self._opening:
            if self._client is None:
                if self._closed:
                    raise WalmirrorError(f"{self!r} is closed")
                if self._opener is None:
                    raise WalmirrorError(f"{self!r} has no client")
                self._use(await self._exit_stack.enter_async_context(self._opener()))
            return self._client

    @property
    def client(self) -> Any:
        """The aiobotocore client (``None`` until ``from_url``'s store first connects)."""
        return self._client

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        """The key prefix, normalised: ``""`` or ending with ``"/"``."""
        return self._prefix

    @property
    def cursor_name(self) -> str:
        """How a walmirror queue names its cursor for this backend: ``s3://bucket/prefix``."""
        return f"s3://{self._bucket}/{self._prefix.rstrip('/')}".rstrip("/")

    def __repr__(self) -> str:
        return f"S3Store({self.cursor_name!r})"

    async def close(self, timeout: float | None = 10.0) -> None:
        """Write pending summary sidecars (for up to ``timeout`` seconds), stop
        background compactions (safe at any point) and close an owned client."""
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(timeout):
                await self._flush_sidecars(None)
        except TimeoutError:
            logger.warning("%r: close: summary sidecars still pending after %ss", self, timeout)
        tasks: list[asyncio.Future[Any]] = [task for _, task in self._compactions.values()]
        tasks += [job.task for job in self._sidecar_jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with self._opening:
            await self._exit_stack.aclose()
            if self._opener is not None:
                self._client = None  # owned and closed: later calls say "closed"

    async def aclose(self) -> None:
        """``close()``, under the name ``redis.asyncio`` and ``RedisStore`` use."""
        await self.close()

    async def __aenter__(self) -> S3Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------
    # SessionStore
    # ------------------------------------------------------------------

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Append ``entries`` after whatever the key holds (no producer, no dedupe)."""
        names = self._names(key)
        if not isinstance(entries, list):
            raise InvalidEntryError(f"{describe_key(names.key)}: entries must be a list")
        lines: list[bytes] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise InvalidEntryError(
                    f"{describe_key(names.key)}: entry {i} is a {type(entry).__name__}, "
                    "not a JSON object"
                )
            try:
                lines.append(encode_entry(entry))
            except (TypeError, ValueError, RecursionError) as exc:
                # The message of a json/encoding error can quote content; keep only its type.
                raise InvalidEntryError(
                    f"{describe_key(names.key)}: entry {i} is not JSON-serialisable "
                    f"({type(exc).__name__})"
                ) from None
        if lines:
            async with self._lock(names.parts):
                await self._append(names, None, lines, entries)

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """All entries of ``key`` in order, or ``None`` if it holds none."""
        names = self._names(key)
        view: _View | None = None
        for _ in range(_RETRIES):
            if view is None:
                view = await self._scan(names, count_last=False)
            if not view.cover:
                self._learned_empty(names, view)
                return None
            try:
                lines = await self._read_lines(names, view, view.base, None)
            except _StaleView:
                view = None
                continue
            return _parse_lines(names.key, lines)
        raise self._no_cover(names)

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """Sessions with a main transcript; ``mtime``: epoch ms of its last part."""
        base = self._project_prefix(project_key)
        _, prefixes = await self._list(base, delimiter="/")
        sessions: list[tuple[str, str]] = []
        for prefix in prefixes:
            encoded = prefix[len(base) : -1]
            session_id = _decode(encoded)
            if session_id is None:
                continue  # "@summaries", or an object this store did not write
            try:
                validate_key({"project_key": project_key, "session_id": session_id})
            except InvalidKeyError:
                continue
            sessions.append((session_id, prefix + "parts/"))

        async def newest(parts_prefix: str) -> int | None:
            view = await self._view(parts_prefix)
            return view.cover[-1].modified_ms if view.cover else None  # None: deleted

        mtimes = await self._bounded([newest(p) for _, p in sessions])
        return [
            {"session_id": sid, "mtime": mtime}
            for (sid, _), mtime in zip(sessions, mtimes, strict=True)
            if mtime is not None
        ]

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """The project's summary sidecars (pending ones are written first)."""
        base = self._project_prefix(project_key)
        await self._flush_sidecars(base)
        objects, _ = await self._list(base + _SUMMARIES)

        async def read(item: dict[str, Any]) -> SessionSummaryEntry | None:
            name = item["Key"][len(base) + len(_SUMMARIES) :]
            if not name.endswith(_SIDECAR_SUFFIX):
                return None
            session_id = _decode(name[: -len(_SIDECAR_SUFFIX)])
            got = await self._get(item["Key"])
            if got is None or session_id is None:
                return None  # deleted since the listing
            summary, _, _ = _parse_sidecar(got[0], item["Key"])
            if summary is None or summary["session_id"] != session_id:
                return None
            summary["mtime"] = _epoch_ms(item["LastModified"])
            return summary

        found = await self._bounded([read(item) for item in objects])
        return [s for s in found if s is not None]

    async def delete(self, key: SessionKey) -> None:
        """Delete a transcript (a main key: its subagent transcripts and sidecar too),
        keeping every producer's mark: see "Deletes" in the module docstring."""
        names = self._names(key)
        transcripts = [names]
        if names.main:
            transcripts += [
                self._names({**names.key, "subpath": subpath})
                for subpath in await self._subpaths(names, live_only=False)
            ]
        prefix = names.session if names.main else names.parts
        for job_key, (job, _) in self._compactions.items():
            if job_key.startswith(prefix):
                job.aborted = True
        for transcript in transcripts:
            async with self._lock(transcript.parts):
                await self._seal(transcript)
        if names.main:
            async with self._lock(names.parts):
                self._state(names).summary = None
                await self._delete_keys([names.sidecar])
        for transcript in transcripts:  # the deleted entries' bytes: blanked, deleted
            await self._sweep(transcript, await self._scan(transcript, count_last=False))

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """Subpaths of the session's subagent transcripts that hold entries, sorted."""
        k = validate_key(key)  # a stray subpath is validated, then ignored
        names = self._names({"project_key": k["project_key"], "session_id": k["session_id"]})
        return await self._subpaths(names, live_only=True)

    async def _subpaths(self, names: _Names, *, live_only: bool) -> list[str]:
        base = names.session + "subkeys/"
        _, prefixes = await self._list(base, delimiter="/")
        subkeys: list[str] = []
        for prefix in prefixes:
            subpath = _decode(prefix[len(base) : -1])
            if subpath is None:
                continue
            try:
                validate_key({**names.key, "subpath": subpath})
            except InvalidKeyError:
                continue
            subkeys.append(subpath)
        if live_only:  # a deleted subkey keeps its guard and marks under its prefix

            async def live(subpath: str) -> bool:
                return bool((await self._view(f"{base}{_encode(subpath)}/parts/")).cover)

            alive = await self._bounded([live(s) for s in subkeys])
            subkeys = [s for s, a in zip(subkeys, alive, strict=True) if a]
        return sorted(subkeys)

    # ------------------------------------------------------------------
    # The protocol (walmirror.protocol.ProducerStore)
    # ------------------------------------------------------------------

    async def append_batch(self, key: SessionKey, batch: Batch) -> Receipt:
        """The protocol's atomic step: the conditional put of the next part (see the
        module docstring and ``walmirror.protocol``)."""
        names = self._names(key)
        check_batch(describe_key(names.key), batch)
        # The part's body, and the check that each entry is one non-empty line.
        body = b"\n".join([*batch.encoded, b""])
        if not all(batch.encoded) or body.count(b"\n") != len(batch):
            raise ValueError(f"{describe_key(names.key)}: encoded must hold one JSON line each")
        async with self._lock(names.parts):
            return await self._append(names, batch, batch.encoded, None, body)

    async def producer_mark(self, key: SessionKey, producer: str) -> int | None:
        """The highest seq of ``producer`` stored for ``key`` (``None``: none). Lists."""
        names = self._names(key)
        async with self._lock(names.parts):
            tail = await self._learn(names)
        return tail.marks.get(producer)

    async def ping(self) -> None:
        """The health call (``walmirror.protocol``): one ``HeadBucket``."""
        await self._request("head_bucket", Bucket=self._bucket)

    async def length(self, key: SessionKey) -> int:
        """How many entries ``key`` holds (0 if never written or deleted). Always lists."""
        names = self._names(key)
        view = await self._scan(names, count_last=True)
        assert view.end is not None
        return view.end - view.base

    # ------------------------------------------------------------------
    # Maintenance
    # ------------------------------------------------------------------

    async def compact(self, key: SessionKey) -> int:
        """Merge the key's complete windows of small objects into segments, blank the
        parts they replace, and clean up after interrupted compactions and deletes.
        Returns how many objects were blanked or deleted. Safe at any time, from any
        host."""
        names = self._names(key)
        running = self._compactions.get(names.parts)
        if running is not None:
            await asyncio.gather(running[1], return_exceptions=True)
        job = _Compaction()
        task = asyncio.ensure_future(self._compact(names, job))
        self._compactions[names.parts] = (job, task)
        try:
            return await task
        finally:
            entry = self._compactions.get(names.parts)
            if entry is not None and entry[1] is task:
                del self._compactions[names.parts]

    async def check(self) -> list[str]:
        """Problems with the bucket, for ``walmirror verify``/``status``: empty when fine.

        Checks that the bucket answers and that conditional writes are refused
        as they must be (a server ignoring ``If-None-Match`` would let two
        writers overwrite each other's parts).
        """
        problems: list[str] = []
        try:
            await self._request("head_bucket", Bucket=self._bucket)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES | {"NoSuchBucket"}:
                return [f"bucket {self._bucket!r} does not exist"]
            return [f"bucket {self._bucket!r}: {_code(exc)}"]
        except S3PermanentError as exc:
            return [str(exc)]
        probe = f"{self._prefix}@probe/{secrets.token_hex(8)}"
        try:
            await self._request(
                "put_object", Bucket=self._bucket, Key=probe, Body=b"", IfNoneMatch="*"
            )
            try:
                await self._request(
                    "put_object", Bucket=self._bucket, Key=probe, Body=b"", IfNoneMatch="*"
                )
                problems.append("the server ignores If-None-Match: conditional writes are required")
            except ClientError as exc:
                if _code(exc) not in _PRECONDITION_CODES:
                    problems.append(f"conditional put probe: {_code(exc)}")
        finally:
            await self._delete_keys([probe])
        return problems

    # ------------------------------------------------------------------
    # Keys and names
    # ------------------------------------------------------------------

    def _names(self, key: Any) -> _Names:
        k = validate_key(key)
        project = self._project_prefix(k["project_key"])
        session_id = _encode(k["session_id"])
        session = f"{project}{session_id}/"
        subpath = k.get("subpath")
        parts = (
            session + "parts/" if subpath is None else f"{session}subkeys/{_encode(subpath)}/parts/"
        )
        sidecar = f"{project}{_SUMMARIES}{session_id}{_SIDECAR_SUFFIX}"
        longest = max(len(parts.encode()) + _LONGEST_PART_NAME, len(sidecar.encode()))
        if longest > _MAX_KEY_BYTES:
            raise InvalidKeyError(
                f"{describe_key(k)}: too long for S3 once encoded "
                f"({longest} bytes, at most {_MAX_KEY_BYTES})"
            )
        return _Names(k, parts, session, sidecar)

    def _project_prefix(self, project_key: str) -> str:
        return f"{self._prefix}{_encode(validate_project_key(project_key))}/"

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[name] = lock
        return lock

    def _state(self, names: _Names) -> _KeyState:
        state = self._states.get(names.parts)
        if state is None:
            state = self._states[names.parts] = _KeyState()
            while len(self._states) > _MAX_STATES:
                self._states.popitem(last=False)  # dropping a cache is always safe
        else:
            self._states.move_to_end(names.parts)
        return state

    # ------------------------------------------------------------------
    # Appending: the atomic step
    # ------------------------------------------------------------------

    async def _append(
        self,
        names: _Names,
        batch: Batch | None,
        lines: Sequence[bytes],
        entries: list[SessionStoreEntry] | None,
        body: bytes | None = None,
    ) -> Receipt:
        """Append ``batch`` (or, with ``batch=None``, the plain ``entries``) at the
        key's end. Called under the transcript's lock. ``body``: all of ``lines``
        as a part holds them (each followed by a newline), when the caller has it.

        The decision (skip, ``MarkBehindError``, append) is made against a tail:
        the end and the marks as of that end. The conditional put of the part at
        that end lands only if it is still the true end (every name at or below it
        exists), so a landed part always extends exactly the state it was decided
        on. A lost put, a full skip or a ``MarkBehindError`` decided on a cached
        tail is decided again on a fresh listing."""
        desc = describe_key(names.key)
        state = self._state(names)
        tail = await self._trusted_tail(names, state)
        listed = False  # is ``tail`` from a listing made during this call?
        for _ in range(_RACE_RETRIES):
            if tail is None:
                tail = await self._learn(names)
                listed = True
            skip = 0
            mark: int | None = None
            if batch is not None:
                mark = tail.marks.get(batch.producer)
                try:
                    skip = skip_count(desc, batch, mark)
                except MarkBehindError:
                    if listed:
                        raise
                    tail = None  # the cache may be behind (or the bucket lost data)
                    continue
                if skip == len(batch):
                    if not listed:
                        tail = None  # answer a repeat from S3, not from a cache
                        continue
                    assert mark is not None
                    return Receipt(0, mark, tail.end - tail.base)
            new_lines = lines[skip:]
            start = tail.end
            if start + len(new_lines) - 1 > MAX_OFFSET:
                raise InvalidEntryError(f"{desc}: offsets past {MAX_OFFSET}")
            part = _part_name(names, start)
            metadata = {"entries": str(len(new_lines))}
            if batch is not None:
                metadata["producer"] = batch.producer
                metadata["seq"] = str(batch.last_seq)
            part_body = body if body is not None and not skip else b"\n".join([*new_lines, b""])
            try:
                await self._request(
                    "put_object",
                    Bucket=self._bucket,
                    Key=part,
                    Body=part_body,
                    IfNoneMatch="*",
                    ContentType="application/x-ndjson",
                    Metadata=metadata,
                )
            except ClientError as exc:
                if _code(exc) not in _PRECONDITION_CODES:
                    raise
                tail = state.tail = None  # another writer (or a delete) took this offset
                listed = False
                continue
            producer = None if batch is None else batch.producer
            seq = None if batch is None else batch.last_seq
            self._remember(part, _PartFacts(len(new_lines), producer, seq))
            marks = dict(tail.marks)
            if batch is not None:
                marks[batch.producer] = batch.last_seq
            end = start + len(new_lines)
            state.tail = _Tail(end, tail.base, marks, part, time.monotonic())
            self._after_append(names, state, start, tail.base, len(new_lines), batch, skip, entries)
            return Receipt(len(new_lines), batch.last_seq if batch else -1, end - tail.base)
        raise S3ConcurrencyError(f"{desc}: the key kept changing under this append; retry")

    async def _trusted_tail(self, names: _Names, state: _KeyState) -> _Tail | None:
        """The cached tail; older than ``length_cache_ttl``, confirmed by a HEAD of its
        last object (gone: the bucket lost data, or a compaction merged a segment)."""
        tail = state.tail
        if tail is None or tail.name is None:
            return tail  # an empty key: the conditional put alone is enough
        if time.monotonic() - tail.checked <= self._length_cache_ttl:
            return tail
        try:
            await self._request("head_object", Bucket=self._bucket, Key=tail.name)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                state.tail = None
                return None
            raise
        tail.checked = time.monotonic()
        return tail

    async def _learn(self, names: _Names) -> _Tail:
        """List the key and compute its tail: the end and every producer's mark as of
        it. Caches and returns it."""
        for _ in range(_RETRIES):
            view = await self._scan(names, count_last=True)
            assert view.end is not None
            marks = await self._marks_at(view, view.end)
            if marks is None:
                continue  # the listing is out of date: a compaction or delete ran
            last = view.cover[-1] if view.cover else view.guard
            tail = _Tail(
                view.end,
                view.base,
                marks,
                None if last is None else last.key,
                time.monotonic(),
            )
            self._state(names).tail = tail
            return tail
        raise S3ConcurrencyError(
            f"{describe_key(names.key)}: could not learn the producers' marks; retry"
        )

    def _learned_empty(self, names: _Names, view: _View) -> None:
        """A listing found nothing at all under the key (no part, no delete, no
        checkpoint): the tail ``_learn`` would compute is the empty one, so cache it
        unless an append cached a tail since. The flusher loads a key new to its
        queue right before its first delivery; this spares that put a second listing
        (a writer that lands first makes the put's condition fail, as always)."""
        if view.cover or view.parts or view.checkpoints or view.guard or view.dead:
            return
        state = self._state(names)
        if state.tail is None:
            state.tail = _Tail(0, 0, {}, None, time.monotonic())

    async def _marks_at(self, view: _View, offset: int) -> dict[str, int] | None:
        """Each producer's mark as of ``offset``: the newest checkpoint at or below it,
        folded with the metadata of the parts from there to ``offset``. ``None`` when
        ``view`` is out of date (a checkpoint vanished, a part it counts was blanked)."""
        start, marks = 0, {}
        at = bisect_right(view.checkpoints, (offset, "\uffff")) - 1
        if at >= 0:
            start, name = view.checkpoints[at]
            got = await self._checkpoint(name)
            if got is None:
                return None
            marks = dict(got)
        if view.guard is not None and start < view.guard.first:
            return None  # a delete writes its checkpoint before its guard: not seen yet
        parts = [p for p in view.parts if start <= p.first < offset]
        if any(p.blank for p in parts):
            return None  # blanked after a newer checkpoint this listing missed
        facts = await self._bounded([self._part_facts(p) for p in parts])
        for found in facts:
            if found is None:
                return None
            if found.producer is not None and found.seq is not None:
                marks[found.producer] = max(marks.get(found.producer, found.seq), found.seq)
        return marks

    async def _checkpoint(self, name: str) -> dict[str, int] | None:
        """A marks checkpoint's content (cached), ``None`` if it is gone."""
        cached = self._facts.get(name)
        if isinstance(cached, dict):
            return cached
        got = await self._get(name)
        if got is None:
            return None
        try:
            doc = json.loads(got[0])
            marks = doc["marks"]
            valid = isinstance(marks, dict) and all(
                isinstance(p, str) and isinstance(m, int) for p, m in marks.items()
            )
        except (ValueError, TypeError, KeyError):
            valid = False
        if not valid:
            raise CorruptTranscriptError(f"{name}: not a marks checkpoint")
        self._remember(name, marks)
        return cast(dict[str, int], marks)

    async def _put_checkpoint(
        self, names: _Names, view: _View, offset: int, marks: dict[str, int]
    ) -> None:
        """Write the marks as of ``offset`` (deterministic bytes: any writer of this
        checkpoint writes the same; an existing one is reused)."""
        name = _checkpoint_name(names, offset)
        body = encode_entry({"marks": dict(sorted(marks.items()))})
        try:
            await self._request(
                "put_object",
                Bucket=self._bucket,
                Key=name,
                Body=body,
                IfNoneMatch="*",
                ContentType="application/json",
            )
        except ClientError as exc:
            if _code(exc) not in _PRECONDITION_CODES:
                raise
        self._remember(name, dict(marks))
        if (offset, name) not in view.checkpoints:
            insort(view.checkpoints, (offset, name))

    async def _part_facts(self, part: _Object) -> _PartFacts | None:
        """A part's entry count, producer and last seq (cached); ``None`` if it is gone
        or blank."""
        cached = self._facts.get(part.key)
        if isinstance(cached, _PartFacts):
            return cached
        try:
            head = await self._request("head_object", Bucket=self._bucket, Key=part.key)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return None
            raise
        if int(head.get("ContentLength", 0)) <= len(_GUARD_BODY):
            return None  # blanked since the listing
        metadata = head.get("Metadata") or {}
        count_text = metadata.get("entries", "")
        if count_text.isdigit() and int(count_text) > 0:
            count = int(count_text)
        else:  # metadata lost (a copy by other tools)
            got = await self._get(part.key)
            if got is None:
                return None
            count = len(_split_lines(got[0], part.key))
        producer = metadata.get("producer")
        seq_text = metadata.get("seq", "")
        seq = int(seq_text) if producer and seq_text.isdigit() else None
        found = _PartFacts(count, producer if seq is not None else None, seq)
        self._remember(part.key, found)
        return found

    def _remember(self, name: str, fact: _PartFacts | dict[str, int]) -> None:
        self._facts[name] = fact
        self._facts.move_to_end(name)
        while len(self._facts) > _MAX_FACTS:
            self._facts.popitem(last=False)

    async def _seal(self, names: _Names) -> None:
        """A delete's atomic step: checkpoint the marks at the end, then take the end
        with a guard (a conditional put like any append). Under the transcript's lock."""
        for _ in range(_RACE_RETRIES):
            tail = await self._learn(names)
            if tail.end == tail.base:
                return  # holds no entries: nothing to delete
            view = await self._scan(names, count_last=False)
            await self._put_checkpoint(names, view, tail.end, tail.marks)
            guard = _part_name(names, tail.end)
            try:
                await self._request(
                    "put_object",
                    Bucket=self._bucket,
                    Key=guard,
                    Body=_GUARD_BODY,
                    IfNoneMatch="*",
                    ContentType="application/x-ndjson",
                )
            except ClientError as exc:
                if _code(exc) not in _PRECONDITION_CODES:
                    raise
                continue  # an append landed at the end meanwhile: seal after it
            base = tail.end + 1
            self._state(names).tail = _Tail(base, base, tail.marks, guard, time.monotonic())
            return
        raise S3ConcurrencyError(f"{describe_key(names.key)}: the key kept changing; retry")

    def _after_append(
        self,
        names: _Names,
        state: _KeyState,
        start: int,
        base: int,
        added: int,
        batch: Batch | None,
        skip: int,
        entries: list[SessionStoreEntry] | None,
    ) -> None:
        """Fold the ``added`` new entries (``batch``'s past ``skip``, or the plain
        ``entries``) into the pending summary; schedule sidecar and compaction."""
        if self._compact_every is not None:
            state.appends += 1
            if state.appends >= self._compact_every:
                state.appends = 0
                self._compact_in_background(names)
        if not names.main:
            return
        pending = state.summary
        if pending is None and start == base:
            # A new transcript: its summary starts from nothing. A sidecar left by
            # an earlier, deleted transcript makes the conditional write fail,
            # and the write then catches up from S3.
            pending = state.summary = _Summary(None, base, None, False, base)
        if pending is not None and pending.folded == start and pending.base == base:
            if batch is not None:
                pending.summary = fold_batch(pending.summary, names.key, batch, skip)
            else:
                pending.summary = fold_summary(pending.summary, names.key, entries or [])
            pending.folded += added
            pending.dirty = True
        else:
            state.summary = None  # unknown or out of step: the sidecar write catches up
        self._schedule_sidecar(names)

    # ------------------------------------------------------------------
    # Listing and reading
    # ------------------------------------------------------------------

    async def _scan(self, names: _Names, *, count_last: bool) -> _View:
        """List the transcript's objects; with ``count_last``, learn its end."""
        for _ in range(_RETRIES):
            view = await self._view(names.parts)
            if view.cover:
                last = view.cover[-1]
                if last.last is not None:
                    view.end = last.last + 1
                elif count_last:
                    found = await self._part_facts(last)
                    if found is None:
                        continue  # gone or blanked since the listing
                    view.end = last.first + found.count
            else:
                view.end = view.base
            return view
        raise S3ConcurrencyError(f"{describe_key(names.key)}: listing kept changing; retry")

    async def _view(self, parts_prefix: str) -> _View:
        """One listing of a transcript's prefix, sorted into a ``_View`` (end unknown)."""
        items, _ = await self._list(parts_prefix)
        objects: list[_Object] = []
        checkpoints: list[tuple[int, str]] = []
        for item in items:
            name = item["Key"][len(parts_prefix) :]
            match = _PART_NAME.fullmatch(name)
            if match is None:
                checkpoint = _CHECKPOINT_NAME.fullmatch(name)
                if checkpoint is not None:
                    checkpoints.append((int(checkpoint[1]), item["Key"]))
                continue  # else not ours
            first = int(match[1])
            last = None if match[2] is None else int(match[2])
            if last is not None and last < first:
                continue
            objects.append(
                _Object(
                    item["Key"],
                    first,
                    last,
                    item.get("ETag", ""),
                    int(item.get("Size", 0)),
                    _epoch_ms(item["LastModified"]),
                )
            )
        guards = [o for o in objects if o.guard]
        guard = max(guards, key=lambda o: o.first) if guards else None
        floor = -1 if guard is None else guard.first
        live = [o for o in objects if o.first > floor]
        dead = [o for o in objects if o.first <= floor and o is not guard]
        cover, garbage = _choose_cover(live)
        parts = sorted((o for o in live if o.last is None), key=lambda o: o.first)
        return _View(cover, garbage, dead, parts, sorted(checkpoints), guard, None)

    async def _read_lines(self, names: _Names, view: _View, lo: int, hi: int | None) -> list[bytes]:
        """The stored lines at offsets ``lo .. hi - 1`` (``None``: to the end).

        Raises ``_StaleView`` when an object vanished or the pieces do not join:
        the caller lists again.
        """
        wanted = [
            (obj, first, last)
            for obj, first, last in view.ranges()
            if (last is None or last >= lo) and (hi is None or first < hi)
        ]
        contents = await self._bounded([self._get(obj.key) for obj, _, _ in wanted])
        out: list[bytes] = []
        pos = lo
        for (obj, first, last), got in zip(wanted, contents, strict=True):
            if got is None:
                raise _StaleView
            lines = _split_lines(got[0], obj.key)
            if not lines or (last is not None and len(lines) != last - first + 1):
                raise _StaleView
            end = first + len(lines)  # one past the object's last offset
            if first > pos:
                raise _StaleView
            stop = end if hi is None else min(end, hi)
            out.extend(lines[pos - first : stop - first])
            pos = max(pos, stop)
        if hi is not None and pos < hi:
            raise _StaleView
        return out

    def _no_cover(self, names: _Names) -> CorruptTranscriptError:
        return CorruptTranscriptError(
            f"{describe_key(names.key)}: the transcript's objects in s3://{self._bucket}/"
            f"{names.parts} do not join up (a gap, or a count that does not match)"
        )

    async def _list(
        self, prefix: str, delimiter: str | None = None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """All objects (and common prefixes) under ``prefix``, every page."""
        objects: list[dict[str, Any]] = []
        prefixes: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:
            page = await self._request("list_objects_v2", **kwargs)
            objects.extend(page.get("Contents") or [])
            prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes") or [])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return objects, prefixes
            kwargs["ContinuationToken"] = token

    async def _get(self, key: str) -> tuple[bytes, str] | None:
        """An object's content and ETag, or ``None`` if it does not exist."""
        try:
            response = await self._request("get_object", Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return None
            raise
        try:
            async with response["Body"] as stream:
                body = await stream.read()
        except BaseException:
            self._forget_tails()
            raise
        return bytes(body), str(response.get("ETag", ""))

    async def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), _DELETE_CHUNK):
            chunk = keys[i : i + _DELETE_CHUNK]
            response = await self._request(
                "delete_objects",
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
            )
            errors = [e for e in response.get("Errors") or [] if e.get("Code") != "NoSuchKey"]
            if errors:
                raise S3PermanentError(
                    f"s3://{self._bucket}: could not delete {len(errors)} object(s) "
                    f"({errors[0].get('Code')})"
                )

    async def _request(self, operation: str, **kwargs: Any) -> Any:
        """One S3 call. Permanent refusals become ``S3PermanentError``; a transport
        failure drops every cached length (the server may have restarted)."""
        try:
            client = self._client if self._client is not None else await self._open()
            return await getattr(client, operation)(**kwargs)
        except ClientError as exc:
            code = _code(exc)
            if code in _PERMANENT_CODES or code == "403":
                raise S3PermanentError(
                    f"s3://{self._bucket}: {operation} refused ({code})"
                ) from None
            raise
        except BaseException:
            self._forget_tails()
            raise

    def _forget_tails(self) -> None:
        # The server may have restarted and lost data (moto, MinIO without disks):
        # names could come back with other content, so part facts go too.
        for state in self._states.values():
            state.tail = None
        self._facts.clear()

    async def _bounded(self, calls: list[Awaitable[T]]) -> list[T]:
        """Await ``calls`` with at most ``max_concurrency`` in flight, in order."""
        slots = asyncio.Semaphore(self._max_concurrency)

        async def run(call: Awaitable[T]) -> T:
            async with slots:
                return await call

        tasks = [asyncio.ensure_future(run(call)) for call in calls]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for call in calls:  # those cancelled before they started were never awaited
                if asyncio.iscoroutine(call):
                    call.close()
            raise

    # ------------------------------------------------------------------
    # Summary sidecars
    # ------------------------------------------------------------------

    def _schedule_sidecar(self, names: _Names) -> None:
        if names.sidecar in self._sidecar_jobs or self._closed:
            return
        job = _SidecarJob(names)
        self._sidecar_jobs[names.sidecar] = job
        job.task = asyncio.get_running_loop().create_task(self._sidecar_loop(job))

    async def _sidecar_loop(self, job: _SidecarJob) -> None:
        """Write the sidecar after ``summary_delay`` (or when woken), until it is
        current; retry a failure a few times with growing pauses, then leave it to
        the next append."""
        delay = self._summary_delay
        try:
            for _ in range(6):
                if not job.wake.is_set():
                    try:
                        async with asyncio.timeout(delay):
                            await job.wake.wait()
                    except TimeoutError:
                        pass
                try:
                    async with self._lock(job.names.parts):
                        await self._write_sidecar(job.names)
                    return
                except Exception as exc:
                    logger.warning(
                        "%s: summary sidecar not written (%s); will retry",
                        describe_key(job.names.key),
                        type(exc).__name__,
                    )
                    delay = max(delay, 0.1) * 4
        finally:
            if self._sidecar_jobs.get(job.names.sidecar) is job:
                del self._sidecar_jobs[job.names.sidecar]

    async def _flush_sidecars(self, prefix: str | None) -> None:
        """Write pending sidecars now (those under ``prefix``, or all) and wait."""
        jobs = [
            job
            for name, job in self._sidecar_jobs.items()
            if prefix is None or name.startswith(prefix)
        ]
        for job in jobs:
            job.wake.set()
        await asyncio.gather(*(job.task for job in jobs if job.task), return_exceptions=True)

    async def _write_sidecar(self, names: _Names) -> None:
        """Bring the stored sidecar up to what this store folded (or, when it does not
        know, up to the stored transcript). Called under the transcript's lock."""
        for _ in range(_RETRIES):
            state = self._state(names)
            pending = state.summary
            if pending is None:
                pending = await self._catch_up_summary(names)
                if pending is None:
                    return
                state.summary = pending
            if not pending.dirty or pending.summary is None:
                return
            if pending.etag is None:
                # A first write has no ETag to guard it: make sure the transcript it
                # summarises was not deleted (by another host) since it was folded.
                view = await self._scan(names, count_last=False)
                if view.base != pending.base or not view.cover:
                    state.summary = None
                    return
            doc = {
                **cast(dict[str, Any], pending.summary),
                "folded": pending.folded,
                "base": pending.base,
            }
            condition = {"IfMatch": pending.etag} if pending.etag else {"IfNoneMatch": "*"}
            try:
                response = await self._request(
                    "put_object",
                    Bucket=self._bucket,
                    Key=names.sidecar,
                    Body=encode_entry(doc),
                    ContentType="application/json",
                    **condition,
                )
            except ClientError as exc:
                if _code(exc) not in _PRECONDITION_CODES | _MISSING_CODES:
                    raise
                state.summary = None  # another writer's sidecar: read it and catch up
                continue
            pending.etag = response["ETag"]
            pending.dirty = False
            return
        raise S3ConcurrencyError(f"{describe_key(names.key)}: sidecar kept changing")

    async def _catch_up_summary(self, names: _Names) -> _Summary | None:
        """The stored sidecar, with the stored entries it has not folded yet folded in.

        ``None`` when the transcript is empty (a stale sidecar is removed)."""
        got = await self._get(names.sidecar)
        stored, stored_folded, stored_base = _parse_sidecar(got[0] if got else None, names.sidecar)
        etag = None if got is None else got[1]
        for _ in range(_RETRIES):
            view = await self._scan(names, count_last=True)
            end = view.end
            assert end is not None
            if end == view.base:
                if got is not None:
                    await self._delete_keys([names.sidecar])
                return None
            summary, folded = stored, stored_folded
            if stored_base != view.base or not view.base <= folded <= end:
                # The sidecar of an earlier, deleted transcript: start over.
                summary, folded = None, view.base
            if folded == end:
                return _Summary(summary, folded, etag, False, view.base)
            try:
                lines = await self._read_lines(names, view, folded, end)
            except _StaleView:
                continue
            logger.info(
                "%s: summary sidecar is %d entries behind; catching up",
                describe_key(names.key),
                end - folded,
            )
            summary = fold_summary(summary, names.key, _parse_lines(names.key, lines))
            return _Summary(summary, end, etag, True, view.base)
        raise self._no_cover(names)

    # ------------------------------------------------------------------
    # Compaction
    # ------------------------------------------------------------------

    def _compact_in_background(self, names: _Names) -> None:
        if names.parts in self._compactions or self._closed:
            return
        job = _Compaction()
        task = asyncio.get_running_loop().create_task(self._compact_logged(names, job))
        self._compactions[names.parts] = (job, task)

        def done(_: asyncio.Task[None]) -> None:
            entry = self._compactions.get(names.parts)
            if entry is not None and entry[1] is task:
                del self._compactions[names.parts]

        task.add_done_callback(done)

    async def _compact_logged(self, names: _Names, job: _Compaction) -> None:
        try:
            async with self._compaction_slots:
                await self._compact(names, job)
        except Exception as exc:
            logger.warning(
                "%s: background compaction failed (%s); the next one retries",
                describe_key(names.key),
                type(exc).__name__,
            )

    async def _compact(self, names: _Names, job: _Compaction) -> int:
        view = await self._scan(names, count_last=False)
        removed = await self._sweep(names, view)
        for group in _plan_merges(view, self._windows, self._fanin, self._max_segment_bytes):
            if job.aborted:
                break
            merged = await self._merge(names, view, group, job)
            if merged is None:
                break
            removed += merged
        return removed + await self._prune_checkpoints(view)

    async def _merge(
        self, names: _Names, view: _View, group: list[_Object], job: _Compaction
    ) -> int | None:
        """Write one segment for ``group``, the marks checkpoint at its end, then blank
        the parts (and delete the segments) it replaces.

        Returns how many objects it blanked or deleted, ``None`` to stop compacting."""
        first = group[0].first
        end_after = None
        for obj, _, last in view.ranges():
            if obj.key == group[-1].key:
                end_after = last
        if end_after is None:
            return None
        try:
            lines = await self._read_lines(names, view, first, end_after + 1)
        except _StaleView:
            return None  # changed meanwhile: the next compaction starts afresh
        if len(lines) != end_after - first + 1:
            return None
        segment = f"{names.parts}{first:012d}-{end_after:012d}.jsonl"
        body = b"\n".join(lines) + b"\n"
        if job.aborted:
            return None
        try:
            await self._request(
                "put_object",
                Bucket=self._bucket,
                Key=segment,
                Body=body,
                IfNoneMatch="*",
                ContentType="application/x-ndjson",
            )
            wrote = True
        except ClientError as exc:
            if _code(exc) not in _PRECONDITION_CODES:
                raise
            wrote = False  # written already (a crashed or concurrent compaction)
            head = await self._request("head_object", Bucket=self._bucket, Key=segment)
            etag = str(head.get("ETag", "")).strip('"')
            same = (
                etag == hashlib.md5(body, usedforsecurity=False).hexdigest()
                if re.fullmatch(r"[0-9a-f]{32}", etag)  # plain PUTs: the ETag is the MD5
                else int(head.get("ContentLength", -1)) == len(body)
            )
            if not same:
                logger.warning(
                    "%s: existing segment %s differs; not compacting",
                    describe_key(names.key),
                    segment,
                )
                return None
        # The parts' marks must outlive them: checkpoint before blanking anything.
        marks = await self._marks_at(view, end_after + 1)
        if marks is None or job.aborted:
            if job.aborted and wrote:  # deleted while we wrote: take our segment back
                await self._delete_keys([segment])
            return None
        await self._put_checkpoint(names, view, end_after + 1, marks)
        await self._blank([o for o in group if o.last is None])
        await self._delete_keys([o.key for o in group if o.last is not None])
        return len(group)

    async def _sweep(self, names: _Names, view: _View) -> int:
        """Blank or delete what no reader needs: a deleted transcript's parts and
        segments (below the newest guard), and the leftovers of an interrupted
        compaction inside a chosen segment (after checkpointing that segment's end).
        Guards and blanks stay: they keep their names taken. Returns the count."""
        blank = [o for o in view.dead if o.last is None and o.size > len(_GUARD_BODY)]
        drop = [o.key for o in view.dead + view.garbage if o.last is not None]
        leftovers = [o for o in view.garbage if o.last is None and not o.blank]
        segments = [o for o in view.cover if o.last is not None]
        for seg in segments:
            assert seg.last is not None
            inside = [o for o in leftovers if seg.first <= o.first <= seg.last]
            if not inside:
                continue
            marks = await self._marks_at(view, seg.last + 1)
            if marks is None:
                continue  # out of date: the next compaction sees a newer listing
            await self._put_checkpoint(names, view, seg.last + 1, marks)
            blank += inside
        await self._blank(blank)
        await self._delete_keys(drop)
        return len(blank) + len(drop)

    async def _prune_checkpoints(self, view: _View) -> int:
        """Delete the checkpoints below the newest: the marks fold starts there."""
        old = [name for _, name in view.checkpoints[:-1]]
        await self._delete_keys(old)
        del view.checkpoints[:-1]
        return len(old)

    async def _blank(self, parts: list[_Object]) -> None:
        """Empty each part (``IfMatch`` its ETag: only the part that was listed). The
        name stays taken, so a put at a stale offset can never land there."""

        async def blank(part: _Object) -> None:
            try:
                await self._request(
                    "put_object", Bucket=self._bucket, Key=part.key, Body=b"", IfMatch=part.etag
                )
            except ClientError as exc:
                if _code(exc) not in _PRECONDITION_CODES | _MISSING_CODES:
                    raise

        await self._bounded([blank(p) for p in parts])


# ----------------------------------------------------------------------
# Helpers without state
# ----------------------------------------------------------------------


_Opener = Callable[[], AbstractAsyncContextManager[Any]]
_URL_PARAMETERS = frozenset(
    {
        "endpoint_url",
        "region",
        "compact_every",
        "summary_delay",
        "length_cache_ttl",
        "max_concurrency",
    }
)


def _opener(
    endpoint_url: str | None, max_concurrency: int, client_kwargs: dict[str, Any]
) -> _Opener:
    """What creates an owned client: ``connect``'s defaults, merged with the caller's."""
    kwargs = dict(client_kwargs)
    session = kwargs.pop("session", None) or get_session()
    s3_options: dict[str, Any] = {}
    if endpoint_url:
        s3_options["addressing_style"] = "path"
        if endpoint_url.lower().startswith("http://"):
            # botocore hashes every body for SigV4 over plain HTTP. Over HTTPS it
            # skips that when a checksum header goes along, and one does: the
            # signed x-amz-checksum-crc32 covers the body. Same here.
            s3_options["payload_signing_enabled"] = False
    config = AioConfig(
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "total_max_attempts": 3},
        max_pool_connections=max(10, 2 * max_concurrency),
        s3=s3_options or None,
    )
    user_config = kwargs.pop("config", None)
    if user_config is not None:
        config = config.merge(user_config)
    if kwargs.get("region_name") is None and session.get_config_variable("region") is None:
        kwargs["region_name"] = "us-east-1"

    def open_client() -> AbstractAsyncContextManager[Any]:
        return cast(
            AbstractAsyncContextManager[Any],
            session.create_client("s3", endpoint_url=endpoint_url, config=config, **kwargs),
        )

    return open_client


class _StaleView(Exception):
    """The listing a read relied on is out of date; list again."""


def _normalise_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise ValueError("prefix must be a string")
    prefix = prefix.lstrip("/")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in prefix):
        raise ValueError("prefix must not contain control characters")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _encode(part: str) -> str:
    try:
        return quote(part, safe="", errors="strict")
    except UnicodeEncodeError:
        raise InvalidKeyError("key parts must be valid Unicode (no lone surrogates)") from None


def _decode(encoded: str) -> str | None:
    """The key part ``encoded`` names, or ``None`` if this store would not write it so."""
    try:
        part = unquote(encoded, errors="strict")
    except UnicodeDecodeError:
        return None
    return part if part and _encode(part) == encoded else None


def _code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _epoch_ms(value: Any) -> int:
    return int(value.timestamp() * 1000)


def _part_name(names: _Names, offset: int) -> str:
    return f"{names.parts}{offset:012d}.jsonl"


def _checkpoint_name(names: _Names, offset: int) -> str:
    return f"{names.parts}{offset:012d}.marks.json"


def _split_lines(content: bytes, name: str) -> list[bytes]:
    if content and not content.endswith(b"\n"):
        raise CorruptTranscriptError(f"{name}: object does not end with a newline")
    return content.split(b"\n")[:-1]


def _parse_lines(key: SessionKey, lines: list[bytes]) -> list[SessionStoreEntry]:
    # JSON strings never hold a raw newline, so the lines join into one array.
    try:
        parsed = decode_array(b"[" + b",".join(lines) + b"]")
    except ValueError:
        parsed = None
    if not isinstance(parsed, list) or len(parsed) != len(lines):
        raise CorruptTranscriptError(f"{describe_key(key)}: a stored line is not one JSON value")
    if not all(isinstance(entry, dict) for entry in parsed):
        raise CorruptTranscriptError(f"{describe_key(key)}: a stored line is not a JSON object")
    return cast(list[SessionStoreEntry], parsed)


def _parse_sidecar(
    content: bytes | None, name: str
) -> tuple[SessionSummaryEntry | None, int, int | None]:
    """The stored summary, ``folded`` and ``base``; ``(None, 0, None)`` if absent or
    unreadable (it is rebuilt)."""
    if content is None:
        return None, 0, None
    try:
        doc = json.loads(content)
    except ValueError:
        doc = None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("folded"), int)
        or not isinstance(doc.get("session_id"), str)
        or not isinstance(doc.get("mtime"), int)
        or not isinstance(doc.get("data"), dict)
        or not isinstance(doc.get("base"), int | None)
    ):
        logger.warning("%s: unreadable summary sidecar; it will be rebuilt", name)
        return None, 0, None
    summary: SessionSummaryEntry = {
        "session_id": doc["session_id"],
        "mtime": doc["mtime"],
        "data": doc["data"],
    }
    return summary, doc["folded"], doc.get("base")


def _choose_cover(objects: list[_Object]) -> tuple[list[_Object], list[_Object]]:
    """Split a listing into the objects that hold each offset once, and leftovers.

    Segments: the widest starting at each offset, skipping any inside one
    already chosen. Parts: those not inside a chosen segment.
    """
    segments = sorted(
        (o for o in objects if o.last is not None), key=lambda o: (o.first, -(o.last or 0))
    )
    chosen: list[_Object] = []
    garbage: list[_Object] = []
    reach = -1
    for seg in segments:
        assert seg.last is not None
        if seg.last <= reach:
            garbage.append(seg)
        else:
            chosen.append(seg)
            reach = seg.last
    starts = [s.first for s in chosen]
    cover = list(chosen)
    for part in (o for o in objects if o.last is None):
        i = bisect_right(starts, part.first) - 1
        inside = chosen[i] if i >= 0 else None
        if inside is not None and inside.last is not None and part.first <= inside.last:
            garbage.append(part)
        else:
            cover.append(part)
    cover.sort(key=lambda o: o.first)
    return cover, garbage


def _plan_merges(
    view: _View, windows: tuple[int, ...], fanin: int, max_bytes: int
) -> list[list[_Object]]:
    """Groups of cover objects to merge: per complete window, largest windows first."""
    if len(view.cover) < 2:
        return []
    last_start = view.cover[-1].first
    taken: set[str] = set()
    groups: list[list[_Object]] = []
    for size in sorted(windows, reverse=True):
        by_window: dict[int, list[_Object]] = {}
        for obj in view.cover:
            if obj.key not in taken:
                by_window.setdefault(obj.first // size, []).append(obj)
        for window, members in sorted(by_window.items()):
            complete = (window + 1) * size <= last_start
            if complete and len(members) >= fanin and sum(o.size for o in members) <= max_bytes:
                groups.append(members)
                taken.update(o.key for o in members)
    groups.sort(key=lambda g: g[0].first)
    return groups
