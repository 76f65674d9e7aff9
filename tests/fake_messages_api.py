"""A fake Anthropic Messages API, so the real Claude Code CLI runs sessions offline.

The ``claude-agent-sdk`` wheel bundles the real CLI. Pointed at this server
(``ANTHROPIC_BASE_URL=http://127.0.0.1:PORT``, any ``ANTHROPIC_API_KEY``) it
runs whole sessions with no internet: it writes its JSONL transcript, runs
subagents, and the SDK mirrors every line through ``SessionStore.append``.

The server runs on a daemon thread (stdlib ``http.server``), so it serves
whatever event loop (or process) the CLI's caller uses, and a test may block
its loop without starving the API.

Replies are scripted by rules on the request, not by a call counter, so side
requests a CLI version may make (title generation, quota probes, ...; CLI
2.1.332 made none here) and retries never shift a conversation's script. The
"user text" is the last user message's own text blocks, without the
``<system-reminder>`` blocks the CLI adds:

* the last message carries a ``tool_result`` -> text ``"<REPLY_AFTER_TOOL> ..."``
  (the turn ends);
* the last user text contains :data:`DELEGATE` and the request offers the
  subagent tool (``Agent``, formerly ``Task``) -> a ``tool_use`` of that tool
  whose prompt carries :data:`SUBAGENT_MARK`, in the foreground
  (``run_in_background: false``: the CLI's default is the background, where
  the subagent would finish after the turn): the CLI runs a subagent, which
  writes its own transcript under ``<session>/subagents/``;
* anything else -> text ``"<REPLY_PREFIX> <start of the last user text>"``.

Every reply streams as SSE (``message_start``, ``content_block_start`` /
``content_block_delta`` / ``content_block_stop`` per block, ``message_delta``,
``message_stop``) when the request says ``"stream": true``, else one JSON
message. ``POST /v1/messages/count_tokens`` answers a token estimate. Any
other path gets a 404 in the API's error shape and is recorded in
``unknown`` (tests can assert it stays empty, or read it to learn what a new
CLI version calls).

Run it standalone (``python fake_messages_api.py``) to print its URL and serve
until interrupted.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

__all__ = [
    "DELEGATE",
    "REPLY_AFTER_TOOL",
    "REPLY_PREFIX",
    "SUBAGENT_MARK",
    "SUBAGENT_TOOL_NAMES",
    "FakeMessagesAPI",
    "RecordedRequest",
    "offline_env",
]

# Put DELEGATE in a prompt to make the model call the subagent tool.
DELEGATE = "[delegate]"
# The subagent's prompt carries this; the subagent's own requests answer plain text.
SUBAGENT_MARK = "[subagent]"
REPLY_PREFIX = "fake reply to:"
REPLY_AFTER_TOOL = "fake summary of the tool result"
REMINDER = "<system-reminder>"
# The CLI's subagent tool: "Agent" on current versions, "Task" on older ones.
SUBAGENT_TOOL_NAMES = ("Agent", "Task")


@dataclass
class RecordedRequest:
    """One request the CLI made: path, and for /v1/messages the parts tests look at."""

    method: str
    path: str
    model: str | None = None
    stream: bool = False
    tools: list[str] = field(default_factory=list)
    last_user_text: str = ""
    reply_kind: str = ""  # "text", "tool_use", "after_tool", "count_tokens", "unknown"


def _text_of(content: Any) -> str:
    """A user message's own text: its text blocks minus the CLI's ``<system-reminder>``s."""
    if isinstance(content, str):
        return "" if content.lstrip().startswith(REMINDER) else content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                text = str(block.get("text", ""))
                if not text.lstrip().startswith(REMINDER):
                    parts.append(text)
        return "\n".join(parts)
    return ""


def _has_tool_result(content: Any) -> bool:
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    )


class FakeMessagesAPI:
    """The fake API server. ``with FakeMessagesAPI() as api: ... api.base_url``.

    ``requests`` lists what the CLI asked (``RecordedRequest``), ``unknown`` the
    paths this server does not know. Thread-safe; ``start()`` / ``stop()`` too.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self.unknown: list[str] = []
        self._ids = itertools.count(1)
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: tests read api.requests instead

            def do_POST(self) -> None:
                api._handle(self, "POST")

            def do_GET(self) -> None:
                api._handle(self, "GET")

            def do_HEAD(self) -> None:
                api._handle(self, "HEAD")

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="fake-messages-api", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def env(self, config_dir: str | os.PathLike[str]) -> dict[str, str]:
        """The ``ClaudeAgentOptions(env=...)`` that points the CLI here, offline."""
        return offline_env(self.base_url, config_dir)

    def recorded(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self.requests)

    # -- HTTP ------------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)
            if request.reply_kind == "unknown":
                self.unknown.append(f"{request.method} {request.path}")

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        if method == "POST" and path == "/v1/messages":
            self._messages(handler, body if isinstance(body, dict) else {})
        elif method == "POST" and path == "/v1/messages/count_tokens":
            tokens = max(1, len(raw) // 4)
            self._record(RecordedRequest(method, path, reply_kind="count_tokens"))
            self._json(handler, 200, {"input_tokens": tokens})
        else:
            self._record(RecordedRequest(method, path, reply_kind="unknown"))
            self._json(
                handler,
                404,
                {
                    "type": "error",
                    "error": {"type": "not_found_error", "message": f"no fake for {path}"},
                },
            )

    def _json(self, handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("request-id", f"req_fake_{next(self._ids)}")
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    # -- the script ------------------------------------------------------------------

    def _messages(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        content = last.get("content") if isinstance(last, dict) else None
        last_user = next(
            (
                _text_of(m.get("content"))
                for m in reversed(messages)
                if isinstance(m, dict) and m.get("role") == "user" and _text_of(m.get("content"))
            ),
            "",
        )
        tools = [
            str(t.get("name"))
            for t in body.get("tools") or []
            if isinstance(t, dict) and t.get("name")
        ]
        subagent_tool = next((n for n in SUBAGENT_TOOL_NAMES if n in tools), None)
        blocks: list[dict[str, Any]]
        if _has_tool_result(content):
            kind = "after_tool"
            blocks = [{"type": "text", "text": f"{REPLY_AFTER_TOOL} ({_short(last_user)})"}]
        elif DELEGATE in last_user and SUBAGENT_MARK not in last_user and subagent_tool:
            kind = "tool_use"
            blocks = [
                {"type": "text", "text": "Delegating to a subagent."},
                {
                    "type": "tool_use",
                    "id": f"toolu_fake{uuid.uuid4().hex[:20]}",
                    "name": subagent_tool,
                    "input": {
                        "description": "Look around",
                        "prompt": f"{SUBAGENT_MARK} look around and report ({_short(last_user)})",
                        "subagent_type": "general-purpose",
                        # In the foreground: the turn ends after the subagent did.
                        "run_in_background": False,
                    },
                },
            ]
        else:
            kind = "text"
            blocks = [{"type": "text", "text": f"{REPLY_PREFIX} {_short(last_user)}"}]
        self._record(
            RecordedRequest(
                "POST",
                "/v1/messages",
                model=body.get("model"),
                stream=bool(body.get("stream")),
                tools=tools,
                last_user_text=last_user,
                reply_kind=kind,
            )
        )
        message_id = f"msg_fake{next(self._ids):08d}{uuid.uuid4().hex[:8]}"
        model = str(body.get("model") or "claude-fake")
        stop_reason = "tool_use" if kind == "tool_use" else "end_turn"
        usage = {"input_tokens": 10, "output_tokens": 5}
        if not body.get("stream"):
            self._json(
                handler,
                200,
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": blocks,
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": usage,
                },
            )
            return
        payload = b"".join(
            f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            for name, data in _sse_events(message_id, model, blocks, stop_reason)
        )
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Content-Length", str(len(payload)))
        handler.send_header("request-id", f"req_fake_{next(self._ids)}")
        handler.end_headers()
        handler.wfile.write(payload)


def offline_env(base_url: str, config_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Environment for the CLI: this fake API, any key, a per-host config dir,
    and none of the traffic this server does not fake (telemetry, updates, ...)."""
    return {
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "test",
        "CLAUDE_CONFIG_DIR": str(config_dir),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }


def _short(text: str, limit: int = 60) -> str:
    line = " ".join(text.split())
    return line[:limit]


def _sse_events(
    message_id: str, model: str, blocks: list[dict[str, Any]], stop_reason: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    yield (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 1},
            },
        },
    )
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            yield (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            yield (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": block["text"]},
                },
            )
        else:
            yield (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {
                        "type": "tool_use",
                        "id": block["id"],
                        "name": block["name"],
                        "input": {},
                    },
                },
            )
            yield (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {
                        "type": "input_json_delta",
                        "partial_json": json.dumps(block["input"]),
                    },
                },
            )
        yield ("content_block_stop", {"type": "content_block_stop", "index": index})
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": 5},
        },
    )
    yield ("message_stop", {"type": "message_stop"})


def main() -> None:
    with FakeMessagesAPI() as api:
        print(api.base_url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
