"""The uuid ledger in memory: which uuids each key already holds, for the queue's writer.

An entry whose ``uuid`` its key already holds is skipped by ``append`` (the SDK
retries a batch after an ambiguous failure; ``import_session_to_store`` replays
a whole session). The ledger is persisted in the queue file as one ``ledger``
row per append (the appended uuids as a JSON array), so recording uuids costs
one small row per append, not one B-tree insert per entry.

In memory each key keeps the 64-bit hashes of its uuids: a sorted ``array``
plus a set of recent ones, about 8 bytes per uuid once merged (a key with a
million entries costs 8 MB, not the ~100 MB of a set of strings). A hash is
not the uuid: when one is found, the key's persisted uuids are read and the
uuid is looked up exactly, so a collision can never drop an entry. That read
is rare: it happens for real repeats (a retried batch), where it is paid once
per append. Keys are loaded lazily, on the first append after the process
starts, and the least recently used are dropped (to be loaded again) when the
whole holds more than ``max_hashes``.

Everything here runs on the queue's writer thread, inside the transaction
that stores the rows (which writes them after the whole group is claimed: uuids
claimed but not yet written are kept apart until ``saved``); after a rollback
the writer calls ``clear``.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import chain

Row = tuple[str | None, bytes, int]  # (uuid, encoded entry, summary hint)

MAX_HASHES = 4_000_000
"""Hashes held in memory at most (~32 MB): past it, the least recently used keys go."""


class _KeyHashes:
    """One key's uuid hashes: ``merged`` sorted, ``recent`` not yet merged into it."""

    __slots__ = ("merged", "recent")

    def __init__(self, hashes: Iterable[int]) -> None:
        self.merged = array("q", sorted(set(hashes)))
        self.recent: set[int] = set()

    def __len__(self) -> int:
        return len(self.merged) + len(self.recent)

    def __contains__(self, h: int) -> bool:
        if h in self.recent:
            return True
        i = bisect_left(self.merged, h)
        return i < len(self.merged) and self.merged[i] == h

    def merge_if_due(self) -> None:
        """Merge ``recent`` into ``merged`` once it is a quarter of it: each hash is
        re-sorted a bounded number of times, and the set (~60 bytes per hash) stays
        small."""
        if len(self.recent) > max(1024, len(self.merged) // 4):
            self.merged = array("q", sorted(self.merged.tolist() + list(self.recent)))
            self.recent = set()


class UuidLedger:
    """Which uuids each key holds; ``load(key_id)`` reads a key's persisted uuids."""

    def __init__(self, load: Callable[[int], Iterable[str]], max_hashes: int = MAX_HASHES) -> None:
        self._load = load
        self._max_hashes = max_hashes
        self._keys: OrderedDict[int, _KeyHashes] = OrderedDict()
        self._held = 0  # hashes in memory, all keys
        # Uuids claimed in the transaction under way, not yet in the ledger rows
        # ``load`` reads: the exact check on a hash hit looks here too.
        self._unsaved: dict[int, set[str]] = {}

    def claim(self, key_id: int, rows: list[Row]) -> list[Row]:
        """The rows whose uuid the key does not hold yet (the first of a uuid repeated
        in ``rows``), their uuids now counted as held. Rows without a uuid all pass."""
        hashes = self._hashes(key_id)
        # The per-entry work is inlined (no method call per uuid): this runs for every
        # appended entry, on the writer thread, holding the GIL the event loop needs.
        recent, merged = hashes.recent, hashes.merged
        size = len(merged)
        new: list[Row] = []
        claimed: set[str] = set()  # this call's uuids
        added: list[int] = []  # hashes not held before
        exact: set[str] | None = None  # the key's persisted uuids, read on a hash hit
        for row in rows:
            uuid = row[0]
            if uuid is not None:
                if uuid in claimed:
                    continue
                h = hash(uuid)
                if h in recent or ((i := bisect_left(merged, h)) < size and merged[i] == h):
                    if exact is None:
                        exact = set(self._load(key_id)) | self._unsaved.get(key_id, set())
                    if uuid in exact:
                        continue
                    # A collision with a held uuid: the hash is already counted.
                else:
                    added.append(h)
                    recent.add(h)
                claimed.add(uuid)
            new.append(row)
        if claimed:
            self._unsaved.setdefault(key_id, set()).update(claimed)
        if added:
            self._held += len(added)
            hashes.merge_if_due()
            self._trim(keep=key_id)
        return new

    def saved(self) -> None:
        """The transaction that stored the claimed uuids committed."""
        self._unsaved.clear()

    def forget(self, key_id: int) -> None:
        dropped = self._keys.pop(key_id, None)
        if dropped is not None:
            self._held -= len(dropped)

    def clear(self) -> None:
        """Forget everything (after a rollback): keys are loaded again when next used."""
        self._keys.clear()
        self._unsaved.clear()
        self._held = 0

    def _hashes(self, key_id: int) -> _KeyHashes:
        hashes = self._keys.get(key_id)
        if hashes is None:
            # Uuids claimed earlier in the transaction under way are not in what
            # ``load`` reads yet (the key may have been trimmed since it claimed them).
            held = chain(self._load(key_id), self._unsaved.get(key_id, ()))
            hashes = _KeyHashes(hash(uuid) for uuid in held)
            self._keys[key_id] = hashes
            self._held += len(hashes)
        else:
            self._keys.move_to_end(key_id)
        return hashes

    def _trim(self, keep: int) -> None:
        while self._held > self._max_hashes and len(self._keys) > 1:
            key_id, _hashes = next(iter(self._keys.items()))
            if key_id == keep:
                self._keys.move_to_end(key_id)
                continue
            self.forget(key_id)
