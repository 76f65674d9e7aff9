"""``RedisStore``: session transcripts in Redis, written by walmirror's protocol in one Lua call.

Storage layout, for a ``prefix`` P (default ``"walmirror"``) and the encoded key
parts ``<project>``, ``<session>`` and ``<subpath>``::

    P:t:{<project>}:<session>             LIST  main transcript: one entry per element
    P:u:{<project>}:<session>:<subpath>   LIST  subagent transcript ("subagents/agent-1")
    P:p:{<project>}:<session>             HASH  marks of the main key: producer -> highest
                                                seq stored (decimal text)
    P:q:{<project>}:<session>:<subpath>   HASH  marks of one subagent key, the same way
    P:k:{<project>}:<session>             SET   encoded subpaths of the session's subagent lists
    P:m:{<project>}:<session>             HASH  summary: data (JSON of the fold's ``data``),
                                                mtime (epoch ms), folded (entries it covers),
                                                v (version token of the last summary write)
    P:i:{<project>}                       ZSET  session index: session_id -> mtime (epoch ms)
                                                of the main transcript's last append

An element is one entry's canonical JSON (``walmirror.protocol.encode_entry``),
the bytes ``FileStore`` writes as a line and walmirror's queue keeps.

Key encoding. Every part is percent-encoded as UTF-8: each byte outside
``A-Z a-z 0-9 - . _ ~`` becomes ``%XX`` (upper-case hex), as
``urllib.parse.quote(part, safe="")`` does, and the subpath is encoded whole (its
``/`` become ``%2F``). ``%`` is encoded too, so the encoding is injective, and
an encoded part never contains ``:``, ``/``, ``{`` or ``}``: the ``:`` separators
and the ``{}`` hash tag cannot be forged, so two different keys never share a
Redis key and no part can reach into another key's name. The prefix may hold
only ``A-Z a-z 0-9 _ . - : /`` (no braces), so the first ``{`` of a name marks
where prefix and one-letter type end: different prefixes never collide either.
Index members are raw session ids (a member is one whole value, never parsed).
The ``{<project>}`` hash tag keeps a project's keys in one Redis Cluster slot,
so every script touches a single slot (the client here is a plain
``redis.asyncio.Redis``; the layout is ready for Cluster). The delete script
also deletes the subagent lists its SET names: names it builds itself, in the
same slot, but not declared in ``KEYS``.

The atomic step (``walmirror.protocol``) is one Lua script: it ``HGET``s the
producer's mark from the key's marks HASH, refuses the batch when ``expect`` is
set and the mark is missing or below it (``MarkBehindError``, nothing written),
skips the batch's entries at or below the mark, ``RPUSH``es the rest and
``HSET``s the mark to the batch's last seq. Seqs reach 2**63-1 but Lua 5.1
numbers are doubles, so seqs travel and are stored as decimal text and the
script compares them by splitting each into its digits above and below 10**9
(both parts exact in a double). A plain ``append`` is the same script without a
producer: no mark, no skip. Entries handed to a script are copied into Lua and
back, which costs Redis several times what the ``RPUSH`` costs; so a batch the
store expects to skip nothing (it remembers the producer's mark, or ``expect``
says it) goes as one MULTI/EXEC instead: ``RPUSH`` of the whole batch, then a
script that makes the same checks before it writes anything else. If they fail
(the producer is behind, the mark covers part of the batch, a key of the step
holds a type this store did not write) it takes the batch off the list again
(``LTRIM`` to the old length) and answers so: nothing is left written, and the
store raises or, for repeats, runs the one-script step. Inside EXEC the
``RPUSH`` can fail only with WRONGTYPE (queueing errors and OOM abort the whole
transaction), and then the script fails on the same list before it writes.

Summaries, folded exactly once with the SDK's ``fold_session_summary`` (main
keys only). The store remembers, per session, the last summary it wrote and its
version token ``v``, and per key and producer the last mark it saw. Before a
call it guesses the skip from that mark (or ``expect``), folds the entries that
will be appended into the remembered summary and sends the result along; the
script stores it in the same atomic step only if its skip is the guessed one,
the stored summary covers the whole list (``folded``) and its version is the
one that fold started from. That is the steady state of one writer: one round
trip, summary, transcript and mark in one atomic step. Otherwise (a repeat,
another writer, a fresh process, a summary left behind by a crash) the append
lands alone and the summary is caught up with an optimistic transaction:
``WATCH`` the list and the summary, read ``folded`` and the entries after it,
fold them, ``MULTI``/``HSET``/``EXEC``, retry on a conflict. Only appended
entries are in the list, so each is folded once whatever the interleaving; a
failed catch-up is logged, not raised (the entries are stored), and the next
append catches up.

Clock: ``mtime`` comes from the server's ``TIME`` inside the script, never below
the session's previous mtime; the summary is stamped with the mtime of the
transcript state it covers, so it shares ``list_sessions``' clock and equals it
when up to date (an older summary mtime honestly says "stale").

Deletes and tombstones: ``delete()`` removes a session's transcript (a main key
takes its subagent lists, SET, summary and index entry with it; a subpath key
only its own list) and keeps the marks HASHes, ``P:p:...`` and every
``P:q:...``: they are the key's tombstone, so a retry from before the delete is
skipped and later batches start a fresh transcript. Without ``ttl`` a
tombstone lives until an operator removes it (a few dozen bytes per producer),
which is safe once no queue that wrote the key holds undelivered entries for
it: ``DEL P:p:{<project>}:<session>`` and each name that
``SCAN 0 MATCH P:q:{<project>}:<session>:*`` lists.

Retention and lost data: with ``ttl=seconds`` every key an append touches,
marks included, gets that TTL again (sliding expiry of idle sessions), stale
index members are pruned, and listings skip what has expired. Marks expire
with the data: an expired key is a deleted key whose tombstone expired too, so
a producer that still holds unacknowledged entries of it starts it afresh and
one with ``expect`` set gets ``MarkBehindError``. Choose a ``ttl`` far beyond
any session's idle time. Marks live in Redis beside the data, so whatever loses
the data loses the marks with it: a restart without persistence empties both,
and the next batch with ``expect`` set raises ``MarkBehindError`` (walmirror
re-sends what its queue retains and reports the rest). Redis must not evict:
run it with ``maxmemory-policy noeviction`` and with AOF (``appendonly yes``,
``appendfsync always``); ``check_server()`` reports what it finds, for
``verify``/``status``.

Round trips: ``append_batch`` is one MULTI/EXEC (or one EVALSHA, and for a
batch that turned out to repeat entries both) and ``append`` one EVALSHA, plus
the catch-up transaction in the cases above; ``append_batch`` ``RPUSH``es the
batch's encoded bytes as they are and parses them only to fold a summary. The
fold (``walmirror.backends.fold_batch``) parses only the entries the batch's
hints say can change the summary (all of them when the batch has no hints, or
the summary is not settled yet: then bytes that are not JSON are refused on a
main key) and runs the SDK's fold on those, with the same result.
``load`` reads ``LRANGE`` chunks of 2000; listings pipeline their per-session reads.

Client: ``redis.asyncio.Redis`` with ``decode_responses=False``. ``from_url``
turns off redis-py's own retries (walmirror retries with marks; a hidden
retry of a plain ``append`` whose reply was lost would store it twice) and
speaks RESP2 (see ``from_url``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import re
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError, WatchError

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
from walmirror.protocol import PRODUCER_PATTERN, Batch, Receipt, check_batch, encode_entry

__all__ = ["DEFAULT_PREFIX", "CorruptTranscriptError", "RedisStore", "WrongTypeError"]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "walmirror"
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,100}")
_CHUNK = 2000  # list elements (or sessions) per read
_CAS_ATTEMPTS = 50  # optimistic summary transactions before giving up until the next append
_CACHE_SIZE = 4096  # sessions whose last summary (and keys whose marks) this store remembers

# Seqs are decimal text: Lua 5.1 numbers are doubles, exact only below 2^53.
_LUA_SEQS = """
if redis.replicate_commands then redis.replicate_commands() end
-- a - b for seqs given as decimal text: exact when |a - b| < 2^53, the right sign always
local function split(s)
  if #s <= 9 then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, #s - 9)), tonumber(string.sub(s, #s - 8))
end
local function minus(a, b)
  local ah, al = split(a)
  local bh, bl = split(b)
  return (ah - bh) * 1000000000 + (al - bl)
end
local list, marks = KEYS[1], KEYS[2]
local producer = ARGV[3]
"""

# The rest of the step once the entries are in the list: the mark, expiry, the
# index or subkey SET, and the pre-folded summary (stored only if its assumptions hold).
_LUA_FINISH = """
if producer ~= '' and added > 0 then
  mark = ARGV[5]
  redis.call('HSET', marks, producer, mark)
end
local ttl = tonumber(ARGV[2])
if ttl > 0 and added > 0 then
  redis.call('PEXPIRE', list, ttl)
  redis.call('PEXPIRE', marks, ttl)
end
if #KEYS == 3 then
  if added > 0 then
    redis.call('SADD', KEYS[3], ARGV[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
  end
  return {'ok', newlen, mark or '', added}
end
local index, summary = KEYS[3], KEYS[4]
local mtime = tonumber(redis.call('ZSCORE', index, ARGV[1]) or '0')
if added > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now > mtime then mtime = now end
  redis.call('ZADD', index, string.format('%d', mtime), ARGV[1])
  if ttl > 0 then
    redis.call('PEXPIRE', index, ttl)
    redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. string.format('%d', mtime - ttl))
  end
end
local folded = tonumber(redis.call('HGET', summary, 'folded') or '0')
local version = redis.call('HGET', summary, 'v') or ''
if added > 0 and skip == tonumber(ARGV[7]) and ARGV[8] ~= '-' and folded == len
    and version == ARGV[8] then
  redis.call('HSET', summary, 'data', ARGV[9], 'mtime', string.format('%d', mtime),
             'folded', newlen, 'v', ARGV[10])
  if ttl > 0 then redis.call('PEXPIRE', summary, ttl) end
  return {'folded', newlen, mark or '', added}
end
return {'ok', newlen, mark or '', added, folded}
"""

# The atomic step in one script, entries included.
# KEYS: transcript LIST, marks HASH, then index ZSET + summary HASH (main key) or
#       subkey SET (subpath).
# ARGV: 1 member (session id or encoded subpath), 2 ttl ms (0: none),
#       3 producer ('': a plain append), 4 first seq, 5 last seq, 6 expect ('': none),
#       7 the skip the pre-folded summary assumes, 8 summary version it starts from
#       ('-': none sent), 9 pre-folded summary data, 10 its new version, 11.. the entries.
_APPEND_LUA = (
    _LUA_SEQS
    + """
local first = 11
local n = #ARGV - first + 1
local mark = false
local skip = 0
if producer ~= '' then
  mark = redis.call('HGET', marks, producer)
  if ARGV[6] ~= '' and (not mark or minus(mark, ARGV[6]) < 0) then
    return {'behind', mark or ''}
  end
  if mark then
    local d = minus(mark, ARGV[4])
    if d >= 0 then skip = math.min(n, d + 1) end
  end
end
local len = redis.call('LLEN', list)
local i = first + skip
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  redis.call('RPUSH', list, unpack(ARGV, i, j))
  i = j + 1
end
local added = n - skip
local newlen = len + added
"""
    + _LUA_FINISH
)

# The atomic step for a batch expected to skip nothing, run in a MULTI/EXEC right after
# ``RPUSH list <the batch's n entries>``: entries passed to a script are copied into
# Lua and back, which costs Redis several times the RPUSH itself. The script checks
# what the one-script step checks before it writes; when the batch must not be
# appended as a whole (the producer is behind, the mark covers some of it, a key
# holds another type) it takes the entries off the list again and says so, and the
# caller raises or runs the one-script step. The RPUSH in the transaction can only
# fail with WRONGTYPE (errors found while queueing, and OOM, abort the whole EXEC),
# and then LLEN here fails too, before anything is written.
# KEYS: as above. ARGV: 1..10 as above, 11 n.
_PUSHED_LUA = (
    _LUA_SEQS
    + """
local n = tonumber(ARGV[11])
local len = redis.call('LLEN', list) - n
if len < 0 then return redis.error_reply('ERR the batch is not in the list') end
local function undo()
  if len > 0 then redis.call('LTRIM', list, 0, len - 1) else redis.call('DEL', list) end
end
local types = {'hash', 'zset', 'hash'}
if #KEYS == 3 then types = {'hash', 'set'} end
for k = 2, #KEYS do
  local t = redis.call('TYPE', KEYS[k])['ok']
  if t ~= 'none' and t ~= types[k - 1] then
    undo()
    return {'wrongtype'}
  end
end
local mark = redis.call('HGET', marks, producer)
if ARGV[6] ~= '' and (not mark or minus(mark, ARGV[6]) < 0) then
  undo()
  return {'behind', mark or ''}
end
if mark and minus(mark, ARGV[4]) >= 0 then
  undo()
  return {'redo'}
end
local skip = 0
local added = n
local newlen = len + n
"""
    + _LUA_FINISH
)

# KEYS: main transcript LIST, summary HASH, subkey SET, index ZSET.
# ARGV: session id, name prefix of the session's subagent lists.
# The marks HASHes (P:p:..., P:q:...) stay: they are the tombstone.
_DELETE_LUA = """
local subs = redis.call('SMEMBERS', KEYS[3])
for _, s in ipairs(subs) do redis.call('DEL', ARGV[2] .. s) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
return #subs
"""


class WrongTypeError(PermanentBackendError):
    """A key this store uses holds a Redis type it did not write (another program's key)."""


@dataclass(frozen=True, slots=True)
class _Names:
    """The Redis names one ``SessionKey`` touches."""

    transcript: str  # this key's LIST
    marks: str  # this key's HASH of producer marks
    index: str  # the project's ZSET
    subkeys: str  # the session's SET of encoded subpaths
    summary: str  # the session's HASH
    sub_prefix: str  # name prefix of the session's subagent LISTs
    member: str  # session id (main key) or encoded subpath


@dataclass(frozen=True, slots=True)
class _Prefold:
    """A batch folded ahead of its append, for the script to store with it."""

    skip: int  # leading entries of the batch the fold assumes are repeats
    base_version: str  # version of the stored summary the fold starts from ("": none)
    data: dict[str, Any]
    data_json: bytes
    version: str  # version the script stores with it


@dataclass(frozen=True, slots=True)
class _Folded:
    """The last summary this store wrote for a session: what the next fold starts from."""

    folded: int
    data: dict[str, Any]
    version: str


class RedisStore(SessionStore):
    """A ``SessionStore`` (and ``walmirror.protocol.ProducerStore``) keeping transcripts in Redis.

    ``client`` is a ``redis.asyncio.Redis`` built with ``decode_responses=False``
    (the default); the store does not close a client it was given. ``prefix``
    namespaces every key (letters, digits, ``_ . - : /``). ``ttl`` (seconds)
    gives every key a sliding expiry, refreshed by each append, marks included;
    ``None`` keeps transcripts until ``delete()`` and marks (the tombstones)
    until an operator removes them (see the module docstring).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = DEFAULT_PREFIX,
        *,
        ttl: float | None = None,
    ) -> None:
        if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(
                "prefix must be 1-100 characters of A-Z a-z 0-9 _ . - : / (no braces or spaces)"
            )
        if ttl is not None and (isinstance(ttl, bool) or not 0 < ttl < 10**12):
            raise ValueError("ttl must be a positive number of seconds, or None")
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs a client with decode_responses=False")
        self._client = client
        self._redis: Any = client  # redis-py's command stubs are overloaded sync/async
        self._prefix = prefix
        self._ttl_ms = 0 if ttl is None else max(1, round(ttl * 1000))
        self._owns_client = False
        self._append_script = client.register_script(_APPEND_LUA)
        self._delete_script = client.register_script(_DELETE_LUA)
        self._summaries: OrderedDict[tuple[str, str], _Folded] = OrderedDict()
        self._marks: OrderedDict[tuple[str, str], int] = OrderedDict()  # (marks name, producer)
        self._version_base = secrets.token_hex(6)
        self._versions = count(1)

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str | None = None,
        *,
        ttl: float | None = None,
        **client_kwargs: Any,
    ) -> RedisStore:
        """A store on a client built from ``url`` (``redis://``, ``rediss://`` or ``unix://``).

        ``prefix`` and ``ttl`` may also come as query parameters
        (``redis://host:6379/0?prefix=team-a&ttl=2592000``); the other query
        parameters and ``client_kwargs`` go to ``redis.asyncio.Redis.from_url``.
        redis-py's retries are off unless ``retry=`` is passed, and the client
        speaks RESP2 unless ``protocol=3`` is passed. ``aclose()``
        closes the client. Error messages never repeat the URL (it may hold a
        password).
        """
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("redis", "rediss", "unix"):
            raise ValueError("RedisStore URLs start with redis://, rediss:// or unix://")
        query: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name == "prefix":
                if prefix is not None and prefix != value:
                    raise ValueError("prefix given both in the URL and as an argument")
                prefix = value
            elif name == "ttl":
                if ttl is not None:
                    raise ValueError("ttl given both in the URL and as an argument")
                try:
                    ttl = float(value)
                except ValueError:
                    raise ValueError("ttl in the URL must be a number of seconds") from None
            else:
                query.append((name, value))
        if client_kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs decode_responses=False")
        client_kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        # RESP3 (redis-py 8's default) turns on maintenance notifications in "auto"
        # mode, which skips the pool's check for connections the server closed:
        # after a Redis restart the first command on each pooled connection fails.
        client_kwargs.setdefault("protocol", 2)
        if not {"driver_info", "lib_name", "lib_version"} & client_kwargs.keys():
            client_kwargs.update(_driver_info())
        client = aioredis.Redis.from_url(
            urlunsplit(parts._replace(query=urlencode(query))), **client_kwargs
        )
        store = cls(client, DEFAULT_PREFIX if prefix is None else prefix, ttl=ttl)
        store._owns_client = True
        return store

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def ttl(self) -> float | None:
        return self._ttl_ms / 1000 if self._ttl_ms else None

    @property
    def cursor_name(self) -> str:
        """How a walmirror queue names its cursor for this backend, without credentials:
        ``redis://host:port/db/prefix`` (``rediss://`` over TLS)."""
        pool = self._client.connection_pool
        kwargs = pool.connection_kwargs
        db = kwargs.get("db", 0)
        path = kwargs.get("path")
        if path:
            return f"unix://{path}?db={db}&prefix={self._prefix}"
        host = str(kwargs.get("host", "localhost"))
        if ":" in host:
            host = f"[{host}]"
        scheme = "rediss" if issubclass(pool.connection_class, aioredis.SSLConnection) else "redis"
        return f"{scheme}://{host}:{kwargs.get('port', 6379)}/{db}/{self._prefix}"

    def __repr__(self) -> str:
        return f"RedisStore({self.cursor_name!r})"

    async def aclose(self) -> None:
        """Close the client if this store built it (``from_url``)."""
        if self._owns_client:
            await self._client.aclose()

    async def close(self) -> None:
        await self.aclose()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------
    # SessionStore
    # ------------------------------------------------------------------

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Append ``entries`` at the key's current end (one atomic script call)."""
        k, names = self._check_key(key)
        lines = _encode_entries(k, entries)
        if lines:
            await self._append(k, names, lines, None, list(entries))

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """All entries of ``key`` in order (read in chunks), or ``None`` if it holds none."""
        k, names = self._check_key(key)
        raw = await _lrange(self._redis, names.transcript, 0, None)
        if not raw:
            return None
        return _parse(k, 0, raw)

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """Main transcripts of the project, from the session index; ``mtime`` in epoch ms."""
        rows = await self._index(validate_project_key(project_key))
        return [{"session_id": sid, "mtime": mtime} for sid, mtime in rows]

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """The stored summaries of the project's sessions (one pipelined read per chunk)."""
        pk = validate_project_key(project_key)
        sessions = [sid for sid, _ in await self._index(pk)]
        summaries: list[SessionSummaryEntry] = []
        for start in range(0, len(sessions), _CHUNK):
            chunk = sessions[start : start + _CHUNK]
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in chunk:
                    pipe.hmget(self._names(pk, sid).summary, ["data", "mtime"])
                rows = await pipe.execute()
            for sid, (data, mtime) in zip(chunk, rows, strict=True):
                summary = _summary_from(sid, data, mtime)
                if summary is not None:
                    summaries.append(summary)
        return summaries

    async def delete(self, key: SessionKey) -> None:
        """Delete a transcript; a main key takes its subagent lists, summary and index entry."""
        k, names = self._check_key(key)
        if "subpath" in k:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(names.transcript)
                pipe.srem(names.subkeys, names.member)
                await pipe.execute()
            return
        self._summaries.pop((k["project_key"], k["session_id"]), None)
        await self._run(
            self._delete_script,
            k,
            [names.transcript, names.summary, names.subkeys, names.index],
            [k["session_id"], names.sub_prefix],
        )
        self._summaries.pop((k["project_key"], k["session_id"]), None)

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """Subpaths of the session's subagent transcripts that hold entries, sorted."""
        k, names = self._check_key(key)  # a stray subpath is validated, then ignored
        candidates: list[tuple[str, str]] = []  # (encoded member, subpath)
        for member in await self._redis.smembers(names.subkeys):
            try:
                encoded = member.decode("ascii")
                subpath = unquote(encoded, errors="strict")
                validate_key({**k, "subpath": subpath})
                if _encode(subpath) != encoded:
                    continue  # not in the one canonical form: not a member this store wrote
            except (UnicodeError, InvalidKeyError):
                continue
            candidates.append((encoded, subpath))
        if not candidates:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for encoded, _ in candidates:
                pipe.exists(names.sub_prefix + encoded)
            alive = await pipe.execute()
        # A member whose list is gone expired (ttl) or was evicted.
        subkeys = [
            subpath for (_, subpath), exists in zip(candidates, alive, strict=True) if exists
        ]
        return sorted(subkeys)

    # ------------------------------------------------------------------
    # The protocol (walmirror.protocol.ProducerStore)
    # ------------------------------------------------------------------

    async def append_batch(self, key: SessionKey, batch: Batch) -> Receipt:
        """The protocol's atomic step, one EVALSHA; see ``walmirror.protocol``.

        Stores ``batch.encoded`` as it is; parses what the summary fold needs of
        it (main keys; ``fold_batch``). Raises ``MarkBehindError`` (nothing written) when the
        producer's mark is missing or below ``batch.expect``.
        """
        k, names = self._check_key(key)
        check_batch(describe_key(k), batch)
        receipt = await self._append(k, names, batch.encoded, batch, None)
        assert receipt is not None
        return receipt

    async def producer_mark(self, key: SessionKey, producer: str) -> int | None:
        """The highest seq of ``producer`` stored for ``key`` (kept across deletes), or ``None``."""
        k, names = self._check_key(key)
        if not isinstance(producer, str) or not PRODUCER_PATTERN.fullmatch(producer):
            raise ValueError(
                f"{describe_key(k)}: producer id must match {PRODUCER_PATTERN.pattern}"
            )
        mark = await self._redis.hget(names.marks, producer)
        return None if mark is None else int(mark)

    async def length(self, key: SessionKey) -> int:
        """How many entries ``key`` holds (0 if never written or deleted)."""
        _, names = self._check_key(key)
        return int(await self._redis.llen(names.transcript))

    async def ping(self) -> None:
        """The health call (``walmirror.protocol``): one ``PING``."""
        await self._redis.ping()

    # ------------------------------------------------------------------
    # Server health
    # ------------------------------------------------------------------

    async def check_server(self) -> list[str]:
        """Warnings about server settings that can lose acknowledged transcripts silently.

        Checks the eviction policy (``INFO memory``) and persistence (``INFO
        persistence``, and ``CONFIG GET`` where the server allows it). Empty when
        nothing is wrong. Connection errors propagate.
        """
        warnings: list[str] = []
        memory = await self._redis.info("memory")
        persistence = await self._redis.info("persistence")
        policy = str(memory.get("maxmemory_policy", "unknown"))
        maxmemory = int(memory.get("maxmemory", 0) or 0)
        limit = f"maxmemory {maxmemory} bytes" if maxmemory else "maxmemory not set yet"
        if policy.startswith("allkeys-") or (policy.startswith("volatile-") and self._ttl_ms):
            warnings.append(
                f"redis maxmemory-policy is {policy} ({limit}): when memory fills, Redis "
                "evicts transcript keys without any error (silent loss); set "
                "maxmemory-policy noeviction so writes fail loudly and walmirror retries"
            )
        config: dict[str, str] = {}
        try:
            for name in ("save", "appendfsync"):
                reply = await self._redis.config_get(name)
                config.update({_text(a): _text(b) for a, b in reply.items()})
        except ResponseError:
            pass  # CONFIG is disabled on many managed servers
        if not int(persistence.get("aof_enabled", 0) or 0):
            if config.get("save") == "":
                warnings.append(
                    'redis has no persistence (appendonly no, save ""): a restart loses '
                    "every transcript; enable appendonly with appendfsync always"
                )
            else:
                warnings.append(
                    "redis appendonly is off: a crash or restart loses writes made since the "
                    "last RDB snapshot; enable appendonly with appendfsync always"
                )
        elif config.get("appendfsync", "always") != "always":
            warnings.append(
                f"redis appendfsync is {config['appendfsync']}: a host crash or power loss "
                "can lose about a second of acknowledged writes; use appendfsync always"
            )
        return warnings

    # ------------------------------------------------------------------
    # Keys
    # ------------------------------------------------------------------

    def _check_key(self, key: Any) -> tuple[SessionKey, _Names]:
        k = validate_key(key)
        return k, self._names(k["project_key"], k["session_id"], k.get("subpath"))

    def _names(self, project_key: str, session_id: str, subpath: str | None = None) -> _Names:
        project, session = _encode(project_key), _encode(session_id)
        base = f"{{{project}}}:{session}"
        p = self._prefix
        sub_prefix = f"{p}:u:{base}:"
        if subpath is None:
            transcript, marks, member = f"{p}:t:{base}", f"{p}:p:{base}", session_id
        else:
            member = _encode(subpath)
            transcript, marks = sub_prefix + member, f"{p}:q:{base}:{member}"
        return _Names(
            transcript=transcript,
            marks=marks,
            index=f"{p}:i:{{{project}}}",
            subkeys=f"{p}:k:{base}",
            summary=f"{p}:m:{base}",
            sub_prefix=sub_prefix,
            member=member,
        )

    # ------------------------------------------------------------------
    # Appending
    # ------------------------------------------------------------------

    async def _append(
        self,
        key: SessionKey,
        names: _Names,
        lines: Sequence[bytes],
        batch: Batch | None,
        entries: list[SessionStoreEntry] | None,
    ) -> Receipt | None:
        """One atomic step: ``batch``'s, or (``batch`` is ``None``) a plain append of
        ``entries``. Returns the receipt of a batch.

        A batch the store expects to skip nothing (the steady state) goes as ``RPUSH``
        plus ``_PUSHED_LUA`` in one MULTI/EXEC; anything else, or a batch that
        turns out to repeat entries, as ``_APPEND_LUA``."""
        main = "subpath" not in key
        seqs: list[Any] = ["", "", "", ""]  # producer, first seq, last seq, expect
        skip = 0
        if batch is not None:
            expect = "" if batch.expect is None else str(batch.expect)
            seqs = [batch.producer, str(batch.first_seq), str(batch.last_seq), expect]
            skip = self._guess_skip(names, batch)
        pre = self._prefold(key, batch, entries, skip) if main else None
        summary: list[Any] = [0, "-", b"", ""]
        if pre is not None:
            summary = [pre.skip, pre.base_version, pre.data_json, pre.version]
        keys = [names.transcript, names.marks]
        keys += [names.index, names.summary] if main else [names.subkeys]
        args = [names.member, self._ttl_ms, *seqs, *summary]
        reply = None
        if batch is not None and skip == 0:
            reply = await self._push(key, keys, [*args, len(lines)], lines)
            if _text(reply[0]) == "redo":  # it repeats entries: nothing was written
                reply = None
        if reply is None:
            reply = await self._run(self._append_script, key, keys, [*args, *lines])
        status = _text(reply[0])
        if status == "behind":
            assert batch is not None and batch.expect is not None
            mark = int(reply[1]) if reply[1] else None
            self._remember_mark(names, batch.producer, mark)
            raise MarkBehindError(describe_key(key), mark, batch.expect)
        new_length, added = int(reply[1]), int(reply[3])
        if status == "folded" and pre is not None:
            self._remember(key, _Folded(new_length, pre.data, pre.version))
        elif main and int(reply[4]) != new_length:
            await self._catch_up_safely(key, names)
        if batch is None:
            return None
        mark = int(reply[2])
        self._remember_mark(names, batch.producer, mark)
        return Receipt(appended=added, mark=mark, length=new_length)

    async def _push(
        self, key: SessionKey, keys: list[str], args: list[Any], lines: Sequence[bytes]
    ) -> Any:
        """``RPUSH`` the batch and run ``_PUSHED_LUA``, in one MULTI/EXEC."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(keys[0], *lines)
            pipe.eval(_PUSHED_LUA, len(keys), *keys, *args)
            pushed, reply = await pipe.execute(raise_on_error=False)
        for result in (reply, pushed):
            if isinstance(result, ResponseError) and "WRONGTYPE" in str(result):
                raise self._wrong_type(key)
        for result in (reply, pushed):
            if isinstance(result, Exception):
                raise result
        if _text(reply[0]) == "wrongtype":
            raise self._wrong_type(key)
        return reply

    def _guess_skip(self, names: _Names, batch: Batch) -> int:
        """The leading entries of ``batch`` the script will skip, guessed from the
        producer's last known mark (or ``expect``: the mark it was told of)."""
        known = self._marks.get((names.marks, batch.producer))
        if batch.expect is not None and (known is None or known < batch.expect):
            known = batch.expect
        if known is None:
            return 0
        return max(0, min(len(batch), known - batch.first_seq + 1))

    def _prefold(
        self,
        key: SessionKey,
        batch: Batch | None,
        entries: list[SessionStoreEntry] | None,
        skip: int,
    ) -> _Prefold | None:
        """The entries this call will append (the batch's past the guessed ``skip``),
        folded into the summary this store last wrote (the script checks both)."""
        if batch is not None and skip == len(batch):
            return None  # a repeat: nothing to fold
        if batch is None and not entries:
            return None
        cached = self._summaries.get((key["project_key"], key["session_id"]))
        prev: SessionSummaryEntry | None = None
        version = ""  # no summary stored yet, as far as this store knows
        if cached is not None:
            prev = {"session_id": key["session_id"], "mtime": 0, "data": cached.data}
            version = cached.version
        try:
            if batch is not None:
                data = fold_batch(prev, key, batch, skip)["data"]
            else:
                data = fold_summary(prev, key, entries or [])["data"]
        except ValueError:
            raise InvalidEntryError(
                f"{describe_key(key)}: an encoded entry of the batch is not JSON"
            ) from None
        except (TypeError, AttributeError):
            raise InvalidEntryError(
                f"{describe_key(key)}: an encoded entry of the batch is not a JSON object"
            ) from None
        return _Prefold(skip, version, data, encode_entry(data), self._new_version())

    def _remember_mark(self, names: _Names, producer: str, mark: int | None) -> None:
        ident = (names.marks, producer)
        if mark is None:
            self._marks.pop(ident, None)
            return
        self._marks[ident] = mark
        self._marks.move_to_end(ident)
        while len(self._marks) > _CACHE_SIZE:
            self._marks.popitem(last=False)

    def _remember(self, key: SessionKey, state: _Folded) -> None:
        # Last write wins: a stale memory costs one slow path, never a wrong summary
        # (the script checks the stored version before it takes a pre-folded one).
        ident = (key["project_key"], key["session_id"])
        self._summaries[ident] = state
        self._summaries.move_to_end(ident)
        while len(self._summaries) > _CACHE_SIZE:
            self._summaries.popitem(last=False)

    def _new_version(self) -> str:
        return f"{self._version_base}-{next(self._versions):x}"

    async def _run(self, script: Any, key: SessionKey, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise self._wrong_type(key) from None
            raise

    def _wrong_type(self, key: SessionKey) -> WrongTypeError:
        return WrongTypeError(
            f"{describe_key(key)}: a Redis key of this session holds a type "
            "RedisStore did not write; another program uses this prefix"
        )

    # ------------------------------------------------------------------
    # Summary catch-up (optimistic transaction)
    # ------------------------------------------------------------------

    async def _catch_up_safely(self, key: SessionKey, names: _Names) -> None:
        """``_catch_up``, but a failure is logged, not raised: the entries are stored."""
        try:
            await self._catch_up(key, names)
        except (RedisError, OSError, WalmirrorError, ValueError):
            logger.warning(
                "%s: could not update the session summary; the next append catches up",
                describe_key(key),
                exc_info=True,
            )

    async def _catch_up(self, key: SessionKey, names: _Names) -> None:
        """Fold every stored entry the summary does not cover yet, exactly once."""
        sid = key["session_id"]
        for attempt in range(_CAS_ATTEMPTS):
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(names.transcript, names.summary)
                    length = int(await pipe.llen(names.transcript))
                    folded_raw, data_raw, version_raw = await pipe.hmget(
                        names.summary, ["folded", "data", "v"]
                    )
                    prev, folded = _stored_summary(sid, folded_raw, data_raw)
                    if folded > length:  # a summary of a list that is gone
                        prev, folded = None, 0
                    if folded == length:
                        if length == 0 and folded_raw is not None:
                            pipe.multi()
                            pipe.delete(names.summary)
                            await pipe.execute()
                        elif prev is not None:
                            version = _text(version_raw) if version_raw is not None else ""
                            self._remember(key, _Folded(folded, prev["data"], version))
                        return
                    score = await pipe.zscore(names.index, sid)
                    if score is None:
                        seconds, micros = await pipe.time()
                        score = seconds * 1000 + micros // 1000
                    missing = _parse(
                        key, folded, await _lrange(pipe, names.transcript, folded, length)
                    )
                    summary = fold_summary(prev, key, missing)
                    version = self._new_version()
                    pipe.multi()
                    pipe.hset(
                        names.summary,
                        mapping={
                            "data": encode_entry(summary["data"]),
                            "mtime": int(score),
                            "folded": length,
                            "v": version,
                        },
                    )
                    if self._ttl_ms:
                        pipe.pexpire(names.summary, self._ttl_ms)
                    await pipe.execute()
                    self._remember(key, _Folded(length, summary["data"], version))
                    return
                except WatchError:
                    await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        logger.warning(
            "%s: summary update lost %d optimistic races; the next append catches up",
            describe_key(key),
            _CAS_ATTEMPTS,
        )

    # ------------------------------------------------------------------
    # Index
    # ------------------------------------------------------------------

    async def _index(self, project_key: str) -> list[tuple[str, int]]:
        """(session id, mtime) of the project's live sessions."""
        index = self._names(project_key, "-").index
        rows: list[tuple[bytes, float]] = []
        now_ms = 0
        start = 0
        while True:
            if self._ttl_ms and start == 0:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.time()
                    pipe.zrange(index, start, start + _CHUNK - 1, withscores=True)
                    (seconds, micros), chunk = await pipe.execute()
                now_ms = seconds * 1000 + micros // 1000
            else:
                chunk = await self._redis.zrange(index, start, start + _CHUNK - 1, withscores=True)
            rows.extend(chunk)
            if len(chunk) < _CHUNK:
                break
            start += _CHUNK
        cutoff = now_ms - self._ttl_ms if self._ttl_ms else None
        listed: list[tuple[str, int]] = []
        for member, score in rows:
            if cutoff is not None and score < cutoff:
                continue  # expired; the next append to the project prunes it
            try:
                sid = member.decode("utf-8")
            except UnicodeDecodeError:
                continue
            listed.append((sid, int(score)))
        return listed


# ----------------------------------------------------------------------
# Helpers without state
# ----------------------------------------------------------------------


def _encode(part: str) -> str:
    try:
        return quote(part, safe="", errors="strict")
    except UnicodeEncodeError:
        raise InvalidKeyError("session key parts must be valid Unicode text") from None


@functools.cache
def _driver_info() -> dict[str, Any]:
    """``driver_info`` for ``Redis.from_url``, built once per process.

    Given none, redis-py (7.1+) builds one per *connection*, and that reads the
    installed package's metadata (``importlib.metadata.version``): tens of
    milliseconds of the event loop for each connection a pool opens. The same
    information, CLIENT SETINFO sends the same; older redis-py takes nothing."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:
        return {}
    return {"driver_info": DriverInfo()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _encode_entries(key: SessionKey, entries: list[SessionStoreEntry]) -> list[bytes]:
    """``encode_entry`` of each entry, or ``InvalidEntryError`` naming only index and type."""
    if not isinstance(entries, list):
        raise InvalidEntryError(f"{describe_key(key)}: entries must be a list")
    lines: list[bytes] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InvalidEntryError(
                f"{describe_key(key)}: entry {i} is a {type(entry).__name__}, not a JSON object"
            )
        try:
            lines.append(encode_entry(entry))
        except (TypeError, ValueError, RecursionError) as exc:
            # The message of a json/encoding error can quote content; keep only its type.
            raise InvalidEntryError(
                f"{describe_key(key)}: entry {i} is not JSON-serialisable ({type(exc).__name__})"
            ) from None
    return lines


def _parse(key: SessionKey, first: int, raw: list[bytes]) -> list[SessionStoreEntry]:
    entries: list[SessionStoreEntry] = []
    for i, item in enumerate(raw):
        try:
            entry = json.loads(item)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            raise CorruptTranscriptError(
                f"{describe_key(key)}: element {first + i} is not a JSON object"
            )
        entries.append(cast(SessionStoreEntry, entry))
    return entries


async def _lrange(client: Any, name: str, start: int, stop: int | None) -> list[bytes]:
    """Elements ``start`` .. ``stop - 1`` (``None``: to the end), ``_CHUNK`` per call."""
    items: list[bytes] = []
    while stop is None or start < stop:
        last = start + _CHUNK - 1 if stop is None else min(stop, start + _CHUNK) - 1
        chunk = await client.lrange(name, start, last)
        items.extend(chunk)
        if len(chunk) < last - start + 1:
            break
        start = last + 1
    return items


def _stored_summary(
    session_id: str, folded: bytes | None, data: bytes | None
) -> tuple[SessionSummaryEntry | None, int]:
    """The stored summary and how many entries it covers; ``(None, 0)`` if absent or bad."""
    if folded is None or data is None:
        return None, 0
    try:
        covered = int(folded)
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        logger.warning("summary of session %r is unreadable; it will be rebuilt", session_id)
        return None, 0
    return {"session_id": session_id, "mtime": 0, "data": parsed}, covered


def _summary_from(
    session_id: str, data: bytes | None, mtime: bytes | None
) -> SessionSummaryEntry | None:
    if data is None or mtime is None:
        return None
    try:
        parsed = json.loads(data)
        stamp = int(mtime)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    return {"session_id": session_id, "mtime": stamp, "data": parsed}
