"""Validating ACK lines in bulk, keeping their bytes.

The archive stores each ACK exactly as received, minified. Most producers
already send minified JSON with the four fields in the usual order, so the
fast path decodes a whole block with msgspec (validating every field in C),
re-encodes it and compares bytes: if they match, every line is valid and
already canonical, and the input bytes are kept without building any Python
object per line. Any block that does not match falls back to a per-line check
that finds the bad lines, their reasons, and minifies lines that need it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Protocol, runtime_checkable

import msgspec

from .errors import InvalidAckError

DEFAULT_MAX_LINE_BYTES = 1 << 20
AckCheck = Callable[[bytes], "str | None"]
"""An extra check of a valid ACK line (signature, age, duplicate): a reject reason, or None.

A check that also has a ``check_block(lines) -> list[str | None]`` method is
given the block's remaining ACKs at once instead (see :class:`BlockCheck`).
"""


@runtime_checkable
class BlockCheck(Protocol):
    """An :data:`AckCheck` that checks many lines in one call, for example on several threads.

    It must be pure (no state carried from line to line), so that checking a
    whole block before the next check gives what checking line by line would.
    """

    def __call__(self, line: bytes) -> str | None: ...

    def check_block(self, lines: list[bytes]) -> list[str | None]: ...

REQUIRED_FIELDS = ("id", "timestamp", "signature", "pubkey")

_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
_Rfc3339 = Annotated[datetime, msgspec.Meta(tz=True)]


class _AckShape(msgspec.Struct, gc=False):  # str and datetime fields: no cycles, skip GC tracking
    """The validation schema; unknown fields are allowed (and kept from the raw line)."""

    id: _NonEmpty
    timestamp: _Rfc3339
    signature: _NonEmpty
    pubkey: _NonEmpty


_decoder = msgspec.json.Decoder(_AckShape)
_generic_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_BOM = b"\xef\xbb\xbf"
_WHITESPACE = re.compile(rb"[ \t\r\n]")
_STRING_OR_SPACE = re.compile(rb'("(?:[^"\\]|\\.)*")|[ \t\r\n]+', re.DOTALL)


@dataclass(slots=True)
class Reject:
    """An invalid input line: where, why, and its bytes (kept for the rejects file)."""

    line: int
    reason: str
    raw: bytes


@dataclass(slots=True)
class ValidatedBlock:
    """The outcome of validating consecutive lines."""

    acks: list[bytes] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    blank: int = 0


class LineValidator:
    """Validates ACK lines and returns their minified bytes."""

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, checks: Sequence[AckCheck] = ()) -> None:
        if max_line_bytes < 2:
            raise ValueError("max_line_bytes must be at least 2")
        self.max_line_bytes = max_line_bytes
        self.checks = tuple(checks)

    def validate_block(self, lines: list[bytes], first_line: int = 1, *, source: bytes | None = None) -> ValidatedBlock:
        """Validate ``lines`` (without their newlines), numbered from ``first_line``.

        ``source``, when the caller has it, is the input ``lines`` were split
        from: it starts with each of them followed by a newline (anything after
        is ignored). Validating it in place spares joining the lines again.
        """
        if not lines:
            return ValidatedBlock()
        block = self._validate_shape(lines, first_line, source)
        if self.checks:
            block = self._apply_checks(block, lines, first_line)
        return block

    def _validate_shape(self, lines: list[bytes], first_line: int, source: bytes | None = None) -> ValidatedBlock:
        if max(map(len, lines)) <= self.max_line_bytes:
            if source is None:
                source = b"\n".join(lines) + b"\n"
            size = sum(map(len, lines)) + len(lines)
            try:
                shapes = _decoder.decode_lines(memoryview(source)[:size])
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):  # msgspec: bad UTF-8 in a string
                pass
            else:
                encoded = _encoder.encode_lines(shapes)
                if len(shapes) == len(lines) and len(encoded) == size and source.startswith(encoded):
                    return ValidatedBlock(acks=lines)
        return self._validate_each(lines, first_line)

    def _apply_checks(self, block: ValidatedBlock, lines: list[bytes], first_line: int) -> ValidatedBlock:
        """Run the extra checks over the valid ACKs, keeping rejects in line order."""
        if block.acks is lines:  # fast path: every line is an ACK, numbered in order
            numbered = list(enumerate(lines, first_line))
        else:
            rejected = {reject.line for reject in block.rejects}
            numbers = (
                number
                for number, line in enumerate(lines, first_line)
                if number not in rejected and line.strip()
            )
            numbered = list(zip(numbers, block.acks, strict=True))
        checked = ValidatedBlock(rejects=list(block.rejects), blank=block.blank)
        # Check by check over the block, each seeing only what passed the ones before it:
        # the same outcome as line by line, and a block check gets every line at once.
        for check in self.checks:
            acks = [ack for _, ack in numbered]
            reasons = check.check_block(acks) if isinstance(check, BlockCheck) else [check(ack) for ack in acks]
            passed: list[tuple[int, bytes]] = []
            for (number, ack), reason in zip(numbered, reasons, strict=True):
                if reason is None:
                    passed.append((number, ack))
                else:
                    checked.rejects.append(Reject(number, reason, lines[number - first_line]))
            numbered = passed
        checked.acks = [ack for _, ack in numbered]
        checked.rejects.sort(key=lambda reject: reject.line)
        return checked

    def _validate_each(self, lines: list[bytes], first_line: int) -> ValidatedBlock:
        block = ValidatedBlock()
        for number, line in enumerate(lines, first_line):
            if not line.strip():
                block.blank += 1
                continue
            try:
                block.acks.append(self.validate_line(line))
            except InvalidAckError as exc:
                # An over-long line keeps only its first max_line_bytes, as when it spans reads.
                block.rejects.append(Reject(number, exc.reason, line[: self.max_line_bytes]))
        return block

    def validate_line(self, line: bytes) -> bytes:
        """The minified bytes of one valid ACK line; ``InvalidAckError`` says why not."""
        if len(line) > self.max_line_bytes:
            raise InvalidAckError(
                f"line is {len(line)} bytes, over the limit of {self.max_line_bytes} (--max-line-bytes)"
            )
        try:
            if _encoder.encode(_decoder.decode(line)) == line:
                return line  # the common case: canonical, no extra fields
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):  # msgspec: bad UTF-8 in a string
            pass  # find the precise reason below
        return _validate_slowly(line)


def _validate_slowly(line: bytes) -> bytes:
    """Full validation with a precise reason; returns the minified line."""
    if line.startswith(_BOM):
        raise InvalidAckError("starts with a UTF-8 byte order mark (BOM); JSON Lines must not have one")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidAckError(f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start})") from None
    try:
        value = _generic_decoder.decode(line)
    except RecursionError:
        raise InvalidAckError("JSON nested too deeply") from None
    except msgspec.DecodeError as exc:
        raise InvalidAckError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidAckError(f"not a JSON object (got {_json_type(value)})")
    duplicate = _first_duplicate_key(text)
    if duplicate is not None:
        raise InvalidAckError(f"duplicate field {duplicate!r}")
    for name in REQUIRED_FIELDS:
        if name not in value:
            raise InvalidAckError(f"missing field {name!r}")
        if not isinstance(value[name], str):
            raise InvalidAckError(f"field {name!r} must be a string, got {_json_type(value[name])}")
        if not value[name]:
            raise InvalidAckError(f"field {name!r} is empty")
    try:
        msgspec.convert(value["timestamp"], _Rfc3339)
    except msgspec.ValidationError:
        raise InvalidAckError(
            f"field 'timestamp' is not an RFC 3339 time with 'Z' or an offset: {value['timestamp']!r}"
        ) from None
    return minify(line)


def minify(line: bytes) -> bytes:
    """Remove insignificant whitespace from valid JSON, keeping strings byte for byte."""
    if not _WHITESPACE.search(line):
        return line
    return _STRING_OR_SPACE.sub(lambda m: m.group(1) or b"", line)


def _first_duplicate_key(text: str) -> str | None:
    """The first field name that appears twice in one object, at any depth."""
    found: list[str] = []

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen and not found:
                found.append(name)
            seen.add(name)
        return dict(pairs)

    try:
        json.loads(text, object_pairs_hook=check)
    except RecursionError:
        raise InvalidAckError("JSON nested too deeply") from None
    return found[0] if found else None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"
