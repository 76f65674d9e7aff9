"""End to end: the real Claude Agent SDK and its bundled CLI, mirrored through walmirror.

The CLI runs real sessions offline against ``tests/fake_messages_api.py``; the
SDK's batcher decides when ``append`` is called, its resume path calls
``load`` / ``list_subkeys``, and the CLI writes the local JSONL the mirror must
equal. Every scenario runs against FileStore and each remote backend (Redis,
PostgreSQL, S3) through conftest's ``connect_backend``; a pass-through
``SpyStore`` records what the SDK handed to ``append``.

1. The mirror equals what the SDK sent (both SDK flush modes), and relates to
   the CLI's local JSONL as pinned in ``sdk_e2e_support``; subagent
   transcripts land under their subpath and are listed.
2. A backend down for a whole turn: through walmirror no ``MirrorErrorMessage``
   and the mirror catches up; the same backend used directly loses the turn.
3. Resume on another host; 3b: a pool of three hosts taking turns, one turn
   with the backend down.
4. SIGKILL of the process running the SDK: the next process on the same queue
   file delivers every acknowledged entry once, in order; re-importing the
   session with ``import_session_to_store`` adds no entry that carries a uuid.
5. The SDK's store helpers on ``DurableSessionStore``, also while the backend
   is down (read your writes).
6. A real session under trio (``anyio.run(..., backend="trio")``), on FileStore.
7. ``walmirror import`` of what the real CLI wrote, twice: the second run adds
   nothing (FileStore).

Timeouts here are hang guards only; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import (
    delete_session_via_store,
    fork_session_via_store,
    get_session_info_from_store,
    get_session_messages_from_store,
    get_subagent_messages_from_store,
    import_session_to_store,
    list_sessions_from_store,
    list_subagents_from_store,
    project_key_for_directory,
    rename_session_via_store,
    tag_session_via_store,
)
from claude_agent_sdk.types import SessionKey, SessionStore
from conftest import POSTGRES_DSN, REDIS_URL, Connect
from fake_messages_api import FakeMessagesAPI
from sdk_e2e_support import (
    DELEGATE,
    LOCAL_ONLY_TYPES,
    MIRROR_ONLY_TYPES,
    SHUTDOWN_TAIL,
    SpyStore,
    backend_transcripts,
    by_subpath,
    local_transcripts,
    read_ack_log,
    run_session,
    settle_summaries,
    types_of,
    uuids_of,
)

from walmirror import BackendUnavailableError, DurableSessionStore
from walmirror.backends.file import FileStore
from walmirror.faults import ALL_OPS, WRITE_OPS, FaultyStore

REMOTE_AND_FILE = ["file", "redis", "postgres", "s3"]
FLUSH_TIMEOUT = 60.0  # hang guard
# conftest's make_durable gives backend calls 2 s; on a loaded machine a healthy
# backend can take longer, and reads through the store would fail: a hang guard only.
TUNING: dict[str, Any] = {"call_timeout": 30.0}
PROMPTS = ["hello there", f"please {DELEGATE} a look around", "and a third turn"]

# FileStore and every remote backend (conftest's "memory" kind is left out: not a real store).
every_backend = pytest.mark.parametrize("connect_backend", REMOTE_AND_FILE, indirect=True)


@pytest.fixture(scope="module")
def api() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI() as server:
        yield server
        assert server.unknown == [], (
            f"the CLI called paths the fake API does not know: {server.unknown}"
        )


def project_key(cwd: Path) -> str:
    return project_key_for_directory(str(cwd))


def subagent_subpaths(transcripts: dict[str, list[Any]]) -> list[str]:
    return sorted(s for s in transcripts if s)


# -- 1. the mirror equals what the SDK sent, and the disk -------------------------------------


@every_backend
@pytest.mark.parametrize("flush_mode", ["batched", "eager"])
async def test_mirror_equals_what_the_sdk_sent_and_the_local_jsonl(
    connect_backend: Connect,
    make_durable: Callable[..., DurableSessionStore],
    api: FakeMessagesAPI,
    tmp_path: Path,
    flush_mode: str,
) -> None:
    durable = make_durable(await connect_backend(), **TUNING)
    spy = SpyStore(durable)
    cwd, config_dir = tmp_path / "work", tmp_path / "host-a"
    run = await run_session(
        spy,
        api_url=api.base_url,
        cwd=cwd,
        config_dir=config_dir,
        prompts=PROMPTS,
        flush_mode=flush_mode,
    )
    assert run.mirror_errors == []
    assert spy.failed == [] and spy.sent == spy.acked
    await durable.flush(timeout=FLUSH_TIMEOUT)

    # What the backend holds (read by another client, not through walmirror)
    # deep-equals what the SDK handed to append, key by key, in order.
    stored = await backend_transcripts(await connect_backend(), project_key(cwd), run.session_id)
    sent = spy.acked_by_subpath()
    assert stored == sent
    (subpath,) = subagent_subpaths(stored)
    assert subpath.startswith("subagents/agent-")
    key: SessionKey = {"project_key": project_key(cwd), "session_id": run.session_id}
    assert await durable.list_subkeys(key) == [subpath]
    if flush_mode == "eager":
        assert len(spy.acked) > 4  # a flush per frame, not one per turn and key

    # The relation to the CLI's own JSONL, pinned for this CLI version.
    local = local_transcripts(config_dir)
    assert sorted(local) == sorted(stored)
    main_local = local[""]
    assert LOCAL_ONLY_TYPES <= set(types_of(main_local))
    assert not LOCAL_ONLY_TYPES & set(types_of(e for es in stored.values() for e in es))
    kept = [e for e in main_local if e.get("type") not in LOCAL_ONLY_TYPES]
    tail = kept[len(stored[""]) :]
    assert kept[: len(stored[""])] == stored[""]
    assert tuple(types_of(tail)) == SHUTDOWN_TAIL

    sub_local = [e for e in local[subpath] if e.get("type") not in LOCAL_ONLY_TYPES]
    sub_mirror = [e for e in stored[subpath] if e.get("type") not in MIRROR_ONLY_TYPES]
    assert sub_local == sub_mirror
    metadata = [e for e in stored[subpath] if e.get("type") in MIRROR_ONLY_TYPES]
    # The agent's metadata opens its mirror (later updates, e.g. "finished", follow
    # wherever they were mirrored); the last one is what the CLI's sidecar holds.
    assert metadata and stored[subpath][0] == metadata[0]
    sidecar = json.loads(
        (
            config_dir / "projects" / key["project_key"] / run.session_id / f"{subpath}.meta.json"
        ).read_text()
    )
    assert {k: v for k, v in metadata[-1].items() if k != "type"} == sidecar

    # About a third of what the CLI mirrors has no uuid: walmirror keeps those once too.
    assert any("uuid" not in e for e in stored[""])
    every_prompt = [p for p in PROMPTS if any(p in json.dumps(e) for e in stored[""])]
    assert every_prompt == PROMPTS


# -- 2. outage during a session -----------------------------------------------------------------

OUTAGE_TURN = 1  # the turn that delegates to a subagent: both keys are hit


@every_backend
async def test_outage_for_a_whole_turn_with_walmirror_loses_nothing(
    connect_backend: Connect,
    make_durable: Callable[..., DurableSessionStore],
    api: FakeMessagesAPI,
    tmp_path: Path,
) -> None:
    faulty = FaultyStore(await connect_backend())
    durable = make_durable(faulty, **TUNING)
    spy = SpyStore(durable)

    def before(turn: int) -> None:
        if turn == OUTAGE_TURN:
            faulty.down()

    async def after(turn: int) -> None:
        if turn == OUTAGE_TURN:
            # The whole turn went by with the backend down: nothing of it got through.
            await wait_until(lambda: faulty.injected["down"] > 0)
            assert not await backend_mentions(connect_backend, cwd, run_id(), PROMPTS[turn])
            faulty.up()

    def run_id() -> str:
        return spy.sent[0][0]["session_id"]

    cwd = tmp_path / "work"
    run = await run_session(
        spy,
        api_url=api.base_url,
        cwd=cwd,
        config_dir=tmp_path / "host-a",
        prompts=PROMPTS,
        before_turn=before,
        after_turn=after,
    )
    assert run.mirror_errors == []
    assert spy.failed == []
    await durable.flush(timeout=FLUSH_TIMEOUT)
    stored = await backend_transcripts(await connect_backend(), project_key(cwd), run.session_id)
    assert stored == spy.acked_by_subpath()
    assert len(subagent_subpaths(stored)) == 1


@every_backend
async def test_outage_for_a_whole_turn_without_walmirror_loses_the_turn(
    connect_backend: Connect, api: FakeMessagesAPI, tmp_path: Path
) -> None:
    """The same session, the same outage, the backend handed to the SDK directly:
    the SDK's batcher retries, gives up, reports ``MirrorErrorMessage`` and the
    turn is missing from the backend for good."""
    faulty = FaultyStore(await connect_backend())
    spy = SpyStore(faulty)
    cwd = tmp_path / "work"
    run = await run_session(
        spy,
        api_url=api.base_url,
        cwd=cwd,
        config_dir=tmp_path / "host-a",
        prompts=PROMPTS,
        before_turn=lambda turn: faulty.down() if turn == OUTAGE_TURN else None,
        after_turn=lambda turn: faulty.up() if turn == OUTAGE_TURN else None,
    )
    stored = await backend_transcripts(await connect_backend(), project_key(cwd), run.session_id)
    sent = spy.sent_by_subpath()
    # Both keys of the outage turn were reported lost...
    lost_keys = sorted(str(m.key.get("subpath") or "") for m in run.mirror_errors if m.key)
    assert len(run.mirror_errors) == len(lost_keys) == 2
    assert lost_keys[0] == "" and lost_keys[1].startswith("subagents/")
    # ... the backend holds only what was acknowledged: the outage turn is gone ...
    assert stored == spy.acked_by_subpath()
    assert stored.get(lost_keys[1], []) == []
    missing = [e for e in _dedupe_calls(spy.sent)[""] if e not in stored[""]]
    assert missing and sent != stored
    # ... and the turn's prompt is not in the mirror at all.
    assert not any(PROMPTS[OUTAGE_TURN] in json.dumps(e) for e in stored[""])


def _dedupe_calls(calls: list[tuple[SessionKey, list[Any]]]) -> dict[str, list[Any]]:
    """What the SDK meant to store: each batch once (its retries repeat it)."""
    seen: list[tuple[SessionKey, list[Any]]] = []
    for call in calls:
        if call not in seen:
            seen.append(call)
    return by_subpath(seen)


async def wait_until(condition: Callable[[], bool], guard: float = FLUSH_TIMEOUT) -> None:
    """Poll ``condition``; ``guard`` only stops a hang."""
    async with asyncio.timeout(guard):
        while not condition():
            await asyncio.sleep(0.01)


async def backend_mentions(connect: Connect, cwd: Path, session_id: str, text: str) -> bool:
    """Does the backend (read by a new client) hold ``text`` in the session's main transcript?"""
    reader = await connect()
    key: SessionKey = {"project_key": project_key(cwd), "session_id": session_id}
    return any(text in json.dumps(e) for e in await reader.load(key) or [])


def user_prompts(messages: list[Any]) -> list[str]:
    """The user's own prompts among ``SessionMessage``s (no tool results, no reminders)."""
    prompts = []
    for message in messages:
        if message.type != "user":
            continue
        content = message.message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        texts = [
            b["text"]
            for b in blocks or []
            if isinstance(b, dict)
            and b.get("type") == "text"
            and not b["text"].lstrip().startswith("<system-reminder>")
        ]
        if texts:
            prompts.append("\n".join(texts))
    return prompts


def user_prompts_in(entries: list[Any]) -> list[str]:
    """The prompts of the user entries of a raw transcript (strings, as the SDK sends them)."""
    return [
        e["message"]["content"]
        for e in entries
        if e.get("type") == "user" and isinstance(e.get("message", {}).get("content"), str)
    ]


def assert_no_duplicate_uuids(transcripts: dict[str, list[Any]]) -> None:
    for subpath, entries in transcripts.items():
        counts = Counter(uuids_of(entries))
        assert not [u for u, n in counts.items() if n > 1], f"duplicates in {subpath!r}"


# -- 3. resume on another host ---------------------------------------------------------------


@every_backend
async def test_resume_on_another_host_continues_after_host_a(
    connect_backend: Connect,
    make_durable: Callable[..., DurableSessionStore],
    api: FakeMessagesAPI,
    tmp_path: Path,
) -> None:
    cwd = tmp_path / "work"  # the same project directory on every host
    durable_a = make_durable(await connect_backend(), **TUNING)
    host_a = SpyStore(durable_a)
    run_a = await run_session(
        host_a, api_url=api.base_url, cwd=cwd, config_dir=tmp_path / "host-a", prompts=PROMPTS[:2]
    )
    await durable_a.flush(timeout=FLUSH_TIMEOUT)  # before handing the session to another host
    sid = run_a.session_id

    # Host B: another config dir, another queue file, another client of the same backend.
    durable_b = make_durable(await connect_backend(), **TUNING)
    host_b = SpyStore(durable_b)
    run_b = await run_session(
        host_b,
        api_url=api.base_url,
        cwd=cwd,
        config_dir=tmp_path / "host-b",
        prompts=PROMPTS[2:],
        resume=sid,
    )
    assert run_b.session_id == sid
    assert run_a.mirror_errors == [] and run_b.mirror_errors == []
    await durable_b.flush(timeout=FLUSH_TIMEOUT)

    a, b = host_a.acked_by_subpath(), host_b.acked_by_subpath()
    stored = await backend_transcripts(await connect_backend(), project_key(cwd), sid)
    # B's turn follows A's entries: no duplicate, no gap.
    assert stored[""] == a[""] + b[""]
    assert_no_duplicate_uuids(stored)
    # B really continued A's conversation: its first message hangs off A's chain.
    b_first = next(e for e in b[""] if e.get("type") == "user")
    assert b_first["parentUuid"] in set(uuids_of(a[""]))
    # The subagent transcript was restored on B (materialized before the CLI
    # started, beside the main transcript) and is unchanged in the backend.
    (sub,) = subagent_subpaths(a)
    assert run_b.materialized is not None
    assert run_b.materialized[""] == a[""]
    assert run_b.materialized[sub] == [e for e in a[sub] if e.get("type") not in MIRROR_ONLY_TYPES]
    assert {"project_key": project_key(cwd), "session_id": sid, "subpath": sub} in host_b.loads
    assert stored[sub] == a[sub] and sub not in b
    # The SDK's reader sees the whole conversation, from either host.
    for host in (durable_b, durable_a):
        messages = await get_session_messages_from_store(host, sid, directory=str(cwd))
        assert user_prompts(messages) == PROMPTS


@every_backend
async def test_a_pool_of_three_hosts_takes_turns(
    connect_backend: Connect,
    make_durable: Callable[..., DurableSessionStore],
    api: FakeMessagesAPI,
    tmp_path: Path,
) -> None:
    """Stateless workers A, B, A, C, B, A: each turn on a fresh CLAUDE_CONFIG_DIR,
    resumed from the backend; the backend is down for the whole of turn 3."""
    cwd = tmp_path / "work"
    order = ["A", "B", "A", "C", "B", "A"]
    outage_turn = 3
    prompts = [
        f"pool turn {i} on host {name}" + (f" please {DELEGATE}" if i == 1 else "")
        for i, name in enumerate(order)
    ]
    hosts: dict[str, tuple[FaultyStore, DurableSessionStore, SpyStore]] = {}
    for name in sorted(set(order)):
        faulty = FaultyStore(await connect_backend())
        durable = make_durable(faulty, **TUNING)
        hosts[name] = (faulty, durable, SpyStore(durable))

    sid: str | None = None
    expected: list[tuple[SessionKey, list[Any]]] = []
    for turn, name in enumerate(order):
        faulty, durable, spy = hosts[name]
        already = len(spy.acked)
        outage = turn == outage_turn

        async def after(
            _: int, faulty: FaultyStore = faulty, turn: int = turn, sid: str | None = sid
        ) -> None:
            await wait_until(lambda: faulty.injected["down"] > 0)  # a delivery failed
            assert sid is not None  # resumed: the session exists already
            assert not await backend_mentions(connect_backend, cwd, sid, prompts[turn])
            faulty.up()

        def before(_: int, faulty: FaultyStore = faulty) -> None:
            faulty.down()

        run = await run_session(
            spy,
            api_url=api.base_url,
            cwd=cwd,
            config_dir=tmp_path / f"turn-{turn}-host-{name}",
            prompts=[prompts[turn]],
            resume=sid,
            # Down after the resume loaded the session, for the whole turn.
            before_turn=before if outage else None,
            after_turn=after if outage else None,
        )
        assert run.mirror_errors == []
        assert sid is None or run.session_id == sid
        sid = run.session_id
        await durable.flush(timeout=FLUSH_TIMEOUT)  # before the next host takes over
        expected.extend(spy.acked[already:])

    assert sid is not None
    stored = await backend_transcripts(await connect_backend(), project_key(cwd), sid)
    assert stored == by_subpath(expected)
    assert_no_duplicate_uuids(stored)
    assert len(subagent_subpaths(stored)) == 1
    for _, durable, _ in hosts.values():
        for backend in (await durable.status())["backends"]:
            assert not backend["parked"] and backend["pending_entries"] == 0
    messages = await get_session_messages_from_store(hosts["C"][1], sid, directory=str(cwd))
    assert user_prompts(messages) == prompts


# -- 5. the SDK's store helpers on DurableSessionStore ------------------------------------------


@every_backend
async def test_the_sdks_store_helpers_read_their_writes_even_with_the_backend_down(
    connect_backend: Connect,
    make_durable: Callable[..., DurableSessionStore],
    api: FakeMessagesAPI,
    tmp_path: Path,
) -> None:

    cwd = tmp_path / "work"
    directory = str(cwd)
    writer = await connect_backend()  # the client walmirror delivers through
    faulty = FaultyStore(writer, writes_only=True)
    # Answering `load` offline needs the session's entries still in the queue:
    # keep them (retention) whatever the machine's speed. A longer backoff keeps
    # the flusher's count of consecutive failures low on a slow machine (its
    # backoff arithmetic overflows past ~1024 of them: an engine bug, reported).
    # Listings first give a healthy-looking backend up to call_timeout to take the
    # queued entries; with writes failing that wait is pure cost: keep it short.
    tuning = {**TUNING, "call_timeout": 10.0, "retention_seconds": 3600.0, "backoff_max": 0.5}
    durable = make_durable(faulty, **tuning)

    # Phase 1: writes cannot reach the backend (reads can): everything the
    # session, the helpers and a fork write stays queued, and every helper
    # shows it.
    faulty.down()
    run = await run_session(
        SpyStore(durable),
        api_url=api.base_url,
        cwd=cwd,
        config_dir=tmp_path / "host-a",
        prompts=PROMPTS[:2],
    )
    sid = run.session_id
    assert run.mirror_errors == []

    async def views(store: SessionStore) -> dict[str, Any]:
        """What the SDK's read helpers say about the session (and its subagent)."""
        infos = {i.session_id: i for i in await list_sessions_from_store(store, directory)}
        info = await get_session_info_from_store(store, sid, directory)
        agents = await list_subagents_from_store(store, sid, directory)
        return {
            "listed": sorted(infos),
            "title": (info.custom_title, info.tag, info.first_prompt) if info else None,
            "listed_title": (infos[sid].custom_title, infos[sid].tag) if sid in infos else None,
            "prompts": user_prompts(await get_session_messages_from_store(store, sid, directory)),
            "agents": agents,
            "agent_messages": [
                len(await get_subagent_messages_from_store(store, sid, a, directory))
                for a in agents
            ],
        }

    before = await views(durable)
    assert before["listed"] == [sid]
    assert before["prompts"] == PROMPTS[:2]
    assert len(before["agents"]) == 1 and before["agent_messages"][0] > 0

    await rename_session_via_store(durable, sid, "Renamed while queued", directory)
    await tag_session_via_store(durable, sid, "queued", directory)
    fork = await fork_session_via_store(durable, sid, directory, title="A fork")
    after = await views(durable)
    assert after["title"] == ("Renamed while queued", "queued", PROMPTS[0])
    assert after["listed_title"] == ("Renamed while queued", "queued")
    assert after["listed"] == sorted([sid, fork.session_id])
    forked = await get_session_messages_from_store(durable, fork.session_id, directory)
    assert user_prompts(forked) == PROMPTS[:2]
    assert (await durable.status())["backends"][0]["pending_entries"] > 0

    # Healed: the backend itself (read directly, by another client) says the
    # same, once the writing client has stored the summaries it writes lazily
    # (S3Store: see settle_summaries).
    faulty.up()
    await durable.flush(timeout=FLUSH_TIMEOUT)
    await settle_summaries(writer, project_key(cwd))
    reader = await connect_backend()
    assert await views(reader) == after

    # Phase 2: the backend is down for reads and writes too. What needs only
    # `load` answers from the queue (it holds the session's whole history);
    # writes are queued; listings fail with a clear error.
    faulty.ops = ALL_OPS
    faulty.down()
    await rename_session_via_store(durable, sid, "Renamed offline", directory)
    info = await get_session_info_from_store(durable, sid, directory)
    assert info is not None and info.custom_title == "Renamed offline"
    assert (
        user_prompts(await get_session_messages_from_store(durable, sid, directory))
        == (PROMPTS[:2])
    )
    await delete_session_via_store(durable, fork.session_id, directory)
    assert await get_session_messages_from_store(durable, fork.session_id, directory) == []
    with pytest.raises(BackendUnavailableError):
        await list_sessions_from_store(durable, directory)

    # Healed again: the offline rename and the delete reached the backend.
    faulty.ops = WRITE_OPS
    faulty.up()
    await durable.flush(timeout=FLUSH_TIMEOUT)
    await settle_summaries(writer, project_key(cwd))
    final = await views(reader)
    assert final["listed"] == [sid]
    assert final["title"] == ("Renamed offline", "queued", PROMPTS[0])
    assert await reader.load({"project_key": project_key(cwd), "session_id": fork.session_id}) in (
        None,
        [],
    )
    assert final == await views(durable)


# -- 4. SIGKILL of the process running the SDK ---------------------------------------------------

SUPPORT = Path(__file__).resolve().parent / "sdk_e2e_support.py"
DOWN_AFTER = 4  # acknowledged appends before the worker's backend goes down
KILL_AFTER = 14  # acknowledged appends before the kill


def worker_backend_url(backend: Any, kind: str, request: pytest.FixtureRequest) -> str:
    """A URL for ``walmirror.backends.from_url`` naming the storage ``backend`` uses."""
    if kind == "file":
        return str(backend.cursor_name)  # file:///...
    if kind == "redis":
        return f"{REDIS_URL}?prefix={backend.prefix}"
    if kind == "postgres":
        return f"{POSTGRES_DSN}?table={backend.table}"
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{backend.bucket}/{backend.prefix}?endpoint_url={endpoint}"


def acked_appends(path: Path) -> tuple[int, set[str]]:
    """How many appends the worker's log says were acknowledged, and to which subpaths."""
    if not path.exists():
        return 0, set()
    acked, _ = read_ack_log(path)
    return len(acked), {str(key.get("subpath") or "") for key, _ in acked}


def start_crash_worker(config: dict[str, Any], output: Path) -> subprocess.Popen[bytes]:
    """``sdk_e2e_support.py crash-worker``, in its own process group (the CLI it
    starts is killed with it), output to ``output``."""
    env = {**os.environ, "PYTHONPATH": str(SUPPORT.parent)}
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
        env.setdefault(name, value)  # what conftest's moto server accepts
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with output.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(SUPPORT), "crash-worker", json.dumps(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def readable_json(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def drop_torn_last_lines(config_dir: Path) -> None:
    """The CLI was SIGKILLed too: a transcript line it was writing may be torn."""
    for path in (config_dir / "projects").rglob("*.jsonl"):
        text = path.read_text()
        lines = text.split("\n")
        if lines[-1]:  # no newline at the end: a torn write
            path.write_text("\n".join(lines[:-1]) + "\n" if len(lines) > 1 else "")


@every_backend
async def test_a_sigkilled_host_loses_no_acknowledged_entry(
    connect_backend: Connect,
    make_durable: Callable[..., DurableSessionStore],
    api: FakeMessagesAPI,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kind = request.node.callspec.params["connect_backend"]
    backend = await connect_backend()
    cwd, config_dir = tmp_path / "work", tmp_path / "host-a"
    cwd.mkdir()
    queue, ack_log = tmp_path / "queue.db", tmp_path / "acks.jsonl"
    config = {
        "backend_url": worker_backend_url(backend, kind, request),
        "queue": str(queue),
        "ack_log": str(ack_log),
        "cwd": str(cwd),
        "config_dir": str(config_dir),
        "api_url": api.base_url,
        "down_after": DOWN_AFTER,
    }
    output = tmp_path / "worker.log"
    worker = start_crash_worker(config, output)
    try:

        def ready() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited: {output.read_text()[-3000:]}")
            count, subpaths = acked_appends(ack_log)
            return count >= KILL_AFTER and any(subpaths - {""})

        await wait_until(ready, guard=120.0)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and the CLI it runs
        worker.wait()
    assert worker.returncode == -signal.SIGKILL

    acked, sent = read_ack_log(ack_log)
    # The SDK's batcher appends one call at a time: at most one was in flight.
    assert sent[: len(acked)] == acked and len(sent) - len(acked) <= 1
    in_flight = by_subpath(sent[len(acked) :])
    sid = acked[0][0]["session_id"]
    acked_entries = by_subpath(acked)
    reader = await connect_backend()
    before = await backend_transcripts(reader, project_key(cwd), sid)
    # What was acknowledged after the backend went down was only in the queue.
    assert sum(map(len, before.values())) < sum(map(len, acked_entries.values()))

    # A new process (this one) opens the same queue file and drains it.
    durable = make_durable(
        await connect_backend(), wal_path=queue, backend_names=("primary",), **TUNING
    )
    await durable.flush(timeout=FLUSH_TIMEOUT)
    stored = await backend_transcripts(reader, project_key(cwd), sid)
    # (The append in flight at the kill may have opened a new subagent key.)
    assert set(acked_entries) <= set(stored) <= set(acked_entries) | set(in_flight)
    for subpath in stored:
        # Every acknowledged entry, in order, once; the append in flight at the
        # kill either landed whole (it was committed) or not at all.
        entries = acked_entries.get(subpath, [])
        assert stored[subpath] in (entries, entries + in_flight.get(subpath, [])), subpath
    assert_no_duplicate_uuids(stored)

    # The SDK's catch-up path after a gap: import the CLI's local transcript.
    # Entries the kill kept from the mirror come in; entries with a uuid the
    # queue already holds are skipped (its uuid ledger).
    drop_torn_last_lines(config_dir)
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(config_dir))
    await import_session_to_store(sid, durable, directory=str(cwd))
    await durable.flush(timeout=FLUSH_TIMEOUT)
    caught_up = await backend_transcripts(reader, project_key(cwd), sid)
    assert_no_duplicate_uuids(caught_up)
    local = local_transcripts(config_dir)
    for subpath, entries in local.items():
        imported = caught_up.get(subpath, [])
        assert imported[: len(stored.get(subpath, []))] == stored.get(subpath, [])
        assert set(uuids_of(entries)) <= set(uuids_of(imported))

    # Importing a session already mirrored again adds no entry that carries a
    # uuid; entries without one are appended again (the SDK's own caveat).
    await import_session_to_store(sid, durable, directory=str(cwd))
    await durable.flush(timeout=FLUSH_TIMEOUT)
    again = await backend_transcripts(reader, project_key(cwd), sid)
    for subpath, entries in again.items():
        before_import = caught_up.get(subpath, [])
        added = entries[len(before_import) :]
        assert entries[: len(before_import)] == before_import
        assert uuids_of(added) == []
        if subpath not in local:
            # A subagent the kill caught before its JSONL existed (its metadata
            # was mirrored already): import only reads JSONL files.
            assert added == []
            continue
        sidecar = config_dir / "projects" / project_key(cwd) / sid / f"{subpath}.meta.json"
        assert len(added) == sum(1 for e in local[subpath] if not e.get("uuid")) + (
            1 if subpath and readable_json(sidecar) else 0  # the metadata sidecar, replayed
        )


# -- the example in the docs runs as written ------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mirror_a_session.py"


async def test_the_example_runs_as_written(api: FakeMessagesAPI, tmp_path: Path) -> None:
    cwd, root = tmp_path / "work", tmp_path / "transcripts"
    cwd.mkdir()
    env = {**os.environ, **api.env(tmp_path / "config")}
    command = [
        sys.executable,
        str(EXAMPLE),
        *("--backend", root.as_uri(), "--queue", str(tmp_path / "queue.db"), "--cwd", str(cwd)),
    ]
    done = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sid = done.stdout.split("session ", 1)[1].split(":", 1)[0]
    assert "0 pending" in done.stdout
    # The session is in the backend, read without walmirror.
    stored = await backend_transcripts(FileStore(root), project_key(cwd), sid)
    assert user_prompts_in(stored[""]) == ["Say hello.", "Now say goodbye."]


# -- 6. trio: the SDK runs on anyio, a user may pick trio ----------------------------------------


def test_a_real_session_under_trio_is_mirrored(api: FakeMessagesAPI, tmp_path: Path) -> None:
    """The SDK and the CLI under ``anyio.run(..., backend="trio")``, mirrored through
    ``DurableSessionStore`` over FileStore: the store runs its engine on an asyncio
    loop of its own, and the backend ends up with what the SDK sent."""
    import anyio
    from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, MirrorErrorMessage
    from claude_agent_sdk import ResultMessage as Result
    from sdk_e2e_support import HANG_GUARD, api_env

    root, cwd, config_dir = tmp_path / "backend", tmp_path / "work", tmp_path / "host"
    for path in (cwd, config_dir):
        path.mkdir(parents=True)
    durable = DurableSessionStore(FileStore(root), tmp_path / "q.db", **TUNING)
    spy = SpyStore(durable)
    seen: dict[str, Any] = {"errors": [], "session": None}

    async def main() -> None:
        options = ClaudeAgentOptions(
            cwd=str(cwd),
            env=api_env(api.base_url, config_dir),
            session_store=spy,
            allowed_tools=["Agent"],
        )
        with anyio.fail_after(HANG_GUARD):
            async with ClaudeSDKClient(options) as client:
                for prompt in PROMPTS:
                    await client.query(prompt)
                    async for message in client.receive_response():
                        if isinstance(message, MirrorErrorMessage):
                            seen["errors"].append(message)
                        elif isinstance(message, Result):
                            assert not message.is_error, message
                            seen["session"] = message.session_id
            await durable.flush(FLUSH_TIMEOUT)
            await durable.close(10, close_backends=True)

    anyio.run(main, backend="trio")
    assert seen["errors"] == [] and spy.failed == []
    stored = asyncio.run(backend_transcripts(FileStore(root), project_key(cwd), seen["session"]))
    assert stored == spy.acked_by_subpath()
    assert len(subagent_subpaths(stored)) == 1


# -- 7. walmirror import: what the real CLI wrote, into a backend --------------------------------


async def test_walmirror_import_copies_what_the_real_cli_wrote_once(
    api: FakeMessagesAPI, tmp_path: Path
) -> None:
    from claude_agent_sdk import InMemorySessionStore
    from test_cli import cli

    cwd, config_dir, root = tmp_path / "work", tmp_path / "host", tmp_path / "backend"
    run = await run_session(
        InMemorySessionStore(),
        api_url=api.base_url,
        cwd=cwd,
        config_dir=config_dir,
        prompts=PROMPTS,
    )
    args = ("import", "--config-dir", str(config_dir), "--backend", f"file://{root}")
    first = await asyncio.to_thread(cli, *args, "--queue", str(tmp_path / "q1.db"))
    assert first.returncode == 0, first.stdout + first.stderr
    local = local_transcripts(config_dir)
    stored = await backend_transcripts(FileStore(root), project_key(cwd), run.session_id)
    # Every line the CLI wrote (as the SDK's own import_session_to_store copies it),
    # and each subagent's .meta.json sidecar as an agent_metadata entry after it.
    assert stored[""] == local[""]
    (subpath,) = subagent_subpaths(stored)
    assert stored[subpath][: len(local[subpath])] == local[subpath]
    assert types_of(stored[subpath][len(local[subpath]) :]) == ["agent_metadata"]
    # Again, from another queue (another machine): nothing is added, uuid or not.
    again = await asyncio.to_thread(cli, *args, "--queue", str(tmp_path / "q2.db"))
    assert again.returncode == 0 and " 0 entries appended" in again.stdout, again.stdout
    assert await backend_transcripts(FileStore(root), project_key(cwd), run.session_id) == stored
