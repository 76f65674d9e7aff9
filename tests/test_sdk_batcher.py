"""The SDK's own ``TranscriptMirrorBatcher`` through backend trouble: with walmirror and without.

This is the gap walmirror exists for. The batcher keeps frames in memory,
tries ``append`` three times (0.2 s and 0.8 s apart) and then drops the batch
and calls ``on_error``; after an ambiguous failure (the write landed, the
reply was lost) its retry stores the batch again. Given the same simulated
session and the same fault:

* ``DurableSessionStore`` under the batcher: ``append`` commits locally and
  returns, so the batcher never sees a failure; once the backend heals the
  backend holds every entry exactly once, in order.
* the batcher straight on the faulty backend: it drops entries (outage) or
  stores them twice (lost replies).

Frames go to ``<projects_dir>/<project_key>/<session_id>.jsonl`` and a
subagent file under ``<session_id>/subagents/``, so the SDK's own
``file_path_to_session_key`` maps them to main and subpath keys.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk._internal.session_store import file_path_to_session_key
from claude_agent_sdk._internal.transcript_mirror_batcher import (
    MIRROR_APPEND_BACKOFF_S,
    TranscriptMirrorBatcher,
)
from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry

from walmirror import DurableSessionStore
from walmirror.backends.file import FileStore
from walmirror.faults import FaultyStore

PROJECT = "-home-dev-app"
SESSION = "5b0c6a5e-2f4e-4c1e-9d7a-3c2b1a0f9e8d"
SUBAGENT = "subagents/agent-a1"

# The outage is several times the batcher's whole retry window (~1 s), in the
# middle of the session; both are kept short for the suite's run time.
RETRY_WINDOW = sum(MIRROR_APPEND_BACKOFF_S)
SESSION_SECONDS = 5.0
OUTAGE_START = 1.0
OUTAGE_SECONDS = 3.0
LOST_REPLY_SESSION_SECONDS = 1.5
FLUSH_EVERY_FRAMES = 4
FLUSH_TIMEOUT = 60.0  # only against hangs

# Nothing here hangs (an outage and a lost reply fail at once), so call_timeout only
# has to be out of reach of a healthy call on a saturated machine.
TUNING: dict[str, Any] = {"call_timeout": 10.0, "backoff_initial": 0.01, "backoff_max": 0.2}
# The fault draws come from random.Random(LOST_REPLY_SEED): its first draw (0.13) is
# under LOST_REPLY_RATE and its second (0.85) is not, so the very first write loses its
# reply and its retry lands. However few appends a loaded machine makes in the session,
# walmirror meets a lost reply and the bare batcher stores a batch twice.
LOST_REPLY_RATE = 0.3
LOST_REPLY_SEED = 1


@dataclass
class Session:
    """What a simulated session enqueued, and what the batcher reported."""

    projects_dir: Path
    enqueued: dict[str, list[SessionStoreEntry]] = field(default_factory=dict)
    errors: list[tuple[SessionKey | None, str]] = field(default_factory=list)

    @property
    def main_path(self) -> str:
        return str(self.projects_dir / PROJECT / f"{SESSION}.jsonl")

    @property
    def sub_path(self) -> str:
        return str(self.projects_dir / PROJECT / SESSION / f"{SUBAGENT}.jsonl")

    def key(self, path: str) -> SessionKey:
        key = file_path_to_session_key(path, str(self.projects_dir))
        assert key is not None, path
        return key

    async def on_error(self, key: SessionKey | None, message: str) -> None:
        self.errors.append((key, message))

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.enqueued.values())


RESULT = "result"  # a turn ended: the SDK awaits batcher.flush() before yielding it


async def run_session(store: SessionStore, projects_dir: Path, seconds: float) -> Session:
    """A simulated CLI session through the SDK's real batcher.

    The "CLI" writes frames on its own clock (1-3 entries every 20-50 ms,
    mostly to the main transcript, some to a subagent's, a ``result`` every
    few frames) into a pipe; the SDK's receive loop reads the pipe, enqueues
    each frame and awaits ``batcher.flush()`` on each ``result``, as
    ``Query._read_messages`` does. While a flush is stuck retrying, frames
    pile up in the pipe as they would in the CLI's stdout, so every run gets
    the same frames whatever the store does.
    """
    session = Session(projects_dir)
    batcher = TranscriptMirrorBatcher(
        store=store, projects_dir=str(projects_dir), on_error=session.on_error
    )
    paths = [session.main_path, session.sub_path]
    assert session.key(paths[0]) == {"project_key": PROJECT, "session_id": SESSION}
    assert session.key(paths[1]) == {
        "project_key": PROJECT,
        "session_id": SESSION,
        "subpath": SUBAGENT,
    }
    session.enqueued = {p: [] for p in paths}
    pipe: asyncio.Queue[tuple[str, list[SessionStoreEntry]] | str | None] = asyncio.Queue()

    async def cli() -> None:
        rng = random.Random(20240601)  # the same frames, in the same order, in every run
        parents: dict[str, str | None] = {p: None for p in paths}
        loop = asyncio.get_running_loop()
        started = loop.time()
        frame = 0
        while loop.time() - started < seconds:
            path = paths[0] if rng.random() < 0.75 else paths[1]
            entries: list[SessionStoreEntry] = []
            for _ in range(rng.randint(1, 3)):
                entry_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                n = len(session.enqueued[path]) + len(entries)
                role = "user" if n % 2 == 0 else "assistant"
                entries.append(
                    {  # type: ignore[typeddict-unknown-key]
                        "type": role,
                        "uuid": entry_uuid,
                        "parentUuid": parents[path],
                        "sessionId": SESSION,
                        "message": {"role": role, "content": f"#{n}"},
                    }
                )
                parents[path] = entry_uuid
            session.enqueued[path].extend(entries)
            pipe.put_nowait((path, entries))
            frame += 1
            if frame % FLUSH_EVERY_FRAMES == 0:
                pipe.put_nowait(RESULT)
            await asyncio.sleep(rng.uniform(0.02, 0.05))
        pipe.put_nowait(None)  # the CLI exits

    async def receive_loop() -> None:
        while (message := await pipe.get()) is not None:
            if message == RESULT:
                await batcher.flush()
            else:
                path, entries = message
                batcher.enqueue(path, entries)
        await batcher.close()  # the final flush at teardown

    await asyncio.gather(cli(), receive_loop())
    return session


@dataclass
class Tally:
    """Backend contents against what was enqueued, by uuid."""

    enqueued: int
    stored: int
    lost: int
    duplicated: int  # extra copies stored


async def tally(session: Session, backend: SessionStore) -> Tally:
    enqueued = stored = lost = duplicated = 0
    for path, sent in session.enqueued.items():
        held = await backend.load(session.key(path)) or []
        counts = Counter(e["uuid"] for e in held)
        enqueued += len(sent)
        stored += len(held)
        lost += sum(1 for e in sent if counts[e["uuid"]] == 0)
        duplicated += sum(c - 1 for c in counts.values() if c > 1)
    return Tally(enqueued, stored, lost, duplicated)


async def assert_exactly_once(session: Session, backend: SessionStore) -> None:
    for path, sent in session.enqueued.items():
        held = await backend.load(session.key(path)) or []
        assert [e["uuid"] for e in held] == [e["uuid"] for e in sent], path
        assert held == sent, path


def report(label: str, result: Tally, errors: int) -> None:
    print(
        f"{label}: enqueued={result.enqueued} stored={result.stored} "
        f"lost={result.lost} duplicated={result.duplicated} on_error={errors}"
    )


async def test_outage_mid_session_loses_nothing_with_walmirror_and_drops_without(
    tmp_path: Path,
) -> None:
    # contract 2: exactly once, in order, through an outage; contract 3: append does
    # not depend on backend health, so the batcher never sees the outage (no on_error).
    assert OUTAGE_SECONDS >= 3 * RETRY_WINDOW

    # (a) the SDK's batcher -> DurableSessionStore -> FaultyStore(FileStore), down for 3 s.
    durable_backend = FileStore(tmp_path / "durable-backend")
    durable_faulty = FaultyStore(durable_backend)
    async with DurableSessionStore(durable_faulty, tmp_path / "queue.db", **TUNING) as durable:
        durable_faulty.schedule_outage(OUTAGE_START, OUTAGE_SECONDS)
        session = await run_session(durable, tmp_path / "projects", SESSION_SECONDS)
        durable_faulty.up()
        await durable.flush(timeout=FLUSH_TIMEOUT)
    assert durable_faulty.injected["down"] > 0  # the flusher did meet the outage
    assert session.errors == []
    durable_tally = await tally(session, durable_backend)
    report("walmirror, outage", durable_tally, len(session.errors))
    await assert_exactly_once(session, durable_backend)

    # (b) the same workload and outage, the batcher straight on FaultyStore(FileStore).
    bare_backend = FileStore(tmp_path / "bare-backend")
    bare_faulty = FaultyStore(bare_backend)
    bare_faulty.schedule_outage(OUTAGE_START, OUTAGE_SECONDS)
    bare = await run_session(bare_faulty, tmp_path / "projects", SESSION_SECONDS)
    bare_faulty.up()
    bare_tally = await tally(bare, bare_backend)
    report("bare batcher, outage", bare_tally, len(bare.errors))
    assert bare.errors, "the batcher should have given up on batches during the outage"
    assert bare_tally.lost > 0
    assert bare_tally.stored < bare_tally.enqueued


@pytest.mark.parametrize(
    "make_backend",
    [lambda root: FileStore(root), lambda root: InMemorySessionStore()],
    ids=["file-store", "foreign-store"],
)
async def test_lost_replies_store_exactly_once_with_walmirror_and_twice_without(
    tmp_path: Path, make_backend: Any
) -> None:
    # contract 2: exactly once after timeouts whose write landed (lost replies);
    # the batcher's own retry stores such a batch again.
    rate, seed = LOST_REPLY_RATE, LOST_REPLY_SEED

    # the SDK's batcher -> DurableSessionStore -> FaultyStore(backend, lost replies)
    durable_backend: SessionStore = make_backend(tmp_path / "durable-backend")
    durable_faulty = FaultyStore(durable_backend, lost_reply_rate=rate, seed=seed)
    async with DurableSessionStore(durable_faulty, tmp_path / "queue.db", **TUNING) as durable:
        session = await run_session(durable, tmp_path / "projects", LOST_REPLY_SESSION_SECONDS)
        durable_faulty.reset_faults()
        await durable.flush(timeout=FLUSH_TIMEOUT)
    assert durable_faulty.injected["lost_reply"] > 0  # replies were lost on the way
    assert session.errors == []
    durable_tally = await tally(session, durable_backend)
    report("walmirror, lost replies", durable_tally, len(session.errors))
    await assert_exactly_once(session, durable_backend)

    # the same workload, the batcher straight on the backend losing replies
    bare_backend: SessionStore = make_backend(tmp_path / "bare-backend")
    bare_faulty = FaultyStore(bare_backend, lost_reply_rate=rate, seed=seed)
    bare = await run_session(bare_faulty, tmp_path / "projects", LOST_REPLY_SESSION_SECONDS)
    bare_tally = await tally(bare, bare_backend)
    report("bare batcher, lost replies", bare_tally, len(bare.errors))
    assert bare_faulty.injected["lost_reply"] > 0
    assert bare_tally.duplicated > 0
    assert bare_tally.stored > bare_tally.enqueued
