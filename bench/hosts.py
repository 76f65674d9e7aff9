"""Many hosts, one session: what each backend ends up storing, counted.

``python -m walmirror.bench.hosts`` runs two scenarios on every backend
(FileStore in a temp dir, Redis and PostgreSQL from ``WALMIRROR_REDIS_URL`` /
``WALMIRROR_POSTGRES_DSN``, S3 on a private moto server). Each host is a
``DurableSessionStore`` with its own queue file and its own backend client:

- ping-pong: three hosts take turns on one session, A B A C B A C A, each
  resuming with ``load``, appending 17 entries (every other one without a
  ``uuid``) and one subagent entry, then flushing; replies are lost on every
  other turn, the backend is down for turn 3, and a write held in flight on
  turn 5 lands after turn 6;
- concurrent: four hosts append 150 entries each to one session at the same
  time, in batches of 1-5, with 20 % lost replies and 20 % errors.

It prints, per backend and scenario, entries sent, stored, duplicated,
missing, out of order and parked keys: the figures the exactly-once contract
says must be sent = stored and zero elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from claude_agent_sdk.types import SessionKey

from walmirror import DurableSessionStore
from walmirror.faults import FaultyStore

from .drain import Moto, boto3_client, walmirror_backend

KEY: SessionKey = {"project_key": "bench", "session_id": "pool"}
SUB: SessionKey = {**KEY, "subpath": "subagents/agent-1"}
TUNING = {"backoff_initial": 0.01, "backoff_max": 0.1, "call_timeout": 5.0}


def _entries(host: str, start: int, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in range(start, start + count):
        entry: dict[str, Any] = {"type": "user", "host": host, "n": n}
        if n % 2 == 0:
            entry["uuid"] = f"{host}-{n}"
        out.append(entry)
    return out


def _count(sent: dict[str, list[Any]], stored: list[Any], parked: int) -> dict[str, int]:
    idents = [(e.get("host"), e.get("n")) for e in stored]
    counts = Counter(idents)
    expected = {(e["host"], e["n"]) for batch in sent.values() for e in batch}
    out_of_order = sum(
        1
        for host in sent
        if [n for h, n in idents if h == host] != sorted(n for h, n in idents if h == host)
    )
    return {
        "sent": sum(len(v) for v in sent.values()),
        "stored": len(stored),
        "duplicated": sum(c - 1 for c in counts.values() if c > 1),
        "missing": len(expected - set(counts)),
        "out_of_order": out_of_order,
        "parked": parked,
    }


async def _parked(stores: list[DurableSessionStore]) -> int:
    total = 0
    for store in stores:
        total += sum(len(b["parked"]) for b in (await store.status())["backends"])
    return total


async def ping_pong(connect: Any, tmp: Path) -> dict[str, int]:
    pool = {}
    for name in "ABC":
        faulty = FaultyStore(await connect(), seed=ord(name))
        pool[name] = (DurableSessionStore(faulty, tmp / f"pp-{name}.db", **TUNING), faulty)
    sent: dict[str, list[Any]] = {name: [] for name in "ABC"}
    try:
        for turn, name in enumerate("ABACBACA"):
            store, faulty = pool[name]
            await store.load(KEY)  # resume
            faulty.lost_reply_rate = 0.7 if turn % 2 else 0.0
            if turn == 3:
                faulty.down()
            if turn == 5:
                faulty.hold_next(1)
            batch = _entries(name, len(sent[name]), 17)
            await store.append(KEY, batch[:9])  # type: ignore[arg-type]
            await store.append(KEY, batch[9:])  # type: ignore[arg-type]
            await store.append(SUB, batch[:1])  # type: ignore[arg-type]
            sent[name] += batch
            faulty.up()
            await store.flush(timeout=120)
            if turn == 6:
                await pool["A"][1].release_held()
        stored = await (await connect()).load(KEY) or []
        return _count(sent, stored, await _parked([s for s, _ in pool.values()]))
    finally:
        for store, _ in pool.values():
            await store.close(timeout=5)


async def concurrent(connect: Any, tmp: Path) -> dict[str, int]:
    stores = []
    for i in range(4):
        faulty = FaultyStore(await connect(), seed=i, lost_reply_rate=0.2, error_rate=0.2)
        faulty.ops = frozenset({"append_batch"})
        stores.append(DurableSessionStore(faulty, tmp / f"cw-{i}.db", **TUNING))
    sent: dict[str, list[Any]] = {}

    async def write(index: int, store: DurableSessionStore) -> None:
        rng, name = random.Random(index), f"w{index}"
        mine: list[dict[str, Any]] = []
        while len(mine) < 150:
            batch = _entries(name, len(mine), min(rng.randint(1, 5), 150 - len(mine)))
            mine += batch
            await store.append(KEY, batch)  # type: ignore[arg-type]
            await asyncio.sleep(rng.uniform(0, 0.005))
        sent[name] = mine
        await store.flush(timeout=120)

    try:
        await asyncio.gather(*(write(i, s) for i, s in enumerate(stores)))
        stored = await (await connect()).load(KEY) or []
        return _count(sent, stored, await _parked(stores))
    finally:
        for store in stores:
            await store.close(timeout=5)


async def run(kinds: list[str]) -> list[tuple[str, str, dict[str, int], float]]:
    rows = []
    moto = None
    if "s3" in kinds:
        moto = Moto()
        moto.start()
        await asyncio.to_thread(boto3_client(moto.endpoint_url).create_bucket, Bucket="wmbench")
    try:
        for kind in kinds:
            for scenario in (ping_pong, concurrent):
                tag = f"hosts{random.randrange(1 << 30):x}"
                cleanups: list[Any] = []
                with tempfile.TemporaryDirectory(prefix="walmirror-hosts-") as tmp:

                    async def connect(
                        kind: str = kind, tag: str = tag, tmp: str = tmp, cleanups: Any = cleanups
                    ) -> Any:
                        if kind == "file":
                            from walmirror.backends.file import FileStore

                            return FileStore(Path(tmp) / "files")
                        store, cleanup = await walmirror_backend(kind, tag, moto)
                        cleanups.append(cleanup)
                        return store

                    started = time.perf_counter()
                    try:
                        figures = await scenario(connect, Path(tmp))
                    finally:
                        for cleanup in cleanups:
                            await cleanup()
                    rows.append((kind, scenario.__name__, figures, time.perf_counter() - started))
    finally:
        if moto is not None and moto.proc is not None:
            moto.proc.terminate()
            moto.proc.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends", default="file,redis,postgres,s3", help="comma-separated: file,redis,..."
    )
    args = parser.parse_args()
    rows = asyncio.run(run(args.backends.split(",")))
    columns = ["sent", "stored", "duplicated", "missing", "out_of_order", "parked"]
    print(f"{'backend':9} {'scenario':11} " + " ".join(f"{c:>12}" for c in columns) + "  seconds")
    for kind, scenario, figures, seconds in rows:
        cells = " ".join(f"{figures[c]:>12}" for c in columns)
        print(f"{kind:9} {scenario:11} {cells}  {seconds:7.1f}")


if __name__ == "__main__":
    main()
