"""The write-ahead spool (spool.py): records, torn writes, corruption, locking, modes, deletion, offsets."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import zstandard

from poh_batcher import spool as spool_module
from poh_batcher.errors import ConfigurationError, StorageError
from poh_batcher.parsing import LineValidator
from poh_batcher.pipeline import ArchiveSettings, run_archive
from poh_batcher.retry import RetryPolicy
from poh_batcher.sources.lines import LineSource
from poh_batcher.spool import DIR_MODE, FILE_MODE, Spool, SpoolError, SpoolFullError, default_spool_dir
from poh_batcher.storage.local import LocalStorage

DEST = "file:///archive"
INPUT = "/data/acks.jsonl"


def ack(i: int) -> bytes:
    return b'{"id":"a%d","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}' % i


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.wal"), key=lambda p: int(p.stem[4:]))


async def fill(spool: Spool, count: int, *, start: int = 0, per_chunk: int = 10) -> None:
    """Append ``count`` ACKs in chunks, with an input offset of 100 bytes per ACK."""
    for first in range(start, start + count, per_chunk):
        lines = [ack(i) for i in range(first, min(first + per_chunk, start + count))]
        end = first + len(lines)
        await spool.append(lines, input_offset=end * 100, next_line=end + 1)


async def journal(
    folder: Path, count: int, input_name: str | None = INPUT, *, per_chunk: int = 10, **options: Any
) -> None:
    """Leave a spool in ``folder`` holding ``count`` journaled ACKs, none of them batched."""
    spool = Spool(folder, destination=DEST, **options)
    spool.open(input_name)
    await fill(spool, count, per_chunk=per_chunk)
    await spool.close()


async def test_round_trip_acks_plans_and_deliveries(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", destination=DEST)
    recovered = spool.open(INPUT)
    assert (recovered.acks, recovered.next_index, recovered.input_offset) == (0, 0, 0)
    await fill(spool, 30)
    await spool.record_batch(0, 10, "20250101/00/ack_batch_000000.json.zst", "zstd", 3)
    spool.record_delivered(0, 10, "20250101/00/ack_batch_000000.json.zst")
    await spool.record_batch(10, 10, "20250101/00/ack_batch_000001.json.zst", "zstd", 3)
    await spool.append([], input_offset=3000, next_line=31)  # a chunk of rejects only: offset moves
    # Simulate a kill: no close(), the writer thread just stops with the process.
    spool2 = Spool(tmp_path / "s", destination=DEST)
    spool._queue.put(None)  # let the first writer thread finish its queue
    assert spool._thread is not None
    spool._thread.join()
    assert spool._lock_fd is not None
    os.close(spool._lock_fd)  # the kernel drops the flock of a killed process
    spool._lock_fd = None
    recovered = spool2.open(INPUT)
    assert [(b.first, b.key, b.codec, b.level) for b in recovered.batches] == [
        (10, "20250101/00/ack_batch_000001.json.zst", "zstd", 3)
    ]
    assert recovered.batches[0].lines == [ack(i) for i in range(10, 20)]
    assert recovered.unbatched_first == 20
    assert recovered.unbatched == [ack(i) for i in range(20, 30)]
    assert recovered.acks == 20
    assert recovered.next_index == 30
    assert (recovered.input_offset, recovered.input_line) == (3000, 31)
    assert recovered.torn_records == 0
    await spool2.close()


async def test_other_input_starts_at_zero(tmp_path: Path) -> None:
    await journal(tmp_path, 10)
    other = Spool(tmp_path, destination=DEST)
    recovered = other.open("/data/other.jsonl")
    assert (recovered.input_offset, recovered.input_line) == (0, 1)
    assert recovered.unbatched == [ack(i) for i in range(10)]  # the ACKs are still delivered
    await other.close()


async def test_torn_last_record_is_dropped(tmp_path: Path) -> None:
    await journal(tmp_path, 20)
    last = segments(tmp_path)[-1]
    size = last.stat().st_size
    os.truncate(last, size - 7)  # the last record (ACKs 10..19) is cut mid-payload
    reopened = Spool(tmp_path, destination=DEST)
    recovered = reopened.open(INPUT)
    assert recovered.torn_records == 1
    assert recovered.unbatched == [ack(i) for i in range(10)]
    assert (recovered.input_offset, recovered.input_line) == (1000, 11)  # the torn chunk is read again
    # Appends continue after the last good record, and survive another reopen.
    await fill(spool=reopened, count=10, start=10)
    await reopened.close()
    again = Spool(tmp_path, destination=DEST)
    recovered = again.open(INPUT)
    assert recovered.torn_records == 0
    assert recovered.unbatched == [ack(i) for i in range(20)]
    await again.close()


async def test_torn_header_is_dropped(tmp_path: Path) -> None:
    await journal(tmp_path, 10, None, per_chunk=5)
    last = segments(tmp_path)[-1]
    last.write_bytes(last.read_bytes() + b"A\x05")  # a crash after two bytes of a header
    recovered = Spool(tmp_path, destination=DEST).open(None)
    assert recovered.torn_records == 1
    assert len(recovered.unbatched) == 10


async def test_corruption_in_a_non_last_segment_is_an_error(tmp_path: Path) -> None:
    await journal(tmp_path, 60, per_chunk=5, segment_bytes=400)
    files = segments(tmp_path)
    assert len(files) >= 3
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0x40
    files[0].write_bytes(bytes(data))
    with pytest.raises(SpoolError, match="corrupt"):
        Spool(tmp_path, destination=DEST).open(INPUT)


async def test_missing_segment_is_an_error(tmp_path: Path) -> None:
    await journal(tmp_path, 60, per_chunk=5, segment_bytes=400)
    files = segments(tmp_path)
    files[1].unlink()
    with pytest.raises(SpoolError, match="expected"):
        Spool(tmp_path, destination=DEST).open(INPUT)


async def test_second_spool_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    first = Spool(tmp_path, destination=DEST)
    first.open(None)
    with pytest.raises(SpoolError, match="in use by another"):
        Spool(tmp_path, destination=DEST).open(None)
    await first.close()
    second = Spool(tmp_path, destination=DEST)
    second.open(None)  # free again once closed
    await second.close()


async def test_modes_0600_files_0700_dir(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        spool = Spool(tmp_path / "spool", destination=DEST)
        spool.open(INPUT)
        await fill(spool, 10)
        names = sorted(p.name for p in (tmp_path / "spool").iterdir())
        assert {"LOCK", "spool.json"} <= set(names)
        assert any(n.startswith("seg-") for n in names)
        for path in (tmp_path / "spool").iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE, path
        assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == DIR_MODE
        await spool.close()
        assert stat.S_IMODE((tmp_path / "spool" / "spool.json").stat().st_mode) == FILE_MODE
    finally:
        os.umask(old)


async def test_existing_dir_is_tightened_to_0700(tmp_path: Path) -> None:
    folder = tmp_path / "loose"
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    spool = Spool(folder, destination=DEST)
    spool.open(None)
    assert stat.S_IMODE(folder.stat().st_mode) == DIR_MODE
    await spool.close()


async def test_segments_deleted_once_delivered(tmp_path: Path) -> None:
    spool = Spool(tmp_path, destination=DEST, segment_bytes=500)
    spool.open(INPUT)
    await fill(spool, 40, per_chunk=5)
    before = segments(tmp_path)
    assert len(before) >= 3
    await spool.record_batch(0, 20, "k0", "zstd", 3)
    spool.record_delivered(0, 20, "k0")
    await spool.record_batch(20, 20, "k1", "zstd", 3)  # flushes the delivery note before it
    remaining = segments(tmp_path)
    assert remaining, "the active segment stays"
    assert all(int(p.stem[4:]) >= 5 for p in remaining[1:])
    assert len(remaining) < len(before)
    # What was deleted held only delivered ACKs: a reopen finds ACKs 20.. only.
    spool.record_delivered(20, 20, "k1")
    await spool.close()
    assert segments(tmp_path) == []  # all delivered: even the active segment goes on close
    reopened = Spool(tmp_path, destination=DEST)
    recovered = reopened.open(INPUT)
    assert recovered.acks == 0
    assert (recovered.input_offset, recovered.input_line) == (4000, 41)
    await reopened.close()


async def test_partly_delivered_segment_is_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, destination=DEST)
    spool.open(None)
    await fill(spool, 20)
    await spool.record_batch(0, 10, "k0", "zstd", 3)
    spool.record_delivered(0, 10, "k0")
    await spool.close()
    recovered = Spool(tmp_path, destination=DEST).open(None)
    assert recovered.unbatched_first == 10
    assert recovered.unbatched == [ack(i) for i in range(10, 20)]


async def test_offset_carried_across_rotation(tmp_path: Path) -> None:
    spool = Spool(tmp_path, destination=DEST, segment_bytes=300)
    spool.open(INPUT)
    await fill(spool, 50, per_chunk=5)
    await spool.record_batch(0, 50, "k", "zstd", 3)
    spool.record_delivered(0, 50, "k")
    await spool.append([], input_offset=5000, next_line=51)  # flush the note; old segments go
    files = segments(tmp_path)
    assert len(files) == 1  # every full segment was delivered and deleted
    # Kill here (no close): spool.json still says offset 0 (written at open), so the
    # offset must come from the surviving segment alone.
    assert '"offset": 0' in (tmp_path / "spool.json").read_text()
    assert spool._lock_fd is not None
    spool._queue.put(None)
    assert spool._thread is not None
    spool._thread.join()
    os.close(spool._lock_fd)
    spool._lock_fd = None
    reopened = Spool(tmp_path, destination=DEST)
    recovered = reopened.open(INPUT)
    assert recovered.acks == 0
    assert recovered.next_index == 50
    assert (recovered.input_offset, recovered.input_line) == (5000, 51)
    await reopened.close()


async def test_offset_of_the_new_segment_header_after_rotation(tmp_path: Path) -> None:
    """Each new segment starts with the input position, so deleting older ones loses nothing."""
    await journal(tmp_path, 30, per_chunk=5, segment_bytes=300)
    files = segments(tmp_path)
    assert len(files) >= 2
    for older in files[:-1]:
        older.unlink()
    meta = {"destination": DEST, "writer_id": None, "input": {"name": INPUT, "offset": 0, "line": 1}}
    (tmp_path / "spool.json").write_text(json.dumps(meta))
    # Later segments still say where the input was when they were opened.
    recovered = Spool(tmp_path, destination=DEST).open(INPUT)
    assert recovered.input_offset > 0


async def test_destination_mismatch(tmp_path: Path) -> None:
    spool = Spool(tmp_path, destination=DEST, writer_id="w1")
    spool.open(None)
    await fill(spool, 5)
    await spool.close()
    with pytest.raises(ConfigurationError, match="holds ACKs for file:///archive"):
        Spool(tmp_path, destination="s3://other/bucket", writer_id="w1").open(None)
    with pytest.raises(ConfigurationError, match="writer id w1"):
        Spool(tmp_path, destination=DEST, writer_id="w2").open(None)
    # Nothing pending: another destination may take the spool over.
    spool = Spool(tmp_path, destination=DEST, writer_id="w1")
    spool.open(None)
    await spool.record_batch(0, 5, "k", "zstd", 3)
    spool.record_delivered(0, 5, "k")
    await spool.close()
    other = Spool(tmp_path, destination="s3://other/bucket")
    assert other.open(None).acks == 0
    await other.close()


def test_default_dir_per_destination_and_writer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    a = default_spool_dir(DEST, None)
    assert a.parent == tmp_path / "poh-batcher" / "spool"
    assert a == default_spool_dir(DEST, None)
    assert a != default_spool_dir(DEST, "w1")
    assert a != default_spool_dir("s3://b/p", None)
    monkeypatch.delenv("XDG_STATE_HOME")
    assert str(default_spool_dir(DEST, None)).startswith(os.path.expanduser("~/.local/state/poh-batcher/spool/"))


async def test_failed_write_in_a_group_fails_only_itself_and_later_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk mid-group: earlier records are in and reported so (a retry must not journal them twice)."""
    spool = Spool(tmp_path, destination=DEST)
    spool.open(None)
    await spool.close()  # no writer thread: drive _write_all directly
    spool = Spool(tmp_path, destination=DEST)
    spool.open(None)
    spool._queue.put(None)
    assert spool._thread is not None
    spool._thread.join()
    calls = {"n": 0}
    real = spool_module.write_fully

    def write_fully(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            os.write(fd, data[:5])  # a torn start, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(spool_module, "write_fully", write_fully)
    writes = [
        spool_module._Write(spool_module._record(spool_module._ACKS, spool_module._ACKS_HEADER.pack(-1, 1) + ack(i)),
                            sync=False, done=spool_module._ignore, acks=1)
        for i in range(3)
    ]  # fmt: skip
    written, error = spool._write_all(writes)
    assert written == 1
    assert isinstance(error, SpoolFullError)
    assert "No space left on device" in str(error)
    monkeypatch.setattr(spool_module, "write_fully", real)
    assert spool._lock_fd is not None
    os.close(spool._lock_fd)
    spool._lock_fd = None
    recovered = Spool(tmp_path, destination=DEST).open(None)
    assert recovered.torn_records == 0, "the torn start was truncated away"
    assert recovered.unbatched == [ack(0)]


async def test_delivery_notes_are_never_dropped_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A note queued behind a failed append, or failing itself, is kept: dropping it kept a delivered
    segment forever, and on a full disk that space was what the next append needed (the run hung)."""
    spool = Spool(tmp_path, destination=DEST)
    spool.open(None)
    spool._queue.put(None)  # no writer thread: drive _write_all directly
    assert spool._thread is not None
    spool._thread.join()

    def write(kind: bytes, payload: bytes, acks: int = 0) -> spool_module._Write:
        record = spool_module._record(kind, payload)
        return spool_module._Write(record, sync=False, done=spool_module._ignore, acks=acks)

    def acks(first: int, count: int) -> spool_module._Write:
        lines = b"\n".join(ack(i) for i in range(first, first + count))
        return write(spool_module._ACKS, spool_module._ACKS_HEADER.pack(-1, 1) + lines, count)

    def note(first: int, count: int) -> spool_module._Write:
        return write(spool_module._DELIVERED, json.dumps({"first": first, "count": count, "key": "k"}).encode())

    assert spool._write_all([acks(0, 4)]) == (1, None)
    real = spool_module.write_fully

    def room_for_notes_only(fd: int, data: bytes) -> None:
        if data[:1] != spool_module._DELIVERED:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    def no_room(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "write_fully", room_for_notes_only)
    written, error = spool._write_all([acks(4, 2), note(0, 2), note(2, 2)])
    assert written == 0
    assert isinstance(error, SpoolFullError)
    assert spool._delivered_to == 4, "the notes behind the failed append still count"
    # A note that does not fit either is kept and written by the next write that can be.
    monkeypatch.setattr(spool_module, "write_fully", no_room)
    assert spool._write_all([note(4, 1)])[1] is None  # nothing but a note: not an error, kept for later
    assert spool._delivered_to == 4
    monkeypatch.setattr(spool_module, "write_fully", real)
    assert spool._write_all([acks(6, 1)]) == (1, None)
    assert spool._delivered_to == 5


async def test_failed_batch_keeps_its_acks_even_if_later_batches_are_stored(tmp_path: Path) -> None:
    """Regression: delivery notes after a gap must not delete the ACKs of a batch that failed."""

    class FailsBatchZero(LocalStorage):
        async def save_bytes(self, key: str, data: bytes, **options: Any) -> None:
            if key.endswith("_000000.json.zst"):
                await asyncio.sleep(0.2)  # later batches are stored meanwhile
                raise StorageError("refused for good", retryable=False)
            await super().save_bytes(key, data, **options)

    lines = [ack(i) for i in range(1000)]
    data = b"\n".join(lines) + b"\n"
    settings = ArchiveSettings(batch_size=100, retry=RetryPolicy(attempts=None, initial_delay=0.01))

    async def no_rejects(rejects: list[Any]) -> None:
        raise AssertionError(rejects)

    spool = Spool(tmp_path / "spool", destination=DEST)
    first = await run_archive(
        settings, LineSource(io.BytesIO(data), LineValidator()), FailsBatchZero(tmp_path / "out"),
        report_rejects=no_rejects, stop=asyncio.Event(), spool=spool, recovered=spool.open(None),
    )  # fmt: skip
    await spool.close()
    assert first.acks_not_stored == 100
    assert first.acks_stored == 900
    spool = Spool(tmp_path / "spool", destination=DEST)
    recovered = spool.open(None)
    assert recovered.acks == 1000, "the failed batch and the ones after it are still in the spool"
    second = await run_archive(
        settings, LineSource(io.BytesIO(b""), LineValidator()), LocalStorage(tmp_path / "out"),
        report_rejects=no_rejects, stop=asyncio.Event(), spool=spool, recovered=recovered,
    )  # fmt: skip
    await spool.close()
    assert (second.acks_recovered, second.acks_not_stored) == (1000, 0)
    ids: list[str] = []
    for path in sorted((tmp_path / "out").rglob("*.zst")):
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
        ids += [item["id"] for item in json.loads(raw)]
    assert sorted(ids) == sorted(f"a{i}" for i in range(1000)), "every ACK exactly once"
    assert not list((tmp_path / "spool").glob("seg-*.wal"))
