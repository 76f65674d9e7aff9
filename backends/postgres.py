"""``PostgresStore``: session transcripts in PostgreSQL, one row per entry (``asyncpg``).

Schema, for ``table="walmirror"`` in schema ``public`` (every name derives
from ``table``; the ``__`` separator is why table names may not contain
``__`` themselves, so two stores' names can never collide)::

    public.walmirror                         one row per transcript entry
        project_key   text COLLATE "C"
        session_id    text COLLATE "C"
        subpath       text COLLATE "C"       '' for the main transcript, never NULL
        entry_offset  bigint                 the entry's index in its transcript
        entry         json                   the entry, exactly as serialised
        PRIMARY KEY (project_key, session_id, subpath, entry_offset)

    public.walmirror__keys                   one row per transcript (main or subpath)
        project_key, session_id, subpath     PRIMARY KEY
        entry_count   bigint                 the transcript's length
        mtime_ms      bigint                 commit time of its last append, epoch ms
        + index (project_key, session_id) WHERE subpath = ''   for list_sessions

    public.walmirror__marks                  one row per producer that wrote a transcript
        project_key, session_id, subpath, producer            PRIMARY KEY
        mark          bigint                 the producer's highest stored seq
        mtime_ms      bigint                 when the mark last moved, epoch ms

    public.walmirror__summaries              one row per session (main keys only)
        project_key, session_id              PRIMARY KEY
        folded        bigint                 how many main entries ``data`` covers
        mtime_ms      bigint                 same value as the __keys row's mtime_ms
        data          json                   fold_session_summary's opaque state

    public.walmirror__append_batch(...)      plpgsql: the atomic step, one round trip
    public.walmirror__lock(...)              plpgsql: lock a session, read its state
    public.walmirror__delete(...)            plpgsql: cascading delete (keeps marks)

Every query is an index range scan on one of those primary keys: ``load``
reads ``(project_key, session_id, subpath)`` in offset order, ``length`` and
``list_subkeys`` read ``__keys``, ``list_sessions`` the partial index,
``list_session_summaries`` the ``__summaries`` key, ``producer_mark`` one
``__marks`` row. Key columns use the "C" collation: byte order, no locale
lookups, and the same on every server.

The atomic step (``walmirror.protocol``): ``append_batch`` is one call of
``__append_batch``, one transaction. It takes a shared advisory lock on the
session (``delete`` takes it exclusively, so a delete never interleaves with
an append of the same session), locks the key's ``__keys`` row (``SELECT ...
FOR UPDATE``; a new key's row is created first, so two concurrent first
appends serialise on it too), reads the producer's ``__marks`` row, answers
"behind" (``MarkBehindError``, nothing written) when ``expect`` is above the
mark, skips the leading entries at or below the mark, inserts the rest from
``unnest($entries)`` at ``entry_offset = entry_count, ...``, and updates
``entry_count``, the mark and, for a main key, the summary. A batch that is
all repeats changes nothing, not even ``mtime_ms``. The plain SessionStore
``append`` calls the same function without a producer: no mark, no skipping.

Summaries, exactly once: ``fold_session_summary`` is Python, so the fold
runs in the client, optimistically: the store caches each session's length,
``folded`` and summary from its previous call (or reads them first), guesses
how many entries the mark will skip (the batch's ``expect`` is the producer's
mark in the steady state), folds exactly the entries it expects to be
appended, and sends the result with the length, ``folded`` and skip count it
assumed. The function writes it only if all three hold under the row lock;
otherwise ("stale": a cache miss, a wrong guess, or another writer got there
first) it writes nothing, and the client retries once in a transaction that
first locks the session's rows and reads their state and the mark
(``__lock``), so the retry cannot lose a race again. So every appended entry
is folded into the stored summary exactly once and skipped repeats never
are, whatever the interleaving of writers, and the steady state stays one
round trip. ``mtime_ms`` of the transcript and of its summary come from the
same ``clock_timestamp()`` of the writing transaction, so a summary's
``mtime`` is never older than the ``mtime`` ``list_sessions`` reports.

Deletes and tombstones: ``delete()`` removes the transcript (a main key takes
its subagent transcripts and its summary with it, in one transaction; a
subpath key removes that one transcript) but leaves every ``__marks`` row of
the key and of its subkeys: they are the tombstone that turns a late retry of
a batch written before the delete into a no-op. A tombstone lives until an
operator removes it. Removing the marks of deleted transcripts is safe once
no queue that wrote them still holds undelivered entries for them (a queue
retains entries while its backend is down; give it a margin of days)::

    DELETE FROM public.walmirror__marks m
     WHERE m.mtime_ms < <now - margin, epoch ms>
       AND NOT EXISTS (SELECT 1 FROM public.walmirror__keys k
                        WHERE k.project_key = m.project_key AND k.session_id = m.session_id
                          AND k.subpath = m.subpath AND k.entry_count > 0);

Retention: the SDK never deletes from a store, and ``PostgresStore`` deletes
only when ``delete()`` is called. Anything else (TTL, compliance windows) is
the operator's job: ``__keys.mtime_ms`` says when each transcript last
changed, so a scheduled job can pick expired sessions there and call
``delete()`` for each (or run the ``__delete`` function in SQL: ``SELECT
public.walmirror__delete(project, session, NULL)``), which keeps the tables
consistent. Deleting rows by hand from one table only breaks later appends.

Lost data: the marks live in the same database and transactions as the
entries, so whatever loses entries (a restore from an older backup, a
failover to a replica that had not caught up) loses their marks with them,
and a producer that was told its entries were stored gets ``MarkBehindError``
on its next batch (its ``expect`` is above the mark) and re-sends. An operator
wiping the store must therefore wipe the marks in the same statement::

    TRUNCATE public.walmirror, public.walmirror__keys,
             public.walmirror__summaries, public.walmirror__marks;

Truncating the entries but keeping ``__marks`` would make the re-sends of the
lost entries look like repeats: they would be skipped, lost for good.

Why ``json`` and not ``jsonb`` for entries: ``json`` stores the text as sent,
after a validation pass; ``jsonb`` parses it into a binary tree on insert and
prints it back on every ``load``. Measured here (PostgreSQL 15, ~1 KB
entries, 500-entry batches), the server spends about a third less time
inserting ``json`` (~5 ms against ~7.5 ms a batch) and loads it 2-3x faster;
the drain target (60k entries/s) leaves no room for that. ``json`` also keeps
every entry byte for byte as the queue encoded it (``encode_entry``) and
accepts what ``jsonb`` refuses: a ``"\\u0000"`` escape inside a string, which
tool output can contain, and a lone surrogate's ``"\\ud800"`` escape. Nothing
here needs ``jsonb``'s operators; a deployment that wants to query entries
can add an expression index on ``(entry::jsonb -> 'type')`` or a generated
``jsonb`` column.

Schema creation (``ensure_schema``, run by ``connect`` and on first use of a
``from_url`` store) is idempotent (``CREATE ... IF NOT EXISTS``, ``CREATE OR
REPLACE FUNCTION``) and holds a transaction-level advisory lock, so two
processes starting at once do not trip over each other. On tables made by an
earlier version (offset protocol) it adds ``__marks`` and the new functions
and drops the old ``__append``, ``__same`` and two-argument ``__lock``: a
client of the old version still running fails (and retries) until it is
upgraded, instead of writing without marks. A role without DDL rights passes
``create_schema=False`` once the owner has run it. Table and schema names
must match ``[a-z][a-z0-9_]*`` (at most 40 characters, no ``__``, no trailing
``_``), else ``ValueError``; they are quoted anyway, and every value travels
as a bind parameter.

Connections: ``PostgresStore.connect(dsn)`` makes its own ``asyncpg`` pool;
``PostgresStore.from_url(url)`` does the same lazily, on first use (it is
synchronous, for configuration files). Both set a ``command_timeout`` (a
timed-out query sends a cancel request, which must give up on a dead network
too) and a no-op connection reset (asyncpg's default reset costs a round
trip per call; this store leaves no session state behind).
``PostgresStore(pool)`` uses a pool you own; give it a ``command_timeout``
as well. Behind pgbouncer in transaction mode, pass
``statement_cache_size=0``.

Errors: data the server refuses (SQLSTATE class 22) raises
``InvalidEntryError``; size limits (54), missing privileges (42501) and
tables that contradict each other (23) raise ``PermanentBackendError``: the
flusher parks the key. Messages carry the SQLSTATE, never data. Connection
errors, timeouts and everything else propagate as they are, to be retried.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Self, cast
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
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
    InvalidEntryError,
    InvalidKeyError,
    MarkBehindError,
    PermanentBackendError,
    WalmirrorError,
)
from walmirror.keys import describe_key, validate_key, validate_project_key
from walmirror.protocol import Batch, Receipt, check_batch, encode_entry, skip_count

__all__ = ["DEFAULT_TABLE", "PostgresStore", "validate_identifier"]

DEFAULT_TABLE = "walmirror"
MAX_IDENTIFIER_LENGTH = 40
"""Longest table or schema name: room for the ``__append_batch`` suffix within
PostgreSQL's 63-byte identifiers."""

MAX_KEY_BYTES = 2000
"""Longest ``project_key + session_id + subpath`` in UTF-8 bytes: a btree
index row must fit in a third of a page (2704 bytes, the offset included)."""

_IDENTIFIER = re.compile(r"[a-z][a-z0-9_]*")
_URL_OPTIONS = ("table", "schema", "command_timeout", "connect_timeout")
_POOL_PARAMETERS = frozenset(inspect.signature(asyncpg.create_pool).parameters)
_CACHE_SIZE = 4096  # sessions whose length and summary are cached


def validate_identifier(what: str, name: Any) -> str:
    """Return ``name`` if it is a safe table or schema name, else raise ``ValueError``."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string, got {type(name).__name__}")
    if not _IDENTIFIER.fullmatch(name) or "__" in name or name.endswith("_"):
        raise ValueError(
            f"{what} must match [a-z][a-z0-9_]* (lowercase letters, digits and single "
            "underscores, starting with a letter, not ending with '_')"
        )
    if len(name) > MAX_IDENTIFIER_LENGTH:
        raise ValueError(f"{what} must be at most {MAX_IDENTIFIER_LENGTH} characters")
    return name


@dataclass(frozen=True, slots=True)
class _Opener:
    """How a store that makes its own pool makes it."""

    dsn: str | None
    create_schema: bool
    options: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Head:
    """What the store last saw of a main transcript: its length and summary."""

    length: int
    folded: int
    summary: SessionSummaryEntry | None


class PostgresStore(SessionStore):
    """A ``SessionStore`` (and ``walmirror.protocol.ProducerStore``) keeping transcripts
    in PostgreSQL.

    ``pool`` is an ``asyncpg`` pool the caller owns (``close()`` leaves it
    open). ``table`` names the entries table; the others derive from it (see
    the module docstring). ``name`` overrides ``cursor_name``. The schema must
    exist: call ``ensure_schema()`` once, or use ``PostgresStore.connect``.
    """

    _pool: Any  # an asyncpg.Pool; None until a deferred store opens

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        table: str = DEFAULT_TABLE,
        schema: str = "public",
        name: str | None = None,
    ) -> None:
        self._setup(table, schema, name)
        self._pool = pool

    def _setup(self, table: str, schema: str, name: str | None) -> None:
        self._table = validate_identifier("table", table)
        self._schema = validate_identifier("schema", schema)
        self._pool = None
        self._opener: _Opener | None = None  # set when the store makes its own pool
        self._open_lock = asyncio.Lock()
        self._name = name
        self._heads: OrderedDict[tuple[str, str], _Head] = OrderedDict()
        q = f'"{self._schema}".'
        self._entries = f'{q}"{table}"'
        self._keys = f'{q}"{table}__keys"'
        self._summaries = f'{q}"{table}__summaries"'
        self._marks = f'{q}"{table}__marks"'
        self._append_fn = f'{q}"{table}__append_batch"'
        self._delete_fn = f'{q}"{table}__delete"'
        self._lock_fn = f'{q}"{table}__lock"'
        # What the offset protocol's schema had and this one drops (see ensure_schema).
        self._old_functions = (
            f'{q}"{table}__append"(text, text, text, bigint, text[], bigint, bigint, text)',
            f'{q}"{table}__same"(json, text)',
            f"{self._lock_fn}(text, text)",
        )
        # Advisory locks are database-wide: the first key half names this table.
        self._lock_class = _int32(zlib.crc32(f"walmirror:{schema}.{table}".encode()))
        self._sql_append = (
            "SELECT r_status, r_appended, r_mark, r_length, r_mtime_ms "
            f"FROM {self._append_fn}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        )
        self._sql_head = (
            f"SELECT coalesce((SELECT k.entry_count FROM {self._keys} k "
            "WHERE k.project_key = $1 AND k.session_id = $2 AND k.subpath = $3), 0), "
            "s.folded, s.mtime_ms, s.data::text "
            f"FROM (VALUES (1)) AS one(x) LEFT JOIN {self._summaries} s "
            "ON $3 = '' AND s.project_key = $1 AND s.session_id = $2"
        )
        self._sql_load = (
            f"SELECT entry::text FROM {self._entries} "
            "WHERE project_key = $1 AND session_id = $2 AND subpath = $3 ORDER BY entry_offset"
        )
        self._sql_range = (
            f"SELECT entry::text FROM {self._entries} "
            "WHERE project_key = $1 AND session_id = $2 AND subpath = '' "
            "AND entry_offset >= $3 AND entry_offset < $4 ORDER BY entry_offset"
        )
        self._sql_sessions = (
            f"SELECT session_id, mtime_ms FROM {self._keys} "
            "WHERE project_key = $1 AND subpath = '' AND entry_count > 0"
        )
        self._sql_summaries = (
            f"SELECT session_id, mtime_ms, data::text FROM {self._summaries} WHERE project_key = $1"
        )
        self._sql_subkeys = (
            f"SELECT subpath FROM {self._keys} WHERE project_key = $1 AND session_id = $2 "
            "AND subpath <> '' AND entry_count > 0 ORDER BY subpath"
        )
        self._sql_delete = f"SELECT {self._delete_fn}($1, $2, $3)"
        self._sql_lock = (
            "SELECT r_length, r_folded, r_mtime_ms, r_summary, r_mark "
            f"FROM {self._lock_fn}($1, $2, $3)"
        )
        self._sql_mark = (
            f"SELECT mark FROM {self._marks} WHERE project_key = $1 AND session_id = $2 "
            "AND subpath = $3 AND producer = $4"
        )

    @classmethod
    async def connect(
        cls,
        dsn: str | None = None,
        *,
        table: str = DEFAULT_TABLE,
        schema: str = "public",
        create_schema: bool = True,
        command_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        min_size: int = 1,
        max_size: int = 10,
        name: str | None = None,
        **pool_options: Any,
    ) -> PostgresStore:
        """Open a pool on ``dsn`` (a ``postgresql://`` URL; ``None``: libpq's
        ``PG*`` environment variables) and return a store on it.

        ``create_schema`` runs ``ensure_schema()`` (pass ``False`` for a role
        without DDL rights, once the owner has run it). ``command_timeout``
        bounds every query, and the cancel request a timed-out query sends;
        ``connect_timeout`` bounds opening a connection. ``pool_options`` go to
        ``asyncpg.create_pool``. The store owns the pool: ``close()`` closes it.
        """
        store = cls.deferred(
            dsn,
            table=table,
            schema=schema,
            create_schema=create_schema,
            command_timeout=command_timeout,
            connect_timeout=connect_timeout,
            min_size=min_size,
            max_size=max_size,
            name=name,
            **pool_options,
        )
        await store.open()
        return store

    @classmethod
    def deferred(
        cls,
        dsn: str | None = None,
        *,
        table: str = DEFAULT_TABLE,
        schema: str = "public",
        create_schema: bool = True,
        command_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        min_size: int = 1,
        max_size: int = 10,
        name: str | None = None,
        **pool_options: Any,
    ) -> PostgresStore:
        """``connect``'s store without connecting: the pool (and the schema) are
        made on first use, so this works outside an event loop (``from_url``)."""
        store = cls.__new__(cls)
        store._setup(table, schema, name)
        if "reset" in _POOL_PARAMETERS:
            pool_options.setdefault("reset", _keep_session)
        options = {
            "min_size": min_size,
            "max_size": max_size,
            "command_timeout": command_timeout,
            "timeout": connect_timeout,
            **pool_options,
        }
        store._opener = _Opener(dsn, create_schema, options)
        return store

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """A deferred store for ``postgresql://[user[:password]@]host[:port]/database?...``.

        Besides what ``asyncpg`` understands in a URL (``sslmode``, ``host``,
        ...), the query may carry ``table``, ``schema``, ``command_timeout``
        and ``connect_timeout`` (seconds); they are taken out before the URL
        reaches ``asyncpg``. Error messages never repeat the URL.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError("PostgresStore URLs start with postgresql:// or postgres://")
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in query if k in _URL_OPTIONS}
        if len(ours) != sum(1 for k, _ in query if k in _URL_OPTIONS):
            raise ValueError("a PostgresStore URL option is given twice")
        options: dict[str, Any] = {}
        for option in ("command_timeout", "connect_timeout"):
            if option in ours:
                try:
                    options[option] = float(ours[option])
                except ValueError:
                    raise ValueError(f"{option} in the URL must be a number of seconds") from None
                if not options[option] > 0:
                    raise ValueError(f"{option} in the URL must be positive")
        rest = urlencode([(k, v) for k, v in query if k not in _URL_OPTIONS])
        dsn = urlunsplit(parts._replace(query=rest))
        return cls.deferred(
            dsn,
            table=ours.get("table", DEFAULT_TABLE),
            schema=ours.get("schema", "public"),
            **options,
        )

    async def open(self) -> None:
        """Make the pool (and the schema) of a deferred store now; a no-op otherwise."""
        await self._ready()

    async def _ready(self) -> Any:
        """The pool, made on first use for stores that make their own."""
        if self._pool is not None:
            return self._pool
        async with self._open_lock:
            if self._pool is None:
                opener = self._opener
                if opener is None:  # pragma: no cover - the constructor sets one or the other
                    raise RuntimeError("PostgresStore has neither a pool nor a DSN")
                pool = await asyncpg.create_pool(opener.dsn, **opener.options)
                try:
                    if opener.create_schema:
                        await self._create_schema(pool)
                except BaseException:
                    pool.terminate()
                    raise
                self._pool = pool
        return self._pool

    @property
    def pool(self) -> asyncpg.Pool:
        """The ``asyncpg`` pool (``RuntimeError`` for a deferred store not yet open)."""
        if self._pool is None:
            raise RuntimeError("this PostgresStore has not connected yet (await store.open())")
        return self._pool

    @property
    def table(self) -> str:
        return self._table

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def cursor_name(self) -> str:
        """How a walmirror queue names its cursor for this backend, stable across
        processes: ``postgresql://host:port/database/[schema.]table``, never a password."""
        if self._name is None:
            if self._opener is not None:
                dsn, options = self._opener.dsn, self._opener.options
            else:
                args = getattr(self._pool, "_connect_args", None) or ()
                dsn = args[0] if args and isinstance(args[0], str) else None
                options = getattr(self._pool, "_connect_kwargs", None) or {}
            self._name = _cursor_name_from(dsn, options, self._schema, self._table)
        return self._name

    def __repr__(self) -> str:
        return f"PostgresStore({self.cursor_name!r})"

    async def close(self) -> None:
        """Close the pool if the store made it (``connect``, ``from_url``); a pool
        passed to the constructor stays open."""
        if self._opener is not None:
            async with self._open_lock:
                if self._pool is not None:
                    await self._pool.close()

    async def __aenter__(self) -> Self:
        await self._ready()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------
    # Schema
    # ------------------------------------------------------------------

    async def ensure_schema(self) -> None:
        """Create the tables, indexes and functions if missing (safe to run concurrently)."""
        await self._create_schema(await self._ready())

    async def _create_schema(self, pool: Any) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", self._lock_class)
            await conn.execute(self._schema_sql())

    async def drop_schema(self) -> None:
        """Drop this store's tables and functions, with every transcript and mark in them."""
        pool = await self._ready()
        functions = (
            f"{self._append_fn}(text, text, text, text, bigint, bigint, text[], bigint, bigint, "
            "bigint, text)",
            f"{self._lock_fn}(text, text, text)",
            f"{self._delete_fn}(text, text, text)",
            *self._old_functions,
        )
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", self._lock_class)
            await conn.execute(
                f"DROP FUNCTION IF EXISTS {', '.join(functions)};"
                f"DROP TABLE IF EXISTS {self._entries}, {self._keys}, {self._summaries}, "
                f"{self._marks};"
            )
        self._heads.clear()

    def _schema_sql(self) -> str:
        key_cols = (
            'project_key text COLLATE "C" NOT NULL, session_id text COLLATE "C" NOT NULL, '
            'subpath text COLLATE "C" NOT NULL'
        )
        index = f'"{self._table}__sessions"'
        # The session's advisory lock: shared by appends, exclusive for deletes.
        session_lock = f"{self._lock_class}, hashtext(p_project || '/' || p_session)"
        lock = f"pg_advisory_xact_lock_shared({session_lock})"
        xlock = f"pg_advisory_xact_lock({session_lock})"
        this_key = "project_key = p_project AND session_id = p_session AND subpath = p_subpath"
        return f"""
DO $do$ BEGIN
    -- CREATE SCHEMA IF NOT EXISTS would need CREATE on the database even when it exists.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = '{self._schema}') THEN
        CREATE SCHEMA IF NOT EXISTS "{self._schema}";
    END IF;
END $do$;
CREATE TABLE IF NOT EXISTS {self._entries} (
    {key_cols},
    entry_offset bigint NOT NULL,
    entry json NOT NULL,
    PRIMARY KEY (project_key, session_id, subpath, entry_offset)
);
CREATE TABLE IF NOT EXISTS {self._keys} (
    {key_cols},
    entry_count bigint NOT NULL,
    mtime_ms bigint NOT NULL,
    PRIMARY KEY (project_key, session_id, subpath)
);
CREATE INDEX IF NOT EXISTS {index} ON {self._keys} (project_key, session_id)
    WHERE subpath = '';
CREATE TABLE IF NOT EXISTS {self._summaries} (
    project_key text COLLATE "C" NOT NULL,
    session_id text COLLATE "C" NOT NULL,
    folded bigint NOT NULL,
    mtime_ms bigint NOT NULL,
    data json NOT NULL,
    PRIMARY KEY (project_key, session_id)
);
CREATE TABLE IF NOT EXISTS {self._marks} (
    {key_cols},
    producer text COLLATE "C" NOT NULL,
    mark bigint NOT NULL,
    mtime_ms bigint NOT NULL,
    PRIMARY KEY (project_key, session_id, subpath, producer)
);

-- The offset protocol's functions: a client still speaking it fails until upgraded.
DROP FUNCTION IF EXISTS {", ".join(self._old_functions)};

CREATE OR REPLACE FUNCTION {self._append_fn}(
    p_project text, p_session text, p_subpath text,
    p_producer text, p_first_seq bigint, p_expect bigint, p_entries text[],
    p_base bigint, p_folded bigint, p_skip bigint, p_summary text,
    OUT r_status text, OUT r_appended bigint, OUT r_mark bigint, OUT r_length bigint,
    OUT r_mtime_ms bigint)
LANGUAGE plpgsql AS $fn$
-- The atomic step of walmirror.protocol. p_producer NULL: a plain append (no
-- mark, nothing skipped). For a main key, p_base, p_folded and p_skip are the
-- client's assumptions behind p_summary: stored only if they hold, else 'stale'.
DECLARE
    n bigint := coalesce(cardinality(p_entries), 0);
    cur bigint;
    skip bigint := 0;
    now_ms bigint;
    s_folded bigint;
BEGIN
    PERFORM {lock};
    r_appended := 0;
    LOOP
        SELECT k.entry_count INTO cur FROM {self._keys} k
         WHERE k.project_key = p_project AND k.session_id = p_session AND k.subpath = p_subpath
           FOR UPDATE;
        r_length := coalesce(cur, 0);
        IF p_producer IS NOT NULL THEN
            -- Read under the key row's lock once the row exists; before that, a
            -- 'behind' or all-repeats answer writes nothing, so its snapshot is enough.
            SELECT m.mark INTO r_mark FROM {self._marks} m
             WHERE m.project_key = p_project AND m.session_id = p_session
               AND m.subpath = p_subpath AND m.producer = p_producer;
            IF p_expect IS NOT NULL AND (r_mark IS NULL OR r_mark < p_expect) THEN
                r_status := 'behind';
                RETURN;
            END IF;
            skip := CASE WHEN r_mark IS NULL OR r_mark < p_first_seq THEN 0
                         WHEN r_mark - p_first_seq >= n THEN n
                         ELSE r_mark - p_first_seq + 1 END;
        END IF;
        IF skip = n THEN
            r_status := 'ok';
            RETURN;
        END IF;
        EXIT WHEN cur IS NOT NULL;
        INSERT INTO {self._keys} (project_key, session_id, subpath, entry_count, mtime_ms)
        VALUES (p_project, p_session, p_subpath, 0, 0) ON CONFLICT DO NOTHING;
    END LOOP;
    IF p_subpath = '' THEN
        SELECT s.folded INTO s_folded FROM {self._summaries} s
         WHERE s.project_key = p_project AND s.session_id = p_session
           FOR UPDATE;
        IF p_base IS DISTINCT FROM cur OR p_folded IS DISTINCT FROM coalesce(s_folded, 0)
           OR p_skip IS DISTINCT FROM skip OR p_summary IS NULL THEN
            r_status := 'stale';
            RETURN;
        END IF;
    END IF;
    now_ms := floor(extract(epoch FROM clock_timestamp()) * 1000);
    -- (A WHERE, not a slice p_entries[skip + 1:n]: the slice copies the array.)
    INSERT INTO {self._entries} (project_key, session_id, subpath, entry_offset, entry)
    SELECT p_project, p_session, p_subpath, cur + x.i - 1 - skip, x.entry::json
      FROM unnest(p_entries) WITH ORDINALITY AS x(entry, i)
     WHERE x.i > skip;
    r_appended := n - skip;
    r_length := cur + r_appended;
    UPDATE {self._keys} SET entry_count = r_length, mtime_ms = now_ms WHERE {this_key};
    IF p_producer IS NOT NULL THEN
        r_mark := p_first_seq + (n - 1);
        INSERT INTO {self._marks} AS m
               (project_key, session_id, subpath, producer, mark, mtime_ms)
        VALUES (p_project, p_session, p_subpath, p_producer, r_mark, now_ms)
        ON CONFLICT (project_key, session_id, subpath, producer) DO UPDATE
           SET mark = excluded.mark, mtime_ms = excluded.mtime_ms;
    END IF;
    IF p_subpath = '' THEN
        INSERT INTO {self._summaries} AS s (project_key, session_id, folded, mtime_ms, data)
        VALUES (p_project, p_session, r_length, now_ms, p_summary::json)
        ON CONFLICT (project_key, session_id) DO UPDATE
           SET folded = excluded.folded, mtime_ms = excluded.mtime_ms, data = excluded.data;
    END IF;
    r_status := 'appended';
    r_mtime_ms := now_ms;
END
$fn$;

CREATE OR REPLACE FUNCTION {self._lock_fn}(p_project text, p_session text, p_producer text,
    OUT r_length bigint, OUT r_folded bigint, OUT r_mtime_ms bigint, OUT r_summary text,
    OUT r_mark bigint)
LANGUAGE plpgsql AS $fn$
BEGIN
    -- For the caller's transaction: lock a main transcript and its summary, read
    -- both and the producer's mark (stable while the key row is locked).
    PERFORM {lock};
    INSERT INTO {self._keys} (project_key, session_id, subpath, entry_count, mtime_ms)
    VALUES (p_project, p_session, '', 0, 0) ON CONFLICT DO NOTHING;
    SELECT k.entry_count INTO r_length FROM {self._keys} k
     WHERE k.project_key = p_project AND k.session_id = p_session AND k.subpath = ''
       FOR UPDATE;
    SELECT s.folded, s.mtime_ms, s.data::text INTO r_folded, r_mtime_ms, r_summary
      FROM {self._summaries} s
     WHERE s.project_key = p_project AND s.session_id = p_session
       FOR UPDATE;
    r_folded := coalesce(r_folded, 0);
    SELECT m.mark INTO r_mark FROM {self._marks} m
     WHERE m.project_key = p_project AND m.session_id = p_session AND m.subpath = ''
       AND m.producer = p_producer;
END
$fn$;

CREATE OR REPLACE FUNCTION {self._delete_fn}(p_project text, p_session text, p_subpath text)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    -- The key's (and subkeys') __marks rows stay: they are the tombstone.
    PERFORM {xlock};
    IF p_subpath IS NULL THEN
        DELETE FROM {self._entries} WHERE project_key = p_project AND session_id = p_session;
        DELETE FROM {self._keys} WHERE project_key = p_project AND session_id = p_session;
        DELETE FROM {self._summaries} WHERE project_key = p_project AND session_id = p_session;
    ELSE
        DELETE FROM {self._entries} WHERE {this_key};
        DELETE FROM {self._keys} WHERE {this_key};
    END IF;
END
$fn$;
"""

    # ------------------------------------------------------------------
    # SessionStore
    # ------------------------------------------------------------------

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Append ``entries`` at the key's current end, atomically. No producer: a
        retry appends again (the SDK's own contract); walmirror calls ``append_batch``."""
        k = self._check_key(key)
        texts = _encode(k, entries)
        if texts:
            await self._append(k, texts, None, entries)

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """All entries of ``key`` in order, or ``None`` if it holds none."""
        k = self._check_key(key)
        rows = await self._fetch(self._sql_load, k["project_key"], k["session_id"], _sub(k))
        if not rows:
            return None
        return [cast(SessionStoreEntry, json.loads(row[0])) for row in rows]

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """Main transcripts of the project; ``mtime`` is the last append's commit, epoch ms."""
        project = validate_project_key(project_key)
        rows = await self._fetch(self._sql_sessions, project)
        return [{"session_id": row[0], "mtime": row[1]} for row in rows]

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """The stored summaries of the project's sessions."""
        project = validate_project_key(project_key)
        rows = await self._fetch(self._sql_summaries, project)
        return [{"session_id": row[0], "mtime": row[1], "data": json.loads(row[2])} for row in rows]

    async def delete(self, key: SessionKey) -> None:
        """Delete a transcript; a main key also takes its subkeys and summary. Every
        producer's mark stays: the tombstone (see the module docstring)."""
        k = self._check_key(key)
        self._heads.pop((k["project_key"], k["session_id"]), None)
        await self._fetch(self._sql_delete, k["project_key"], k["session_id"], k.get("subpath"))
        self._heads.pop((k["project_key"], k["session_id"]), None)

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """Subpaths of the session's subagent transcripts, sorted."""
        k = self._check_key(key)  # a stray subpath is validated, then ignored
        rows = await self._fetch(self._sql_subkeys, k["project_key"], k["session_id"])
        return [row[0] for row in rows]

    # ------------------------------------------------------------------
    # The delivery protocol (walmirror.protocol.ProducerStore)
    # ------------------------------------------------------------------

    async def append_batch(self, key: SessionKey, batch: Batch) -> Receipt:
        """The atomic step of ``walmirror.protocol``: skip what the producer's mark
        covers, append the rest at the end. One call of ``__append_batch``."""
        k = self._check_key(key)
        check_batch(describe_key(k), batch)
        try:
            texts = [b.decode() for b in batch.encoded]
        except UnicodeDecodeError:
            raise InvalidEntryError(f"{describe_key(k)}: an encoded entry is not UTF-8") from None
        row = await self._append(k, texts, batch, None)
        return Receipt(appended=row["r_appended"], mark=row["r_mark"], length=row["r_length"])

    async def producer_mark(self, key: SessionKey, producer: str) -> int | None:
        """The producer's highest stored seq for ``key`` (``None``: it has none)."""
        k = self._check_key(key)
        args = (k["project_key"], k["session_id"], _sub(k), producer)
        rows = await self._fetch(self._sql_mark, *args)
        return int(rows[0][0]) if rows else None

    async def length(self, key: SessionKey) -> int:
        """How many entries ``key`` holds (0 if never written or deleted)."""
        k = self._check_key(key)
        head = await self._read_head(k)
        return head.length

    async def ping(self) -> None:
        """The health call (``walmirror.protocol``): one ``SELECT 1``."""
        await self._fetch("SELECT 1")

    async def _append(
        self,
        key: SessionKey,
        texts: list[str],
        batch: Batch | None,
        plain: list[SessionStoreEntry] | None,
    ) -> asyncpg.Record:
        """Store ``batch`` (or, without a producer, the ``plain`` entries) through
        ``__append_batch``; returns its row, status "ok" or "appended"."""
        project, session, subpath = key["project_key"], key["session_id"], _sub(key)
        if subpath:  # no summary: the function alone decides
            args = (*self._call(key, texts, batch), None, None, None, None)
            return self._outcome(key, batch, await self._fetchrow(key, self._sql_append, *args))
        ident = (project, session)
        head = self._heads.get(ident)
        if head is None:
            # Unknown here: guess a new session when the producer knows of nothing it
            # stored (a wrong guess costs the locked retry below), else read it first.
            new = batch is None or batch.expect is None
            head = _Head(0, 0, None) if new else await self._read_head(key)
        # In the steady state the producer's mark is what it expects.
        skip = 0 if batch is None else skip_count(describe_key(key), batch, batch.expect)
        row, data = await self._fold_and_append(None, key, texts, batch, plain, head, skip)
        if row["r_status"] == "stale":
            # Another writer got there first, or the guess was wrong. Retrying
            # optimistically could lose the race again and again; fold under the
            # session's row locks instead.
            self._heads.pop(ident, None)
            row, data = await self._append_locked(key, texts, batch, plain)
        if row["r_status"] == "appended" and data is not None:
            length = row["r_length"]
            summary = _summary(session, row["r_mtime_ms"], data)
            self._remember(ident, _Head(length, length, summary))
        elif row["r_length"] != head.length:
            self._heads.pop(ident, None)
        return self._outcome(key, batch, row)

    def _call(self, key: SessionKey, texts: list[str], batch: Batch | None) -> tuple[Any, ...]:
        """``__append_batch``'s arguments before the summary's."""
        where = (key["project_key"], key["session_id"], _sub(key))
        if batch is None:
            return (*where, None, None, None, texts)
        return (*where, batch.producer, batch.first_seq, batch.expect, texts)

    async def _fold_and_append(
        self,
        conn: Any,
        key: SessionKey,
        texts: list[str],
        batch: Batch | None,
        plain: list[SessionStoreEntry] | None,
        head: _Head,
        skip: int,
    ) -> tuple[asyncpg.Record, dict[str, Any] | None]:
        """Fold the entries past the first ``skip`` onto ``head``'s summary and call
        ``__append_batch`` (on ``conn``, or on the pool when ``None``). The function
        stores the batch only if ``head`` and ``skip`` still hold ("stale" otherwise)."""
        data: dict[str, Any] | None = None
        summary_text: str | None = None
        if skip < len(texts):
            backlog = await self._backlog(conn, key, head)
            try:
                if batch is None:
                    data = fold_summary(head.summary, key, backlog + (plain or [])[skip:])["data"]
                else:
                    prev = fold_summary(head.summary, key, backlog) if backlog else head.summary
                    data = fold_batch(prev, key, batch, skip)["data"]
            except ValueError:  # bytes that are not JSON; the message would quote them
                raise InvalidEntryError(
                    f"{describe_key(key)}: an encoded entry is not JSON"
                ) from None
            summary_text = encode_entry(data).decode()
        args = (*self._call(key, texts, batch), head.length, head.folded, skip, summary_text)
        row = await self._fetchrow(key, self._sql_append, *args, conn=conn)
        return row, data

    async def _append_locked(
        self,
        key: SessionKey,
        texts: list[str],
        batch: Batch | None,
        plain: list[SessionStoreEntry] | None,
    ) -> tuple[asyncpg.Record, dict[str, Any] | None]:
        """``_fold_and_append`` in a transaction that first locks the session's
        rows (``__lock``) and reads its state and the producer's mark: nobody can
        change them before the append, so the append cannot be stale. A few round
        trips, on contention and cache misses only."""
        pool = self._pool if self._pool is not None else await self._ready()
        producer = None if batch is None else batch.producer
        async with pool.acquire() as conn, conn.transaction():
            args = (key["project_key"], key["session_id"], producer)
            state = await self._fetchrow(key, self._sql_lock, *args, conn=conn)
            head = _head_from(key["session_id"], state)
            # MarkBehindError here rolls the transaction back: nothing written.
            skip = 0 if batch is None else skip_count(describe_key(key), batch, state["r_mark"])
            row, data = await self._fold_and_append(conn, key, texts, batch, plain, head, skip)
        if row["r_status"] == "stale":  # pragma: no cover - the locks rule it out
            raise WalmirrorError(f"{describe_key(key)}: the session changed under its lock")
        return row, data

    def _outcome(self, key: SessionKey, batch: Batch | None, row: asyncpg.Record) -> asyncpg.Record:
        status = row["r_status"]
        if status in ("ok", "appended"):
            return row
        self._heads.pop((key["project_key"], key["session_id"]), None)
        if status == "behind" and batch is not None and batch.expect is not None:
            raise MarkBehindError(describe_key(key), row["r_mark"], batch.expect)
        raise WalmirrorError(f"{describe_key(key)}: unexpected append status {status!r}")

    async def _read_head(self, key: SessionKey) -> _Head:
        """The key's length and, for a main key, its summary; primes the cache."""
        project, session, subpath = key["project_key"], key["session_id"], _sub(key)
        head = _head_from(
            session, await self._fetchrow(key, self._sql_head, project, session, subpath)
        )
        if not subpath:
            self._remember((project, session), head)
        return head

    async def _backlog(self, conn: Any, key: SessionKey, head: _Head) -> list[SessionStoreEntry]:
        """Entries stored but not yet folded into the summary (written without one)."""
        if head.folded >= head.length:
            return []
        args = (key["project_key"], key["session_id"], head.folded, head.length)
        rows = await self._fetch(self._sql_range, *args, conn=conn)
        return [cast(SessionStoreEntry, json.loads(row[0])) for row in rows]

    def _remember(self, ident: tuple[str, str], head: _Head) -> None:
        self._heads[ident] = head
        self._heads.move_to_end(ident)
        while len(self._heads) > _CACHE_SIZE:
            self._heads.popitem(last=False)

    # ------------------------------------------------------------------
    # Queries
    # ------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any, conn: Any = None) -> list[asyncpg.Record]:
        try:
            if conn is None:
                conn = self._pool if self._pool is not None else await self._ready()
            return cast(list[asyncpg.Record], await conn.fetch(sql, *args))
        except asyncpg.PostgresError as exc:
            raise _translate(exc) from None

    async def _fetchrow(
        self, key: SessionKey, sql: str, *args: Any, conn: Any = None
    ) -> asyncpg.Record:
        """One row of ``sql`` (every query sent through here returns exactly one)."""
        try:
            if conn is None:
                conn = self._pool if self._pool is not None else await self._ready()
            row = await conn.fetchrow(sql, *args)
        except asyncpg.PostgresError as exc:
            raise _translate(exc) from None
        if row is None:  # pragma: no cover - each of these queries returns one row
            raise WalmirrorError(f"{describe_key(key)}: the server returned no row")
        return row

    def _check_key(self, key: Any) -> SessionKey:
        k = validate_key(key)
        size = sum(len(str(part).encode("utf-8", "surrogatepass")) for part in k.values())
        if size > MAX_KEY_BYTES:
            raise InvalidKeyError(
                f"session key is {size} bytes in UTF-8; PostgresStore takes at most {MAX_KEY_BYTES}"
            )
        return k


# ----------------------------------------------------------------------
# Helpers without state
# ----------------------------------------------------------------------


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset for connections this store used: it leaves no session state behind
    (only transaction-level locks, no LISTEN, no cursors, no SET), so nothing to undo."""


def _sub(key: SessionKey | SessionListSubkeysKey) -> str:
    return cast(dict[str, str], key).get("subpath") or ""


def _summary(session_id: str, mtime: int, data: dict[str, Any]) -> SessionSummaryEntry:
    return {"session_id": session_id, "mtime": mtime, "data": data}


def _head_from(session_id: str, row: asyncpg.Record) -> _Head:
    """A ``_Head`` from (length, folded, mtime_ms, summary data text) as ``__lock`` and
    the head query return them."""
    length, folded, mtime, data = row[0], row[1], row[2], row[3]
    summary = None if data is None else _summary(session_id, mtime, json.loads(data))
    return _Head(length, folded or 0, summary)


def _int32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def _encode(key: SessionKey, entries: list[SessionStoreEntry]) -> list[str]:
    """Each entry's canonical JSON, or ``InvalidEntryError`` naming only index and type."""
    if not isinstance(entries, list):
        raise InvalidEntryError(f"{describe_key(key)}: entries must be a list")
    texts: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InvalidEntryError(
                f"{describe_key(key)}: entry {i} is a {type(entry).__name__}, not a JSON object"
            )
        try:
            texts.append(encode_entry(entry).decode())
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidEntryError(
                f"{describe_key(key)}: entry {i} is not JSON-serialisable ({type(exc).__name__})"
            ) from None
    return texts


def _translate(exc: Exception) -> Exception:
    """A server error the flusher must not retry becomes a permanent one; its
    message (which may quote data) is reduced to the SQLSTATE and class name."""
    state = str(getattr(exc, "sqlstate", "") or "")
    what = f"PostgreSQL error {state} ({type(exc).__name__})"
    if state.startswith("22"):  # data exception
        return InvalidEntryError(f"{what}: the server refused the data")
    if state.startswith("54") or state == "42501":  # program limit; insufficient privilege
        return PermanentBackendError(f"{what}: retrying cannot help")
    if state.startswith("23"):  # integrity: rows past a key's length, written by hand
        return PermanentBackendError(f"{what}: the tables disagree with each other")
    return exc


def _cursor_name_from(dsn: str | None, kwargs: dict[str, Any], schema: str, table: str) -> str:
    """``postgresql://host:port/database/[schema.]table`` from connect arguments
    (a DSN and/or ``host``, ``port``, ``database``), with libpq's environment
    variables and defaults filling the gaps. Never the user or password."""
    dsn = dsn or kwargs.get("dsn")
    hosts = database = None
    user = kwargs.get("user")
    if isinstance(dsn, str) and "://" in dsn:
        parts = urlsplit(dsn)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        user = user or unquote(userinfo.partition(":")[0]) or None
        database = unquote(parts.path.lstrip("/")) or None
        query = parse_qs(parts.query)
        hosts = hosts or (query.get("host") or [""])[0]
        database = database or (query.get("dbname") or query.get("database") or [""])[0] or None
    host = kwargs.get("host") or hosts or os.environ.get("PGHOST") or "localhost"
    if isinstance(host, list | tuple):
        host = ",".join(str(h) for h in host)
    port = kwargs.get("port") or os.environ.get("PGPORT") or 5432
    host = str(host).lower()
    if "," not in host and not re.search(r":\d+$", host) and not host.startswith("/"):
        host = f"{host}:{port}"
    database = (
        kwargs.get("database")
        or database
        or os.environ.get("PGDATABASE")
        or user
        or os.environ.get("PGUSER")
        or ""
    )
    where = table if schema == "public" else f"{schema}.{table}"
    return f"postgresql://{quote(host, safe=':,[]')}/{quote(str(database), safe='')}/{where}"
