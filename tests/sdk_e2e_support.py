"""Helpers for ``tests/test_sdk_e2e.py``: the real SDK and its bundled CLI, offline.

* :class:`SpyStore`: a pass-through ``SessionStore`` that records what the SDK
  hands to ``append`` (every call, and the calls that returned), optionally
  durably (a JSON-lines log, fsynced after each acknowledged append) so a test
  can learn what was acknowledged by a process it SIGKILLed.
* :func:`run_session`: one CLI session through ``ClaudeSDKClient`` against
  the fake Messages API (``tests/fake_messages_api.py``), a prompt per turn.
* :func:`local_transcripts` / :func:`backend_transcripts`: what the CLI wrote
  on disk, and what a backend holds, per subpath (``""`` is the main transcript).
* The pinned relation between the CLI's local JSONL and what it mirrors, for
  the CLI version bundled with the SDK these tests were written against.
* ``python sdk_e2e_support.py crash-worker CONFIG_JSON``: a process that runs
  a session through walmirror until it is killed (scenario 4).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    MirrorErrorMessage,
    ResultMessage,
)
from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_messages_api import DELEGATE, SUBAGENT_MARK, offline_env

__all__ = [
    "DELEGATE",
    "LOCAL_ONLY_TYPES",
    "MIRROR_ONLY_TYPES",
    "SHUTDOWN_TAIL",
    "SUBAGENT_MARK",
    "SessionRun",
    "SpyStore",
    "api_env",
    "backend_transcripts",
    "by_subpath",
    "local_transcripts",
    "read_ack_log",
    "run_session",
    "settle_summaries",
]

# -- what this CLI version writes locally but does not mirror, and the reverse -------
#
# Measured on claude-agent-sdk 0.2.190 with its bundled CLI 2.1.337 (Claude Code;
# 0.2.189's CLI 2.1.332 wrote no "api-request-route" at shut down): the local JSONL
# holds every mirrored entry, in the same order, plus
#   - the request records, in the main and the subagent transcripts;
LOCAL_ONLY_TYPES = frozenset({"api-request", "api-request-shape", "api-request-blob"})
#   - at the end of the main transcript, what the CLI writes as it shuts down
#     (after its last mirror frame);
SHUTDOWN_TAIL = ("last-prompt", "api-request-route", "cost-state")
#   and a subagent's mirror holds entries its local JSONL lacks: the agent's
#   metadata (the CLI keeps it in the ``<agent>.meta.json`` sidecar instead).
MIRROR_ONLY_TYPES = frozenset({"agent_metadata"})

HANG_GUARD = 120.0  # seconds; only against hangs, never a timing assertion


def api_env(base_url: str, config_dir: str | os.PathLike[str]) -> dict[str, str]:
    """``ClaudeAgentOptions(env=...)``: the CLI talks to the fake API, offline."""
    return offline_env(base_url, config_dir)


def subpath_of(key: SessionKey | dict[str, Any]) -> str:
    return str(key.get("subpath") or "")


# -- the spy ---------------------------------------------------------------------------


class SpyStore(SessionStore):
    """Forwards every call to ``inner``; records what the SDK asked to append.

    ``sent``: every ``append`` call (key, deep copy of the entries), in call
    order, whether it returned or raised. ``acked``: the calls that returned.
    With ``ack_log``, each call is also written to that file as a JSON line,
    ``{"kind": "sent", "key", "entries"}`` before calling ``inner`` and
    ``{"kind": "acked", ...}`` after it returned, fsynced before the spy
    returns: a SIGKILL after ``append`` returned to the SDK cannot lose it.

    Every optional ``SessionStore`` method is defined (and forwarded), so the
    SDK sees the same capabilities as the stores used here (they have them all).
    """

    def __init__(
        self,
        inner: SessionStore,
        ack_log: str | os.PathLike[str] | None = None,
        on_acked: Callable[[int], None] | None = None,
    ):
        self.inner = inner
        self.on_acked = on_acked
        self.sent: list[tuple[SessionKey, list[SessionStoreEntry]]] = []
        self.acked: list[tuple[SessionKey, list[SessionStoreEntry]]] = []
        self.failed: list[tuple[SessionKey, str]] = []
        self.loads: list[SessionKey] = []
        self._log_fd: int | None = None
        if ack_log is not None:
            self._log_fd = os.open(ack_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _log(self, kind: str, key: SessionKey, entries: list[Any], sync: bool) -> None:
        if self._log_fd is None:
            return
        line = json.dumps({"kind": kind, "key": dict(key), "entries": entries}) + "\n"
        os.write(self._log_fd, line.encode())
        if sync:
            os.fsync(self._log_fd)

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        snapshot = copy.deepcopy(list(entries))
        self.sent.append((dict(key), snapshot))  # type: ignore[arg-type]
        self._log("sent", key, snapshot, sync=False)
        try:
            await self.inner.append(key, entries)
        except Exception as exc:
            self.failed.append((dict(key), type(exc).__name__))  # type: ignore[arg-type]
            raise
        self._log("acked", key, snapshot, sync=True)
        self.acked.append((dict(key), snapshot))  # type: ignore[arg-type]
        if self.on_acked is not None:
            self.on_acked(len(self.acked))

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        self.loads.append(dict(key))  # type: ignore[arg-type]
        return await self.inner.load(key)

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        return await self.inner.list_sessions(project_key)

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        return await self.inner.list_session_summaries(project_key)

    async def delete(self, key: SessionKey) -> None:
        await self.inner.delete(key)

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        return await self.inner.list_subkeys(key)

    def acked_by_subpath(self, session_id: str | None = None) -> dict[str, list[Any]]:
        return by_subpath(self.acked, session_id)

    def sent_by_subpath(self, session_id: str | None = None) -> dict[str, list[Any]]:
        return by_subpath(self.sent, session_id)


def by_subpath(
    calls: Iterable[tuple[SessionKey | dict[str, Any], list[Any]]], session_id: str | None = None
) -> dict[str, list[Any]]:
    """Concatenate the entries of append calls per subpath (``""``: main transcript)."""
    out: dict[str, list[Any]] = {}
    for key, entries in calls:
        if session_id is not None and key["session_id"] != session_id:
            continue
        out.setdefault(subpath_of(key), []).extend(entries)
    return out


def read_ack_log(path: Path) -> tuple[list[tuple[dict[str, Any], list[Any]]], list[Any]]:
    """(acknowledged calls, sent calls) from a spy's log; a torn last line is ignored."""
    acked: list[tuple[dict[str, Any], list[Any]]] = []
    sent: list[tuple[dict[str, Any], list[Any]]] = []
    lines = path.read_text().split("\n")
    for line in lines[:-1]:  # after the last "\n": torn or empty
        record = json.loads(line)
        (acked if record["kind"] == "acked" else sent).append((record["key"], record["entries"]))
    return acked, sent


# -- running the CLI -------------------------------------------------------------------


@dataclass
class SessionRun:
    """What one ``run_session`` saw."""

    session_id: str = ""
    messages: list[Any] = field(default_factory=list)
    results: list[ResultMessage] = field(default_factory=list)
    mirror_errors: list[MirrorErrorMessage] = field(default_factory=list)
    # Resumed from a store: the transcripts the SDK wrote into its temporary
    # CLAUDE_CONFIG_DIR before starting the CLI (subpath -> entries).
    materialized: dict[str, list[Any]] | None = None

    @property
    def assistant_texts(self) -> list[str]:
        texts = []
        for message in self.messages:
            if isinstance(message, AssistantMessage):
                for block in message.content:
                    text = getattr(block, "text", None)
                    if isinstance(text, str):
                        texts.append(text)
        return texts


def make_dirs(*paths: Path) -> None:
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)


TurnHook = Callable[[int], Awaitable[None] | None]


async def _call(hook: TurnHook | None, turn: int) -> None:
    if hook is not None:
        result = hook(turn)
        if result is not None:
            await result


async def run_session(
    store: SessionStore,
    *,
    api_url: str,
    cwd: Path,
    config_dir: Path,
    prompts: list[str],
    resume: str | None = None,
    flush_mode: str = "batched",
    before_turn: TurnHook | None = None,
    after_turn: TurnHook | None = None,
) -> SessionRun:
    """Run the real CLI for ``prompts`` (one turn each) with ``session_store=store``.

    ``resume``: a session id to resume (the SDK materializes it from ``store``).
    ``before_turn(i)`` / ``after_turn(i)`` run around turn ``i`` (0-based),
    e.g. to take a backend down for a whole turn. Raises when a turn does not
    end in a successful ``ResultMessage``.
    """
    make_dirs(config_dir, cwd)
    options = ClaudeAgentOptions(
        cwd=str(cwd),
        env=api_env(api_url, config_dir),
        session_store=store,
        session_store_flush=flush_mode,  # type: ignore[arg-type]
        resume=resume,
        allowed_tools=["Agent"],
    )
    run = SessionRun(session_id=resume or "")
    async with asyncio.timeout(HANG_GUARD):
        async with ClaudeSDKClient(options) as client:
            materialized = getattr(client, "_materialized", None)
            if materialized is not None:
                run.materialized = local_transcripts(Path(materialized.config_dir))
            for turn, prompt in enumerate(prompts):
                await _call(before_turn, turn)
                await client.query(prompt)
                result: ResultMessage | None = None
                async for message in client.receive_response():
                    run.messages.append(message)
                    if isinstance(message, MirrorErrorMessage):
                        run.mirror_errors.append(message)
                    elif isinstance(message, ResultMessage):
                        result = message
                if result is None or result.is_error:
                    raise AssertionError(f"turn {turn} ({prompt!r}) did not succeed: {result!r}")
                run.results.append(result)
                run.session_id = result.session_id
                await _call(after_turn, turn)
    return run


# -- reading transcripts ----------------------------------------------------------------


def local_transcripts(config_dir: Path) -> dict[str, list[Any]]:
    """The CLI's JSONL files under ``config_dir/projects``: subpath -> entries.

    The main transcript is ``""``; a subagent's is ``subagents/agent-<id>``
    (the SDK's ``file_path_to_session_key`` layout). One session per directory.
    """
    out: dict[str, list[Any]] = {}
    projects = config_dir / "projects"
    for path in sorted(projects.rglob("*.jsonl")):
        relative = path.relative_to(projects).with_suffix("")
        parts = relative.parts  # (project, session) or (project, session, "subagents", ...)
        subpath = "/".join(parts[2:])
        out[subpath] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


async def backend_transcripts(
    backend: SessionStore, project_key: str, session_id: str
) -> dict[str, list[Any]]:
    """What ``backend`` holds for a session: subpath -> entries (``""``: main)."""
    key: SessionKey = {"project_key": project_key, "session_id": session_id}
    out: dict[str, list[Any]] = {"": list(await backend.load(key) or [])}
    for subpath in await backend.list_subkeys(
        {"project_key": project_key, "session_id": session_id}
    ):
        out[subpath] = list(await backend.load({**key, "subpath": subpath}) or [])
    return out


async def settle_summaries(writer: SessionStore, project_key: str) -> None:
    """Have ``writer`` store the session summaries it keeps lazily, so that another
    client reading the same storage lists them up to date.

    S3Store writes a session's summary sidecar ``summary_delay`` seconds after
    the append it covers (documented in ``backends/s3.py``), and S3 lists
    ``LastModified`` to the second: until that write, a sidecar left behind in the
    same second as the newest part has the same mtime as the session, so the
    SDK's staleness check (``summary.mtime < session mtime``) takes its old title
    for current. Its ``list_session_summaries`` writes the pending sidecars first
    (and waits for them); on the other backends it is a plain read."""
    async with asyncio.timeout(HANG_GUARD):
        await writer.list_session_summaries(project_key)


def types_of(entries: Iterable[Any]) -> list[str]:
    return [str(e.get("type")) for e in entries]


def uuids_of(entries: Iterable[Any]) -> list[str]:
    return [e["uuid"] for e in entries if isinstance(e, dict) and e.get("uuid")]


# -- scenario 4: a host process that will be SIGKILLed ------------------------------------


async def _crash_worker(config: dict[str, Any]) -> None:
    from walmirror import DurableSessionStore
    from walmirror.backends import from_url
    from walmirror.faults import FaultyStore

    # The backend goes down after ``down_after`` acknowledged appends: what the
    # SDK appends after that is acknowledged but only in the queue when the
    # parent kills this process (before it, some entries got through).
    backend = FaultyStore(from_url(config["backend_url"]))
    durable = DurableSessionStore(
        backend,
        config["queue"],
        backend_names=("primary",),
        max_batch_entries=8,
        backoff_initial=0.01,
        backoff_max=0.2,
        call_timeout=30.0,
    )
    down_after = int(config["down_after"])
    spy = SpyStore(
        durable,
        ack_log=config["ack_log"],
        on_acked=lambda n: backend.down() if n == down_after else None,
    )
    options = ClaudeAgentOptions(
        cwd=config["cwd"],
        env=api_env(config["api_url"], config["config_dir"]),
        session_store=spy,
        session_store_flush="eager",
        allowed_tools=["Agent"],
    )
    async with ClaudeSDKClient(options) as client:
        for turn in itertools.count():
            prompt = f"turn {turn}" + (f" please {DELEGATE}" if turn % 3 == 1 else "")
            await client.query(prompt)
            async for _ in client.receive_response():
                pass


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[1] == "crash-worker":
        asyncio.run(_crash_worker(json.loads(argv[2])))
        return
    raise SystemExit(f"usage: {argv[0]} crash-worker CONFIG_JSON")


if __name__ == "__main__":
    main(sys.argv)
