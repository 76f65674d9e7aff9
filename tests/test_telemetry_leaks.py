"""Contract 9 and issue 7, item 7: nothing of the transcripts, the keys or the
backends' error messages reaches telemetry, and nothing of the transcripts or
the error messages reaches the logs.

Markers go everywhere a leak could start: entry text (with a credential-looking
string), every part of the session keys, and the messages of the errors the
backends raise (retryable, permanent, of a delete, with an errno). Then every
span (name, attributes, events with their attributes, status), every metric
point (attributes, exemplars) and every log record at every level (message and
traceback) is searched for them.

Session keys do appear in log records (``describe_key``: "project/session"), on
purpose: an operator reads the log to find which key was parked and requeue it.
Telemetry, which leaves the host, carries only ``telemetry.key_digest``.
"""

from __future__ import annotations

import errno
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from claude_agent_sdk import InMemorySessionStore
from claude_agent_sdk.types import SessionKey
from memory_store import MemoryStore
from test_telemetry import METRICS, SPANS, attrs, eventually, metric_points

from walmirror import DurableSessionStore
from walmirror.faults import FaultyStore
from walmirror.telemetry import key_digest

CREDENTIAL = "sk-ant-api03-Zq8vLeakCheckCredential0000AA"
CONTENT_MARK = "cm7-transcript-content-marker"
ERROR_MARK = "em7-backend-error-marker"
KEY_MARK = "km7keymarker"

PROJECT = f"-home-{KEY_MARK}-project"


def key(label: str, subpath: str | None = None) -> SessionKey:
    made: SessionKey = {"project_key": PROJECT, "session_id": f"{KEY_MARK}-{label}"}
    if subpath is not None:
        made["subpath"] = f"subagents/agent-{KEY_MARK}-{subpath}"
    return made


FLOWING = key("flowing")
SUBAGENT = key("flowing", subpath="a1")
FLAKY = key("flaky")
POISON = key("poison")
DOOMED = key("doomed")


def entries(count: int) -> list[Any]:
    return [
        {
            "type": "user",
            "uuid": str(uuid.uuid4()),
            "message": {"content": f"{CONTENT_MARK} my key is {CREDENTIAL}"},
        }
        for _ in range(count)
    ]


def echoing(kind: type[Exception]) -> Callable[[], Exception]:
    """A backend error whose message echoes the payload and a credential."""

    def make() -> Exception:
        text = f"{ERROR_MARK}: rejected {CONTENT_MARK} (auth {CREDENTIAL})"
        if issubclass(kind, OSError):
            return kind(errno.ECONNREFUSED, text, f"/srv/{KEY_MARK}/{CREDENTIAL}")
        return kind(text)

    return make


def is_(*targets: SessionKey) -> Callable[[SessionKey], bool]:
    sessions = {t["session_id"] for t in targets}
    return lambda k: k["session_id"] in sessions


async def test_no_content_key_or_backend_message_in_telemetry_or_logs(
    make_durable: Callable[..., DurableSessionStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every logger, every level; walmirror's own loggers too, which an earlier test
    # (a demo or bench run in process) may have quietened.
    caplog.set_level(logging.DEBUG)
    for name in ("walmirror", "walmirror.flusher", "walmirror.queue"):
        caplog.set_level(logging.DEBUG, logger=name)
    SPANS.clear()
    suffix = uuid.uuid4().hex[:8]
    names = (f"leak-protocol-{suffix}", f"leak-foreign-{suffix}")
    # A protocol store with a health call (its failing items cool down on their own)
    # and a foreign store without one (load + append; its failures count against the
    # whole backend: backoff, breaker).
    protocol = FaultyStore(MemoryStore())
    foreign = FaultyStore(InMemorySessionStore())
    store = make_durable(
        [protocol, foreign],
        backend_names=names,
        backoff_initial=0.01,
        backoff_max=0.05,
        breaker_threshold=2,
        probe_interval=0.02,
    )
    everything = WRITE_AND_LOAD

    # 1. An outage whose every error echoes the payload: retries, breaker open, probes.
    for backend in (protocol, foreign):
        backend.reject(lambda _k: True, ops=everything, error=echoing(ConnectionRefusedError))
    await store.append(FLOWING, entries(3))
    await store.append(SUBAGENT, entries(2))
    await eventually(lambda: store.flushers[1].breaker != "closed")
    await eventually(lambda: protocol.injected["reject"] >= 6 and foreign.injected["reject"] >= 6)
    for backend in (protocol, foreign):
        backend.accept_all()
    await store.flush(20)

    # 2. One key that keeps failing retryably (cools down), one refused for good (parked).
    base = protocol.injected["reject"]
    protocol.reject(is_(FLAKY), ops=everything, error=echoing(ConnectionError))
    protocol.reject(is_(POISON), ops=everything, error=echoing(ValueError))
    await store.append(FLAKY, entries(1))
    await store.append(POISON, entries(1))
    await store.append(FLOWING, entries(1))

    async def poison_parked() -> bool:
        return bool((await store.status())["backends"][0]["parked"])

    await eventually(poison_parked)
    await eventually(lambda: protocol.injected["reject"] >= base + 4)  # FLAKY: 3+ tries
    protocol.accept_all()

    # 3. A delete refused for good (parked), with a PermissionError echoing the payload.
    protocol.reject(is_(DOOMED), ops={"delete"}, error=echoing(PermissionError))
    await store.append(DOOMED, entries(1))
    await eventually(lambda: protocol.inner.load(DOOMED))
    await store.delete(DOOMED)

    async def delete_parked() -> bool:
        return bool((await store.status())["backends"][0]["parked_deletes"])

    await eventually(delete_parked)
    await eventually(lambda: foreign.inner.load(FLAKY))
    status = json.dumps(await store.status())

    spans = SPANS.get_finished_spans()
    outcomes = {attrs(s).get("walmirror.outcome") for s in spans}
    # The scenario did what it says (else the search below proves nothing).
    assert {"ok", "retry", "parked"} <= outcomes
    kinds = {n for s in spans for n in (e.name for e in s.events)}
    assert {"walmirror.retry", "walmirror.backoff", "walmirror.breaker"} <= kinds
    assert {"walmirror.cool_down", "walmirror.parked"} <= kinds
    error_types = {attrs(s).get("walmirror.error.type") for s in spans}
    assert {"ConnectionRefusedError", "ConnectionError", "ValueError"} <= error_types
    assert {"PermissionError"} <= error_types
    assert "ECONNREFUSED" in {attrs(s).get("walmirror.error.errno") for s in spans}
    digests = {attrs(s).get("walmirror.key.digest") for s in spans}
    assert {key_digest(k) for k in (FLOWING, SUBAGENT, FLAKY, POISON, DOOMED)} <= digests
    flusher_logs = [r for r in caplog.records if r.name == "walmirror.flusher"]
    assert {logging.DEBUG, logging.WARNING, logging.ERROR} <= {r.levelno for r in flusher_logs}

    # Telemetry: none of the markers, anywhere.
    telemetry_text = {
        "spans": "\n".join(s.to_json(indent=None) for s in spans),
        "metrics": repr(metric_points()) + repr(METRICS.get_metrics_data()),
    }
    for where, text in telemetry_text.items():
        for marker in (CREDENTIAL, CONTENT_MARK, ERROR_MARK, KEY_MARK, "rejected"):
            assert marker not in text, f"{marker!r} leaked into {where}"
    assert not [e for s in spans for e in s.events if e.name == "exception"]

    # Logs and status: no content, no credential, no backend message (keys may show).
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logs = "\n".join(formatter.format(r) for r in caplog.records)
    assert KEY_MARK in logs  # the parked key is named, for the operator
    for where, text in (("logs", logs), ("status", status)):
        for marker in (CREDENTIAL, CONTENT_MARK, ERROR_MARK):
            assert marker not in text, f"{marker!r} leaked into {where}"


WRITE_AND_LOAD = frozenset({"append", "append_batch", "delete", "load", "producer_mark"})


async def test_append_span_carries_a_digest_not_the_key(
    make_durable: Callable[..., DurableSessionStore],
) -> None:
    SPANS.clear()
    store = make_durable(MemoryStore())
    await store.append(SUBAGENT, entries(2))
    (span,) = [s for s in SPANS.get_finished_spans() if s.name == "walmirror.append"]
    assert attrs(span) == {
        "walmirror.key.digest": key_digest(SUBAGENT),
        "walmirror.batch.entries": 2,
        "walmirror.batch.bytes": attrs(span)["walmirror.batch.bytes"],
        "walmirror.outcome": "ok",
        "walmirror.entries.accepted": 2,
    }
    assert attrs(span)["walmirror.batch.bytes"] > 2 * len(CREDENTIAL)
    # Stable and distinct: the same key on any host, one digest per key.
    assert key_digest(dict(SUBAGENT)) == key_digest(SUBAGENT)
    assert len({key_digest(k) for k in (FLOWING, SUBAGENT, FLAKY, POISON)}) == 4
