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
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import unquote, urlsplit

from claude_agent_sdk.types import SessionStore

__all__ = ["SUPPORTED_SCHEMES", "from_url"]

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
