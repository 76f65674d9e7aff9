"""``verify``: compare what each backend holds with what the local queue says it should.

For every key in the local queue and every backend of the store, the entries
still held locally that the backend acknowledged are looked up in the
backend's transcript, in this queue's order (other hosts' entries may sit
between them: the transcript is checked as a sequence that contains ours):

``missing``
    acknowledged by the backend, but not in its transcript where it belongs
    (after the previous acknowledged entry);
``out_of_order``
    in the transcript (found by ``uuid``), but before an entry appended earlier;
``duplicated``
    extra copies of a ``uuid`` anywhere in the backend's transcript;
``behind``
    acknowledged entries the backend's mark for this queue no longer covers
    (it lost them; the flusher re-sends what the queue holds on its next
    delivery of the key);
``lost``
    entries a backend lost that the queue no longer held either, as recorded
    when the flusher found the loss (``status`` shows them too);
``pending``
    appended but not acknowledged yet (not an error: the flusher is behind).

Entries compacted away locally cannot be checked (only duplicates can).
Reports carry keys, counts and offsets, never entry content.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from claude_agent_sdk.types import SessionKey, SessionStore

from .flusher import describe_error
from .keys import describe_key
from .protocol import decode_entry, is_producer_store
from .queue import KeyRow
from .store import DurableSessionStore

# Local entries are read in chunks of this many, so memory stays bounded by the
# backend transcript (which ``load`` returns whole anyway).
_CHUNK = 1000


@dataclass
class KeyReport:
    """One key as one backend holds it, compared with the local queue."""

    key: SessionKey
    backend: str
    backend_entries: int = 0  # length of the backend's transcript
    held: int = 0  # entries still held in the local queue
    checked: int = 0  # acknowledged held entries compared with the backend
    pending: int = 0  # appended, not acknowledged yet
    missing: int = 0
    out_of_order: int = 0
    duplicated: int = 0
    behind: int = 0
    lost: int = 0
    first_bad_offset: int | None = None
    error: str | None = None  # the backend could not be read

    @property
    def problems(self) -> int:
        return self.missing + self.out_of_order + self.duplicated + self.behind + self.lost

    @property
    def ok(self) -> bool:
        return self.problems == 0 and self.error is None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["key_text"] = describe_key(self.key)
        data["ok"] = self.ok
        return data

    def note_bad(self, offset: int) -> None:
        if self.first_bad_offset is None or offset < self.first_bad_offset:
            self.first_bad_offset = offset


@dataclass
class _Held:
    """The entries of one key still in the local queue, from ``first_seq`` on."""

    first_seq: int = 0
    bodies: list[bytes] = field(default_factory=list)


async def verify(store: DurableSessionStore) -> list[KeyReport]:
    """One report per (key, backend); a drained, healthy store gives only clean reports.

    The store's queue must be open (``await store.start()``, or
    ``await store.queue.open(store.backend_names)`` to inspect without delivering).
    """
    reports: list[KeyReport] = []
    for row, _next_seq in await store.queue.all_keys():
        for name, backend in zip(store.backend_names, store.backends, strict=True):
            reports.append(await _verify_key(store, row, name, backend))
    return reports


async def _verify_key(
    store: DurableSessionStore, row: KeyRow, name: str, backend: SessionStore
) -> KeyReport:
    key = row.session_key()
    report = KeyReport(key=key, backend=name)
    # Cursor first, backend second: whatever the cursor says was acknowledged is
    # already in the backend when we read it (backends only grow).
    view = await store.queue.local_view(key, name)
    if view is None:  # deleted since all_keys()
        return report
    acked = view.cursor.acked
    held = await _read_held(store, row, name)
    report.held = len(held.bodies)
    report.pending = max(0, view.next_seq - acked)
    report.lost = sum(loss.lost for loss in await store.queue.losses(name) if loss.key == key)
    try:
        if is_producer_store(backend) and acked > view.cursor.first_seq:
            mark = await backend.producer_mark(key, store.queue.producer_id)  # type: ignore[attr-defined]
            covered = view.cursor.first_seq - 1 if mark is None else mark
            report.behind = max(0, acked - 1 - max(covered, view.cursor.first_seq - 1))
        remote = await backend.load(key) or []
    except Exception as exc:
        report.error = f"backend {name} could not load the key ({describe_error(exc)})"
        return report
    report.backend_entries = len(remote)
    _count_duplicates(report, remote)

    where: dict[str, list[int]] = {}
    for offset, entry in enumerate(remote):
        uuid = _uuid(entry)
        if uuid is not None:
            where.setdefault(uuid, []).append(offset)
    position = 0  # where in the transcript the next entry of ours may be
    for i, body in enumerate(held.bodies):
        if held.first_seq + i >= acked:
            break  # the rest is pending
        report.checked += 1
        position = _check_entry(report, decode_entry(body), position, remote, where)
    return report


async def _read_held(store: DurableSessionStore, row: KeyRow, name: str) -> _Held:
    """The key's locally held entries, and the seq of the first one.

    Compaction may delete a prefix while we read; then the chunks stop being
    contiguous and we read again (a few times, then report what we have).
    """
    held = _Held()
    for _ in range(5):
        first, chunk = await store.queue.read_batch(row.key_id, 0, _CHUNK, 64 << 20)
        held = _Held(first_seq=first, bodies=list(chunk))
        while chunk:
            expected = held.first_seq + len(held.bodies)
            first, chunk = await store.queue.read_batch(row.key_id, expected, _CHUNK, 64 << 20)
            if chunk and first != expected:
                break  # compaction raced us
            held.bodies.extend(chunk)
        else:
            return held
    return held


def _check_entry(
    report: KeyReport,
    entry: Any,
    position: int,
    remote: list[Any],
    where: dict[str, list[int]],
) -> int:
    """Find ``entry`` at or after ``position``; return where the next one may be."""
    uuid = _uuid(entry)
    if uuid is not None:
        later = [o for o in where.get(uuid, []) if o >= position]
        found = later[0] if later else None
    else:
        found = next((o for o in range(position, len(remote)) if remote[o] == entry), None)
    if found is not None and remote[found] == entry:
        return found + 1
    report.note_bad(position)
    if uuid is not None and uuid in where:
        report.out_of_order += 1
    else:
        report.missing += 1
    return position


def _count_duplicates(report: KeyReport, remote: list[Any]) -> None:
    counts = Counter(u for u in (_uuid(e) for e in remote) if u is not None)
    seen: Counter[str] = Counter()
    for offset, entry in enumerate(remote):
        uuid = _uuid(entry)
        if uuid is None or counts[uuid] < 2:
            continue
        seen[uuid] += 1
        if seen[uuid] > 1:
            report.duplicated += 1
            report.note_bad(offset)


def _uuid(entry: Any) -> str | None:
    uuid = entry.get("uuid") if isinstance(entry, dict) else None
    return uuid if isinstance(uuid, str) and uuid else None
