"""``walmirror.backends.fold_summary`` gives exactly what the SDK's ``fold_session_summary``
gives: the same summary, its ``data`` keys in the same order (so the stored JSON is the
same bytes), the same exception for what the SDK refuses, and ``prev`` left untouched."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from claude_agent_sdk import fold_session_summary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walmirror.backends as backends
from walmirror.backends import fold_batch, fold_summary
from walmirror.protocol import (
    HINT_CWD,
    HINT_FIELD,
    HINT_PARSE,
    HINT_TAG,
    HINT_TIMESTAMP,
    HINT_USER,
    SUMMARY_FIELDS,
    Batch,
    encode_entry,
    summary_hint,
)

KEY: Any = {"project_key": "proj", "session_id": "sess"}

# Values that hit each branch of the SDK's fold: strings it parses, strings it
# skips, and values of other JSON types.
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.text(max_size=4),
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.sampled_from(["type", "text"]), st.text(max_size=3), max_size=2),
)
_TIMESTAMPS = st.one_of(
    st.sampled_from(
        [
            "2025-01-01T00:00:00.000Z",
            "2025-06-30T12:34:56+02:00",
            "2024-02-29T23:59:59.999999",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "0001-01-01T00:00:00",
            "9999-12-31T23:59:59",
            "2025-13-01T00:00:00Z",
            "yesterday",
            "",
            "Z",
        ]
    ),
    _ANY,
)
_TEXTS = st.one_of(
    st.sampled_from(
        [
            "fix the parser",
            "  \n  ",
            "<command-name>/review</command-name> now",
            "<command-name></command-name>",
            "<local-command-stdout>x</local-command-stdout>",
            "[Request interrupted by user]",
            "<ide_opened_file>a.py</ide_opened_file>",
            "line one\nline two",
            "x" * 250,
            "",
        ]
    ),
    st.text(max_size=8),
)
_BLOCK = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _TEXTS}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "content": _TEXTS}),
    st.fixed_dictionaries({"type": st.just("image")}),
    _ANY,
)
_MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"])},
        optional={"content": st.one_of(_TEXTS, st.lists(_BLOCK, max_size=3), _ANY)},
    ),
    _ANY,
)
_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(
            st.sampled_from(["user", "assistant", "tag", "summary", "system", "custom-title"]),
            _ANY,
        ),
        "uuid": st.uuids().map(str),
        "timestamp": _TIMESTAMPS,
        "isSidechain": _ANY,
        "cwd": st.one_of(st.sampled_from(["/work", "", "/other"]), _ANY),
        "message": _MESSAGE,
        "isMeta": st.one_of(st.just(True), _ANY),
        "isCompactSummary": st.one_of(st.just(True), _ANY),
        "customTitle": st.one_of(st.sampled_from(["A", "B", ""]), _ANY),
        "aiTitle": st.one_of(st.sampled_from(["t1", "t2"]), _ANY),
        "lastPrompt": st.one_of(st.sampled_from(["p1", "p2"]), _ANY),
        "summary": st.one_of(st.sampled_from(["s1", "s2"]), _ANY),
        "gitBranch": st.one_of(st.sampled_from(["main", "dev", ""]), _ANY),
        "tag": st.one_of(st.sampled_from(["red", "", "blue"]), _ANY),
    },
)
_ENTRIES = st.lists(_ENTRY, max_size=12)
_NOT_A_DICT = st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.none()))


def _sdk(prev: Any, entries: list[Any]) -> tuple[Any, str | None]:
    try:
        return fold_session_summary(copy.deepcopy(prev), KEY, entries), None
    except Exception as exc:
        return None, type(exc).__name__


def _fast(prev: Any, entries: list[Any]) -> tuple[Any, str | None]:
    before = copy.deepcopy(prev)
    try:
        result: Any = fold_summary(prev, KEY, entries)
        error = None
    except Exception as exc:
        result, error = None, type(exc).__name__
    assert prev == before  # never mutates what it was given
    return result, error


def _same(prev: Any, entries: list[Any]) -> None:
    expected, expected_error = _sdk(prev, entries)
    got, error = _fast(prev, entries)
    assert error == expected_error
    if expected is not None:
        assert got == expected
        assert list(got) == list(expected)
        assert list(got["data"].items()) == list(expected["data"].items())  # key order too
        assert json.dumps(got) == json.dumps(expected)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=_ENTRIES, batch=_ENTRIES)
def test_same_as_the_sdk_fold_from_a_folded_prefix(head: list[Any], batch: list[Any]) -> None:
    """From no summary, and from the SDK's summary of an earlier batch."""
    _same(None, head + batch)
    prev = fold_session_summary(None, KEY, head) if head else None
    if prev is not None:
        prev["mtime"] = 1234  # what a store stamps; the fold keeps it
    _same(prev, batch)


# A stored summary's data: any of the fold's keys (and one it does not know), any values.
_STORED_DATA = st.dictionaries(
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
            "other",
        ]
    ),
    _ANY,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(data=_STORED_DATA, batch=_ENTRIES)
def test_same_as_the_sdk_fold_from_any_stored_summary(
    data: dict[str, Any], batch: list[Any]
) -> None:
    """A stored summary can hold anything (another version wrote it, a person edited it)."""
    _same({"session_id": "sess", "mtime": 7, "data": data}, batch)


@settings(max_examples=200, deadline=None)
@given(head=_ENTRIES, bad=_NOT_A_DICT, tail=_ENTRIES, at_start=st.booleans())
def test_refuses_what_the_sdk_refuses(
    head: list[Any], bad: Any, tail: list[Any], at_start: bool
) -> None:
    prev = fold_session_summary(None, KEY, head) if head and not at_start else None
    _same(prev, [bad, *tail] if at_start else [*head, bad, *tail])


def test_a_long_steady_batch_folds_only_what_can_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transcript-shaped entries: after the first, only the last ``gitBranch`` and the
    ``tag`` entry reach the SDK's fold, and the result is still the SDK's."""
    entries: list[Any] = [
        {
            "type": "assistant" if i % 2 else "user",
            "uuid": f"u{i}",
            "timestamp": "2025-01-01T00:00:00.000Z",
            "cwd": "/work",
            "gitBranch": "main" if i < 400 else "dev",
            "message": {"role": "user", "content": f"prompt {i}"},
        }
        for i in range(500)
    ]
    entries[250] = {"type": "tag", "tag": "red"}
    prev = fold_session_summary(None, KEY, entries[:1])
    expected = fold_session_summary(prev, KEY, entries)
    calls: list[int] = []

    def counting(prev: Any, key: Any, batch: list[Any]) -> Any:
        calls.append(len(batch))
        return fold_session_summary(prev, key, batch)

    monkeypatch.setattr(backends, "fold_session_summary", counting)
    assert fold_summary(prev, KEY, entries) == expected
    assert calls == [1]  # the tag entry; every gitBranch is a known key overwritten


def test_an_unknown_sdk_fold_is_used_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_FAST_FOLD", False)
    calls: list[int] = []

    def counting(prev: Any, key: Any, batch: list[Any]) -> Any:
        calls.append(len(batch))
        return fold_session_summary(prev, key, batch)

    monkeypatch.setattr(backends, "fold_session_summary", counting)
    entries: list[Any] = [{"type": "user", "message": {"content": "hi"}}] * 3
    assert fold_summary(None, KEY, entries) == fold_session_summary(None, KEY, entries)
    assert calls == [3]


def test_the_installed_sdk_fold_is_the_known_one() -> None:
    """The fast path is on for the SDK this project pins; a new SDK whose fold reads
    other fields turns it off (and this test tells to review ``fold_summary``)."""
    assert backends._sdk_fold_is_known()
    assert backends._FAST_FOLD


# -- fold_batch: the same fold, parsing only what the hints say can matter ---------------


def _hinted(entries: list[Any]) -> Batch:
    return Batch(
        "p", 0, [encode_entry(e) for e in entries], None, [summary_hint(e) for e in entries]
    )


def _same_batch(prev: Any, entries: list[Any], skip: int) -> None:
    expected, expected_error = _sdk(prev, entries[skip:])
    before = copy.deepcopy(prev)
    try:
        got: Any = fold_batch(prev, KEY, _hinted(entries), skip)
        error = None
    except Exception as exc:
        got, error = None, type(exc).__name__
    assert prev == before
    assert error == expected_error
    if expected is not None:
        assert json.dumps(got) == json.dumps(expected)  # values and key order


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=_ENTRIES, batch=_ENTRIES, skip=st.integers(0, 12))
def test_fold_batch_is_the_sdk_fold_from_a_folded_prefix(
    head: list[Any], batch: list[Any], skip: int
) -> None:
    skip = min(skip, len(batch))
    if batch:
        _same_batch(None, batch, skip)
    prev = fold_session_summary(None, KEY, head) if head else None
    if prev is not None and batch:
        prev["mtime"] = 1234
        _same_batch(prev, batch, skip)


@settings(max_examples=300, deadline=None)
@given(data=_STORED_DATA, batch=st.lists(_ENTRY, min_size=1, max_size=12))
def test_fold_batch_is_the_sdk_fold_from_any_stored_summary(
    data: dict[str, Any], batch: list[Any]
) -> None:
    _same_batch({"session_id": "sess", "mtime": 7, "data": data}, batch, 0)


def _transcript(n: int) -> list[Any]:
    return [
        {
            "type": "assistant" if i % 2 else "user",
            "uuid": f"u{i}",
            "timestamp": "2025-01-01T00:00:00.000Z",
            "cwd": "/work",
            "gitBranch": "main" if i < 400 else "dev",
            "message": {"role": "user", "content": f"prompt {i}"},
        }
        for i in range(n)
    ]


def test_fold_batch_parses_only_the_entries_that_can_change_a_settled_summary() -> None:
    """A settled summary and a transcript-shaped batch: only the tag entry and the last
    ``gitBranch`` are parsed. Every other body is replaced by bytes that are not JSON,
    which a parse would refuse; the fold is still the SDK's."""
    entries = _transcript(500)
    entries[250] = {"type": "tag", "tag": "red"}
    prev = fold_session_summary(None, KEY, entries[:1])
    expected = fold_session_summary(prev, KEY, entries)
    batch = _hinted(entries)
    garbled = [b if i in (250, 499) else b"not json" for i, b in enumerate(batch.encoded)]
    hinted = Batch("p", 0, garbled, None, batch.hints)
    assert fold_batch(prev, KEY, hinted) == expected
    with pytest.raises(ValueError):
        fold_batch(prev, KEY, Batch("p", 0, garbled, None))  # no hints: everything is parsed


def test_fold_batch_without_a_settled_summary_parses_everything() -> None:
    entries = _transcript(3)
    batch = _hinted(entries)
    garbled = Batch("p", 0, [batch.encoded[0], b"not json", batch.encoded[2]], None, batch.hints)
    with pytest.raises(ValueError):
        fold_batch(None, KEY, garbled)


def test_fold_batch_ignores_hints_when_the_sdk_fold_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backends, "_HINTS_KNOWN", False)
    entries = _transcript(4)
    prev = fold_session_summary(None, KEY, entries[:1])
    batch = _hinted(entries)
    garbled = Batch("p", 0, [*batch.encoded[:3], b"not json"], None, batch.hints)
    with pytest.raises(ValueError):
        fold_batch(prev, KEY, garbled)


def test_summary_hint_names_what_the_fold_reads() -> None:
    assert summary_hint({}) == 0
    assert summary_hint({"type": "tag", "tag": "x"}) == HINT_TAG
    assert summary_hint({"type": "user"}) == HINT_USER
    assert summary_hint({"timestamp": None}) == HINT_TIMESTAMP  # present is enough
    assert summary_hint({"cwd": ""}) == 0 and summary_hint({"cwd": "/w"}) == HINT_CWD
    assert summary_hint({"gitBranch": 3, "customTitle": "t"}) == HINT_FIELD["customTitle"]
    assert set(SUMMARY_FIELDS) == set(backends._LAST_WINS)


def test_an_entry_whose_values_are_not_plain_json_is_always_parsed() -> None:
    class Text(str):
        pass

    assert summary_hint({"type": Text("assistant")}) == HINT_PARSE
    assert summary_hint({"cwd": Text("/w")}) == HINT_PARSE
    assert summary_hint({"gitBranch": Text("main")}) == HINT_PARSE


def test_an_entry_to_parse_never_stands_for_the_last_holder_of_a_field() -> None:
    """Found by the session-6 attack: a ``HINT_PARSE`` entry after the newest title
    must not be taken for the entry holding it (the title would be lost)."""

    class Text(str):
        pass

    first = {"type": "user", "timestamp": "t", "cwd": "/w", "message": {"content": "p"}}
    prev = fold_session_summary(None, KEY, [{**first, "customTitle": "old"}])
    entries: list[Any] = [{"customTitle": "new"}, {"customTitle": "newer"}, {"type": Text("x")}]
    hints = [summary_hint(e) for e in entries]
    batch = Batch("p", 0, [encode_entry(e) for e in entries], None, hints)
    assert fold_batch(prev, KEY, batch)["data"]["custom_title"] == "newer"
