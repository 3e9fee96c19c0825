"""JSON Lines from a byte stream (stdin or a file), read and validated on a thread.

Reading and validating are CPU and blocking work, so they run on one daemon
thread that hands over whole validated chunks (about ``block_size`` bytes of
input each) through a small bounded queue: the event loop sees one hand-off
per thousands of lines, and when the batcher applies backpressure the queue
fills and the thread stops reading. The thread is a daemon so that a signal
can end the run even while it is blocked reading an idle pipe.
"""

from __future__ import annotations

import asyncio
import io
import os
import select
import stat
import threading
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

from ..parsing import LineValidator, Reject, ValidatedBlock
from .base import Chunk

HandOver = Callable[[Chunk | None], None]

DEFAULT_BLOCK_SIZE = 1 << 20
_QUEUE_DEPTH = 4
_END = None


class LineSource:
    """ACK lines from ``stream``; blank lines skipped, invalid ones rejected with a reason."""

    def __init__(
        self,
        stream: BinaryIO,
        validator: LineValidator,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        start_offset: int = 0,
        first_line: int = 1,
        strict: bool = False,
    ) -> None:
        self._stream = stream
        self._validator = validator
        self._block_size = block_size
        self._offset = start_offset
        self._line = first_line
        self._strict = strict
        self._closed = threading.Event()
        self._error: BaseException | None = None

    async def chunks(self) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | None] = asyncio.Queue()
        slots = threading.Semaphore(_QUEUE_DEPTH)

        def hand_over(chunk: Chunk | None) -> None:
            slots.acquire()
            if not self._closed.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, chunk)

        thread = threading.Thread(target=self._run, args=(hand_over,), name="poh-reader", daemon=True)
        thread.start()
        try:
            while True:
                chunk = await queue.get()
                slots.release()
                if chunk is _END:
                    break
                yield chunk
        finally:
            self.close()
            slots.release()  # unblock a thread waiting for a slot so that it sees close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._closed.set()

    # -- the reader thread ---------------------------------------------------

    def _run(self, hand_over: HandOver) -> None:
        try:
            self._read_all(hand_over)
        except BaseException as exc:  # reported on the loop side, after END
            self._error = exc
        hand_over(_END)

    def _read_all(self, hand_over: HandOver) -> None:
        limit = self._validator.max_line_bytes
        read = getattr(self._stream, "read1", self._stream.read)
        ready = _ready_probe(self._stream)
        carry = b""
        overlong = 0  # bytes of an over-long line discarded so far, up to its newline
        while not self._closed.is_set():
            # read1 returns what is available: a slow producer's lines are not held
            # back waiting for a full block (the batch timeout must still hold).
            data = read(self._block_size)
            if not data:
                break
            if ready is not None and len(data) < self._block_size:
                data = self._fill(read, data, ready)
            if overlong:
                newline = data.find(b"\n")
                if newline < 0:
                    overlong += len(data)
                    continue
                if not self._emit_overlong(hand_over, carry, overlong + newline + 1):
                    return
                carry, overlong, data = b"", 0, data[newline + 1 :]
            block = carry + data
            lines = block.split(b"\n")
            carry = lines.pop()
            if lines and not self._emit_lines(hand_over, lines, len(block) - len(carry), block):
                return
            if len(carry) > limit:
                carry, overlong = carry[:limit], len(carry)
        if overlong:
            self._emit_overlong(hand_over, carry, overlong)
        elif carry:
            self._emit_lines(hand_over, [carry], len(carry))  # a last line without a newline counts too

    def _fill(self, read: Callable[[int], bytes], data: bytes, ready: Callable[[], bool]) -> bytes:
        """Add what can be read at once, up to a block: a pipe gives at most 64 KiB a read.

        A fast producer's input is then validated and handed over in blocks of
        ``block_size`` (one hand-off per ~4,000 lines instead of ~260), while a slow
        one's lines are never held back waiting for more.
        """
        parts = [data]
        size = len(data)
        while size < self._block_size and ready():
            more = read(self._block_size - size)
            if not more:
                break  # end of input: the next read says so again
            parts.append(more)
            size += len(more)
        return b"".join(parts) if len(parts) > 1 else data

    def _emit_lines(self, hand_over: HandOver, lines: list[bytes], consumed: int, source: bytes | None = None) -> bool:
        """Validate and hand over ``lines`` (split from ``source``, if given); False when strict mode must stop."""
        first = self._line
        block = self._validator.validate_block(lines, first, source=source)
        if self._strict and block.rejects:
            bad = block.rejects[0]
            head = lines[: bad.line - first]
            # Keep the head's results rather than validating it again: the extra checks
            # must see each ACK once (a second pass would find every id already --dedupe'd).
            blank = sum(1 for line in head if not line.strip())
            block = ValidatedBlock(acks=block.acks[: len(head) - blank], rejects=[bad], blank=blank)
            lines = lines[: len(head) + 1]
            consumed = sum(map(len, lines)) + len(lines)
        joined = None
        if source is not None and block.acks is lines:  # every line an ACK, kept as read
            joined = memoryview(source)[: consumed - 1]
        self._line += len(lines)
        self._offset += consumed
        hand_over(Chunk(block.acks, block.rejects, block.blank, len(lines), self._offset, joined=joined))
        return not (self._strict and block.rejects)

    def _emit_overlong(self, hand_over: HandOver, head: bytes, size: int) -> bool:
        """Reject a line longer than the limit, keeping only its first ``limit`` bytes."""
        limit = self._validator.max_line_bytes
        reason = f"line is over {limit} bytes, the limit (--max-line-bytes); first {len(head)} bytes kept"
        self._offset += size
        hand_over(Chunk([], [Reject(self._line, reason, head)], 0, 1, self._offset))
        self._line += 1
        return not self._strict


def _ready_probe(stream: BinaryIO) -> Callable[[], bool] | None:
    """For a pipe, socket or terminal: whether more input can be read without waiting.

    None for regular files (``read1`` already returns a whole block) and for
    streams without a file descriptor.
    """
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        return None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return lambda: bool(poller.poll(0))
