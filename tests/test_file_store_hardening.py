"""FileStore under hostile conditions (issue 7, items 2, 11 and 12): a transcript
locked by another process, a transcript deleted and recreated behind a store's
back (the inode reused), and the filesystem refusing writes.

No timing is asserted: ``asyncio.wait_for(..., GUARD)`` only turns a hang into a
failure."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from claude_agent_sdk.types import SessionKey

from walmirror import DurableSessionStore
from walmirror.backends import file as file_module
from walmirror.backends.file import FileStore
from walmirror.config import default_is_permanent
from walmirror.connection import Connection
from walmirror.errors import BackendError, InvalidKeyError, PermanentBackendError, WalmirrorError
from walmirror.keys import describe_key
from walmirror.protocol import Batch, MarkBehindError, Receipt, encode_entry

GUARD = 30.0  # seconds before a hang counts as a failure; never a performance bound

KEY: SessionKey = {"project_key": "proj", "session_id": "sess"}
OTHER: SessionKey = {"project_key": "proj", "session_id": "other"}
LONG: SessionKey = {"project_key": "proj", "session_id": "s" * 300}
SECRET = "do-not-leak-this-content"

T = TypeVar("T")


def entries(count: int, start: int = 0, tag: str = "e") -> list[Any]:
    return [{"type": "user", "uuid": f"{tag}{i}", "n": i} for i in range(start, start + count)]


def batch(producer: str, first: int, count: int, expect: int | None = None) -> Batch:
    return Batch.of(producer, first, entries(count, start=first), expect)


def lines(items: list[Any]) -> bytes:
    return b"".join(encode_entry(e) + b"\n" for e in items)


def transcript(root: Path, key: SessionKey = KEY) -> Path:
    return root / key["project_key"] / (key["session_id"] + ".jsonl")


def transcripts_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jsonl"))


def key_of(i: int) -> SessionKey:
    return {"project_key": "proj", "session_id": f"s{i:03d}"}


@contextmanager
def locked_elsewhere(path: Path) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``path`` through a descriptor of our own: a separate
    open file description conflicts exactly like another process's lock."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock, so threads still waiting (old code) finish


async def eventually(predicate: Callable[[], Any], what: str) -> None:
    """Poll an async predicate until it holds; the caller's guard turns a hang into a failure."""

    async def poll() -> None:
        while not await predicate():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), GUARD)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


# --- Item 2: a transcript locked by another process ------------------------------


async def test_a_locked_transcript_stops_neither_other_sessions_nor_close(tmp_path: Path) -> None:
    # Today: every retry after call_timeout leaves a thread blocked in flock, the
    # loop's default executor fills up, nothing else is delivered and close() hangs.
    root = tmp_path / "files"
    await FileStore(root).append(KEY, entries(1))  # the transcript exists, so it can be locked
    reader = FileStore(root)
    store = DurableSessionStore(
        FileStore(root),
        tmp_path / "queue.db",
        call_timeout=0.5,  # far above a healthy call, even on a loaded machine
        backoff_initial=0.01,
        backoff_max=0.05,
        breaker_threshold=1_000_000,  # this test is about threads, not the breaker
    )
    closed = False
    try:
        with locked_elsewhere(transcript(root)):
            await store.append(KEY, entries(2, start=1))

            async def retried_many_times() -> bool:
                status = await store.status()
                return bool(
                    status["backends"][0]["retries"] >= 8
                )  # > the 6 default-executor threads

            await eventually(retried_many_times, "the locked key is retried")
            others = [key_of(i) for i in range(20)]
            for i, key in enumerate(others):
                await store.append(key, entries(2, tag=f"k{i}-"))

            async def others_delivered() -> bool:
                for i, key in enumerate(others):
                    if await reader.load(key) != entries(2, tag=f"k{i}-"):
                        return False
                return True

            await eventually(others_delivered, "the other sessions are delivered")
            try:
                report = await asyncio.wait_for(store.close(2), GUARD)
            except TimeoutError:
                pytest.fail("close(2) did not return while a transcript stayed locked")
            assert not report.drained
            assert sum(report.pending_entries.values()) == 2
            closed = True
    finally:
        if not closed:  # a failure above: close once the lock is released
            await asyncio.wait_for(store.close(0.5), GUARD)
    assert await FileStore(root).load(KEY) == entries(1)  # the locked key got nothing


async def test_append_on_a_locked_key_raises_a_retryable_lock_timeout(tmp_path: Path) -> None:
    root = tmp_path / "files"
    store = FileStore(root, lock_timeout=0.3)
    await store.append(KEY, entries(1))
    before = transcript(root).read_bytes()
    with locked_elsewhere(transcript(root)):
        for call in (
            lambda: store.append(KEY, [{"type": "user", "text": SECRET}]),
            lambda: store.append_batch(KEY, batch("pa", 0, 1)),
            lambda: store.load(KEY),
            lambda: store.length(KEY),
            lambda: store.producer_mark(KEY, "pa"),
            lambda: store.delete(KEY),
        ):
            with pytest.raises(WalmirrorError) as caught:
                await asyncio.wait_for(call(), GUARD)
            error = caught.value
            assert isinstance(error, BackendError)
            assert isinstance(error, TimeoutError)
            assert not default_is_permanent(error)  # the engine retries it
            assert describe_key(KEY) in str(error)
            assert "lock" in str(error)
            assert SECRET not in str(error)
    assert transcript(root).read_bytes() == before
    await store.append(KEY, entries(1, start=1))  # once released, it goes through
    assert await store.load(KEY) == entries(2)


async def test_a_cancelled_lock_wait_releases_its_thread(tmp_path: Path) -> None:
    root = tmp_path / "files"
    store = FileStore(root, lock_timeout=3600, max_threads=1)  # one thread: it must come back
    await store.append(KEY, entries(1))
    before = transcript(root).read_bytes()
    with locked_elsewhere(transcript(root)):
        waiting = asyncio.create_task(store.append(KEY, entries(1, start=1)))
        await asyncio.sleep(0.2)  # let it reach flock (not needed for correctness)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # The only thread was waiting on the lock; it serves other keys now.
        await asyncio.wait_for(store.append(OTHER, entries(1)), GUARD)
        assert await asyncio.wait_for(store.load(OTHER), GUARD) == entries(1)
    assert transcript(root).read_bytes() == before  # the cancelled append wrote nothing
    await store.aclose()


class _NoDefaultExecutor(concurrent.futures.ThreadPoolExecutor):
    """A default executor that fails every submission: nothing of walmirror may use it."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the event loop's default executor was used")


async def test_file_store_never_uses_the_loops_default_executor(tmp_path: Path) -> None:
    asyncio.get_running_loop().set_default_executor(_NoDefaultExecutor(max_workers=1))
    store = FileStore(tmp_path / "files")
    sub: SessionKey = {**KEY, "subpath": "subagents/agent-1"}
    await store.append(KEY, entries(2))
    await store.append_batch(sub, batch("pa", 0, 1))
    assert await store.load(KEY) == entries(2)
    assert await store.length(KEY) == 2
    assert await store.producer_mark(sub, "pa") == 0
    assert [s["session_id"] for s in await store.list_sessions("proj")] == ["sess"]
    assert len(await store.list_session_summaries("proj")) == 1
    assert await store.list_subkeys(KEY) == ["subagents/agent-1"]
    await store.delete(KEY)
    assert await store.load(KEY) is None
    await store.aclose()


async def test_connection_close_does_not_need_the_default_executor(tmp_path: Path) -> None:
    # The queue's own close must not wait on an executor a backend may have exhausted.
    asyncio.get_running_loop().set_default_executor(_NoDefaultExecutor(max_workers=1))
    connection = Connection(tmp_path / "q.db", "FULL", "writer")
    await connection.open()
    assert await connection.run(lambda: connection.conn.execute("SELECT 1").fetchone()) == (1,)
    await asyncio.wait_for(connection.close(), GUARD)
    await connection.close()  # twice is fine


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_lock_timeout_must_be_a_positive_finite_number(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        FileStore(tmp_path, lock_timeout=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_threads_must_be_a_positive_integer(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="max_threads"):
        FileStore(tmp_path, max_threads=bad)


# --- Item 11: a transcript deleted and recreated behind the store's back ---------


@pytest.fixture
def recreate(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, bytes], None]:
    """Delete ``path`` and write ``data`` as a new file that reports the old inode.

    ext4 hands a freed inode to the next file created; where the filesystem does
    not, the stat results of the new file are renumbered to the old inode (the
    injected fault: a stat that cannot tell the files apart)."""

    def run(path: Path, data: bytes) -> None:
        old = os.stat(path)
        path.unlink()
        path.write_bytes(data)
        new = os.stat(path)
        if (new.st_dev, new.st_ino) == (old.st_dev, old.st_ino):
            return  # the filesystem reused the inode by itself
        real_stat, real_fstat = os.stat, os.fstat

        def renumber(result: os.stat_result) -> os.stat_result:
            if (result.st_dev, result.st_ino) != (new.st_dev, new.st_ino):
                return result
            fields = list(result)
            fields[1] = old.st_ino
            extra = {
                name: getattr(result, name)
                for name in dir(result)
                if name.startswith("st_") and name not in _SEQUENCE_FIELDS
            }
            return os.stat_result(fields, extra)

        def stat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            return renumber(real_stat(target, *args, **kwargs))

        def fstat(fd: int) -> os.stat_result:
            return renumber(real_fstat(fd))

        monkeypatch.setattr(file_module.os, "stat", stat)
        monkeypatch.setattr(file_module.os, "fstat", fstat)

    return run


_SEQUENCE_FIELDS = (
    "st_mode",
    "st_ino",
    "st_dev",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
)


async def test_another_instance_deleting_and_recreating_a_key_is_seen_by_a_stale_one(
    root: Path, recreate: Callable[[Path, bytes], None]
) -> None:
    # Two FileStores on one root: theirs deletes the session and writes a new one of
    # the same size into (what stats as) the same inode; mine must not write past it
    # at an old offset nor count old lines.
    mine, theirs = FileStore(root), FileStore(root)
    assert (await mine.append_batch(KEY, batch("pa", 0, 3))).length == 3
    old = transcript(root).read_bytes()
    await theirs.delete(KEY)
    replacement = lines(entries(3, tag="x"))  # same byte size, other entries
    assert len(replacement) == len(old)
    await theirs.append(KEY, entries(3, tag="x"))
    recreate(transcript(root), transcript(root).read_bytes())
    assert await mine.length(KEY) == 3
    assert await mine.append_batch(KEY, batch("pa", 3, 1, expect=2)) == Receipt(1, 3, 4)
    assert transcript(root).read_bytes() == replacement + lines(entries(1, start=3))
    assert await mine.load(KEY) == [*entries(3, tag="x"), *entries(1, start=3)]


async def test_a_transcript_recreated_outside_the_store_with_the_same_size_is_not_trusted(
    root: Path, recreate: Callable[[Path, bytes], None]
) -> None:
    # Another program (not a FileStore) deletes the transcript and writes one line of
    # exactly the old byte size into the reused inode: the state file's size matches,
    # its line count (3) and marks do not describe the new file.
    store = FileStore(root)
    await store.append_batch(KEY, batch("pa", 0, 3))
    size = transcript(root).stat().st_size
    one_line = _padded_line(size)
    recreate(transcript(root), one_line)
    assert await store.length(KEY) == 1
    with pytest.raises(MarkBehindError):  # what pa had stored is gone
        await store.append_batch(KEY, batch("pa", 3, 1, expect=2))
    assert await store.append_batch(KEY, batch("pb", 0, 2)) == Receipt(2, 1, 3)
    assert transcript(root).read_bytes() == one_line + lines(entries(2))
    assert await store.length(KEY) == 3


async def test_a_recreated_transcript_longer_than_the_state_is_not_cut(
    root: Path, recreate: Callable[[Path, bytes], None]
) -> None:
    # The new file has a newline exactly where the old acknowledged end was: it
    # must not be taken for the old transcript plus the tail of a crashed append.
    store = FileStore(root)
    await store.append_batch(KEY, batch("pa", 0, 3))
    size = transcript(root).stat().st_size
    foreign = _padded_line(size) + lines(entries(1, tag="y"))
    recreate(transcript(root), foreign)
    assert await store.load(KEY) == [json.loads(_padded_line(size)), *entries(1, tag="y")]
    assert transcript(root).read_bytes() == foreign
    assert await store.length(KEY) == 2


async def test_the_crashed_tail_of_our_own_transcript_is_still_removed(root: Path) -> None:
    # The same check must keep recognising the old transcript plus unacknowledged lines.
    store = FileStore(root)
    await store.append_batch(KEY, batch("pa", 0, 3))
    clean = transcript(root).read_bytes()
    with transcript(root).open("ab") as f:
        f.write(lines(entries(2, start=100)))
    assert await store.length(KEY) == 3
    assert transcript(root).read_bytes() == clean
    assert await store.producer_mark(KEY, "pa") == 2


def _padded_line(size: int) -> bytes:
    """One JSON object line of exactly ``size`` bytes (newline included)."""
    base = encode_entry({"type": "user", "pad": ""})
    line = encode_entry({"type": "user", "pad": "p" * (size - 1 - len(base))}) + b"\n"
    assert len(line) == size
    return line


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


# --- Item 12: the filesystem refuses ----------------------------------------------


async def test_a_session_id_too_long_for_the_filesystem_is_a_permanent_clear_error(
    root: Path,
) -> None:
    store = FileStore(root)
    for call in (
        lambda: store.append(LONG, [{"type": "user", "text": SECRET}]),
        lambda: store.append_batch(LONG, batch("pa", 0, 1)),
    ):
        with pytest.raises(PermanentBackendError) as caught:
            await call()
        error = caught.value
        assert isinstance(error, InvalidKeyError)
        assert default_is_permanent(error)  # the engine parks the key instead of retrying
        assert "too long" in str(error)
        assert SECRET not in str(error)
    assert transcripts_under(root) == []
    # Reads find nothing under it, and a delete has nothing to do.
    assert await store.load(LONG) is None
    assert await store.length(LONG) == 0
    assert await store.producer_mark(LONG, "pa") is None
    assert await store.list_subkeys(LONG) == []
    await store.delete(LONG)
    assert await store.list_sessions("proj") == []
    long_project = "p" * 300
    assert await store.list_sessions(long_project) == []
    assert await store.list_session_summaries(long_project) == []


async def test_the_engine_parks_a_key_too_long_for_the_filesystem_and_delivers_the_rest(
    tmp_path: Path,
) -> None:
    root = tmp_path / "files"
    reader = FileStore(root)
    store = DurableSessionStore(
        FileStore(root), tmp_path / "queue.db", backoff_initial=0.01, backoff_max=0.05
    )
    try:
        await store.append(LONG, entries(2))
        for i in range(5):
            await store.append(key_of(i), entries(2, tag=f"k{i}-"))

        async def settled() -> bool:
            status = (await store.status())["backends"][0]
            if not status["parked"]:
                return False
            for i in range(5):
                if await reader.load(key_of(i)) != entries(2, tag=f"k{i}-"):
                    return False
            return True

        await eventually(settled, "the long key is parked and the others delivered")
        [parked] = (await store.status())["backends"][0]["parked"]
        assert "too long" in json.dumps(parked)
    finally:
        await asyncio.wait_for(store.close(0.5), GUARD)


def _failing(error: OSError) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.EROFS, "read-only"), (errno.EACCES, "permission"), (errno.EPERM, "permission")],
)
async def test_a_filesystem_refusing_writes_is_a_permanent_clear_error(
    root: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    store = FileStore(root)
    await store.append(KEY, entries(1))
    refusal = OSError(code, os.strerror(code), str(root / "proj" / "sess.jsonl"))
    monkeypatch.setattr(file_module.os, "open", _failing(refusal))
    with pytest.raises(PermanentBackendError) as caught:
        await store.append(KEY, [{"type": "user", "text": SECRET}])
    error = caught.value
    assert default_is_permanent(error)
    assert error.errno == code  # type: ignore[attr-defined]
    assert words in str(error).lower()
    assert describe_key(KEY) in str(error)
    assert SECRET not in str(error)
    monkeypatch.undo()
    assert await store.load(KEY) == entries(1)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
async def test_a_full_disk_is_a_retryable_clear_error_and_rolls_back(
    root: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    store = FileStore(root)
    await store.append(KEY, entries(2))
    before = transcript(root).read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(file_module.os, "write", half_then_full)
    with pytest.raises(BackendError) as caught:
        await store.append(KEY, [{"type": "user", "text": SECRET}])
    monkeypatch.undo()
    error = caught.value
    assert isinstance(error, OSError) and error.errno == code
    assert not default_is_permanent(error)  # space may come back: the engine retries
    assert "no space" in str(error).lower()
    assert describe_key(KEY) in str(error)
    assert SECRET not in str(error)
    assert transcript(root).read_bytes() == before
    await store.append(KEY, entries(1, start=2))
    assert await store.load(KEY) == entries(3)
