"""Live progress on a terminal (rich), on stderr only.

Shown only when stderr is a terminal and ``--quiet`` is not given; it never
writes to stdout. The display samples the batcher's live ``stats`` from a task
on the event loop a few times a second (so it reads them on the thread that
writes them), and disappears at the end of the run, when the summary is
printed in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .observer import ArchiveObserver

if TYPE_CHECKING:
    from .batcher import AsyncBatcher
    from .summary import Summary

REFRESH_SECONDS = 0.25
RATE_WINDOW_SECONDS = 3.0


def wanted(stream: TextIO | None = None, *, quiet: bool = False) -> bool:
    """Whether to show live progress: stderr is a terminal and not ``--quiet``."""
    stream = sys.stderr if stream is None else stream
    return not quiet and stream.isatty()


class Progress(ArchiveObserver):
    """A rich live display of the run's figures."""

    def __init__(self, console: Console | None = None, *, refresh: float = REFRESH_SECONDS) -> None:
        self.console = console or Console(stderr=True)
        self.refresh = refresh
        self._batcher: AsyncBatcher | None = None
        self._rejected = 0
        self._spool_bytes: int | None = None
        self._samples: deque[tuple[float, int]] = deque()
        self._started = time.monotonic()
        self._live: Live | None = None
        self._task: asyncio.Task[None] | None = None

    def on_start(self, batcher: AsyncBatcher, summary: Summary) -> None:
        self._batcher = batcher
        self._started = time.monotonic()
        self._live = Live(
            self.render(), console=self.console, auto_refresh=False, transient=True, redirect_stdout=False
        )
        self._live.start()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    def on_chunk(self, chunk: object) -> None:
        self._rejected += len(getattr(chunk, "rejects", ()))

    def on_spool(self, spool_bytes: int) -> None:
        self._spool_bytes = spool_bytes

    def on_finish(self, summary: Summary) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._live is not None:
            self._live.stop()
            self._live = None

    async def _refresh_forever(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(self.refresh)
                if self._live is not None:
                    self._live.update(self.render(), refresh=True)

    def render(self) -> Table:
        """The display as it is now."""
        now = time.monotonic()
        stats = self._batcher.stats if self._batcher is not None else None
        accepted = stats.acks_enqueued if stats else 0
        stored = stats.acks_delivered if stats else 0
        raw = stats.raw_bytes if stats else 0
        out = stats.stored_bytes if stats else 0
        self._samples.append((now, stored))
        while len(self._samples) > 2 and self._samples[0][0] < now - RATE_WINDOW_SECONDS:
            self._samples.popleft()
        first_time, first_stored = self._samples[0]
        rate = (stored - first_stored) / (now - first_time) if now > first_time else 0.0
        oldest = self._batcher.oldest_pending_age() if self._batcher is not None else 0.0
        spool = "-" if self._spool_bytes is None else _size(self._spool_bytes)

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan", justify="right")
        grid.add_column(justify="right")
        grid.add_column(style="bold cyan", justify="right")
        grid.add_column(justify="right")
        grid.add_column(style="bold cyan", justify="right")
        grid.add_column(justify="right")
        grid.add_row("ACKs/s", f"{rate:,.0f}", "accepted", f"{accepted:,}", "rejected", _warn(self._rejected))
        grid.add_row(
            "stored",
            f"{stored:,}",
            "batches",
            f"{stats.batches_delivered if stats else 0:,}",
            "in flight",
            f"{stats.batches_in_flight if stats else 0}",
        )
        grid.add_row("bytes in", _size(raw), "bytes out", _size(out), "ratio", f"{raw / out:.2f}x" if out else "-")
        grid.add_row("spool", spool, "oldest pending", f"{oldest:.1f} s", "elapsed", f"{now - self._started:,.1f} s")
        if stats and stats.retries:
            grid.add_row("retries", Text(f"{stats.retries:,}", style="yellow"), "", "", "", "")
        return grid


def _warn(count: int) -> Text:
    return Text(f"{count:,}", style="bold red" if count else "")


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
