"""A re-import on another host stores no entry twice that carries a uuid.

The SDK asks stores to treat ``uuid`` as an idempotency key, so that re-running
``import_session_to_store`` is duplicate-safe. The queue's own ledger covers
re-imports through the same queue file; a queue that starts a key afresh (another
host, or a key its queue forgot) checks the backend's uuids before it delivers.
"""

from __future__ import annotations

from typing import Any

from claude_agent_sdk.types import SessionKey
from conftest import Connect

from walmirror import DurableSessionStore

KEY: SessionKey = {"project_key": "proj", "session_id": "imported"}
TUNING = {"backoff_initial": 0.01, "backoff_max": 0.1, "call_timeout": 10.0}


def session(*tags: str) -> list[dict[str, Any]]:
    """Entries with uuids, and between them one without (a third of what the CLI
    mirrors carries none)."""
    out: list[dict[str, Any]] = []
    for tag in tags:
        out += [{"type": "user", "uuid": tag}, {"type": "progress", "of": tag}]
    return out


async def test_a_reimport_on_another_host_adds_no_uuid_twice(
    connect_backend: Connect, tmp_path: Any
) -> None:
    first = session("u1", "u2", "u3")
    async with DurableSessionStore(await connect_backend(), tmp_path / "a.db", **TUNING) as a:
        await a.append(KEY, first)
        await a.flush(60)
    # Host B replays the session (import_session_to_store), then the CLI wrote on.
    replay = session("u1", "u2", "u3", "u4")
    async with DurableSessionStore(await connect_backend(), tmp_path / "b.db", **TUNING) as b:
        await b.append(KEY, replay)
        await b.flush(60)
    stored = await (await connect_backend()).load(KEY) or []
    uuids = [e["uuid"] for e in stored if "uuid" in e]
    assert uuids == ["u1", "u2", "u3", "u4"]
    # What carries no uuid cannot be told apart: replayed ones are stored again
    # (the SDK's own caveat), in order after host A's entries.
    assert stored[: len(first)] == first
    assert [e for e in stored[len(first) :] if "uuid" not in e] == [
        {"type": "progress", "of": t} for t in ("u1", "u2", "u3", "u4")
    ]
