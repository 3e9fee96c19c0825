"""Live progress: on a terminal only, on stderr only; off with --quiet and when stderr is not a TTY."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

from rich.console import Console

from poh_batcher.parsing import LineValidator
from poh_batcher.pipeline import ArchiveSettings, run_archive
from poh_batcher.progress import Progress, wanted
from poh_batcher.sources.lines import LineSource
from poh_batcher.storage import LocalStorage

ACK = '{"id":"a%d","timestamp":"2024-05-01T12:00:00Z","signature":"sig","pubkey":"key"}'


def command(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "poh_batcher.cli", "-n", "50", "-o", str(tmp_path / "out"), *extra]


def environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TERM": "xterm-256color", "COLUMNS": "120"}


def summary_only(stderr: str) -> bool:
    """Only the summary's lines: each one "poh-batcher: ...", no warning, no error, no invalid line."""
    lines = stderr.splitlines()
    return (
        bool(lines)
        and all(line.startswith("poh-batcher: ") for line in lines)
        and not any(line.startswith(("poh-batcher: warning", "poh-batcher: error")) for line in lines)
        and "ACKs stored" in stderr
        and "\x1b" not in stderr  # no terminal control codes: no progress display
    )


def test_not_a_terminal_prints_only_the_summary(tmp_path: Path) -> None:
    data = "".join(ACK % i + "\n" for i in range(120)).encode()
    result = subprocess.run(
        command(tmp_path), input=data, capture_output=True, env=environment(tmp_path), timeout=60, check=False
    )
    assert result.returncode == 0
    assert result.stdout == b""
    assert summary_only(result.stderr.decode()), result.stderr.decode()


def test_quiet_prints_only_the_summary_even_with_invalid_lines(tmp_path: Path) -> None:
    data = "".join(ACK % i + "\n" for i in range(120)).encode() + b"not json\n{}\n"
    result = subprocess.run(
        command(tmp_path, "--quiet"),
        input=data,
        capture_output=True,
        env=environment(tmp_path),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert summary_only(stderr), stderr
    assert "2 rejected" in stderr


def test_wanted_only_for_a_terminal_without_quiet() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert wanted(Tty()) is True
    assert wanted(Tty(), quiet=True) is False
    assert wanted(io.StringIO()) is False


async def test_render_shows_every_figure(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    progress = Progress(console, refresh=0.01)
    lines = [ACK % i for i in range(300)] + ["bad"]
    stream = io.BytesIO("\n".join(lines).encode() + b"\n")
    summary = await run_archive(
        ArchiveSettings(batch_size=100),
        LineSource(stream, LineValidator()),
        LocalStorage(tmp_path),
        report_rejects=_ignore,
        stop=asyncio.Event(),
        observers=[progress],
    )
    assert summary.acks_stored == 300
    progress.on_spool(2048)
    console.print(progress.render())
    text = out.getvalue()
    for label in ("ACKs/s", "accepted", "rejected", "stored", "batches", "in flight", "bytes in", "bytes out"):
        assert label in text
    for label in ("ratio", "spool", "oldest pending", "2.0 KiB"):
        assert label in text
    assert "300" in text


async def _ignore(rejects: object) -> None:
    return None


def test_progress_on_a_terminal_goes_to_stderr_only(tmp_path: Path) -> None:
    """stderr on a pseudo-terminal: the live display appears there, stdout stays empty."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen(
        command(tmp_path, "-t", "5"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=environment(tmp_path),
    )
    os.close(slave)
    screen = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert process.stdin is not None
        process.stdin.write("".join(ACK % i + "\n" for i in range(120)).encode())
        process.stdin.flush()
        deadline = time.monotonic() + 20
        while b"ACKs/s" not in screen and time.monotonic() < deadline:
            time.sleep(0.05)
        process.stdin.close()
        assert process.wait(60) == 0
        assert process.stdout is not None
        assert process.stdout.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(5)
        os.close(master)
    text = screen.decode(errors="replace")
    assert "ACKs/s" in text
    assert "oldest pending" in text
    assert "poh-batcher: end of input: 120 lines read" in text
