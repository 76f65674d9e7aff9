"""Tests for walmirror.backends.postgres.PostgresStore, against a real PostgreSQL.

The shared server is ``WALMIRROR_TEST_POSTGRES`` (default
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
from walmirror.backend import accepts_encoded, is_offset_aware
from walmirror.backends import postgres as postgres_module
from walmirror.backends.postgres import PostgresStore
from walmirror.errors import (
    InvalidEntryError,
    InvalidKeyError,
    OffsetConflictError,
    OffsetGapError,
    PermanentBackendError,
)
from walmirror.faultproxy import FaultProxy

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


async def rows(store: PostgresStore, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run ``sql``; ``{t}``, ``{keys}`` and ``{summaries}`` name the store's tables."""
    for name, suffix in (("{t}", ""), ("{keys}", "__keys"), ("{summaries}", "__summaries")):
        sql = sql.replace(name, f'"{store.table}{suffix}"')
    return list(await store.pool.fetch(sql, *args))


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


# --- The SDK's contract ---------------------------------------------------


async def test_passes_sdk_conformance_suite(make_store: MakeStore) -> None:
    await run_session_store_conformance(make_store)


async def test_passes_sdk_conformance_suite_wrapped_in_durable_store(
    make_store: MakeStore, make_durable: Callable[..., DurableSessionStore]
) -> None:
    async def make() -> DurableSessionStore:
        return make_durable(await make_store())

    await run_session_store_conformance(make)


async def test_is_offset_aware(store: PostgresStore) -> None:
    assert is_offset_aware(store)
    assert accepts_encoded(store)


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
    odd = [
        {"z": 1, "type": "user", "a": [1, 2.5, None, True], "text": "héllo ✓ 😀 \u0000 nul"},
        {"type": "x", "big": 2**62, "nested": {"b": {"c": "'; DROP TABLE x; --"}}},
    ]
    await store.append(KEY, odd)
    assert await store.load(KEY) == odd
    stored = await rows(store, "SELECT entry::text AS e FROM {t} ORDER BY entry_offset")
    assert [r["e"] for r in stored] == [
        json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in odd
    ]


@pytest.mark.parametrize(
    "bad",
    [["not a dict"], [{"type": "x", "v": float("nan")}], [{"type": "x", "s": "\ud800"}]],
    ids=["not-a-dict", "nan", "lone-surrogate"],
)
async def test_bad_entries_raise_and_store_nothing(store: PostgresStore, bad: list[Any]) -> None:
    await store.append(KEY, entries(1))
    with pytest.raises(InvalidEntryError) as info:
        await store.append_at(KEY, 1, [*entries(1, start=1), *bad])
    assert "\ud800" not in str(info.value)
    assert await store.load(KEY) == entries(1)


async def test_tables_edited_by_hand_give_a_permanent_error_without_data(
    store: PostgresStore,
) -> None:
    await store.append(KEY, entries(2))
    await rows(store, "INSERT INTO {t} VALUES ('proj', 'sess', '', 2, '{\"secret\": 1}')")
    with pytest.raises(PermanentBackendError) as info:
        await store.append_at(KEY, 2, entries(1, start=2))
    assert "23505" in str(info.value) and "secret" not in str(info.value)
    assert await store.length(KEY) == 2


async def test_key_too_long_for_an_index_row_is_refused(store: PostgresStore) -> None:
    key: SessionKey = {"project_key": "é" * 512, "session_id": "s" * 512, "subpath": "x" * 512}
    with pytest.raises(InvalidKeyError):
        await store.append(key, entries(1))


# --- Offsets ------------------------------------------------------------


async def test_append_at_returns_new_length(store: PostgresStore) -> None:
    assert await store.append_at(KEY, 0, entries(2)) == 2
    assert await store.append_at(KEY, 2, entries(3, start=2)) == 5
    assert await store.length(KEY) == 5
    assert await store.append_at(KEY, 5, []) == 5
    assert await store.load(KEY) == entries(5)


async def test_append_at_repeat_is_a_noop(store: PostgresStore) -> None:
    await store.append_at(KEY, 0, entries(3))
    snapshot = "SELECT entry_offset, xmin::text AS x, entry::text AS e FROM {t} ORDER BY 1"
    before = await rows(store, snapshot)
    mtime = (await store.list_sessions("proj"))[0]["mtime"]
    await asyncio.sleep(0.005)
    assert await store.append_at(KEY, 0, entries(3)) == 3
    assert await store.append_at(KEY, 1, entries(2, start=1)) == 3
    assert await PostgresStore(store.pool, table=store.table).append_at(KEY, 0, entries(3)) == 3
    assert await rows(store, snapshot) == before  # not even rewritten (same xmin)
    assert (await store.list_sessions("proj"))[0]["mtime"] == mtime


async def test_append_at_partial_overlap_appends_only_new_suffix(store: PostgresStore) -> None:
    await store.append_at(KEY, 0, entries(3))
    assert await store.append_at(KEY, 1, entries(4, start=1)) == 5
    assert await store.load(KEY) == entries(5)
    await assert_summary_exact(store, KEY, entries(5))


async def test_append_at_overlap_compares_parsed_json_not_bytes(store: PostgresStore) -> None:
    await store.append_at(KEY, 0, [{"type": "x", "a": 1, "b": [1, 2]}])
    assert await store.append_at(KEY, 0, [{"b": [1, 2], "a": 1, "type": "x"}]) == 1
    assert await store.load(KEY) == [{"type": "x", "a": 1, "b": [1, 2]}]


async def test_conflicting_overlap_raises_and_changes_nothing(store: PostgresStore) -> None:
    await store.append_at(KEY, 0, entries(3))
    await store.append_at(SUB, 0, entries(3))
    before = await rows(store, "SELECT * FROM {t} ORDER BY 1, 2, 3, 4")
    summary_before = await summary_row(store, KEY)
    for key in (KEY, SUB):
        different = [{**entries(1, start=2)[0], "n": 99}, *entries(2, start=3)]  # offsets 2..4
        with pytest.raises(OffsetConflictError) as info:
            await store.append_at(key, 2, different)
        assert (info.value.offset, info.value.length) == (2, 3)
        assert await store.length(key) == 3
    # A difference that jsonb cannot even parse ("\u0000") is a conflict too.
    with pytest.raises(OffsetConflictError):
        await store.append_at(KEY, 0, [{"type": "user", "uuid": "\u0000"}])
    assert await rows(store, "SELECT * FROM {t} ORDER BY 1, 2, 3, 4") == before
    assert await summary_row(store, KEY) == summary_before


async def test_gap_raises_and_changes_nothing(store: PostgresStore) -> None:
    await store.append_at(KEY, 0, entries(2))
    with pytest.raises(OffsetGapError) as info:
        await store.append_at(KEY, 3, entries(1, start=3))
    assert (info.value.offset, info.value.length) == (3, 2)
    assert await store.length(KEY) == 2
    with pytest.raises(OffsetGapError):
        await store.append_at(KEY, 3, [])


async def test_gap_on_unknown_key_creates_nothing(store: PostgresStore) -> None:
    with pytest.raises(OffsetGapError):
        await store.append_at(KEY, 1, entries(1))
    with pytest.raises(OffsetGapError):
        await store.append_at(SUB, 4, entries(1))
    assert await store.append_at(KEY, 0, []) == 0
    for table in ("{t}", "{keys}", "{summaries}"):
        assert (await rows(store, f"SELECT count(*) AS n FROM {table}"))[0]["n"] == 0
    assert await store.list_sessions("proj") == []


async def test_append_at_rejects_bad_offsets(store: PostgresStore) -> None:
    for offset in (-1, True, 1.0):
        with pytest.raises(ValueError):
            await store.append_at(KEY, offset, entries(1))  # type: ignore[arg-type]


async def test_plain_append_continues_after_append_at(store: PostgresStore) -> None:
    await store.append_at(KEY, 0, entries(2))
    await store.append(KEY, entries(1, start=2))
    assert await store.append_at(KEY, 3, entries(1, start=3)) == 4
    assert await store.load(KEY) == entries(4)
    await assert_summary_exact(store, KEY, entries(4))


async def test_append_at_stores_the_queue_bytes_as_given(store: PostgresStore) -> None:
    assert accepts_encoded(store)
    batch = [{"type": "x", "a": 1, "é": "ü"}, {"type": "y"}]
    encoded = [b'{"a":1,"type":"x","\xc3\xa9":"\xc3\xbc"}', b'{"type":"y"}']
    assert await store.append_at(KEY, 0, batch, encoded=encoded) == 2
    stored = await rows(store, "SELECT entry::text AS e FROM {t} ORDER BY entry_offset")
    assert [r["e"].encode() for r in stored] == encoded
    assert await store.load(KEY) == batch
    # A repeat given as freshly serialised entries is the same entries: a no-op.
    assert await store.append_at(KEY, 0, batch) == 2
    await assert_summary_exact(store, KEY, batch)
    with pytest.raises(ValueError):
        await store.append_at(KEY, 2, entries(2), encoded=[b"{}"])
    with pytest.raises(InvalidEntryError):
        await store.append_at(KEY, 2, entries(1), encoded=[b'{"type":"\xff"}'])
    assert await store.length(KEY) == 2


@pytest.mark.parametrize("key", [KEY, SUB], ids=["main", "subpath"])
@pytest.mark.parametrize("start", [0, 3], ids=["new-key", "existing-key"])
async def test_concurrent_append_at_same_offset_one_wins(
    store: PostgresStore, key: SessionKey, start: int
) -> None:
    """Two writers (separate stores, so separate caches) race for the same offsets."""
    for round_ in range(6):
        k: SessionKey = {**key, "session_id": f"race-{round_}"}  # type: ignore[typeddict-item]
        if start:
            await store.append_at(k, 0, entries(start))
        a, b = entries(4, start, tag="a"), entries(4, start, tag="b")
        same = round_ % 2 == 1  # odd rounds: both send the same batch (a retry race)
        batches = [a, a if same else b]
        writers = [PostgresStore(store.pool, table=store.table) for _ in batches]
        results = await asyncio.gather(
            *(w.append_at(k, start, batch) for w, batch in zip(writers, batches, strict=True)),
            return_exceptions=True,
        )
        stored = await store.load(k)
        assert stored is not None
        if same:
            assert results == [start + 4, start + 4]
            assert stored == entries(start) + a
        else:
            winners = [batch for batch, r in zip(batches, results, strict=True) if r == start + 4]
            losers = [r for r in results if isinstance(r, OffsetConflictError)]
            assert len(winners) == 1 and len(losers) == 1, results
            assert stored == entries(start) + winners[0]
        if "subpath" not in k:
            await assert_summary_exact(store, k, stored)


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
        await store.append_at(key, 0, entries(1))


# --- Summaries ------------------------------------------------------------


async def test_summary_mtime_matches_list_sessions_mtime(store: PostgresStore) -> None:
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(1))  # a subagent append changes neither
    (listed,) = await store.list_sessions("proj")
    (summary,) = await store.list_session_summaries("proj")
    assert summary["mtime"] >= listed["mtime"] > 1e12
    assert summary["mtime"] == listed["mtime"]  # the same transaction's clock
    assert abs(summary["mtime"] - time.time() * 1000) < 60_000


async def test_summary_folds_each_entry_exactly_once_across_repeats(store: PostgresStore) -> None:
    await store.append_at(KEY, 0, entries(10))
    await store.append_at(KEY, 0, entries(5))  # repeat: must not refold titles 0..4
    await store.append_at(KEY, 5, entries(10, start=5))  # partial overlap
    await store.append_at(KEY, 8, entries(7, start=8))
    await store.append(KEY, entries(1, start=15))
    await assert_summary_exact(store, KEY, entries(16))
    (summary,) = await store.list_session_summaries("proj")
    assert summary["data"]["custom_title"] == "e-title-15"


async def test_fold_sees_each_new_entry_exactly_once(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refolding a suffix leaves the same summary, so watch the fold itself."""
    folded: list[str] = []

    def spy(prev: Any, key: SessionKey, batch: list[Any]) -> Any:
        folded.extend(e["uuid"] for e in batch)
        return fold_session_summary(prev, key, batch)

    monkeypatch.setattr(postgres_module, "fold_session_summary", spy)
    await store.append_at(KEY, 0, entries(6))
    await store.append_at(KEY, 0, entries(6))  # repeat
    await store.append_at(KEY, 3, entries(6, start=3))  # partial overlap
    await store.append_at(KEY, 2, entries(1, start=2))  # repeat inside
    await store.append(KEY, entries(2, start=9))
    await store.append_at(SUB, 0, entries(3))  # never folded
    assert folded == [e["uuid"] for e in entries(11)]
    await assert_summary_exact(store, KEY, entries(11))


async def test_summary_exactly_once_with_concurrent_writers(store: PostgresStore) -> None:
    """Many writers (each with its own cache) append and re-append at once."""
    total = 60
    batch = entries(total)
    writers = [PostgresStore(store.pool, table=store.table) for _ in range(5)]

    async def deliver(writer: PostgresStore, step: int) -> None:
        offset = 0
        while offset < total:
            try:
                await writer.append_at(KEY, offset, batch[offset : offset + step])
            except OffsetConflictError:  # pragma: no cover - would be a bug
                raise
            offset += step

    await asyncio.gather(
        *(deliver(w, step) for w, step in zip(writers, [3, 5, 7, 11, 60], strict=True))
    )
    assert await store.load(KEY) == batch
    await assert_summary_exact(store, KEY, batch)

    # Plain appends from several writers: order is by commit, each folded once.
    await asyncio.gather(
        *(w.append(KEY, entries(2, start=100 + 2 * i)) for i, w in enumerate(writers))
    )
    stored = await store.load(KEY)
    assert stored is not None and len(stored) == total + 10
    await assert_summary_exact(store, KEY, stored)


async def test_summary_catches_up_when_it_fell_behind(store: PostgresStore) -> None:
    await store.append(KEY, entries(4))
    await rows(
        store,
        "UPDATE {summaries} SET folded = 1, data = $1::json",
        json.dumps(fold_session_summary(None, KEY, entries(1))["data"]),
    )
    fresh = PostgresStore(store.pool, table=store.table)
    assert await fresh.append_at(KEY, 2, entries(4, start=2)) == 6
    await assert_summary_exact(store, KEY, entries(6))


async def test_subagent_entries_never_touch_the_summary(store: PostgresStore) -> None:
    await store.append(KEY, entries(1))
    before = await summary_row(store, KEY)
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


async def test_append_after_delete_by_another_store_starts_over(store: PostgresStore) -> None:
    other = PostgresStore(store.pool, table=store.table)
    await store.append_at(KEY, 0, entries(3))  # store caches length 3 and its summary
    await other.delete(KEY)
    with pytest.raises(OffsetGapError):
        await store.append_at(KEY, 3, entries(1, start=3))
    assert await store.append_at(KEY, 0, entries(2, tag="new")) == 2
    await assert_summary_exact(store, KEY, entries(2, tag="new"))


async def test_delete_and_concurrent_appends_of_a_session_serialise(
    store: PostgresStore,
) -> None:
    """Whatever the order, no entry outlives its key row and no batch is cut in half."""

    async def delete_soon(delay: float) -> None:
        await asyncio.sleep(delay)  # land inside the appends' transactions
        await store.delete(KEY)

    for i in range(12):
        sub: SessionKey = {**KEY, "subpath": f"agents/a{i}"}
        await store.append(sub, entries(1))  # an existing subkey, and one created below
        await asyncio.gather(
            store.append(sub, entries(300, start=1)),
            store.append({**KEY, "subpath": f"agents/new{i}"}, entries(301)),
            store.append(KEY, entries(301, tag=f"m{i}")),
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


# --- Real faults, through DurableSessionStore -----------------------------


class Feeder:
    """Appends numbered batches to a few keys through a DurableSessionStore."""

    def __init__(self, store: DurableSessionStore) -> None:
        self.store = store
        self.keys: list[SessionKey] = [
            {"project_key": "fault", "session_id": "main"},
            {"project_key": "fault", "session_id": "main", "subpath": "subagents/a"},
            {"project_key": "fault", "session_id": "other"},
        ]
        self.expected: dict[int, list[SessionStoreEntry]] = {i: [] for i in range(len(self.keys))}

    async def feed(self, batches: int, size: int = 7, pause: float = 0.0) -> None:
        for _ in range(batches):
            for i, key in enumerate(self.keys):
                batch = entries(size, start=len(self.expected[i]), tag=f"k{i}-")
                await self.store.append(key, batch)
                self.expected[i].extend(batch)
            if pause:
                await asyncio.sleep(pause)

    async def feed_until(self, stop: asyncio.Event, size: int, pause: float) -> None:
        while not stop.is_set():
            await self.feed(1, size=size, pause=pause)

    async def verify(self, direct: PostgresStore) -> None:
        for i, key in enumerate(self.keys):
            assert await direct.load(key) == self.expected[i], key
            if "subpath" not in key:
                await assert_summary_exact(direct, key, self.expected[i])


async def stored_count(store: PostgresStore) -> int:
    return int((await rows(store, "SELECT count(*) AS n FROM {t}"))[0]["n"])


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.02)
    return False


@pytest.mark.parametrize("mode", ["reset", "blackhole", "delay", "drop_replies"])
async def test_exactly_once_after_proxy_fault(
    mode: str,
    store: PostgresStore,
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    proxy = await FaultProxy.start("127.0.0.1", 5432)
    backend = await PostgresStore.connect(
        proxy.url_for(DSN),
        table=store.table,
        command_timeout=0.3,
        connect_timeout=0.5,
        max_size=4,
    )
    try:
        durable = make_durable(backend, call_timeout=1.0, max_batch_entries=20)
        feeder = Feeder(durable)
        await feeder.feed(3)
        await durable.flush(timeout=10)
        landed = await stored_count(store)

        async def failing() -> bool:
            return (await durable.status())["backends"][0]["retries"] > 0

        if mode == "delay":
            proxy.set_mode("delay", seconds=1.0)
        else:
            proxy.set_mode(mode)  # type: ignore[arg-type]
        await feeder.feed(4, pause=0.05)
        assert await wait_for(failing, 5.0)
        if mode in ("delay", "drop_replies"):
            # The writes reach the server while the client sees only failures.
            async def write_landed() -> bool:
                return await stored_count(store) > landed

            assert await wait_for(write_landed, 5.0)
        await asyncio.sleep(0.3)
        status = (await durable.status())["backends"][0]
        assert status["pending_entries"] > 0 and not status["parked"]
        proxy.set_mode("pass")
        await feeder.feed(2)
        await durable.flush(timeout=20)
        await feeder.verify(store)
        assert (await durable.status())["backends"][0]["parked"] == []
        await durable.close(timeout=2)
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


async def test_exactly_once_across_server_restart_mid_drain(
    private_cluster: PrivateCluster, make_durable: Callable[..., DurableSessionStore]
) -> None:
    cluster = private_cluster
    await cluster.ctl("start")
    backend = await PostgresStore.connect(
        cluster.dsn, table="restarted", command_timeout=1.0, connect_timeout=1.0
    )
    direct: PostgresStore | None = None
    try:
        durable = make_durable(backend, call_timeout=2.0, max_batch_entries=25)
        feeder = Feeder(durable)
        stop = asyncio.Event()
        feeding = asyncio.create_task(feeder.feed_until(stop, size=5, pause=0.01))

        async def draining() -> bool:
            return (await durable.status())["backends"][0]["delivered"] > 100

        assert await wait_for(draining, 10)
        await cluster.ctl("stop", "-m", "immediate")  # a crash: no shutdown checkpoint
        await asyncio.sleep(0.3)  # entries keep coming while the server is gone
        await cluster.ctl("start")
        await asyncio.sleep(0.3)  # and after it is back
        stop.set()
        await feeding
        await durable.flush(timeout=20)
        status = (await durable.status())["backends"][0]
        assert status["retries"] > 0 and not status["parked"]
        await durable.close(timeout=2)
        direct = await PostgresStore.connect(cluster.dsn, table="restarted", create_schema=False)
        await feeder.verify(direct)
    finally:
        if direct is not None:
            await direct.close()
        with contextlib.suppress(Exception):
            await backend.close()
