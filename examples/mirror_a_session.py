"""Mirror a Claude Agent SDK session through walmirror, then read it back from the backend.

    python examples/mirror_a_session.py --backend file:///tmp/transcripts --queue /tmp/wm.db

Every transcript line the CLI writes goes through ``DurableSessionStore``: it
is on disk in the local queue before ``append`` returns, and a background
flusher delivers it to the backend (any URL ``walmirror.backends.from_url``
takes: ``file://``, ``redis://``, ``postgresql://``, ``s3://``). The backend
may be down meanwhile: the session does not notice, and the mirror catches up.

The CLI needs credentials as usual (``ANTHROPIC_API_KEY``). The test suite
runs this file as written against a local fake Messages API by setting
``ANTHROPIC_BASE_URL`` and ``CLAUDE_CONFIG_DIR`` in the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from claude_agent_sdk import (
    ClaudeAgentOptions,
    ClaudeSDKClient,
    MirrorErrorMessage,
    ResultMessage,
    get_session_messages_from_store,
)

from walmirror import DurableSessionStore
from walmirror.backends import from_url

PROMPTS = ["Say hello.", "Now say goodbye."]


async def mirror_a_session(backend_url: str, queue: str, cwd: str) -> str:
    """Run a two-turn session mirrored to ``backend_url``; return its session id."""
    backend = from_url(backend_url)
    async with DurableSessionStore(backend, queue) as store:
        options = ClaudeAgentOptions(cwd=cwd, session_store=store)
        session_id = ""
        async with ClaudeSDKClient(options) as client:
            for prompt in PROMPTS:
                await client.query(prompt)
                async for message in client.receive_response():
                    if isinstance(message, MirrorErrorMessage):  # never with walmirror
                        raise RuntimeError(f"mirror error: {message.error}")
                    if isinstance(message, ResultMessage):
                        session_id = message.session_id

        # A barrier: everything appended so far is in the backend. Do this before
        # another host resumes the session (ClaudeAgentOptions(resume=session_id)).
        await store.flush(timeout=60)
        for backend_status in (await store.status())["backends"]:
            print(
                f"{backend_status['name']}: {backend_status['pending_entries']} pending, "
                f"{backend_status['delivered']} delivered"
            )

        messages = await get_session_messages_from_store(store, session_id, directory=cwd)
        print(f"session {session_id}: {len(messages)} messages in {backend_url}")
    for name in ("aclose", "close"):  # the backend's client connections
        close = getattr(backend, name, None)
        if close is not None:
            await close()
            break
    return session_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="file:///tmp/walmirror-transcripts")
    parser.add_argument("--queue", default="/tmp/walmirror-example.db")
    parser.add_argument("--cwd", default=os.getcwd(), help="the project directory")
    args = parser.parse_args()
    asyncio.run(mirror_a_session(args.backend, args.queue, args.cwd))


if __name__ == "__main__":
    main()
