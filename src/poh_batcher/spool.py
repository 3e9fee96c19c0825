"""The write-ahead spool: no accepted ACK is lost to a crash, a kill or an outage.

An ACK is *accepted* once its line is written to the journal (the OS holds it:
a killed process loses nothing). Before a batch is uploaded, a record of which
ACKs it holds and the key chosen for it is written and fsync'd; after a crash
the same batch is rebuilt byte for byte (compression is deterministic) and sent
to the same key, where an identical object already there counts as delivered.
So a replay neither loses nor duplicates a batch. A journal segment is deleted
once every ACK in it is in a durably stored object.

Layout of ``DIR``::

    LOCK                        flock'd by the running process
    spool.json                  destination, writer id, last input and where it stopped
    seg-<first ACK index>.wal   records, appended; the newest is the active one

A record is ``type (1 byte) | length (4) | crc32 (4) | payload``; the CRC covers
type and payload, so a torn last record (a crash mid-write) is recognised and
dropped: it was never acknowledged as accepted, since acceptance is the end of
the write. A bad record anywhere else is corruption and stops recovery.

All file I/O runs on one writer thread; callers on the event loop get futures.
Records queued while an fsync runs are written and synced together (group
commit), so the per-batch fsync costs far less than one fsync per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigurationError, PohBatcherError
from .storage.durable import fsync_dir, write_fully

_HEADER = struct.Struct("<BII")
_ACKS_HEADER = struct.Struct("<qq")  # input end offset (-1: none), next input line number
_ACKS, _BATCH, _DELIVERED = b"A", b"B", b"D"
DEFAULT_SEGMENT_BYTES = 64 << 20
DIR_MODE = 0o700
FILE_MODE = 0o600


def default_spool_dir(destination: str, writer_id: str | None) -> Path:
    """``$XDG_STATE_HOME/poh-batcher/spool/<hash>``: one spool per destination and writer id."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    digest = hashlib.sha256(f"{destination}\n{writer_id or ''}".encode()).hexdigest()[:16]
    return Path(state) / "poh-batcher" / "spool" / digest


class SpoolError(PohBatcherError):
    """The spool cannot be used: locked by another process, corrupt, or unwritable."""


class SpoolFullError(SpoolError):
    """A record could not be written for lack of space; nothing of it was kept, so it may be retried."""


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """A batch whose key was chosen before the crash: rebuild it and store it there."""

    first: int
    lines: list[bytes]
    key: str
    codec: str
    level: int


@dataclass(slots=True)
class Recovered:
    """What the spool held when it was opened."""

    batches: list[SpooledBatch] = field(default_factory=list)
    unbatched: list[bytes] = field(default_factory=list)
    unbatched_first: int = 0
    next_index: int = 0
    input_name: str | None = None
    input_offset: int = 0
    input_line: int = 1
    torn_records: int = 0

    @property
    def acks(self) -> int:
        """ACKs accepted before and not yet known to be stored."""
        return sum(len(batch.lines) for batch in self.batches) + len(self.unbatched)


@dataclass(slots=True)
class _Segment:
    path: Path
    first: int
    end: int  # one past the index of its last ACK


@dataclass(slots=True)
class _Write:
    record: bytes
    sync: bool
    done: Callable[[BaseException | None], None]
    acks: int = 0


class Spool:
    """A write-ahead journal of accepted ACKs and planned batches.

    ``fsync_interval`` 0 (the default) makes every batch record durable before
    its upload starts, along with every ACK before it; a positive value syncs at
    most that often, trading what a power cut can lose for fewer fsyncs. A
    killed process loses nothing either way.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        destination: str,
        writer_id: str | None = None,
        fsync_interval: float = 0.0,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        self.directory = Path(directory)
        self._destination = destination
        self._writer_id = writer_id
        self._fsync_interval = fsync_interval
        self._segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._size = 0
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._delivered_to = 0
        self._done: dict[int, int] = {}  # delivered batches not yet contiguous with _delivered_to
        # Delivery notes that did not fit on a full disk: written before anything else next time.
        # Dropping one would keep its segment forever, and on a full disk that space is what
        # the next append needs (the run would never resume).
        self._unwritten_notes: list[_Write] = []
        self._meta: dict[str, Any] = {}
        self._error: BaseException | None = None
        self._last_input = (0, 1)
        self._input_name: str | None = None
        self.bytes_on_disk = 0

    # -- opening and recovery -------------------------------------------------

    def open(self, input_name: str | None) -> Recovered:
        """Lock the spool, read what it holds, and start the writer thread."""
        try:
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(self.directory, DIR_MODE)
            self._lock()
            self._meta = self._read_meta()
            self._input_name = input_name
            recovered = self._recover(input_name)
            self._save_meta()
            self._open_active(recovered.next_index)
        except BaseException as exc:
            self._release()  # a spool that failed to open must not stay locked
            if isinstance(exc, OSError):
                raise SpoolError(f"cannot use spool {self.directory}: {exc.strerror or exc}") from exc
            raise
        self._thread = threading.Thread(target=self._run, name="poh-spool", daemon=True)
        self._thread.start()
        return recovered

    def _release(self) -> None:
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)

    def _lock(self) -> None:
        fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"spool {self.directory} is in use by another poh-batcher process; "
                "give each process its own --spool-dir (or --writer-id)"
            ) from None
        self._lock_fd = fd

    def _read_meta(self) -> dict[str, Any]:
        path = self.directory / "spool.json"
        if not path.exists():
            return {}
        meta: dict[str, Any] = json.loads(path.read_text("utf-8"))
        owner = meta.get("destination")
        if owner is not None and (owner, meta.get("writer_id")) != (self._destination, self._writer_id):
            if any(self.directory.glob("seg-*.wal")):
                raise ConfigurationError(
                    f"spool {self.directory} holds ACKs for {owner} (writer id {meta.get('writer_id')}); "
                    f"run with that destination to deliver them first, or use another --spool-dir"
                )
            return {}
        return meta

    def _save_meta(self) -> None:
        """Persist the destination and how far the input was accepted."""
        offset, line = self._last_input
        self._meta.update(destination=self._destination, writer_id=self._writer_id)
        self._meta["input"] = {"name": self._input_name, "offset": offset, "line": line}
        path = self.directory / "spool.json"
        temp = path.with_suffix(".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self._meta, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)

    def _recover(self, input_name: str | None) -> Recovered:
        recovered = Recovered()
        acks: list[bytes] = []
        plans: dict[int, tuple[int, str, str, int]] = {}
        done_ranges: dict[int, int] = {}
        last_input: tuple[int, int] | None = None
        paths = sorted(self.directory.glob("seg-*.wal"), key=lambda p: int(p.stem[4:]))
        base = int(paths[0].stem[4:]) if paths else 0
        for position, path in enumerate(paths):
            start = int(path.stem[4:])
            if start != base + len(acks):
                raise SpoolError(f"spool segment {path} starts at ACK {start}, expected {base + len(acks)}")
            records, torn = _read_records(path, last=position == len(paths) - 1)
            recovered.torn_records += torn
            for kind, payload in records:
                if kind == _ACKS:
                    offset, line = _ACKS_HEADER.unpack_from(payload)
                    body = payload[_ACKS_HEADER.size :]
                    if body:
                        acks.extend(body.split(b"\n"))
                    if offset >= 0:
                        last_input = (offset, line)
                elif kind == _BATCH:
                    plan = json.loads(payload)
                    plans[plan["first"]] = (plan["count"], plan["key"], plan["codec"], plan["level"])
                elif kind == _DELIVERED:
                    done = json.loads(payload)
                    end = done["first"] + done["count"]
                    done_ranges[done["first"]] = max(done_ranges.get(done["first"], 0), end)
            self._segments.append(_Segment(path, start, base + len(acks)))
        recovered.next_index = base + len(acks)
        # Everything before the oldest segment was delivered; after it, only what the
        # delivery notes cover without a gap (a failed batch stays, even if later ones made it).
        self._delivered_to, self._done = base, done_ranges
        self._advance_delivered()
        cursor = self._delivered_to
        while cursor in plans and cursor + plans[cursor][0] <= recovered.next_index:
            count, key, codec, level = plans[cursor]
            lines = acks[cursor - base : cursor + count - base]
            recovered.batches.append(SpooledBatch(cursor, lines, key, codec, level))
            cursor += count
        recovered.unbatched_first = cursor
        recovered.unbatched = acks[cursor - base :]
        saved = self._meta.get("input") or {}
        if last_input is None and saved.get("name") is not None:
            last_input = (saved.get("offset", 0), saved.get("line", 1))
        same_input = input_name is not None and saved.get("name") == input_name
        if same_input and last_input is not None:
            recovered.input_offset, recovered.input_line = last_input
        recovered.input_name = input_name
        self._last_input = (recovered.input_offset, recovered.input_line)
        return recovered

    def _open_active(self, next_index: int) -> None:
        path = self.directory / f"seg-{next_index:016d}.wal"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        size = os.fstat(fd).st_size
        try:
            if size == 0 and self._input_name is not None:
                # Carry the input position into the new segment: older ones may be deleted.
                offset, line = self._last_input
                write_fully(fd, _record(_ACKS, _ACKS_HEADER.pack(offset, line)))
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            if size == 0:  # a half-made new segment would break the chain of segments: remove it
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        self._fd = fd
        self._size = os.fstat(fd).st_size
        if not self._segments or self._segments[-1].path != path:
            self._segments.append(_Segment(path, next_index, next_index))

    # -- writing (event loop side) -------------------------------------------

    async def append(
        self,
        lines: list[bytes],
        *,
        input_offset: int | None,
        next_line: int,
        joined: bytes | memoryview | None = None,
    ) -> None:
        """Journal accepted ACK lines; when this returns they are accepted.

        ``joined`` is ``lines`` joined by newlines, if the caller has it (the input block
        they were split from): a megabyte of lines is then copied once, not joined
        and copied three times, on the event loop.
        """
        header = _ACKS_HEADER.pack(-1 if input_offset is None else input_offset, next_line)
        body = b"\n".join(lines) if joined is None else joined
        # The same bytes as _record(_ACKS, header + body), built with a single copy.
        crc = zlib.crc32(body, zlib.crc32(header, zlib.crc32(_ACKS)))
        record = b"".join((_HEADER.pack(_ACKS[0], len(header) + len(body), crc), header, body))
        await self._submit(record, sync=False, acks=len(lines))

    async def record_batch(self, first: int, count: int, key: str, codec: str, level: int) -> None:
        """Make the plan of a batch (and every ACK before it) durable before its upload."""
        payload = json.dumps({"first": first, "count": count, "key": key, "codec": codec, "level": level})
        await self._submit(_record(_BATCH, payload.encode()), sync=self._fsync_interval == 0)

    def record_delivered(self, first: int, count: int, key: str | None) -> None:
        """Note that a batch is stored; segments wholly stored are then deleted."""
        payload = json.dumps({"first": first, "count": count, "key": key}).encode()
        self._queue.put(_Write(_record(_DELIVERED, payload), sync=False, done=_ignore))

    async def _submit(self, record: bytes, *, sync: bool, acks: int = 0) -> None:
        if self._error is not None:
            raise SpoolError(f"spool {self.directory} failed: {self._error}") from self._error
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, error)

        self._queue.put(_Write(record, sync, done, acks))
        await future

    async def close(self) -> None:
        """Flush and stop the writer thread; the spool keeps whatever is not delivered."""
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        try:
            if self._fd is not None:
                os.fsync(self._fd)
            self._save_meta()  # the input position survives the deletion of the last segment
        except OSError as exc:
            self._release()
            raise SpoolError(
                f"cannot close spool {self.directory}: {exc.strerror or exc}; the ACKs it holds are kept"
            ) from exc
        if self._error is None:
            self._remove_delivered_segments(include_active=True)
        self._release()

    # -- the writer thread ----------------------------------------------------

    def _run(self) -> None:
        last_sync = time.monotonic()
        stop = False
        while not stop:
            timeout = self._fsync_interval if self._fsync_interval > 0 else None
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                first = None
                with contextlib.suppress(SpoolError):  # recorded in self._error; later submits fail
                    self._sync_now()
                last_sync = time.monotonic()
                continue
            batch: list[_Write] = []
            item: _Write | None = first
            while True:
                if item is None:
                    stop = True
                else:
                    batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                written, error = self._write_all(batch)
                due = self._fsync_interval > 0 and time.monotonic() - last_sync >= self._fsync_interval
                if written and (any(write.sync for write in batch[:written]) or due or stop):
                    self._sync_now()
                    last_sync = time.monotonic()
            except SpoolError as exc:  # an fsync failed: nothing since the last one is known durable
                written, error = 0, exc
            # Writes before a failed one are in the journal: they must not be reported as failed,
            # or a retry would journal (and deliver) their ACKs twice.
            for position, write in enumerate(batch):
                write.done(error if position >= written else None)

    def _write_all(self, writes: list[_Write]) -> tuple[int, SpoolError | None]:
        """Append ``writes`` in order: how many were written, and why the next one was not."""
        assert self._fd is not None
        notes, self._unwritten_notes = self._unwritten_notes, []
        for note in notes:
            self._append_note(note)
        for position, write in enumerate(writes):
            if write.record[:1] == _DELIVERED:
                self._append_note(write)
                continue
            before = self._size
            try:
                write_fully(self._fd, write.record)
            except OSError as exc:
                # Leave no torn record behind a later good one (a full disk may recover).
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, before)
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                for later in writes[position + 1 :]:
                    if later.record[:1] == _DELIVERED:  # not failed with it: may be what frees space below
                        self._append_note(later)
                if full and self._segments[-1].end <= self._delivered_to:
                    # The active segment holds only delivered ACKs: start a new one so that it can
                    # be deleted, or the space it takes is never given back while the disk is full.
                    with contextlib.suppress(SpoolError):
                        self._rotate()
                kind = SpoolFullError if full else SpoolError
                return position, kind(f"cannot write to spool {self.directory}: {exc.strerror or exc}")
            self._size += len(write.record)
            self.bytes_on_disk += len(write.record)
            self._segments[-1].end += write.acks
            if write.record[:1] == _ACKS:
                offset, line = _ACKS_HEADER.unpack_from(write.record, _HEADER.size)
                if offset >= 0:
                    self._last_input = (offset, line)
        if any(segment.end <= self._delivered_to for segment in self._segments[:-1]):
            # The delivery notes must be durable before the ACKs they cover are deleted.
            self._sync_now()
            self._remove_delivered_segments(include_active=False)
        if self._size >= self._segment_bytes:
            self._rotate()
        return len(writes), None

    def _append_note(self, note: _Write) -> None:
        """Append a delivery note, or keep it for the next write if it does not fit."""
        assert self._fd is not None
        before = self._size
        try:
            write_fully(self._fd, note.record)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, before)
            self._unwritten_notes.append(note)
            return
        self._size += len(note.record)
        self.bytes_on_disk += len(note.record)
        self._note_delivered(note.record)

    def _note_delivered(self, record: bytes) -> None:
        done = json.loads(record[_HEADER.size :])
        end = done["first"] + done["count"]
        self._done[done["first"]] = max(self._done.get(done["first"], 0), end)
        self._advance_delivered()

    def _advance_delivered(self) -> None:
        """Move ``_delivered_to`` over every delivered batch that follows it without a gap."""
        while self._done:
            first = min(self._done)
            if first > self._delivered_to:
                break
            self._delivered_to = max(self._delivered_to, self._done.pop(first))

    def _remove_delivered_segments(self, *, include_active: bool) -> None:
        keep: list[_Segment] = []
        for position, segment in enumerate(self._segments):
            active = position == len(self._segments) - 1
            if segment.end <= self._delivered_to and (include_active or not active):
                with contextlib.suppress(FileNotFoundError):
                    self.bytes_on_disk -= segment.path.stat().st_size
                    segment.path.unlink()
            else:
                keep.append(segment)
        self._segments = keep

    def _rotate(self) -> None:
        old = self._fd
        assert old is not None
        self._sync_now()
        try:
            self._open_active(self._segments[-1].end)
        except OSError:
            self._fd = old  # no room for a new segment: keep appending to this one, rotate later
            return
        os.close(old)
        self._remove_delivered_segments(include_active=False)

    def _sync_now(self) -> None:
        """fsync the active segment; a failure makes the spool unusable (``SpoolError``)."""
        if self._fd is None:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the dirty pages: trust nothing more.
            self._error = SpoolError(f"cannot sync spool {self.directory}: {exc.strerror or exc}")
            raise self._error from exc



def _record(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind[0], len(payload), zlib.crc32(payload, zlib.crc32(kind))) + payload


def _read_records(path: Path, *, last: bool) -> tuple[list[tuple[bytes, bytes]], int]:
    """The records of a segment; a bad tail of the last segment is a torn write, dropped."""
    data = path.read_bytes()
    records: list[tuple[bytes, bytes]] = []
    position = 0
    while position < len(data):
        if position + _HEADER.size > len(data):
            break
        kind_code, length, crc = _HEADER.unpack_from(data, position)
        kind = bytes([kind_code])
        payload = data[position + _HEADER.size : position + _HEADER.size + length]
        if len(payload) != length or zlib.crc32(payload, zlib.crc32(kind)) != crc or kind not in (
            _ACKS,
            _BATCH,
            _DELIVERED,
        ):
            break
        records.append((kind, payload))
        position += _HEADER.size + length
    if position == len(data):
        return records, 0
    if not last:
        raise SpoolError(f"spool segment {path} is corrupt at byte {position}; it is not the last one")
    with open(path, "r+b") as handle:  # drop the torn tail so that appends follow a good record
        handle.truncate(position)
        os.fsync(handle.fileno())
    return records, 1


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _ignore(error: BaseException | None) -> None:
    """Delivery notes need no answer; a failed one only delays segment deletion."""
