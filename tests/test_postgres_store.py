"""Tests for walmirror.backends.postgres.PostgresStore, against a real PostgreSQL.

The shared suite (tests/test_protocol_backends.py) states the delivery
protocol for every backend; these tests cover what only PostgreSQL has: the
tables and functions behind it, schema creation, the optimistic summary fold,
a wiped store, and real faults (a fault proxy, a crashed server).

The shared server is ``WALMIRROR_POSTGRES_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``). Every test works in tables of
its own (random names) and drops them at the end. The restart test runs a
private PostgreSQL instance (``initdb`` in a temporary directory) and never
touches the shared server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.testing.session_store_conformance import run_session_store_conformance
from claude_agent_sdk.types import SessionKey, SessionStoreEntry

from walmirror import DurableSessionStore
from walmirror.backends import fold_batch, fold_summary
from walmirror.backends import postgres as postgres_module
from walmirror.backends.postgres import PostgresStore
from walmirror.errors import (
    InvalidEntryError,
    InvalidKeyError,
    MarkBehindError,
    PermanentBackendError,
)
from walmirror.faultproxy import FaultProxy
from walmirror.protocol import Batch, Receipt, encode_entry, is_producer_store

DSN = os.environ.get("WALMIRROR_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PG_BIN = Path(os.environ.get("WALMIRROR_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))

KEY: SessionKey = {"project_key": "proj", "session_id": "sess"}
SUB: SessionKey = {"project_key": "proj", "session_id": "sess", "subpath": "subagents/agent-1"}

MakeStore = Callable[..., Awaitable[PostgresStore]]


def entries(count: int, start: int = 0, tag: str = "e") -> list[Any]:
    """Entries whose fold is order-sensitive: each one sets a new custom title."""
    return [
        {
            "type": "user",
            "uuid": f"{tag}{i}",
            "n": i,
            "customTitle": f"{tag}-title-{i}",
            "timestamp": f"2024-01-01T00:00:{i % 60:02d}.000Z",
        }
        for i in range(start, start + count)
    ]


def batch(
    producer: str, first: int, count: int, expect: int | None = None, tag: str | None = None
) -> Batch:
    """Seqs ``first``..``first + count - 1`` of ``producer``; entry ``n`` is its seq."""
    return Batch.of(producer, first, entries(count, first, tag or producer), expect)


def new_table() -> str:
    return f"wmtest_{uuid.uuid4().hex[:12]}"


async def drop_tables(tables: list[str]) -> None:
    pool = await asyncpg.create_pool(DSN, min_size=1, max_size=1, command_timeout=30)
    try:
        for table in tables:
            await PostgresStore(pool, table=table).drop_schema()
    finally:
        await pool.close()


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(DSN, min_size=1, max_size=8, command_timeout=10)
    yield pool
    await pool.close()


@pytest.fixture
async def tables() -> AsyncIterator[list[str]]:
    """Names of every table the test creates; all dropped at teardown."""
    names: list[str] = []
    yield names
    await drop_tables(names)


@pytest.fixture
async def make_store(pool: asyncpg.Pool, tables: list[str]) -> MakeStore:
    """A store on the shared pool; on a fresh table unless ``table`` is given."""

    async def make(table: str | None = None) -> PostgresStore:
        if table is None:
            table = new_table()
            tables.append(table)
        store = PostgresStore(pool, table=table)
        await store.ensure_schema()
        return store

    return make


@pytest.fixture
async def store(make_store: MakeStore) -> PostgresStore:
    return await make_store()


_TABLES = (
    ("{t}", ""),
    ("{keys}", "__keys"),
    ("{summaries}", "__summaries"),
    ("{marks}", "__marks"),
)


def named(store: PostgresStore, sql: str) -> str:
    """``sql`` with ``{t}``, ``{keys}``, ``{summaries}``, ``{marks}`` naming the store's tables."""
    for name, suffix in _TABLES:
        sql = sql.replace(name, f'"{store.table}{suffix}"')
    return sql


async def rows(store: PostgresStore, sql: str, *args: Any) -> list[asyncpg.Record]:
    return list(await store.pool.fetch(named(store, sql), *args))


async def summary_row(store: PostgresStore, key: SessionKey) -> asyncpg.Record | None:
    found = await rows(
        store,
        "SELECT folded, mtime_ms, data::text AS data FROM {summaries} "
        "WHERE project_key = $1 AND session_id = $2",
        key["project_key"],
        key["session_id"],
    )
    return found[0] if found else None


async def assert_summary_exact(
    store: PostgresStore, key: SessionKey, expected: list[SessionStoreEntry]
) -> None:
    """The stored summary folds every entry exactly once, in order."""
    row = await summary_row(store, key)
    assert row is not None
    assert row["folded"] == len(expected)
    assert json.loads(row["data"]) == fold_session_summary(None, key, expected)["data"]


async def count(store: PostgresStore, table: str) -> int:
    return int((await rows(store, f"SELECT count(*) AS n FROM {table}"))[0]["n"])


# --- The SDK's contract ---------------------------------------------------


async def test_passes_sdk_conformance_suite(make_store: MakeStore) -> None:
    await run_session_store_conformance(make_store)


async def test_passes_sdk_conformance_suite_wrapped_in_durable_store(
    make_store: MakeStore, make_durable: Callable[..., DurableSessionStore]
) -> None:
    async def make() -> DurableSessionStore:
        return make_durable(await make_store())

    await run_session_store_conformance(make)


async def test_speaks_the_producer_protocol(store: PostgresStore) -> None:
    assert is_producer_store(store)


# --- Construction, names, schema -------------------------------------------


async def test_connect_owns_its_pool_and_names_cursor_without_password(
    tables: list[str],
) -> None:
    table = new_table()
    tables.append(table)
    secret_dsn = DSN.replace("postgres@", "postgres:s3cret-pw@", 1)
    store = await PostgresStore.connect(secret_dsn, table=table)
    try:
        assert store.cursor_name == f"postgresql://127.0.0.1:5432/test/{table}"
        assert "s3cret" not in repr(store)
        await store.append(KEY, entries(1))
    finally:
        await store.close()
    assert store.pool.is_closing()


async def test_constructor_uses_a_pool_it_does_not_own(
    pool: asyncpg.Pool, tables: list[str]
) -> None:
    table = new_table()
    tables.append(table)
    async with PostgresStore(pool, table=table, schema="public") as store:
        await store.ensure_schema()
        assert store.cursor_name == f"postgresql://127.0.0.1:5432/test/{table}"
        assert PostgresStore(pool, table=table, name="pg-main").cursor_name == "pg-main"
    assert not pool.is_closing()
    assert await pool.fetchval("SELECT 1") == 1


async def test_from_url_connects_on_first_use(tables: list[str]) -> None:
    table = new_table()
    tables.append(table)
    url = DSN.replace("postgres@", "postgres:pw-secret@", 1)
    store = PostgresStore.from_url(f"{url}?table={table}&command_timeout=5&connect_timeout=2")
    with pytest.raises(RuntimeError):
        store.pool  # noqa: B018 - not connected yet
    assert store.cursor_name == f"postgresql://127.0.0.1:5432/test/{table}"
    try:
        await store.append(KEY, entries(2))  # connects and creates the schema
        assert await store.load(KEY) == entries(2)
        assert store.table == table
    finally:
        await store.close()
    assert store.pool.is_closing()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw-secret@h/db?table=x;drop",
        "postgresql://u:pw-secret@h/db?schema=A",
        "postgresql://u:pw-secret@h/db?command_timeout=soon",
        "postgresql://u:pw-secret@h/db?connect_timeout=0",
        "postgresql://u:pw-secret@h/db?table=a&table=b",
        "mysql://u:pw-secret@h/db",
    ],
)
def test_from_url_refuses_bad_urls_without_echoing_them(url: str) -> None:
    with pytest.raises(ValueError) as info:
        PostgresStore.from_url(url)
    assert "pw-secret" not in str(info.value)


@pytest.mark.parametrize(
    "bad",
    ["x; drop table", "1abc", "a" * 41, "", 'x"y', "Entries", "a__b", "a-b", "público", "x_"],
)
async def test_invalid_table_names_are_refused(pool: asyncpg.Pool, bad: str) -> None:
    with pytest.raises(ValueError):
        PostgresStore(pool, table=bad)
    with pytest.raises(ValueError):
        PostgresStore(pool, table="ok", schema=bad)
    with pytest.raises(ValueError):
        await PostgresStore.connect(DSN, table=bad)


async def test_schema_creation_is_idempotent_and_safe_concurrently(tables: list[str]) -> None:
    table = new_table()
    tables.append(table)
    # Separate pools: as separate processes, each on its own connection.
    stores = await asyncio.gather(
        *(PostgresStore.connect(DSN, table=table, min_size=1, max_size=1) for _ in range(4))
    )
    try:
        await asyncio.gather(*(s.ensure_schema() for s in stores))
        await stores[0].append(KEY, entries(2))
        await stores[1].ensure_schema()  # keeps the data
        assert await stores[2].load(KEY) == entries(2)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_ensure_schema_adds_the_marks_to_tables_of_the_offset_protocol(
    store: PostgresStore,
) -> None:
    """Tables made by the previous version keep their data; its functions go, so an
    old client fails (and retries) instead of writing without marks."""
    await store.append(KEY, entries(2))
    fn = f'"{store.table}'
    old_schema = [
        "DROP TABLE {marks}",
        f'DROP FUNCTION {fn}__append_batch"',
        f'CREATE FUNCTION {fn}__same"(json, text) RETURNS boolean AS $$SELECT true$$',
        f'CREATE FUNCTION {fn}__lock"(text, text) RETURNS void AS $$SELECT$$',
        f'CREATE FUNCTION {fn}__append"(text, text, text, bigint, text[], bigint, bigint, text) '
        "RETURNS void AS $$SELECT$$",
    ]
    for statement in old_schema:
        await rows(store, statement.replace("AS $$", "LANGUAGE sql AS $$"))
    await store.ensure_schema()
    receipt = await store.append_batch(KEY, batch("pa", 0, 1, tag="e"))
    assert receipt == Receipt(appended=1, mark=0, length=3)
    assert await store.load(KEY) == entries(2) + entries(1, tag="e")
    left = await rows(
        store,
        "SELECT p.oid::regprocedure::text AS f FROM pg_proc p WHERE p.proname LIKE $1 ORDER BY 1",
        f"{store.table}%",
    )
    assert [r["f"].split("(")[0].split("__")[1] for r in left] == ["append_batch", "delete", "lock"]


async def test_main_transcript_subpath_is_stored_as_empty_string(store: PostgresStore) -> None:
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(1))
    found = await rows(
        store, "SELECT subpath, entry_offset FROM {t} ORDER BY subpath, entry_offset"
    )
    assert [(r["subpath"], r["entry_offset"]) for r in found] == [
        ("", 0),
        ("", 1),
        ("subagents/agent-1", 0),
    ]


async def test_one_row_per_entry_with_unique_offsets(store: PostgresStore) -> None:
    await store.append(KEY, entries(3))
    with pytest.raises(asyncpg.UniqueViolationError):
        await rows(
            store,
            "INSERT INTO {t} VALUES ('proj', 'sess', '', 1, '{\"type\": \"x\"}')",
        )


async def test_entries_round_trip_byte_for_byte(store: PostgresStore) -> None:
    # contract 11: what Python's json round-trips, lone surrogates included.
    odd = [
        {"z": 1, "type": "user", "a": [1, 2.5, None, True], "text": "héllo ✓ 😀 \u0000 nul"},
        {"type": "x", "big": 2**62, "nested": {"b": {"c": "'; DROP TABLE x; --"}}},
        {"type": "x", "cut": "half a pair \ud83d"},
    ]
    await store.append(KEY, odd[:1])
    await store.append_batch(KEY, Batch.of("pa", 0, odd[1:]))
    assert await store.load(KEY) == odd
    stored = await rows(store, "SELECT entry::text AS e FROM {t} ORDER BY entry_offset")
    assert [r["e"].encode() for r in stored] == [encode_entry(e) for e in odd]


async def test_append_batch_stores_the_queue_bytes_as_given(store: PostgresStore) -> None:
    encoded = [b'{"a":1,"type":"x","\xc3\xa9":"\xc3\xbc"}', b'{"type":"y"}']
    receipt = await store.append_batch(KEY, Batch("pa", 0, encoded))
    assert receipt == Receipt(appended=2, mark=1, length=2)
    stored = await rows(store, "SELECT entry::text AS e FROM {t} ORDER BY entry_offset")
    assert [r["e"].encode() for r in stored] == encoded
    assert await store.load(KEY) == [{"a": 1, "type": "x", "é": "ü"}, {"type": "y"}]
    await assert_summary_exact(store, KEY, [json.loads(b) for b in encoded])


@pytest.mark.parametrize(
    "bad",
    [["not a dict"], [{"type": "x", "v": float("nan")}], [{"type": "x", "v": {1j}}]],
    ids=["not-a-dict", "nan", "not-json"],
)
async def test_bad_entries_raise_and_store_nothing(store: PostgresStore, bad: list[Any]) -> None:
    await store.append(KEY, entries(1))
    with pytest.raises(InvalidEntryError):
        await store.append(KEY, [*entries(1, start=1), *bad])
    assert await store.load(KEY) == entries(1)


async def test_encoded_entries_the_server_refuses_raise_and_store_nothing(
    store: PostgresStore,
) -> None:
    for bad in (b'{"type":"\xff"}', b'{"type": nope}'):
        with pytest.raises(InvalidEntryError) as info:
            await store.append_batch(KEY, Batch("pa", 0, [b'{"type":"ok"}', bad]))
        assert "nope" not in str(info.value)
    assert await store.load(KEY) is None
    assert await store.producer_mark(KEY, "pa") is None


async def test_tables_edited_by_hand_give_a_permanent_error_without_data(
    store: PostgresStore,
) -> None:
    await store.append_batch(KEY, batch("pa", 0, 2))
    await rows(store, "INSERT INTO {t} VALUES ('proj', 'sess', '', 2, '{\"secret\": 1}')")
    with pytest.raises(PermanentBackendError) as info:
        await store.append_batch(KEY, batch("pa", 2, 1, expect=1))
    assert "23505" in str(info.value) and "secret" not in str(info.value)
    assert await store.length(KEY) == 2
    assert await store.producer_mark(KEY, "pa") == 1


async def test_key_too_long_for_an_index_row_is_refused(store: PostgresStore) -> None:
    key: SessionKey = {"project_key": "é" * 512, "session_id": "s" * 512, "subpath": "x" * 512}
    with pytest.raises(InvalidKeyError):
        await store.append(key, entries(1))
    with pytest.raises(InvalidKeyError):
        await store.append_batch(key, batch("pa", 0, 1))


# --- The atomic step: __append_batch and __marks ---------------------------


async def test_marks_are_rows_per_transcript_and_producer(store: PostgresStore) -> None:
    await store.append_batch(KEY, batch("pa", 0, 3))
    await store.append_batch(KEY, batch("pb", 10, 2))
    await store.append_batch(SUB, batch("pa", 0, 1))
    await store.append(KEY, entries(1, tag="plain"))  # no producer: no mark
    found = await rows(
        store, "SELECT subpath, producer, mark FROM {marks} ORDER BY subpath, producer"
    )
    assert [tuple(r) for r in found] == [
        ("", "pa", 2),
        ("", "pb", 11),
        ("subagents/agent-1", "pa", 0),
    ]
    assert await store.producer_mark(SUB, "pa") == 0
    assert await store.producer_mark(SUB, "pb") is None


async def test_a_repeated_batch_rewrites_nothing(store: PostgresStore) -> None:
    # contract 2: a retry after a lost reply is a no-op, not even a rewrite.
    await store.append_batch(KEY, batch("pa", 0, 3))
    snapshot = (
        "SELECT 'e' AS t, entry_offset AS n, xmin::text AS x FROM {t} UNION ALL "
        "SELECT 'k', entry_count, xmin::text FROM {keys} UNION ALL "
        "SELECT 'm', mark, xmin::text FROM {marks} UNION ALL "
        "SELECT 's', folded, xmin::text FROM {summaries} ORDER BY 1, 2"
    )
    before = await rows(store, snapshot)
    mtime = (await store.list_sessions("proj"))[0]["mtime"]
    other = PostgresStore(store.pool, table=store.table)  # another host, empty cache
    assert await other.append_batch(KEY, batch("pa", 0, 3)) == Receipt(0, 2, 3)
    assert await store.append_batch(KEY, batch("pa", 1, 2, expect=2)) == Receipt(0, 2, 3)
    assert await rows(store, snapshot) == before  # same xmin: not rewritten
    assert (await store.list_sessions("proj"))[0]["mtime"] == mtime


async def test_a_repeat_of_a_deleted_key_creates_no_rows(store: PostgresStore) -> None:
    # contract 5: the tombstone fences the retry without leaving an empty transcript.
    await store.append_batch(KEY, batch("pa", 0, 3))
    await store.append_batch(SUB, batch("pa", 0, 1))
    await store.delete(KEY)
    assert await count(store, "{marks}") == 2  # the tombstone: main key and subkey
    assert (await store.append_batch(KEY, batch("pa", 0, 3))).appended == 0
    assert (await store.append_batch(SUB, batch("pa", 0, 1))).appended == 0
    for table in ("{t}", "{keys}", "{summaries}"):
        assert await count(store, table) == 0


async def test_a_wiped_store_says_it_lost_what_it_acknowledged(store: PostgresStore) -> None:
    # contract 2: an operator's TRUNCATE takes entries and marks together, so the
    # producer learns of the loss (and re-sends) instead of having repeats skipped.
    await store.append_batch(KEY, batch("pa", 0, 3))
    await store.append_batch(SUB, batch("pa", 0, 2))
    await rows(store, "TRUNCATE {t}, {keys}, {summaries}, {marks}")
    for key, expect in ((KEY, 2), (SUB, 1)):
        with pytest.raises(MarkBehindError) as caught:
            await store.append_batch(key, batch("pa", expect + 1, 2, expect=expect))
        assert caught.value.mark is None and caught.value.expect == expect
    assert await count(store, "{t}") == 0
    # The producer re-sends what its queue retains, without expect: stored again.
    assert await store.append_batch(KEY, batch("pa", 0, 5)) == Receipt(5, 4, 5)
    await assert_summary_exact(store, KEY, entries(5, tag="pa"))


async def test_a_batch_racing_its_own_retry_lands_once(store: PostgresStore) -> None:
    # contract 2: a late write of a timed-out call arrives while the retry runs.
    for round_, key in enumerate([KEY, SUB] * 4):
        k: SessionKey = {**key, "session_id": f"race-{round_}"}  # type: ignore[typeddict-item]
        await store.append_batch(k, batch("pa", 0, 2))
        writers = [PostgresStore(store.pool, table=store.table) for _ in range(2)]
        receipts = await asyncio.gather(
            *(w.append_batch(k, batch("pa", 2, 4, expect=1)) for w in writers)
        )
        assert sorted(r.appended for r in receipts) == [0, 4]
        assert {r.mark for r in receipts} == {5}
        assert await store.load(k) == entries(6, tag="pa")
        if "subpath" not in k:
            await assert_summary_exact(store, k, entries(6, tag="pa"))


async def test_concurrent_producers_on_separate_pools_land_exactly_once(
    store: PostgresStore,
) -> None:
    # contract 2: several hosts (own pools, own caches) write one key at once,
    # each sending some batches twice as a retry after a lost reply would.
    hosts = await asyncio.gather(
        *(PostgresStore.connect(DSN, table=store.table, max_size=2) for _ in range(4))
    )
    total, step = 48, [1, 5, 7, 12]

    async def produce(index: int, host: PostgresStore) -> None:
        producer, expect = f"p{index}", None
        for first in range(0, total, step[index]):
            size = min(step[index], total - first)
            receipt = await host.append_batch(KEY, batch(producer, first, size, expect))
            if first % 2 == 0:
                assert (await host.append_batch(KEY, batch(producer, first, size))).appended == 0
            assert receipt.mark == first + size - 1
            expect = receipt.mark

    try:
        await asyncio.gather(*(produce(i, h) for i, h in enumerate(hosts)))
    finally:
        await asyncio.gather(*(h.close() for h in hosts))
    stored = await store.load(KEY)
    assert stored is not None and len(stored) == 4 * total
    for index in range(4):
        assert [e for e in stored if e["uuid"].startswith(f"p{index}")] == entries(
            total, tag=f"p{index}"
        )
        assert await store.producer_mark(KEY, f"p{index}") == total - 1
    await assert_summary_exact(store, KEY, stored)


async def test_append_after_delete_by_another_store_starts_over(store: PostgresStore) -> None:
    # contract 5: the writer keeps its cached length and summary; the delete wins anyway.
    other = PostgresStore(store.pool, table=store.table)
    await store.append_batch(KEY, batch("pa", 0, 3))
    await other.delete(KEY)
    assert await store.append_batch(KEY, batch("pa", 3, 2, expect=2)) == Receipt(2, 4, 2)
    assert await store.load(KEY) == entries(2, start=3, tag="pa")
    await assert_summary_exact(store, KEY, entries(2, start=3, tag="pa"))


# --- Keys: injection and isolation ----------------------------------------

NASTY = [
    "it's",
    'say "hi"',
    "a;b",
    "x -- comment",
    "100%_",
    "c:drive",
    "ünï©ødé ☃",
    "$1",
    "{t}",
    "Robert'); DROP TABLE students;--",
]


async def test_nasty_keys_land_in_their_own_key(store: PostgresStore) -> None:
    written: dict[tuple[str, str, str], list[Any]] = {}
    for i, part in enumerate(NASTY):
        for key in (
            {"project_key": part, "session_id": "s"},
            {"project_key": "p", "session_id": part},
            {"project_key": "p", "session_id": "s", "subpath": f"agents/{part}/x"},
            {"project_key": "p", "session_id": "s", "subpath": part},
        ):
            batch = [{"type": "x", "i": i, "key": dict(key)}]
            await store.append(key, batch)  # type: ignore[arg-type]
            ident = (key["project_key"], key["session_id"], key.get("subpath", ""))
            written.setdefault(ident, []).extend(batch)
    for (project, session, subpath), expected in written.items():
        key: Any = {"project_key": project, "session_id": session}
        if subpath:
            key["subpath"] = subpath
        assert await store.load(key) == expected
    for part in NASTY:
        assert [s["session_id"] for s in await store.list_sessions(part)] == ["s"]
    # ("p", "s") has subagent transcripts only: not a session of its own.
    assert sorted(s["session_id"] for s in await store.list_sessions("p")) == sorted(NASTY)
    assert await store.list_subkeys({"project_key": "p", "session_id": "s"}) == sorted(
        [*NASTY, *(f"agents/{part}/x" for part in NASTY)]
    )
    # Patterns are data, not LIKE patterns: "100%_" lists only itself.
    assert len(await store.list_session_summaries("100%_")) == 1
    await store.delete({"project_key": "p", "session_id": "s", "subpath": NASTY[0]})
    assert NASTY[0] not in await store.list_subkeys({"project_key": "p", "session_id": "s"})
    total = (await rows(store, "SELECT count(*) AS n FROM {t}"))[0]["n"]
    assert total == sum(len(v) for v in written.values()) - 1


@pytest.mark.parametrize(
    "key",
    [
        {"project_key": "a/b", "session_id": "s"},
        {"project_key": "p", "session_id": "../x"},
        {"project_key": "p", "session_id": "s", "subpath": ""},
        {"project_key": "p", "session_id": "s", "subpath": "/abs"},
        {"project_key": "p\x00", "session_id": "s"},
    ],
)
async def test_invalid_keys_are_refused(store: PostgresStore, key: Any) -> None:
    with pytest.raises(InvalidKeyError):
        await store.append(key, entries(1))
    with pytest.raises(InvalidKeyError):
        await store.append_batch(key, batch("pa", 0, 1))


# --- Summaries ------------------------------------------------------------


async def test_summary_mtime_matches_list_sessions_mtime(store: PostgresStore) -> None:
    await store.append_batch(KEY, batch("pa", 0, 2))
    await store.append_batch(SUB, batch("pa", 0, 1))  # a subagent append changes neither
    (listed,) = await store.list_sessions("proj")
    (summary,) = await store.list_session_summaries("proj")
    assert summary["mtime"] == listed["mtime"]  # the same transaction's clock
    assert abs(summary["mtime"] - time.time() * 1000) < 60_000


async def test_the_fold_sees_each_appended_entry_once_and_no_repeat(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refolding a suffix can leave the same summary, so watch what goes into the fold
    (``fold_summary`` for plain entries and a backlog, ``fold_batch`` for a batch's
    entries past ``skip``: the SDK's fold, run on the entries that can change a summary)."""
    folded: list[str] = []

    def spy(prev: Any, key: SessionKey, batch: list[Any]) -> Any:
        folded.extend(e["uuid"] for e in batch)
        return fold_summary(prev, key, batch)

    def spy_batch(prev: Any, key: SessionKey, batch: Batch, skip: int) -> Any:
        folded.extend(e["uuid"] for e in batch.entries[skip:])
        return fold_batch(prev, key, batch, skip)

    monkeypatch.setattr(postgres_module, "fold_summary", spy)
    monkeypatch.setattr(postgres_module, "fold_batch", spy_batch)
    await store.append_batch(KEY, batch("pa", 0, 6, tag="e"))
    await store.append_batch(KEY, batch("pa", 0, 6, expect=5, tag="e"))  # repeat
    await store.append_batch(KEY, batch("pa", 3, 6, expect=5, tag="e"))  # partial repeat
    await store.append_batch(KEY, batch("pa", 2, 1, expect=8, tag="e"))  # repeat inside
    await store.append(KEY, entries(2, start=9))
    await store.append_batch(SUB, batch("pa", 0, 3))  # never folded
    assert folded == [e["uuid"] for e in entries(11)]
    await assert_summary_exact(store, KEY, entries(11))


async def test_a_wrong_guess_of_the_skip_is_folded_under_locks(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A producer that lost track of its mark (expect None) re-sends a tail the
    # backend holds: the optimistic call guesses "nothing skipped", is stale,
    # and the locked retry folds only what it appends.
    calls: list[str] = []
    fetchrow = PostgresStore._fetchrow

    async def spy(self: PostgresStore, key: SessionKey, sql: str, *args: Any, **kw: Any) -> Any:
        calls.append(next(f for f in ("append_batch", "lock", "") if f'__{f}"' in sql or not f))
        return await fetchrow(self, key, sql, *args, **kw)

    await store.append_batch(KEY, batch("pa", 0, 4, tag="e"))
    monkeypatch.setattr(PostgresStore, "_fetchrow", spy)
    host = PostgresStore(store.pool, table=store.table)  # the producer's new process
    receipt = await host.append_batch(KEY, batch("pa", 2, 4, tag="e"))
    assert receipt == Receipt(appended=2, mark=5, length=6)
    assert calls == ["append_batch", "lock", "append_batch"]
    await assert_summary_exact(store, KEY, entries(6))
    calls.clear()
    await host.append_batch(KEY, batch("pa", 6, 2, expect=5, tag="e"))
    assert calls == ["append_batch"]  # the steady state: one round trip


async def test_summary_exactly_once_with_concurrent_writers(store: PostgresStore) -> None:
    """Many writers (each with its own cache) append, repeat and plain-append at once."""
    writers = [PostgresStore(store.pool, table=store.table) for _ in range(5)]

    async def write(index: int, writer: PostgresStore, step: int) -> None:
        expect = None
        for first in range(0, 30, step):
            size = min(step, 30 - first)
            await writer.append_batch(KEY, batch(f"p{index}", first, size, expect))
            await writer.append_batch(KEY, batch(f"p{index}", first, size))  # the retry
            expect = first + size - 1
        await writer.append(KEY, entries(2, tag=f"plain{index}-"))

    await asyncio.gather(
        *(
            write(i, w, step)
            for i, (w, step) in enumerate(zip(writers, [3, 5, 7, 11, 30], strict=True))
        )
    )
    stored = await store.load(KEY)
    assert stored is not None and len(stored) == 5 * 32
    await assert_summary_exact(store, KEY, stored)


async def test_summary_catches_up_when_it_fell_behind(store: PostgresStore) -> None:
    await store.append_batch(KEY, batch("pa", 0, 4, tag="e"))
    await rows(
        store,
        "UPDATE {summaries} SET folded = 1, data = $1::json",
        json.dumps(fold_session_summary(None, KEY, entries(1))["data"]),
    )
    fresh = PostgresStore(store.pool, table=store.table)
    assert (await fresh.append_batch(KEY, batch("pa", 2, 4, expect=3, tag="e"))).length == 6
    await assert_summary_exact(store, KEY, entries(6))


async def test_subagent_entries_never_touch_the_summary(store: PostgresStore) -> None:
    await store.append(KEY, entries(1))
    before = await summary_row(store, KEY)
    await store.append_batch(SUB, batch("pa", 0, 3))
    await store.append(SUB, entries(3, tag="sub"))
    assert await summary_row(store, KEY) == before


# --- Delete ---------------------------------------------------------------


async def test_delete_main_key_cascades_to_subkeys_and_summary(store: PostgresStore) -> None:
    other: SessionKey = {"project_key": "proj", "session_id": "other"}
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(1))
    await store.append({**KEY, "subpath": "subagents/agent-2"}, entries(1))
    await store.append(other, entries(1))
    await store.delete(KEY)
    assert await store.load(KEY) is None and await store.load(SUB) is None
    assert await store.length(KEY) == 0 and await store.length(SUB) == 0
    assert await store.list_subkeys(KEY) == []
    assert [s["session_id"] for s in await store.list_sessions("proj")] == ["other"]
    assert [s["session_id"] for s in await store.list_session_summaries("proj")] == ["other"]
    left = await rows(store, "SELECT DISTINCT session_id FROM {t}")
    assert [r["session_id"] for r in left] == ["other"]


async def test_delete_subpath_keeps_main_and_summary(store: PostgresStore) -> None:
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(1))
    before = await summary_row(store, KEY)
    await store.delete(SUB)
    assert await store.load(SUB) is None
    assert await store.load(KEY) == entries(2)
    assert await summary_row(store, KEY) == before


async def test_delete_and_concurrent_appends_of_a_session_serialise(
    store: PostgresStore,
) -> None:
    """Whatever the order, no entry outlives its key row and no batch is cut in half."""

    async def delete_soon(delay: float) -> None:
        await asyncio.sleep(delay)  # land inside the appends' transactions
        await store.delete(KEY)

    for i in range(12):
        sub: SessionKey = {**KEY, "subpath": f"agents/a{i}"}
        await store.append_batch(sub, batch("pa", 0, 1))  # an existing subkey
        await asyncio.gather(
            store.append_batch(sub, batch("pa", 1, 300, expect=0)),
            store.append_batch({**KEY, "subpath": f"agents/new{i}"}, batch("pa", 0, 301)),
            store.append_batch(KEY, batch(f"m{i}", 0, 301)),
            delete_soon(0.001 * (i % 6)),
        )
        counted = await rows(store, "SELECT subpath, count(*) AS n FROM {t} GROUP BY subpath")
        declared = await rows(
            store, "SELECT subpath, entry_count AS n FROM {keys} WHERE entry_count > 0"
        )
        assert sorted(map(tuple, counted)) == sorted(map(tuple, declared))
        assert all(r["n"] in (301, 300) for r in counted), counted  # 300: sub lost its first
        stored = await store.load(KEY)
        if stored:
            await assert_summary_exact(store, KEY, stored)
        else:
            assert await summary_row(store, KEY) is None
        await store.delete(KEY)


# --- Real faults ------------------------------------------------------------


FAULTS = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # shutting down, starting up
)
"""What a client sees of a network fault or a server crash."""


async def deliver(
    store: PostgresStore, key: SessionKey, sent: Batch, patience: float = 60.0
) -> Receipt:
    """Send ``sent`` until a call succeeds, as the flusher does: every retry is
    the same batch, so whichever earlier call landed, it lands once. A server
    in crash recovery may refuse connections for a while on a busy machine:
    ``patience`` seconds, not a number of tries."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            return await store.append_batch(key, sent)
        except FAULTS:
            await asyncio.sleep(0.05)
    return await store.append_batch(key, sent)


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll until ``condition()``; a hang guard, not a timing."""
    deadline = time.monotonic() + 60.0
    while not await condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("mode", ["reset", "blackhole", "delay", "drop_replies"])
async def test_a_retry_after_a_network_fault_lands_exactly_once(
    mode: str, store: PostgresStore
) -> None:
    # contract 2: whether the failed call's write landed (delay, drop_replies: the
    # reply was lost) or not (reset, blackhole), the retry leaves it stored once.
    # Healthy calls are retried (deliver): a slow one on a busy machine is no failure.
    # With "delay" the proxy holds the reply 10x the command timeout, so it cannot come
    # back in time; that timeout is a full second there because the client then
    # cancels the statement, which must have committed first for the write to land.
    proxy = await FaultProxy.start("127.0.0.1", 5432)
    backend = await PostgresStore.connect(
        proxy.url_for(DSN),
        table=store.table,
        command_timeout=1.0 if mode == "delay" else 0.3,
        connect_timeout=5.0,
    )
    try:
        await deliver(backend, KEY, batch("pa", 0, 3, tag="e"))
        if mode == "delay":
            proxy.set_mode("delay", seconds=10.0)
        else:
            proxy.set_mode(mode)  # type: ignore[arg-type]
        with pytest.raises(FAULTS):
            await backend.append_batch(KEY, batch("pa", 3, 4, expect=2, tag="e"))
        landed = mode in ("delay", "drop_replies")
        if landed:  # the request reached the server: wait until it is committed

            async def committed() -> bool:
                return await store.length(KEY) == 7

            await wait_until(committed, "the write landed")
        else:  # the request never reached the server (reset, blackhole)
            assert await store.length(KEY) == 3
        proxy.set_mode("pass")
        receipt = await deliver(backend, KEY, batch("pa", 3, 4, expect=2, tag="e"))
        assert receipt == Receipt(appended=0 if landed else 4, mark=6, length=7)
        assert await store.load(KEY) == entries(7)
        await assert_summary_exact(store, KEY, entries(7))
    finally:
        await backend.close()
        await proxy.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateCluster:
    """A throwaway PostgreSQL instance (initdb in a temp dir), owned by user postgres if root."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="walmirror-pg-"))
        self.data = self.base / "data"
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.base, "postgres", "postgres")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        return [*self.as_user, *args]

    def init(self) -> None:
        subprocess.run(
            self._cmd(
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ),
            check=True,
            capture_output=True,
        )

    async def ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
        proc = await asyncio.create_subprocess_exec(
            *self._cmd(
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.base / "log"),
                "-o",
                options,
                "-w",
                *args,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode(errors="replace")

    def remove(self) -> None:
        subprocess.run(
            self._cmd(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate"),
            capture_output=True,
        )
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def private_cluster() -> Iterator[PrivateCluster]:
    cluster = PrivateCluster()
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.remove()


async def test_marks_survive_a_server_crash_so_every_batch_lands_once(
    private_cluster: PrivateCluster,
) -> None:
    # contract 2: a writer keeps sending (retrying each batch until it succeeds)
    # while the server crashes and comes back; a commit whose reply died with
    # the server is a repeat on the retry, nothing is doubled or missing.
    cluster = private_cluster
    await cluster.ctl("start")
    # A crashed server refuses or resets at once: no timeout is part of the fault,
    # and a slow call (retried by deliver) is no failure.
    backend = await PostgresStore.connect(
        cluster.dsn, table="restarted", command_timeout=5.0, connect_timeout=5.0
    )
    keys: list[SessionKey] = [KEY, SUB, {"project_key": "proj", "session_id": "other"}]
    sent: dict[int, int] = {i: 0 for i in range(len(keys))}
    stop = asyncio.Event()

    async def write(index: int) -> None:
        expect = None
        while not stop.is_set():
            first = sent[index]
            receipt = await deliver(backend, keys[index], batch("pa", first, 5, expect, "e"))
            assert receipt.mark == first + 4
            sent[index], expect = first + 5, first + 4

    writers = [asyncio.create_task(write(i)) for i in range(len(keys))]

    async def written(least: dict[int, int]) -> None:
        while any(sent[i] < least[i] for i in sent):
            for done in (w for w in writers if w.done()):
                done.result()  # a writer that failed fails the test
            await asyncio.sleep(0.01)

    direct: PostgresStore | None = None
    try:
        await written({i: 50 for i in sent})
        await cluster.ctl("stop", "-m", "immediate")  # a crash: no shutdown checkpoint
        await asyncio.sleep(0.3)  # the writers keep trying while the server is gone
        await cluster.ctl("start")
        await written({i: n + 50 for i, n in sent.items()})
        stop.set()
        await asyncio.gather(*writers)
        direct = await PostgresStore.connect(cluster.dsn, table="restarted", create_schema=False)
        for index, key in enumerate(keys):
            assert await direct.load(key) == entries(sent[index]), key
            assert await direct.producer_mark(key, "pa") == sent[index] - 1
        await assert_summary_exact(direct, KEY, entries(sent[0]))
    finally:
        stop.set()
        for writer in writers:
            writer.cancel()
        if direct is not None:
            await direct.close()
        with contextlib.suppress(Exception):
            await backend.close()
