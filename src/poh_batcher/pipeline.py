"""The archive job, end to end: source → validate → batch → pack → name → store.

This is the one function that reads like the data flow in DESIGN.md; the CLI
only turns options into an :class:`ArchiveSettings` and objects, and prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .batcher import AsyncBatcher, BatchPlan, BatchReceipt
from .clock import Clock, SystemClock
from .errors import DeliveryError
from .ingest_checks import DUPLICATE_REASON
from .observer import ArchiveObserver, Observers
from .parsing import DEFAULT_MAX_LINE_BYTES, Reject
from .recovery import redeliver
from .retry import RetryPolicy
from .sources.base import Chunk, Source
from .spool import Recovered, Spool, SpoolFullError
from .storage.base import StorageBackend
from .summary import Summary

T = TypeVar("T")
_log = logging.getLogger("poh_batcher")
SPOOL_FULL_WARNING_INTERVAL = 30.0
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
    max_in_flight: int = 8  # fsync latency, not CPU, bounds a batch: overlap several
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    strict: bool = False
    shutdown_timeout: float = 30.0
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
    spool: Spool | None = None,
    recovered: Recovered | None = None,
    clock: Clock | None = None,
    observers: Sequence[ArchiveObserver] = (),
) -> Summary:
    """Archive everything ``source`` yields into ``storage`` until it ends or ``stop`` is set.

    ``observers`` (metrics, progress, logs) are told about the run as it goes
    and sample its live figures; see :class:`poh_batcher.observer.ArchiveObserver`.

    With a ``spool`` (opened by the caller, which got ``recovered`` from it),
    what a previous run left is delivered first, every chunk is journaled
    before it counts as accepted, and each batch's plan is made durable before
    its upload.
    """
    clock = clock or SystemClock()
    observer = Observers(observers)
    summary = Summary()
    started = clock.monotonic()
    recovered = recovered or Recovered()
    replayed = [0, 0]  # batches and ACKs of the spool stored again so far
    spool_full_warned = [-SPOOL_FULL_WARNING_INTERVAL]  # when a full spool disk was last reported

    def replayed_one(acks: int) -> None:
        replayed[0] += 1
        replayed[1] += acks

    if spool is not None and recovered.batches:
        # Like any upload, the replay honours a stop: it gets --shutdown-timeout, then stays in the spool.
        await _within_shutdown_timeout(
            redeliver(
                recovered.batches,
                storage,
                spool,
                retry=settings.retry,
                clock=clock,
                on_retry=observer.on_retry if observer else None,
                on_stored=replayed_one,
            ),
            stop,
            settings.shutdown_timeout,
        )
    summary.batches_recovered = replayed[0]
    summary.acks_recovered = recovered.acks

    def delivered(receipt: BatchReceipt) -> None:
        if spool is not None:
            spool.record_delivered(receipt.first, receipt.count, receipt.key)
            observer.on_spool(spool.bytes_on_disk)
        observer.on_delivered(receipt)

    async def plan(batch: BatchPlan) -> None:
        assert spool is not None
        assert batch.key is not None
        await _while_spool_full(
            lambda: spool.record_batch(batch.first, batch.count, batch.key or "", batch.codec, batch.level),
            clock,
            None,
            spool_full_warned,
        )

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
        first_index=recovered.unbatched_first,
        before_store=plan if spool is not None else None,
        on_delivered=delivered,
        on_retry=observer.on_retry if observer else None,
    )
    observer.on_start(batcher, summary)
    if recovered.unbatched and not stop.is_set():
        await batcher.enqueue_lines(recovered.unbatched)
    accepted_before = batcher.stats.acks_enqueued
    next_line = recovered.input_line
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
            observer.on_chunk(chunk)
            next_line += chunk.lines
            if spool is not None and (chunk.acks or chunk.end_offset is not None):
                # A full spool disk pauses the input (retried with back-off), it does not end the run.
                journaled = await _while_spool_full(
                    functools.partial(
                        spool.append,
                        chunk.acks,
                        input_offset=chunk.end_offset,
                        next_line=next_line,
                        joined=chunk.joined,
                    ),
                    clock,
                    stop,
                    spool_full_warned,
                )
                if not journaled:  # stopped while the disk was full: this chunk was never accepted
                    summary.stopped_by = "interrupted"
                    break
                summary.acks_journaled += len(chunk.acks)
                observer.on_spool(spool.bytes_on_disk)
            summary.lines_rejected += len(chunk.rejects)
            summary.duplicates_dropped += sum(r.reason.startswith(DUPLICATE_REASON) for r in chunk.rejects)
            summary.blank_lines += chunk.blank
            if chunk.rejects:
                await report_rejects(chunk.rejects)
            if chunk.acks:
                try:
                    enqueued = await _unless_stopped(batcher.enqueue_lines(chunk.acks), stop)
                except _Stopped:
                    summary.stopped_by = "interrupted"
                    break
                if chunk.on_stored is not None:
                    enqueued.add_done_callback(_call_if_ok(chunk.on_stored))
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
        failure = await _drain(batcher, stop, settings.shutdown_timeout)
        if stop.is_set() and summary.stopped_by == "end of input":
            summary.stopped_by = "interrupted"  # the signal came while the last uploads were awaited
        stats = batcher.stats
        summary.acks_accepted = max(summary.acks_journaled, stats.acks_enqueued - accepted_before)
        summary.lines_read = summary.acks_accepted + summary.lines_rejected + summary.blank_lines
        summary.acks_stored = stats.acks_delivered + replayed[1]
        summary.acks_not_stored = summary.acks_accepted + summary.acks_recovered - summary.acks_stored
        summary.batches = stats.batches_delivered + summary.batches_recovered
        summary.bytes_in = stats.raw_bytes
        summary.bytes_out = stats.stored_bytes
        summary.retries = stats.retries
        summary.elapsed_seconds = clock.monotonic() - started
        summary.failure = str(failure) if failure else None
        observer.on_finish(summary)
    return summary


async def _drain(batcher: AsyncBatcher, stop: asyncio.Event, shutdown_timeout: float) -> DeliveryError | None:
    """Wait for every batch; once a stop is requested, for ``shutdown_timeout`` at most."""
    stopping = asyncio.ensure_future(batcher.stop())
    await _until_done_or_stopped(stopping, stop)
    if not stopping.done():
        await asyncio.wait({stopping}, timeout=shutdown_timeout)
        if not stopping.done():
            batcher.abandon()
    try:
        await stopping
    except DeliveryError as exc:
        return exc
    return None


async def _while_spool_full(
    write: Callable[[], Awaitable[None]], clock: Clock, stop: asyncio.Event | None, warned: list[float]
) -> bool:
    """Run a spool write, retrying with back-off while its disk is full; False if stopped first.

    A failed write leaves nothing in the journal, so trying it again cannot journal it twice.
    ``warned[0]`` is when this was last reported (once per ``SPOOL_FULL_WARNING_INTERVAL``).
    """
    delay = 0.1
    while True:
        try:
            await write()
            return True
        except SpoolFullError as exc:
            if clock.monotonic() - warned[0] >= SPOOL_FULL_WARNING_INTERVAL:
                warned[0] = clock.monotonic()
                _log.warning("%s; input paused, retrying until there is room", exc, extra={"cause": "spool full"})
        try:
            await _unless_stopped(clock.sleep(delay), stop) if stop is not None else await clock.sleep(delay)
        except _Stopped:
            return False
        delay = min(delay * 2, 5.0)


async def _within_shutdown_timeout(work: Awaitable[T], stop: asyncio.Event, shutdown_timeout: float) -> bool:
    """Await ``work``; once ``stop`` fires, for ``shutdown_timeout`` more at most, then cancel it.

    True if it finished; its exception, if any, propagates.
    """
    task = asyncio.ensure_future(work)
    await _until_done_or_stopped(task, stop)
    if not task.done():
        await asyncio.wait({task}, timeout=shutdown_timeout)
    if not task.done():
        await _cancel(task)
        return False
    task.result()
    return True


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
    await _until_done_or_stopped(task, stop)
    if not task.done():
        await _cancel(task)
        raise _Stopped
    return task.result()


async def _until_done_or_stopped(task: asyncio.Future[Any], stop: asyncio.Event) -> None:
    """Wait until ``task`` is done or ``stop`` is set, whichever comes first."""
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _call_if_ok(callback: Callable[[], None]) -> Callable[[asyncio.Future[Any]], None]:
    def done(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            callback()

    return done
