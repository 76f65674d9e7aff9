"""Session keys: validation and the one canonical text form.

A key reaches file paths (``FileStore``), Redis key names and SQL rows, so
every part is checked before anything is stored: no empty parts, no NUL or
other control characters, no path traversal, no absolute paths, no
backslashes. ``subpath`` is ``/``-separated (``"subagents/agent-1"``); the
main transcript has none (the empty string is invalid, as the SDK says).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from claude_agent_sdk.types import SessionKey

from .errors import InvalidKeyError

MAX_PART_LENGTH = 512

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_utf8_form(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (what a name that is not UTF-8, or a
    truncated UTF-16 string, decodes to): SQLite and the backends cannot store it."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_component(what: str, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidKeyError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidKeyError(f"{what} must not be empty")
    if len(value) > MAX_PART_LENGTH:
        raise InvalidKeyError(f"{what} is longer than {MAX_PART_LENGTH} characters")
    if value in (".", ".."):
        raise InvalidKeyError(f"{what} must not be '.' or '..'")
    if "/" in value or "\\" in value:
        raise InvalidKeyError(f"{what} must not contain '/' or '\\'")
    if _CONTROL.search(value):
        raise InvalidKeyError(f"{what} must not contain NUL or control characters")
    if not value.isascii():
        if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in value):
            # C1 controls and the Unicode line and paragraph separators: line breaks
            # to str.splitlines, so a key could forge lines in a log that prints it.
            raise InvalidKeyError(f"{what} must not contain control characters or line breaks")
        if not has_utf8_form(value):  # no backend (nor the queue) can store it as a name
            raise InvalidKeyError(
                f"{what} must be valid Unicode text (it holds a lone surrogate, e.g. from "
                "a file name that is not UTF-8)"
            )


def validate_key(key: Any) -> SessionKey:
    """Return ``key`` normalised to a plain ``SessionKey``, or raise ``InvalidKeyError``."""
    if not isinstance(key, dict):
        raise InvalidKeyError(f"a session key must be a dict, got {type(key).__name__}")
    unknown = set(key) - {"project_key", "session_id", "subpath"}
    if unknown:
        raise InvalidKeyError(f"unknown session key fields: {sorted(unknown)}")
    _check_component("project_key", key.get("project_key"))
    _check_component("session_id", key.get("session_id"))
    normalised: SessionKey = {
        "project_key": key["project_key"],
        "session_id": key["session_id"],
    }
    subpath = key.get("subpath")
    if subpath is not None:
        if not isinstance(subpath, str):
            raise InvalidKeyError(f"subpath must be a string, got {type(subpath).__name__}")
        if not subpath:
            raise InvalidKeyError("subpath must not be empty; omit it for the main transcript")
        if subpath.startswith("/"):
            raise InvalidKeyError("subpath must be relative, not start with '/'")
        for part in subpath.split("/"):
            _check_component("each subpath component", part)
        normalised["subpath"] = subpath
    return normalised


def validate_project_key(project_key: Any) -> str:
    """Check a bare ``project_key`` argument (``list_sessions`` and friends)."""
    _check_component("project_key", project_key)
    return str(project_key)


def describe_key(key: SessionKey) -> str:
    """A short printable form for logs and errors: ``project/session[/subpath]``."""
    text = f"{key['project_key']}/{key['session_id']}"
    subpath = key.get("subpath")
    return f"{text}/{subpath}" if subpath else text
