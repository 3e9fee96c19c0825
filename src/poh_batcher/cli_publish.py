"""``poh-batcher publish FILE --to nats://HOST:PORT --subject acks.x``: load JSON Lines into JetStream.

Each non-blank line becomes one message, published as it is (invalid lines
too: the batchers reject them, which is what a test of rejects needs). The
stream is created when missing (work-queue retention, file storage). Every
message is confirmed by the stream (its publish acknowledgement); up to
``--window`` wait for theirs at once, so the publisher runs at the server's
pace instead of one round trip per message. The throughput goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import msgspec

from .errors import ConfigurationError
from .logs import setup_logging
from .sources.nats import DEFAULT_STREAM, ensure_stream, is_nats_url

if TYPE_CHECKING:
    from nats.aio.msg import Msg

EXIT_OK = 0
EXIT_NOT_ALL_STORED = 1
EXIT_USAGE = 2
DEFAULT_URL = "nats://127.0.0.1:4222"
_BLOCK = 1 << 20
_MAX_ERRORS_SHOWN = 5


class _IdOnly(msgspec.Struct):
    id: str


_id_decoder = msgspec.json.Decoder(_IdOnly)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poh-batcher publish",
        description="Publish a JSON Lines file (one ACK per line) to a NATS JetStream stream, one message per line.",
        epilog="Example: poh-batcher publish acks.jsonl --to nats://127.0.0.1:4222 --subject acks.node1",
    )
    parser.add_argument("file", metavar="FILE", help="JSON Lines file, or - for stdin")
    parser.add_argument("--to", default=DEFAULT_URL, help=f"NATS server URL (default {DEFAULT_URL})")
    parser.add_argument("--subject", required=True, help="subject to publish on, e.g. acks.node1")
    parser.add_argument(
        "--stream",
        default=DEFAULT_STREAM,
        help=f"stream that must store the messages (default {DEFAULT_STREAM}); created if missing, "
        "on the subject's first token (acks.> for acks.node1), work-queue retention",
    )
    parser.add_argument(
        "--window", type=int, default=4096, help="messages awaiting their stream acknowledgement at once (default 4096)"
    )
    parser.add_argument(
        "--msg-id",
        action="store_true",
        help="send each ACK's id as Nats-Msg-Id: JetStream drops a re-published ACK within its duplicate window",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for missing acknowledgements at the end (default 10)",
    )
    return parser


@dataclass(slots=True)
class PublishResult:
    """What was sent and what the stream confirmed."""

    sent: int = 0
    bytes_sent: int = 0
    stored: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def unconfirmed(self) -> int:
        return self.sent - self.stored - self.duplicates - len(self.errors)

    def render(self, stream: str, subject: str) -> str:
        rate = self.sent / self.elapsed if self.elapsed > 0 else 0.0
        mib = self.bytes_sent / (1 << 20)
        text = (
            f"poh-batcher publish: {self.sent:,} messages ({mib:.1f} MiB) to stream {stream} on {subject} "
            f"in {self.elapsed:.2f} s: {rate:,.0f} msgs/s, {mib / self.elapsed if self.elapsed > 0 else 0:.1f} MiB/s; "
            f"{self.stored:,} stored"
        )
        if self.duplicates:
            text += f", {self.duplicates:,} dropped as duplicates (Nats-Msg-Id)"
        if self.errors:
            text += f", {len(self.errors):,} refused"
        if self.unconfirmed:
            text += f", {self.unconfirmed:,} not confirmed"
        return text


def publish_main(argv: list[str]) -> int:
    """Entry point of ``poh-batcher publish``; returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging()
    if not is_nats_url(args.to):
        print(f"poh-batcher publish: error: --to {args.to!r} is not a NATS URL (nats://HOST:PORT)", file=sys.stderr)
        return EXIT_USAGE
    if args.window < 1:
        print("poh-batcher publish: error: --window must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.file == "-":
            result = asyncio.run(publish_stream(sys.stdin.buffer, args))
        else:
            with open(args.file, "rb") as stream:
                result = asyncio.run(publish_stream(stream, args))
    except (ConfigurationError, OSError) as exc:
        print(f"poh-batcher publish: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(result.render(args.stream, args.subject), file=sys.stderr)
    for error in result.errors[:_MAX_ERRORS_SHOWN]:
        print(f"poh-batcher publish: {error}", file=sys.stderr)
    if len(result.errors) > _MAX_ERRORS_SHOWN:
        print(f"poh-batcher publish: … and {len(result.errors) - _MAX_ERRORS_SHOWN} more refused", file=sys.stderr)
    return EXIT_OK if not result.errors and not result.unconfirmed else EXIT_NOT_ALL_STORED


async def publish_stream(stream: BinaryIO, args: argparse.Namespace) -> PublishResult:
    """Publish every non-blank line of ``stream``; ``args`` as parsed by :func:`build_parser`."""
    try:
        import nats
    except ImportError:
        raise ConfigurationError("publishing to NATS needs nats-py: pip install 'poh-batcher[nats]'") from None
    try:
        nc = await nats.connect(args.to, name="poh-batcher publish", connect_timeout=5, max_reconnect_attempts=3)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise ConfigurationError(f"cannot connect to NATS at {args.to}: {exc or type(exc).__name__}") from exc
    result = PublishResult()
    outstanding = 0
    room = asyncio.Event()
    settled = asyncio.Event()
    low_water = max(1, args.window // 2)

    async def on_reply(msg: Msg) -> None:
        nonlocal outstanding
        outstanding -= 1
        line = msg.subject.rpartition(".")[2]
        status = (msg.headers or {}).get("Status")
        if status == "503":
            result.errors.append(f"line {line}: no stream listens on subject {args.subject!r}")
        else:
            try:
                answer = json.loads(msg.data)
            except ValueError:
                answer = {"error": {"description": f"unreadable answer {msg.data[:80]!r}"}}
            if "error" in answer:
                result.errors.append(f"line {line}: refused by JetStream: {answer['error'].get('description')}")
            elif answer.get("stream") != args.stream:
                result.errors.append(f"line {line}: stored in stream {answer.get('stream')!r}, not {args.stream!r}")
            elif answer.get("duplicate"):
                result.duplicates += 1
            else:
                result.stored += 1
        if outstanding <= low_water:
            room.set()
        if outstanding == 0:
            settled.set()

    try:
        await ensure_stream(nc.jetstream(), args.stream, stream_subjects(args.subject))
        inbox = nc.new_inbox()
        await nc.subscribe(f"{inbox}.*", cb=on_reply)
        started = time.perf_counter()
        for number, line in _numbered_lines(stream):
            if outstanding >= args.window:
                room.clear()
                await room.wait()
            headers = _msg_id(line) if args.msg_id else None
            outstanding += 1
            settled.clear()
            await nc.publish(args.subject, line, reply=f"{inbox}.{number}", headers=headers)
            result.sent += 1
            result.bytes_sent += len(line)
        await nc.flush()
        if outstanding:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), args.timeout)
        result.elapsed = time.perf_counter() - started
    finally:
        await nc.close()
    return result


def stream_subjects(subject: str) -> str:
    """What a stream created for ``subject`` listens on: ``acks.>`` for ``acks.node1``.

    Every node publishes on its own subject under one first token, and the
    batchers consume ``acks.>``: a stream on the publisher's exact subject
    would leave the other nodes (and that filter) out.
    """
    head, dot, _ = subject.partition(".")
    return f"{head}.>" if dot else subject


def _numbered_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines without their newline, numbered from 1 (blank lines count)."""
    number = 0
    carry = b""
    while True:
        block = stream.read(_BLOCK)
        if not block:
            break
        lines = (carry + block).split(b"\n")
        carry = lines.pop()
        for line in lines:
            number += 1
            line = line.rstrip(b"\r")
            if line.strip():
                yield number, line
    if carry.strip():
        yield number + 1, carry.rstrip(b"\r")


def _msg_id(line: bytes) -> dict[str, str] | None:
    try:
        return {"Nats-Msg-Id": _id_decoder.decode(line).id}
    except msgspec.DecodeError:
        return None
