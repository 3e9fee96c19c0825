"""AckItem / AckRequest, BatchHeader, PackedBatch, and pack_acks / unpack_batch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from poh_batcher import AckItem, AckRequest, BatchHeader, PackedBatch, pack_acks, unpack_batch
from poh_batcher.compression import decompress
from poh_batcher.errors import InvalidAckError
from poh_batcher.parsing import LineValidator

SAMPLE = Path(__file__).parent / "data" / "acks_10k.jsonl"
GOOD: dict[str, Any] = {
    "id": "tx-1",
    "timestamp": "2025-01-01T00:00:00.000008Z",
    "signature": "3iZP9U82swUuB16uqJna18vhXmXjNgvFziwmpa9CeaAeos8Qskt2kSwNVadzzmk9Kv78LQfjxSR3U8bTjXXmJp4G",
    "pubkey": "HW9o7Pqr844sYJhzvy22PG8kz1PqMYMKZNPBqjW74hgy",
}


def test_valid_ack() -> None:
    ack = AckItem(**GOOD)
    assert ack.id == "tx-1"
    assert ack.timestamp == GOOD["timestamp"]  # kept as received, not re-rendered


def test_ack_request_is_ack_item() -> None:
    assert AckRequest is AckItem


def test_extra_fields_kept_in_order() -> None:
    ack = AckItem(**GOOD, slot=12345, leader={"name": "é", "ok": True}, tags=["a", "b"])
    dumped = ack.model_dump()
    assert dumped["slot"] == 12345
    assert dumped["leader"] == {"name": "é", "ok": True}
    assert list(dumped)[-3:] == ["slot", "leader", "tags"]
    assert json.loads(ack.model_dump_json())["tags"] == ["a", "b"]


def test_frozen() -> None:
    ack = AckItem(**GOOD, extra=1)
    with pytest.raises(ValidationError):
        ack.id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        ack.extra = 2


@pytest.mark.parametrize("field", ["id", "timestamp", "signature", "pubkey"])
def test_missing_field_rejected(field: str) -> None:
    data = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(ValidationError, match=field):
        AckItem(**data)


@pytest.mark.parametrize("field", ["id", "timestamp", "signature", "pubkey"])
def test_empty_field_rejected(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        AckItem(**{**GOOD, field: ""})


@pytest.mark.parametrize("field", ["id", "timestamp", "signature", "pubkey"])
@pytest.mark.parametrize("value", [1, 1.5, None, True, ["x"], {"a": "b"}, b"bytes"])
def test_non_string_field_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        AckItem(**{**GOOD, field: value})


@pytest.mark.parametrize(
    "timestamp",
    [
        "2025-01-01T00:00:00",  # no zone
        "2025-01-01",  # no time
        "yesterday",
        "2025-13-01T00:00:00Z",
        "2025-01-01T24:00:00Z",
        "2025-01-01T00:00:00ZZ",
        "20250101T000000Z",  # ISO 8601 basic format, not RFC 3339
        "2025-W01-1T00:00:00Z",  # ISO week date, not RFC 3339
    ],
)
def test_invalid_timestamp_rejected(timestamp: str) -> None:
    with pytest.raises(ValidationError, match="timestamp"):
        AckItem(**{**GOOD, "timestamp": timestamp})


@pytest.mark.parametrize(
    "timestamp",
    [
        "2025-01-01T00:00:00Z",
        "2025-01-01T00:00:00.123456Z",
        "2025-01-01T02:00:00+02:00",
        "2025-01-01T00:00:00-05:30",
        "2025-01-01t00:00:00z",  # RFC 3339 allows lower case
    ],
)
def test_valid_timestamps(timestamp: str) -> None:
    assert AckItem(**{**GOOD, "timestamp": timestamp}).timestamp == timestamp


@pytest.mark.parametrize(
    "timestamp",
    [
        "2025-01-01T00:00:00Z",
        "2025-01-01t00:00:00z",
        "2025-01-01 00:00:00Z",
        "2025-01-01T00:00:00",
        "20250101T000000Z",
        "2025-W01-1T00:00:00Z",
        "2025-01-01T00:00Z",
        "2025-01-01T00:00:00+02:00",
    ],
)
def test_model_and_line_validator_agree_on_timestamps(timestamp: str) -> None:
    """A line the command archives must unpack as an AckItem, and vice versa."""
    line = json.dumps({**GOOD, "timestamp": timestamp}, separators=(",", ":")).encode()
    try:
        LineValidator().validate_line(line)
        line_ok = True
    except InvalidAckError:
        line_ok = False
    try:
        AckItem(**{**GOOD, "timestamp": timestamp})
        model_ok = True
    except ValidationError:
        model_ok = False
    assert line_ok == model_ok


def test_batch_header_and_packed_batch_immutable() -> None:
    header = BatchHeader(count=2, compression="zstd")
    batch = PackedBatch(header, b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.count = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.payload = b"y"  # type: ignore[misc]
    assert "b'x'" not in repr(batch)  # payloads can be megabytes: kept out of repr


def _acks() -> list[AckItem]:
    return [
        AckItem(**GOOD),
        AckItem(**{**GOOD, "id": "tx-ünïcødé-日本-🚀", "timestamp": "2025-01-01T01:00:00+01:00"}, memo="naïve ✓"),
        AckItem(**{**GOOD, "id": "tx-3"}, slot=7, nested={"a": [1, 2.5, None, True, '\u0000\n"']}, big=2**62),
    ]


@pytest.mark.parametrize("codec", ["zstd", "gzip", "none"])
def test_pack_unpack_round_trip(codec: str) -> None:
    acks = _acks()
    batch = pack_acks(acks, codec=codec)
    assert batch.header == BatchHeader(count=3, compression=codec)  # type: ignore[arg-type]
    back = unpack_batch(batch)
    assert back == acks
    assert [a.model_dump() for a in back] == [a.model_dump() for a in acks]
    assert [list(a.model_dump()) for a in back] == [list(a.model_dump()) for a in acks]  # field order too


def test_pack_is_minified_utf8_json_array() -> None:
    batch = pack_acks(_acks(), codec="none")
    text = batch.payload.decode("utf-8")  # raw UTF-8, not \u escapes
    assert "日本" in text
    assert "naïve ✓" in text
    assert text.startswith("[{")
    assert text.endswith("}]")
    assert json.loads(text)[1]["memo"] == "naïve ✓"
    assert ", " not in text.replace('"naïve ✓"', "")
    assert ": " not in text


def test_pack_accepts_dicts_lines_and_models_identically() -> None:
    raw = {**GOOD, "extra": "x"}
    line = json.dumps(raw, separators=(",", ":"))
    variants = [[raw], [line], [line.encode()], [AckItem(**raw)]]
    payloads = {pack_acks(v, codec="none").payload for v in variants}
    assert payloads == {("[" + line + "]").encode()}


def test_pack_rejects_invalid_with_index() -> None:
    with pytest.raises(InvalidAckError) as info:
        pack_acks([GOOD, {**GOOD, "pubkey": ""}])
    assert info.value.line == 2
    assert "pubkey" in info.value.reason


def test_pack_sample_round_trip() -> None:
    lines = SAMPLE.read_bytes().splitlines()[:2000]
    batch = pack_acks(lines)
    assert decompress(batch.header.compression, batch.payload) == b"[" + b",".join(lines) + b"]"
    back = unpack_batch(batch)
    assert [json.loads(x) for x in lines] == [a.model_dump() for a in back]


def test_unpack_checks_header_count() -> None:
    batch = pack_acks([GOOD, GOOD], codec="gzip")
    wrong = PackedBatch(BatchHeader(count=3, compression="gzip"), batch.payload)
    with pytest.raises(InvalidAckError, match="3"):
        unpack_batch(wrong)


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_ack_dicts = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=16),
        "timestamp": st.sampled_from(["2025-01-01T00:00:00Z", "2025-06-30T23:59:59.999999+05:30"]),
        "signature": st.text(min_size=1, max_size=16),
        "pubkey": st.text(min_size=1, max_size=16),
    },
    optional={"slot": _values, "memo": _values, "日本": _values},
)


@settings(max_examples=100, deadline=None)
@given(acks=st.lists(_ack_dicts, min_size=1, max_size=8), codec=st.sampled_from(["zstd", "gzip", "none"]))
def test_pack_unpack_round_trip_property(acks: list[dict[str, Any]], codec: str) -> None:
    models = [AckItem(**a) for a in acks]
    for source in (acks, models):
        back = unpack_batch(pack_acks(source, codec=codec))
        assert back == models
        assert [b.model_dump() for b in back] == acks
