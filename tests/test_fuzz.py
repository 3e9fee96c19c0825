"""Fuzzing: the line validator and pack/unpack under hypothesis, and the command over random and mutated input.

The command's invariant, whatever the input: it exits 0, and
``lines read == ACKs stored + lines rejected + blank lines``, with exactly the
lines the per-line validator accepts stored, once each.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from faultkit import Ledger, child_env, local_objects, run
from poh_batcher.batcher import pack_acks, pack_lines, unpack_batch
from poh_batcher.errors import InvalidAckError
from poh_batcher.parsing import LineValidator, minify
from poh_batcher.types import AckItem

FIELDS = ("id", "timestamp", "signature", "pubkey")
MAX_LINE = 4096

# -- strategies -------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
_timestamps = st.sampled_from(
    ["2025-01-01T00:00:00Z", "2024-02-29T23:59:59.123456+05:30", "1999-12-31T23:59:59Z", "2025-01-01T00:00:00-00:00"]
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def ack_objects(draw: st.DrawFn) -> dict[str, Any]:
    ack: dict[str, Any] = {"id": draw(_text), "timestamp": draw(_timestamps)}
    ack.update(signature=draw(_text), pubkey=draw(_text))
    extras = draw(st.dictionaries(_text.filter(lambda k: k not in FIELDS), _json_values, max_size=3))
    ack.update(extras)
    if draw(st.booleans()):
        items = list(ack.items())
        draw(st.randoms()).shuffle(items)
        ack = dict(items)
    return ack


def encode(ack: dict[str, Any], rng: random.Random) -> bytes:
    style = rng.choice(["compact", "spaced", "ascii"])
    if style == "compact":
        return json.dumps(ack, separators=(",", ":"), ensure_ascii=False).encode()
    if style == "spaced":
        return json.dumps(ack, ensure_ascii=False).encode()
    return json.dumps(ack).encode()


def mutate(line: bytes, rng: random.Random) -> bytes:
    """One hostile change to a line."""
    kind = rng.randrange(11)
    data = bytearray(line)
    if kind == 0 and data:  # bit flip
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
    elif kind == 1 and data:  # truncation
        del data[rng.randrange(len(data)) :]
    elif kind == 2:  # NUL byte
        data.insert(rng.randrange(len(data) + 1), 0)
    elif kind == 3:  # invalid UTF-8
        data[rng.randrange(len(data) + 1) : 0] = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82"])
    elif kind == 4:  # over the size limit
        data = bytearray(b'{"id":"big","pad":"' + b"x" * (MAX_LINE + rng.randrange(1, 3 * MAX_LINE)) + b'"}')
    elif kind == 5:  # deep nesting
        depth = rng.choice([600, 5000, 50_000])
        data = bytearray(b'{"id":' + b"[" * depth + b"]" * depth + b"}")
    elif kind == 6:  # duplicate key
        data = bytearray(line[:-1] + b',"id":"again"}') if line.endswith(b"}") else data
    elif kind == 7:  # number or null in a string field
        field = rng.choice(FIELDS).encode()
        value = rng.choice([b"1", b"null", b"1.5e300", b"true", b"[]", b"{}"])
        data = bytearray(b'{"%s":%s,' % (field, value) + line[1:]) if line.startswith(b"{") else data
    elif kind == 8:  # not an object
        data = bytearray(rng.choice([b"[]", b"42", b'"a string"', b"null", b"{", b"}", b"\x1b[2J", b"\r"]))
    elif kind == 9:  # whitespace only (a blank line)
        data = bytearray(rng.choice([b"", b" ", b"\t", b"  \t "]))
    else:  # a carriage return, as from Windows
        data += b"\r"
    return bytes(data)


# -- LineValidator ----------------------------------------------------------------


def check_valid_output(out: bytes) -> None:
    value = json.loads(out)  # valid JSON (and UTF-8)
    assert isinstance(value, dict)
    for name in FIELDS:
        assert isinstance(value[name], str)
        assert value[name]
    assert minify(out) == out, "stored lines are minified"
    assert b"\n" not in out


def per_line(validator: LineValidator, lines: list[bytes]) -> tuple[list[bytes], list[tuple[int, str]], int]:
    acks: list[bytes] = []
    rejects: list[tuple[int, str]] = []
    blank = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            blank += 1
            continue
        try:
            acks.append(validator.validate_line(line))
        except InvalidAckError as exc:
            rejects.append((number, exc.reason))
    return acks, rejects, blank


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
@example(b"\x00")
@example(b"\xff\xfe")
@example(b"[" * 100_000)
@example(b'{"id":"a","id":"b","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}')
def test_validate_line_never_raises_anything_else(data: bytes) -> None:
    validator = LineValidator(MAX_LINE)
    try:
        out = validator.validate_line(data)
    except InvalidAckError as exc:
        reason = exc.reason
    else:
        check_valid_output(out)
        return
    assert reason, "a rejected line always has a reason"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    acks=st.lists(ack_objects(), max_size=12),
    noise=st.lists(st.binary(max_size=80), max_size=6),
    mutations=st.integers(0, 8),
    seed=st.integers(0, 2**32),
)
def test_block_path_equals_per_line_path(
    acks: list[dict[str, Any]], noise: list[bytes], mutations: int, seed: int
) -> None:
    rng = random.Random(seed)
    lines = [encode(ack, rng) for ack in acks] + [n.replace(b"\n", b"") for n in noise]
    for _ in range(mutations):
        if lines:
            position = rng.randrange(len(lines))
            lines[position] = mutate(lines[position], rng).replace(b"\n", b"")
    rng.shuffle(lines)
    validator = LineValidator(MAX_LINE)
    block = validator.validate_block(lines, 1)
    expected_acks, expected_rejects, expected_blank = per_line(validator, lines)
    assert block.acks == expected_acks
    assert [(r.line, r.reason) for r in block.rejects] == expected_rejects
    assert block.blank == expected_blank
    assert len(block.acks) + len(block.rejects) + block.blank == len(lines)
    for out in block.acks:
        check_valid_output(out)
    for reject in block.rejects:  # kept verbatim, an over-long line up to the limit only
        assert reject.raw == lines[reject.line - 1][:MAX_LINE]


@settings(max_examples=150, deadline=None)
@given(ack=ack_objects(), seed=st.integers(0, 2**32))
def test_valid_ack_keeps_its_values(ack: dict[str, Any], seed: int) -> None:
    line = encode(ack, random.Random(seed))
    out = LineValidator(1 << 20).validate_line(line)
    assert json.loads(out) == json.loads(line)  # minified, nothing else changed
    assert list(json.loads(out)) == list(ack)  # field order kept


# -- pack / unpack ----------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(acks=st.lists(ack_objects(), min_size=0, max_size=20), codec=st.sampled_from(["zstd", "gzip", "none"]))
def test_pack_unpack_round_trip(acks: list[dict[str, Any]], codec: str) -> None:
    packed = pack_acks(acks, codec=codec)
    assert packed.header.count == len(acks)
    assert packed.header.compression == codec
    items = unpack_batch(packed)
    assert items == [AckItem.model_validate(ack) for ack in acks]
    assert [item.model_dump() for item in items] == acks
    # Deterministic: a replay after a crash rebuilds the same bytes.
    assert pack_acks(acks, codec=codec).payload == packed.payload
    # The stored array is the ACK lines joined: unpacking the raw JSON gives the same objects.
    lines = [json.dumps(ack, ensure_ascii=False).encode() for ack in acks]
    assert [item.model_dump() for item in unpack_batch(pack_lines(lines, codec=codec))] == acks


# -- the command over hostile input ----------------------------------------------------


def hostile_input(rng: random.Random, count: int) -> bytes:
    lines: list[bytes] = []
    for i in range(count):
        ack = {"id": f"fz-{i:06d}", "timestamp": "2025-01-01T00:00:00Z", "signature": f"s{i}", "pubkey": "pk"}
        if rng.random() < 0.2:
            ack["extra"] = rng.choice([None, 1, [1, {"a": "b"}], "é☃\U0001f600", "\\\"quoted\\\""])
        line = encode(ack, rng)
        if rng.random() < 0.3:
            line = mutate(line, rng)
        if rng.random() < 0.02:
            line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        lines.append(line)
    data = b"\n".join(lines)
    if rng.random() < 0.7:  # a last line without its newline, often
        data += b"\n"
    return data


def expected_of(data: bytes) -> tuple[int, list[str], int, int]:
    """Lines, ids of valid ACKs, rejects, blank lines, as the per-line validator sees them."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    validator = LineValidator(MAX_LINE)
    acks, rejects, blank = per_line(validator, lines)
    return len(lines), [json.loads(a)["id"] for a in acks], len(rejects), blank


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cli_fuzz_count_identity(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = hostile_input(rng, 3000)
    source = tmp_path / "hostile.jsonl"
    source.write_bytes(data)
    stats = tmp_path / "stats.json"
    args = ["-i", str(source), "-o", str(tmp_path / "out"), "-n", "97", "--max-line-bytes", str(MAX_LINE)]
    args += ["--spool-dir", str(tmp_path / "spool"), "--stats-json", str(stats), "--rejects", str(tmp_path / "rejects")]
    done = run(args, env=child_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    figures = json.loads(stats.read_text())
    lines, ids, rejected, blank = expected_of(data)
    assert figures["lines_read"] == figures["acks_stored"] + figures["lines_rejected"] + figures["blank_lines"]
    assert figures["lines_read"] == lines
    assert (figures["acks_stored"], figures["lines_rejected"], figures["blank_lines"]) == (len(ids), rejected, blank)
    assert figures["acks_not_stored"] == 0
    ledger = Ledger()
    ledger.observe(local_objects(tmp_path / "out"))
    assert sorted(ledger.ids.elements()) == sorted(ids), "exactly the valid lines, each once"
    assert (tmp_path / "rejects").read_bytes().count(b"\n") == rejected
    print(f"\nseed {seed}: {lines} lines, {len(ids)} stored, {rejected} rejected, {blank} blank")


def test_cli_fuzz_random_bytes(tmp_path: Path) -> None:
    """Pure noise: nothing stored, every line rejected or blank, and no crash."""
    rng = random.Random(7)
    data = bytes(rng.randrange(256) for _ in range(200_000))
    source = tmp_path / "noise.bin"
    source.write_bytes(data)
    stats = tmp_path / "stats.json"
    done = run(
        ["-i", str(source), "-o", str(tmp_path / "out"), "--max-line-bytes", "1000", "--quiet",
         "--spool-dir", str(tmp_path / "spool"), "--stats-json", str(stats)],
        env=child_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(stats.read_text())
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    assert figures["lines_read"] == lines == figures["lines_rejected"] + figures["blank_lines"]
    assert figures["acks_stored"] == 0


_VALID = b'{"id":"edge","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}'


@pytest.mark.parametrize(
    "data",
    [
        b"",
        _VALID,  # the only line, without a newline
        _VALID + b"\n" + b"y" * (3 * MAX_LINE),  # an over-long last line without a newline
        b"y" * (3 * MAX_LINE) + b"\n" + _VALID + b"\n",  # an over-long first line
        b"\n\n \n\t\n",
        b"\x00" * 100,
        _VALID + b"\r\n" + _VALID[:-1] + b"\x00}\n" + b"\xff" + _VALID + b"\n",
    ],
    ids=["empty", "no-newline", "overlong-last", "overlong-first", "blanks", "nuls", "crlf-nul-utf8"],
)
def test_cli_edge_inputs(tmp_path: Path, data: bytes) -> None:
    source = tmp_path / "edge.jsonl"
    source.write_bytes(data)
    stats = tmp_path / "stats.json"
    done = run(
        ["-i", str(source), "-o", str(tmp_path / "out"), "--max-line-bytes", str(MAX_LINE),
         "--spool-dir", str(tmp_path / "spool"), "--stats-json", str(stats)],
        env=child_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(stats.read_text())
    lines, ids, rejected, blank = expected_of(data)
    assert (figures["lines_read"], figures["acks_stored"], figures["lines_rejected"], figures["blank_lines"]) == (
        lines, len(ids), rejected, blank,
    )  # fmt: skip
    ledger = Ledger()
    ledger.observe(local_objects(tmp_path / "out"))
    assert sorted(ledger.ids.elements()) == sorted(ids)
