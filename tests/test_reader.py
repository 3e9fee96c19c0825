"""reader: sources, key order, hour selection, exact ACK bytes, and every way a batch can be bad."""

from __future__ import annotations

import asyncio
import gzip
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest

from poh_batcher.batcher import pack_lines
from poh_batcher.errors import ConfigurationError
from poh_batcher.naming import make_key
from poh_batcher.reader import (
    ArchiveReader,
    BatchError,
    decode_batch,
    iter_acks,
    iter_batches,
    parse_hour,
    resolve_source,
)
from poh_batcher.storage import LocalStorage
from poh_batcher.storage.s3 import ObjectInfo

H0 = datetime(2025, 1, 1, 0, tzinfo=UTC)
H3 = datetime(2025, 1, 1, 3, tzinfo=UTC)
H4 = datetime(2025, 1, 1, 4, tzinfo=UTC)
D2 = datetime(2025, 1, 2, 0, tzinfo=UTC)


def ack(n: int, extra: str = "") -> bytes:
    return (
        f'{{"id":"tx-{n}","timestamp":"2025-01-01T00:00:{n % 60:02d}Z","signature":"s{n}","pubkey":"p"{extra}}}'
    ).encode()


async def put(storage: LocalStorage, when: datetime, seq: int, lines: list[bytes], **options: str) -> str:
    codec = options.pop("codec", "zstd")
    packed = pack_lines(lines, codec=codec)
    key = make_key(when, seq, packed.header.compression, **options)  # type: ignore[arg-type]
    await storage.save_bytes(key, packed.payload, metadata={"ack-count": str(len(lines)), "codec": codec})
    return key


@pytest.fixture
async def archive(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """Four hours over two days, 3 batches in H3 (one gzip), in an order unlike their write order."""
    storage = LocalStorage(tmp_path / "arch")
    lines = [ack(n) for n in range(40)]
    await put(storage, H3, 1, lines[15:20], codec="gzip")
    await put(storage, D2, 0, lines[30:40])
    await put(storage, H0, 0, lines[0:10])
    await put(storage, H3, 0, lines[10:15])
    await put(storage, H4, 0, lines[25:30], codec="none")
    await put(storage, H3, 2, lines[20:25])
    (tmp_path / "arch" / "README.txt").write_text("not a batch")
    return tmp_path / "arch", lines


async def acks_of(reader: ArchiveReader) -> list[bytes]:
    async with reader:
        return [line async for line in reader.acks()]


async def test_archive_reads_back_in_key_order(archive: tuple[Path, list[bytes]]) -> None:
    root, lines = archive
    reader = ArchiveReader(str(root))
    refs = await reader.refs()
    assert [r.key for r in refs][:2] == [
        "20250101/00/ack_batch_000000.json.zst",
        "20250101/03/ack_batch_000000.json.zst",
    ]
    assert reader.ignored == ["README.txt"]
    assert await acks_of(reader) == lines[0:25] + lines[25:30] + lines[30:40]


@pytest.mark.parametrize(
    ("since", "until", "expected"),
    [
        ("2025-01-01T03", None, slice(10, 40)),
        (None, "2025-01-01T03", slice(0, 25)),
        ("2025-01-01T03", "2025-01-01T03:59:59Z", slice(10, 25)),
        ("2025-01-01T04", "2025-01-01T04", slice(25, 30)),
        ("20250102", None, slice(30, 40)),
        ("2025-01-01T05:00:00+01:00", "2025-01-01T04", slice(25, 30)),  # 04 UTC
        (datetime(2025, 1, 1, 3, 30), H3, slice(10, 25)),  # naive = UTC, floored to the hour
    ],
)
async def test_since_until_select_whole_hours_both_included(
    archive: tuple[Path, list[bytes]], since: object, until: object, expected: slice
) -> None:
    root, lines = archive
    assert await acks_of(ArchiveReader(str(root), since=since, until=until)) == lines[expected]  # type: ignore[arg-type]


def test_parse_hour() -> None:
    assert parse_hour("2025-01-01T03") == H3
    assert parse_hour("2025-01-01 03") == H3
    assert parse_hour("20250101/03") == H3
    assert parse_hour("2025-01-01") == H0
    assert parse_hour("2025-01-01T03:59:59.999Z") == H3
    for bad in ("yesterday", "2025-13-01T00", "2025-01-01T25"):
        with pytest.raises(ConfigurationError, match="UTC"):
            parse_hour(bad)
    with pytest.raises(ConfigurationError, match="after --until"):
        ArchiveReader("/", since="2025-01-02", until="2025-01-01")


async def test_sources_day_hour_file_and_urls(archive: tuple[Path, list[bytes]]) -> None:
    root, lines = archive
    assert await acks_of(ArchiveReader(str(root / "20250101"))) == lines[0:30]
    assert await acks_of(ArchiveReader(str(root / "20250101" / "03") + "/")) == lines[10:25]
    one = root / "20250101/03/ack_batch_000001.json.gz"
    reader = ArchiveReader(one.as_uri())
    assert reader.single
    assert (await reader.refs())[0].seq == 1
    assert await acks_of(reader) == lines[15:20]
    assert await acks_of(ArchiveReader(f"file://{root}/20250101/04")) == lines[25:30]
    loose = root.parent / "copy.json.zst"
    loose.write_bytes((root / "20250101/00/ack_batch_000000.json.zst").read_bytes())
    loose_reader = ArchiveReader(str(loose))
    ref = (await loose_reader.refs())[0]
    assert (ref.key, ref.hour, ref.codec) == ("copy.json.zst", None, "zstd")
    assert await acks_of(loose_reader) == lines[0:10]


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no such"):
        resolve_source(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigurationError, match="not a batch file"):
        resolve_source(str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigurationError, match="unsupported"):
        resolve_source("gs://bucket/x")
    with pytest.raises(ConfigurationError, match="no bucket"):
        resolve_source("s3:///x")


@pytest.mark.parametrize(
    ("url", "prefix", "listing", "key"),
    [
        ("s3://bkt", "", "", None),
        ("s3://bkt/acks/prod", "acks/prod", "", None),
        ("s3://bkt/acks/20250101", "acks", "20250101/", None),
        ("s3://bkt/acks/20250101/03/", "acks", "20250101/03/", None),
        (
            "s3://bkt/acks/20250101/03/ack_batch_w1_000002.json.zst",
            "acks",
            "",
            "20250101/03/ack_batch_w1_000002.json.zst",
        ),
        ("s3://bkt/x/loose.json.gz", "x", "", "loose.json.gz"),
    ],
)
def test_s3_sources_split_root_and_selection(url: str, prefix: str, listing: str, key: str | None) -> None:
    resolved = resolve_source(url, endpoint="http://127.0.0.1:1", access_key_id="k", secret_access_key="s")
    assert (resolved.storage.prefix, resolved.listing, resolved.key) == (prefix, listing, key)  # type: ignore[attr-defined]


async def test_seq_order_is_numeric_and_per_writer(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    order = [(None, 2), (None, 999_999), (None, 1_000_000), ("w1", 0), ("w2", 0), ("w1", 10)]
    for writer, seq in random.Random(1).sample(order, len(order)):
        await put(storage, H0, seq, [ack(seq, f',"w":"{writer}"')], writer_id=writer or "")
    refs = await ArchiveReader(storage).refs()
    assert [(r.writer_id, r.seq) for r in refs] == [
        (None, 2),
        (None, 999_999),
        (None, 1_000_000),
        ("w1", 0),
        ("w1", 10),
        ("w2", 0),
    ]


def test_acks_are_the_stored_bytes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    lines = [ack(1, ',"note":"é, \\"quoted\\", [1,2]","n":{"a":[1,{"b":2}]}'), ack(2)]
    asyncio.run(put(storage, H0, 0, lines))
    assert list(iter_acks(str(tmp_path))) == lines
    (batch,) = list(iter_batches(str(tmp_path)))
    assert batch.declared_count is None  # LocalStorage keeps no metadata
    assert batch.raw_bytes == len(b"[" + b",".join(lines) + b"]")


def test_sync_helpers_close_early(tmp_path: Path) -> None:
    lines = [ack(n) for n in range(6)]
    for seq in range(3):
        asyncio.run(put(LocalStorage(tmp_path), H0, seq, lines[2 * seq : 2 * seq + 2]))
    iterator = iter_acks(str(tmp_path), prefetch=1)
    assert next(iterator) == lines[0]
    iterator.close()  # type: ignore[attr-defined]
    assert list(iter_acks(str(tmp_path), since="2025-01-01T00")) == lines


async def test_sync_helpers_refuse_a_running_loop(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="inside an event loop"):
        next(iter_acks(str(tmp_path)))


DOC = b'[{"id":"a"},{"id":"b"}]'


@pytest.mark.parametrize(
    ("codec", "payload", "reason"),
    [
        ("zstd", b"", "empty file"),
        ("zstd", gzip.compress(DOC), "extension says zstd but the file holds gzip data"),
        ("gzip", pack_lines([b'{"id":"a"}'], codec="zstd").payload, "extension says gzip but the file holds zstd"),
        ("none", b"PK\x03\x04", "unknown data (starts 50 4b 03 04)"),
        ("zstd", pack_lines([b'{"id":"a"}'] * 50, codec="zstd").payload[:-7], "truncated"),
        ("gzip", gzip.compress(DOC)[:-5], "truncated"),
        ("gzip", gzip.compress(DOC)[:-8] + b"\0\0\0\0" + gzip.compress(DOC)[-4:], "corrupted gzip"),
        ("zstd", pack_lines([b'{"id":"a"}'], codec="zstd").payload + b"junk", "garbage after the zstd frame"),
        ("none", b'[{"id":"a"},{"id":', "not a JSON array"),
        ("none", b'[{"id":"a"},2]', "element 1 of the array is not a JSON object"),
        ("none", b'{"id":"a"}', "unknown data"),
    ],
)
def test_decode_batch_names_what_is_wrong(codec: str, payload: bytes, reason: str) -> None:
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the reason is checked below
        decode_batch(codec, payload)  # type: ignore[arg-type]
    assert reason in str(info.value)


def test_decode_batch_detects_a_flipped_bit() -> None:
    payload = bytearray(pack_lines([ack(n) for n in range(100)], codec="zstd").payload)
    payload[len(payload) // 2] ^= 0x10
    with pytest.raises(ValueError, match=r"corrupted zstd|not a JSON"):
        decode_batch("zstd", bytes(payload))


def test_decode_batch_reads_concatenated_zstd_frames() -> None:
    first = pack_lines([b'{"id":"a"}'], codec="none").payload[:-1] + b","
    import zstandard

    payload = zstandard.ZstdCompressor().compress(first) + zstandard.ZstdCompressor().compress(b'{"id":"b"}]')
    assert decode_batch("zstd", payload)[1] == [b'{"id":"a"}', b'{"id":"b"}']


async def test_bad_batch_raises_or_is_skipped(archive: tuple[Path, list[bytes]]) -> None:
    root, lines = archive
    bad = root / "20250101/03/ack_batch_000001.json.gz"
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(BatchError, match=r"ack_batch_000001\.json\.gz: truncated") as info:
        await acks_of(ArchiveReader(str(root)))
    assert info.value.ref.seq == 1
    skipped: list[BatchError] = []
    async with ArchiveReader(str(root)) as reader:
        got = [line async for line in reader.acks(on_error=skipped.append)]
    assert got == lines[0:15] + lines[20:40]
    assert [e.ref.key for e in skipped] == ["20250101/03/ack_batch_000001.json.gz"]


async def test_a_batch_deleted_after_listing_is_an_error(archive: tuple[Path, list[bytes]]) -> None:
    root, _ = archive
    reader = ArchiveReader(str(root))
    refs = await reader.refs()
    (root / refs[1].key).unlink()
    with pytest.raises(BatchError, match="cannot read: no object") as info:
        await reader.read(refs[1])
    assert info.value.ref == refs[1]


class SlowFirst(LocalStorage):
    """Earlier keys answer later, so prefetched batches complete out of order."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.loads = 0
        self.heads = 0

    async def load_bytes(self, key: str) -> bytes:
        self.loads += 1
        await asyncio.sleep(0.02 if key.endswith("0.json.zst") else 0)
        return await super().load_bytes(key)


class WithHead(SlowFirst):
    """A backend with a HEAD that returns metadata, like S3Storage."""

    def __init__(self, root: Path, metadata: Mapping[str, str]) -> None:
        super().__init__(root)
        self.metadata = dict(metadata)

    async def head(self, key: str) -> ObjectInfo:
        self.heads += 1
        return ObjectInfo(key, (self.root / key).stat().st_size, dict(self.metadata))


async def test_prefetch_keeps_key_order(tmp_path: Path) -> None:
    storage = SlowFirst(tmp_path)
    for seq in range(30):
        await put(storage, H0, seq, [ack(seq)])
    reader = ArchiveReader(storage, prefetch=5)
    assert [b.ref.seq async for b in reader.batches()] == list(range(30))
    assert storage.loads == 30


async def test_stat_uses_head_metadata_and_does_not_download(tmp_path: Path) -> None:
    storage = WithHead(tmp_path, {"ack-count": "7", "codec": "zstd"})
    await put(storage, H0, 0, [ack(1)])
    (stat,) = [s async for s in ArchiveReader(storage).stats()]
    assert (stat.ack_count, stat.codec, stat.raw_bytes, storage.loads, storage.heads) == (7, "zstd", None, 0, 1)
    storage.metadata = {}  # written by another tool: no metadata, so it is read
    (stat,) = [s async for s in ArchiveReader(storage).stats()]
    assert (stat.ack_count, stat.raw_bytes is not None, storage.loads) == (1, True, 1)
    (batch,) = [b async for b in ArchiveReader(storage).batches(with_metadata=True)]
    assert batch.declared_count is None
    storage.metadata = {"ack-count": "3"}
    (batch,) = [b async for b in ArchiveReader(storage).batches(with_metadata=True)]
    assert batch.declared_count == 3
    assert len(batch.acks) == 1


async def test_stat_without_head_reads_the_file(archive: tuple[Path, list[bytes]]) -> None:
    root, _ = archive
    stats = [s async for s in ArchiveReader(str(root), until="2025-01-01T00").stats()]
    assert [(s.ack_count, s.codec, s.stored_bytes) for s in stats] == [
        (10, "zstd", (root / "20250101/00/ack_batch_000000.json.zst").stat().st_size)
    ]
    assert stats[0].raw_bytes == len(b"[" + b",".join(ack(n) for n in range(10)) + b"]")
