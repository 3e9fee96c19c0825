"""Batch keys: format, parsing, writer ids, prefixes, and seqs that are never reused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from poh_batcher.errors import ConfigurationError
from poh_batcher.naming import KeyNamer, make_key, normalize_prefix, parse_key, validate_writer_id
from poh_batcher.storage import LocalStorage

WHEN = datetime(2025, 3, 9, 7, 59, 59, tzinfo=UTC)


def test_make_key_format() -> None:
    assert make_key(WHEN, 0, "zstd") == "20250309/07/ack_batch_000000.json.zst"
    assert make_key(WHEN, 42, "gzip") == "20250309/07/ack_batch_000042.json.gz"
    assert make_key(WHEN, 7, "none") == "20250309/07/ack_batch_000007.json"
    assert make_key(WHEN, 1_234_567, "zstd") == "20250309/07/ack_batch_1234567.json.zst"
    key = make_key(WHEN, 3, "zstd", prefix="a/b", writer_id="node-1")
    assert key == "a/b/20250309/07/ack_batch_node-1_000003.json.zst"


def test_make_key_uses_utc_hour() -> None:
    local = datetime(2025, 3, 9, 1, 30, tzinfo=timezone(timedelta(hours=-8)))  # 09:30 UTC
    assert make_key(local, 0, "zstd").startswith("20250309/09/")
    late = datetime(2025, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-1)))  # next year in UTC
    assert make_key(late, 0, "zstd").startswith("20260101/00/")


@pytest.mark.parametrize("codec", ["zstd", "gzip", "none"])
@pytest.mark.parametrize("writer", [None, "w1", "node.eu-1", "123456"])
@pytest.mark.parametrize("prefix", ["", "acks", "x/y=1/z"])
def test_make_parse_round_trip(codec: str, writer: str | None, prefix: str) -> None:
    key = make_key(WHEN, 17, codec, prefix=prefix, writer_id=writer)  # type: ignore[arg-type]
    parsed = parse_key(key)
    assert parsed is not None
    assert (parsed.key, parsed.prefix, parsed.writer_id, parsed.seq, parsed.codec) == (key, prefix, writer, 17, codec)
    assert parsed.hour == datetime(2025, 3, 9, 7, tzinfo=UTC)


@pytest.mark.parametrize(
    "key",
    [
        "20250309/07/.ack_batch_000001.json.zst.abc.tmp",
        "20250309/07/ack_batch_00001.json.zst",  # 5 digits
        "20250309/07/ack_batch_000001.json.lz4",
        "20250309/07/ack_batch_000001.jsonl",
        "20251309/07/ack_batch_000001.json",  # month 13
        "20250309/25/ack_batch_000001.json",
        "2025030/07/ack_batch_000001.json",
        "20250309/07/other.json",
        "20250309/07/ack_batch_w_1_000001.json",  # '_' in writer id
    ],
)
def test_parse_key_refuses_non_batch_keys(key: str) -> None:
    assert parse_key(key) is None


@pytest.mark.parametrize("writer", ["a/b", "..", "a_b", "", "-x", ".x", "x" * 65, "é", "a b"])
def test_writer_id_validation(writer: str) -> None:
    if writer == "":
        assert validate_writer_id(writer) is None
        return
    with pytest.raises(ConfigurationError, match="writer id"):
        validate_writer_id(writer)


def test_writer_id_accepted() -> None:
    assert validate_writer_id("node-1.eu") == "node-1.eu"
    assert validate_writer_id("x" * 64) == "x" * 64
    assert validate_writer_id(None) is None


def test_prefix_normalization() -> None:
    assert normalize_prefix("/a/b/") == "a/b"
    assert normalize_prefix("") == ""
    assert normalize_prefix("/") == ""
    for bad in ["..", "a/../b", "a//b", "./a", "a/.", "a b", "a\\b"]:
        with pytest.raises(ConfigurationError, match="prefix"):
            normalize_prefix(bad)


async def _put(storage: LocalStorage, key: str) -> None:
    await storage.save_bytes(key, b"[]")


async def test_namer_starts_at_zero(tmp_path: Path) -> None:
    namer = KeyNamer(LocalStorage(tmp_path), "zstd")
    assert await namer.next_key(WHEN) == ("20250309/07/ack_batch_000000.json.zst", 0)
    assert await namer.next_key(WHEN) == ("20250309/07/ack_batch_000001.json.zst", 1)


async def test_namer_continues_past_highest_seq_of_its_writer(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await _put(storage, "20250309/07/ack_batch_000003.json.zst")
    await _put(storage, "20250309/07/ack_batch_000011.json.gz")  # other codec, same writer: counts
    await _put(storage, "20250309/07/ack_batch_w2_000500.json.zst")  # other writer: ignored
    await _put(storage, "20250309/06/ack_batch_000900.json.zst")  # other hour: ignored
    await _put(storage, "20250309/07/notes.txt")
    (tmp_path / "20250309/07/.ack_batch_000777.json.zst.x.tmp").write_bytes(b"")  # temp file: ignored
    plain = KeyNamer(storage, "zstd")
    assert await plain.next_key(WHEN) == ("20250309/07/ack_batch_000012.json.zst", 12)
    w2 = KeyNamer(storage, "zstd", writer_id="w2")
    assert await w2.next_key(WHEN) == ("20250309/07/ack_batch_w2_000501.json.zst", 501)
    w3 = KeyNamer(storage, "zstd", writer_id="w3")
    assert await w3.next_key(WHEN) == ("20250309/07/ack_batch_w3_000000.json.zst", 0)


async def test_namer_with_prefix_only_sees_its_prefix(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await _put(storage, "20250309/07/ack_batch_000009.json.zst")
    await _put(storage, "p/20250309/07/ack_batch_000002.json.zst")
    namer = KeyNamer(storage, "zstd", prefix="/p/")
    assert await namer.next_key(WHEN) == ("p/20250309/07/ack_batch_000003.json.zst", 3)


async def test_namer_new_hour_rescans(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await _put(storage, "20250309/08/ack_batch_000004.json.zst")
    namer = KeyNamer(storage, "zstd")
    assert (await namer.next_key(WHEN))[1] == 0
    assert await namer.next_key(WHEN + timedelta(seconds=1)) == ("20250309/08/ack_batch_000005.json.zst", 5)


def test_namer_refuses_bad_writer_and_prefix(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        KeyNamer(LocalStorage(tmp_path), "zstd", writer_id="a_b")
    with pytest.raises(ConfigurationError):
        KeyNamer(LocalStorage(tmp_path), "zstd", prefix="../up")
