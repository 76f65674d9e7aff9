"""Hostile tests for queue schema 5: per-entry summary hints, the batch checksum, and
``walmirror.backends.fold_batch`` (session 6).

What must hold: ``fold_batch(prev, key, batch, skip)`` is exactly the SDK's
``fold_session_summary(prev, key, entries[skip:])`` of the *parsed* entries (same data,
same key order), whatever the entries were as Python objects when appended; the hints
stay aligned with their entries across row splits and partial reads; rows without a
checksum (schema 4) are folded by a full parse even when they sit in one delivery with
hinted rows; damage to body/hints/crc parks only its key with an error that names no
content; and end to end, each remote backend's ``list_session_summaries`` is the SDK
fold of what ``load`` returns.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import json
import sqlite3
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.types import SessionKey
from conftest import Connect
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory_store import MemoryStore

import walmirror.queue
from walmirror import DurableSessionStore
from walmirror.backends import fold_batch
from walmirror.faults import FaultyStore
from walmirror.protocol import (
    HINT_CWD,
    HINT_FIELD,
    HINT_PARSE,
    HINT_TAG,
    HINT_TIMESTAMP,
    HINT_USER,
    Batch,
    check_batch,
    check_encodable,
    summary_hint,
)
from walmirror.queue import batch_crc, pack_hints, unpack_hints
from walmirror.store import serialize_entries

KEY: SessionKey = {"project_key": "proj", "session_id": "sess"}
SUB: SessionKey = {"project_key": "proj", "session_id": "sess", "subpath": "agents/a"}
TUNING: dict[str, Any] = {"backoff_initial": 0.01, "backoff_max": 0.1}
TS = "2025-01-01T00:00:00.000Z"


# -- helpers -------------------------------------------------------------------------------


def _hinted(entries: list[Any]) -> Batch:
    """A batch as the queue builds it: ``append``'s encodings and hints (``serialize_entries``)."""
    rows = serialize_entries(entries, 1 << 30)
    return Batch("p", 0, [row[1] for row in rows], None, [row[2] for row in rows])


def _parsed(batch: Batch) -> list[Any]:
    return [json.loads(b) for b in batch.encoded]


def _assert_same_as_sdk(prev: Any, entries: list[Any], skip: int = 0) -> None:
    """fold_batch of the hinted batch == the SDK fold of the parsed entries[skip:],
    values and key order; prev untouched."""
    batch = _hinted(entries)
    before = copy.deepcopy(prev)
    expected = fold_session_summary(copy.deepcopy(prev), KEY, _parsed(batch)[skip:])
    got = fold_batch(prev, KEY, batch, skip)
    assert prev == before
    assert json.dumps(got) == json.dumps(expected), (got, expected)


def _settled(**extra: Any) -> Any:
    """A summary whose set-once fields are all settled (prompt locked, cwd, created_at)."""
    first = {
        "type": "user",
        "timestamp": TS,
        "cwd": "/w",
        "message": {"content": "first prompt"},
        **extra,
    }
    prev = fold_session_summary(None, KEY, [first])
    prev["mtime"] = 99
    return prev


def _system_only() -> Any:
    """A summary with only is_sidechain set: every set-once field still open."""
    return fold_session_summary(None, KEY, [{"type": "system"}])


class Text(str):
    """A str subclass: JSON holds its text, but it is not a plain str."""


class Kind(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    TAG = "tag"


class Num(enum.IntEnum):
    ONE = 1


class HashedKey(str):
    """A str subclass used as a dict *key*: serialised as its text (so JSON holds
    e.g. "type"), but hashing and comparing unlike that text, so ``entry.get("type")``
    does not find it."""

    def __hash__(self) -> int:
        return hash(("hashed-key", str(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashedKey) and str.__eq__(self, other)


# -- 1. an entry hinted HINT_PARSE must not hide the real last writer of a field -------------


def test_a_non_plain_entry_after_the_last_title_does_not_hide_it() -> None:
    """The last customTitle is entry 1; entry 2 (type a str subclass) gets HINT_PARSE,
    which carries every field bit, so fold_batch takes it as "the last customTitle"
    although it holds none, and folds neither entry 0 nor entry 1."""
    prev = _settled(customTitle="old")
    entries = [{"customTitle": "new"}, {"customTitle": "newer"}, {"type": Text("assistant")}]
    _assert_same_as_sdk(prev, entries)


def test_a_str_enum_type_after_the_last_branch_does_not_hide_it() -> None:
    prev = _settled(gitBranch="main")
    entries = [{"type": "assistant", "gitBranch": "dev"}, {"type": Kind.ASSISTANT}]
    _assert_same_as_sdk(prev, entries)


def test_a_non_plain_entry_before_the_first_title_keeps_the_key_order() -> None:
    """The summary lacks custom_title: the first entry with the bit gives its place.
    A HINT_PARSE entry *before* the real first writer is taken as the first; the real
    first (entry 1) is skipped, so custom_title lands after the tag entry 2 sets."""
    prev = _settled()
    entries = [
        {"type": Kind.ASSISTANT},
        {"customTitle": "a"},
        {"type": "tag", "tag": "red"},
        {"customTitle": "b"},
    ]
    _assert_same_as_sdk(prev, entries)


def test_a_non_plain_cwd_entry_hiding_last_prompt() -> None:
    prev = _settled(lastPrompt="p0")
    entries = [{"lastPrompt": "p1"}, {"cwd": Text("/elsewhere")}]
    _assert_same_as_sdk(prev, entries)


# -- 2. keys that are str subclasses: the hint must say what the JSON says ------------------


@pytest.mark.parametrize(
    ("entry", "prev_of"),
    [
        ({HashedKey("type"): "user", "message": {"content": "hello"}}, _system_only),
        ({HashedKey("customTitle"): "T"}, _settled),
        ({HashedKey("timestamp"): TS}, _system_only),
        ({HashedKey("cwd"): "/w"}, _system_only),
        ({HashedKey("type"): "tag", "tag": "red"}, _settled),
        # Two keys that both serialise as "type": JSON keeps the last one.
        (
            {"type": "assistant", HashedKey("type"): "user", "message": {"content": "hi"}},
            _system_only,
        ),
    ],
    ids=["type-user", "customTitle", "timestamp", "cwd", "type-tag", "duplicate-type"],
)
def test_a_str_subclass_key_is_hinted_as_its_json_text(
    entry: dict[Any, Any], prev_of: Callable[[], Any]
) -> None:
    body = check_encodable(0, entry)
    assert json.loads(body).keys() >= {str(k) for k in entry}  # JSON holds the key's text
    _assert_same_as_sdk(prev_of(), [entry])


# -- 3. plain JSON values of every odd kind: hint and fold agree ---------------------------


_ODD = [0, False, [], {}, "", None, 1, True, [0], {"a": 1}, 1.5, "x"]


@pytest.mark.parametrize("value", _ODD, ids=repr)
@pytest.mark.parametrize("field", ["cwd", "timestamp", "type", "tag", *HINT_FIELD])
@pytest.mark.parametrize("prev_of", [_settled, _system_only], ids=["settled", "open"])
def test_odd_plain_values_fold_as_the_sdk(
    value: Any, field: str, prev_of: Callable[[], Any]
) -> None:
    entries = [
        {field: value},
        {"type": "tag", field: value},
        {"type": "user", field: value, "message": {"content": "later prompt"}},
        {"message": {field: "nested", "customTitle": "nested"}, "data": {"type": "tag"}},
    ]
    for skip in range(len(entries) + 2):
        _assert_same_as_sdk(prev_of(), entries, skip)


def test_summary_hint_of_plain_values() -> None:
    assert summary_hint({"cwd": 0}) == 0
    assert summary_hint({"cwd": []}) == 0
    assert summary_hint({"cwd": {}}) == 0
    assert summary_hint({"cwd": False}) == 0
    assert summary_hint({"cwd": 1}) & HINT_CWD  # harmless: parsed, the fold ignores it
    assert summary_hint({"timestamp": 0}) == HINT_TIMESTAMP
    assert summary_hint({"type": "tag"}) == HINT_TAG
    assert summary_hint({"type": "User"}) == 0
    assert summary_hint({"message": {"type": "user", "customTitle": "x"}}) == 0
    assert summary_hint({"customTitle": ""}) == HINT_FIELD["customTitle"]  # "" still writes
    assert summary_hint({"type": Num.ONE}) == HINT_PARSE
    assert summary_hint({"type": Kind.USER}) == HINT_PARSE
    assert all(0 <= summary_hint(e) < 1 << 16 for e in ({}, {"type": Text("x")}))


def test_hints_hold_in_two_bytes_and_round_trip() -> None:
    hints = [0, HINT_PARSE, HINT_USER | HINT_TIMESTAMP, *HINT_FIELD.values()]
    blob = pack_hints(hints)
    assert len(blob) == 2 * len(hints)
    assert list(unpack_hints(blob)) == hints
    assert blob[:2] == b"\x00\x00" and blob[2:4] == HINT_PARSE.to_bytes(2, "little")


# -- 4. hypothesis: fold_batch vs the SDK fold from odd prev summaries ----------------------


_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2), st.sampled_from(["", "x", "/w", TS])
)
_PLAIN_ANY = st.one_of(_SCALAR, st.lists(_SCALAR, max_size=2), st.just({}))
_TYPE = st.one_of(st.sampled_from(["user", "assistant", "tag", "system"]), _PLAIN_ANY)
_PROMPT = st.sampled_from(["fix it", "", "  ", "<command-name>/x</command-name>", "y" * 210])
_PLAIN_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "type": _TYPE,
        "timestamp": st.one_of(st.sampled_from([TS, "nope", "2025-02-02T00:00:00Z"]), _SCALAR),
        "cwd": st.one_of(st.sampled_from(["/a", "/b", ""]), _PLAIN_ANY),
        "isSidechain": st.one_of(st.just(True), _SCALAR),
        "message": st.one_of(
            st.fixed_dictionaries({"content": st.one_of(_PROMPT, _PLAIN_ANY)}), _PLAIN_ANY
        ),
        "isMeta": st.one_of(st.just(True), _SCALAR),
        "tag": st.one_of(st.sampled_from(["red", "", "blue"]), _SCALAR),
        **{f: st.one_of(st.sampled_from(["A", "B", ""]), _SCALAR) for f in HINT_FIELD},
    },
)
_PREV_DATA = st.dictionaries(
    st.sampled_from(
        [
            "is_sidechain",
            "created_at",
            "cwd",
            "first_prompt",
            "first_prompt_locked",
            "command_fallback",
            "custom_title",
            "ai_title",
            "last_prompt",
            "summary_hint",
            "git_branch",
            "tag",
            "from_a_future_version",
        ]
    ),
    _PLAIN_ANY,
    max_size=9,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=_PREV_DATA,
    sidechain=st.booleans(),
    batch=st.lists(_PLAIN_ENTRY, min_size=1, max_size=10),
    skip=st.integers(0, 12),
)
def test_fold_batch_matches_the_sdk_from_odd_prev_summaries(
    data: dict[str, Any], sidechain: bool, batch: list[Any], skip: int
) -> None:
    if sidechain:
        data = {"is_sidechain": False, **data}  # the fast path is taken
    prev = {"session_id": "sess", "mtime": 5, "data": data}
    _assert_same_as_sdk(prev, batch, skip)


_NON_PLAIN = st.sampled_from(
    [Text("user"), Text("tag"), Text("x"), Kind.USER, Kind.TAG, Kind.ASSISTANT, Num.ONE]
)
_ANY_ENTRY = st.one_of(
    _PLAIN_ENTRY,
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.one_of(_TYPE, _NON_PLAIN),
            "cwd": st.one_of(st.sampled_from(["/a", ""]), _NON_PLAIN),
            "customTitle": st.one_of(st.sampled_from(["A", "B"]), _NON_PLAIN),
            "gitBranch": st.one_of(st.sampled_from(["main", "dev"]), _NON_PLAIN),
            "tag": st.one_of(st.sampled_from(["red", ""]), _NON_PLAIN),
            "message": st.fixed_dictionaries({"content": _PROMPT}),
        },
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=st.lists(_PLAIN_ENTRY, min_size=1, max_size=4), batch=st.lists(_ANY_ENTRY, max_size=10))
def test_fold_batch_matches_the_sdk_with_non_plain_values(
    head: list[Any], batch: list[Any]
) -> None:
    """Entries as a direct caller of ``DurableSessionStore.append`` may give them: str
    subclasses and enum members among plain values (they encode as their JSON text)."""
    prev = fold_session_summary(None, KEY, head)
    _assert_same_as_sdk(prev, batch)


# -- 5. check_batch and odd hint sequences --------------------------------------------------


def test_check_batch_refuses_misaligned_or_non_int_hints() -> None:
    for hints in ([0], [0, 0, 0], [0, True], [0, 1.0], [0, None]):
        with pytest.raises(ValueError, match="hints must hold one int per entry"):
            check_batch("k", Batch("p", 0, [b"{}", b"{}"], None, hints))  # type: ignore[arg-type]
    assert check_batch("k", Batch("p", 0, [b"{}", b"{}"], None, [0, 0])).hints == [0, 0]
    assert check_batch("k", Batch("p", 0, [b"{}"], None, None)).hints is None


def test_fold_batch_with_array_hints_as_the_queue_reads_them() -> None:
    entries = [{"customTitle": "a"}, {"type": "tag", "tag": "t"}, {"customTitle": "b"}]
    batch = _hinted(entries)
    from_queue = Batch("p", 0, batch.encoded, None, unpack_hints(pack_hints(batch.hints or [])))
    prev = _settled()
    expected = fold_session_summary(copy.deepcopy(prev), KEY, entries)
    assert json.dumps(fold_batch(prev, KEY, from_queue, 0)) == json.dumps(expected)


# -- 6. the queue: rows split by BATCH_ROW_BYTES keep their hints aligned --------------------


async def _queue_rows(store: DurableSessionStore, sql: str, args: tuple[Any, ...] = ()) -> Any:
    queue: Any = store.queue
    return list(await queue._reader.run(lambda: queue._reader.conn.execute(sql, args).fetchall()))


async def _write(store: DurableSessionStore, sql: str, args: tuple[Any, ...] = ()) -> None:
    queue: Any = store.queue
    await queue._writer.run(lambda: queue._writer.conn.execute(sql, args))


def _mixed_transcript(n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        e: dict[str, Any] = {"n": i, "pad": "p" * (i % 7)}
        if i % 2:
            e["type"] = "user"
            e["message"] = {"content": f"prompt {i}"}
        if i % 3 == 0:
            e["timestamp"] = TS
        if i % 5 == 1:
            e["cwd"] = f"/w{i}"
        if i % 4 == 2:
            e["customTitle"] = f"title {i}"
        if i % 6 == 5:
            e["gitBranch"] = f"b{i}"
        if i % 9 == 4:
            e = {"type": "tag", "tag": "" if i % 2 else f"t{i}"}
        out.append(e)
    return out


async def test_rows_split_by_size_keep_each_entry_s_hint(
    make_durable: Callable[..., DurableSessionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(walmirror.queue, "BATCH_ROW_BYTES", 120)
    faulty = FaultyStore(MemoryStore())
    faulty.down()
    store = make_durable(faulty, **TUNING)
    entries = _mixed_transcript(40)
    await store.append(KEY, entries)
    await store.append(SUB, entries[:10])
    rows = await _queue_rows(
        store,
        "SELECT b.first_seq, b.count, b.body, b.crc, b.hints, k.subpath FROM batches b"
        " JOIN keys k USING (key_id) ORDER BY b.key_id, b.first_seq",
    )
    main = [r for r in rows if r[5] == ""]
    sub = [r for r in rows if r[5] != ""]
    assert len(main) > 3 and len(sub) > 1  # split
    want = [summary_hint(e) for e in entries]
    seen = 0
    for first, count, body, crc, hints, _ in main:
        assert first == seen
        assert list(unpack_hints(hints)) == want[first : first + count]
        assert crc == zlib.crc32(hints, zlib.crc32(body)) == batch_crc(body, hints)
        assert [json.loads(p) for p in body.split(b"\n")] == entries[first : first + count]
        seen += count
    assert seen == len(entries)
    for _, _, body, crc, hints, _ in sub:
        assert hints is None and crc == zlib.crc32(body)

    # Reads from every seq, bounded in count: the hints stay with their bodies.
    queue: Any = store.queue
    key_id = (await _queue_rows(store, "SELECT key_id FROM keys WHERE subpath = ''"))[0][0]
    for from_seq in range(len(entries)):
        for max_entries in (1, 3, 100):
            first, bodies, hints = await queue._reader.run(
                lambda f=from_seq, m=max_entries: queue._read_batch(key_id, f, m, 1 << 30)
            )
            assert first == from_seq
            assert hints == want[from_seq : from_seq + len(bodies)]
            assert [json.loads(b) for b in bodies] == entries[from_seq : from_seq + len(bodies)]
    faulty.up()
    await store.flush(30)
    assert await faulty.inner.load(KEY) == entries


async def test_hints_stay_with_their_entries_when_the_ledger_drops_repeats(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Entries whose uuid the key holds are dropped at append: the hints of the
    entries kept must be theirs, not those of the dropped ones in their places."""
    faulty = FaultyStore(MemoryStore())
    faulty.down()
    store = make_durable(faulty, **TUNING)
    first = [
        {"uuid": "a", "type": "user", "message": {"content": "one"}},
        {"uuid": "b", "customTitle": "t"},
    ]
    await store.append(KEY, first)
    again = [
        {"uuid": "a", "type": "user", "message": {"content": "one"}},  # dropped
        {"uuid": "c", "cwd": "/w"},
        {"uuid": "b", "customTitle": "t"},  # dropped
        {"uuid": "d", "type": "tag", "tag": "x"},
        {"timestamp": TS},
    ]
    await store.append(KEY, again)
    rows = await _queue_rows(store, "SELECT first_seq, hints FROM batches ORDER BY first_seq")
    assert [(r[0], list(unpack_hints(r[1]))) for r in rows] == [
        (0, [HINT_USER, HINT_FIELD["customTitle"]]),
        (2, [HINT_CWD, HINT_TAG, HINT_TIMESTAMP]),
    ]
    faulty.up()
    await store.flush(30)
    assert await faulty.inner.load(KEY) == [*first, again[1], again[3], again[4]]


# -- 7. rows without a checksum (schema 4) beside hinted rows: a full parse ------------------


async def test_a_legacy_row_s_stale_hints_are_ignored(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """A row with crc NULL is a schema-4 row: whatever its hints column holds, it is
    not trusted (and a batch holding it has no hints)."""
    faulty = FaultyStore(MemoryStore())
    faulty.down()
    store = make_durable(faulty, **TUNING)
    await store.append(KEY, [{"type": "user", "message": {"content": "hi"}}, {"n": 1}])
    await store.append(KEY, [{"customTitle": "t"}])
    await _write(store, "UPDATE batches SET crc = NULL, hints = x'00000000' WHERE first_seq = 0")
    queue: Any = store.queue
    key_id = (await _queue_rows(store, "SELECT key_id FROM keys"))[0][0]
    first, bodies, hints = await queue._reader.run(
        lambda: queue._read_batch(key_id, 0, 100, 1 << 30)
    )
    assert (first, len(bodies), hints) == (0, 3, None)
    # From the hinted row on, the hints are there again.
    first, bodies, hints = await queue._reader.run(
        lambda: queue._read_batch(key_id, 2, 100, 1 << 30)
    )
    assert hints == [HINT_FIELD["customTitle"]]


remote = pytest.mark.parametrize("connect_backend", ["redis", "postgres", "s3"], indirect=True)


async def _summary_is_the_sdk_fold(connect_backend: Connect, *hosts: Any) -> Any:
    for host in hosts:  # a store buffering summary writes writes them before listing
        await host.list_session_summaries(KEY["project_key"])
    fresh: Any = await connect_backend()
    stored = await fresh.load(KEY)
    expected = fold_session_summary(None, KEY, stored)
    summaries = await fresh.list_session_summaries(KEY["project_key"])
    assert [json.dumps(s["data"]) for s in summaries] == [json.dumps(expected["data"])]
    return expected["data"]


@remote
async def test_legacy_rows_and_hinted_rows_in_one_delivery(
    connect_backend: Connect, make_durable: Callable[..., DurableSessionStore]
) -> None:
    """The summary is settled on the backend (is_sidechain there), then one delivery
    holds a schema-4 row (no crc, stale zero hints) and schema-5 rows of the same key:
    it must be folded from every entry, the user prompt of the legacy row included."""
    backend: Any = await connect_backend()
    faulty = FaultyStore(backend)
    store = make_durable(faulty, **TUNING)
    await store.append(KEY, [{"type": "system", "timestamp": "nope"}])
    await store.flush(30)
    faulty.down()
    await store.append(
        KEY,
        [
            {"type": "assistant", "customTitle": "legacy title"},
            {"type": "user", "timestamp": TS, "cwd": "/legacy", "message": {"content": "hi"}},
        ],
    )
    await store.append(
        KEY, [{"type": "assistant", "gitBranch": "dev"}, {"type": "tag", "tag": "x"}]
    )
    await _write(store, "UPDATE batches SET crc = NULL, hints = x'00000000' WHERE first_seq = 1")
    faulty.up()
    await store.flush(30)
    data = await _summary_is_the_sdk_fold(connect_backend, backend)
    assert data["first_prompt"] == "hi" and data["custom_title"] == "legacy title"
    assert data["cwd"] == "/legacy" and data["tag"] == "x" and "created_at" in data


def _write_schema_4_queue(path: Path, batches: list[list[dict[str, Any]]]) -> None:
    """A schema-4 queue: one main key, the given batches pending (no cursor yet)."""
    from walmirror.schema import MIGRATIONS

    conn = sqlite3.connect(path)
    for step in MIGRATIONS[:4]:
        for statement in step:
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '4')")
    total = sum(len(b) for b in batches)
    conn.execute(
        "INSERT INTO keys (key_id, project_key, session_id, subpath, first_seq, next_seq,"
        " updated_at) VALUES (1, 'proj', 'sess', '', 0, ?, ?)",
        (total, time.time()),
    )
    seq = 0
    for entries in batches:
        bodies = [json.dumps(e, separators=(",", ":")).encode() for e in entries]
        conn.execute(
            "INSERT INTO batches (key_id, first_seq, count, appended_at, nbytes, body)"
            " VALUES (1, ?, ?, ?, ?, ?)",
            (seq, len(bodies), time.time(), sum(map(len, bodies)), b"\n".join(bodies)),
        )
        seq += len(bodies)
    conn.commit()
    conn.close()


@remote
async def test_a_schema_4_queue_upgraded_with_rows_pending(
    tmp_path: Path, connect_backend: Connect, make_durable: Callable[..., DurableSessionStore]
) -> None:
    path = tmp_path / "v4.db"
    legacy = [
        [{"type": "system"}],
        [{"type": "user", "message": {"content": "legacy prompt"}}, {"customTitle": "old"}],
    ]
    _write_schema_4_queue(path, legacy)
    backend: Any = await connect_backend()
    faulty = FaultyStore(backend)
    faulty.down()
    store = make_durable(faulty, path, max_batch_entries=1, **TUNING)
    new = [{"customTitle": "new", "timestamp": TS}, {"type": "tag", "tag": "t"}]
    await store.append(KEY, new)
    rows = await _queue_rows(store, "SELECT first_seq, crc IS NULL, hints IS NULL FROM batches")
    assert sorted(rows) == [(0, 1, 1), (1, 1, 1), (3, 0, 0)]
    version = await _queue_rows(store, "SELECT value FROM meta WHERE name = 'schema_version'")
    assert int(version[0][0]) == 5
    faulty.up()
    await store.flush(30)
    assert await backend.load(KEY) == [*legacy[0], *legacy[1], *new]
    data = await _summary_is_the_sdk_fold(connect_backend, backend)
    assert data["first_prompt"] == "legacy prompt" and data["custom_title"] == "new"


# -- 8. damage: only its key parks, with an error that quotes nothing -----------------------


async def _eventually(check: Callable[[], Awaitable[bool]], guard: float = 60.0) -> None:
    deadline = time.monotonic() + guard
    while not await check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


OTHER: SessionKey = {"project_key": "proj", "session_id": "other"}
SECRET = "s3cr3t-content"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # A hints blob of the wrong length whose checksum was made to match.
        ("hints3", "holds 6 bytes of hints for 2 entries"),
        # A hints blob of odd length whose checksum was made to match.
        ("odd", "(the queue file is damaged)"),
        # A hints column that is TEXT, not a BLOB.
        ("text", "does not match its checksum"),
        # A crc column that is TEXT.
        ("crc_text", "does not match its checksum"),
        # Body damaged to other valid JSON, same count, same hints: only the crc tells.
        ("body", "does not match its checksum"),
        # The hints dropped, the crc kept: the crc covered them.
        ("hints_null", "does not match its checksum"),
    ],
)
async def test_damage_parks_only_its_key_without_quoting_content(
    make_durable: Callable[..., DurableSessionStore], damage: str, message: str
) -> None:
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    faulty.down()
    store = make_durable(faulty, **TUNING)
    await store.append(KEY, [{"type": "user", "message": {"content": SECRET}}, {"n": SECRET}])
    await store.append(OTHER, [{"n": 0}])
    where = " WHERE key_id = (SELECT key_id FROM keys WHERE session_id = 'sess')"
    ((body,),) = await _queue_rows(store, "SELECT body FROM batches" + where)
    if damage == "hints3":
        blob = pack_hints([HINT_USER, 0, 0])
        await _write(
            store, "UPDATE batches SET hints = ?, crc = ?" + where, (blob, batch_crc(body, blob))
        )
    elif damage == "odd":
        blob = b"\x02\x00\x00"
        await _write(
            store, "UPDATE batches SET hints = ?, crc = ?" + where, (blob, batch_crc(body, blob))
        )
    elif damage == "text":
        await _write(store, "UPDATE batches SET hints = 'ab'" + where)
    elif damage == "crc_text":
        await _write(store, "UPDATE batches SET crc = CAST(crc AS TEXT) || 'x'" + where)
    elif damage == "body":
        forged = body.replace(SECRET.encode(), b"X" * len(SECRET))
        await _write(store, "UPDATE batches SET body = ?" + where, (forged,))
    else:
        await _write(store, "UPDATE batches SET hints = NULL" + where)
    faulty.up()

    async def parked_and_other_delivered() -> bool:
        parked = (await store.status())["backends"][0]["parked"]
        return bool(parked) and bool(await inner.load(OTHER))

    await _eventually(parked_and_other_delivered, guard=20.0)
    parked = (await store.status())["backends"][0]["parked"]
    assert [p["key"] for p in parked] == [KEY]
    error = parked[0]["error"]
    assert error.startswith("CorruptQueueError: "), error
    assert message in error
    assert SECRET not in error and "s3cr3t" not in error
    assert await inner.load(KEY) is None
    assert await inner.load(OTHER) == [{"n": 0}]


async def test_damage_in_a_later_row_delivers_the_rows_before_it(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    faulty.down()
    store = make_durable(faulty, max_batch_entries=2, **TUNING)
    await store.append(KEY, [{"n": 0}, {"n": 1}])
    await store.append(KEY, [{"n": 2}, {"n": 3}])
    await _write(store, "UPDATE batches SET crc = crc + 1 WHERE first_seq = 2")
    faulty.up()

    async def parked() -> bool:
        return bool((await store.status())["backends"][0]["parked"])

    await _eventually(parked)
    error = (await store.status())["backends"][0]["parked"][0]["error"]
    assert error.startswith("CorruptQueueError: the queued batch at seq 2 of this key")
    assert await inner.load(KEY) == [{"n": 0}, {"n": 1}]


# -- 9. end to end: DurableSessionStore into Redis / PostgreSQL / S3 ------------------------


@remote
async def test_end_to_end_summaries_are_the_sdk_fold_of_load(
    connect_backend: Connect, make_durable: Callable[..., DurableSessionStore]
) -> None:
    backend: Any = await connect_backend()
    store = make_durable(backend, max_batch_entries=7, **TUNING)
    entries = _mixed_transcript(60)
    for start in range(0, 60, 11):  # several appends, several deliveries each
        await store.append(KEY, entries[start : start + 11])
        await store.flush(30)
    await store.append(SUB, [{"type": "user", "customTitle": "sub must not count"}])
    await store.flush(30)
    assert await backend.load(KEY) == entries
    data = await _summary_is_the_sdk_fold(connect_backend, backend)
    assert "sub must not count" not in json.dumps(data)


@remote
async def test_end_to_end_a_str_enum_entry_does_not_lose_the_title(
    connect_backend: Connect, make_durable: Callable[..., DurableSessionStore]
) -> None:
    """A caller appending an entry whose "type" is a StrEnum member after the entries
    carrying the session's newest title: the backend's summary must still be the SDK
    fold of the stored transcript."""
    backend: Any = await connect_backend()
    store = make_durable(backend, **TUNING)
    await store.append(
        KEY, [{"type": "user", "timestamp": TS, "cwd": "/w", "message": {"content": "go"}}]
    )
    await store.flush(30)
    await store.append(
        KEY,
        [
            {"type": "assistant", "customTitle": "first title"},
            {"type": "assistant", "customTitle": "second title"},
            {"type": Kind.ASSISTANT, "n": 1},
        ],
    )
    await store.flush(30)
    data = await _summary_is_the_sdk_fold(connect_backend, backend)
    assert data["custom_title"] == "second title"


@remote
async def test_end_to_end_a_str_subclass_key_still_gives_the_first_prompt(
    connect_backend: Connect, make_durable: Callable[..., DurableSessionStore]
) -> None:
    backend: Any = await connect_backend()
    store = make_durable(backend, **TUNING)
    await store.append(KEY, [{"type": "system"}])
    await store.flush(30)
    await store.append(KEY, [{HashedKey("type"): "user", "message": {"content": "hello"}}])
    await store.flush(30)
    assert (await backend.load(KEY))[1] == {"type": "user", "message": {"content": "hello"}}
    data = await _summary_is_the_sdk_fold(connect_backend, backend)
    assert data.get("first_prompt") == "hello"
