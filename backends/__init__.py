"""Backends: one module per destination, each a ``SessionStore`` speaking ``walmirror.protocol``.

``from_url(url)`` builds a backend from a URL, for the ``walmirror`` command
and for configuration files:

* ``file:///abs/path`` or ``file:relative/path``: ``FileStore`` (JSONL files).
* ``redis://`` / ``rediss://`` / ``unix://``: ``RedisStore.from_url`` (``?prefix=``, ``?ttl=``).
* ``postgresql://`` / ``postgres://``: ``PostgresStore.from_url``, connecting on first use
  (``?table=``, ``?schema=``, ``?command_timeout=``, ``?connect_timeout=``).
* ``s3://bucket/prefix``: ``S3Store.from_url``, connecting on first use (``?endpoint_url=``,
  ``?region=``, ``?compact_every=``, ``?summary_delay=``, ``?length_cache_ttl=``,
  ``?max_concurrency=``); credentials from the AWS environment, never the URL.

Each remote backend's module is imported only when its scheme is asked for, so
its client library is needed only then (``pip install 'walmirror[redis]'`` ...).

``fold_summary`` is the SDK's ``fold_session_summary`` with the same result, run
only on the entries that can change a summary; ``fold_batch`` folds a protocol
batch with it, parsing only the entries its hints say can matter: the remote
backends fold every batch they store with these.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import reduce
from operator import or_
from types import CodeType
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry, SessionSummaryEntry

from walmirror.protocol import (
    HINT_CWD,
    HINT_FIELD,
    HINT_PARSE,
    HINT_TAG,
    HINT_TIMESTAMP,
    HINT_USER,
    SUMMARY_FIELDS,
    Batch,
)

__all__ = ["SUPPORTED_SCHEMES", "fold_batch", "fold_summary", "from_url"]

SUPPORTED_SCHEMES: tuple[str, ...] = ("file", "redis", "rediss", "postgresql", "s3")


def from_url(url: str) -> SessionStore:
    """The backend ``url`` names, or ``ValueError`` saying which URLs work.

    Error messages never repeat the URL: remote URLs can carry passwords.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _file_store(url)
    if scheme in ("redis", "rediss", "unix"):
        store: SessionStore = _remote("redis", "RedisStore").from_url(url)
        return store
    if scheme in ("postgresql", "postgres"):
        store = _remote("postgres", "PostgresStore").from_url(url)
        return store
    if scheme == "s3":
        store = _remote("s3", "S3Store").from_url(url)
        return store
    supported = ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
    what = f"scheme {scheme!r}" if scheme else "no scheme"
    raise ValueError(
        f"backend URL has {what}; supported: {supported} "
        "(file:///absolute/path or file:relative/path)"
    )


def _remote(module: str, class_name: str) -> Any:
    """A backend class, imported on demand, with a clear error when its extra is missing."""
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), class_name)
    except ImportError as exc:
        raise ValueError(
            f"this backend needs the {module} extra: pip install 'walmirror[{module}]' ({exc})"
        ) from None


def _file_store(url: str) -> SessionStore:
    from .file import FileStore  # imported here so other backends never load it

    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            "file:// URLs name a local directory: use file:///absolute/path "
            "(three slashes) or file:relative/path, not a host name"
        )
    if parts.query or parts.fragment:
        raise ValueError("file:// backend URLs take no query string or fragment")
    path = unquote(parts.path)
    if not path:
        raise ValueError("file:// backend URL has no path")
    return FileStore(path)


# -- summaries ------------------------------------------------------------------------

# What the SDK's ``fold_session_summary`` reads, as of claude-agent-sdk 0.2.x: its
# last-wins fields (entry key -> summary key) and the string constants of its code.
# ``fold_summary`` skips entries only while the installed SDK still matches.
_LAST_WINS = {
    "customTitle": "custom_title",
    "aiTitle": "ai_title",
    "lastPrompt": "last_prompt",
    "summary": "summary_hint",
    "gitBranch": "git_branch",
}
_LAST_WINS_KEYS = frozenset(_LAST_WINS)
_KNOWN_FOLD_CONSTANTS = {
    "fold_session_summary": frozenset(
        {
            "created_at",
            "cwd",
            "data",
            "dict[str, Any]",
            "isSidechain",
            "is_sidechain",
            "mtime",
            "session_id",
            "tag",
            "timestamp",
            "type",
        }
    ),
    "_fold_first_prompt": frozenset(
        {
            "\n",
            " ",
            "command_fallback",
            "content",
            "first_prompt",
            "first_prompt_locked",
            "isCompactSummary",
            "isMeta",
            "message",
            "tool_result",
            "type",
            "user",
            "\u2026",
        }
    ),
}


def _string_constants(code: CodeType, doc: str | None) -> frozenset[str]:
    found: set[str] = set()
    for const in code.co_consts:
        if isinstance(const, str) and const != doc:
            found.add(const)
        elif isinstance(const, CodeType):
            found |= _string_constants(const, None)
    return frozenset(found)


def _sdk_fold_is_known() -> bool:
    """True when the installed SDK's fold reads what ``fold_summary`` assumes it reads."""
    try:
        from claude_agent_sdk._internal import session_summary as sdk
    except ImportError:
        return False
    if getattr(sdk, "fold_session_summary", None) is not fold_session_summary:
        return False
    if getattr(sdk, "_LAST_WINS_FIELDS", None) != _LAST_WINS:
        return False
    for name, expected in _KNOWN_FOLD_CONSTANTS.items():
        function = getattr(sdk, name, None)
        code = getattr(function, "__code__", None)
        if not isinstance(code, CodeType):
            return False
        if _string_constants(code, getattr(function, "__doc__", None)) != expected:
            return False
    return True


_FAST_FOLD = _sdk_fold_is_known()
# The hints name the same last-wins fields (in any order), with their summary keys.
_HINTED_FIELDS = [(HINT_FIELD[src], dst) for src, dst in _LAST_WINS.items()]
_HINTS_KNOWN = _FAST_FOLD and set(SUMMARY_FIELDS) == set(_LAST_WINS)


def fold_summary(
    prev: SessionSummaryEntry | None,
    key: SessionKey,
    entries: Sequence[SessionStoreEntry],
) -> SessionSummaryEntry:
    """``fold_session_summary(prev, key, entries)``, the same result (the same ``data``,
    keys in the same order), with the SDK's fold run only on the entries that can change
    the summary.

    The SDK's fold sets ``is_sidechain``, ``created_at``, ``cwd`` and the first prompt
    once; later entries only overwrite the last-wins fields (``customTitle`` ->
    ``custom_title``, ...) and set or clear ``tag`` (``type`` "tag"). So once the
    set-once fields are settled, an entry without a last-wins field and not of type
    "tag" or (first prompt still open) "user" changes nothing, and of several entries
    setting a last-wins field that the summary already holds only the last one
    counts: overwriting a key keeps its place, and the fold reads none of these
    values. Every other entry (and any entry that is not a dict, which the SDK's fold
    refuses) goes through the SDK's own fold, in order. Falls back to the SDK's fold
    for the whole list when the installed SDK's fold is not the one this was written
    against.
    """
    if not _FAST_FOLD or len(entries) < 2:
        return fold_session_summary(prev, key, list(entries))
    current = prev
    data: dict[str, Any] = {} if prev is None else prev["data"]
    # Open: the set-once fields the fold may still set (recomputed after each SDK fold).
    side = created = cwd = prompt = settling = True
    refresh = True
    late: dict[str, str] = {}  # last-wins values to write at the end
    for entry in cast(Sequence[dict[str, Any]], entries):
        if refresh:
            side = "is_sidechain" not in data
            created = "created_at" not in data
            cwd = "cwd" not in data
            prompt = not data.get("first_prompt_locked")
            settling = side or created or cwd or prompt
            refresh = False
        if type(entry) is not dict:
            relevant = True
        else:
            kind = entry.get("type")
            relevant = kind == "tag" or (
                settling
                and (
                    side
                    or (prompt and kind == "user")
                    or (created and "timestamp" in entry)
                    or (cwd and bool(entry.get("cwd")))
                )
            )
            if not _LAST_WINS_KEYS.isdisjoint(entry):
                found: list[tuple[str, str]] = []
                for src in _LAST_WINS_KEYS.intersection(entry):
                    value = entry[src]
                    if isinstance(value, str):
                        dst = _LAST_WINS[src]
                        found.append((dst, value))
                        if dst not in data:
                            relevant = True
                if relevant:
                    for dst, _ in found:
                        late.pop(dst, None)  # the SDK's fold writes it below
                else:
                    late.update(found)
        if relevant:
            current = fold_session_summary(current, key, [cast(SessionStoreEntry, entry)])
            data = current["data"]
            refresh = True
    if current is None:  # pragma: no cover - without prev, the first entry is always folded
        return fold_session_summary(prev, key, list(entries))
    if current is prev:  # nothing folded: the SDK's fold returns a copy all the same
        current = {"session_id": current["session_id"], "mtime": current["mtime"], "data": {**data}}
        data = current["data"]
    data.update(late)
    return current


def fold_batch(
    prev: SessionSummaryEntry | None, key: SessionKey, batch: Batch, skip: int = 0
) -> SessionSummaryEntry:
    """``fold_summary(prev, key, batch.entries[skip:])``, parsing only the entries
    that can change the summary when the batch carries hints (``Batch.hints``).

    Once ``prev`` has ``is_sidechain`` (its first entry was folded), an entry matters
    only if a hint bit of it is still open: ``HINT_PARSE``, a tag, a user entry while the first
    prompt is open, a timestamp before ``created_at``, a cwd before ``cwd``. Of the
    entries holding a last-wins field, the last one gives its value and, when the
    summary lacks the field, the first one its place among the keys; the others are
    overwritten. Only these are parsed and folded, in order. ``ValueError`` (from
    ``Batch.entries``) for bytes that are not JSON; the SDK's fold raises on an
    entry that is not an object, as it does for ``fold_summary``.
    """
    hints = batch.hints
    data = None if prev is None else prev["data"]
    if not _HINTS_KNOWN or hints is None or data is None or "is_sidechain" not in data:
        return fold_summary(prev, key, batch.entries[skip:])
    want = HINT_TAG | HINT_PARSE
    if not data.get("first_prompt_locked"):
        want |= HINT_USER
    if "created_at" not in data:
        want |= HINT_TIMESTAMP
    if "cwd" not in data:
        want |= HINT_CWD
    count = len(batch.encoded)
    present = reduce(or_, hints[skip:], 0)
    picked = {i for i in range(skip, count) if hints[i] & want} if present & want else set()
    for bit, dst in _HINTED_FIELDS:
        if present & bit:
            picked.add(next(i for i in range(count - 1, skip - 1, -1) if hints[i] & bit))
            if dst not in data:
                picked.add(next(i for i in range(skip, count) if hints[i] & bit))
    return fold_summary(prev, key, batch.entries_at(sorted(picked)))
