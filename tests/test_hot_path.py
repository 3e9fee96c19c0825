"""The fast path writes exactly the archive the simple path would.

The hot path (block reads, ``validate_block``'s decode/re-encode/compare,
bulk ``enqueue_lines``, packing and writing on worker threads) must produce
byte-identical batch files to the obvious implementation: validate each line
on its own with ``validate_line``, skip blanks, keep rejects, cut batches of N
in input order and ``pack_acks`` each. Speed work that changes one byte of
one file, the order, a batch boundary or a reject fails here.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
from pathlib import Path

import pytest

from fakeclock import FakeClock
from poh_batcher import AckItem, AsyncBatcher, InvalidAckError, LocalStorage, pack_acks
from poh_batcher.batcher import pack_lines
from poh_batcher.parsing import LineValidator, Reject
from poh_batcher.pipeline import ArchiveSettings, run_archive
from poh_batcher.sources.lines import LineSource

SAMPLE = Path(__file__).parent / "data" / "acks_10k.jsonl"
BATCH = 97  # not a divisor of anything in sight: batches straddle read blocks


def _sample() -> list[bytes]:
    if SAMPLE.exists():
        return SAMPLE.read_bytes().splitlines()
    rng = random.Random(1)
    return [
        json.dumps(
            {
                "id": f"tx-{rng.getrandbits(128):032x}",
                "timestamp": f"2025-01-01T00:00:{i % 60:02d}.{i:06d}Z",
                "signature": "".join(rng.choices("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", k=88)),
                "pubkey": "".join(rng.choices("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", k=44)),
            },
            separators=(",", ":"),
        ).encode()
        for i in range(10_000)
    ]


def _mangle(line: bytes, rng: random.Random) -> bytes:
    """A variant of a good line: valid but not canonical, or invalid."""
    obj = json.loads(line)
    kind = rng.randrange(12)
    if kind == 0:  # extra field, kept
        obj["slot"] = rng.randrange(10**9)
        return json.dumps(obj, separators=(",", ":")).encode()
    if kind == 1:  # whitespace, minified
        return json.dumps(obj, indent=None).encode()
    if kind == 2:  # fields in another order
        return json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":")).encode()
    if kind == 3:  # escapes and non-ASCII in an extra field, kept byte for byte
        return line[:-1] + b',"note":"caf\\u00e9 \xc3\xa9 \\"q\\" \\\\ / tab\\t"}'
    if kind == 4:  # trailing spaces and a carriage return
        return line + b"  \r"
    if kind == 5:  # blank
        return rng.choice([b"", b"   ", b"\t"])
    if kind == 6:  # not JSON
        return line[: len(line) // 2]
    if kind == 7:  # missing field
        del obj["pubkey"]
        return json.dumps(obj, separators=(",", ":")).encode()
    if kind == 8:  # bad timestamp
        obj["timestamp"] = "yesterday"
        return json.dumps(obj, separators=(",", ":")).encode()
    if kind == 9:  # empty field
        obj["signature"] = ""
        return json.dumps(obj, separators=(",", ":")).encode()
    if kind == 10:  # not an object
        return b"[1,2,3]"
    return b"\xff" + line  # not UTF-8


def _stream(seed: int, mangled_every: int) -> list[bytes]:
    rng = random.Random(seed)
    lines = _sample()
    return [_mangle(line, rng) if rng.randrange(mangled_every) == 0 else line for line in lines]


def _simple_archive(lines: list[bytes], codec: str) -> tuple[list[bytes], list[tuple[int, bytes]]]:
    """The reference: one line at a time, batches of BATCH in order, ``pack_acks`` each."""
    validator = LineValidator()
    acks: list[bytes] = []
    rejects: list[tuple[int, bytes]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            acks.append(validator.validate_line(line))
        except InvalidAckError:
            rejects.append((number, line))
    payloads = [pack_acks(acks[i : i + BATCH], codec=codec).payload for i in range(0, len(acks), BATCH)]
    return payloads, rejects


def _archived(root: Path) -> list[bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [p.read_bytes() for p in files]


async def _fast_archive(
    lines: list[bytes], root: Path, codec: str, *, block_size: int, trailing_newline: bool = True
) -> tuple[list[bytes], list[tuple[int, bytes]]]:
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    rejects: list[Reject] = []

    async def report(found: list[Reject]) -> None:
        rejects.extend(found)

    settings = ArchiveSettings(batch_size=BATCH, batch_timeout=3600.0, codec=codec, max_in_flight=4)
    source = LineSource(io.BytesIO(data), LineValidator(), block_size=block_size)
    summary = await run_archive(
        settings, source, LocalStorage(root), report_rejects=report, stop=asyncio.Event(), clock=_WallFakeClock()
    )
    assert summary.acks_not_stored == 0
    return _archived(root), [(r.line, r.raw) for r in rejects]


class _WallFakeClock(FakeClock):
    """A fixed UTC hour (one folder, keys sort by seq) and real sleeps (no timer fires)."""

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@pytest.mark.parametrize("codec", ["zstd", "gzip", "none"])
@pytest.mark.parametrize(("seed", "mangled_every", "block_size"), [(1, 40, 1 << 20), (2, 7, 4096), (3, 500, 1000)])
async def test_cli_path_is_byte_identical_to_simple_path(
    tmp_path: Path, codec: str, seed: int, mangled_every: int, block_size: int
) -> None:
    lines = _stream(seed, mangled_every)
    expected, expected_rejects = _simple_archive(lines, codec)
    assert expected_rejects, "the stream must exercise the slow path too"
    got, rejects = await _fast_archive(lines, tmp_path, codec, block_size=block_size)
    assert len(got) == len(expected)
    for index, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        assert mine == theirs, f"batch {index} differs"
    assert rejects == expected_rejects


async def test_last_line_without_newline_is_archived(tmp_path: Path) -> None:
    lines = _stream(4, 50)[:1000]
    expected, _ = _simple_archive(lines, "zstd")
    got, _ = await _fast_archive(lines, tmp_path, "zstd", block_size=777, trailing_newline=False)
    assert got == expected


async def test_all_clean_stream_takes_input_bytes_verbatim(tmp_path: Path) -> None:
    """The common case: every line canonical, so each batch is exactly ``[`` + lines joined by ``,`` + ``]``."""
    lines = _sample()[:2000]
    got, rejects = await _fast_archive(lines, tmp_path, "none", block_size=1 << 16)
    assert not rejects
    assert got == [b"[" + b",".join(lines[i : i + BATCH]) + b"]" for i in range(0, len(lines), BATCH)]


def test_models_pack_like_their_lines() -> None:
    """``pack_acks`` over ``AckItem`` models gives the bytes of packing the lines they came from."""
    lines = [line for line in _sample()[:1500] if b"\\" not in line]
    models = [AckItem.model_validate_json(line) for line in lines]
    assert pack_acks(models).payload == pack_lines(lines).payload


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
async def test_library_paths_are_byte_identical(tmp_path: Path, codec: str) -> None:
    """Per-ACK ``enqueue``, bulk ``enqueue_many`` and ``enqueue_lines`` store the same files."""
    lines = [line for line in _stream(5, 30) if line.strip()]
    validator = LineValidator()
    valid: list[bytes] = []
    for line in lines:
        try:
            valid.append(validator.validate_line(line))
        except InvalidAckError:
            continue
    expected = [pack_lines(valid[i : i + BATCH], codec=codec).payload for i in range(0, len(valid), BATCH)]

    async def archive(name: str) -> list[bytes]:
        root = tmp_path / name
        async with AsyncBatcher(BATCH, 3600.0, LocalStorage(root), codec=codec, clock=_WallFakeClock()) as batcher:
            if name == "one":
                for line in valid:
                    await batcher.enqueue(line)
            elif name == "many":
                for i in range(0, len(valid), 3001):
                    await batcher.enqueue_many(valid[i : i + 3001])
            else:
                for i in range(0, len(valid), 1234):
                    await batcher.enqueue_lines(valid[i : i + 1234])
        return _archived(root)

    for name in ("one", "many", "lines"):
        assert await archive(name) == expected, name


async def test_spool_journal_from_the_read_block_is_byte_identical(tmp_path: Path) -> None:
    """The CLI journals the reader's block as is (``Chunk.joined``): same segment bytes as joining the lines."""
    from poh_batcher.spool import Spool

    lines = _sample()[:3000]
    block = b"\n".join(lines) + b"\n" + b'{"id":"partial'  # a block as read: lines, then the start of the next
    segments: list[bytes] = []
    for name, joined in (("joined", memoryview(block)[: len(block) - len(b'{"id":"partial') - 1]), ("plain", None)):
        spool = Spool(tmp_path / name, destination="file:///x")
        spool.open("input")
        await spool.append(lines[:1000], input_offset=1, next_line=2)  # without a block, as other sources do
        await spool.append(lines, input_offset=100, next_line=3001, joined=joined)
        spool._queue.put(None)  # stop the writer as a kill would: the segment stays
        assert spool._thread is not None
        spool._thread.join()
        (segment,) = (tmp_path / name).glob("seg-*.wal")
        segments.append(segment.read_bytes())
        assert spool._lock_fd is not None
        os.close(spool._lock_fd)
        reopened = Spool(tmp_path / name, destination="file:///x")
        assert reopened.open("input").unbatched == lines[:1000] + lines
        reopened._queue.put(None)
        assert reopened._thread is not None
        reopened._thread.join()
        assert reopened._lock_fd is not None
        os.close(reopened._lock_fd)
    assert segments[0] == segments[1]


async def test_cli_chunks_carry_their_block(tmp_path: Path) -> None:
    """A clean block is handed over with ``joined`` equal to its lines; a block with rejects is not."""
    lines = _sample()[:2000]
    clean = io.BytesIO(b"\n".join(lines) + b"\n")
    chunks = [chunk async for chunk in LineSource(clean, LineValidator(), block_size=50_000).chunks()]
    assert all(chunk.joined is not None and bytes(chunk.joined) == b"\n".join(chunk.acks) for chunk in chunks)
    dirty = io.BytesIO(b"\n".join([*lines[:10], b"nope", *lines[10:20]]) + b"\n")
    (chunk,) = [chunk async for chunk in LineSource(dirty, LineValidator()).chunks()]
    assert chunk.joined is None
    assert len(chunk.acks) == 20
