"""Ed25519 verification of ACKs, base58, and the ingest checks built on them."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import base58
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from poh_batcher.ingest_checks import build_checks, dedupe_check, signature_check, ttl_check
from poh_batcher.parsing import LineValidator
from poh_batcher.signatures import SignatureVerifier, b58decode, signed_message, verify_lines

DATA = Path(__file__).parent / "data" / "acks_10k.jsonl"


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def monotonic(self) -> float:
        return 0.0

    def utcnow(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - not used
        pass


def sign(key: Ed25519PrivateKey, ack_id: str, timestamp: str, **extra: str) -> bytes:
    pubkey = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signature = key.sign(f'{{"id":"{ack_id}","timestamp":"{timestamp}"}}'.encode())
    ack = {
        "id": ack_id,
        "timestamp": timestamp,
        "signature": base58.b58encode(signature).decode(),
        "pubkey": base58.b58encode(pubkey).decode(),
        **extra,
    }
    return json.dumps(ack, separators=(",", ":")).encode()


@pytest.fixture(scope="module")
def real_lines() -> list[bytes]:
    return DATA.read_bytes().splitlines()[:300]


def test_signed_message_is_exact() -> None:
    assert signed_message("tx-1", "2025-01-01T00:00:00Z") == b'{"id":"tx-1","timestamp":"2025-01-01T00:00:00Z"}'


@given(st.binary(max_size=80))
def test_b58decode_matches_the_base58_package(data: bytes) -> None:
    assert b58decode(base58.b58encode(data).decode()) == data


@pytest.mark.parametrize("text", ["0abc", "OIl", "abc def", "é"])
def test_b58decode_rejects_other_characters(text: str) -> None:
    with pytest.raises(ValueError, match="base58"):
        b58decode(text)


def test_b58decode_bounds_its_input() -> None:
    with pytest.raises(ValueError, match="over the limit"):
        b58decode("2" * 10_000)


def test_real_acks_verify(real_lines: list[bytes]) -> None:
    verifier = SignatureVerifier()
    assert all(verifier.verify_line(line) is None for line in real_lines)
    assert verify_lines(real_lines) == []


def test_generated_signature_verifies_and_extra_fields_do_not_matter() -> None:
    key = Ed25519PrivateKey.generate()
    assert SignatureVerifier().verify_line(sign(key, "a", "2025-01-01T00:00:00Z", slot="9")) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": "tx-other"}, "does not verify"),
        ({"timestamp": "2025-01-01T00:00:00.000009Z"}, "does not verify"),
        ({"signature": "1" * 64}, "does not verify"),  # 64 zero bytes
        ({"signature": "abc"}, "bad signature: 3 bytes, expected 64"),
        ({"signature": "0OIl"}, "bad signature: '0' is not a base58 character"),
        ({"pubkey": "abc"}, "bad pubkey: 3 bytes, expected 32"),
        ({"pubkey": "HW9o7Pqr844sYJhzvy22PG8kz1PqMYMKZNPBqjW74hgz"}, "does not verify"),
    ],
)
def test_forgeries_are_named(real_lines: list[bytes], change: dict[str, str], reason: str) -> None:
    ack = json.loads(real_lines[0])
    ack.update(change)
    failure = SignatureVerifier().verify_line(json.dumps(ack).encode())
    assert failure is not None
    assert reason in failure


def test_verify_lines_gives_indexes_of_failures(real_lines: list[bytes]) -> None:
    lines = list(real_lines[:10])
    for index in (2, 7):
        ack = json.loads(lines[index])
        ack["id"] += "x"
        lines[index] = json.dumps(ack).encode()
    assert [index for index, _ in verify_lines(lines)] == [2, 7]


def test_public_keys_are_cached_and_bounded(real_lines: list[bytes]) -> None:
    verifier = SignatureVerifier(key_cache_size=4)
    for line in real_lines[:50]:
        assert verifier.verify_line(line) is None
    info = verifier.public_key.cache_info()
    assert info.maxsize == 4
    assert info.currsize == 4
    verifier.verify_line(real_lines[49])
    assert verifier.public_key.cache_info().hits == info.hits + 1


def test_signature_check_is_an_ack_check(real_lines: list[bytes]) -> None:
    check = signature_check()
    assert check(real_lines[0]) is None
    ack = json.loads(real_lines[0])
    ack["id"] = "tx-forged"
    assert "does not verify" in (check(json.dumps(ack).encode()) or "")


def test_ttl_check_uses_the_injected_clock() -> None:
    clock = FixedClock(datetime(2025, 1, 1, 1, 0, tzinfo=UTC))
    check = ttl_check(60, clock)
    assert check(b'{"id":"a","timestamp":"2025-01-01T00:59:30Z","signature":"s","pubkey":"p"}') is None
    assert check(b'{"id":"a","timestamp":"2025-01-01T02:00:00+01:00","signature":"s","pubkey":"p"}') is None
    old = check(b'{"id":"a","timestamp":"2025-01-01T00:58:00Z","signature":"s","pubkey":"p"}')
    assert old is not None
    assert "too old" in old
    assert "--ttl 60" in old
    clock.now -= timedelta(minutes=30)
    assert check(b'{"id":"a","timestamp":"2025-01-01T00:58:00Z","signature":"s","pubkey":"p"}') is None  # future
    with pytest.raises(ValueError, match="ttl"):
        ttl_check(0)


def test_dedupe_window_is_bounded() -> None:
    check = dedupe_check(window=3)

    def line(ack_id: str) -> bytes:
        return f'{{"id":"{ack_id}","timestamp":"2025-01-01T00:00:00Z","signature":"s","pubkey":"p"}}'.encode()

    assert [check(line(i)) for i in "abc"] == [None, None, None]
    duplicate = check(line("a"))
    assert duplicate is not None
    assert duplicate.startswith("duplicate id 'a'")
    assert "(--dedupe)" in duplicate
    assert check(line("d")) is None  # "a" leaves the window
    assert check(line("a")) is None
    assert check(line("c")) is not None
    with pytest.raises(ValueError, match="window"):
        dedupe_check(0)


def test_build_checks_order_keeps_forgeries_out_of_the_dedupe_window(real_lines: list[bytes]) -> None:
    assert build_checks() == []
    checks = build_checks(verify_signatures=True, dedupe_window=10)
    genuine = real_lines[0]
    forged = json.loads(genuine)
    forged["timestamp"] = "2025-01-01T00:00:00.000001Z"

    def first_reason(line: bytes) -> str | None:
        return next((r for r in (check(line) for check in checks) if r is not None), None)

    assert "does not verify" in (first_reason(json.dumps(forged, separators=(",", ":")).encode()) or "")
    assert first_reason(genuine) is None  # the forged copy did not take its id
    assert (first_reason(genuine) or "").startswith("duplicate id")
    assert len(build_checks(dedupe=True)) == 1


def _forged(line: bytes) -> bytes:
    """The same id, another timestamp, the old signature."""
    ack = json.loads(line)
    ack["timestamp"] = ack["timestamp"].replace("2025", "2024", 1)
    return json.dumps(ack, separators=(",", ":")).encode()


@pytest.fixture(scope="module")
def many_lines() -> list[bytes]:
    return DATA.read_bytes().splitlines()[:1000]


def test_check_block_spreads_a_block_over_threads_and_keeps_line_order(
    many_lines: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [_forged(line) if index % 7 == 3 else line for index, line in enumerate(many_lines)]
    verifier = SignatureVerifier()
    verifier.threads = 4  # whatever this machine has: four slices, three on pool threads
    threads: set[str] = set()
    verify_line = verifier.verify_line

    def noting_thread(line: bytes) -> str | None:
        threads.add(threading.current_thread().name)
        return verify_line(line)

    monkeypatch.setattr(verifier, "verify_line", noting_thread)
    reasons = verifier.check_block(lines)
    assert reasons == [SignatureVerifier().verify_line(line) for line in lines]
    assert [index for index, reason in enumerate(reasons) if reason] == [i for i in range(1000) if i % 7 == 3]
    assert len(threads) == 4
    assert sum(name.startswith("poh-verify") for name in threads) == 3
    assert verifier.check_block(lines[:10]) == reasons[:10]  # a small block stays on the calling thread


def test_validator_applies_block_and_line_checks_as_line_by_line_would(many_lines: list[bytes]) -> None:
    """Forged copies and duplicates spread over a block that the signature check splits."""
    genuine = many_lines[:600]
    lines: list[bytes] = []
    for index, line in enumerate(genuine):
        if index % 50 == 10:
            lines.append(_forged(line))  # a forged copy first: must not take the id
        lines.append(line)
        if index % 40 == 20:
            lines.append(line)  # a replay: dropped as a duplicate
    validator = LineValidator(checks=build_checks(verify_signatures=True, dedupe=True))
    block = validator.validate_block(lines, first_line=1)

    line_checks = build_checks(verify_signatures=True, dedupe=True)
    expected: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        reason = next((r for r in (check(line) for check in line_checks) if r is not None), None)
        if reason is not None:
            expected.append((number, reason))
    assert [(reject.line, reject.reason) for reject in block.rejects] == expected
    assert block.acks == genuine
    assert sum("does not verify" in reason for _, reason in expected) == 12
    assert sum(reason.startswith("duplicate id") for _, reason in expected) == 15
