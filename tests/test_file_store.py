"""Tests for walmirror.backends.file.FileStore: what the shared protocol suite
(tests/test_protocol_backends.py) cannot say about files: the CLI's layout, the
state files beside it, crashes between the two writes, and other processes."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.testing.session_store_conformance import run_session_store_conformance
from claude_agent_sdk.types import SessionKey

from walmirror.backends import file as file_module
from walmirror.backends.file import CorruptTranscriptError, FileStore
from walmirror.errors import InvalidEntryError, InvalidKeyError, PermanentBackendError
from walmirror.protocol import Batch, MarkBehindError, Receipt, encode_entry, is_producer_store

KEY: SessionKey = {"project_key": "proj", "session_id": "sess"}
SUB: SessionKey = {"project_key": "proj", "session_id": "sess", "subpath": "subagents/agent-1"}


def entries(count: int, start: int = 0) -> list[Any]:
    return [{"type": "user", "uuid": f"u{i}", "n": i} for i in range(start, start + count)]


def batch(producer: str, first: int, count: int, expect: int | None = None) -> Batch:
    return Batch.of(producer, first, entries(count, start=first), expect)


def transcript(root: Path, key: SessionKey = KEY) -> Path:
    if "subpath" in key:
        return root / "proj" / "sess" / (key["subpath"] + ".jsonl")
    return root / "proj" / "sess.jsonl"


def state_file(root: Path, key: SessionKey = KEY) -> Path:
    if "subpath" in key:
        return root / "proj" / ".walmirror" / "sess" / (key["subpath"] + ".state.json")
    return root / "proj" / ".walmirror" / "sess.state.json"


def state(root: Path, key: SessionKey = KEY) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(state_file(root, key).read_bytes())
    return doc


def lines(items: list[Any]) -> bytes:
    return b"".join(encode_entry(e) + b"\n" for e in items)


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> FileStore:
    return FileStore(root)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --- The SDK's contract ---------------------------------------------------


async def test_passes_sdk_conformance_suite(tmp_path: Path) -> None:
    await run_session_store_conformance(lambda: FileStore(tmp_path / uuid.uuid4().hex))


def test_speaks_the_producer_protocol(store: FileStore) -> None:
    assert is_producer_store(store)


def test_corrupt_transcript_error_is_the_shared_permanent_error() -> None:
    assert issubclass(CorruptTranscriptError, PermanentBackendError)


# --- Layout -------------------------------------------------------------


async def test_main_transcript_is_cli_style_jsonl(store: FileStore, root: Path) -> None:
    await store.append(KEY, [{"type": "user", "text": "héllo"}, {"type": "x", "n": 1}])
    assert transcript(root).read_bytes() == (
        '{"type":"user","text":"héllo"}\n{"type":"x","n":1}\n'.encode()
    )


async def test_batches_land_as_their_canonical_lines_byte_for_byte(
    store: FileStore, root: Path
) -> None:
    first = Batch.of("pa", 0, [{"type": "user", "text": "héllo", "odd": "\ud800"}])
    second = batch("pb", 0, 2)
    await store.append_batch(KEY, first)
    await store.append_batch(KEY, second)
    await store.append_batch(KEY, second)  # a repeat adds nothing, not even a blank line
    expected = b"".join(b + b"\n" for b in [*first.encoded, *second.encoded])
    assert transcript(root).read_bytes() == expected


async def test_subagent_transcript_lives_under_session_directory(
    store: FileStore, root: Path
) -> None:
    await store.append(SUB, entries(1))
    assert (root / "proj" / "sess" / "subagents" / "agent-1.jsonl").is_file()
    assert await store.list_subkeys(KEY) == ["subagents/agent-1"]


async def test_state_files_are_hidden_and_not_jsonl(store: FileStore, root: Path) -> None:
    await store.append_batch(KEY, batch("pa", 0, 1))
    await store.append_batch(SUB, batch("pa", 0, 1))
    assert state_file(root).is_file() and state_file(root, SUB).is_file()
    assert [p.name for p in (root / "proj").glob("*.jsonl")] == ["sess.jsonl"]
    assert not list((root / "proj" / ".walmirror").rglob("*.jsonl"))


async def test_state_file_holds_marks_size_and_lines(store: FileStore, root: Path) -> None:
    await store.append_batch(KEY, batch("pa", 0, 2))
    await store.append(KEY, entries(1, start=2))
    await store.append_batch(KEY, batch("pb", 10, 3))
    doc = state(root)
    assert doc["marks"] == {"pa": 1, "pb": 12}
    assert doc["size"] == transcript(root).stat().st_size
    assert doc["lines"] == 6 == await store.length(KEY)


async def test_append_of_empty_list_creates_nothing(store: FileStore, root: Path) -> None:
    await store.append(KEY, [])
    assert all_files(root) == []
    assert await store.load(KEY) is None


async def test_load_of_never_written_key_returns_none(store: FileStore, root: Path) -> None:
    assert await store.load(KEY) is None
    assert await store.length(KEY) == 0
    assert await store.producer_mark(KEY, "pa") is None
    assert all_files(root) == []


async def test_delete_without_marks_removes_transcripts_and_state_files(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(1))
    await store.delete(KEY)
    assert all_files(root / "proj") == [root / "proj" / ".walmirror"]
    assert await store.length(KEY) == 0
    assert await store.list_session_summaries("proj") == []


async def test_delete_keeps_each_keys_marks_as_a_tombstone(store: FileStore, root: Path) -> None:
    # contract 5: the marks outlive the transcripts, main key and subkeys alike.
    await store.append_batch(KEY, batch("pa", 0, 2))
    await store.append_batch(SUB, batch("pa", 0, 3))
    await store.delete(KEY)
    assert not transcript(root).exists() and not transcript(root, SUB).exists()
    assert state(root) == {"size": 0, "lines": 0, "marks": {"pa": 1}}
    assert state(root, SUB) == {"size": 0, "lines": 0, "marks": {"pa": 2}}
    assert await store.producer_mark(SUB, "pa") == 2


async def test_a_deleted_key_is_not_listed(store: FileStore) -> None:
    # contract 5: a tombstone is not a session.
    await store.append_batch(KEY, batch("pa", 0, 2))
    await store.append_batch(SUB, batch("pa", 0, 1))
    await store.delete(KEY)
    assert await store.list_sessions("proj") == []
    assert await store.list_subkeys(KEY) == []
    assert await store.list_session_summaries("proj") == []


async def test_a_retry_after_delete_is_a_no_op_that_creates_no_file(
    store: FileStore, root: Path
) -> None:
    # contract 5: nothing written before the delete comes back.
    await store.append_batch(KEY, batch("pa", 0, 3))
    await store.delete(KEY)
    assert await store.append_batch(KEY, batch("pa", 0, 3)) == Receipt(0, 2, 0)
    assert not transcript(root).exists()
    assert await store.list_sessions("proj") == []
    assert await store.append_batch(KEY, batch("pa", 3, 1, expect=2)) == Receipt(1, 3, 1)
    assert await store.load(KEY) == entries(1, start=3)


async def test_delete_of_subpath_keeps_main_transcript_and_summary(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, entries(2))
    await store.append_batch(SUB, batch("pa", 0, 1))
    await store.delete(SUB)
    assert not transcript(root, SUB).exists()
    assert state(root, SUB)["marks"] == {"pa": 0}
    assert await store.load(KEY) == entries(2)
    assert len(await store.list_session_summaries("proj")) == 1


async def test_created_files_and_directories_are_owner_only(
    store: FileStore, root: Path, umask_022: None
) -> None:
    await store.append(KEY, entries(1))
    await store.append(SUB, entries(1))
    for path in (transcript(root), transcript(root, SUB), state_file(root), state_file(root, SUB)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in (root, root / "proj", root / "proj" / "sess", state_file(root).parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


async def test_file_mode_is_configurable(root: Path, umask_022: None) -> None:
    store = FileStore(root, file_mode=0o640, dir_mode=0o750)
    await store.append(KEY, entries(1))
    assert stat.S_IMODE(transcript(root).stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "proj").stat().st_mode) == 0o750


# --- Crashes between the transcript write and the state write ----------------

_CRASH_BEFORE_STATE = """
import asyncio, os, sys
from walmirror.backends.file import FileStore
from walmirror.protocol import Batch

real = FileStore._replace_state

def crash_after_the_transcript_write(self, key, state):
    if state.size > 0:  # the state that would acknowledge the lines just written
        os._exit(9)
    return real(self, key, state)

FileStore._replace_state = crash_after_the_transcript_write
key = {"project_key": "proj", "session_id": "sess"}
first, count = int(sys.argv[2]), int(sys.argv[3])
entries = [{"type": "user", "uuid": f"u{i}", "n": i} for i in range(first, first + count)]
asyncio.run(FileStore(sys.argv[1]).append_batch(key, Batch.of("pa", first, entries)))
"""


async def crash_before_state_write(root: Path, first: int, count: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASH_BEFORE_STATE, str(root), str(first), str(count)
    )
    assert await proc.wait() == 9


@pytest.mark.parametrize("stored_before", [0, 2], ids=["first-batch", "later-batch"])
async def test_a_crash_before_the_state_write_leaves_the_batch_unacknowledged(
    root: Path, stored_before: int
) -> None:
    # contract 2: SIGKILL between the backend's two writes; the retry lands once.
    if stored_before:
        await FileStore(root).append_batch(KEY, batch("pa", 0, stored_before))
    await crash_before_state_write(root, stored_before, 3)
    assert len(transcript(root).read_bytes().splitlines()) == stored_before + 3  # it got there
    fresh = FileStore(root)  # as after the restart
    assert await fresh.producer_mark(KEY, "pa") == (stored_before - 1 if stored_before else None)
    receipt = await fresh.append_batch(KEY, batch("pa", stored_before, 3))
    assert receipt == Receipt(3, stored_before + 2, stored_before + 3)
    assert transcript(root).read_bytes() == lines(entries(stored_before + 3))


async def test_the_tail_of_a_crashed_append_is_dropped_before_a_plain_append(
    store: FileStore, root: Path
) -> None:
    await store.append_batch(KEY, batch("pa", 0, 2))
    with transcript(root).open("ab") as f:  # complete lines the state never acknowledged
        f.write(lines(entries(2, start=100)))
    await FileStore(root).append(KEY, entries(1, start=2))
    assert await store.load(KEY) == entries(3)
    assert state(root)["lines"] == 3


async def test_a_failed_state_write_rolls_the_batch_back_and_the_retry_lands_once(
    store: FileStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.append_batch(KEY, batch("pa", 0, 2))
    before = transcript(root).read_bytes()

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileStore, "_replace_state", disk_full)
    with pytest.raises(OSError):
        await store.append_batch(KEY, batch("pa", 2, 3, expect=1))
    monkeypatch.undo()
    assert transcript(root).read_bytes() == before
    assert await store.producer_mark(KEY, "pa") == 1
    assert (await store.append_batch(KEY, batch("pa", 2, 3, expect=1))).appended == 3
    assert await store.load(KEY) == entries(5)


async def test_a_failed_transcript_write_is_rolled_back(
    store: FileStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.append(KEY, entries(2))
    before = transcript(root).read_bytes()
    real_write = os.write

    def half_then_disk_full(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_module.os, "write", half_then_disk_full)
    with pytest.raises(OSError):
        await store.append(KEY, entries(3, start=2))
    monkeypatch.undo()
    assert transcript(root).read_bytes() == before
    assert await store.length(KEY) == 2


@pytest.mark.parametrize("first_call", ["length", "load", "producer_mark", "append", "batch"])
async def test_torn_last_line_is_removed_before_use(
    store: FileStore, root: Path, first_call: str
) -> None:
    await store.append_batch(KEY, batch("pa", 0, 2))
    clean = transcript(root).read_bytes()
    with transcript(root).open("ab") as f:
        f.write(b'{"type":"user","uuid":"torn","n"')  # a crash mid-write
    fresh = FileStore(root)  # as after a restart
    if first_call == "length":
        assert await fresh.length(KEY) == 2
    elif first_call == "load":
        assert await fresh.load(KEY) == entries(2)
    elif first_call == "producer_mark":
        assert await fresh.producer_mark(KEY, "pa") == 1
    elif first_call == "append":
        await fresh.append(KEY, entries(1, start=2))
    else:
        assert (await fresh.append_batch(KEY, batch("pa", 2, 1, expect=1))).appended == 1
    assert transcript(root).read_bytes().startswith(clean)
    assert b"torn" not in transcript(root).read_bytes()
    assert await fresh.length(KEY) == state(root)["lines"]


async def test_torn_only_line_of_a_transcript_without_state_leaves_key_empty(
    store: FileStore, root: Path
) -> None:
    transcript(root).parent.mkdir(parents=True)
    transcript(root).write_bytes(b'{"type":"us')
    assert await store.length(KEY) == 0
    assert await store.load(KEY) is None
    assert (await store.append_batch(KEY, batch("pa", 0, 1))).appended == 1
    assert await store.load(KEY) == entries(1)


async def test_corrupt_middle_line_raises_without_content(store: FileStore, root: Path) -> None:
    transcript(root).parent.mkdir(parents=True)
    transcript(root).write_bytes(b'{"type":"x"}\nsecret-garbage\n{"type":"y"}\n')
    with pytest.raises(CorruptTranscriptError, match="line 2") as info:
        await store.load(KEY)
    assert "secret" not in str(info.value)


# --- Transcripts changed outside the store: marks unknown --------------------


async def test_a_transcript_without_state_is_adopted_with_no_marks(
    store: FileStore, root: Path
) -> None:
    # Written by the CLI or an older FileStore: kept as is, with no producer known.
    transcript(root).parent.mkdir(parents=True)
    transcript(root).write_bytes(lines(entries(2)))
    assert await store.length(KEY) == 2
    assert await store.producer_mark(KEY, "pa") is None
    with pytest.raises(MarkBehindError):
        await store.append_batch(KEY, batch("pa", 5, 1, expect=4))
    assert await store.append_batch(KEY, batch("pb", 0, 1)) == Receipt(1, 0, 3)
    assert state(root)["marks"] == {"pb": 0}
    assert (await store.list_session_summaries("proj"))[0]["data"] == fold_session_summary(
        None, KEY, [*entries(2), *entries(1)]
    )["data"]


@pytest.mark.parametrize("damage", ["transcript-deleted", "transcript-truncated"])
async def test_a_transcript_shorter_than_its_state_forgets_the_marks(
    store: FileStore, root: Path, damage: str
) -> None:
    # An operator removed acknowledged entries by hand: the producer must hear of it.
    await store.append_batch(KEY, batch("pa", 0, 3))
    if damage == "transcript-deleted":
        transcript(root).unlink()
    else:
        transcript(root).write_bytes(lines(entries(1)))
    assert await store.producer_mark(KEY, "pa") is None
    with pytest.raises(MarkBehindError) as caught:
        await store.append_batch(KEY, batch("pa", 3, 1, expect=2))
    assert caught.value.mark is None
    kept = 0 if damage == "transcript-deleted" else 1
    assert await store.length(KEY) == kept


async def test_an_unreadable_state_file_means_marks_unknown(store: FileStore, root: Path) -> None:
    await store.append_batch(KEY, batch("pa", 0, 2))
    state_file(root).write_bytes(b"{not json")
    with pytest.raises(MarkBehindError):
        await store.append_batch(KEY, batch("pa", 2, 1, expect=1))
    assert await store.load(KEY) == entries(2)


# --- Other writers ------------------------------------------------------


async def test_a_mark_written_by_another_instance_is_honoured(root: Path) -> None:
    # contract 2: another host (its own FileStore on the shared root) wrote the key.
    mine, theirs = FileStore(root), FileStore(root)
    await theirs.append_batch(KEY, batch("their-host", 0, 2))
    await mine.append_batch(KEY, batch("my-host", 0, 1))
    assert await mine.producer_mark(KEY, "their-host") == 1
    assert (await mine.append_batch(KEY, batch("their-host", 0, 2))).appended == 0  # late retry
    assert await theirs.append_batch(KEY, batch("their-host", 2, 1, expect=1)) == Receipt(1, 2, 4)
    assert state(root)["marks"] == {"their-host": 2, "my-host": 0}


async def test_length_sees_another_writer(root: Path) -> None:
    mine, theirs = FileStore(root), FileStore(root)
    await mine.append(KEY, entries(2))
    assert await mine.length(KEY) == 2
    await theirs.append(KEY, entries(3, start=2))
    assert await mine.length(KEY) == 5


async def test_a_session_recreated_by_another_writer_is_read_fresh(root: Path) -> None:
    mine, theirs = FileStore(root), FileStore(root)
    await mine.append(KEY, entries(3))
    await theirs.delete(KEY)
    await theirs.append(KEY, entries(1, start=10))
    assert await mine.length(KEY) == 1
    assert await mine.load(KEY) == entries(1, start=10)


async def test_append_waits_for_a_file_lock_held_by_another_process(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, entries(1))
    # A separate open file description conflicts like another process's flock.
    fd = os.open(transcript(root), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pending = asyncio.create_task(store.append_batch(KEY, batch("pa", 1, 1)))
        await asyncio.sleep(0.2)
        assert not pending.done()
    finally:
        os.close(fd)  # releases the lock
    await asyncio.wait_for(pending, timeout=10)
    assert await store.load(KEY) == entries(2)


async def test_append_waiting_on_a_deleted_file_writes_to_the_new_file(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, entries(1))
    fd = os.open(transcript(root), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pending = asyncio.create_task(store.append_batch(KEY, batch("pa", 1, 1)))
        await asyncio.sleep(0.2)
        transcript(root).unlink()  # another host deletes the session meanwhile
        state_file(root).unlink()
    finally:
        os.close(fd)
    await asyncio.wait_for(pending, timeout=10)
    assert await store.load(KEY) == entries(1, start=1)


_WRITER = """
import asyncio, sys
from walmirror.backends.file import FileStore
from walmirror.protocol import Batch

async def main(root: str, tag: str, batches: int, size: int) -> None:
    store = FileStore(root)
    key = {"project_key": "proj", "session_id": "sess"}
    for b in range(batches):
        entries = [{"type": "x", "w": tag, "i": b * size + j} for j in range(size)]
        sent = Batch.of(tag, b * size, entries, None if b == 0 else b * size - 1)
        await store.append_batch(key, sent)
        await store.append_batch(key, sent)  # every reply "lost" once

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def test_two_processes_writing_one_key_land_each_entry_once(
    store: FileStore, root: Path
) -> None:
    # contract 2: two hosts at once, each retrying every batch.
    batches, size = 40, 7
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER, str(root), tag, str(batches), str(size)
        )
        for tag in ("a", "b")
    ]
    assert [await p.wait() for p in procs] == [0, 0]

    raw = transcript(root).read_bytes().split(b"\n")
    assert raw[-1] == b""
    parsed = [json.loads(line) for line in raw[:-1]]
    assert len(parsed) == 2 * batches * size
    for tag in ("a", "b"):
        assert [e["i"] for e in parsed if e["w"] == tag] == list(range(batches * size))
    assert await store.length(KEY) == 2 * batches * size
    assert state(root)["marks"] == {"a": batches * size - 1, "b": batches * size - 1}
    # The summary folded every entry exactly once, in storage order.
    [summary] = await store.list_session_summaries("proj")
    assert summary["data"] == fold_session_summary(None, KEY, parsed)["data"]


# --- Bad input ----------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        {"project_key": "proj", "session_id": "sess", "subpath": ""},
        {"project_key": "proj", "session_id": "sess", "subpath": "../../escape"},
        {"project_key": "proj", "session_id": "sess", "subpath": "a/../../b"},
        {"project_key": "proj", "session_id": ".."},
        {"project_key": "proj", "session_id": "se\x00ss"},
        {"project_key": "proj", "session_id": "sess", "subpath": "/etc/x"},
        {"project_key": "a/b", "session_id": "sess"},
        {"project_key": "", "session_id": "sess"},
        {"project_key": "proj", "session_id": ".walmirror"},
        {"project_key": "proj", "session_id": "s.jsonl"},
        {"project_key": "proj", "session_id": "sess", "subpath": "d.jsonl/agent"},
        {"project_key": "proj", "session_id": "s.state.json"},
        {"project_key": "proj", "session_id": "sess", "subpath": "d.state.json/agent"},
    ],
    ids=repr,
)
async def test_invalid_key_raises_and_creates_nothing(root: Path, key: Any) -> None:
    store = FileStore(root)
    calls = [
        store.append(key, entries(1)),
        store.append_batch(key, batch("pa", 0, 1)),
        store.producer_mark(key, "pa"),
        store.length(key),
        store.load(key),
        store.delete(key),
    ]
    for call in calls:
        with pytest.raises(InvalidKeyError):
            await call
    assert all_files(root) == []


@pytest.mark.parametrize("project_key", ["", "..", "a/b", "x\x00"])
async def test_invalid_project_key_in_listings_raises(store: FileStore, project_key: str) -> None:
    with pytest.raises(InvalidKeyError):
        await store.list_sessions(project_key)
    with pytest.raises(InvalidKeyError):
        await store.list_session_summaries(project_key)


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "x", "secret": {1, 2}},
        {"type": "x", "secret": float("nan")},
        {"type": "x", "secret": object()},
        ["not", "a", "dict"],
    ],
    ids=["set", "nan", "object", "list"],
)
async def test_unserialisable_entry_raises_and_writes_nothing(
    store: FileStore, root: Path, bad: Any
) -> None:
    await store.append(KEY, entries(1))
    before = transcript(root).read_bytes()
    with pytest.raises(InvalidEntryError) as info:
        await store.append(KEY, [*entries(1, start=1), bad])
    assert "secret" not in str(info.value)
    assert transcript(root).read_bytes() == before


async def test_a_lone_surrogate_is_stored_as_an_escape_and_read_back(store: FileStore) -> None:
    # contract 11: what the SDK's own stores accept, FileStore accepts.
    entry = {"type": "x", "text": "\ud800"}
    await store.append(KEY, [entry])
    assert await store.load(KEY) == [entry]


async def test_unserialisable_entry_for_new_key_creates_nothing(
    store: FileStore, root: Path
) -> None:
    with pytest.raises(InvalidEntryError):
        await store.append(KEY, [{"type": "x", "bad": {1}}])
    assert all_files(root) == []


async def test_an_encoded_entry_holding_a_newline_is_refused(store: FileStore, root: Path) -> None:
    with pytest.raises(ValueError):
        await store.append_batch(KEY, Batch("pa", 0, [b'{"a":1}\n{"b":2}']))
    assert await store.load(KEY) is None


async def test_an_encoded_entry_that_is_not_a_json_object_is_refused(store: FileStore) -> None:
    # A main key folds what it appends, so it reads every line before writing it.
    with pytest.raises(ValueError):
        await store.append_batch(KEY, Batch("pa", 0, [b'{"a":1}', b'{"b":']))
    with pytest.raises(ValueError):
        await store.append_batch(KEY, Batch("pa", 0, [b'{"a":1},{"b":2}']))
    assert await store.load(KEY) is None
    assert await store.producer_mark(KEY, "pa") is None


# --- Summaries ----------------------------------------------------------

TITLED = [
    [{"type": "user", "timestamp": "2024-01-01T00:00:00.000Z", "customTitle": "one"}],
    [{"type": "user", "timestamp": "2024-01-01T00:00:01.000Z", "customTitle": "two"}],
    [{"type": "user", "timestamp": "2024-01-01T00:00:02.000Z", "customTitle": "three"}],
]


def expected_data(batches: list[list[Any]]) -> dict[str, Any]:
    flat = [e for batch in batches for e in batch]
    return fold_session_summary(None, KEY, flat)["data"]


async def only_summary(store: FileStore) -> dict[str, Any]:
    summaries = await store.list_session_summaries("proj")
    assert len(summaries) == 1
    return dict(summaries[0])


async def test_summary_is_the_fold_of_all_entries(store: FileStore) -> None:
    for titled in TITLED:
        await store.append(KEY, titled)
    summary = await only_summary(store)
    assert summary["data"] == expected_data(TITLED)
    assert set(summary) == {"session_id", "mtime", "data"}  # no internal fields


async def test_summary_mtime_is_the_transcript_mtime(store: FileStore, root: Path) -> None:
    await store.append(KEY, TITLED[0])
    summary = await only_summary(store)
    [listed] = await store.list_sessions("proj")
    assert summary["mtime"] == listed["mtime"] == transcript(root).stat().st_mtime_ns // 1_000_000


async def test_summary_folds_a_batch_once_when_a_crash_hit_before_its_state_write(
    root: Path,
) -> None:
    await FileStore(root).append_batch(KEY, Batch.of("pa", 0, TITLED[0]))
    await crash_before_state_write(root, 1, 1)  # its lines landed, its state did not
    fresh = FileStore(root)
    await fresh.append_batch(KEY, Batch.of("pa", 1, TITLED[1], expect=0))
    assert (await only_summary(fresh))["data"] == expected_data(TITLED[:2])


async def test_a_repeated_batch_is_not_folded_again(store: FileStore) -> None:
    await store.append_batch(KEY, Batch.of("pa", 0, TITLED[0]))
    await store.append_batch(KEY, Batch.of("pa", 1, TITLED[1], expect=0))
    assert (await store.append_batch(KEY, Batch.of("pa", 0, TITLED[0]))).appended == 0
    assert (await only_summary(store))["data"]["custom_title"] == "two"  # "one" would win


async def test_summary_is_rebuilt_from_transcript_when_state_is_unreadable(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, TITLED[0])
    await store.append(KEY, TITLED[1])
    state_file(root).write_bytes(b"{not json")
    await store.append(KEY, TITLED[2])
    assert (await only_summary(store))["data"] == expected_data(TITLED)


async def test_summary_of_a_recreated_session_starts_fresh(store: FileStore) -> None:
    await store.append_batch(KEY, Batch.of("pa", 0, TITLED[0]))
    await store.delete(KEY)
    await store.append_batch(KEY, Batch.of("pa", 1, TITLED[1], expect=0))
    assert (await only_summary(store))["data"] == expected_data(TITLED[1:2])


async def test_summary_starts_fresh_when_transcript_was_removed_outside_the_store(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, TITLED[0])
    await store.append(KEY, TITLED[1])
    transcript(root).unlink()  # e.g. an operator's retention sweep; the state remains
    await store.append(KEY, TITLED[2])
    assert (await only_summary(store))["data"] == expected_data(TITLED[2:])


async def test_summaries_include_sessions_with_hidden_names(store: FileStore) -> None:
    await store.append({"project_key": "proj", "session_id": ".hidden"}, TITLED[0])
    [summary] = await store.list_session_summaries("proj")
    assert summary["session_id"] == ".hidden"


async def test_delete_removes_state_tmp_files_left_by_a_crash(store: FileStore, root: Path) -> None:
    await store.append(KEY, TITLED[0])
    await store.append({"project_key": "proj", "session_id": "sess.state.json.1"}, TITLED[0])
    leftover = state_file(root).parent / ".sess.state.json.123.0badc0de.tmp"
    leftover.write_bytes(b"{}")
    await store.delete(KEY)
    assert sorted(p.name for p in state_file(root).parent.iterdir()) == [
        "sess.state.json.1.state.json"
    ]


async def test_list_sessions_reports_epoch_ms_for_main_transcripts_only(
    store: FileStore,
) -> None:
    await store.append(KEY, entries(1))
    await store.append(SUB, entries(1))
    await store.append({"project_key": "proj", "session_id": "other"}, entries(1))
    listed = await store.list_sessions("proj")
    assert sorted(s["session_id"] for s in listed) == ["other", "sess"]
    assert all(s["mtime"] > 1e12 for s in listed)
    assert await store.list_sessions("unknown") == []
