"""AsyncBatcher: when batches flush, order, backpressure, delivery futures, retries, storage sink."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fakeclock import FakeClock, drive, settle, wait_real
from faultkit import FlakyStorage
from poh_batcher import (
    AckItem,
    AsyncBatcher,
    Batcher,
    BatchReceipt,
    DeliveryError,
    InvalidAckError,
    LocalStorage,
    PackedBatch,
    PohBatcherError,
    RetryPolicy,
    StorageError,
)
from poh_batcher.compression import decompress

SAMPLE = Path(__file__).parent / "data" / "acks_10k.jsonl"
LINES = SAMPLE.read_bytes().splitlines()


def _payload(batch: PackedBatch) -> bytes:
    return decompress(batch.header.compression, batch.payload)


def _acks_of(batch: PackedBatch) -> list[bytes]:
    """The ACK lines of a packed batch, as they were enqueued (minified JSON)."""
    items = json.loads(_payload(batch))
    assert len(items) == batch.header.count
    return [json.dumps(i, separators=(",", ":"), ensure_ascii=False).encode() for i in items]


class Collect:
    """A sink that records every batch it receives."""

    def __init__(self) -> None:
        self.batches: list[PackedBatch] = []

    async def __call__(self, batch: PackedBatch) -> None:
        self.batches.append(batch)

    @property
    def counts(self) -> list[int]:
        return [b.header.count for b in self.batches]

    def lines(self) -> list[bytes]:
        return [line for b in self.batches for line in _acks_of(b)]


class GatedCollect(Collect):
    """A slow sink: each batch is recorded only once the test sets ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def __call__(self, batch: PackedBatch) -> None:
        await self.gate.wait()
        await super().__call__(batch)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- flushing ----------------------------------------------------------------


async def test_flush_by_count() -> None:
    clock, sink = FakeClock(), Collect()
    batcher = AsyncBatcher(3, 10.0, sink, clock=clock)
    futures = [await batcher.enqueue(line) for line in LINES[:7]]
    await wait_real(asyncio.gather(*futures[:6]))
    assert sink.counts == [3, 3]
    assert not futures[6].done()  # the 7th waits for more, or the timer, or stop
    await batcher.stop()
    assert sink.counts == [3, 3, 1]
    assert sink.lines() == LINES[:7]


def _same_size(count: int) -> list[bytes]:
    lines = [
        b'{"id":"tx-%06d","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}' % i for i in range(count)
    ]
    assert len({len(line) for line in lines}) == 1
    return lines


async def test_flush_by_max_bytes() -> None:
    clock, sink = FakeClock(), Collect()
    lines = _same_size(10)
    size = len(lines[0])
    limit = 2 + 3 * size + 2  # exactly three ACKs: brackets, three lines, two commas
    batcher = AsyncBatcher(100, 10.0, sink, max_bytes=limit, clock=clock)
    for line in lines:
        await batcher.enqueue(line)
    await batcher.stop()
    assert sink.counts == [3, 3, 3, 1]
    assert [len(_payload(b)) for b in sink.batches] == [limit, limit, limit, size + 2]
    assert sink.lines() == lines


async def test_max_bytes_one_byte_short_makes_batches_of_two() -> None:
    clock, sink = FakeClock(), Collect()
    lines = _same_size(5)
    limit = 2 + 3 * len(lines[0]) + 2 - 1
    async with AsyncBatcher(100, 10.0, sink, max_bytes=limit, clock=clock) as batcher:
        for line in lines:
            await batcher.enqueue(line)
    assert sink.counts == [2, 2, 1]
    assert sink.lines() == lines


async def test_max_bytes_with_real_acks_never_exceeded() -> None:
    sink = Collect()
    async with AsyncBatcher(1000, 10.0, sink, max_bytes=4096, clock=FakeClock()) as batcher:
        await batcher.enqueue_many(LINES[:500])
    assert all(len(_payload(b)) <= 4096 for b in sink.batches)
    # each batch was flushed only because the next ACK would not fit
    for batch, following in zip(sink.batches, sink.batches[1:], strict=False):
        assert len(_payload(batch)) + 1 + len(_acks_of(following)[0]) > 4096
    assert sink.lines() == LINES[:500]


async def test_lone_ack_flushed_at_timeout_not_before() -> None:
    clock, sink = FakeClock(), Collect()
    batcher = AsyncBatcher(500, 2.0, sink, clock=clock)
    delivered = await batcher.enqueue(LINES[0])
    clock.advance(1.99)
    await settle()
    await asyncio.sleep(0.05)  # give a (wrong) early flush real time to show up
    assert sink.batches == []
    assert not delivered.done()
    clock.advance(0.01)
    receipt = await wait_real(delivered)
    assert receipt.count == 1
    assert sink.lines() == [LINES[0]]
    await batcher.stop()
    assert sink.counts == [1]  # stop found nothing more to write


async def test_timeout_counts_from_first_ack_not_last() -> None:
    clock, sink = FakeClock(), Collect()
    batcher = AsyncBatcher(500, 1.0, sink, clock=clock)
    first = await batcher.enqueue(LINES[0])
    clock.advance(0.6)
    await settle()
    await batcher.enqueue(LINES[1])
    clock.advance(0.39)
    await settle()
    await asyncio.sleep(0.05)
    assert not first.done()
    clock.advance(0.01)  # 1.0 s after the FIRST ACK, 0.4 s after the second
    receipt = await wait_real(first)
    assert receipt.count == 2
    await batcher.stop()


async def test_bulk_enqueue_flushes_its_open_tail_at_timeout_from_its_first_ack() -> None:
    clock, sink, stored = FakeClock(), Collect(), asyncio.Event()

    async def collect(batch: PackedBatch) -> None:
        await sink(batch)
        stored.set()

    batcher = AsyncBatcher(500, 1.0, collect, clock=clock)
    tail = await batcher.enqueue_lines(LINES[:700])  # one full batch sealed, 200 left open
    await wait_real(stored.wait())
    clock.advance(0.99)
    await settle()
    await asyncio.sleep(0.05)
    assert sink.counts == [500]
    clock.advance(0.01)
    receipts = await wait_real(tail)
    assert [r.count for r in receipts] == [500, 200]
    assert sink.lines() == LINES[:700]
    await batcher.stop()


async def test_a_batch_left_open_while_a_bulk_enqueue_waits_for_room_is_flushed_on_time() -> None:
    sink = GatedCollect()
    clock = FakeClock()
    batcher = AsyncBatcher(10, 1.0, sink, max_pending=25, max_in_flight=1, clock=clock)
    task = asyncio.ensure_future(batcher.enqueue_lines(LINES[:100]))
    await settle()
    assert not task.done()  # 2 batches sealed, the third open with 5 ACKs, waiting for room
    assert batcher.stats.acks_enqueued == 25
    clock.advance(1.0)  # the open batch's timeout
    await settle()
    sink.gate.set()
    all_done = await wait_real(task)
    await batcher.stop()
    await wait_real(all_done)
    assert sink.counts[:3] == [10, 10, 5]
    assert sink.lines() == LINES[:100]


async def test_timer_restarts_for_next_batch() -> None:
    clock, sink = FakeClock(), Collect()
    batcher = AsyncBatcher(2, 1.0, sink, clock=clock)
    await batcher.enqueue(LINES[0])
    await batcher.enqueue(LINES[1])  # full: flushed by count, its timer cancelled
    clock.advance(0.5)
    third = await batcher.enqueue(LINES[2])
    clock.advance(0.6)  # 1.1 s after the first batch opened, 0.6 s after the third ACK
    await settle()
    await asyncio.sleep(0.05)
    assert not third.done()
    clock.advance(0.4)
    await wait_real(third)
    assert sink.counts == [2, 1]
    await batcher.stop()


async def test_no_empty_batches() -> None:
    clock, sink = FakeClock(), Collect()
    batcher = AsyncBatcher(2, 1.0, sink, clock=clock)
    await batcher.stop()
    assert sink.batches == []
    batcher = AsyncBatcher(2, 1.0, sink, clock=clock)
    for line in LINES[:4]:
        await batcher.enqueue(line)
    clock.advance(5)
    await settle()
    await batcher.stop()
    assert sink.counts == [2, 2]


# -- order and concurrency ----------------------------------------------------


async def test_order_kept_with_out_of_order_sink() -> None:
    """Sink calls finish in reverse order; ACKs and deliveries stay in order."""
    clock = FakeClock()
    gates: list[asyncio.Event] = []
    four = asyncio.Event()
    received: list[PackedBatch] = []
    in_flight = 0
    most_in_flight = 0

    async def sink(batch: PackedBatch) -> None:
        nonlocal in_flight, most_in_flight
        received.append(batch)
        gate = asyncio.Event()
        gates.append(gate)
        if len(gates) == 4:
            four.set()
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await gate.wait()
        in_flight -= 1

    delivered: list[int] = []
    batcher = AsyncBatcher(
        10, 60.0, sink, max_in_flight=4, clock=clock, max_pending=1000, on_delivered=lambda r: delivered.append(r.index)
    )
    futures = [await batcher.enqueue(line) for line in LINES[:40]]
    await wait_real(four.wait())  # four batches in the sink at once
    assert len(gates) == 4
    assert most_in_flight == 4
    for gate in reversed(gates):  # the last batch finishes first
        gate.set()
        await settle()
    await batcher.stop()
    assert delivered == [0, 1, 2, 3]
    receipts = [f.result() for f in futures]
    assert [r.index for r in receipts] == [i // 10 for i in range(40)]
    assert [line for b in received for line in _acks_of(b)] == LINES[:40]  # batches reached the sink in order


async def test_sink_calls_start_in_batch_order_even_when_packing_finishes_out_of_order() -> None:
    """A big batch is packed slower than the small one after it; the sink still sees them in order."""
    sink = Collect()
    for _ in range(5):
        async with AsyncBatcher(3000, 60.0, sink, max_in_flight=4, codec="zstd", level=9) as batcher:
            await batcher.enqueue_many(LINES[:3000])  # one full batch: slow to pack
            await batcher.enqueue(LINES[3000])  # then a tiny one, sealed by stop()
    assert sink.counts == [3000, 1] * 5
    assert sink.lines() == (LINES[:3001]) * 5


async def test_order_across_many_batches_and_concurrency() -> None:
    sink = Collect()

    async def jittery(batch: PackedBatch) -> None:
        await asyncio.sleep(0.001 * (len(sink.batches) % 3))
        await sink(batch)

    async with AsyncBatcher(37, 60.0, jittery, max_in_flight=3) as batcher:
        for line in LINES[:1000]:
            await batcher.enqueue(line)
    assert sum(sink.counts) == 1000
    assert sorted(sink.lines()) == sorted(LINES[:1000])


# -- backpressure ---------------------------------------------------------------


async def test_backpressure_blocks_and_resumes() -> None:
    clock = FakeClock()
    sink = GatedCollect()
    batcher = AsyncBatcher(2, 60.0, sink, max_pending=4, max_in_flight=1, clock=clock)
    for line in LINES[:4]:
        await batcher.enqueue(line)  # two full batches pending: the limit
    blocked = asyncio.ensure_future(batcher.enqueue(LINES[4]))
    await settle()
    await asyncio.sleep(0.05)
    assert not blocked.done()  # waiting for room, not queueing without limit
    sink.gate.set()
    fifth = await wait_real(blocked)
    await batcher.stop()
    assert fifth.done()
    assert sink.lines() == LINES[:5]


async def test_enqueue_many_respects_backpressure() -> None:
    gate = asyncio.Event()
    seen_pending: list[int] = []
    batcher: AsyncBatcher

    async def slow(batch: PackedBatch) -> None:
        seen_pending.append(batcher.stats.acks_enqueued - batcher.stats.acks_delivered)
        await gate.wait()

    batcher = AsyncBatcher(10, 60.0, slow, max_pending=30, max_in_flight=1, clock=FakeClock())
    task = asyncio.ensure_future(batcher.enqueue_many(LINES[:100]))
    await settle()
    await asyncio.sleep(0.05)
    assert not task.done()
    assert batcher.stats.acks_enqueued == 30
    gate.set()
    all_done = await wait_real(task)
    await batcher.stop()
    assert len(await wait_real(all_done)) >= 10
    assert max(seen_pending) <= 30


async def test_stop_drains_an_enqueue_that_was_waiting_for_room() -> None:
    sink = GatedCollect()
    batcher = AsyncBatcher(2, 60.0, sink, max_pending=2, max_in_flight=1, clock=FakeClock())
    await batcher.enqueue(LINES[0])
    await batcher.enqueue(LINES[1])
    blocked = asyncio.ensure_future(batcher.enqueue(LINES[2]))
    await settle()
    stopping = asyncio.ensure_future(batcher.stop())
    await settle()
    sink.gate.set()
    await wait_real(stopping)
    if blocked.exception() is None:  # accepted: then it must be stored when stop() returns
        third = blocked.result()
        assert third.done()
        assert third.exception() is None
        assert sink.lines() == LINES[:3]
    else:  # or refused, saying so
        assert isinstance(blocked.exception(), PohBatcherError)
        assert sink.lines() == LINES[:2]


# -- delivery futures, failures and retries -------------------------------------


async def test_delivery_future_resolves_after_file_is_stored(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    async with AsyncBatcher(2, 60.0, storage, clock=FakeClock()) as batcher:
        first = await batcher.enqueue(LINES[0])
        await batcher.enqueue(LINES[1])
        receipt = await wait_real(first)
        assert isinstance(receipt, BatchReceipt)
        assert receipt.key is not None
        assert receipt.count == 2
        assert receipt.codec == "zstd"
        assert (tmp_path / receipt.key).is_file()  # durable when the future resolves
        assert receipt.url == (tmp_path / receipt.key).as_uri()
        assert receipt.stored_bytes == (tmp_path / receipt.key).stat().st_size
        assert receipt.raw_bytes == 2 + len(LINES[0]) + 1 + len(LINES[1])
        assert receipt.attempts == 1


async def test_permanent_sink_failure_reaches_futures_and_stop() -> None:
    calls = 0

    async def broken(batch: PackedBatch) -> None:
        nonlocal calls
        calls += 1
        raise OSError("disk on fire")

    clock = FakeClock()
    batcher = AsyncBatcher(2, 60.0, broken, retry=RetryPolicy(attempts=3, initial_delay=1.0), clock=clock)
    first = await batcher.enqueue(LINES[0])
    await batcher.enqueue(LINES[1])
    await drive(clock, first)
    with pytest.raises(DeliveryError, match="disk on fire"):
        first.result()
    assert calls == 3
    assert batcher.stats.acks_failed == 2
    assert batcher.stats.acks_delivered == 0
    with pytest.raises(DeliveryError, match="disk on fire"):
        await batcher.stop()
    await batcher.stop()  # the second stop is safe


async def test_non_retryable_storage_error_is_not_retried(tmp_path: Path) -> None:
    flaky = FlakyStorage(LocalStorage(tmp_path), failures=1, retryable=False)
    batcher = AsyncBatcher(1, 60.0, flaky, retry=RetryPolicy(attempts=5), clock=FakeClock())
    future = await batcher.enqueue(LINES[0])
    with pytest.raises(DeliveryError):
        await wait_real(future)
    assert flaky.calls == 1
    with pytest.raises(DeliveryError):
        await batcher.stop()


async def test_sink_failing_twice_then_succeeding_loses_nothing(tmp_path: Path) -> None:
    clock = FakeClock()
    flaky = FlakyStorage(LocalStorage(tmp_path), failures=2)
    retries: list[tuple[int, float]] = []
    batcher = AsyncBatcher(
        100,
        60.0,
        flaky,
        max_in_flight=1,  # so the first batch is the one that meets both failures
        retry=RetryPolicy(attempts=3, initial_delay=5.0, max_delay=60.0),
        clock=clock,
        on_retry=lambda attempt, exc, delay: retries.append((attempt, delay)),
    )
    everything = await batcher.enqueue_many(LINES[:250])
    await drive(clock, everything, step=5.0)
    receipts = everything.result()
    await batcher.stop()
    assert flaky.calls == 2 + 3  # two failures, then the three batches
    assert [a for a, _ in retries] == [1, 2]
    assert all(0 <= d <= 10.0 for _, d in retries)
    assert batcher.stats.retries == 2
    assert receipts[0].attempts == 3
    stored = [json.loads(decompress("zstd", data)) for _, data in sorted(_files(tmp_path).items())]
    assert [json.dumps(x, separators=(",", ":")).encode() for batch in stored for x in batch] == LINES[:250]


class FlakyListing(FlakyStorage):
    """Writes work; listing (which naming does on the first batch of an hour) fails at first."""

    def __init__(self, inner: LocalStorage, list_failures: int) -> None:
        super().__init__(inner, failures=0)
        self.list_failures = list_failures
        self.list_calls = 0

    async def list(self, prefix: str = "") -> list[str]:
        self.list_calls += 1
        if self.list_calls <= self.list_failures:
            raise StorageError(f"injected listing failure {self.list_calls}")
        return await self.inner.list(prefix)


async def test_an_outage_while_naming_the_first_batch_of_an_hour_is_retried(tmp_path: Path) -> None:
    clock = FakeClock()
    storage = FlakyListing(LocalStorage(tmp_path), list_failures=2)
    batcher = AsyncBatcher(5, 60.0, storage, retry=RetryPolicy(attempts=3, initial_delay=1.0), clock=clock)
    delivered = await batcher.enqueue_many(LINES[:5])
    await drive(clock, delivered)
    (receipt,) = delivered.result()
    await batcher.stop()
    assert storage.list_calls == 3
    assert batcher.stats.retries == 2
    assert receipt.key is not None
    assert receipt.key.endswith("/ack_batch_000000.json.zst")
    assert (tmp_path / receipt.key).is_file()


class GatedListing(FlakyStorage):
    """Listing an hour's folder waits until the test opens the gate; counts the listings."""

    def __init__(self, inner: LocalStorage) -> None:
        super().__init__(inner, failures=0)
        self.gate = asyncio.Event()
        self.listed: list[str] = []

    async def list(self, prefix: str = "") -> list[str]:
        self.listed.append(prefix)
        await self.gate.wait()
        return await self.inner.list(prefix)


async def test_keys_follow_batch_order_while_a_new_hour_is_listed_slowly(tmp_path: Path) -> None:
    """Only the first batch of an hour lists its folder; the batches sealed while it waits
    are named after it, so seqs follow batch order within each hour."""
    clock = FakeClock()  # 12:30
    storage = GatedListing(LocalStorage(tmp_path))
    batcher = AsyncBatcher(5, 3600.0, storage, max_in_flight=8, max_pending=1000, clock=clock)
    storage.gate.set()
    first_hour = await batcher.enqueue_many(LINES[:15])
    await wait_real(first_hour)
    clock.advance(1800.0)  # 13:00: the next batch lists a new folder
    storage.gate.clear()
    second_hour = await batcher.enqueue_many(LINES[15:40])
    await settle()
    assert storage.listed == ["20250101/12/", "20250101/13/"]  # the new hour's listing waits...
    assert not second_hour.done()  # ...and every batch behind it waits too
    storage.gate.set()
    await wait_real(second_hour)
    await batcher.stop()
    receipts = [*first_hour.result(), *second_hour.result()]
    assert [r.index for r in receipts] == list(range(8))
    assert [r.key for r in receipts] == [f"20250101/12/ack_batch_{seq:06d}.json.zst" for seq in range(3)] + [
        f"20250101/13/ack_batch_{seq:06d}.json.zst" for seq in range(5)
    ]
    assert storage.listed == ["20250101/12/", "20250101/13/"]  # once per hour, not per batch


async def test_failures_spread_over_concurrent_batches_lose_nothing(tmp_path: Path) -> None:
    clock = FakeClock()
    flaky = FlakyStorage(LocalStorage(tmp_path), failures=2)
    batcher = AsyncBatcher(
        10, 60.0, flaky, max_in_flight=4, max_pending=1000, retry=RetryPolicy(attempts=3), clock=clock
    )
    everything = await batcher.enqueue_many(LINES[:100])
    await drive(clock, everything, step=1.0)
    await batcher.stop()
    assert batcher.stats.retries == 2
    assert batcher.stats.acks_delivered == 100
    stored = [json.loads(decompress("zstd", data)) for _, data in sorted(_files(tmp_path).items())]
    assert [json.dumps(x, separators=(",", ":")).encode() for batch in stored for x in batch] == LINES[:100]


async def test_callable_sink_retried_too() -> None:
    clock = FakeClock()
    sink = Collect()
    failures = 2

    async def flaky(batch: PackedBatch) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("try again")
        await sink(batch)

    batcher = AsyncBatcher(5, 60.0, flaky, retry=RetryPolicy(attempts=3, initial_delay=1.0), clock=clock)
    futures = [await batcher.enqueue(line) for line in LINES[:5]]
    await drive(clock, futures[0])
    await batcher.stop()
    assert sink.lines() == LINES[:5]


# -- lifecycle and API ------------------------------------------------------------


async def test_enqueue_after_stop_raises_and_stop_twice_is_safe() -> None:
    sink = Collect()
    batcher = AsyncBatcher(10, 1.0, sink, clock=FakeClock())
    await batcher.start()
    await batcher.enqueue(LINES[0])
    await batcher.stop()
    await batcher.stop()
    assert sink.counts == [1]
    with pytest.raises(PohBatcherError, match="stopped"):
        await batcher.enqueue(LINES[1])
    with pytest.raises(PohBatcherError, match="stopped"):
        await batcher.enqueue_many([LINES[1]])
    assert sink.counts == [1]


async def test_concurrent_stops() -> None:
    sink = Collect()
    batcher = AsyncBatcher(10, 1.0, sink, clock=FakeClock())
    await batcher.enqueue(LINES[0])
    await asyncio.gather(batcher.stop(), batcher.stop())
    assert sink.counts == [1]


async def test_aliases_and_context_manager() -> None:
    assert Batcher is AsyncBatcher
    assert AsyncBatcher.submit is AsyncBatcher.enqueue
    sink = Collect()
    async with Batcher(max_items=2, timeout=1.0, sink=sink, clock=FakeClock()) as batcher:
        assert isinstance(batcher, AsyncBatcher)
        future = await batcher.submit(LINES[0])
    assert future.done()
    assert future.result().count == 1
    assert sink.lines() == [LINES[0]]


async def test_accepts_models_mappings_and_strings() -> None:
    sink = Collect()
    item: Mapping[str, Any] = json.loads(LINES[1])
    async with AsyncBatcher(10, 1.0, sink, clock=FakeClock()) as batcher:
        await batcher.enqueue(AckItem.model_validate_json(LINES[0]))
        await batcher.enqueue(item)
        await batcher.enqueue(LINES[2].decode())
        await batcher.enqueue(bytearray(LINES[3]))
    assert sink.lines() == LINES[:4]


async def test_invalid_ack_rejected_and_nothing_added() -> None:
    sink = Collect()
    async with AsyncBatcher(10, 1.0, sink, clock=FakeClock()) as batcher:
        with pytest.raises(InvalidAckError, match="pubkey"):
            await batcher.enqueue({"id": "a", "timestamp": "2025-01-01T00:00:00Z", "signature": "s"})
        with pytest.raises(InvalidAckError):
            await batcher.enqueue(b"not json")
        with pytest.raises(InvalidAckError) as info:
            await batcher.enqueue_many([LINES[0], b"{}", LINES[1]])
        assert info.value.line == 2
        assert batcher.stats.acks_enqueued == 0
    assert sink.batches == []


def test_bad_settings() -> None:
    with pytest.raises(PohBatcherError):
        AsyncBatcher(0, 1.0, Collect())
    with pytest.raises(PohBatcherError):
        AsyncBatcher(1, 0, Collect())
    with pytest.raises(PohBatcherError):
        AsyncBatcher(1, 1.0, None)
    with pytest.raises(ValueError, match="unknown codec"):
        AsyncBatcher(1, 1.0, Collect(), codec="lz4")
    with pytest.raises(PohBatcherError):
        AsyncBatcher(1, 1.0, "ftp://nope")


# -- the storage sink --------------------------------------------------------------


async def test_storage_sink_keys_and_content(tmp_path: Path) -> None:
    clock = FakeClock()  # 2025-01-01 12:30 UTC
    async with AsyncBatcher(4, 60.0, LocalStorage(tmp_path), clock=clock) as batcher:
        await batcher.enqueue_many(LINES[:10])
    files = _files(tmp_path)
    assert list(files) == [
        "20250101/12/ack_batch_000000.json.zst",
        "20250101/12/ack_batch_000001.json.zst",
        "20250101/12/ack_batch_000002.json.zst",
    ]
    joined = b"".join(decompress("zstd", data)[1:-1] + b"," for data in files.values())
    assert joined == b",".join(LINES[:10]) + b","


async def test_storage_url_sink_gzip_and_writer(tmp_path: Path) -> None:
    async with AsyncBatcher(
        5, 60.0, f"file://{tmp_path}", codec="gzip", writer_id="w1", prefix="acks", clock=FakeClock()
    ) as batcher:
        await batcher.enqueue_many(LINES[:5])
    assert list(_files(tmp_path)) == ["acks/20250101/12/ack_batch_w1_000000.json.gz"]


async def test_restart_continues_seq_and_hour_is_taken_at_flush(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    clock = FakeClock()
    async with AsyncBatcher(2, 60.0, storage, clock=clock) as batcher:
        await batcher.enqueue_many(LINES[:4])
    async with AsyncBatcher(2, 60.0, storage, clock=clock) as batcher:
        await batcher.enqueue(LINES[4])
        clock.advance(3600)  # the hour changes while the batch is open
    assert list(_files(tmp_path)) == [
        "20250101/12/ack_batch_000000.json.zst",
        "20250101/12/ack_batch_000001.json.zst",
        "20250101/13/ack_batch_000000.json.zst",
    ]


async def test_key_taken_by_someone_else_takes_next_seq(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    batcher = AsyncBatcher(1, 60.0, storage, clock=FakeClock())
    await wait_real(await batcher.enqueue(LINES[0]))  # the namer has now scanned the folder
    intruder = tmp_path / "20250101/12/ack_batch_000001.json.zst"
    intruder.write_bytes(b"not ours")
    receipt = await wait_real(await batcher.enqueue(LINES[1]))
    await batcher.stop()
    assert receipt.key == "20250101/12/ack_batch_000002.json.zst"
    assert intruder.read_bytes() == b"not ours"
    assert decompress("zstd", (tmp_path / receipt.key).read_bytes()) == b"[" + LINES[1] + b"]"


# -- enqueue_many ---------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 999, 2500])
@pytest.mark.parametrize("max_bytes", [None, 3000])
async def test_enqueue_many_equals_per_item(count: int, max_bytes: int | None) -> None:
    lines = LINES[:count]
    fast, slow = Collect(), Collect()
    async with AsyncBatcher(100, 60.0, fast, max_bytes=max_bytes, clock=FakeClock()) as batcher:
        done = await batcher.enqueue_many(lines)
    async with AsyncBatcher(100, 60.0, slow, max_bytes=max_bytes, clock=FakeClock()) as batcher:
        for line in lines:
            await batcher.enqueue(line)
    assert done.done()
    assert sum(r.count for r in {id(r): r for r in done.result()}.values()) == count
    assert [b.header for b in fast.batches] == [b.header for b in slow.batches]
    assert [b.payload for b in fast.batches] == [b.payload for b in slow.batches]
    assert fast.lines() == lines


async def test_enqueue_many_minifies_like_enqueue() -> None:
    messy = [b' { "id":"a", "timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p","x":"a  b"} ']
    fast, slow = Collect(), Collect()
    async with AsyncBatcher(10, 60.0, fast, clock=FakeClock()) as batcher:
        await batcher.enqueue_many(messy * 3)
    async with AsyncBatcher(10, 60.0, slow, clock=FakeClock()) as batcher:
        for line in messy * 3:
            await batcher.enqueue(line)
    assert fast.batches == slow.batches
    assert _payload(fast.batches[0]).count(b'"a  b"') == 3
    assert b" {" not in _payload(fast.batches[0])


async def test_unencodable_ack_is_invalid_ack_error() -> None:
    lone_surrogate = "\ud800"
    async with AsyncBatcher(10, 1.0, Collect(), clock=FakeClock()) as batcher:
        for ack in (
            {"id": lone_surrogate, "timestamp": "2025-01-01T00:00:00Z", "signature": "s", "pubkey": "p"},
            '{"id":"' + lone_surrogate + '","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}',
            {"id": "a", "timestamp": "2025-01-01T00:00:00Z", "signature": "s", "pubkey": "p", "x": object()},
        ):
            with pytest.raises(InvalidAckError):
                await batcher.enqueue(ack)  # type: ignore[arg-type]
