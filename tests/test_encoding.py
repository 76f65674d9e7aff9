"""The canonical encoding: ``encode_entry`` takes a fast path (orjson) only when its
bytes are exactly the entry's JSON value; whatever the stdlib's ``json.dumps`` would
refuse is still refused, and whatever it accepts gives back the same value.

The reference is the encoding walmirror has always used: ``json.dumps`` with
``ensure_ascii=False, allow_nan=False``, compact, and ``\\uXXXX`` escapes for a
string holding a lone surrogate.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import math
import uuid
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walmirror.errors import InvalidEntryError
from walmirror.protocol import MAX_ENTRY_DEPTH, Batch, check_encodable, encode_entry


def reference(entry: Any) -> bytes:
    """The stdlib encoding (what ``encode_entry`` wrote before the fast path)."""
    options: dict[str, Any] = {"separators": (",", ":"), "allow_nan": False}
    try:
        return json.dumps(entry, ensure_ascii=False, **options).encode()
    except UnicodeEncodeError:
        return json.dumps(entry, ensure_ascii=True, **options).encode()


def outcome(encode: Any, entry: Any) -> tuple[str, Any]:
    try:
        body = encode(entry)
    except (TypeError, ValueError, RecursionError) as exc:
        return "refused", type(exc)
    return "value", json.loads(body)


def same_value(a: Any, b: Any) -> bool:
    """Equal JSON values (NaN never gets this far: both refuse it)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# Everything JSON can hold, and more: floats of every kind (NaN, infinities, -0.0,
# subnormals), ints past 64 bits, lone surrogates and control characters, tuples,
# int keys, and values json refuses.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFFFF))
    | st.sampled_from([uuid.UUID(int=7), decimal.Decimal("1.5"), b"bytes", {1, 2}])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        | st.dictionaries(st.integers(), inner, max_size=2)
    ),
    max_leaves=20,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(entry=st.dictionaries(st.text(max_size=8), values, max_size=6))
def test_the_fast_path_refuses_and_accepts_exactly_what_json_does(entry: dict[str, Any]) -> None:
    got, want = outcome(encode_entry, entry), outcome(reference, entry)
    assert got[0] == want[0]
    if got[0] == "value":
        assert same_value(got[1], want[1])


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Tag(str):
    pass


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        -float("inf"),
        uuid.UUID(int=1),  # orjson writes these; json refuses them
        Colour.RED,
        datetime.datetime(2025, 1, 1),
        datetime.date(2025, 1, 1),
        Point(1),
        {1, 2},
        b"raw",
        object(),
    ],
    ids=[
        "nan",
        "inf",
        "-inf",
        "uuid",
        "enum",
        "datetime",
        "date",
        "dataclass",
        "set",
        "bytes",
        "object",
    ],
)
def test_what_json_refuses_is_refused_clearly(value: Any) -> None:
    with pytest.raises(InvalidEntryError, match="entry 0 of the batch"):
        check_encodable(0, {"type": "x", "deep": [{"v": value}]})


@pytest.mark.parametrize(
    "value",
    [
        Level.HIGH,  # an int subclass: json writes 3
        Tag("t"),  # a str subclass: json writes "t"
        OrderedDict(a=1),
        (1, 2),
        2**64 + 1,  # past orjson's integers
        -(2**63) - 1,
        "\ud800 lone",  # a lone surrogate: escaped, not UTF-8
        {7: "int key"},
        1e16,
        5e-324,
        -0.0,
    ],
    ids=[
        "intenum",
        "str-subclass",
        "ordereddict",
        "tuple",
        "u64+",
        "i64-",
        "surrogate",
        "int-key",
        "1e16",
        "subnormal",
        "negative-zero",
    ],
)
def test_what_json_accepts_keeps_its_value(value: Any) -> None:
    entry = {"type": "x", "v": value}
    body = encode_entry(entry)
    assert same_value(json.loads(body), json.loads(reference(entry)))
    if isinstance(value, float):
        assert math.copysign(1.0, json.loads(body)["v"]) == math.copysign(1.0, value)


def test_plain_entries_encode_to_the_same_bytes_as_json() -> None:
    entry = {
        "type": "assistant",
        "uuid": "u-1",
        "parentUuid": None,
        "message": {"content": [{"type": "text", "text": 'héllo "quoted" \\ \n\t\x01 \u2028 😀'}]},
        "usage": {"input_tokens": 4, "ratio": 0.25, "ok": True},
    }
    assert encode_entry(entry) == reference(entry)


@pytest.mark.parametrize("depth", [250, 260, MAX_ENTRY_DEPTH, MAX_ENTRY_DEPTH + 1])
def test_the_depth_limit_holds_on_both_paths(depth: int) -> None:
    """orjson stops at 254 levels: deeper entries go the stdlib's way, and the limit
    of MAX_ENTRY_DEPTH still holds there."""
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = [value]
    entry = {"v": value}
    if depth <= MAX_ENTRY_DEPTH:
        assert json.loads(check_encodable(0, entry)) == json.loads(reference(entry))
    else:
        with pytest.raises(InvalidEntryError, match="deeper than"):
            check_encodable(0, entry)


# -- decoding: the same values, the same types ---------------------------------------


def typed(value: Any) -> str:
    """A text that tells 1 from 1.0 (json.dumps writes each as it is)."""
    return json.dumps(value, sort_keys=True, allow_nan=True)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFFFF)),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(entries=st.lists(st.dictionaries(st.text(max_size=8), json_values), min_size=1, max_size=6))
def test_a_batch_parses_to_exactly_what_json_loads_gives(entries: list[dict[str, Any]]) -> None:
    """Integers past 64 bits stay integers, lone surrogates come back, floats keep
    every bit: whichever parser reads the batch."""
    encoded = [encode_entry(e) for e in entries]
    got = Batch(producer="p", first_seq=1, encoded=encoded).entries
    assert typed(got) == typed([json.loads(body) for body in encoded])


@pytest.mark.parametrize(
    "body",
    [
        b'{"n":18446744073709551616}',  # 2**64: a float to orjson
        b'{"n":-9223372036854775809}',
        b'{"n":123456789012345678901234567890}',
        b'{"s":"\\ud800"}',  # a lone surrogate, escaped
        b'{"f":1e400}',  # past a double: json gives inf
        b'{"f":0.1000000000000000055511151231257827}',
        b'{"a":1,"a":2}',
    ],
    ids=["u64+1", "i64-1", "30-digits", "surrogate", "1e400", "long-float", "duplicate-key"],
)
def test_the_edges_of_json_parse_as_json_parses_them(body: bytes) -> None:
    got = Batch(producer="p", first_seq=1, encoded=[body, body]).entries
    assert typed(got) == typed([json.loads(body)] * 2)


@pytest.mark.parametrize("body", [b'{"a":1},{"b":2}', b'{"a":', b"\xff", b'{"a":NaN}x'], ids=str)
def test_a_batch_with_a_damaged_entry_is_refused(body: bytes) -> None:
    batch = Batch(producer="p", first_seq=5, encoded=[b'{"ok":1}', body])
    with pytest.raises(InvalidEntryError, match="seq 6"):
        batch.entries  # noqa: B018


class Touchy(enum.Enum):
    """An enum member whose comparison raises: json.dumps refuses enums, so must append."""

    A = "a"

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparing")

    __hash__ = enum.Enum.__hash__


def test_a_value_whose_comparison_raises_is_refused_clearly() -> None:
    with pytest.raises(InvalidEntryError, match="not JSON-serialisable"):
        check_encodable(0, {"type": "x", "v": Touchy.A})
