"""walmirror.backends.from_url: file URLs, and a clear error for everything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from walmirror.backends import from_url
from walmirror.backends.file import FileStore


def test_absolute_file_url(tmp_path: Path) -> None:
    store = from_url(f"file://{tmp_path}/transcripts")
    assert isinstance(store, FileStore)
    assert store.root == tmp_path / "transcripts"


def test_localhost_and_percent_encoding(tmp_path: Path) -> None:
    store = from_url(f"file://localhost{tmp_path}/with%20space")
    assert isinstance(store, FileStore)
    assert store.root == tmp_path / "with space"


def test_relative_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = from_url("file:relative/dir")
    assert isinstance(store, FileStore)
    assert store.root == tmp_path / "relative" / "dir"


@pytest.mark.parametrize("url", ["file://somehost/srv/x", "file://", "file:///srv/x?mode=1"])
def test_bad_file_urls(url: str) -> None:
    with pytest.raises(ValueError, match="file"):
        from_url(url)


@pytest.mark.parametrize("url", ["ftp://example.com/x", "/just/a/path", "http://h/x"])
def test_unknown_scheme_lists_supported(url: str) -> None:
    with pytest.raises(ValueError) as info:
        from_url(url)
    message = str(info.value)
    assert "file://" in message and "redis://" in message and "postgresql://" in message
    assert "s3://" in message


def test_redis_url_builds_a_redis_store_without_echoing_secrets() -> None:
    from walmirror.backends.redis import RedisStore

    store = from_url("redis://user:hunter2@127.0.0.1:6379/0?prefix=wm-test")
    assert isinstance(store, RedisStore)
    assert "hunter2" not in store.cursor_name


def test_postgres_url_builds_a_deferred_postgres_store_without_echoing_secrets() -> None:
    from walmirror.backends.postgres import PostgresStore

    store = from_url("postgresql://u:hunter2@127.0.0.1:5432/test?table=wm_from_url")
    assert isinstance(store, PostgresStore)
    assert "hunter2" not in store.cursor_name
    with pytest.raises(ValueError) as info:
        from_url("postgresql://u:hunter2@127.0.0.1/test?command_timeout=soon")
    assert "hunter2" not in str(info.value)


def test_s3_url_builds_a_deferred_s3_store_and_refuses_credentials() -> None:
    from walmirror.backends.s3 import S3Store

    store = from_url("s3://bucket/some/prefix?endpoint_url=http://127.0.0.1:9&region=us-east-1")
    assert isinstance(store, S3Store)
    assert store.cursor_name.startswith("s3://bucket/some/prefix")
    with pytest.raises(ValueError) as info:
        from_url("s3://AKIA:hunter2@bucket/p")
    assert "hunter2" not in str(info.value)
