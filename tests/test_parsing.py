"""LineValidator: what is kept (byte for byte), what is minified, what is rejected and why."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poh_batcher.errors import InvalidAckError
from poh_batcher.parsing import LineValidator, Reject, ValidatedBlock, minify

SAMPLE = Path(__file__).parent / "data" / "acks_10k.jsonl"
GOOD = (
    b'{"id":"tx-1","timestamp":"2025-01-01T00:00:00.000008Z",'
    b'"signature":"3iZP9U82swUuB16uqJna18vhXmX","pubkey":"HW9o7Pqr844sYJhzvy22PG8kz1"}'
)


def _line(**fields: object) -> bytes:
    base: dict[str, object] = {"id": "tx-1", "timestamp": "2025-01-01T00:00:00Z", "signature": "s", "pubkey": "p"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _MISSING}, separators=(",", ":")).encode()


_MISSING = object()


def _reason(line: bytes, **kwargs: int) -> str:
    with pytest.raises(InvalidAckError) as info:
        LineValidator(**kwargs).validate_line(line)
    assert info.value.reason
    return info.value.reason


def test_canonical_line_kept_identical() -> None:
    assert LineValidator().validate_line(GOOD) == GOOD


def test_sample_lines_kept_byte_for_byte() -> None:
    lines = SAMPLE.read_bytes().splitlines()
    block = LineValidator().validate_block(lines)
    assert block.acks == lines
    assert block.rejects == []
    assert block.blank == 0


@pytest.mark.parametrize(
    "line",
    [
        b'{"timestamp":"2025-01-01T00:00:00Z","id":"a","pubkey":"p","signature":"s"}',  # other order
        b'{"id":"a","timestamp":"2025-01-01T00:00:00+02:00","signature":"s","pubkey":"p"}',  # offset kept
        b'{"id":"\\u00e9\\n","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}',  # escapes kept
        '{"id":"é日本🚀","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}'.encode(),
        b'{"id":"a","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p","x":1.50,"y":[1e3,null]}',
    ],
)
def test_valid_minified_lines_kept_as_received(line: bytes) -> None:
    assert LineValidator().validate_line(line) == line


def test_whitespace_minified_strings_untouched() -> None:
    line = (
        b' {  "id" : "a b\\" c" ,\t"timestamp":"2025-01-01T00:00:00Z", "signature":"s  s",'
        b'\r "pubkey":"p" ,"x" : [ 1 , 2 ] }\r'
    )
    out = LineValidator().validate_line(line)
    assert out == b'{"id":"a b\\" c","timestamp":"2025-01-01T00:00:00Z","signature":"s  s","pubkey":"p","x":[1,2]}'
    assert json.loads(out) == json.loads(line)


def test_minify_keeps_strings_with_escaped_backslash() -> None:
    line = b'{"a" : "x\\\\" , "b" : " y "}'
    assert minify(line) == b'{"a":"x\\\\","b":" y "}'
    assert minify(b'{"a":1}') == b'{"a":1}'


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"id":"\xff\xfe","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}', "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b'\xef\xbb\xbf{"id":"a","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}', "byte order mark"),
        (b'{"id":"a",}', "not valid JSON"),
        (b"[1,2,3]", "not a JSON object (got array)"),
        (b'"just a string"', "not a JSON object (got string)"),
        (b"42", "not a JSON object (got number)"),
        (b"null", "not a JSON object (got null)"),
        (_line(id=_MISSING), "missing field 'id'"),
        (_line(timestamp=_MISSING), "missing field 'timestamp'"),
        (_line(signature=_MISSING), "missing field 'signature'"),
        (_line(pubkey=_MISSING), "missing field 'pubkey'"),
        (_line(id=""), "field 'id' is empty"),
        (_line(pubkey=""), "field 'pubkey' is empty"),
        (_line(signature=None), "field 'signature' must be a string, got null"),
        (_line(id=12), "field 'id' must be a string, got number"),
        (_line(pubkey=1.5), "field 'pubkey' must be a string, got number"),
        (_line(id=True), "field 'id' must be a string, got boolean"),
        (_line(id=["a"]), "field 'id' must be a string, got array"),
        (_line(id={"a": 1}), "field 'id' must be a string, got object"),
        (_line(timestamp="yesterday"), "field 'timestamp' is not an RFC 3339 time"),
        (_line(timestamp="2025-01-01T00:00:00"), "field 'timestamp' is not an RFC 3339 time"),  # naive
        (_line(timestamp="2025-02-30T00:00:00Z"), "field 'timestamp' is not an RFC 3339 time"),
        (_line(timestamp=1735689600), "field 'timestamp' must be a string, got number"),
        (
            b'{"id":"a","id":"b","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}',
            "duplicate field 'id'",
        ),
        (
            b'{"id":"a","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p","x":{"k":1,"k":2}}',
            "duplicate field 'k'",
        ),
        (b'{"id":"a\x00","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}', "not valid JSON"),
        (b"\x00", "not valid JSON"),
    ],
)
def test_rejection_reasons(line: bytes, expected: str) -> None:
    assert expected in _reason(line)


def test_deep_nesting_rejected() -> None:
    line = _line()[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested too deeply" in _reason(line, max_line_bytes=1 << 21)


def test_moderate_nesting_accepted() -> None:
    line = _line()[:-1] + b',"x":' + b"[" * 200 + b"]" * 200 + b"}"
    assert LineValidator().validate_line(line) == line


def test_over_max_line_bytes() -> None:
    line = _line(id="x" * 200)
    reason = _reason(line, max_line_bytes=100)
    assert f"{len(line)} bytes" in reason
    assert "100" in reason
    assert LineValidator(max_line_bytes=len(line)).validate_line(line) == line


def test_max_line_bytes_must_be_sane() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        LineValidator(max_line_bytes=1)


def _mixed_lines() -> list[bytes]:
    rng = random.Random(7)
    good = SAMPLE.read_bytes().splitlines()[:300]
    bad = [
        b"{oops",
        b"",
        b"   ",
        _line(id=""),
        _line(timestamp="2025-01-01T00:00:00"),
        b'{"id":"a","id":"b","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}',
        b"\xff",
        b'{"id":"\xc3(","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}',  # bad UTF-8 in a string
        b"[]",
        b' { "id":"a","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p" } ',
        _line(extra="kept ✓"),
        _line(id=None),
        b"\t",
    ]
    lines = list(good)
    for item in bad:
        lines.insert(rng.randrange(len(lines) + 1), item)
    return lines


def _per_line(validator: LineValidator, lines: list[bytes], first: int = 1) -> ValidatedBlock:
    block = ValidatedBlock()
    for number, line in enumerate(lines, first):
        if not line.strip():
            block.blank += 1
            continue
        try:
            block.acks.append(validator.validate_line(line))
        except InvalidAckError as exc:
            block.rejects.append(Reject(number, exc.reason, line))
    return block


def test_block_equals_per_line_on_mixed_input() -> None:
    lines = _mixed_lines()
    validator = LineValidator()
    block = validator.validate_block(lines, first_line=101)
    expected = _per_line(validator, lines, first=101)
    assert block.acks == expected.acks
    assert block.rejects == expected.rejects
    assert block.blank == expected.blank == 3
    assert len(block.rejects) == 8
    assert len(block.acks) + len(block.rejects) + block.blank == len(lines)
    # reject line numbers point at the offending input line, with its raw bytes
    for reject in block.rejects:
        assert lines[reject.line - 101] == reject.raw


def test_block_fast_path_equals_per_line_on_clean_input() -> None:
    lines = SAMPLE.read_bytes().splitlines()[:500]
    validator = LineValidator()
    assert validator.validate_block(lines).acks == _per_line(validator, lines).acks == lines


def test_block_with_an_overlong_line() -> None:
    lines = [*SAMPLE.read_bytes().splitlines()[:3], _line(id="y" * 500)]
    block = LineValidator(max_line_bytes=400).validate_block(lines, first_line=1)
    assert block.acks == lines[:3]
    assert [r.line for r in block.rejects] == [4]
    assert "over the limit" in block.rejects[0].reason


def test_empty_block() -> None:
    block = LineValidator().validate_block([])
    assert (block.acks, block.rejects, block.blank) == ([], [], 0)


def test_checks_hook_rejects_in_line_order() -> None:
    lines = _mixed_lines()
    seen: list[bytes] = []

    def no_extra(ack: bytes) -> str | None:
        seen.append(ack)
        return "extra fields not allowed here" if b'"extra"' in ack else None

    plain = LineValidator().validate_block(lines)
    checked = LineValidator(checks=[no_extra]).validate_block(lines)
    assert seen == plain.acks  # every valid ACK checked once, invalid ones never
    assert checked.acks == [a for a in plain.acks if b'"extra"' not in a]
    assert len(checked.rejects) == len(plain.rejects) + 1
    assert [r.line for r in checked.rejects] == sorted(r.line for r in checked.rejects)
    hooked = next(r for r in checked.rejects if r.reason == "extra fields not allowed here")
    assert b'"extra"' in hooked.raw
    assert lines[hooked.line - 1] == hooked.raw


def test_checks_hook_on_fast_path_numbers_lines() -> None:
    lines = SAMPLE.read_bytes().splitlines()[:50]
    target = lines[9]
    checked = LineValidator(checks=[lambda a: "bad sig" if a == target else None]).validate_block(lines, 1000)
    assert checked.rejects == [Reject(1009, "bad sig", target)]
    assert checked.acks == lines[:9] + lines[10:]


def test_first_failing_check_wins() -> None:
    checks = [lambda a: None, lambda a: "second", lambda a: "third"]
    block = LineValidator(checks=checks).validate_block([GOOD])
    assert [r.reason for r in block.rejects] == ["second"]


# -- properties ----------------------------------------------------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_field = st.text(min_size=1, max_size=20)
_timestamps = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)).map(
    lambda d: d.isoformat().replace("+00:00", "Z")
)
_acks = st.fixed_dictionaries(
    {"id": _field, "timestamp": _timestamps, "signature": _field, "pubkey": _field},
    optional={"slot": _json_values, "meta": _json_values, "é ✓": _json_values},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ack=_acks, ascii_only=st.booleans(), spaced=st.booleans(), indent=st.sampled_from([None, 1]))
def test_any_valid_ack_is_minified_exactly(
    ack: dict[str, object], ascii_only: bool, spaced: bool, indent: int | None
) -> None:
    separators = (", ", ": ") if spaced else (",", ":")
    line = json.dumps(ack, ensure_ascii=ascii_only, separators=separators, indent=indent).replace("\n", " ").encode()
    out = LineValidator().validate_line(line)
    # only whitespace outside strings goes; strings (escapes included) are kept byte for byte
    assert out == json.dumps(ack, ensure_ascii=ascii_only, separators=(",", ":")).encode()
    assert json.loads(out) == ack


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    acks=st.lists(_acks, max_size=12),
    noise=st.lists(st.sampled_from([b"", b"{", b"[]", b"null", _line(id=""), b" ", b"\xff"]), max_size=4),
    seed=st.integers(0, 1000),
)
def test_block_equals_per_line_property(acks: list[dict[str, object]], noise: list[bytes], seed: int) -> None:
    lines = [json.dumps(a, ensure_ascii=False, separators=(",", ":")).encode() for a in acks]
    rng = random.Random(seed)
    for item in noise:
        lines.insert(rng.randrange(len(lines) + 1), item)
    validator = LineValidator()
    block, expected = validator.validate_block(lines, 7), _per_line(validator, lines, 7)
    assert (block.acks, block.rejects, block.blank) == (expected.acks, expected.rejects, expected.blank)
