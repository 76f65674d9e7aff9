"""``walmirror import``: transcripts the Claude Code CLI already wrote, into a backend.

Teams adopting walmirror have sessions on disk (``~/.claude/projects/…``, or any
``CLAUDE_CONFIG_DIR``). This copies them through a ``DurableSessionStore``
(so through the queue: durable, exactly once, surviving an outage), in the
layout the SDK itself uses (``import_session_to_store``,
``file_path_to_session_key``):

- ``<config>/projects/<project>/<session>.jsonl`` → ``{project_key: <project>,
  session_id: <session>}``
- ``<config>/projects/<project>/<session>/subagents/**/<name>.jsonl`` → the same
  key with ``subpath`` ``subagents/…/<name>``, plus its ``.meta.json`` sidecar
  as an ``{"type": "agent_metadata", …}`` entry, as the SDK imports it.

Idempotent: before a key is copied, what the store already holds for it is
read. When that is the start of the file (a re-run, or a file that has grown
since), only the rest is appended. Otherwise (the key also has entries written
elsewhere) entries whose ``uuid`` it holds are skipped and the others appended:
an entry without a ``uuid`` can then be stored twice (the SDK's own caveat for
re-imports).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from claude_agent_sdk.types import SessionKey, SessionStore, SessionStoreEntry

from .errors import WalmirrorError
from .keys import validate_key
from .protocol import held_uuid, uuids_of

BATCH_ENTRIES = 500
BATCH_BYTES = 1 << 20  # the SDK's batcher's own bounds


@dataclass(frozen=True)
class Transcript:
    """One file on disk and the key it mirrors to."""

    key: SessionKey
    path: Path
    meta: Path | None = None  # a subagent's .meta.json sidecar, when there is one


@dataclass
class ImportReport:
    sessions: int = 0
    transcripts: int = 0
    appended: int = 0  # entries appended now
    skipped: int = 0  # entries the store already held


def find_transcripts(
    config_dir: Path, project: str | None = None, session: str | None = None
) -> list[Transcript]:
    """Every transcript under ``config_dir/projects`` (one project, one session if given),
    main transcripts before their subagents', in name order."""
    projects = config_dir / "projects"
    if not projects.is_dir():
        raise WalmirrorError(f"no Claude Code projects under {config_dir} (no {projects})")
    found: list[Transcript] = []
    for project_dir in sorted(p for p in projects.iterdir() if p.is_dir()):
        if project is not None and project_dir.name != project:
            continue
        for path in sorted(project_dir.glob("*.jsonl")):
            if session is not None and path.stem != session:
                continue
            main: SessionKey = {"project_key": project_dir.name, "session_id": path.stem}
            found.append(Transcript(validate_key(main), path))
            session_dir = path.with_suffix("")
            for sub in sorted((session_dir / "subagents").rglob("*.jsonl")):
                parts = list(sub.relative_to(session_dir).parts)
                parts[-1] = parts[-1][: -len(".jsonl")]
                key = validate_key({**main, "subpath": "/".join(parts)})
                meta = sub.with_name(sub.name[: -len(".jsonl")] + ".meta.json")
                found.append(Transcript(key, sub, meta if meta.is_file() else None))
    return found


def _read_entries(transcript: Transcript) -> Iterator[SessionStoreEntry]:
    with transcript.path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                raise WalmirrorError(
                    f"{transcript.path}: line {number} is not JSON (a transcript being written?)"
                ) from None
            if isinstance(entry, dict):
                yield cast(SessionStoreEntry, entry)
    if transcript.meta is not None:
        try:
            meta = json.loads(transcript.meta.read_text(encoding="utf-8"))
        except ValueError:
            meta = None  # an unusable sidecar is an absent one (as the SDK does)
        if isinstance(meta, dict):
            yield cast(SessionStoreEntry, {**meta, "type": "agent_metadata"})


class _Missing:
    """Which of a file's entries the store does not hold yet (see the module)."""

    def __init__(self, held: list[Any]) -> None:
        self.held = held
        self.uuids = uuids_of(held)
        self.position = 0
        self.prefix = True  # so far, the file's entries are the store's, in order

    def wanted(self, entry: SessionStoreEntry) -> bool:
        if self.prefix and self.position < len(self.held):
            if self.held[self.position] == entry:
                self.position += 1
                return False  # the store holds it, in its place
            self.prefix = False  # the key has other writers' entries: judge by uuid
        if self.prefix:
            return True  # past what the store holds: the file's new part
        return not held_uuid(entry, self.uuids)


async def import_transcripts(
    store: SessionStore,
    transcripts: list[Transcript],
    on_progress: Callable[[Transcript, int, int], None] | None = None,
) -> ImportReport:
    """Copy ``transcripts`` into ``store`` (see the module); ``on_progress(transcript,
    appended, skipped)`` after each."""
    sessions = {(t.key["project_key"], t.key["session_id"]) for t in transcripts}
    report = ImportReport(sessions=len(sessions))
    for transcript in transcripts:
        missing = _Missing(await store.load(transcript.key) or [])
        appended = skipped = 0
        batch: list[SessionStoreEntry] = []
        size = 0
        for entry in _read_entries(transcript):
            if not missing.wanted(entry):
                skipped += 1
                continue
            batch.append(entry)
            size += len(json.dumps(entry, ensure_ascii=False))
            if len(batch) >= BATCH_ENTRIES or size >= BATCH_BYTES:
                await store.append(transcript.key, batch)
                appended += len(batch)
                batch, size = [], 0
        if batch:
            await store.append(transcript.key, batch)
            appended += len(batch)
        report.transcripts += 1
        report.appended += appended
        report.skipped += skipped
        if on_progress is not None:
            on_progress(transcript, appended, skipped)
    return report
