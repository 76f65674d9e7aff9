"""Hostile tests, session 5: the orjson fast paths of ``encode_entry``/``decode_array``,
the flusher's refilling slots (``_deliver_keys``) and the inlined ``UuidLedger.claim``.

Contracts attacked:

* encoding: what ``encode_entry``/``check_encodable`` accept and refuse is what
  ``json.dumps(allow_nan=False)`` accepts and refuses; ``check_encodable`` refuses
  with ``InvalidEntryError`` only; values read back are ``json.loads``'s, types
  included;
* decoding: ``decode_array(text)`` gives exactly ``json.loads(text)`` (same values,
  same types, same acceptance);
* the flusher: exactly once, in order, per key; one bad key never stops the
  others; an outage costs one failed call per slot, not one per queued key;
  deletes go before later appends;
* the ledger: an entry whose uuid its key already holds is skipped; a hash
  collision never drops an entry.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import math
import random
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from claude_agent_sdk.types import SessionKey
from memory_store import MemoryStore

from walmirror import DurableSessionStore, InvalidEntryError, ledger
from walmirror.backends import file as file_backend
from walmirror.backends import s3 as s3_backend
from walmirror.faults import FaultyStore
from walmirror.ledger import UuidLedger
from walmirror.protocol import Batch, check_encodable, decode_array, encode_entry

TUNING: dict[str, Any] = {
    "backoff_initial": 0.01,
    "backoff_max": 0.1,
    "breaker_threshold": 2,
    "probe_interval": 0.02,
}


def key(n: int | str) -> SessionKey:
    return {"project_key": "proj", "session_id": f"s{n}"}


def stdlib(entry: Any) -> bytes:
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def identical(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down, floats' signs and key order included
    (iterative: the values can nest a thousand levels)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if math.isnan(x) != math.isnan(y):
                return False
            if not math.isnan(x) and (x != y or math.copysign(1.0, x) != math.copysign(1.0, y)):
                return False
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, dict):
            if list(x) != list(y):
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif x != y:
            return False
    return True


def outcome_of(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except Exception as exc:  # the type is what is compared
        return "error", exc


async def eventually(check: Callable[[], Awaitable[bool]], guard: float = 20.0) -> None:
    """Wait until ``check()`` holds; ``guard`` only stops a hang (no timing asserted)."""
    deadline = time.monotonic() + guard
    while not await check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


# -- encoding: acceptance and refusal as json.dumps ---------------------------------------


def test_a_fragment_holding_invalid_json_is_refused_with_a_type_error_like_json_dumps() -> None:
    """Contract: ``encode_entry`` accepts and refuses what ``json.dumps(allow_nan=False)``
    does, and "raises TypeError/ValueError/RecursionError like json.dumps".
    ``json.dumps`` refuses every ``orjson.Fragment`` with ``TypeError``; the fast path
    writes the fragment's raw bytes, then ``orjson.loads`` of them raises
    ``orjson.JSONDecodeError``, which ``_fast_encode`` does not catch (it only catches
    ``JSONEncodeError`` around ``dumps``), so a ``JSONDecodeError`` escapes instead."""
    for raw in (b"NaN", b"{", b"1,", b"[1"):
        entry = {"a": orjson.Fragment(raw)}
        with pytest.raises(TypeError):
            stdlib(entry)
        with pytest.raises(TypeError):
            encode_entry(entry)


def test_check_encodable_refuses_an_invalid_fragment_with_invalid_entry_error() -> None:
    """Contract: ``check_encodable`` refuses an unserialisable entry with
    ``InvalidEntryError`` (a message that never quotes the entry). A fragment with
    invalid JSON makes ``_fast_encode`` raise ``orjson.JSONDecodeError`` outside
    ``check_encodable``'s try block: the caller of ``DurableSessionStore.append``
    gets a raw ``JSONDecodeError`` whose ``doc`` attribute holds the entry's text."""
    secret = "top-secret-transcript-text"
    entry = {"note": secret, "a": orjson.Fragment(b"NaN")}
    with pytest.raises(InvalidEntryError):
        check_encodable(0, entry)


async def test_append_refuses_an_invalid_fragment_with_invalid_entry_error(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Contract: ``append`` refuses an entry ``json.dumps`` refuses with
    ``InvalidEntryError`` and stores nothing of the batch. With an
    ``orjson.Fragment(b"NaN")`` value, ``append`` raises ``orjson.JSONDecodeError``
    (not an ``InvalidEntryError``) from ``protocol._fast_encode``."""
    inner = MemoryStore()
    store = make_durable(inner, **TUNING)
    with pytest.raises(InvalidEntryError):
        await store.append(key(1), [{"ok": 1}, {"a": orjson.Fragment(b"NaN")}])
    await store.append(key(1), [{"n": 2}])
    await store.flush(10)
    assert await inner.load(key(1)) == [{"n": 2}]


class IntE(enum.IntEnum):
    A = 7


class StrE(str, enum.Enum):  # noqa: UP042 - the str mixin is the point
    A = "v"


class FloatE(float, enum.Enum):
    A = 1.0
    B = 2.5


class MyInt(int):
    def __eq__(self, other: object) -> bool:  # lies: equal to everything
        return True

    __hash__ = int.__hash__


class MyStr(str):
    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


class MyDict(dict):  # type: ignore[type-arg]
    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


class Plain:
    pass


def _circular() -> dict[str, Any]:
    a: dict[str, Any] = {"x": 1}
    a["self"] = a
    return a


def _nested(levels: int, kind: str = "list") -> dict[str, Any]:
    value: Any = 1
    for _ in range(levels - 1):
        value = [value] if kind == "list" else (value,) if kind == "tuple" else {"k": value}
    return {"v": value}


ODD_ENTRIES: list[tuple[str, Any]] = [
    ("neg-zero", {"a": -0.0}),
    ("neg-zero-list", {"a": [-0.0, 0.0]}),
    ("true-vs-one", {"a": True, "b": 1, "c": 1.0, "d": False, "e": 0}),
    ("u64-max", {"a": 2**64 - 1}),
    ("u64-max+1", {"a": 2**64}),
    ("i64-min", {"a": -(2**63)}),
    ("i64-min-1", {"a": -(2**63) - 1}),
    ("huge-int", {"a": 10**400}),
    ("big-float", {"a": 1.7976931348623157e308}),
    ("denormal", {"a": 5e-324, "b": -5e-324}),
    ("float-as-int-text", {"a": 1e16, "b": 1e22, "c": 2.0**63, "d": 2.0**64, "e": 123e18}),
    ("nan", {"a": float("nan")}),
    ("inf", {"a": float("inf")}),
    ("nan-in-list", {"a": [1, float("nan")]}),
    ("inf-in-tuple", {"a": (1, -float("inf"))}),
    ("nested-tuples", {"a": ((1, (2, 3)), [4, (5,)])}),
    ("ordered-dict-value", {"a": collections.OrderedDict(b=1, a=2)}),
    ("int-enum", {"a": IntE.A}),
    ("str-enum", {"a": StrE.A}),
    ("float-enum", {"a": FloatE.A, "b": FloatE.B}),
    ("int-subclass-liar", {"a": MyInt(3)}),
    ("str-subclass-liar", {"a": MyStr("x")}),
    ("dict-subclass-liar", {"a": MyDict(x=1)}),
    ("str-subclass-key", {MyStr("k"): 1}),
    ("non-str-keys", {1: "a", 2.5: "b", False: "c", None: "d"}),
    ("int-and-str-key", {1: "a", "1": "b"}),
    ("nan-key", {float("nan"): 1}),
    ("plain-object", {"a": Plain()}),
    ("bytes", {"a": b"x"}),
    ("set", {"a": {1}}),
    ("lone-surrogate", {"a": "\ud800", "b": "x\udfff"}),
    ("surrogate-key", {"\udc00": 1}),
    ("controls", {"a": "\x00\x1f\x7f\u2028\u2029\ufeff"}),
    ("circular", _circular()),
    ("fragment-valid", {"a": orjson.Fragment(b"1")}),
    ("depth-254", _nested(254)),
    ("depth-255", _nested(255)),
    ("depth-256", _nested(256)),
    ("depth-499-dicts", _nested(499, "dict")),
    ("depth-500-tuples", _nested(500, "tuple")),
]


@pytest.mark.parametrize(("name", "entry"), ODD_ENTRIES, ids=[n for n, _ in ODD_ENTRIES])
def test_odd_values_are_accepted_and_refused_as_json_dumps_does(name: str, entry: Any) -> None:
    """Contract: ``encode_entry`` accepts exactly what ``json.dumps(allow_nan=False)``
    accepts (refusing with the same exception family), and what it writes reads back
    (``json.loads`` and ``decode_array``) to the very values ``json.dumps``'s text
    does, types and float signs included."""
    expected = outcome_of(lambda: stdlib(entry))
    actual = outcome_of(lambda: encode_entry(entry))
    if expected[0] == "error" and isinstance(expected[1], UnicodeEncodeError):
        # A lone surrogate: written with \uXXXX escapes instead (documented).
        expected = ("ok", json.dumps(entry, separators=(",", ":"), allow_nan=False).encode())
    assert actual[0] == expected[0], (name, expected, actual)
    if expected[0] == "error":
        for family in (TypeError, ValueError, RecursionError):
            assert isinstance(actual[1], family) == isinstance(expected[1], family), (
                name,
                expected[1],
                actual[1],
            )
        return
    want = json.loads(expected[1])
    assert identical(json.loads(actual[1]), want), name
    assert identical(decode_array(actual[1]), want), name


@pytest.mark.parametrize("levels", [254, 255, 256, 499, 500, 501, 700])
@pytest.mark.parametrize("kind", ["list", "dict", "tuple"])
def test_check_encodable_depth_limit_is_the_same_on_both_paths(levels: int, kind: str) -> None:
    """Contract: ``check_encodable`` refuses an entry nested deeper than
    ``MAX_ENTRY_DEPTH`` (500, the entry object counted) whichever path encodes it, and
    accepts any shallower one; the fast path (which skips the depth check) must never
    take an entry past the limit. Lists and dicts hold at 254/255/500/501. Tuples do
    not: an entry with a tuple never takes the fast path (a tuple reads back as a
    list, so ``==`` fails) and ``protocol.too_deep`` follows a dict's values only when
    they are ``dict | list`` (the list/tuple branch does follow tuples), so
    ``{"v": ((...(1,)...),)}`` with 500..950 nested tuples is accepted (depth
    501..951). Expected: ``InvalidEntryError`` past 500."""
    entry = _nested(levels, kind)
    depth = levels  # {"v": [..]}: the outer dict plus levels - 1 containers
    if depth > 500:
        with pytest.raises(InvalidEntryError):
            check_encodable(0, entry)
    else:
        body = check_encodable(0, entry)
        assert identical(json.loads(body), json.loads(stdlib(entry)))


def test_random_floats_keep_their_type_value_and_sign() -> None:
    """Contract: a float written by the fast path reads back (``json.loads`` and
    ``decode_array``) as the same float, never as an int or with its sign lost;
    NaN and the infinities are refused with ``ValueError``."""
    rnd = random.Random(5)
    floats = [
        struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(20000)
    ]
    floats += [float(f"1e{e}") for e in range(-324, 309)] + [-0.0, 0.0, 2.0**53 + 2, 1e15 + 0.5]
    for f in floats:
        entry = {"f": f, "l": [f]}
        if not math.isfinite(f):
            with pytest.raises(ValueError):
                encode_entry(entry)
            continue
        body = encode_entry(entry)
        assert identical(json.loads(body), entry), f
        assert identical(decode_array(body), entry), f


# -- decoding: decode_array is json.loads ------------------------------------------------

DECODE_CASES: list[bytes] = [
    b"-0",
    b"[-0]",
    b"-0.0",
    b"[-0e0, -0E+0, -0.0e-0]",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"-1e-400",
    b"[1E5, 1e+5, 1e-5]",
    b"18446744073709551615",
    b"18446744073709551616",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"-9223372036854775809",
    b"123456789012345678",
    b"-123456789012345678",
    b"999999999999999999",
    b"[1.2345678901234567890]",
    b"[123456789.123456789123]",
    b"[900719925474099.35]",
    b"[9007199254740993.0]",
    b"9007199254740993e0",
    b"[2.2250738585072011e-308]",
    b"[2.4703282292062327e-324, 2.4703282292062328e-324]",
    b"[1.7976931348623158e308, 1.7976931348623159e308]",
    b"[1e0000000000000000001]",
    b"[1e-0000000000000000000005]",
    b'{"n": "1234567890123456789", "m": 1}',
    b'{"n": "12345678901234567890123", "m": 18446744073709551615}',
    b" [1] ",
    b"\t[1]\n\r",
    b"\xef\xbb\xbf[1]",
    b"\xa0[1]",
    b"[1,\x0c2]",
    b'{"a":1,"a":2}',
    b'{"a":1,"b":0,"a":2}',
    b'{"a":{"x":1},"a":[2]}',
    b'"\\ud800"',
    b'["\\ud83d\\ude00", "\\udc00\\ud800"]',
    b'{"\\ud800":1}',
    b"NaN",
    b"[Infinity, -Infinity]",
    b'"\x00"',
    b'"\x1f"',
    b'"\x7f"',
    b'"\xed\xa0\x80"',
    b'"\xc0\x80"',
    b'"\xff"',
    b"01",
    b"1.",
    b".5",
    b"+1",
    b"1e",
    b"[1,]",
    b'{"a":1,}',
    b"",
    b" ",
    b"[1] x",
    b"[1]\x00",
    b'{"a":1}{"b":2}',
    b"[true, false, null]",
    b"[True]",
    b'"\\x"',
    b'"\\/"',
    b"[" * 300 + b"]" * 300,
    b"[" * 1100 + b"]" * 1100,
    b'{"a":' * 600 + b"1" + b"}" * 600,
]


@pytest.mark.parametrize("text", DECODE_CASES, ids=[repr(t[:40]) for t in DECODE_CASES])
def test_decode_array_gives_what_json_loads_gives(text: bytes) -> None:
    """Contract: ``decode_array(text)`` accepts and refuses what ``json.loads(text)``
    does and gives identical values (int stays int, -0.0 keeps its sign, the last of
    duplicate keys wins at the first one's place)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 5000))  # for ``identical`` on deep values
    try:
        expected = outcome_of(lambda: json.loads(text))
        actual = outcome_of(lambda: decode_array(text))
        assert actual[0] == expected[0], (expected, actual)
        if expected[0] == "ok":
            assert identical(actual[1], expected[1])
        else:
            assert isinstance(actual[1], ValueError | RecursionError)
    finally:
        sys.setrecursionlimit(limit)


def test_decode_array_reads_random_numbers_as_json_loads() -> None:
    """Contract: numbers with up to 18-digit runs (orjson's side of the 19-digit
    switch), split by a decimal point and with large exponents, read exactly as
    ``json.loads`` reads them."""
    rnd = random.Random(11)
    parts = []
    for _ in range(20000):
        ip = str(rnd.randint(0, 10 ** rnd.randint(1, 18) - 1))
        text = ip
        if rnd.random() < 0.7:
            text += "." + "".join(rnd.choice("0123456789") for _ in range(rnd.randint(1, 18)))
        if rnd.random() < 0.6:
            text += rnd.choice("eE") + rnd.choice(["", "+", "-"]) + str(rnd.randint(0, 340))
        if rnd.random() < 0.5:
            text = "-" + text
        parts.append(text)
    for start in range(0, len(parts), 500):
        text = ("[" + ",".join(parts[start : start + 500]) + "]").encode()
        assert identical(decode_array(text), json.loads(text))


def test_backend_line_parsers_keep_big_ints_and_digit_strings() -> None:
    """Contract: FileStore's ``_decode_lines``, S3Store's ``_parse_lines`` and
    ``Batch.entries`` give ``json.loads``'s values: a 20-digit int stays an exact int,
    a string of 19+ digits is a string, and -0 / -0.0 keep their types."""
    entries = [
        {"uuid": "u1", "n": 18446744073709551615, "s": "12345678901234567890123"},
        {"uuid": "u2", "n": -(2**63) - 1, "f": -0.0, "i": 0},
        {"uuid": "u3", "x": 2**70, "y": 1e300, "z": [True, 1, 1.0]},
        {"uuid": "u4", "ls": "\ud800"},
    ]
    bodies = [encode_entry(e) for e in entries]
    want = [json.loads(b) for b in bodies]
    k = key("parse")
    got_file = file_backend._decode_lines(k, b"\n".join(bodies) + b"\n", len(bodies))
    got_s3 = s3_backend._parse_lines(k, bodies)
    batch = Batch("p", 0, bodies)
    for got in (got_file, got_s3, batch.entries):
        assert identical(got, want)
    for i in range(len(bodies)):
        assert identical(batch._decode(i), want[i])


# -- the ledger --------------------------------------------------------------------------


def _rows(*uuids: str | None) -> list[tuple[str | None, bytes, int]]:
    return [(u, json.dumps({"uuid": u}).encode(), 0) for u in uuids]


def test_a_uuid_claimed_earlier_in_the_transaction_is_skipped_after_its_key_was_trimmed() -> None:
    """Contract: an entry whose uuid the key already holds is skipped. Within one
    transaction (no ``saved()`` yet), key 1 claims ``U``; a large claim for key 2
    pushes the ledger past ``max_hashes`` and ``_trim`` drops key 1's hashes; key 1
    claims ``U`` again: ``_hashes`` reloads key 1 from ``load`` (the persisted
    ledger, which does not hold ``U`` yet), so ``U``'s hash is not found, ``_unsaved``
    is never consulted and ``claim`` returns ``U`` as new: the queue would store the
    entry twice. Expected: ``[]``."""
    persisted: dict[int, list[str]] = {}
    held = UuidLedger(lambda key_id: list(persisted.get(key_id, [])), max_hashes=5)
    assert [r[0] for r in held.claim(1, _rows("U"))] == ["U"]
    held.claim(2, _rows(*(f"k2-{n}" for n in range(10))))  # evicts key 1 from memory
    assert [r[0] for r in held.claim(1, _rows("U", "V"))] == ["V"]


def test_hash_collisions_across_calls_of_one_transaction_drop_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Contract: a hash collision never drops an entry, and a real repeat is skipped,
    whether the held uuid is persisted, claimed earlier in the same transaction
    (unsaved), claimed earlier in the same call, or merged into the sorted array."""
    monkeypatch.setattr(ledger, "hash", lambda u: 7 if u.startswith("c") else len(u), raising=False)
    persisted: list[str] = ["c-old"]
    held = UuidLedger(lambda key_id: list(persisted))
    # a collision with a persisted uuid, then a repeat of the persisted one
    assert [r[0] for r in held.claim(1, _rows("c-new", "c-old", None, "c-new"))] == ["c-new", None]
    # same transaction: a colliding newcomer, a repeat of an unsaved uuid
    assert [r[0] for r in held.claim(1, _rows("c-2", "c-new", "c-3"))] == ["c-2", "c-3"]
    held.saved()
    persisted.extend(["c-new", "c-2", "c-3"])
    # enough plain uuids to merge ``recent`` into ``merged`` (over 1024)
    many = [f"x{n:05d}" for n in range(1500)]
    assert len(held.claim(1, _rows(*many))) == 1500
    held.saved()
    persisted.extend(many)
    again = held.claim(1, _rows("c-4", *many[:3], "c-old", "x99999", "c-4"))
    assert [r[0] for r in again] == ["c-4", "x99999"]


class Uuid(str):
    """A str subclass with its own ``__eq__`` (so, as Python makes it, unhashable)."""

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]


async def test_a_str_subclass_uuid_is_accepted_and_its_repeat_skipped(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Contract: ``append`` accepts what ``json.dumps`` accepts, and an entry whose uuid
    the key already holds is skipped. ``{"uuid": Uuid("u1")}`` (a ``str`` subclass
    with its own ``__eq__``) encodes as ``{"uuid":"u1"}``, but ``serialize_entries``
    hands the subclass object to ``UuidLedger.claim``, whose ``uuid in claimed`` /
    ``hash(uuid)`` raise ``TypeError: unhashable type``: ``append`` fails. Expected:
    stored once; the plain ``"u1"`` repeat after it skipped."""
    inner = MemoryStore()
    store = make_durable(inner, **TUNING)
    k = key("uuid-subclass")
    assert stdlib({"uuid": Uuid("u1")}) == b'{"uuid":"u1"}'
    await store.append(k, [{"uuid": Uuid("u1"), "n": 1}])
    await store.append(k, [{"uuid": "u1", "n": 2}, {"uuid": "u2", "n": 3}])
    await store.flush(10)
    assert await inner.load(k) == [{"uuid": "u1", "n": 1}, {"uuid": "u2", "n": 3}]


# -- the flusher ---------------------------------------------------------------------------


class Recorder:
    """Wraps a ``FaultyStore``'s ``append_batch`` and ``ping`` on the instance, logging
    each call with whether it failed, in order."""

    def __init__(self, faulty: Any) -> None:
        self.log: list[tuple[str, bool]] = []
        self.after_ok: Callable[[int], None] | None = None
        self.ok = 0
        inner_append, inner_ping = faulty.append_batch, faulty.ping

        async def append_batch(k: SessionKey, batch: Batch) -> Any:
            try:
                receipt = await inner_append(k, batch)
            except Exception:
                self.log.append(("append_batch", False))
                raise
            self.log.append(("append_batch", True))
            self.ok += 1
            if self.after_ok is not None:
                self.after_ok(self.ok)
            return receipt

        async def ping() -> None:
            try:
                await inner_ping()
            except Exception:
                self.log.append(("ping", False))
                raise
            self.log.append(("ping", True))

        faulty.append_batch = append_batch
        faulty.ping = ping


async def _queue_up(
    store: DurableSessionStore, faulty: Any, keys: int, per_key: int, *, interleaved: bool
) -> dict[int, list[dict[str, Any]]]:
    """Append ``per_key`` single-entry appends to each of ``keys`` keys while the backend
    is down: interleaved (each key's oldest pending entry takes turns) or key by key
    (a key's entries are all older than the next key's, so a slot keeps its key)."""
    faulty.down()
    sent: dict[int, list[dict[str, Any]]] = {n: [] for n in range(keys)}
    order = (
        [(n, i) for i in range(per_key) for n in range(keys)]
        if interleaved
        else [(n, i) for n in range(keys) for i in range(per_key)]
    )
    for n, i in order:
        entry = {"uuid": f"k{n}-{i}", "n": i}
        sent[n].append(entry)
        await store.append(key(n), [entry])
    return sent


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "key-by-key"])
async def test_an_outage_mid_round_costs_one_failed_call_per_slot(interleaved: bool) -> None:
    """Contract: an outage costs one failed call per slot, not one per queued key (nor
    one per retry of a key). 6 keys, 2 slots, 1 entry per batch: the backend goes
    down after 4 successful batches, in the middle of a round whose slots have
    each already delivered their key once. In ``Flusher._deliver_keys`` the failed
    outcome of a key that got through earlier in the round is merged into
    ``replace(outcome, delivered=..., done=True)`` (the error kept), so the slot
    neither stops the key nor turns ``refill`` off: it takes the same key again and
    again (and ``_judge`` sees ``done`` and never asks ``ping``), each time a failed
    call, until ``ROUND_SECONDS`` pass. Expected: at most one failed ``append_batch``
    per slot before the round ends, so at most 2 rounds x 2 slots before the first
    health call. Interleaved appends (each key delivers once per round, so a failing
    key never got through before in the round) pass; key-by-key appends (a slot
    keeps its key) fail with thousands of failed calls before the first ping."""
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    rec = Recorder(faulty)
    with tempfile.TemporaryDirectory() as tmp:
        store = DurableSessionStore(
            faulty,
            Path(tmp) / "q.db",
            max_parallel_keys=2,
            max_batch_entries=1,
            backoff_initial=0.05,
            backoff_max=0.2,
            breaker_threshold=100,
            probe_interval=0.05,
        )
        try:
            sent = await _queue_up(store, faulty, keys=6, per_key=8, interleaved=interleaved)
            rec.log.clear()

            def down_after(ok: int) -> None:
                if ok == 4:
                    faulty.down()

            rec.after_ok = down_after
            faulty.up()
            await eventually(lambda: _true(any(op == "ping" and not ok for op, ok in rec.log)))
            first_ping = next(i for i, (op, ok) in enumerate(rec.log) if op == "ping" and not ok)
            failed_before_ping = sum(
                1 for op, ok in rec.log[:first_ping] if op == "append_batch" and not ok
            )
            rec.after_ok = None
            faulty.up()
            await store.flush(20)
            for n, entries in sent.items():
                assert await inner.load(key(n)) == entries
            assert failed_before_ping <= 4, (
                f"{failed_before_ping} failed append_batch calls before the first health call"
            )
        finally:
            await store.close(timeout=1)


async def _true(value: bool) -> bool:
    return value


async def test_many_keys_more_than_slots_with_lost_replies_arrive_once_in_order(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Contract: exactly once, in order, per key, with more keys than slots (the slots
    refill from ``pending_keys``), small batches, and a backend that loses a quarter
    of its replies after writing (every retry must be skipped by the marks)."""
    inner = MemoryStore()
    faulty = FaultyStore(inner, seed=3, lost_reply_rate=0.25, writes_only=True)
    store = make_durable(faulty, max_parallel_keys=3, max_batch_entries=2, **TUNING)
    sent: dict[int, list[dict[str, Any]]] = {n: [] for n in range(25)}

    async def writer(n: int) -> None:
        for i in range(12):
            entries = [{"uuid": f"{n}-{i}-{j}", "i": i, "j": j} for j in range(1 + (n + i) % 3)]
            sent[n].extend(entries)
            await store.append(key(n), entries)
            if i % 4 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(writer(n) for n in range(25)))
    await store.flush(25)
    for n, entries in sent.items():
        assert await inner.load(key(n)) == entries, n


async def test_a_key_failing_after_its_first_batch_never_stops_the_others(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Contract: one bad key never stops the others. The bad key delivers its first
    batch in a round, then every later batch fails retryably (the path where its
    failure is merged with its earlier success in ``_deliver_keys``); with one slot
    only, every other key must still get through, exactly once and in order, and the
    bad key's first batch must be stored once."""
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    original = faulty.append_batch

    async def append_batch(k: SessionKey, batch: Batch) -> Any:
        if k["session_id"] == "sbad" and min(e["n"] for e in batch.entries) >= 1:
            raise ConnectionError("refused (test)")
        return await original(k, batch)

    faulty.append_batch = append_batch
    store = make_durable(faulty, max_parallel_keys=1, max_batch_entries=1, **TUNING)
    bad = key("bad")
    for i in range(5):
        await store.append(bad, [{"n": i}])
    for n in range(6):
        await store.append(key(n), [{"n": i} for i in range(3)])

    async def others_done() -> bool:
        for n in range(6):
            if await inner.load(key(n)) != [{"n": i} for i in range(3)]:
                return False
        return True

    await eventually(others_done)
    assert await inner.load(bad) == [{"n": 0}]


async def test_deletes_racing_deliveries_go_before_later_appends(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Contract: a delete goes before the appends made after it, and never lets an
    entry appended before it resurface after it, while slots are busy refilling
    (deliveries in flight, the backend slow, several keys deleted mid-round)."""
    inner = MemoryStore()
    faulty = FaultyStore(inner, latency=0.002, seed=1)
    store = make_durable(faulty, max_parallel_keys=2, max_batch_entries=1, **TUNING)
    after: dict[int, list[dict[str, Any]]] = {}
    for n in range(6):
        await store.append(key(n), [{"before": i} for i in range(6)])
    await asyncio.sleep(0.02)  # some deliveries under way
    for n in range(6):
        if n % 2 == 0:
            await store.delete(key(n))
            after[n] = [{"after": i} for i in range(3)]
            for entry in after[n]:
                await store.append(key(n), [entry])
    await store.flush(20)
    for n in range(6):
        loaded = await inner.load(key(n))
        if n in after:
            assert loaded == after[n], n
        else:
            assert loaded == [{"before": i} for i in range(6)], n
