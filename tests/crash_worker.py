"""Crash-test worker: appends to a DurableSessionStore until the parent SIGKILLs it.

Run by ``tests/test_crash.py`` as ``python crash_worker.py``: a small fork
server. It imports walmirror once, prints ``ready``, then serves commands on
stdin, one per line, answering on stdout:

``run <config JSON>``  -> ``pid <pid>``
    fork a child that opens a ``DurableSessionStore`` over the configured
    backend (``backend_url``: a FileStore, Redis or PostgreSQL) on the
    configured queue file and appends forever (the parent SIGKILLs it);
``reap <pid>``  -> ``status <wait status>``
    wait for that child and report how it ended.

Forking a warm process makes a kill trial cost its random lifetime instead of
the interpreter and SDK import time; the child is a full process, so a
SIGKILL drops everything it held in memory exactly as it would in production.

A child appends with one task per key (batches of 1..12 entries) plus a task
calling ``flush()`` now and then, so a kill can land anywhere: in ``start()``
draining what a previous child left, in a group commit, in a backend write,
between the backend's write and the local ack, in compaction.

Entries are deterministic (``expected_entry``) so the parent can rebuild the
exact entry a sequence number stands for. Sequence numbers are
``generation * GEN_STRIDE + n``: strictly increasing in append order across
generations, per key.

The log (one per generation, O_APPEND):

``P <key index> <first seq> <count>``
    written before ``append`` is called (intent: these may or may not land);
``A <key index> <first seq> <count>``
    written and fsynced after ``append`` returned (acknowledged);
``L <n>``
    lost replies injected so far by the FaultyStore (lost-reply variant only).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import traceback
import uuid
from typing import Any

GEN_STRIDE = 1_000_000
_NAMESPACE = uuid.UUID("6f1c3a52-0d7e-4c4e-9a51-5b8e2f0c9d11")


def expected_entry(key_index: int, seq: int) -> dict[str, Any]:
    """The entry the worker appends to key ``key_index`` with sequence number ``seq``."""
    return {
        "type": "user",
        "uuid": str(uuid.uuid5(_NAMESPACE, f"{key_index}:{seq}")),
        "seq": seq,
        "key": key_index,
        "message": {"role": "user", "content": "x" * (seq % 97)},
    }


def parse_log(text: str) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]], int]:
    """(intents, acks, lost replies) of one generation's log; a torn last line is ignored."""
    intents: list[tuple[int, int, int]] = []
    acks: list[tuple[int, int, int]] = []
    lost = 0
    lines = text.split("\n")
    for line in lines[:-1]:  # the part after the last "\n" is torn (or empty)
        kind, *fields = line.split()
        if kind == "P":
            intents.append((int(fields[0]), int(fields[1]), int(fields[2])))
        elif kind == "A":
            acks.append((int(fields[0]), int(fields[1]), int(fields[2])))
        elif kind == "L":
            lost = max(lost, int(fields[0]))
        else:
            raise ValueError(f"unexpected log line {line!r}")
    return intents, acks, lost


async def _run(config: dict[str, Any]) -> None:
    from walmirror import DurableSessionStore, FlushTimeoutError
    from walmirror.backends import from_url
    from walmirror.faults import FaultyStore

    gen: int = config["generation"]
    rng = random.Random(config["seed"])
    keys: list[dict[str, str]] = config["keys"]
    real = from_url(config["backend_url"])
    faulty = None
    backend: Any = real
    if config.get("lost_reply_rate"):
        faulty = FaultyStore(real, seed=config["seed"], lost_reply_rate=config["lost_reply_rate"])
        backend = faulty
    store = DurableSessionStore(
        backend,
        config["queue"],
        # The same cursor name whatever wraps the backend, in every generation.
        backend_names=("files",),
        max_batch_entries=8,  # many small deliveries: many backend-write/ack windows
        batch_linger=0.001,
        backoff_initial=0.002,
        backoff_max=0.02,
        breaker_threshold=1000,
        retention_seconds=0.0,  # compaction runs too, under the kills
        compact_interval=0.05,
        call_timeout=10.0,
    )
    log_fd = os.open(config["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def log(line: str, sync: bool) -> None:
        os.write(log_fd, line.encode())
        if sync:
            os.fsync(log_fd)

    async def writer(index: int, key: dict[str, str]) -> None:
        seq = gen * GEN_STRIDE
        while True:
            count = rng.randint(1, 12)
            batch = [expected_entry(index, s) for s in range(seq, seq + count)]
            log(f"P {index} {seq} {count}\n", sync=False)
            await store.append(key, batch)  # type: ignore[arg-type]
            log(f"A {index} {seq} {count}\n", sync=True)
            seq += count
            await asyncio.sleep(rng.uniform(0, 0.004))

    async def flusher() -> None:
        while True:
            await asyncio.sleep(rng.uniform(0.005, 0.04))
            try:
                await store.flush(timeout=5)
            except FlushTimeoutError:
                pass

    async def fault_counter() -> None:
        logged = 0
        while faulty is not None:
            await asyncio.sleep(0.005)
            if faulty.injected["lost_reply"] != logged:
                logged = faulty.injected["lost_reply"]
                log(f"L {logged}\n", sync=False)

    await store.start()
    tasks = [writer(i, k) for i, k in enumerate(keys)]
    await asyncio.gather(*tasks, flusher(), fault_counter())


def _child(config: dict[str, Any]) -> None:
    """Runs in the forked child; never returns."""
    status = 1
    try:
        err = os.open(config["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(err, 2)
        os.close(err)
        sys.stdin.close()
        asyncio.run(_run(config))
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(status)


def main() -> None:
    # Pay the imports once, before forking: no threads or event loop exist yet.
    import walmirror
    import walmirror.backends.file
    import walmirror.backends.postgres
    import walmirror.backends.redis
    import walmirror.faults  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "run":
            config = json.loads(arg)
            pid = os.fork()
            if pid == 0:
                _child(config)
            print(f"pid {pid}", flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(arg), 0)
            print(f"status {status}", flush=True)
        else:
            print(f"error unknown command {command!r}", flush=True)


if __name__ == "__main__":
    main()
