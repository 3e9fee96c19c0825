"""Ed25519 signatures of ACKs.

An ACK is signed by the key in its ``pubkey`` field. The signed message is the
UTF-8 bytes of exactly ``{"id":"<id>","timestamp":"<timestamp>"}`` (no spaces,
those two fields in that order, their values inserted as they are);
``signature`` is the base58 (Bitcoin alphabet) of the 64-byte signature and
``pubkey`` the base58 of the 32-byte public key.

Verification uses ``cryptography`` (OpenSSL). Producers sign with a small pool
of keys, so public key objects are kept in a bounded LRU cache keyed by the
``pubkey`` string. Base58 is decoded here rather than with the ``base58``
package: a table translation and one integer loop is about three times faster,
and decoding is the second largest cost after the curve arithmetic.

Everything here is synchronous and CPU-bound: callers run it on a worker
thread or in a process pool (:func:`verify_lines` is picklable by name).
OpenSSL's verification releases the global lock, so :meth:`SignatureVerifier.check_block`
spreads a block over one thread per CPU (measured here: 16k verifications/s
on one thread, 31k/s on two).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import msgspec

try:  # pragma: no branch - which arm runs depends on the environment
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
except ImportError:  # pragma: no cover - exercised only without the extra
    InvalidSignature = None  # type: ignore[assignment,misc]
    Ed25519PublicKey = None  # type: ignore[assignment,misc]

__all__ = [
    "DEFAULT_KEY_CACHE_SIZE",
    "SignatureVerifier",
    "b58decode",
    "signed_message",
    "verify_lines",
]

DEFAULT_KEY_CACHE_SIZE = 4096
SIGNATURE_BYTES = 64
PUBKEY_BYTES = 32
_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_DIGITS = bytes.maketrans(_ALPHABET, bytes(range(58)))
_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]*")
_MAX_BASE58_CHARS = 256  # far above the 88 of a signature; bounds the work per field
_MIN_LINES_PER_THREAD = 64  # below this a thread hand-off costs more than it saves


class _SignedFields(msgspec.Struct):
    id: str
    timestamp: str
    signature: str
    pubkey: str


_decoder = msgspec.json.Decoder(_SignedFields)


def signed_message(ack_id: str, timestamp: str) -> bytes:
    """The exact bytes an ACK's signature covers."""
    return f'{{"id":"{ack_id}","timestamp":"{timestamp}"}}'.encode()


def b58decode(text: str) -> bytes:
    """Decode base58 (Bitcoin alphabet); ``ValueError`` on any other character."""
    if len(text) > _MAX_BASE58_CHARS:
        raise ValueError(f"base58 text is {len(text)} characters, over the limit of {_MAX_BASE58_CHARS}")
    if not _BASE58.fullmatch(text):
        bad = next(char for char in text if not _BASE58.fullmatch(char))
        raise ValueError(f"{bad!r} is not a base58 character")
    digits = text.encode("ascii").translate(_DIGITS)
    number = 0
    for digit in digits:
        number = number * 58 + digit
    zeros = len(digits) - len(digits.lstrip(b"\x00"))  # each leading '1' is a zero byte
    return b"\x00" * zeros + (number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b"")


class SignatureVerifier:
    """Checks ACK signatures; holds the LRU cache of public keys (one per thread or process)."""

    def __init__(self, key_cache_size: int = DEFAULT_KEY_CACHE_SIZE) -> None:
        if Ed25519PublicKey is None:  # pragma: no cover - exercised only without the extra
            raise RuntimeError("signature checks need the 'cryptography' package: pip install 'poh-batcher[verify]'")
        if key_cache_size < 1:
            raise ValueError(f"key_cache_size must be at least 1, got {key_cache_size}")
        self.public_key = lru_cache(maxsize=key_cache_size)(_load_public_key)
        """The key object of a base58 ``pubkey`` (cached); ``ValueError`` says why it is not one."""
        self.threads = max(1, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    def verify(self, ack_id: str, timestamp: str, signature: str, pubkey: str) -> str | None:
        """None when ``signature`` is ``pubkey``'s signature of the ACK, else the reason it is not."""
        try:
            key = self.public_key(pubkey)
        except ValueError as exc:
            return f"bad pubkey: {exc}"
        try:
            raw_signature = b58decode(signature)
        except ValueError as exc:
            return f"bad signature: {exc}"
        if len(raw_signature) != SIGNATURE_BYTES:
            return f"bad signature: {len(raw_signature)} bytes, expected {SIGNATURE_BYTES}"
        try:
            key.verify(raw_signature, signed_message(ack_id, timestamp))
        except InvalidSignature:
            return "signature does not verify (forged, or id/timestamp altered)"
        return None

    def verify_line(self, line: bytes) -> str | None:
        """Like :meth:`verify`, for one ACK as a JSON object."""
        try:
            fields = _decoder.decode(line)
        except msgspec.DecodeError as exc:
            return f"cannot check signature: {exc}"
        return self.verify(fields.id, fields.timestamp, fields.signature, fields.pubkey)

    __call__ = verify_line  # an AckCheck of the writer (``--verify-signatures``)

    def check_block(self, lines: list[bytes]) -> list[str | None]:
        """:meth:`verify_line` of each line, in order, on up to one thread per CPU."""
        slices = min(self.threads, len(lines) // _MIN_LINES_PER_THREAD)
        if slices <= 1:
            return self._verify_all(lines)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="poh-verify")
        size = -(-len(lines) // slices)
        parts = [lines[start : start + size] for start in range(0, len(lines), size)]
        others = [self._pool.submit(self._verify_all, part) for part in parts[1:]]
        reasons = self._verify_all(parts[0])  # the calling thread takes the first part itself
        for other in others:
            reasons += other.result()
        return reasons

    def _verify_all(self, lines: list[bytes]) -> list[str | None]:
        return [self.verify_line(line) for line in lines]

    def failures(self, lines: Iterable[bytes]) -> list[tuple[int, str]]:
        """``(index, reason)`` of every line in ``lines`` whose signature does not verify."""
        failed: list[tuple[int, str]] = []
        for index, line in enumerate(lines):
            reason = self.verify_line(line)
            if reason is not None:
                failed.append((index, reason))
        return failed


def verify_lines(lines: Sequence[bytes], key_cache_size: int = DEFAULT_KEY_CACHE_SIZE) -> list[tuple[int, str]]:
    """``(index, reason)`` of each ACK line whose signature fails; for a process pool."""
    return SignatureVerifier(key_cache_size).failures(lines)


def _load_public_key(pubkey: str) -> Ed25519PublicKey:
    raw = b58decode(pubkey)
    if len(raw) != PUBKEY_BYTES:
        raise ValueError(f"{len(raw)} bytes, expected {PUBKEY_BYTES}")
    return Ed25519PublicKey.from_public_bytes(raw)
