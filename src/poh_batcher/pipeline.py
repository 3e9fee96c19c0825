"""The archive job, end to end: source → validate → batch → pack → name → store.

This is the one function that reads like the data flow in DESIGN.md; the CLI
only turns options into an :class:`ArchiveSettings` and objects, and prints.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .batcher import AsyncBatcher
from .clock import Clock, SystemClock
from .errors import DeliveryError
from .parsing import DEFAULT_MAX_LINE_BYTES, Reject
from .retry import RetryPolicy
from .sources.base import Chunk, Source
from .storage.base import StorageBackend
from .summary import Summary

T = TypeVar("T")
RejectReporter = Callable[[list[Reject]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ArchiveSettings:
    """Everything that shapes an archive run, separate from the objects that do it."""

    batch_size: int = 500
    batch_timeout: float = 1.5
    max_bytes: int | None = None
    codec: str = "auto"
    level: int = 3
    writer_id: str | None = None
    max_in_flight: int = 4
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    strict: bool = False
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=10, initial_delay=0.2, max_delay=30.0))


class _Stopped(Exception):
    """The stop event fired while waiting."""


async def run_archive(
    settings: ArchiveSettings,
    source: Source,
    storage: StorageBackend,
    *,
    report_rejects: RejectReporter,
    stop: asyncio.Event,
    clock: Clock | None = None,
) -> Summary:
    """Archive everything ``source`` yields into ``storage`` until it ends or ``stop`` is set."""
    clock = clock or SystemClock()
    summary = Summary()
    started = clock.monotonic()
    batcher = AsyncBatcher(
        settings.batch_size,
        settings.batch_timeout,
        storage,
        max_bytes=settings.max_bytes,
        codec=settings.codec,
        level=settings.level,
        max_in_flight=settings.max_in_flight,
        retry=settings.retry,
        writer_id=settings.writer_id,
        clock=clock,
    )
    chunks = source.chunks()
    try:
        while True:
            try:
                chunk = await _unless_stopped(_next_or_none(chunks), stop)
            except _Stopped:
                summary.stopped_by = "interrupted"
                break
            if chunk is None:
                break
            summary.lines_rejected += len(chunk.rejects)
            summary.blank_lines += chunk.blank
            if chunk.rejects:
                await report_rejects(chunk.rejects)
            if chunk.acks:
                try:
                    delivered = await _unless_stopped(batcher.enqueue_lines(chunk.acks), stop)
                except _Stopped:
                    summary.stopped_by = "interrupted"
                    break
                if chunk.on_stored is not None:
                    delivered.add_done_callback(_call_if_ok(chunk.on_stored))
            if settings.strict and chunk.rejects:
                summary.stopped_by = f"stopped at invalid line {chunk.rejects[0].line} (--strict)"
                break
            if batcher.stats.batches_failed:
                summary.stopped_by = "stopped: storage failure"
                break
    finally:
        source.close()
        if isinstance(chunks, AsyncGenerator):
            with contextlib.suppress(RuntimeError):
                await chunks.aclose()
        failure: DeliveryError | None = None
        try:
            await batcher.stop()
        except DeliveryError as exc:
            failure = exc
        stats = batcher.stats
        summary.acks_accepted = stats.acks_enqueued
        summary.lines_read = summary.acks_accepted + summary.lines_rejected + summary.blank_lines
        summary.acks_stored = stats.acks_delivered
        summary.acks_not_stored = stats.acks_failed
        summary.batches = stats.batches_delivered
        summary.bytes_in = stats.raw_bytes
        summary.bytes_out = stats.stored_bytes
        summary.retries = stats.retries
        summary.elapsed_seconds = clock.monotonic() - started
        summary.failure = str(failure) if failure else None
    return summary


async def _next_or_none(chunks: AsyncIterator[Chunk]) -> Chunk | None:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return None


async def _unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> T:
    """Await ``awaitable``, or cancel it and raise ``_Stopped`` when ``stop`` fires first."""
    if stop.is_set():
        raise _Stopped
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise _Stopped
    return task.result()


def _call_if_ok(callback: Callable[[], None]) -> Callable[[asyncio.Future[Any]], None]:
    def done(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            callback()

    return done
