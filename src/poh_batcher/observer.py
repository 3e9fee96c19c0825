"""Watching an archive run from outside: metrics, live progress, logs.

:func:`poh_batcher.pipeline.run_archive` calls every observer at a few points
of the run and knows nothing else about them. An observer only reads: it must
not change the run, and an observer that raises is logged and otherwise
ignored, so a broken display can never lose or delay an ACK.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batcher import AsyncBatcher, BatchReceipt
    from .sources.base import Chunk
    from .summary import Summary

_log = logging.getLogger("poh_batcher")


class ArchiveObserver:
    """Base class of run observers; every hook is optional and does nothing here.

    ``on_start`` hands over the live :class:`~poh_batcher.batcher.AsyncBatcher`
    (its ``stats`` and ``oldest_pending_age()``) and the :class:`Summary` being
    filled; observers that sample (metrics, progress) keep them and read them
    whenever they like.
    """

    def on_start(self, batcher: AsyncBatcher, summary: Summary) -> None:
        """The run begins; nothing has been read yet."""

    def on_chunk(self, chunk: Chunk) -> None:
        """A chunk of input was read and validated (before its ACKs are enqueued)."""

    def on_delivered(self, receipt: BatchReceipt) -> None:
        """A batch is durably stored."""

    def on_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        """Storing a batch failed with ``exc``; it is tried again after ``delay`` seconds."""

    def on_spool(self, spool_bytes: int) -> None:
        """The write-ahead spool now holds ``spool_bytes`` bytes."""

    def on_finish(self, summary: Summary) -> None:
        """The run is over and ``summary`` holds its final figures."""


class Observers(ArchiveObserver):
    """Several observers as one; a hook that raises is logged, never propagated."""

    def __init__(self, observers: Sequence[ArchiveObserver] = ()) -> None:
        self.observers = tuple(observers)

    def __bool__(self) -> bool:
        return bool(self.observers)

    def on_start(self, batcher: AsyncBatcher, summary: Summary) -> None:
        for observer in self.observers:
            _guarded(observer.on_start, batcher, summary)

    def on_chunk(self, chunk: Chunk) -> None:
        for observer in self.observers:
            _guarded(observer.on_chunk, chunk)

    def on_delivered(self, receipt: BatchReceipt) -> None:
        for observer in self.observers:
            _guarded(observer.on_delivered, receipt)

    def on_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        for observer in self.observers:
            _guarded(observer.on_retry, attempt, exc, delay)

    def on_spool(self, spool_bytes: int) -> None:
        for observer in self.observers:
            _guarded(observer.on_spool, spool_bytes)

    def on_finish(self, summary: Summary) -> None:
        for observer in self.observers:
            _guarded(observer.on_finish, summary)


def _guarded(hook: Callable[..., None], *args: object) -> None:
    try:
        hook(*args)
    except Exception:
        _log.exception("observer %s failed; the run goes on", getattr(hook, "__qualname__", hook))


def command_observers(args: Any, stack: ExitStack) -> list[ArchiveObserver]:
    """The observers the command's options ask for; servers are closed by ``stack``.

    Logs always; Prometheus metrics with ``--metrics-port``; live progress when
    stderr is a terminal, without ``--quiet`` and with text logs.
    """
    from .logs import LogObserver

    observers: list[ArchiveObserver] = [LogObserver()]
    if getattr(args, "metrics_port", None) is not None:
        from .metrics import Metrics

        metrics = Metrics()
        host, port = metrics.serve(args.metrics_port, args.metrics_addr)
        stack.callback(metrics.close)
        _log.info("serving metrics on http://%s:%d/metrics", host, port, extra={"metrics_port": port})
        observers.append(metrics)
    quiet = getattr(args, "quiet", False) or getattr(args, "log_format", "text") != "text"
    if not quiet and sys.stderr.isatty():  # checked first: rich is only imported for a terminal
        from .progress import Progress

        observers.append(Progress())
    return observers
