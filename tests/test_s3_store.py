"""Tests for walmirror.backends.s3.S3Store, against a real S3 API over HTTP.

By default the tests start a private moto server (``tests/s3_server.py``). Set
``WALMIRROR_S3_ENDPOINT`` (and ``WALMIRROR_S3_BUCKET``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``) to run the same tests against MinIO or AWS S3; the
fault tests (fault proxy, server kill) always use a private moto server, the
only S3 they can break. Every test works under its own random prefix and
deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.testing.session_store_conformance import run_session_store_conformance
from claude_agent_sdk.types import SessionKey
from s3_server import MotoServer

from walmirror import DurableSessionStore
from walmirror.backends.s3 import S3Store
from walmirror.errors import InvalidEntryError, InvalidKeyError
from walmirror.faultproxy import FaultProxy
from walmirror.protocol import Batch, MarkBehindError, Receipt, is_producer_store

ENDPOINT = os.environ.get("WALMIRROR_S3_ENDPOINT")
BUCKET = os.environ.get("WALMIRROR_S3_BUCKET", "walmirror-tests")
CREDENTIALS = {
    "aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
    "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
    "region_name": "us-east-1",
}
# Short timeouts and no hidden retries: a fault reaches walmirror at once. Only for
# calls that are retried (through DurableSessionStore): a healthy call that is slow on a
# busy machine is then one more retry, not a failure.
IMPATIENT = AioConfig(connect_timeout=0.5, read_timeout=0.5, retries={"total_max_attempts": 1})
# No hidden retries either, but timeouts no loaded machine reaches: for calls a test
# makes once and expects to answer.
NO_RETRIES = AioConfig(connect_timeout=10, read_timeout=10, retries={"total_max_attempts": 1})
# A wait for something that must happen fails only after this long: a hang guard, not
# a timing (the suite must pass on a saturated machine).
HANG_GUARD = 60.0
# One botocore session for the whole run: it loads the S3 model once.
SESSION = get_session()

KEY: SessionKey = {"project_key": "proj", "session_id": "sess"}
SUB: SessionKey = {**KEY, "subpath": "subagents/agent-1"}

Make = Callable[..., DurableSessionStore]


def entries(count: int, start: int = 0, tag: str = "e") -> list[Any]:
    return [{"type": "user", "uuid": f"{tag}{i}", "n": i} for i in range(start, start + count)]


def batch(producer: str, first: int, count: int, expect: int | None = None) -> Batch:
    """``count`` entries of ``producer`` from seq ``first`` (the entries carry the seq)."""
    return Batch.of(producer, first, entries(count, first, tag=producer), expect)


# --- Fixtures: a server, a bucket, a prefix per test --------------------------


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def endpoint(request: pytest.FixtureRequest) -> str:
    if ENDPOINT:
        return ENDPOINT
    server: MotoServer = request.getfixturevalue("moto_server")
    return server.endpoint_url


class S3Env:
    """A client, the test bucket and a fresh prefix; stores made here are closed at the end."""

    def __init__(self, endpoint: str, client: Any, owner: S3Store) -> None:
        self.endpoint = endpoint
        self.client = client
        self.prefix = f"walmirror-test-{uuid.uuid4().hex}/"
        self._owner = owner
        self._stores: list[S3Store] = []

    @classmethod
    async def open(cls, endpoint: str) -> S3Env:
        owner = await S3Store.connect(BUCKET, endpoint_url=endpoint, session=SESSION, **CREDENTIALS)
        await ensure_bucket(owner.client)
        return cls(endpoint, owner.client, owner)

    def store(self, prefix: str = "", **tuning: Any) -> S3Store:
        """A store on the shared client, under this test's prefix (plus ``prefix``)."""
        store = S3Store(self.client, BUCKET, self.prefix + prefix, **tuning)
        self._stores.append(store)
        return store

    async def keys(self, under: str = "") -> list[str]:
        """Object names under this test's prefix (without it), sorted."""
        names: list[str] = []
        kwargs = {"Bucket": BUCKET, "Prefix": self.prefix + under}
        while True:
            page = await self.client.list_objects_v2(**kwargs)
            names += [o["Key"][len(self.prefix) :] for o in page.get("Contents") or []]
            if not page.get("IsTruncated"):
                return sorted(names)
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    async def sizes(self, under: str = "") -> dict[str, int]:
        """Object name (without this test's prefix) -> size, under ``under``."""
        out: dict[str, int] = {}
        kwargs = {"Bucket": BUCKET, "Prefix": self.prefix + under}
        while True:
            page = await self.client.list_objects_v2(**kwargs)
            out.update(
                {o["Key"][len(self.prefix) :]: o["Size"] for o in page.get("Contents") or []}
            )
            if not page.get("IsTruncated"):
                return out
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    async def holding(self, under: str = "proj/sess/parts/") -> list[str]:
        """The part and segment objects that hold entries (not blanks, guards or marks)."""
        sizes = await self.sizes(under)
        return sorted(n for n, size in sizes.items() if n.endswith(".jsonl") and size > 1)

    async def put(self, name: str, body: bytes, **extra: Any) -> None:
        await self.client.put_object(Bucket=BUCKET, Key=self.prefix + name, Body=body, **extra)

    async def close(self) -> None:
        for store in self._stores:
            await store.close()
        names = await self.keys()
        for i in range(0, len(names), 1000):
            await self.client.delete_objects(
                Bucket=BUCKET,
                Delete={"Objects": [{"Key": self.prefix + n} for n in names[i : i + 1000]]},
            )
        await self._owner.close()


async def ensure_bucket(client: Any) -> None:
    try:
        await client.head_bucket(Bucket=BUCKET)
    except Exception:
        await client.create_bucket(Bucket=BUCKET)


@pytest.fixture
async def s3(endpoint: str) -> AsyncIterator[S3Env]:
    env = await S3Env.open(endpoint)
    yield env
    await env.close()


@pytest.fixture
async def moto_env(moto_server: MotoServer) -> AsyncIterator[S3Env]:
    """Like ``s3``, but always on the private moto server (for the fault tests)."""
    env = await S3Env.open(moto_server.endpoint_url)
    yield env
    await env.close()


def jsonl(items: list[Any]) -> bytes:
    return b"".join(
        json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for e in items
    )


async def wait_for(condition: Callable[[], Any], timeout: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- The SDK's contract ---------------------------------------------------


async def test_passes_sdk_conformance_suite(s3: S3Env) -> None:
    await run_session_store_conformance(lambda: s3.store(uuid.uuid4().hex))


async def test_passes_sdk_conformance_suite_behind_durable_store(
    s3: S3Env, make_durable: Make
) -> None:
    # The suite's reads go to moto through the store's call_timeout: the fixture's 2 s
    # is for outages, and a loaded machine's moto can take longer to answer a connect.
    await run_session_store_conformance(
        lambda: make_durable(s3.store(uuid.uuid4().hex), call_timeout=30.0)
    )


def test_speaks_the_protocol_and_names_its_cursor(s3: S3Env) -> None:
    store = s3.store("x")
    assert is_producer_store(store)
    assert store.cursor_name == f"s3://{BUCKET}/{s3.prefix}x"
    assert S3Store(s3.client, BUCKET).cursor_name == f"s3://{BUCKET}"


async def test_from_url_connects_on_first_use(
    s3: S3Env, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    url = (
        f"s3://{BUCKET}/{s3.prefix}via-url?endpoint_url={quote(endpoint, safe='')}"
        "&region=us-east-1&compact_every=none&summary_delay=0.5"
    )
    store = S3Store.from_url(url)
    assert store.client is None  # built without a loop or a connection
    assert store.cursor_name == f"s3://{BUCKET}/{s3.prefix}via-url"
    try:
        assert (await store.append_batch(KEY, batch("pa", 0, 2))).length == 2
        assert await s3.store("via-url").load(KEY) == entries(2, tag="pa")
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3:///prefix", "no bucket"),
        ("s3://key:secret@bucket/p", "no credentials"),
        ("s3://bucket/p?colour=blue", "unknown parameter"),
        ("s3://bucket/p?compact_every=often", "not a number"),
        ("s3://bucket/p?region=a&region=b", "once"),
        ("file:///tmp", "s3://"),
    ],
)
def test_from_url_refuses_bad_urls_without_repeating_them(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        S3Store.from_url(url)
    assert "secret" not in str(caught.value)


async def test_check_finds_bucket_and_conditional_writes(s3: S3Env) -> None:
    assert await s3.store().check() == []
    missing = S3Store(s3.client, f"walmirror-missing-{uuid.uuid4().hex[:12]}")
    [problem] = await missing.check()
    assert "does not exist" in problem


# --- Layout ---------------------------------------------------------------


async def test_parts_are_named_by_first_offset_and_hold_jsonl(s3: S3Env) -> None:
    store = s3.store()
    await store.append(KEY, [{"type": "user", "text": "héllo"}, {"type": "x", "n": 1}])
    await store.append_batch(KEY, batch("pa", 7, 3))
    assert await s3.keys("proj/sess/parts/") == [
        "proj/sess/parts/000000000000.jsonl",
        "proj/sess/parts/000000000002.jsonl",
    ]
    got = await s3.client.get_object(
        Bucket=BUCKET, Key=s3.prefix + "proj/sess/parts/000000000000.jsonl"
    )
    async with got["Body"] as body:
        assert await body.read() == '{"type":"user","text":"héllo"}\n{"type":"x","n":1}\n'.encode()
    assert got["Metadata"] == {"entries": "2"}  # a plain append has no producer
    head = await s3.client.head_object(
        Bucket=BUCKET, Key=s3.prefix + "proj/sess/parts/000000000002.jsonl"
    )
    # Who wrote the part, and its last seq: the marks are folded from these.
    assert head["Metadata"] == {"entries": "3", "producer": "pa", "seq": "9"}


async def test_subkeys_and_sidecar_live_apart_from_the_main_parts(s3: S3Env) -> None:
    store = s3.store()
    await store.append(KEY, entries(1))
    await store.append(SUB, entries(2))
    await store.close()  # writes the pending sidecar
    assert await s3.keys() == [
        "proj/@summaries/sess.json",
        "proj/sess/parts/000000000000.jsonl",
        "proj/sess/subkeys/subagents%2Fagent-1/parts/000000000000.jsonl",
    ]


async def test_append_of_empty_list_sends_nothing(s3: S3Env) -> None:
    store = s3.store()
    await store.append(KEY, [])
    assert await s3.keys() == []
    assert await store.load(KEY) is None
    assert await store.length(KEY) == 0


async def test_delete_of_main_key_leaves_only_its_tombstone(s3: S3Env) -> None:
    # contract 5: the entries are gone; blanks, guards and marks checkpoints stay.
    store = s3.store()
    other: SessionKey = {"project_key": "proj", "session_id": "sess2"}
    await store.append_batch(KEY, batch("pa", 0, 2))
    await store.append(KEY, entries(1))
    await store.append_batch(SUB, batch("pa", 0, 1))
    await store.append(other, entries(1))
    await store.close()
    store = s3.store()
    await store.delete(KEY)
    sizes = await s3.sizes("proj/sess/")
    assert sizes == {
        "proj/sess/parts/000000000000.jsonl": 0,  # blank: the name stays taken
        "proj/sess/parts/000000000002.jsonl": 0,
        "proj/sess/parts/000000000003.jsonl": 1,  # the guard: the delete's offset
        "proj/sess/parts/000000000003.marks.json": len(b'{"marks":{"pa":1}}'),
        "proj/sess/subkeys/subagents%2Fagent-1/parts/000000000000.jsonl": 0,
        "proj/sess/subkeys/subagents%2Fagent-1/parts/000000000001.jsonl": 1,
        "proj/sess/subkeys/subagents%2Fagent-1/parts/000000000001.marks.json": len(
            b'{"marks":{"pa":0}}'
        ),
    }
    assert "proj/@summaries/sess.json" not in await s3.keys()
    assert await store.length(KEY) == 0
    assert await store.load(SUB) is None
    assert await store.list_sessions("proj") == [
        {"session_id": "sess2", "mtime": (await store.list_sessions("proj"))[0]["mtime"]}
    ]
    assert await store.list_subkeys(KEY) == []
    assert await store.producer_mark(KEY, "pa") == 1
    assert await store.producer_mark(SUB, "pa") == 0


async def test_delete_of_subkey_keeps_main_transcript_and_summary(s3: S3Env) -> None:
    store = s3.store()
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(1))
    await store.delete(SUB)
    assert await store.load(SUB) is None
    assert await store.load(KEY) == entries(2)
    assert await store.list_subkeys(KEY) == []
    assert [s["session_id"] for s in await store.list_session_summaries("proj")] == ["sess"]


async def test_invalid_entries_are_refused_before_anything_is_sent(s3: S3Env) -> None:
    store = s3.store()
    with pytest.raises(InvalidEntryError, match="entry 1"):
        await store.append(KEY, [{"type": "x"}, {"type": "x", "bad": {1, 2}}])
    with pytest.raises(InvalidEntryError):
        await store.append(KEY, [{"type": "x", "nan": float("nan")}])
    with pytest.raises(ValueError, match="encoded"):  # a line must stay one line
        await store.append_batch(KEY, Batch("pa", 0, [b'{"type":"x"}\n{"type":"y"}']))
    for bad in ([b'{"type":"x"}', b""], [b'{"type":"x"}\n'], [b"\n", b'{"type":"x"}']):
        with pytest.raises(ValueError, match="encoded"):
            await store.append_batch(KEY, Batch("pa", 0, bad))
    assert await s3.keys() == []


# --- The protocol's atomic step, in S3's terms (walmirror.protocol) ----------


async def test_append_batch_stores_the_queues_bytes_as_given(s3: S3Env) -> None:
    store = s3.store()
    as_queued = [b'{"type":"x","b":1,"a":"\xc3\xa9"}']
    receipt = await store.append_batch(KEY, Batch("pa", 0, as_queued))
    assert receipt == Receipt(appended=1, mark=0, length=1)
    got = await s3.client.get_object(
        Bucket=BUCKET, Key=s3.prefix + "proj/sess/parts/000000000000.jsonl"
    )
    async with got["Body"] as body:
        assert await body.read() == as_queued[0] + b"\n"
    assert await store.load(KEY) == [{"type": "x", "b": 1, "a": "é"}]


async def test_a_repeat_writes_no_object(s3: S3Env) -> None:
    # contract 2: a retry after a lost reply is a no-op.
    store = s3.store()
    await store.append_batch(KEY, batch("pa", 0, 3))
    await store.append_batch(KEY, batch("pa", 3, 2, expect=2))
    before = await s3.keys()
    assert (await store.append_batch(KEY, batch("pa", 0, 3))).appended == 0
    assert (await s3.store().append_batch(KEY, batch("pa", 1, 4))).appended == 0
    assert await s3.keys() == before
    assert await store.load(KEY) == entries(5, tag="pa")


async def test_a_part_holds_only_the_entries_past_the_mark(s3: S3Env) -> None:
    store = s3.store()
    await store.append_batch(KEY, batch("pa", 0, 3))
    assert await store.append_batch(KEY, batch("pa", 1, 6, expect=2)) == Receipt(4, 6, 7)
    assert await store.load(KEY) == entries(7, tag="pa")
    assert await s3.keys("proj/sess/parts/") == [
        "proj/sess/parts/000000000000.jsonl",
        "proj/sess/parts/000000000003.jsonl",
    ]


async def test_two_writers_at_one_offset_both_land_one_after_the_other(s3: S3Env) -> None:
    # Different batch sizes on purpose: part names hold the first offset only, so
    # the conditional put makes them collide; the loser re-learns and appends after.
    first, second = s3.store(), s3.store()
    await first.append_batch(KEY, batch("pa", 0, 2))
    assert await second.length(KEY) == 2
    results = await asyncio.gather(
        first.append_batch(KEY, batch("pa", 2, 3, expect=1)),
        second.append_batch(KEY, batch("pb", 0, 5)),
    )
    assert sorted(r.length for r in results) in ([5, 10], [7, 10])
    stored = await first.load(KEY)
    assert stored is not None and len(stored) == 10
    assert [e for e in stored if e["uuid"].startswith("pa")] == entries(5, tag="pa")
    assert [e for e in stored if e["uuid"].startswith("pb")] == entries(5, tag="pb")


async def test_a_key_loaded_empty_is_appended_to_without_listing_it_again(s3: S3Env) -> None:
    """The flusher loads a key new to its queue before the first delivery (uuids another
    queue stored): when that listing found nothing at all, the first put needs no
    second one. Another writer landing in between is still caught by the put's
    condition."""
    store, other = s3.store(), s3.store()
    ops: list[str] = []
    real = store._request

    async def counting(operation: str, **kwargs: Any) -> Any:
        ops.append(operation)
        return await real(operation, **kwargs)

    store._request = counting  # type: ignore[method-assign]
    assert await store.load(KEY) is None
    assert await store.append_batch(KEY, batch("pa", 0, 3)) == Receipt(3, 2, 3)
    assert ops.count("list_objects_v2") == 1
    # Loaded empty, then another host writes first: the conditional put loses, the
    # store lists and appends after it.
    key2: SessionKey = {"project_key": "proj", "session_id": "other"}
    assert await store.load(key2) is None
    await other.append_batch(key2, batch("pb", 0, 2))
    assert await store.append_batch(key2, batch("pa", 0, 3)) == Receipt(3, 2, 5)
    assert await other.load(key2) == entries(2, tag="pb") + entries(3, tag="pa")


async def test_a_stale_cached_end_is_corrected_by_the_conditional_put(s3: S3Env) -> None:
    mine, theirs = s3.store(), s3.store()
    await mine.append_batch(KEY, batch("pa", 0, 2))  # mine caches end 2
    await theirs.append_batch(KEY, batch("pb", 0, 3))
    assert await mine.append_batch(KEY, batch("pa", 2, 1, expect=1)) == Receipt(1, 2, 6)
    await mine.append(KEY, entries(1, tag="plain"))  # a plain append too
    assert await theirs.load(KEY) == (
        entries(2, tag="pa") + entries(3, tag="pb") + entries(1, 2, tag="pa")
    ) + entries(1, tag="plain")


async def test_a_key_deleted_elsewhere_starts_afresh_under_a_stale_cache(s3: S3Env) -> None:
    # contract 5: delete on one host, appends on another that still caches the old
    # end: a fresh, readable transcript; nothing deleted comes back.
    mine, theirs = s3.store(), s3.store()
    await mine.append_batch(KEY, batch("pa", 0, 3))
    await mine.append_batch(SUB, batch("pa", 0, 2))
    await mine.append(KEY, entries(1, tag="plain"))
    await theirs.delete(KEY)
    assert await mine.append_batch(KEY, batch("pa", 0, 3)) == Receipt(0, 2, 0)  # late retry
    assert await mine.append_batch(SUB, batch("pa", 1, 1)) == Receipt(0, 1, 0)
    assert await mine.append_batch(KEY, batch("pa", 3, 2, expect=2)) == Receipt(2, 4, 2)
    await mine.append(KEY, entries(1, 1, tag="plain"))
    await theirs.append_batch(SUB, batch("pb", 0, 1))
    for reader in (mine, theirs, s3.store()):
        assert await reader.load(KEY) == entries(2, 3, tag="pa") + entries(1, 1, tag="plain")
        assert await reader.load(SUB) == entries(1, tag="pb")
    # And a store that never saw the key reads the tombstone's marks.
    assert await s3.store().append_batch(KEY, batch("pa", 0, 5)) == Receipt(0, 4, 3)


async def test_a_delete_racing_an_append_keeps_the_append(s3: S3Env) -> None:
    # contract 5: an append that takes the offset first is sealed in; one after the
    # guard starts the fresh transcript. Either way it is never lost.
    writer, deleter = s3.store(), s3.store()
    await writer.append_batch(KEY, batch("pa", 0, 2))
    receipt, _ = await asyncio.gather(
        writer.append_batch(KEY, batch("pa", 2, 2, expect=1)), deleter.delete(KEY)
    )
    stored = await s3.store().load(KEY)
    assert stored in (None, entries(2, 2, tag="pa"))
    assert (stored is None) == (receipt.length == 4)  # landed before the guard: deleted
    assert await s3.store().producer_mark(KEY, "pa") == 3


async def test_a_bucket_that_lost_data_is_noticed_once_the_cache_ttl_passes(s3: S3Env) -> None:
    mine = s3.store(length_cache_ttl=0.2)
    await mine.append_batch(KEY, batch("pa", 0, 3))
    for name in await s3.keys():  # the bucket loses everything, behind the store's back
        await s3.client.delete_object(Bucket=BUCKET, Key=s3.prefix + name)
    await asyncio.sleep(0.25)
    with pytest.raises(MarkBehindError) as caught:
        await mine.append_batch(KEY, batch("pa", 3, 2, expect=2))
    assert caught.value.mark is None
    assert await s3.keys() == []  # nothing written after the hole


async def test_length_of_a_missing_key_is_zero(s3: S3Env) -> None:
    assert await s3.store().length(KEY) == 0


# --- Keys cannot reach into each other's prefix -----------------------------


TRICKY_KEYS: list[SessionKey] = [
    {"project_key": "p", "session_id": "s"},
    {"project_key": "p", "session_id": "s", "subpath": "a/b"},
    {"project_key": "p", "session_id": "s", "subpath": "a%2Fb"},
    {"project_key": "p", "session_id": "s", "subpath": "parts"},
    {"project_key": "p", "session_id": "s", "subpath": "subkeys/parts"},
    {"project_key": "p", "session_id": "s%2Fsubkeys"},
    {"project_key": "p%2Fs", "session_id": "s"},
    {"project_key": "p", "session_id": "%41"},
    {"project_key": "p", "session_id": "A"},
    {"project_key": "p", "session_id": "..."},
    {"project_key": "p", "session_id": "..a", "subpath": "..b/...c"},
    {"project_key": "p", "session_id": "@summaries"},
    {"project_key": "p", "session_id": "x?y#z&w=1"},
    {"project_key": "p", "session_id": "s p+a ce"},
    {"project_key": "项目", "session_id": "会话", "subpath": "subagents/代理-1"},
    {"project_key": "p", "session_id": "emoji-🙂"},
]


async def test_every_key_stays_in_its_own_prefix(s3: S3Env) -> None:
    store = s3.store()
    for i, key in enumerate(TRICKY_KEYS):
        await store.append(key, [{"type": "x", "i": i}])
    for i, key in enumerate(TRICKY_KEYS):
        assert await store.load(key) == [{"type": "x", "i": i}], key
        assert await store.length(key) == 1
    # Every object sits under its own key's encoded prefix.
    for name in await s3.keys():
        if "/@summaries/" in name:
            continue
        owners = [
            key
            for key in TRICKY_KEYS
            if name.startswith(
                f"{quote(key['project_key'], safe='')}/{quote(key['session_id'], safe='')}/"
                + (
                    f"subkeys/{quote(key['subpath'], safe='')}/parts/"
                    if "subpath" in key
                    else "parts/"
                )
            )
        ]
        assert len(owners) == 1, name
    sessions = sorted(s["session_id"] for s in await store.list_sessions("p"))
    assert sessions == sorted(
        k["session_id"] for k in TRICKY_KEYS if k["project_key"] == "p" and "subpath" not in k
    )
    assert await store.list_subkeys({"project_key": "p", "session_id": "s"}) == sorted(
        ["a/b", "a%2Fb", "parts", "subkeys/parts"]
    )
    await store.delete({"project_key": "p", "session_id": "s"})
    for key in TRICKY_KEYS:
        gone = key["project_key"] == "p" and key["session_id"] == "s"
        assert (await store.load(key) is None) == gone, key


@pytest.mark.parametrize(
    "key",
    [
        {"project_key": "p", "session_id": ".."},
        {"project_key": "..", "session_id": "s"},
        {"project_key": "p", "session_id": "a/b"},
        {"project_key": "p", "session_id": "s", "subpath": "../x"},
        {"project_key": "p", "session_id": "s", "subpath": "/abs"},
        {"project_key": "p", "session_id": "s", "subpath": ""},
        {"project_key": "p", "session_id": "nul\x00"},
        {"project_key": "p", "session_id": "\ud800"},
        {"project_key": "p", "session_id": "长" * 200},  # 1,800 bytes encoded
    ],
)
async def test_invalid_keys_are_refused_before_anything_is_sent(
    s3: S3Env, key: dict[str, str]
) -> None:
    store = s3.store()
    with pytest.raises(InvalidKeyError):
        await store.append(key, entries(1))  # type: ignore[arg-type]
    assert await s3.keys() == []


# --- Compaction -----------------------------------------------------------


def compacting_store(s3: S3Env, **tuning: Any) -> S3Store:
    tuning = {"compact_every": None, "compaction_windows": (4, 16), "compaction_fanin": 2, **tuning}
    return s3.store(**tuning)


async def fill(store: S3Store, appends: int = 30, producer: str = "pa", seq: int = 0) -> list[Any]:
    """``appends`` batches of 1 to 3 entries from ``producer``; returns what it wrote."""
    written: list[Any] = []
    for i in range(appends):
        count = 1 + i % 3
        expect = None if seq == 0 else seq - 1
        await store.append_batch(KEY, batch(producer, seq, count, expect))
        written += entries(count, seq, tag=producer)
        seq += count
    return written


async def test_compaction_keeps_entries_and_order_with_fewer_objects_to_read(
    s3: S3Env,
) -> None:
    store = compacting_store(s3)
    expected = await fill(store)
    parts_before = await s3.holding()
    removed = await store.compact(KEY)
    after = await s3.holding()
    assert removed > 0 and len(after) < len(parts_before) // 2
    assert any("-" in name for name in after)  # segments named by their range
    assert after[-1] == parts_before[-1]  # the last part stays: list_sessions' mtime
    assert await store.load(KEY) == expected
    assert await store.length(KEY) == len(expected)
    await store.append_batch(KEY, batch("pa", len(expected), 2, expect=len(expected) - 1))
    assert await store.compact(KEY) >= 0
    assert await store.load(KEY) == expected + entries(2, len(expected), tag="pa")


async def test_compaction_keeps_the_names_of_the_parts_it_replaces(s3: S3Env) -> None:
    # A blank keeps the offset's name taken: a put at a stale end can never land.
    store = compacting_store(s3)
    await fill(store)
    names_before = set(await s3.keys("proj/sess/parts/"))
    await store.compact(KEY)
    sizes = await s3.sizes("proj/sess/parts/")
    assert names_before <= set(sizes)
    assert any(sizes[name] == 0 for name in names_before)
    [checkpoint] = [n for n in sizes if n.endswith(".marks.json")]  # older ones pruned
    assert checkpoint.startswith("proj/sess/parts/0000000000")


async def test_compaction_keeps_every_producers_mark(s3: S3Env) -> None:
    store = compacting_store(s3)
    await fill(store, producer="pa")
    await fill(store, producer="pb", appends=10)
    await store.append(KEY, entries(1, tag="plain"))
    await store.compact(KEY)
    fresh = s3.store()
    assert await fresh.producer_mark(KEY, "pa") == 59
    assert await fresh.producer_mark(KEY, "pb") == 18  # 10 batches: 19 entries
    assert await fresh.producer_mark(KEY, "pc") is None


async def test_compaction_twice_changes_nothing_more(s3: S3Env) -> None:
    store = compacting_store(s3)
    await fill(store)
    await store.compact(KEY)
    names = await s3.sizes("proj/sess/")
    assert await store.compact(KEY) == 0
    assert await s3.sizes("proj/sess/") == names


async def test_load_is_right_between_segment_write_and_part_blanking(
    s3: S3Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = compacting_store(s3)
    expected = await fill(store)
    before = await s3.holding()

    async def keep_everything(keys: list[Any]) -> None:
        return None

    monkeypatch.setattr(store, "_delete_keys", keep_everything)
    monkeypatch.setattr(store, "_blank", keep_everything)
    await store.compact(KEY)  # segments and checkpoints written, nothing blanked
    monkeypatch.undo()
    assert set(before) < set(await s3.holding())
    for reader in (store, s3.store()):
        assert await reader.load(KEY) == expected
        assert await reader.length(KEY) == len(expected)
    await store.append_batch(KEY, batch("pa", 60, 1, expect=59))
    expected += entries(1, 60, tag="pa")
    await store.compact(KEY)  # blanks what the first one left
    assert len(await s3.holding()) < len(before)
    assert await s3.store().load(KEY) == expected
    assert await s3.store().producer_mark(KEY, "pa") == 60


async def test_load_is_right_after_a_crash_in_the_middle_of_compaction(
    s3: S3Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = compacting_store(s3)
    expected = await fill(store, appends=40)
    real_blank = store._blank

    async def crash_halfway(parts: list[Any]) -> None:
        await real_blank(parts[: len(parts) // 2])
        raise RuntimeError("crashed")

    monkeypatch.setattr(store, "_blank", crash_halfway)
    with pytest.raises(RuntimeError, match="crashed"):
        await store.compact(KEY)
    monkeypatch.undo()
    assert await s3.store().load(KEY) == expected
    assert await s3.store().length(KEY) == len(expected)
    assert await s3.store().producer_mark(KEY, "pa") == 78  # 40 batches: 79 entries
    # The next compaction reuses the segment (same range, same bytes) and cleans up.
    again = compacting_store(s3)
    await again.compact(KEY)
    clean = await s3.sizes("proj/sess/")
    await again.compact(KEY)
    assert await s3.sizes("proj/sess/") == clean
    assert await s3.store().load(KEY) == expected


async def test_loads_running_during_compaction_see_every_entry_once(s3: S3Env) -> None:
    store = compacting_store(s3)
    expected = await fill(store, appends=40)
    readers = [s3.store() for _ in range(4)]
    compaction = asyncio.ensure_future(store.compact(KEY))
    while not compaction.done():
        loads = await asyncio.gather(*(r.load(KEY) for r in readers))
        assert all(loaded == expected for loaded in loads)
    assert await compaction > 0
    assert await readers[0].load(KEY) == expected


async def test_background_compaction_after_compact_every_appends(s3: S3Env) -> None:
    store = compacting_store(s3, compact_every=8)
    expected = await fill(store, appends=40)
    await wait_for(lambda: not store._compactions)
    await wait_for(_fewer_objects(s3, 30))
    assert await s3.store().load(KEY) == expected


def _fewer_objects(s3: S3Env, count: int) -> Callable[[], Any]:
    async def check() -> bool:
        return len(await s3.holding()) < count

    return check


async def test_a_long_session_loads_from_few_objects(s3: S3Env) -> None:
    store = s3.store(compact_every=16, compaction_windows=(16, 256), compaction_fanin=4)
    for i in range(200):
        await store.append_batch(KEY, batch("pa", i, 1, expect=None if i == 0 else i - 1))
    await store.compact(KEY)
    assert len(await s3.holding()) < 30
    assert await s3.store().load(KEY) == entries(200, tag="pa")


async def test_a_late_retry_after_a_compaction_is_a_no_op(s3: S3Env) -> None:
    # contract 2: the write landed, its reply was lost, another host appended and
    # compacted the part away (its seqs now live in a checkpoint), then the retry.
    writer, other = s3.store(), compacting_store(s3)
    await writer.append_batch(KEY, batch("pa", 0, 3))
    expected = entries(3, tag="pa") + await fill(other, producer="pb")
    await other.compact(KEY)
    assert (await s3.sizes())["proj/sess/parts/000000000000.jsonl"] == 0  # blanked
    for retrier in (writer, s3.store()):
        assert await retrier.append_batch(KEY, batch("pa", 0, 3)) == Receipt(0, 2, len(expected))
    assert await s3.store().load(KEY) == expected


async def test_a_stale_writer_after_another_hosts_compaction_loses_nothing(s3: S3Env) -> None:
    # The offset the stale writer caches as the end was written by another host and
    # compacted into a segment; the put there must fail, not land as a leftover.
    stale, other = s3.store(length_cache_ttl=3600), compacting_store(s3)
    await stale.append_batch(KEY, batch("pa", 0, 2))  # caches end 2
    theirs = await fill(other, producer="pb")
    await other.compact(KEY)
    assert (await s3.sizes())["proj/sess/parts/000000000002.jsonl"] == 0  # covered
    receipt = await stale.append_batch(KEY, batch("pa", 2, 2, expect=1))
    assert receipt == Receipt(2, 3, 2 + len(theirs) + 2)
    expected = entries(2, tag="pa") + theirs + entries(2, 2, tag="pa")
    assert await s3.store().load(KEY) == expected
    await stale.append(KEY, entries(1, tag="plain"))  # a plain append from a stale cache
    assert await s3.store().load(KEY) == expected + entries(1, tag="plain")


async def test_concurrent_compactions_while_another_host_appends_keep_marks_and_entries(
    s3: S3Env,
) -> None:
    # Two hosts compact the same key at once (same segments, same checkpoints),
    # while a third appends and retries; every entry stays once, every mark holds.
    first, second = compacting_store(s3), compacting_store(s3)
    appender = s3.store(compact_every=None)
    expected = await fill(appender, producer="pa", appends=20)
    seq = 40

    async def append_more() -> None:
        nonlocal seq, expected
        for i in range(30):
            count = 1 + i % 2
            expect = None if seq == 40 else seq - 1
            receipt = await appender.append_batch(KEY, batch("pb", seq, count, expect))
            again = await appender.append_batch(KEY, batch("pb", seq, count, expect))
            assert receipt.appended == count and again.appended == 0
            expected += entries(count, seq, tag="pb")
            seq += count

    for _ in range(3):
        await asyncio.gather(first.compact(KEY), second.compact(KEY), append_more())
    assert await s3.store().load(KEY) == expected
    fresh = s3.store()
    assert await fresh.producer_mark(KEY, "pa") == 38  # 20 batches: 39 entries
    assert await fresh.producer_mark(KEY, "pb") == seq - 1
    assert (await fresh.append_batch(KEY, batch("pa", 0, 39))).appended == 0
    assert (await fresh.append_batch(KEY, batch("pb", 40, seq - 40))).appended == 0
    await first.compact(KEY)
    assert await s3.store().load(KEY) == expected
    assert await s3.store().producer_mark(KEY, "pb") == seq - 1


# --- Summaries ------------------------------------------------------------


def folded(batches: list[list[Any]]) -> dict[str, Any]:
    summary = None
    for batch in batches:
        summary = fold_session_summary(summary, KEY, batch)
    assert summary is not None
    return summary["data"]


async def summary_of(store: S3Store) -> dict[str, Any]:
    [summary] = [s for s in await store.list_session_summaries("proj") if s["session_id"] == "sess"]
    return summary


def stamped(n: int, start: int = 0) -> list[Any]:
    return [
        {
            "type": "user",
            "uuid": f"u{i}",
            "timestamp": f"2024-01-01T00:00:{i:02d}.000Z",
            "customTitle": f"t{i}",
        }
        for i in range(start, start + n)
    ]


async def test_summary_folds_each_stored_entry_once(s3: S3Env) -> None:
    store = s3.store()
    await store.append_batch(KEY, Batch.of("pa", 0, stamped(3)))
    await store.append_batch(KEY, Batch.of("pa", 0, stamped(3)))  # a repeat
    await store.append_batch(KEY, Batch.of("pa", 2, stamped(4, 2), expect=2))  # 2 new
    await store.append(KEY, stamped(1, 6))
    await store.append(SUB, stamped(2, 40))  # subagents do not count
    summary = await summary_of(store)
    assert summary["data"] == folded([stamped(7)])
    [listed] = await store.list_sessions("proj")
    assert summary["mtime"] >= listed["mtime"]
    # And a fresh store reads the same from S3.
    assert (await summary_of(s3.store()))["data"] == summary["data"]


async def test_a_sidecar_left_behind_by_a_crash_catches_up(s3: S3Env) -> None:
    store = s3.store()
    await store.append(KEY, stamped(2))
    await store.close()
    # A process stored a part and died before its sidecar write.
    await s3.put(
        "proj/sess/parts/000000000002.jsonl", jsonl(stamped(3, 2)), Metadata={"entries": "3"}
    )
    other = s3.store(compact_every=None, compaction_windows=(4,), compaction_fanin=2)
    assert (await other.append_batch(KEY, Batch.of("pa", 5, stamped(1, 5)))).length == 6
    assert (await summary_of(other))["data"] == folded([stamped(6)])
    # Catching up reads compacted segments too.
    await s3.put(
        "proj/sess/parts/000000000006.jsonl", jsonl(stamped(3, 6)), Metadata={"entries": "3"}
    )
    await other.compact(KEY)
    third = s3.store()
    assert (await third.append_batch(KEY, Batch.of("pa", 9, stamped(1, 9)))).length == 10
    assert (await summary_of(third))["data"] == folded([stamped(10)])


async def test_a_new_transcript_does_not_inherit_an_old_sidecar(s3: S3Env) -> None:
    store = s3.store()
    await store.append(KEY, stamped(2))
    await store.close()
    sidecar = await s3.client.get_object(Bucket=BUCKET, Key=s3.prefix + "proj/@summaries/sess.json")
    async with sidecar["Body"] as body:
        old = await body.read()
    # The sidecar of a deleted session survived (a sidecar write from another
    # host racing the delete), and the session id comes back.
    fresh = s3.store()
    await fresh.delete(KEY)
    await s3.put("proj/@summaries/sess.json", old)
    await fresh.append(KEY, stamped(3, 30))
    assert (await summary_of(fresh))["data"] == folded([stamped(3, 30)])
    # A store that knows nothing of it checks the generation too.
    await s3.put("proj/@summaries/sess.json", old)
    other = s3.store()
    await other.append(KEY, stamped(1, 33))
    assert (await summary_of(other))["data"] == folded([stamped(4, 30)])


async def test_summary_writes_are_coalesced(s3: S3Env) -> None:
    store = s3.store(summary_delay=60)
    for i in range(5):
        await store.append(KEY, stamped(1, i))
    assert "proj/@summaries/sess.json" not in await s3.keys()  # still pending
    assert (await summary_of(store))["data"] == folded([stamped(5)])  # listing writes it


# --- Real faults, through DurableSessionStore (contract 2: exactly once) ------


@pytest.mark.parametrize("mode", ["reset", "blackhole", "delay", "drop_replies"])
async def test_exactly_once_through_a_network_fault(
    moto_env: S3Env, moto_server: MotoServer, make_durable: Make, mode: str
) -> None:
    proxy = await FaultProxy.start(moto_server.host, moto_server.port)
    try:
        backend = await S3Store.connect(
            BUCKET,
            moto_env.prefix,
            endpoint_url=f"http://{proxy.host}:{proxy.port}",
            session=SESSION,
            config=IMPATIENT,
            # Trust cached lengths and hold sidecar writes through the fault, so the
            # first call after the switch is a part PUT (it lands), not a HEAD or a
            # sidecar write whose lost reply would drop the cache before any PUT.
            summary_delay=60.0,
            length_cache_ttl=60.0,
            **CREDENTIALS,
        )
        direct = moto_env.store()  # reads S3 without the proxy
        store = make_durable(backend, max_batch_entries=10, call_timeout=2.0)
        expected: list[Any] = []
        for _ in range(3):
            batch = stamped(5, len(expected))
            await store.append(KEY, batch)
            expected += batch
        await store.flush(timeout=HANG_GUARD)
        assert await direct.length(KEY) == 15

        # A delayed reply is held 20x the read timeout: it cannot come back in time,
        # however loaded the machine (the client drops the connection on its timeout).
        proxy.set_mode(mode, **({"seconds": 10.0} if mode == "delay" else {}))  # type: ignore[arg-type]
        for _ in range(4):
            batch = stamped(7, len(expected))
            await store.append(KEY, batch)
            expected += batch
        await wait_for(lambda: _retried(store))
        if mode in ("delay", "drop_replies"):
            # The ambiguous failure: writes land, their replies never arrive.
            async def landed_unacked() -> bool:
                status = await store.status()
                acked = len(expected) - status["backends"][0]["pending_entries"]
                return await direct.length(KEY) > acked

            await wait_for(landed_unacked)
        else:
            assert await direct.length(KEY) == 15  # nothing got through
        proxy.set_mode("pass")
        await store.flush(timeout=HANG_GUARD)
        assert await direct.load(KEY) == expected
        await backend.close()  # writes its pending sidecar
        assert (await summary_of(direct))["data"] == folded([expected])
    finally:
        await proxy.close()


async def _retried(store: DurableSessionStore) -> bool:
    status = await store.status()
    return bool(status["backends"][0]["retries"])


async def test_a_restarted_server_that_lost_data_says_mark_behind() -> None:
    # moto keeps objects in memory: after a SIGKILL and a restart it has lost
    # everything, marks included. A producer that was told its entries were stored
    # (expect) learns the backend lost them, and nothing is written after the hole.
    server = MotoServer()
    server.start()
    prefix = f"walmirror-test-{uuid.uuid4().hex}/"

    async def connect() -> S3Store:
        return await S3Store.connect(
            BUCKET,
            prefix,
            endpoint_url=server.endpoint_url,
            session=SESSION,
            config=NO_RETRIES,  # a dead server refuses or resets at once
            length_cache_ttl=0.0,  # confirm the cached end before every append
            **CREDENTIALS,
        )

    store, operator = await connect(), await connect()
    try:
        await ensure_bucket(operator.client)
        await store.append_batch(KEY, batch("pa", 0, 3))
        server.kill()
        server.start()  # same port, nothing in it
        await ensure_bucket(operator.client)
        deadline = time.monotonic() + HANG_GUARD
        with pytest.raises(MarkBehindError) as caught:
            while time.monotonic() < deadline:  # the first call may meet the dead connection
                try:
                    await store.append_batch(KEY, batch("pa", 3, 2, expect=2))
                except MarkBehindError:
                    raise
                except Exception:
                    await asyncio.sleep(0.05)
                else:
                    break  # accepted: the loss went unnoticed, and the test fails
        assert caught.value.mark is None and caught.value.expect == 2
        assert await operator.load(KEY) is None
        with pytest.raises(MarkBehindError):  # a store that never cached the key agrees
            await operator.append_batch(KEY, batch("pa", 3, 2, expect=2))
    finally:
        await store.close()
        await operator.close()
        server.stop()
