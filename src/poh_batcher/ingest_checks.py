"""Extra checks of valid ACK lines at ingest: signature, age, duplicate id.

Each factory returns an :data:`~poh_batcher.parsing.AckCheck`: a callable that
takes one valid, minified ACK line and returns a reject reason, or None to
keep it. The :class:`~poh_batcher.parsing.LineValidator` runs them on the
input thread (never on the event loop), in order, stopping at the first reason
(the signature check spreads each block over one thread per CPU);
:func:`build_checks` returns them in the order that keeps the duplicate window
honest: an ACK is remembered as seen only once every other check passed, so a
forged copy can never shadow the genuine ACK that follows it.

Reasons of duplicate drops start with :data:`DUPLICATE_REASON`, so a summary
can count them apart from invalid lines.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import datetime

import msgspec

from .clock import Clock, SystemClock
from .parsing import AckCheck

__all__ = [
    "DEFAULT_DEDUPE_WINDOW",
    "DUPLICATE_REASON",
    "build_checks",
    "dedupe_check",
    "signature_check",
    "ttl_check",
]

DEFAULT_DEDUPE_WINDOW = 100_000
DEFAULT_KEY_CACHE_SIZE = 4096
DUPLICATE_REASON = "duplicate id"


class _Id(msgspec.Struct):
    id: str


class _Timestamp(msgspec.Struct):
    timestamp: datetime


_id_decoder = msgspec.json.Decoder(_Id)
_timestamp_decoder = msgspec.json.Decoder(_Timestamp)


def signature_check(key_cache_size: int = DEFAULT_KEY_CACHE_SIZE) -> AckCheck:
    """Reject ACKs whose Ed25519 signature does not verify (``--verify-signatures``)."""
    from .signatures import SignatureVerifier  # imports cryptography: only when asked for

    return SignatureVerifier(key_cache_size)  # also a BlockCheck: verifies a block on every CPU


def ttl_check(ttl_seconds: float, clock: Clock | None = None) -> AckCheck:
    """Reject ACKs whose timestamp is more than ``ttl_seconds`` before now (``--ttl``).

    ACKs stamped in the future are kept: clocks differ, and age is what the
    option bounds.
    """
    if not ttl_seconds > 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl_seconds}")
    now: Callable[[], datetime] = (clock or SystemClock()).utcnow

    def check(line: bytes) -> str | None:
        try:
            stamped = _timestamp_decoder.decode(line).timestamp
        except msgspec.DecodeError as exc:  # pragma: no cover - the line was validated first
            return f"cannot check age: {exc}"
        age = (now() - stamped).total_seconds()
        if age > ttl_seconds:
            return f"too old: timestamp is {age:,.0f} s ago, over --ttl {ttl_seconds:g} s"
        return None

    return check


def dedupe_check(window: int = DEFAULT_DEDUPE_WINDOW) -> AckCheck:
    """Reject an ACK whose id is among the last ``window`` ids kept (``--dedupe``).

    Memory is bounded by ``window`` ids. Each check keeps its own window: make
    one per run. It must be the last check, because it records an id as seen.
    """
    if window < 1:
        raise ValueError(f"dedupe window must be at least 1, got {window}")
    recent: deque[str] = deque()
    seen: set[str] = set()

    def check(line: bytes) -> str | None:
        try:
            ack_id = _id_decoder.decode(line).id
        except msgspec.DecodeError as exc:  # pragma: no cover - the line was validated first
            return f"cannot check for duplicates: {exc}"
        if ack_id in seen:
            return f"{DUPLICATE_REASON} {ack_id!r} within the last {window:,} ACKs (--dedupe)"
        if len(recent) >= window:
            seen.discard(recent.popleft())
        recent.append(ack_id)
        seen.add(ack_id)
        return None

    return check


def build_checks(
    *,
    verify_signatures: bool = False,
    ttl_seconds: float | None = None,
    dedupe: bool = False,
    dedupe_window: int | None = None,
    clock: Clock | None = None,
) -> list[AckCheck]:
    """The checks the writer's options ask for, cheapest first, the duplicate window last.

    A ``dedupe_window`` turns on ``dedupe`` (``--dedupe-window N`` implies ``--dedupe``).
    """
    checks: list[AckCheck] = []
    if ttl_seconds is not None:
        checks.append(ttl_check(ttl_seconds, clock))
    if verify_signatures:
        checks.append(signature_check())
    if dedupe or dedupe_window is not None:
        checks.append(dedupe_check(dedupe_window or DEFAULT_DEDUPE_WINDOW))
    return checks
