"""The simulated workload of ``walmirror bench --scenario``: SDK-shaped transcript frames.

Every system in a scenario run gets the very same frames at the very same
instants: a pure function of the ``Workload`` settings. Per session, a
simulated Claude CLI writes frames (1-3 transcript entries each) to its main
transcript or, with probability ``subagent_share``, to its subagent's
transcript, and ends a turn every ``turn_seconds``; the SDK's receive loop
(``bench/scenario_worker.py``) hands each frame to its
``TranscriptMirrorBatcher`` and awaits ``batcher.flush()`` at every turn's
end, as ``Query._read_messages`` does. So what reaches a store's ``append``
is exactly what the SDK produces: one call per transcript per flush,
coalesced, or an eager flush past 500 entries / 1 MiB.

Entries look like the CLI's (user and assistant messages with ``uuid``,
``parentUuid``, ``sessionId``, ``timestamp``...); a share of them
(``uuidless_share``) carries no ``uuid``, as titles, tags and file-history
snapshots do in real transcripts. Every entry has an id (its ``uuid``, or its
``messageId`` when it has no ``uuid``) that names the run, the transcript and
the entry's position, so whatever a backend holds can be traced back exactly:
``parse_id``.

Keys: transcript ``k`` of a run is session ``k // 2``; odd ``k`` are the
sessions' subagent transcripts.
"""

from __future__ import annotations

import functools
import random
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
from claude_agent_sdk.types import SessionKey, SessionStoreEntry

__all__ = [
    "Frame",
    "Turn",
    "Workload",
    "entry_id",
    "file_path",
    "key_for",
    "make_entries",
    "parse_id",
    "schedule",
]

_WORDS = (
    "the agent reads the failing test and opens the module where the parser splits "
    "each record before it checks the schema then it proposes a smaller patch runs "
    "the suite again and reports which cases still fail with their line numbers"
).split()
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Workload:
    """What the simulated agents write. Every field is a knob of ``walmirror bench``."""

    sessions: int = 10
    entries_per_s: float = 1000.0  # all sessions together
    entry_bytes: int = 1000  # approximate JSON size of one entry
    duration: float = 30.0  # seconds the agents write
    subagent_share: float = 0.2  # share of frames that go to the session's subagent transcript
    uuidless_share: float = 0.3  # share of entries without a uuid (titles, snapshots...)
    turn_seconds: float = 1.0  # the SDK flushes its batcher at the end of every turn
    seed: int = 1
    tag: int = 0  # the run's id, in every entry id (32 bits)

    def check(self) -> None:
        if not 1 <= self.sessions <= 10_000:
            raise ValueError("sessions must be between 1 and 10000")
        if not self.entries_per_s > 0:
            raise ValueError("entries/s must be positive")
        if not 200 <= self.entry_bytes <= 1 << 20:
            raise ValueError("entry size must be between 200 bytes and 1 MiB")
        if not self.duration > 0:
            raise ValueError("duration must be positive")
        for name in ("subagent_share", "uuidless_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name.replace('_', ' ')} must be between 0 and 1")
        if not self.turn_seconds > 0:
            raise ValueError("turn seconds must be positive")
        if not 0 <= self.tag < 1 << 32:
            raise ValueError("tag must fit 32 bits")

    @property
    def keys(self) -> int:
        """Transcripts in the run: a main and a subagent transcript per session."""
        return 2 * self.sessions

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Frame:
    """A ``transcript_mirror`` frame: ``count`` entries of transcript ``key``, from ``first``."""

    t: float  # seconds after the run's start
    key: int
    first: int
    count: int
    plain: tuple[bool, ...]  # per entry: True when it carries no uuid


@dataclass(frozen=True)
class Turn:
    """The end of a turn: the SDK awaits ``batcher.flush()`` before going on."""

    t: float


@functools.lru_cache(maxsize=4096)  # asked for every frame: a Random each costs the loop
def session_id(w: Workload, session: int) -> str:
    rng = random.Random(f"{w.seed}:{w.tag}:session:{session}")
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def key_for(w: Workload, project_key: str, key: int) -> SessionKey:
    """The ``SessionKey`` of transcript ``key`` under ``project_key``."""
    session = key // 2
    result: SessionKey = {"project_key": project_key, "session_id": session_id(w, session)}
    if key % 2:
        result["subpath"] = f"subagents/agent-{session:04d}{w.tag:08x}"
    return result


def file_path(w: Workload, projects_dir: str, project_key: str, key: int) -> str:
    """Where the CLI writes transcript ``key``; the SDK maps it back to ``key_for``."""
    k = key_for(w, project_key, key)
    base = f"{projects_dir}/{project_key}/{k['session_id']}"
    return f"{base}/{k['subpath']}.jsonl" if "subpath" in k else f"{base}.jsonl"


def entry_id(tag: int, key: int, n: int) -> str:
    """The id of entry ``n`` of transcript ``key``: a well-formed UUID string."""
    return f"{tag:08x}-{key:04x}-4000-8000-{n:012x}"


def parse_id(tag: int, entry: Any) -> tuple[int, int] | None:
    """``(key, n)`` of an entry this run wrote, else ``None``."""
    if not isinstance(entry, dict):
        return None
    text = entry.get("uuid") or entry.get("messageId")
    if not isinstance(text, str) or len(text) != 36:
        return None
    parts = text.split("-")
    if len(parts) != 5 or parts[0] != f"{tag:08x}" or parts[2:4] != ["4000", "8000"]:
        return None
    try:
        return int(parts[1], 16), int(parts[4], 16)
    except ValueError:
        return None


def schedule(w: Workload, session: int) -> Iterator[Frame | Turn]:
    """Session ``session``'s frames and turn ends, in time order, up to ``w.duration``."""
    rng = random.Random(f"{w.seed}:{w.tag}:frames:{session}")
    interval = 2.0 * w.sessions / w.entries_per_s  # frames carry 2 entries on average
    counts = {2 * session: 0, 2 * session + 1: 0}
    t = rng.uniform(0.0, interval)
    next_turn = rng.uniform(0.2, 1.0) * w.turn_seconds
    while t < w.duration:
        while next_turn <= t:
            yield Turn(next_turn)
            next_turn += w.turn_seconds
        key = 2 * session + (1 if rng.random() < w.subagent_share else 0)
        count = rng.randint(1, 3)
        plain = tuple(rng.random() < w.uuidless_share for _ in range(count))
        yield Frame(t, key, counts[key], count, plain)
        counts[key] += count
        t += interval * rng.uniform(0.5, 1.5)


@functools.lru_cache(maxsize=8192)
def _padding(start: int, room: int) -> str:
    """``room`` characters of words, from word ``start`` on (cached: asked per entry)."""
    text = " ".join(_WORDS[start:] + _WORDS[:start])
    return ((text + " ") * (room // (len(text) + 1) + 1))[:room]


def make_entries(w: Workload, frame: Frame) -> list[SessionStoreEntry]:
    """The frame's entries, shaped like the CLI's transcript lines, ~``entry_bytes`` each."""
    k = key_for(w, "p", frame.key)
    stamp = (_EPOCH + timedelta(seconds=frame.t)).isoformat(timespec="milliseconds")
    stamp = stamp.replace("+00:00", "Z")
    out: list[SessionStoreEntry] = []
    for i, plain in enumerate(frame.plain):
        n = frame.first + i
        eid = entry_id(w.tag, frame.key, n)
        entry: dict[str, Any]
        if plain:
            entry = {
                "type": "file-history-snapshot",
                "messageId": eid,
                "snapshot": {"messageId": eid, "timestamp": stamp, "trackedFileBackups": {}},
                "isSnapshotUpdate": False,
            }
            pad = entry["snapshot"]
        else:
            role = "user" if n % 2 == 0 else "assistant"
            entry = {
                "parentUuid": entry_id(w.tag, frame.key, n - 1) if n else None,
                "isSidechain": frame.key % 2 == 1,
                "userType": "external",
                "cwd": "/home/dev/project",
                "sessionId": k["session_id"],
                "version": "2.0.0",
                "type": role,
                "uuid": eid,
                "timestamp": stamp,
                "message": {"role": role, "content": ""},
            }
            if role == "assistant":
                entry["message"]["model"] = "claude-sonnet-4-5"
                entry["message"]["usage"] = {"input_tokens": 500 + n % 4000, "output_tokens": 80}
            pad = entry["message"]
        room = w.entry_bytes - len(orjson.dumps(entry))  # compact JSON, as json.dumps's
        if room > 0:
            key_name = "content" if "content" in pad else "note"
            pad[key_name] = _padding((n * 7 + frame.key) % len(_WORDS), room)
        out.append(cast(SessionStoreEntry, entry))
    return out
