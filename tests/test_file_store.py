"""Tests for walmirror.backends.file.FileStore."""

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

from walmirror.backend import is_offset_aware
from walmirror.backends import file as file_module
from walmirror.backends.file import CorruptTranscriptError, FileStore
from walmirror.errors import (
    InvalidEntryError,
    InvalidKeyError,
    OffsetConflictError,
    OffsetGapError,
)

KEY: SessionKey = {"project_key": "proj", "session_id": "sess"}
SUB: SessionKey = {"project_key": "proj", "session_id": "sess", "subpath": "subagents/agent-1"}


def entries(count: int, start: int = 0) -> list[Any]:
    return [{"type": "user", "uuid": f"u{i}", "n": i} for i in range(start, start + count)]


def transcript(root: Path, key: SessionKey = KEY) -> Path:
    if "subpath" in key:
        return root / "proj" / "sess" / (key["subpath"] + ".jsonl")
    return root / "proj" / "sess.jsonl"


def sidecar(root: Path) -> Path:
    return root / "proj" / ".walmirror" / "sess.summary.json"


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


def test_is_offset_aware(store: FileStore) -> None:
    assert is_offset_aware(store)


# --- Layout -------------------------------------------------------------


async def test_main_transcript_is_cli_style_jsonl(store: FileStore, root: Path) -> None:
    await store.append(KEY, [{"type": "user", "text": "héllo"}, {"type": "x", "n": 1}])
    assert transcript(root).read_bytes() == (
        '{"type":"user","text":"héllo"}\n{"type":"x","n":1}\n'.encode()
    )


async def test_subagent_transcript_lives_under_session_directory(
    store: FileStore, root: Path
) -> None:
    await store.append(SUB, entries(1))
    assert (root / "proj" / "sess" / "subagents" / "agent-1.jsonl").is_file()
    assert await store.list_subkeys(KEY) == ["subagents/agent-1"]


async def test_summary_sidecar_is_hidden_and_not_jsonl(store: FileStore, root: Path) -> None:
    await store.append(KEY, entries(1))
    assert sidecar(root).is_file()
    assert [p.name for p in (root / "proj").glob("*.jsonl")] == ["sess.jsonl"]


async def test_append_of_empty_list_creates_nothing(store: FileStore, root: Path) -> None:
    await store.append(KEY, [])
    assert all_files(root) == []
    assert await store.load(KEY) is None


async def test_load_of_never_written_key_returns_none(store: FileStore) -> None:
    assert await store.load(KEY) is None
    assert await store.length(KEY) == 0


async def test_delete_of_main_key_removes_transcript_subagents_and_sidecar(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(1))
    await store.delete(KEY)
    assert all_files(root / "proj") == [root / "proj" / ".walmirror"]
    assert await store.length(KEY) == 0
    assert await store.list_session_summaries("proj") == []


async def test_delete_of_subpath_keeps_main_transcript_and_summary(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, entries(2))
    await store.append(SUB, entries(1))
    await store.delete(SUB)
    assert not transcript(root, SUB).exists()
    assert await store.load(KEY) == entries(2)
    assert len(await store.list_session_summaries("proj")) == 1


async def test_created_files_and_directories_are_owner_only(
    store: FileStore, root: Path, umask_022: None
) -> None:
    await store.append(KEY, entries(1))
    await store.append(SUB, entries(1))
    for path in (transcript(root), transcript(root, SUB), sidecar(root)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in (root, root / "proj", root / "proj" / "sess", sidecar(root).parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


async def test_file_mode_is_configurable(root: Path, umask_022: None) -> None:
    store = FileStore(root, file_mode=0o640, dir_mode=0o750)
    await store.append(KEY, entries(1))
    assert stat.S_IMODE(transcript(root).stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "proj").stat().st_mode) == 0o750


# --- Offsets ------------------------------------------------------------


async def test_append_at_returns_new_length(store: FileStore) -> None:
    assert await store.append_at(KEY, 0, entries(2)) == 2
    assert await store.append_at(KEY, 2, entries(3, start=2)) == 5
    assert await store.length(KEY) == 5
    assert await store.load(KEY) == entries(5)


async def test_append_at_repeat_is_a_noop(store: FileStore, root: Path) -> None:
    await store.append_at(KEY, 0, entries(3))
    before = transcript(root).read_bytes()
    assert await store.append_at(KEY, 0, entries(3)) == 3
    assert await store.append_at(KEY, 1, entries(2, start=1)) == 3
    assert transcript(root).read_bytes() == before


async def test_append_at_partial_overlap_appends_only_new_suffix(store: FileStore) -> None:
    await store.append_at(KEY, 0, entries(3))
    assert await store.append_at(KEY, 1, entries(4, start=1)) == 5
    assert await store.load(KEY) == entries(5)


async def test_append_at_overlap_compares_parsed_json_not_bytes(
    store: FileStore, root: Path
) -> None:
    await store.append_at(KEY, 0, [{"type": "x", "a": 1, "b": [1, 2]}])
    assert await store.append_at(KEY, 0, [{"b": [1, 2], "a": 1, "type": "x"}]) == 1
    assert await store.load(KEY) == [{"type": "x", "a": 1, "b": [1, 2]}]


async def test_append_at_conflicting_overlap_raises_and_leaves_file_unchanged(
    store: FileStore, root: Path
) -> None:
    await store.append_at(KEY, 0, entries(3))
    before = transcript(root).read_bytes()
    different = [*entries(1, start=2), {"type": "user", "uuid": "other"}]  # offsets 2, 3
    different[0] = {**different[0], "n": 99}
    with pytest.raises(OffsetConflictError) as info:
        await store.append_at(KEY, 2, different)
    assert (info.value.offset, info.value.length) == (2, 3)
    assert transcript(root).read_bytes() == before
    assert await store.length(KEY) == 3


async def test_append_at_gap_raises(store: FileStore, root: Path) -> None:
    await store.append_at(KEY, 0, entries(2))
    with pytest.raises(OffsetGapError) as info:
        await store.append_at(KEY, 3, entries(1, start=3))
    assert (info.value.offset, info.value.length) == (3, 2)
    assert await store.length(KEY) == 2


async def test_append_at_gap_on_unknown_key_creates_nothing(store: FileStore, root: Path) -> None:
    with pytest.raises(OffsetGapError):
        await store.append_at(KEY, 1, entries(1))
    assert all_files(root) == []


async def test_append_at_rejects_negative_offset(store: FileStore) -> None:
    with pytest.raises(ValueError):
        await store.append_at(KEY, -1, entries(1))


async def test_plain_append_continues_after_append_at(store: FileStore) -> None:
    await store.append_at(KEY, 0, entries(2))
    await store.append(KEY, entries(1, start=2))
    assert await store.append_at(KEY, 3, entries(1, start=3)) == 4
    assert await store.load(KEY) == entries(4)


# --- Crash repair -------------------------------------------------------


@pytest.mark.parametrize("first_call", ["length", "load", "append", "append_at"])
async def test_torn_last_line_is_repaired_before_use(
    store: FileStore, root: Path, first_call: str
) -> None:
    await store.append(KEY, entries(2))
    clean = transcript(root).read_bytes()
    with transcript(root).open("ab") as f:
        f.write(b'{"type":"user","uuid":"torn","n"')  # a crash mid-write
    fresh = FileStore(root)  # as after a restart: no cache
    if first_call == "length":
        assert await fresh.length(KEY) == 2
    elif first_call == "load":
        assert await fresh.load(KEY) == entries(2)
    elif first_call == "append":
        await fresh.append(KEY, entries(1, start=2))
    else:
        assert await fresh.append_at(KEY, 2, entries(1, start=2)) == 3
    assert transcript(root).read_bytes().startswith(clean)
    assert b"torn" not in transcript(root).read_bytes()
    assert await fresh.append_at(KEY, 2, entries(2, start=2)) == 4
    assert await fresh.load(KEY) == entries(4)


async def test_torn_only_line_leaves_key_empty(store: FileStore, root: Path) -> None:
    transcript(root).parent.mkdir(parents=True)
    transcript(root).write_bytes(b'{"type":"us')
    assert await store.length(KEY) == 0
    assert await store.load(KEY) is None
    assert await store.append_at(KEY, 0, entries(1)) == 1
    assert await store.load(KEY) == entries(1)


async def test_corrupt_middle_line_raises_without_content(store: FileStore, root: Path) -> None:
    transcript(root).parent.mkdir(parents=True)
    transcript(root).write_bytes(b'{"type":"x"}\nsecret-garbage\n{"type":"y"}\n')
    with pytest.raises(CorruptTranscriptError, match="line 2") as info:
        await store.load(KEY)
    assert "secret" not in str(info.value)


async def test_failed_write_is_rolled_back(
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


# --- Other writers ------------------------------------------------------


async def test_length_cache_notices_another_writer(root: Path) -> None:
    mine, theirs = FileStore(root), FileStore(root)
    await mine.append(KEY, entries(2))
    assert await mine.length(KEY) == 2
    await theirs.append(KEY, entries(3, start=2))
    assert await mine.length(KEY) == 5
    assert await mine.append_at(KEY, 5, entries(1, start=5)) == 6
    assert await theirs.length(KEY) == 6


async def test_length_cache_is_dropped_when_another_writer_recreates_the_file(
    root: Path,
) -> None:
    mine, theirs = FileStore(root), FileStore(root)
    await mine.append(KEY, entries(3))
    assert await mine.length(KEY) == 3
    await theirs.delete(KEY)
    await theirs.append(KEY, entries(1, start=10))
    assert await mine.length(KEY) == 1
    assert await mine.load(KEY) == entries(1, start=10)


async def test_overlap_with_another_writers_entries_raises_conflict(root: Path) -> None:
    mine, theirs = FileStore(root), FileStore(root)
    await mine.append_at(KEY, 0, entries(2))
    await theirs.append_at(KEY, 2, entries(1, start=100))
    with pytest.raises(OffsetConflictError):
        await mine.append_at(KEY, 2, entries(1, start=2))


async def test_append_waits_for_a_file_lock_held_by_another_process(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, entries(1))
    # A separate open file description conflicts like another process's flock.
    fd = os.open(transcript(root), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pending = asyncio.create_task(store.append(KEY, entries(1, start=1)))
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
        pending = asyncio.create_task(store.append(KEY, entries(1, start=1)))
        await asyncio.sleep(0.2)
        transcript(root).unlink()  # another host deletes the session meanwhile
    finally:
        os.close(fd)
    await asyncio.wait_for(pending, timeout=10)
    assert await store.load(KEY) == entries(1, start=1)


_WRITER = """
import asyncio, sys
from walmirror.backends.file import FileStore

async def main(root: str, tag: str, batches: int, size: int) -> None:
    store = FileStore(root)
    key = {"project_key": "proj", "session_id": "sess"}
    for b in range(batches):
        batch = [{"type": "x", "w": tag, "i": b * size + j} for j in range(size)]
        await store.append(key, batch)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def test_two_processes_appending_the_same_key_lose_nothing(
    store: FileStore, root: Path
) -> None:
    batches, size = 60, 7
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER, str(root), tag, str(batches), str(size)
        )
        for tag in ("a", "b")
    ]
    assert [await p.wait() for p in procs] == [0, 0]

    lines = transcript(root).read_bytes().split(b"\n")
    assert lines[-1] == b""
    parsed = [json.loads(line) for line in lines[:-1]]
    assert len(parsed) == 2 * batches * size
    for tag in ("a", "b"):
        assert [e["i"] for e in parsed if e["w"] == tag] == list(range(batches * size))
    assert await store.length(KEY) == 2 * batches * size
    # The summary folded every entry exactly once, even with two writers.
    with sidecar(root).open() as f:
        assert json.load(f)["folded"] == 2 * batches * size


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
    ],
    ids=repr,
)
async def test_invalid_key_raises_and_creates_nothing(root: Path, key: Any) -> None:
    store = FileStore(root)
    calls = [
        store.append(key, entries(1)),
        store.append_at(key, 0, entries(1)),
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
        {"type": "x", "secret": "\ud800"},
        {"type": "x", "secret": object()},
        ["not", "a", "dict"],
    ],
    ids=["set", "nan", "lone-surrogate", "object", "list"],
)
async def test_unserialisable_entry_raises_and_writes_nothing(
    store: FileStore, root: Path, bad: Any
) -> None:
    await store.append(KEY, entries(1))
    before = transcript(root).read_bytes()
    with pytest.raises(InvalidEntryError) as info:
        await store.append(KEY, [*entries(1, start=1), bad])
    assert "secret" not in str(info.value)
    with pytest.raises(InvalidEntryError):
        await store.append_at(KEY, 1, [*entries(1, start=1), bad])
    assert transcript(root).read_bytes() == before


async def test_unserialisable_entry_for_new_key_creates_nothing(
    store: FileStore, root: Path
) -> None:
    with pytest.raises(InvalidEntryError):
        await store.append(KEY, [{"type": "x", "bad": {1}}])
    assert all_files(root) == []


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
    for batch in TITLED:
        await store.append(KEY, batch)
    summary = await only_summary(store)
    assert summary["data"] == expected_data(TITLED)
    assert set(summary) == {"session_id", "mtime", "data"}  # no internal fields


async def test_summary_mtime_is_the_transcript_mtime(store: FileStore, root: Path) -> None:
    await store.append(KEY, TITLED[0])
    summary = await only_summary(store)
    [listed] = await store.list_sessions("proj")
    assert summary["mtime"] == listed["mtime"] == transcript(root).stat().st_mtime_ns // 1_000_000


@pytest.mark.parametrize("crash", ["sidecar-missing", "sidecar-rolled-back"])
async def test_summary_catches_up_after_crash_before_sidecar_write(
    store: FileStore, root: Path, crash: str
) -> None:
    await store.append(KEY, TITLED[0])
    old_sidecar = sidecar(root).read_bytes()
    await store.append(KEY, TITLED[1])
    # The transcript write of TITLED[1] landed; its sidecar write did not.
    if crash == "sidecar-missing":
        sidecar(root).unlink()
    else:
        sidecar(root).write_bytes(old_sidecar)
    await store.append(KEY, TITLED[2])
    assert (await only_summary(store))["data"] == expected_data(TITLED)


async def test_repeat_catches_up_sidecar_without_refolding(store: FileStore, root: Path) -> None:
    await store.append_at(KEY, 0, TITLED[0])
    old_sidecar = sidecar(root).read_bytes()
    await store.append_at(KEY, 1, TITLED[1])
    sidecar(root).write_bytes(old_sidecar)  # crash before the sidecar write
    # The flusher's retry after the crash is a repeat: nothing new is written,
    # the sidecar is caught up, and the repeated entry is not folded twice.
    assert await store.append_at(KEY, 1, TITLED[1]) == 2
    assert (await only_summary(store))["data"] == expected_data(TITLED[:2])
    # A repeat of an older batch must not fold it again ("one" would win).
    assert await store.append_at(KEY, 0, TITLED[0]) == 2
    assert (await only_summary(store))["data"]["custom_title"] == "two"


async def test_summary_is_rebuilt_from_transcript_when_sidecar_is_corrupt(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, TITLED[0])
    await store.append(KEY, TITLED[1])
    sidecar(root).write_bytes(b"{not json")
    await store.append(KEY, TITLED[2])
    assert (await only_summary(store))["data"] == expected_data(TITLED)


async def test_summary_of_a_recreated_session_starts_fresh(store: FileStore) -> None:
    await store.append(KEY, TITLED[0])
    await store.delete(KEY)
    await store.append(KEY, TITLED[1])
    assert (await only_summary(store))["data"] == expected_data(TITLED[1:2])


async def test_summary_starts_fresh_when_transcript_was_removed_outside_the_store(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, TITLED[0])
    await store.append(KEY, TITLED[1])
    transcript(root).unlink()  # e.g. an operator's retention sweep; the sidecar remains
    await store.append(KEY, TITLED[2])
    assert (await only_summary(store))["data"] == expected_data(TITLED[2:])


async def test_failed_sidecar_write_does_not_fail_the_append(
    store: FileStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    await store.append(KEY, TITLED[0])
    monkeypatch.setattr(FileStore, "_write_sidecar", disk_full)
    await store.append(KEY, TITLED[1])  # durable: raising would make the SDK resend it
    monkeypatch.undo()
    assert await store.load(KEY) == TITLED[0] + TITLED[1]
    await store.append(KEY, TITLED[2])
    assert (await only_summary(store))["data"] == expected_data(TITLED)


async def test_summaries_include_sessions_with_hidden_names(store: FileStore) -> None:
    await store.append({"project_key": "proj", "session_id": ".hidden"}, TITLED[0])
    [summary] = await store.list_session_summaries("proj")
    assert summary["session_id"] == ".hidden"


async def test_delete_removes_sidecar_tmp_files_left_by_a_crash(
    store: FileStore, root: Path
) -> None:
    await store.append(KEY, TITLED[0])
    await store.append({"project_key": "proj", "session_id": "sess.summary.json.1"}, TITLED[0])
    leftover = sidecar(root).parent / ".sess.summary.json.123.0badc0de.tmp"
    leftover.write_bytes(b"{}")
    await store.delete(KEY)
    assert sorted(p.name for p in sidecar(root).parent.iterdir()) == [
        "sess.summary.json.1.summary.json"
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
