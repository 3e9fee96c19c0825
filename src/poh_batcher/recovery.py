"""Delivering what a previous run left in the spool, before any new input.

Each spooled batch is rebuilt from its ACK lines with the codec and level it was
planned with, which gives the same bytes, and stored under the key chosen
before the crash. If that key already holds those bytes, the upload had
succeeded before the crash: it counts as delivered and no second object is
made. If it holds other bytes (a different writer took the key meanwhile),
the batch takes the next free key instead; nothing is overwritten.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .batcher import pack_lines, store_batch
from .clock import Clock
from .errors import KeyExistsError
from .naming import KeyNamer, parse_key
from .retry import RetryPolicy, call_with_retry
from .spool import Spool, SpooledBatch
from .storage.base import StorageBackend
from .types import PackedBatch


async def redeliver(
    batches: list[SpooledBatch],
    storage: StorageBackend,
    spool: Spool,
    *,
    retry: RetryPolicy,
    clock: Clock,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    on_stored: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Store every spooled batch; return (batches, ACKs) delivered.

    ``on_stored(acks)`` is called after each batch, so a caller that cancels the
    replay (a shutdown) knows how far it got; ``on_retry`` as in :func:`call_with_retry`.
    """
    acks = 0
    for batch in batches:
        packed = await asyncio.to_thread(pack_lines, batch.lines, codec=batch.codec, level=batch.level)
        key = batch.key
        while not await _store_with_retry(storage, key, packed, retry, clock, on_retry):
            key = await _next_key(storage, key, packed)
            await spool.record_batch(batch.first, len(batch.lines), key, batch.codec, batch.level)
        spool.record_delivered(batch.first, len(batch.lines), key)
        acks += len(batch.lines)
        if on_stored is not None:
            on_stored(len(batch.lines))
    return len(batches), acks


async def _store_with_retry(
    storage: StorageBackend,
    key: str,
    packed: PackedBatch,
    retry: RetryPolicy,
    clock: Clock,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> bool:
    """Store ``packed`` at ``key``: True if it is there now (stored, or stored before the crash)."""

    async def store_once() -> bool:
        try:
            await store_batch(storage, key, packed)
        except KeyExistsError:
            return await storage.load_bytes(key) == packed.payload
        return True

    return await call_with_retry(store_once, retry, clock, on_retry=on_retry)


async def _next_key(storage: StorageBackend, taken: str, packed: PackedBatch) -> str:
    parsed = parse_key(taken)
    assert parsed is not None, f"spooled key {taken!r} is not a batch key"
    namer = KeyNamer(storage, packed.header.compression, prefix=parsed.prefix, writer_id=parsed.writer_id)
    key, _ = await namer.next_key(parsed.hour)
    return key
