"""``walmirror import``: transcripts on disk into a backend, through the queue, idempotently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk.types import SessionKey
from test_cli import cli

from walmirror.backends.file import FileStore
from walmirror.importer import find_transcripts

PROJECT = "-home-user-repo"
SESSION = "6f1c7a44-5a2b-4f0e-9d0e-1a2b3c4d5e6f"
MAIN: SessionKey = {"project_key": PROJECT, "session_id": SESSION}
SUB: SessionKey = {**MAIN, "subpath": "subagents/agent-a1"}


def write_jsonl(path: Path, entries: list[dict[str, Any]], mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open(mode, encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A CLI config directory as the CLI lays it out: a session, and a subagent's
    transcript with its .meta.json sidecar. Half the entries carry no uuid."""
    root = tmp_path / "claude"
    project = root / "projects" / PROJECT
    write_jsonl(
        project / f"{SESSION}.jsonl",
        [
            {"type": "user", "uuid": "u1", "message": "hi"},
            {"type": "progress", "n": 1},
            {"type": "assistant", "uuid": "u2", "message": "hello"},
            {"type": "progress", "n": 2},
        ],
    )
    write_jsonl(
        project / SESSION / "subagents" / "agent-a1.jsonl",
        [{"type": "user", "uuid": "s1"}, {"type": "progress", "n": 9}],
    )
    (project / SESSION / "subagents" / "agent-a1.meta.json").write_text(
        json.dumps({"agentType": "general-purpose"})
    )
    return root


def run_import(config_dir: Path, tmp_path: Path, *extra: str) -> str:
    result = cli(
        "import",
        "--config-dir",
        str(config_dir),
        "--backend",
        f"file://{tmp_path / 'backend'}",
        "--queue",
        str(tmp_path / "import.db"),
        *extra,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


async def test_import_copies_sessions_and_subagents_and_a_rerun_adds_nothing(
    config_dir: Path, tmp_path: Path
) -> None:
    out = run_import(config_dir, tmp_path)
    assert "1 session(s), 2 transcript(s)" in out and "7 entries appended, 0 already held" in out
    backend = FileStore(tmp_path / "backend")
    main = await backend.load(MAIN)
    assert [e.get("uuid") or e["n"] for e in main or []] == ["u1", 1, "u2", 2]
    assert await backend.list_subkeys({"project_key": PROJECT, "session_id": SESSION}) == [
        "subagents/agent-a1"
    ]
    assert (await backend.load(SUB) or [])[-1] == {
        "agentType": "general-purpose",
        "type": "agent_metadata",
    }
    # Again, even with a fresh queue file (another machine): nothing is added.
    (tmp_path / "import.db").unlink()
    out = run_import(config_dir, tmp_path)
    assert "0 entries appended, 7 already held" in out
    assert await backend.load(MAIN) == main
    # The CLI wrote on since: only the new lines go.
    write_jsonl(
        config_dir / "projects" / PROJECT / f"{SESSION}.jsonl",
        [{"type": "user", "uuid": "u3"}, {"type": "progress", "n": 3}],
        mode="a",
    )
    out = run_import(config_dir, tmp_path)
    assert "2 entries appended, 7 already held" in out
    assert [e.get("uuid") or e["n"] for e in await backend.load(MAIN) or []] == [
        "u1",
        1,
        "u2",
        2,
        "u3",
        3,
    ]


async def test_a_key_with_other_writers_gets_only_what_it_lacks_by_uuid(
    config_dir: Path, tmp_path: Path
) -> None:
    backend = FileStore(tmp_path / "backend")
    await backend.append(MAIN, [{"type": "user", "uuid": "u2", "message": "hello"}])
    # (--project=…: the CLI's project names start with "-")
    out = run_import(config_dir, tmp_path, "--session", SESSION, f"--project={PROJECT}")
    assert "6 entries appended, 1 already held" in out  # u2 is held
    stored = await backend.load(MAIN) or []
    assert [e.get("uuid") for e in stored].count("u2") == 1


def test_find_transcripts_filters_and_orders(config_dir: Path) -> None:
    found = find_transcripts(config_dir)
    assert [t.key for t in found] == [MAIN, SUB]
    assert found[1].meta is not None
    assert find_transcripts(config_dir, session="other") == []
    assert find_transcripts(config_dir, project="other") == []


def test_import_without_a_config_dir_is_a_clear_error(tmp_path: Path) -> None:
    result = cli(
        "import",
        "--config-dir",
        str(tmp_path / "nowhere"),
        "--backend",
        f"file://{tmp_path / 'backend'}",
    )
    assert result.returncode == 2
    assert "no Claude Code projects under" in result.stderr
