"""The queue file itself: one owner at a time, corruption refused untouched, privacy,
reopening drains what was left, and the durability setting."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from walmirror import CorruptQueueError, DurableSessionStore, QueueLockedError
from walmirror.backends.file import FileStore
from walmirror.faults import FaultyStore

MAIN: dict[str, str] = {"project_key": "proj", "session_id": "s1"}
SUB: dict[str, str] = {"project_key": "proj", "session_id": "s1", "subpath": "subagents/agent-1"}
OTHER: dict[str, str] = {"project_key": "proj", "session_id": "s2"}
TIMEOUT = 60.0  # generous: only here to avoid a hang on a busy machine
NAMES = ("files",)  # cursor name kept across stores on one queue file

MakeDurable = Callable[..., DurableSessionStore]


def entry(n: int, size: int = 40) -> dict[str, Any]:
    return {"type": "user", "uuid": f"u-{n}", "n": n, "message": {"content": "x" * size}}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_modes(directory: Path, prefix: str) -> dict[str, str]:
    """name -> octal permission bits of the files in ``directory`` starting with ``prefix``."""
    return {
        p.name: oct(stat.S_IMODE(p.stat().st_mode))
        for p in directory.iterdir()
        if p.name.startswith(prefix)
    }


@pytest.fixture
def private_umask() -> Iterator[None]:
    """A permissive umask, so only the code's own choice of mode can make a file private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- one owner per queue file ---------------------------------------------------------

_TRY_OPEN = """
import asyncio, json, sys
from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore

async def main():
    store = DurableSessionStore(FileStore(sys.argv[2]), sys.argv[1], backend_names=("files",))
    try:
        await store.start()
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    else:
        print(json.dumps({"error": None, "message": ""}))
        await store.close(timeout=1)

asyncio.run(main())
"""


def open_in_other_process(queue: Path, root: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _TRY_OPEN, str(queue), str(root)],
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


# contract 10: two processes on one queue file: the second is refused with a clear error.
async def test_second_process_on_the_same_queue_file_is_refused_naming_the_file(
    tmp_path: Path, make_durable: MakeDurable
) -> None:
    queue, root = tmp_path / "queue.db", tmp_path / "files"
    first = make_durable(FileStore(root), queue, backend_names=NAMES)
    await first.append(MAIN, [entry(1)])  # type: ignore[arg-type]

    result = await asyncio.to_thread(open_in_other_process, queue, root)

    assert result["error"] == "QueueLockedError", result
    assert str(queue) in result["message"]


# contract 10: the refusal does not disturb the process that owns the queue.
async def test_first_process_keeps_working_after_a_second_was_refused(
    tmp_path: Path, make_durable: MakeDurable
) -> None:
    queue, root = tmp_path / "queue.db", tmp_path / "files"
    first = make_durable(FileStore(root), queue, backend_names=NAMES)
    await first.append(MAIN, [entry(1)])  # type: ignore[arg-type]

    result = await asyncio.to_thread(open_in_other_process, queue, root)
    assert result["error"] == "QueueLockedError", result

    await first.append(MAIN, [entry(2)])  # type: ignore[arg-type]
    await first.flush(timeout=TIMEOUT)
    assert await FileStore(root).load(MAIN) == [entry(1), entry(2)]  # type: ignore[arg-type]
    assert await first.load(MAIN) == [entry(1), entry(2)]  # type: ignore[arg-type]
    report = await first.close(timeout=TIMEOUT)
    assert report.drained


# contract 10: two stores in one process on one queue file: the second is refused.
async def test_second_store_in_the_same_process_on_the_same_file_is_refused(
    tmp_path: Path, make_durable: MakeDurable
) -> None:
    queue, root = tmp_path / "queue.db", tmp_path / "files"
    first = make_durable(FileStore(root), queue, backend_names=NAMES)
    await first.append(MAIN, [entry(1)])  # type: ignore[arg-type]
    second = make_durable(FileStore(root), queue, backend_names=NAMES)

    with pytest.raises(QueueLockedError, match=str(queue)):
        await second.start()
    with pytest.raises(QueueLockedError):
        await second.append(MAIN, [entry(99)])  # type: ignore[arg-type]

    await first.append(MAIN, [entry(2)])  # type: ignore[arg-type]
    await first.flush(timeout=TIMEOUT)
    assert await FileStore(root).load(MAIN) == [entry(1), entry(2)]  # type: ignore[arg-type]


# contract 10: the lock goes with the store; the next owner can open the file.
async def test_queue_file_can_be_opened_again_once_its_store_closed(
    tmp_path: Path, make_durable: MakeDurable
) -> None:
    queue, root = tmp_path / "queue.db", tmp_path / "files"
    first = make_durable(FileStore(root), queue, backend_names=NAMES)
    await first.append(MAIN, [entry(1)])  # type: ignore[arg-type]
    await first.close(timeout=TIMEOUT)

    result = await asyncio.to_thread(open_in_other_process, queue, root)
    assert result["error"] is None, result
    second = make_durable(FileStore(root), queue, backend_names=NAMES)
    await second.start()
    assert await second.load(MAIN) == [entry(1)]  # type: ignore[arg-type]


# -- corrupt queue files ------------------------------------------------------------------


async def valid_queue_bytes(directory: Path) -> bytes:
    """The bytes of a real walmirror queue with some pages of entries in it, cleanly closed."""
    path = directory / "valid-queue.db"
    files = FaultyStore(FileStore(directory / "files-for-valid-queue"))
    files.down()  # keep the entries queued
    store = DurableSessionStore(files, path, backend_names=NAMES)
    for n in range(120):
        await store.append(MAIN, [entry(n, size=300)])  # type: ignore[arg-type]
    await store.close(timeout=0)
    data = await asyncio.to_thread(path.read_bytes)
    assert len(data) > 8 * 4096
    return data


# Each corruption writes a damaged queue file at ``path``; ``valid`` is a real queue's bytes.


def random_bytes(path: Path, valid: bytes) -> None:
    path.write_bytes(random.Random(1).randbytes(16384))


def truncated_queue(path: Path, valid: bytes) -> None:
    path.write_bytes(valid[: len(valid) // 2 + 123])


def header_only_queue(path: Path, valid: bytes) -> None:
    path.write_bytes(valid[:100])


def garbled_queue(path: Path, valid: bytes) -> None:
    data = bytearray(valid)
    rng = random.Random(2)
    for page in range(1, len(data) // 4096):  # page 0 (header, schema) survives
        start = page * 4096 + 64
        data[start : start + 512] = rng.randbytes(512)
    path.write_bytes(bytes(data))


def foreign_sqlite_database(path: Path, valid: bytes) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
    conn.commit()
    conn.close()


def newer_schema_queue(path: Path, valid: bytes) -> None:
    path.write_bytes(valid)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '999' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()


CORRUPTIONS = [
    random_bytes,
    truncated_queue,
    header_only_queue,
    garbled_queue,
    foreign_sqlite_database,
    newer_schema_queue,
]


# contract 11: a corrupt queue file gets a clear error naming the file.
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
async def test_corrupt_queue_file_is_refused_with_an_error_naming_it(
    tmp_path: Path, corrupt: Callable[[Path, bytes], None], make_durable: MakeDurable
) -> None:
    queue = tmp_path / "queue.db"
    corrupt(queue, await valid_queue_bytes(tmp_path))
    store = make_durable(FileStore(tmp_path / "files"), queue, backend_names=NAMES)

    with pytest.raises(CorruptQueueError) as raised:
        await store.start()

    assert str(queue) in str(raised.value)


# contract 11: ... and nothing is lost: the file is left byte for byte as it was.
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
async def test_corrupt_queue_file_is_left_byte_for_byte_unchanged(
    tmp_path: Path, corrupt: Callable[[Path, bytes], None], make_durable: MakeDurable
) -> None:
    queue = tmp_path / "queue.db"
    corrupt(queue, await valid_queue_bytes(tmp_path))
    before = digest(queue)
    store = make_durable(FileStore(tmp_path / "files"), queue, backend_names=NAMES)

    with pytest.raises(CorruptQueueError):
        await store.start()

    assert digest(queue) == before


# -- privacy -----------------------------------------------------------------------------


# Transcripts are conversation content: the queue holding them is owner-only.
async def test_queue_file_is_created_with_mode_0600(
    tmp_path: Path, private_umask: None, make_durable: MakeDurable
) -> None:
    queue = tmp_path / "queue.db"
    store = make_durable(FileStore(tmp_path / "files"), queue, backend_names=NAMES)
    await store.append(MAIN, [entry(1)])  # type: ignore[arg-type]

    assert file_modes(tmp_path, "queue.db")["queue.db"] == "0o600"


# The queue's companions (SQLite's -wal and -shm, the lock file) are as private.
async def test_queue_companion_files_are_created_with_mode_0600(
    tmp_path: Path, private_umask: None, make_durable: MakeDurable
) -> None:
    queue = tmp_path / "queue.db"
    store = make_durable(FileStore(tmp_path / "files"), queue, backend_names=NAMES)
    await store.append(MAIN, [entry(1)])  # type: ignore[arg-type]

    modes = file_modes(tmp_path, "queue.db")
    assert set(modes) >= {"queue.db-wal", "queue.db-shm", "queue.db.lock"}
    assert set(modes.values()) == {"0o600"}, modes


# -- reopening ---------------------------------------------------------------------------


# contract 8: close(timeout) drains what it can and reports what remains.
async def test_close_with_backend_down_reports_the_entries_left_queued(
    tmp_path: Path, make_durable: MakeDurable
) -> None:
    backend = FaultyStore(FileStore(tmp_path / "files"))
    backend.down()
    store = make_durable(backend, tmp_path / "queue.db", backend_names=NAMES)
    await store.append(MAIN, [entry(1), entry(2)])  # type: ignore[arg-type]
    await store.append(SUB, [entry(3)])  # type: ignore[arg-type]
    await store.append(OTHER, [entry(4), entry(5), entry(6)])  # type: ignore[arg-type]

    report = await store.close(timeout=0.3)

    assert report.drained is False
    assert report.pending_entries == {"files": 6}
    assert report.parked_keys == {"files": 0}


# contract 8: on start, what a previous store on the queue file left is drained
# (without anyone calling flush), exactly once and in order.
async def test_entries_left_queued_are_delivered_when_the_queue_file_is_reopened(
    tmp_path: Path, make_durable: MakeDurable
) -> None:
    queue, root = tmp_path / "queue.db", tmp_path / "files"
    backend = FaultyStore(FileStore(root))
    backend.down()
    first = make_durable(backend, queue, backend_names=NAMES)
    await first.append(MAIN, [entry(1), entry(2)])  # type: ignore[arg-type]
    await first.append(SUB, [entry(3)])  # type: ignore[arg-type]
    await first.append(OTHER, [entry(4), entry(5), entry(6)])  # type: ignore[arg-type]
    await first.append(MAIN, [entry(7)])  # type: ignore[arg-type]
    report = await first.close(timeout=0.3)
    assert report.pending_entries == {"files": 7}
    files = FileStore(root)
    assert [await files.load(k) for k in (MAIN, SUB, OTHER)] == [None, None, None]  # type: ignore[arg-type]

    second = make_durable(FileStore(root), queue, backend_names=NAMES)
    await second.start()
    expected = [[entry(1), entry(2), entry(7)], [entry(3)], [entry(4), entry(5), entry(6)]]
    deadline = time.monotonic() + TIMEOUT
    while True:
        stored = [await files.load(k) for k in (MAIN, SUB, OTHER)]  # type: ignore[arg-type]
        if stored == expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert stored == expected

    report = await second.close(timeout=TIMEOUT)
    assert report.drained
    assert [await files.load(k) for k in (MAIN, SUB, OTHER)] == expected  # type: ignore[arg-type]


# -- durability setting ------------------------------------------------------------------


async def _pragma(store: DurableSessionStore, name: str) -> Any:
    """A PRAGMA as the queue's own writer connection sees it (internal, on purpose)."""
    writer = store.queue._writer
    return await writer.run(lambda: writer.conn.execute(f"PRAGMA {name}").fetchone()[0])


# contract 1: synchronous=FULL by default, NORMAL selectable; the setting reaches SQLite.
@pytest.mark.parametrize(
    ("tuning", "level"),
    [({}, 2), ({"synchronous": "FULL"}, 2), ({"synchronous": "NORMAL"}, 1)],
    ids=["default-FULL", "FULL", "NORMAL"],
)
async def test_synchronous_setting_is_applied_to_the_queue_connection(
    tmp_path: Path, make_durable: MakeDurable, tuning: dict[str, str], level: int
) -> None:
    store = make_durable(
        FileStore(tmp_path / "files"), tmp_path / "queue.db", backend_names=NAMES, **tuning
    )
    await store.append(MAIN, [entry(1)])  # type: ignore[arg-type]

    assert await _pragma(store, "synchronous") == level


# contract 1: a store in synchronous=NORMAL mode works end to end.
async def test_synchronous_normal_appends_and_delivers(
    tmp_path: Path, make_durable: MakeDurable
) -> None:
    root = tmp_path / "files"
    store = make_durable(
        FileStore(root), tmp_path / "queue.db", backend_names=NAMES, synchronous="NORMAL"
    )
    await store.append(MAIN, [entry(1), entry(2)])  # type: ignore[arg-type]
    await store.append(SUB, [entry(3)])  # type: ignore[arg-type]
    await store.flush(timeout=TIMEOUT)

    files = FileStore(root)
    assert await files.load(MAIN) == [entry(1), entry(2)]  # type: ignore[arg-type]
    assert await files.load(SUB) == [entry(3)]  # type: ignore[arg-type]
    assert (await store.status())["queue"]["synchronous"] == "NORMAL"


# contract 11: a bad setting is a clear error at construction, before any file exists.
@pytest.mark.parametrize("value", ["BOGUS", "OFF", "", None])
def test_unknown_synchronous_value_is_a_clear_value_error(tmp_path: Path, value: Any) -> None:
    queue = tmp_path / "queue.db"
    with pytest.raises(ValueError, match="synchronous"):
        DurableSessionStore(FileStore(tmp_path / "files"), queue, synchronous=value)
    assert not queue.exists()


# contract 1: the queue is a SQLite database in WAL mode.
async def test_queue_file_is_in_wal_mode(tmp_path: Path, make_durable: MakeDurable) -> None:
    queue = tmp_path / "queue.db"
    store = make_durable(FileStore(tmp_path / "files"), queue, backend_names=NAMES)
    await store.append(MAIN, [entry(1)])  # type: ignore[arg-type]
    await store.close(timeout=TIMEOUT)

    conn = sqlite3.connect(queue)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


# -- schema 1 files (before the producer protocol) ----------------------------------------


def _write_schema_1_queue(path: Path, acked: int, appended: int) -> None:
    """A queue file as walmirror 0.1 left it: one key, ``appended`` entries, a cursor
    that acknowledged ``acked`` of them at offset base 0."""
    from walmirror.schema import MIGRATIONS

    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO keys VALUES (1, 'proj', 'legacy', '', ?, ?)", (appended, time.time()))
    for seq in range(appended):
        body = json.dumps({"type": "user", "n": seq}).encode()
        conn.execute(
            "INSERT INTO entries (key_id, seq, appended_at, nbytes, body) VALUES (1, ?, ?, ?, ?)",
            (seq, time.time(), len(body), body),
        )
    conn.execute("INSERT INTO cursors VALUES ('mem', 1, 0, ?)", (acked,))
    conn.commit()
    conn.close()


async def test_a_schema_1_queue_is_migrated_and_its_in_doubt_entries_are_not_resent(
    tmp_path: Path, make_durable: MakeDurable
) -> None:
    # contract 2 across an upgrade: 2 entries acknowledged, 2 more stored by the old
    # protocol whose replies were lost, 1 never sent. Entries carry no uuid.
    from memory_store import MemoryStore

    from walmirror.schema import SCHEMA_VERSION

    key = {"project_key": "proj", "session_id": "legacy"}
    backend = MemoryStore()
    await backend.append(key, [{"type": "user", "n": n} for n in range(4)])  # type: ignore[arg-type]
    queue = tmp_path / "old.db"
    _write_schema_1_queue(queue, acked=2, appended=5)
    store = make_durable(backend, queue, backend_names=("mem",))
    await store.flush(timeout=10)
    assert await backend.load(key) == [{"type": "user", "n": n} for n in range(5)]  # type: ignore[arg-type]
    status = await store.status()
    assert status["queue"]["producer_id"]
    await store.append(key, [{"type": "user", "n": 5}])  # type: ignore[arg-type]
    await store.flush(timeout=10)
    assert len(await backend.load(key) or []) == 6  # type: ignore[arg-type]
    conn = sqlite3.connect(queue)
    try:
        version = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    finally:
        conn.close()
    assert int(version[0]) == SCHEMA_VERSION
