"""A private moto S3 server for tests: started on a free local port, stopped at the end.

``MotoServer`` runs ``python -m moto.server`` in a child process. moto keeps
every bucket and object in that process's memory, so ``kill()`` followed by
``start()`` (same port) is a server restart that lost all data, which is what
the restart tests need to be honest about.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """``moto.server`` on ``127.0.0.1:port`` (a free port unless given)."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers HTTP."""
        if self.running:
            return
        sink = open(self.log_path, "ab") if self.log_path else contextlib.nullcontext()
        with sink as log:  # the child keeps its own copy of the descriptor
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdout=log or subprocess.DEVNULL,
                stderr=log or subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with status {self._proc.returncode}")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto server did not answer on port {self.port} within {timeout}s")

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=1.0)
        try:
            conn.request("GET", "/moto-api/")
            return conn.getresponse().status < 500
        except OSError:
            return False
        finally:
            conn.close()

    def kill(self) -> None:
        """SIGKILL: the server dies at once, with everything it held."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        """Terminate politely, then kill if it does not go."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
