"""Hardening (issue 7): one caller's bad input never fails another's append, a full
disk gives a clear error and never stops the draining that frees it, and other
edge cases that must end in a clear error with nothing acknowledged lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk.types import SessionKey
from memory_store import MemoryStore

from walmirror import DurableSessionStore, InvalidKeyError, QueueFullError
from walmirror.faults import FaultyStore

KEY: SessionKey = {"project_key": "proj", "session_id": "s"}
TUNING: dict[str, Any] = {"backoff_initial": 0.01, "backoff_max": 0.1}


def key(n: int) -> SessionKey:
    return {"project_key": "proj", "session_id": f"s{n}"}


# -- item 3: a key no backend can name; one caller's input in a group commit ------------


@pytest.mark.parametrize(
    "bad",
    [
        {"project_key": "p", "session_id": "bad\udc80"},
        {"project_key": "p\ud800", "session_id": "s"},
        {"project_key": "p", "session_id": "s", "subpath": "subagents/a\udfff"},
    ],
)
async def test_a_key_with_a_lone_surrogate_is_refused_clearly(
    make_durable: Callable[..., DurableSessionStore], bad: SessionKey
) -> None:
    store = make_durable(MemoryStore(), **TUNING)
    with pytest.raises(InvalidKeyError, match="lone surrogate"):
        await store.append(bad, [{"n": 0}])
    with pytest.raises(InvalidKeyError, match="lone surrogate"):
        await store.load(bad)


@pytest.mark.parametrize("char", ["\x85", "\u2028", "\u2029", "\x9f"])
def test_keys_with_c1_controls_or_unicode_line_breaks_are_refused(char: str) -> None:
    from walmirror.keys import validate_key

    with pytest.raises(InvalidKeyError, match="control characters or line breaks"):
        validate_key({"project_key": "p", "session_id": f"a{char}b"})


async def test_appends_sharing_a_commit_with_a_bad_key_all_succeed(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    store = make_durable(inner, **TUNING)
    bad: SessionKey = {"project_key": "p", "session_id": "bad\udc80"}
    results = await asyncio.gather(
        *(store.append(key(n), [{"n": n}]) for n in range(200)),
        store.append(bad, [{"n": -1}]),
        return_exceptions=True,
    )
    assert all(r is None for r in results[:200])
    assert isinstance(results[200], InvalidKeyError)
    await store.flush(60)
    for n in range(200):
        assert await inner.load(key(n)) == [{"n": n}]


async def test_a_failure_in_one_callers_rows_fails_only_that_caller(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Whatever goes wrong with one append inside a group commit (injected here in
    the uuid ledger), the other appends of that commit are stored."""
    inner = MemoryStore()
    store = make_durable(inner, **TUNING)
    await store.start()
    queue: Any = store.queue
    real = queue._ledger.claim

    def claim(key_id: int, rows: list[tuple[str | None, bytes, int]]) -> Any:
        if any(row[0] == "poison" for row in rows):
            raise ValueError("injected")
        return real(key_id, rows)

    queue._ledger.claim = claim
    results = await asyncio.gather(
        *(store.append(key(n), [{"n": n, "uuid": f"u{n}"}]) for n in range(100)),
        store.append(key(999), [{"uuid": "poison"}]),
        return_exceptions=True,
    )
    assert all(r is None for r in results[:100]), [r for r in results if r is not None]
    assert isinstance(results[100], ValueError)
    await store.flush(60)
    for n in range(100):
        assert await inner.load(key(n)) == [{"n": n, "uuid": f"u{n}"}]
    assert await store.load(key(999)) is None


async def test_an_entry_whose_uuid_holds_a_lone_surrogate_is_stored_once(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    store = make_durable(inner, **TUNING)
    entry = {"uuid": "id-\udc80", "text": "x"}
    await store.append(KEY, [entry])
    await store.append(KEY, [entry])  # the SDK's retry: skipped by uuid
    await store.flush(30)
    assert await inner.load(KEY) == [entry]
    assert await store.load(KEY) == [entry]


# -- item 8: a full disk ---------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A real filesystem of ``size`` (tmpfs). Needs the mount capability: CI runs as
    root on this machine kind; elsewhere the test fails saying so, it is not skipped."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_full_disk_is_a_clear_error_and_draining_still_frees_it(
    tmp_path: Path,
) -> None:
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    faulty.down()
    with small_disk(tmp_path / "disk", "24m") as disk:
        store = DurableSessionStore(
            faulty,
            disk / "queue.db",
            retention_seconds=0,
            compact_interval=0.05,
            full_policy="raise",
            **TUNING,
        )
        try:
            stored: list[int] = []
            body = "x" * 20_000
            with pytest.raises(QueueFullError, match=r"disk .* is full") as info:
                for n in range(10_000):
                    await store.append(key(n % 7), [{"n": n, "body": body}])
                    stored.append(n)
            assert "cannot rollback" not in str(info.value)
            assert len(stored) > 10
            # Still full: the backend comes back, and draining (which frees the
            # space) works all the same.
            faulty.up()
            await store.flush(60)
            delivered = [e["n"] for n in range(7) for e in await inner.load(key(n)) or []]
            assert sorted(delivered) == stored
            # Compaction made room: appends succeed again.
            for _ in range(100):
                try:
                    await store.append(key(0), [{"n": "after", "body": body}])
                    break
                except QueueFullError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("no room came back after draining")
        finally:
            await store.close(5)


async def test_a_size_limit_reached_inside_sqlite_is_a_clear_error(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """SQLITE_FULL from a page limit (the same code a full disk gives)."""
    store = make_durable(MemoryStore(), **TUNING)
    await store.append(KEY, [{"n": 0}])
    queue: Any = store.queue

    def cap() -> None:
        pages = queue._writer.conn.execute("PRAGMA page_count").fetchone()[0]
        queue._writer.conn.execute(f"PRAGMA max_page_count = {pages}")

    await queue._writer.run(cap)
    with pytest.raises(QueueFullError, match="is full"):
        await store.append(KEY, [{"n": 1, "body": "y" * 200_000, "id": uuid.uuid4().hex}])
    await store.append(KEY, [{"n": 2}])  # a small one still fits


# -- item 6: close() reports drained only when it is --------------------------------------


@pytest.mark.parametrize("trial", range(20))
async def test_close_says_drained_only_when_every_acknowledged_entry_is_delivered(
    tmp_path: Path, trial: int
) -> None:
    inner = MemoryStore()
    store = DurableSessionStore(inner, tmp_path / "queue.db", **TUNING)
    await store.start()
    acknowledged: list[tuple[int, int]] = []

    async def writer(session: int) -> None:
        for n in range(1_000):
            try:
                await store.append(key(session), [{"n": n}])
            except Exception:
                return  # closed: not acknowledged, nothing promised
            acknowledged.append((session, n))
            await asyncio.sleep(0)

    writers = [asyncio.create_task(writer(s)) for s in range(8)]
    await asyncio.sleep(0.01 * (trial % 5))
    report = await store.close(30)
    await asyncio.gather(*writers)
    delivered = {(s, e["n"]) for s in range(8) for e in await inner.load(key(s)) or []}
    if report.drained:
        assert set(acknowledged) <= delivered
    else:
        assert sum(report.pending_entries.values()) > 0


# -- item 5: load never returns a transcript with its beginning missing --------------------


async def test_load_offline_never_returns_a_prefix_compacted_meanwhile(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    from walmirror import BackendUnavailableError

    inner = MemoryStore()
    store = make_durable(inner, retention_seconds=3600, **TUNING)
    entries = [{"n": n} for n in range(5)]
    await store.append(KEY, entries)
    await store.flush(30)
    assert await store.load(KEY) == entries  # the backend answers

    async def compact_then_fail(key: SessionKey) -> Any:
        await store.queue.compact(0.0)  # retention passes while the backend hangs
        raise ConnectionError("backend down (injected)")

    inner.load = compact_then_fail  # type: ignore[method-assign]
    try:
        result = await store.load(KEY)
    except BackendUnavailableError:
        return
    assert result == entries


# -- item 12: clear errors for a bad queue path and bad settings ------------------------------


async def test_a_directory_as_the_queue_path_is_a_clear_error(tmp_path: Path) -> None:
    from walmirror import QueuePathError

    store = DurableSessionStore(MemoryStore(), tmp_path)
    with pytest.raises(QueuePathError, match="is a directory"):
        await store.append(KEY, [{"n": 0}])
    assert os.listdir(tmp_path) == []  # nothing created there


async def test_a_read_only_filesystem_is_a_clear_error(tmp_path: Path) -> None:
    from walmirror import QueuePathError

    with small_disk(tmp_path / "ro", "1m", read_only=True) as disk:
        store = DurableSessionStore(MemoryStore(), disk / "queue.db")
        with pytest.raises(QueuePathError, match="EROFS: the filesystem is read-only"):
            await store.append(KEY, [{"n": 0}])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"compact_interval": 0}, "compact_interval must be at least 0.01"),
        ({"probe_interval": 0}, "probe_interval must be positive"),
        ({"probe_timeout": -1}, "must not be negative"),
    ],
)
def test_settings_that_would_spin_or_never_probe_are_refused(
    tmp_path: Path, setting: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        DurableSessionStore(MemoryStore(), tmp_path / "q.db", **setting)


# -- item 9: bookkeeping of idle, delivered keys is forgotten --------------------------------


async def _table_sizes(store: DurableSessionStore) -> dict[str, int]:
    queue: Any = store.queue

    def count() -> dict[str, int]:
        conn = queue._reader.conn
        sizes = {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("keys", "cursors")
        }
        # Entries and ledger uuids, as the batch and ledger rows hold them.
        sizes["uuids"] = conn.execute(
            "SELECT COALESCE(SUM(json_array_length(uuids)), 0) FROM ledger"
        ).fetchone()[0]
        sizes["entries"] = conn.execute("SELECT COALESCE(SUM(count), 0) FROM batches").fetchone()[0]
        return sizes

    return dict(await queue._reader.run(count))


async def test_idle_delivered_keys_are_forgotten_and_come_back_cleanly(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    inner = MemoryStore()
    store = make_durable(
        inner, retention_seconds=0, forget_after=0, compact_interval=0.05, **TUNING
    )
    for n in range(300):
        await store.append(key(n), [{"uuid": f"a{n}", "n": 0}, {"n": 1}])
    await store.flush(60)
    await store.queue.compact(0.0, 0.0)
    assert await _table_sizes(store) == {"keys": 0, "cursors": 0, "uuids": 0, "entries": 0}
    # A forgotten key that comes back starts past every seq it had: the backend
    # appends after what it holds (no repeat skipped, nothing lost or doubled).
    await store.append(key(7), [{"uuid": "b7", "n": 2}])
    await store.flush(30)
    assert await inner.load(key(7)) == [{"uuid": "a7", "n": 0}, {"n": 1}, {"uuid": "b7", "n": 2}]
    assert await store.load(key(7)) == await inner.load(key(7))
    assert (await store.status())["backends"][0]["losses"] == []


async def test_keys_not_yet_delivered_everywhere_are_kept(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    first, second = MemoryStore(), FaultyStore(MemoryStore())
    second.down()
    store = make_durable([first, second], retention_seconds=0, forget_after=0, **TUNING)
    await store.append(KEY, [{"uuid": "u", "n": 0}])
    for _ in range(200):
        if await first.load(KEY):
            break
        await asyncio.sleep(0.02)
    await store.queue.compact(0.0, 0.0)
    sizes = await _table_sizes(store)
    assert sizes["keys"] == 1 and sizes["uuids"] == 1 and sizes["entries"] == 1
    second.up()
    await store.flush(30)
    assert await second.inner.load(KEY) == [{"uuid": "u", "n": 0}]


async def test_a_key_is_remembered_until_forget_after(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    """Within ``forget_after`` the ledger still knows the key's uuids: a re-import of
    an already mirrored session adds nothing that carries a uuid."""
    inner = MemoryStore()
    store = make_durable(inner, retention_seconds=0, **TUNING)  # forget_after: a day
    entries = [{"uuid": f"u{n}", "n": n} for n in range(5)]
    await store.append(KEY, entries)
    await store.flush(30)
    await store.queue.compact(0.0, store.tuning.forget_after)
    assert (await _table_sizes(store))["uuids"] == 5
    await store.append(KEY, entries)  # the re-import
    await store.flush(30)
    assert await inner.load(KEY) == entries
