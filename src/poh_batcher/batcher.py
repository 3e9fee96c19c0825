"""Accumulate ACKs into batches, pack them, and ship them in order.

The split follows aiokafka's producer: the accumulator (``enqueue``) only
builds batches and applies backpressure; the shipper (``_ship``) only packs,
names and stores them, several at a time, and resolves each batch's delivery
future strictly in batch order. Work is handed over per batch, never per ACK:
an ACK is a ``bytes`` line appended to a list, and the per-ACK cost is an
append and a counter.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgspec
from pydantic import BaseModel

from .clock import Clock, SystemClock
from .compression import check_level, compress, decompress, resolve_codec
from .errors import ConfigurationError, DeliveryError, InvalidAckError, KeyExistsError, PohBatcherError
from .naming import KeyNamer
from .parsing import LineValidator
from .retry import RetryPolicy, call_with_retry
from .storage import StorageBackend, storage_from_url
from .storage.local import LocalStorage
from .types import AckItem, BatchHeader, Codec, PackedBatch

Ack: TypeAlias = AckItem | Mapping[str, Any] | bytes | str
BatchSink: TypeAlias = Callable[[PackedBatch], Awaitable[Any]]
_MAX_KEY_CONFLICTS = 1000
_OFF_LOOP_THRESHOLD = 2000
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """A sealed batch about to be stored: which ACKs, under which key, packed how.

    ``first`` is the position of its first ACK in the order they were enqueued
    (counting from the batcher's ``first_index``), so that a write-ahead spool
    can rebuild the very same batch after a crash.
    """

    index: int
    first: int
    count: int
    key: str | None
    codec: Codec
    level: int


@dataclass(frozen=True, slots=True)
class BatchReceipt:
    """What happened to one delivered batch."""

    index: int
    first: int
    count: int
    raw_bytes: int
    stored_bytes: int
    codec: Codec
    key: str | None
    url: str | None
    attempts: int
    store_seconds: float = 0.0  # from packed to durable, retries included


@dataclass(slots=True)
class BatcherStats:
    """Running totals, for summaries and metrics."""

    acks_enqueued: int = 0
    acks_delivered: int = 0
    acks_failed: int = 0
    batches_delivered: int = 0
    batches_failed: int = 0
    batches_in_flight: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    retries: int = 0
    upload_attempts: int = 0


class _OpenBatch:
    __slots__ = (
        "after",
        "delivered",
        "first",
        "handed",
        "index",
        "lines",
        "opened_at",
        "plan_after",
        "planned",
        "raw_bytes",
        "settled",
    )

    def __init__(self, index: int, opened_at: float, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.first = 0  # set when sealed
        self.lines: list[bytes] = []
        self.raw_bytes = 2  # the brackets of the JSON array
        self.opened_at = opened_at
        self.delivered: asyncio.Future[BatchReceipt] = loop.create_future()
        # Consume an exception nobody awaited, so it is not logged as "never retrieved";
        # failures still reach stop() and every awaiting caller.
        self.delivered.add_done_callback(_swallow)
        self.settled: asyncio.Future[None] = loop.create_future()
        # Set once the batch has been handed to the sink; the next batch waits for it, so
        # the sink sees batches in order even when a later one is packed first.
        self.handed: asyncio.Future[None] = loop.create_future()
        self.after: asyncio.Future[None] | None = None
        # Set once the batch's plan has been handed to ``before_store``: plans are submitted
        # in batch order, so a journal that syncs them together keeps them in order.
        self.planned: asyncio.Future[None] = loop.create_future()
        self.plan_after: asyncio.Future[None] | None = None


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _swallow(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class AsyncBatcher:
    """Groups ACKs into compressed batches and stores them, in order, durably.

    ``sink`` is an async callable that receives each :class:`PackedBatch`, or a
    :class:`StorageBackend` or storage URL, in which case the batcher names and
    stores each batch itself. A batch is flushed when it holds ``max_items``
    ACKs, when the next ACK would take it past ``max_bytes`` (uncompressed),
    ``timeout`` seconds after its first ACK arrived, or on :meth:`stop`.
    """

    def __init__(
        self,
        max_items: int = 256,
        timeout: float = 0.5,
        sink: BatchSink | StorageBackend | str | None = None,
        *,
        max_bytes: int | None = None,
        codec: str = "auto",
        level: int = 3,
        max_pending: int | None = None,
        max_in_flight: int = 8,
        retry: RetryPolicy | None = None,
        prefix: str = "",
        writer_id: str | None = None,
        max_line_bytes: int | None = None,
        clock: Clock | None = None,
        first_index: int = 0,
        before_store: Callable[[BatchPlan], Awaitable[None]] | None = None,
        on_delivered: Callable[[BatchReceipt], None] | None = None,
        on_retry: Callable[[int, BaseException, float], None] | None = None,
    ) -> None:
        if sink is None:
            raise ConfigurationError("AsyncBatcher needs a sink: an async callable, a StorageBackend or a URL")
        if max_items < 1:
            raise ConfigurationError(f"max_items must be at least 1, got {max_items}")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be positive, got {timeout}")
        if max_bytes is not None and max_bytes < 3:
            raise ConfigurationError(f"max_bytes must be at least 3, got {max_bytes}")
        if max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.max_items = max_items
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.codec: Codec = resolve_codec(codec)
        check_level(self.codec, level)
        self.level = level
        self.max_pending = max(max_pending or max_items * (max_in_flight + 2), max_items)
        self.retry = retry or RetryPolicy()
        self.stats = BatcherStats()
        self._clock: Clock = clock or SystemClock()
        self._validator = LineValidator(max_line_bytes) if max_line_bytes else LineValidator()
        self._on_delivered = on_delivered
        self._before_store = before_store
        self._sealed_acks = first_index
        self._on_retry = on_retry
        self._storage: StorageBackend | None = None
        self._sink: BatchSink | None = None
        self._namer: KeyNamer | None = None
        if isinstance(sink, str):
            sink = storage_from_url(sink)
        # A stock LocalStorage is written from the packing thread (its blocking write_durably);
        # a subclass that overrides save_bytes (fault injection, metrics) goes through save_bytes.
        self._local: LocalStorage | None = None
        if isinstance(sink, LocalStorage) and type(sink).save_bytes is LocalStorage.save_bytes:
            self._local = sink
        if isinstance(sink, StorageBackend):
            self._storage = sink
            self._namer = KeyNamer(sink, self.codec, prefix=prefix, writer_id=writer_id)
        elif callable(sink):
            self._sink = sink
        else:
            raise ConfigurationError(f"sink must be an async callable, a StorageBackend or a URL, not {sink!r}")
        self._slots = asyncio.Semaphore(max_in_flight)
        self._naming = asyncio.Lock()
        self._room = asyncio.Event()
        self._current: _OpenBatch | None = None
        self._timer: asyncio.Task[None] | None = None
        self._last_settled: asyncio.Future[None] | None = None
        self._last_handed: asyncio.Future[None] | None = None
        self._last_planned: asyncio.Future[None] | None = None
        self._shipping: set[asyncio.Task[None]] = set()
        self._unsettled: list[_OpenBatch] = []  # sealed, not yet delivered or failed, in order
        self._failures: list[BaseException] = []
        self._pending = 0
        self._batches = 0
        self._state = "new"

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Ready the batcher; enqueuing also starts it."""
        if self._state == "new":
            self._state = "running"

    async def stop(self) -> None:
        """Flush, wait for every batch, and raise ``DeliveryError`` if any was not stored.

        To bound the wait (a shutdown timeout), call :meth:`abandon` while it runs.
        Safe to call twice: the second call returns at once.
        """
        if self._state == "stopped":
            return
        self._state = "stopping"
        self._seal()
        while self._shipping:
            await asyncio.wait(set(self._shipping))
            self._seal()  # ACKs of an enqueue() that was waiting for room when stop() began
        self._state = "stopped"
        if self._failures:
            first = self._failures[0]
            raise DeliveryError(
                f"{self.stats.batches_failed} batch(es) with {self.stats.acks_failed} ACK(s) "
                f"could not be stored: {first}"
            ) from first

    def abandon(self) -> None:
        """Give up on every batch still being stored (a shutdown timeout); their futures fail."""
        self._abandon(set(self._shipping))

    def _abandon(self, tasks: set[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        for batch in self._unsettled:
            count = len(batch.lines)
            self.stats.acks_failed += count
            self.stats.batches_failed += 1
            self.stats.batches_in_flight -= 1
            error = DeliveryError(f"batch {batch.index} ({count} ACKs) was not stored before the shutdown timeout")
            self._failures.append(error)
            batch.delivered.set_exception(error)
        self._unsettled.clear()

    def oldest_pending_age(self) -> float:
        """Seconds since the oldest ACK not yet stored was enqueued (0.0 if none); safe from any thread."""
        batches = [*self._unsettled[:1], self._current]  # sealed batches first: the oldest is first
        opened = [batch.opened_at for batch in batches if batch is not None and batch.lines]
        return max(0.0, self._clock.monotonic() - opened[0]) if opened else 0.0

    async def __aenter__(self) -> AsyncBatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- accumulating --------------------------------------------------------

    async def enqueue(self, ack: Ack) -> asyncio.Future[BatchReceipt]:
        """Add one ACK; wait while too many are pending (backpressure).

        Returns a future that resolves when the batch holding the ACK is durably
        stored, or fails with the reason it could not be.
        """
        line = self._line_of(ack)
        if self._state != "running":
            self._check_open()
        if self._pending >= self.max_pending:
            await self._wait_for_room()
        delivered = self._append(line)
        if self._timer is None:
            self._arm_timer()
        return delivered

    submit = enqueue

    async def enqueue_many(self, acks: Iterable[Ack]) -> asyncio.Future[list[BatchReceipt]]:
        """Add many ACKs at once (the fast path); validated before any is added.

        Returns a future that resolves when every one of them is stored.
        """
        items = list(acks)
        raw: list[bytes | bytearray] = [item for item in items if isinstance(item, (bytes, bytearray))]
        if items and len(raw) == len(items):
            if len(raw) > _OFF_LOOP_THRESHOLD:
                lines = await asyncio.to_thread(self._validate_lines, raw)
            else:
                lines = self._validate_lines(raw)
        else:
            lines = [self._line_of(item, index) for index, item in enumerate(items, 1)]
        return await self.enqueue_lines(lines)

    async def enqueue_lines(self, lines: list[bytes]) -> asyncio.Future[list[BatchReceipt]]:
        """Add ACK lines that are already validated and minified (no checks)."""
        self._check_open()
        futures: list[asyncio.Future[BatchReceipt]] = []
        start = 0
        while start < len(lines):
            if self._pending >= self.max_pending:
                self._arm_timer()  # the open batch is flushed on time even while this call waits
                await self._wait_for_room()
            if self._current is None:
                self._open()
            batch = self._current
            assert batch is not None
            room = min(self.max_items - len(batch.lines), self.max_pending - self._pending)
            if self.max_bytes is None:
                chunk = lines[start : start + room]
                commas = len(chunk) if batch.lines else len(chunk) - 1
                batch.lines.extend(chunk)
                batch.raw_bytes += sum(map(len, chunk)) + commas
                self._pending += len(chunk)
                self.stats.acks_enqueued += len(chunk)
                start += len(chunk)
                futures.append(batch.delivered)
                if len(batch.lines) >= self.max_items:
                    self._seal()
            else:
                for line in lines[start : start + room]:
                    future = self._append(line)
                    if not futures or futures[-1] is not future:
                        futures.append(future)
                    start += 1
        self._arm_timer()
        everything = asyncio.ensure_future(asyncio.gather(*futures))
        everything.add_done_callback(_swallow)  # like each batch's future: failures reach stop() anyway
        return everything

    def _append(self, line: bytes) -> asyncio.Future[BatchReceipt]:
        batch = self._current
        if batch is None:
            batch = self._open()
        elif self.max_bytes is not None and batch.raw_bytes + 1 + len(line) > self.max_bytes:
            self._seal()
            batch = self._open()
        if batch.lines:
            batch.raw_bytes += 1  # the comma
        batch.lines.append(line)
        batch.raw_bytes += len(line)
        self._pending += 1
        self.stats.acks_enqueued += 1
        delivered = batch.delivered
        if len(batch.lines) >= self.max_items or (
            self.max_bytes is not None and batch.raw_bytes >= self.max_bytes
        ):
            self._seal()
        return delivered

    def _open(self) -> _OpenBatch:
        loop = asyncio.get_running_loop()
        batch = _OpenBatch(self._batches, self._clock.monotonic(), loop)
        self._batches += 1
        self._current = batch
        return batch

    def _arm_timer(self) -> None:
        """Start the open batch's flush timer, once it outlives an enqueue call.

        A bulk enqueue fills and seals most batches within the call that opened
        them: they never need a timer task (one per batch, created and cancelled).
        """
        batch = self._current
        if batch is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._flush_when_due(batch))

    async def _flush_when_due(self, batch: _OpenBatch) -> None:
        """Flush ``batch`` ``timeout`` seconds after its first ACK, if still open."""
        await self._clock.sleep(batch.opened_at + self.timeout - self._clock.monotonic())
        if self._current is batch:
            self._timer = None  # do not cancel ourselves in _seal
            self._seal()

    def _seal(self) -> None:
        batch = self._current
        if batch is None or not batch.lines:
            return
        self._current = None
        batch.first = self._sealed_acks
        self._sealed_acks += len(batch.lines)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        previous, self._last_settled = self._last_settled, batch.settled
        batch.after, self._last_handed = self._last_handed, batch.handed
        batch.plan_after, self._last_planned = self._last_planned, batch.planned
        self.stats.batches_in_flight += 1
        self._unsettled.append(batch)
        task = asyncio.get_running_loop().create_task(self._ship(batch, previous))
        self._shipping.add(task)
        task.add_done_callback(self._shipping.discard)

    def _check_open(self) -> None:
        if self._state in ("stopping", "stopped"):
            raise PohBatcherError("the batcher is stopped; no more ACKs can be enqueued")
        self._state = "running"

    async def _wait_for_room(self) -> None:
        while self._pending >= self.max_pending:
            self._room.clear()
            await self._room.wait()

    # -- shipping ------------------------------------------------------------

    async def _ship(self, batch: _OpenBatch, previous: asyncio.Future[None] | None) -> None:
        receipt: BatchReceipt | None = None
        error: BaseException | None = None
        try:
            receipt = await self._store(batch)
        except Exception as exc:
            error = exc
        finally:
            _set_once(batch.planned)
            _set_once(batch.handed)
        if previous is not None:
            await previous  # deliver in batch order, whatever finished first
        count = len(batch.lines)
        self._unsettled.remove(batch)
        self._pending -= count
        self.stats.batches_in_flight -= 1
        self._room.set()
        if receipt is not None:
            self.stats.acks_delivered += count
            self.stats.batches_delivered += 1
            self.stats.raw_bytes += receipt.raw_bytes
            self.stats.stored_bytes += receipt.stored_bytes
            batch.delivered.set_result(receipt)
            if self._on_delivered is not None:
                self._on_delivered(receipt)
        else:
            assert error is not None
            self.stats.acks_failed += count
            self.stats.batches_failed += 1
            self._failures.append(error)
            batch.delivered.set_exception(
                DeliveryError(f"batch {batch.index} ({count} ACKs) was not stored: {error}")
            )
        batch.settled.set_result(None)

    def _count_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        self.stats.retries += 1
        if self._on_retry is not None:
            self._on_retry(attempt, exc, delay)

    async def _next_key(self) -> str:
        """The next key, in batch order. The first batch of an hour lists its folder:
        a failing listing (an outage) is retried like a failing store."""
        namer = self._namer
        assert namer is not None
        async with self._naming:

            async def name() -> str:
                key, _ = await namer.next_key(self._clock.utcnow())
                return key

            return await call_with_retry(name, self.retry, self._clock, on_retry=self._count_retry)

    async def _store(self, batch: _OpenBatch) -> BatchReceipt:
        key = await self._next_key() if self._namer is not None else None
        attempts = 0

        async with self._slots:
            # Local disk: pack and write in one worker call (one thread hop per batch).
            local = self._local
            packed = None if local is not None else await asyncio.to_thread(self._pack, batch.lines)
            started = self._clock.monotonic()
            for conflicts in range(_MAX_KEY_CONFLICTS):
                if self._before_store is not None:
                    plan = BatchPlan(batch.index, batch.first, len(batch.lines), key, self.codec, self.level)
                    if conflicts == 0 and batch.plan_after is not None:
                        await batch.plan_after  # submit plans in batch order...
                    planning = asyncio.ensure_future(self._before_store(plan))
                    _set_once(batch.planned)
                    await planning  # ...and let the plans of batches in flight become durable together
                if batch.after is not None:
                    await batch.after  # the previous batch reaches the sink first

                async def attempt(key: str | None = key) -> None:
                    nonlocal attempts, packed
                    attempts += 1
                    self.stats.upload_attempts += 1
                    _set_once(batch.handed)
                    if local is not None:
                        assert key is not None
                        packed = await asyncio.to_thread(self._pack_and_write, local, batch.lines, packed, key)
                    else:
                        assert packed is not None
                        await self._deliver(packed, key)

                try:
                    await call_with_retry(attempt, self.retry, self._clock, on_retry=self._count_retry)
                    break
                except KeyExistsError:
                    key = await self._next_key()
            else:
                raise DeliveryError(f"gave up after {_MAX_KEY_CONFLICTS} taken keys")
        assert packed is not None
        return BatchReceipt(
            index=batch.index,
            first=batch.first,
            count=packed.header.count,
            raw_bytes=batch.raw_bytes,
            stored_bytes=len(packed.payload),
            codec=packed.header.compression,
            key=key,
            url=self._storage.get_url(key) if self._storage is not None and key is not None else None,
            attempts=attempts,
            store_seconds=self._clock.monotonic() - started,
        )

    def _pack(self, lines: list[bytes]) -> PackedBatch:
        return pack_lines(lines, codec=self.codec, level=self.level)

    def _pack_and_write(
        self, storage: LocalStorage, lines: list[bytes], packed: PackedBatch | None, key: str
    ) -> PackedBatch:
        """On a worker thread: pack (unless a failed attempt already did) and store durably."""
        if packed is None:
            packed = self._pack(lines)
        storage.write_durably(key, packed.payload)
        return packed

    async def _deliver(self, packed: PackedBatch, key: str | None) -> None:
        if self._sink is not None:
            result = self._sink(packed)
            if inspect.isawaitable(result):
                await result
            return
        assert self._storage is not None
        assert key is not None
        await store_batch(self._storage, key, packed)

    # -- converting ----------------------------------------------------------

    def _line_of(self, ack: Ack, index: int | None = None) -> bytes:
        return ack_to_line(ack, self._validator, index)

    def _validate_lines(self, items: Sequence[bytes | bytearray]) -> list[bytes]:
        block = self._validator.validate_block([bytes(item) for item in items])
        if block.rejects or block.blank:
            first = block.rejects[0] if block.rejects else None
            if first is None:
                raise InvalidAckError("blank line")
            raise InvalidAckError(first.reason, first.line)
        return block.acks


Batcher = AsyncBatcher
"""Backward-compatible name of :class:`AsyncBatcher`."""


async def store_batch(storage: StorageBackend, key: str, packed: PackedBatch) -> None:
    """Store a packed batch with the content type, encoding and metadata readers rely on."""
    codec = packed.header.compression
    await storage.save_bytes(
        key,
        packed.payload,
        content_type="application/json",
        content_encoding=None if codec == "none" else codec,
        metadata={"ack-count": str(packed.header.count), "codec": codec},
    )


def pack_lines(lines: list[bytes], *, codec: str = "auto", level: int = 3) -> PackedBatch:
    """Pack minified ACK lines as one compressed JSON array."""
    used, payload = compress(b"[" + b",".join(lines) + b"]", level=level, codec=codec)
    return PackedBatch(BatchHeader(count=len(lines), compression=used), payload)


def pack_acks(acks: Iterable[Ack], *, codec: str = "auto", level: int = 3) -> PackedBatch:
    """Pack ACKs as a minified UTF-8 JSON array, compressed."""
    validator = LineValidator()
    lines = [ack_to_line(ack, validator, index) for index, ack in enumerate(acks, 1)]
    return pack_lines(lines, codec=codec, level=level)


def ack_to_line(ack: Ack, validator: LineValidator, index: int | None = None) -> bytes:
    """The minified JSON line of a validated ACK given as a model, a mapping or a line."""
    try:
        if type(ack) is bytes:  # the common case first: a line as read
            return validator.validate_line(ack)
        if isinstance(ack, BaseModel):
            return ack.model_dump_json().encode()
        if isinstance(ack, str):
            return validator.validate_line(ack.encode())
        if isinstance(ack, (bytes, bytearray)):
            return validator.validate_line(bytes(ack))
        if isinstance(ack, Mapping):
            return validator.validate_line(_encoder.encode(ack))
    except InvalidAckError as exc:
        raise InvalidAckError(exc.reason, index) from None
    except (TypeError, msgspec.EncodeError, UnicodeEncodeError) as exc:  # e.g. a lone surrogate
        raise InvalidAckError(f"cannot encode ACK as JSON: {exc}", index) from None
    raise InvalidAckError(f"an ACK must be an AckItem, a mapping or a JSON line, not {type(ack).__name__}", index)


def unpack_batch(batch: PackedBatch) -> list[AckItem]:
    """The ACKs of a packed batch, in order; the exact inverse of :func:`pack_acks`."""
    raw = decompress(batch.header.compression, batch.payload)
    items = msgspec.json.decode(raw)
    if not isinstance(items, list):
        raise InvalidAckError("a batch must be a JSON array")
    if len(items) != batch.header.count:
        raise InvalidAckError(f"batch header says {batch.header.count} ACKs, payload holds {len(items)}")
    return [AckItem.model_validate(item) for item in items]
