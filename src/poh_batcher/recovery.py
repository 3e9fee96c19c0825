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

from .batcher import pack_lines
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
) -> tuple[int, int]:
    """Store every spooled batch; return (batches, ACKs) delivered."""
    acks = 0
    for batch in batches:
        packed = await asyncio.to_thread(pack_lines, batch.lines, codec=batch.codec, level=batch.level)
        key = batch.key
        while not await call_with_retry(lambda k=key: _store_once(storage, k, packed), retry, clock):  # type: ignore[misc]
            key = await _next_key(storage, key, packed)
            await spool.record_batch(batch.first, len(batch.lines), key, batch.codec, batch.level)
        spool.record_delivered(batch.first, len(batch.lines), key)
        acks += len(batch.lines)
    return len(batches), acks


async def _store_once(storage: StorageBackend, key: str, packed: PackedBatch) -> bool:
    """Store ``packed`` at ``key``: True if it is there now (stored, or stored before the crash)."""
    try:
        await storage.save_bytes(
            key,
            packed.payload,
            content_type="application/json",
            content_encoding=None if packed.header.compression == "none" else packed.header.compression,
            metadata={"ack-count": str(packed.header.count), "codec": packed.header.compression},
        )
    except KeyExistsError:
        return await storage.load_bytes(key) == packed.payload
    return True


async def _next_key(storage: StorageBackend, taken: str, packed: PackedBatch) -> str:
    parsed = parse_key(taken)
    assert parsed is not None, f"spooled key {taken!r} is not a batch key"
    namer = KeyNamer(storage, packed.header.compression, prefix=parsed.prefix, writer_id=parsed.writer_id)
    key, _ = await namer.next_key(parsed.hour)
    return key
