"""ACKs from a NATS JetStream stream: one durable pull consumer shared by every batcher.

Every batcher process, on any host, pulls from the same durable consumer, so
JetStream hands each message to exactly one of them (a work queue). A message
is acknowledged to JetStream only when the batch holding it is durably stored
(:attr:`Chunk.on_stored`); a batcher that dies leaves its unacknowledged
messages to be redelivered to the others once the consumer's ack wait expires.

Pulling follows the batch size: one pull request asks for ``fetch_size``
messages (the batch size), and the next one is sent only when the pipeline asks
for more, so at most one request's worth of messages waits here beyond the
chunk the pipeline is handling. When storage is slow the batcher applies
backpressure, stops asking, nothing more is pulled, and the messages stay in
JetStream. While messages wait here longer than a quarter of the ack wait, they
are marked in progress (``+WPI``) so that JetStream does not redeliver them to
another batcher while this one is alive. On a clean stop, what was pulled but
not stored is handed back at once (``-NAK``) rather than after the ack wait.

Invalid messages are rejected with a reason (their bytes kept, their stream
sequence as the "line") and terminated (``+TERM``) once the pipeline has
reported them, so they are never redelivered. A message redelivered while this
process still holds the first delivery is not archived twice: it is acked
together with the first one.

The pull protocol is spoken directly over core NATS (``$JS.API.CONSUMER.MSG.NEXT``
to a private inbox) rather than through nats-py's ``fetch``, which waits for
each message in its own task and costs several times more CPU per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import count
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, PohBatcherError
from ..parsing import LineValidator, Reject, ValidatedBlock
from .base import Chunk

if TYPE_CHECKING:  # nats-py is the optional "nats" extra, imported when a NATS source is opened
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

DEFAULT_STREAM = "ACKS"
DEFAULT_SUBJECT = "acks.>"
DEFAULT_DURABLE = "poh-batcher"
DEFAULT_ACK_WAIT = 30.0
DEFAULT_FETCH_WAIT = 1.0
_API_PREFIX = "$JS.API"
_ACK = b"+ACK"
_NAK = b"-NAK"
_PROGRESS = b"+WPI"
_TERM = b"+TERM"
_REQUEST_GRACE = 2.0  # seconds past a pull request's expiry before it is given up client-side
_CONNECT_TIMEOUT = 5.0
_V1_ACK_TOKENS = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
_V2_STREAM_SEQ = 7  # $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<sseq>...
_NOT_WRITER_ID = re.compile(r"[^A-Za-z0-9.-]+")
_log = logging.getLogger("poh_batcher.nats")


class NatsSourceError(PohBatcherError):
    """The NATS server or the JetStream consumer failed in a way a retry does not fix."""


def is_nats_url(text: str) -> bool:
    """True when ``text`` names a NATS server (``nats://HOST:PORT``, ``tls://…``)."""
    return text.startswith(("nats://", "tls://"))


@dataclass(frozen=True, slots=True)
class NatsSettings:
    """Where to consume from and how; every batcher of one archive uses the same values."""

    url: str
    stream: str = DEFAULT_STREAM
    subject: str = DEFAULT_SUBJECT
    durable: str = DEFAULT_DURABLE
    ack_wait: float = DEFAULT_ACK_WAIT
    fetch_size: int = 500
    fetch_wait: float = DEFAULT_FETCH_WAIT
    until_empty: bool = False
    client_name: str = "poh-batcher"
    create_stream: bool = True

    def __post_init__(self) -> None:
        if not is_nats_url(self.url):
            raise ConfigurationError(f"source {self.url!r} is not a NATS URL: use nats://HOST:PORT")
        for name, value in (("stream", self.stream), ("durable", self.durable)):
            if not value or any(c in value for c in " .*>\t\r\n"):
                raise ConfigurationError(f"--{name} {value!r} is invalid: no spaces, '.', '*' or '>'")
        if not self.subject or " " in self.subject:
            raise ConfigurationError(f"--subject {self.subject!r} is invalid")
        if not self.ack_wait > 0:
            raise ConfigurationError(f"--ack-wait must be a positive number of seconds, got {self.ack_wait}")
        if self.fetch_size < 1:
            raise ConfigurationError(f"fetch size must be at least 1, got {self.fetch_size}")


@dataclass(slots=True)
class NatsStats:
    """What the source did, for the closing line on stderr."""

    received: int = 0
    acked: int = 0
    terminated: int = 0
    duplicates: int = 0
    returned: int = 0
    ack_failures: int = 0

    def render(self) -> str:
        text = (
            f"nats: {self.received} messages received, {self.acked} acknowledged after storage, "
            f"{self.terminated} terminated (invalid or empty)"
        )
        if self.duplicates:
            text += f", {self.duplicates} redeliveries of messages still in flight not archived twice"
        if self.returned:
            text += f", {self.returned} handed back for redelivery (not stored here)"
        if self.ack_failures:
            text += f", {self.ack_failures} acknowledgements not sent (those messages will be redelivered)"
        return text


@dataclass(slots=True)
class _Delivery:
    """The messages of one chunk, from hand-over until their batch is stored."""

    replies: list[str]
    since: float
    seqs: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Pull:
    """The open pull request: its inbox token and how many messages it still owes."""

    token: int
    wanted: int
    deadline: float
    delivered: int = 0


def stream_sequence(reply: str) -> int:
    """The stream sequence of a JetStream message, from its ``$JS.ACK…`` reply subject."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == _V1_ACK_TOKENS else tokens[_V2_STREAM_SEQ])


def default_writer_id(hostname: str | None = None, pid: int | None = None) -> str:
    """``<hostname>-<pid>`` in the writer-id alphabet: unique per batcher process on a network."""
    host = _NOT_WRITER_ID.sub("-", hostname if hostname is not None else socket.gethostname()).strip(".-")
    suffix = f"-{pid if pid is not None else os.getpid()}"
    host = host[: 64 - len(suffix)].rstrip(".-") or "batcher"
    return host + suffix


class NatsSource:
    """A :class:`~poh_batcher.sources.Source` over a JetStream durable pull consumer.

    Use as an async context manager around the whole archive run: the
    connection must outlive :func:`~poh_batcher.pipeline.run_archive`, whose
    last batches are stored (and so acknowledged here) after the chunk
    iterator has been closed::

        async with NatsSource(settings, validator) as source:
            summary = await run_archive(archive_settings, source, storage, ...)
    """

    def __init__(self, settings: NatsSettings, validator: LineValidator) -> None:
        self.settings = settings
        self.stats = NatsStats()
        self._validator = validator
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub: Subscription | None = None
        self._inbox = ""
        self._closed = False
        self._buffer: list[Msg] = []
        self._buffer_since = 0.0
        self._pull: _Pull | None = None
        self._idle = False  # the last pull request ended without delivering anything
        self._problem: str | None = None  # a 409 from the server, reported if it persists
        self._wakeup = asyncio.Event()
        self._tokens = count(1)
        self._in_flight: dict[int, _Delivery] = {}
        self._owner: dict[int, _Delivery] = {}  # stream seq → delivery holding it
        self._to_terminate: list[tuple[str, str]] = []  # (reply, reason) of the chunk handed over last
        self._validating: list[Msg] = []  # pulled, being validated: not yet in a chunk
        self._sending: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._next_delivery_id = count()

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> NatsSource:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect, make sure the stream and the durable consumer exist, subscribe the inbox."""
        nats = _import_nats()
        s = self.settings
        try:
            self._nc = await nats.connect(
                s.url,
                name=s.client_name,
                connect_timeout=_CONNECT_TIMEOUT,
                allow_reconnect=True,
                max_reconnect_attempts=2,  # a wrong URL fails in seconds; once connected, see below
                reconnect_time_wait=1,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise ConfigurationError(f"cannot connect to NATS at {s.url}: {exc or type(exc).__name__}") from exc
        self._nc.options["max_reconnect_attempts"] = -1  # a running batcher waits for the server to come back
        self._js = self._nc.jetstream()
        try:
            await self._ensure_consumer()
        except BaseException:
            await self._nc.close()
            raise
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_message)
        self._ticker = asyncio.get_running_loop().create_task(self._keep_in_progress())

    async def _ensure_consumer(self) -> None:
        from nats.js import errors as js_errors
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        assert self._js is not None
        s = self.settings
        try:
            await self._js.stream_info(s.stream)
        except js_errors.NotFoundError:
            if not s.create_stream:
                raise ConfigurationError(f"JetStream stream {s.stream!r} does not exist at {s.url}") from None
            await ensure_stream(self._js, s.stream, s.subject)
        except js_errors.ServiceUnavailableError as exc:
            raise ConfigurationError(f"JetStream is not enabled on {s.url} (nats-server -js): {exc}") from exc
        config = ConsumerConfig(
            name=s.durable,
            durable_name=s.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.ack_wait,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=s.subject,
            max_ack_pending=-1,  # each batcher bounds what it holds; any number of batchers may share
            max_deliver=-1,
        )
        try:
            await self._js.add_consumer(s.stream, config)
        except js_errors.APIError as exc:
            raise ConfigurationError(
                f"cannot create or update the durable consumer {s.durable!r} on stream {s.stream!r} "
                f"(subject {s.subject!r}) at {s.url}: {exc.description or exc}"
            ) from exc

    def close(self) -> None:
        """Stop pulling; what was pulled but not handed over is given back in :meth:`aclose`."""
        self._closed = True
        self._wakeup.set()

    async def aclose(self) -> None:
        """Send the acknowledgements still due, hand back what was not stored, disconnect."""
        self.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._nc is None:
            return
        await self._end_open_pull()
        await self._settle_sends()
        if self._sub is not None:
            # Withdraw the inbox first, and take in what was already on its way: the
            # server then drops our open pull request instead of redelivering into it.
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.drain(), 5)  # type: ignore[no-untyped-call]
        # Messages not stored here (a storage failure, an interrupted run, pulled but
        # never handed over) go back to JetStream now instead of after the ack wait;
        # rejects not yet terminated are redelivered and rejected again by someone.
        back = [reply for delivery in self._in_flight.values() for reply in delivery.replies]
        back += [msg.reply for msg in [*self._validating, *self._buffer]]
        back += [reply for reply, _ in self._to_terminate]
        self._in_flight.clear()
        self._owner.clear()
        self._buffer.clear()
        self._to_terminate.clear()
        self.stats.returned += len(back)
        if back and not self._nc.is_closed:
            self._send([(reply, _NAK) for reply in back])
            await self._settle_sends()
        nc, self._nc = self._nc, None
        with contextlib.suppress(Exception):
            await nc.flush(timeout=5)
        with contextlib.suppress(Exception):
            await nc.close()

    async def _end_open_pull(self) -> None:
        """Wait until the open pull request is fulfilled or expired (``fetch_wait`` at most).

        JetStream cannot cancel a pull request: a message it sends after the inbox
        is withdrawn counts as delivered and would come back only after the ack
        wait. Taken in here instead, it is handed back at once with the rest.
        """
        pull = self._pull
        while pull is not None and pull.wanted > 0 and self._nc is not None and self._nc.is_connected:
            remaining = pull.deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    async def _settle_sends(self) -> None:
        while self._sending:
            await asyncio.gather(*list(self._sending), return_exceptions=True)

    # -- the chunks ------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Yield chunks of at most ``fetch_size`` messages until closed (or drained with ``until_empty``)."""
        if self._nc is None:
            raise NatsSourceError("NatsSource.chunks() before open(): use 'async with NatsSource(...)'")
        try:
            while not self._closed:
                # Resuming means the pipeline is done with the previous chunk, its
                # rejects included: terminate them so they are never redelivered.
                self._terminate_reported()
                if not self._buffer:
                    if await self._drained():
                        return
                    await self._wait_for_messages()
                    continue
                msgs = self._buffer[: self.settings.fetch_size]
                del self._buffer[: len(msgs)]
                self._pull_if_idle()  # the next messages travel while this chunk is processed
                chunk = await self._make_chunk(msgs)
                if chunk is not None:
                    yield chunk
        finally:
            self.close()

    def _pull_if_idle(self) -> None:
        pull = self._pull
        if self._closed or self._buffer:
            return
        if pull is not None and pull.wanted > 0 and time.monotonic() < pull.deadline:
            return
        self._request(self.settings.fetch_size)

    def _request(self, batch: int) -> None:
        assert self._nc is not None
        s = self.settings
        token = next(self._tokens)
        self._pull = _Pull(token, batch, time.monotonic() + s.fetch_wait + _REQUEST_GRACE)
        self._idle = False
        request = json.dumps({"batch": batch, "expires": int(s.fetch_wait * 1e9)}).encode()
        subject = f"{_API_PREFIX}.CONSUMER.MSG.NEXT.{s.stream}.{s.durable}"
        self._spawn(self._publish_request(subject, request, f"{self._inbox}.{token}"))

    async def _publish_request(self, subject: str, request: bytes, reply: str) -> None:
        from nats.errors import Error as NatsError

        assert self._nc is not None
        try:
            await self._nc.publish(subject, request, reply=reply)
        except (NatsError, OSError) as exc:  # given up at its deadline, then asked again
            _log.warning("nats: cannot send a pull request (%s)", exc or type(exc).__name__)

    async def _wait_for_messages(self) -> None:
        self._pull_if_idle()
        pull = self._pull
        if pull is None:  # closed meanwhile
            return
        self._wakeup.clear()
        timeout = max(0.0, pull.deadline - time.monotonic())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        if self._problem is not None and not self._buffer:
            problem, self._problem = self._problem, None
            if "Consumer Deleted" in problem or "Consumer Not Found" in problem:
                raise NatsSourceError(
                    f"the durable consumer {self.settings.durable!r} of stream {self.settings.stream!r} "
                    f"is gone ({problem}); restart the batchers to create it again"
                )
            _log.warning("nats: pull request refused: %s; retrying", problem)
            await asyncio.sleep(0.5)

    async def _drained(self) -> bool:
        """With ``until_empty``: nothing waits in the consumer and nothing delivered is unacknowledged."""
        if not (self.settings.until_empty and self._idle and self._pull is not None and self._pull.wanted <= 0):
            return False
        assert self._js is not None
        try:
            info = await self._js.consumer_info(self.settings.stream, self.settings.durable)
        except Exception as exc:  # disconnected, a timeout: not drained as far as we know
            _log.warning("nats: cannot read the consumer's state (%s); going on", exc or type(exc).__name__)
            self._idle = False
            return False
        mine = sum(len(d.seqs) for d in self._in_flight.values())
        if (info.num_pending or 0) == 0 and (info.num_ack_pending or 0) <= mine:
            return True
        self._idle = False
        return False

    async def _make_chunk(self, msgs: list[Msg]) -> Chunk | None:
        """Validate ``msgs`` into a chunk, leaving out redeliveries of messages still held here."""
        now = time.monotonic()
        delivery = _Delivery([], now)
        fresh: list[Msg] = []
        seqs: list[int] = []
        for msg in msgs:
            seq = stream_sequence(msg.reply)
            holder = self._owner.get(seq)
            if holder is not None:  # redelivered while we still hold it: ack with the first
                holder.replies.append(msg.reply)
                self.stats.duplicates += 1
                continue
            self._owner[seq] = delivery
            fresh.append(msg)
            seqs.append(seq)
        if not fresh:
            return None
        payloads = [_strip_newline(msg.data) for msg in fresh]
        self._validating = fresh  # handed back by aclose() if the run stops meanwhile
        try:
            block = await self._validate(payloads)
        finally:
            self._validating = []
        bad: dict[int, Reject] = {reject.line - 1: reject for reject in block.rejects}
        rejects: list[Reject] = []
        blank = 0
        for index, msg in enumerate(fresh):
            seq = seqs[index]
            reject = bad.get(index)
            if reject is not None:
                where = f"stream {self.settings.stream} seq {seq}, subject {msg.subject}"
                rejects.append(Reject(seq, f"{reject.reason} ({where})", reject.raw))
                self._to_terminate.append((msg.reply, reject.reason))
            elif not payloads[index].strip():
                blank += 1
                self._to_terminate.append((msg.reply, "empty message"))
            else:
                delivery.replies.append(msg.reply)
                delivery.seqs.append(seq)
                continue
            del self._owner[seq]
        key = next(self._next_delivery_id)
        on_stored = None
        if delivery.replies:
            self._in_flight[key] = delivery
            on_stored = _once(lambda: self._stored(key))
        return Chunk(block.acks, rejects, blank, len(fresh), None, on_stored)

    async def _validate(self, payloads: list[bytes]) -> ValidatedBlock:
        """The shape check alone stays on the loop (microseconds a message); extra checks,
        such as signatures at ~70 µs a message, run on a thread."""
        if not self._validator.checks:
            return self._validator.validate_block(payloads, 1)
        return await asyncio.to_thread(self._validator.validate_block, payloads, 1)

    def _stored(self, key: int) -> None:
        """The batch holding delivery ``key`` is durable: acknowledge its messages."""
        delivery = self._in_flight.pop(key, None)
        if delivery is None:
            return
        for seq in delivery.seqs:
            self._owner.pop(seq, None)
        self.stats.acked += len(delivery.replies)
        self._send([(reply, _ACK) for reply in delivery.replies])

    def _terminate_reported(self) -> None:
        if not self._to_terminate:
            return
        items, self._to_terminate = self._to_terminate, []
        self.stats.terminated += len(items)
        self._send([(reply, _TERM + b" " + _term_reason(reason)) for reply, reason in items])

    # -- incoming messages -----------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        pull = self._pull
        if msg.reply:  # a message (it keeps its own subject; any late one of an older request counts too)
            if not self._buffer:
                self._buffer_since = time.monotonic()
            self._buffer.append(msg)
            self.stats.received += 1
            if pull is not None:
                pull.wanted -= 1
                pull.delivered += 1
            self._wakeup.set()
            return
        # A status sent to the request's own inbox subject: ignore an older request's, and heartbeats.
        status = (msg.headers or {}).get("Status", "")
        if pull is None or msg.subject.rpartition(".")[2] != str(pull.token) or status == "100":
            return
        pull.wanted = 0  # 404 no messages, 408 expired, 409 (or other) refused: the request is over
        if status in ("404", "408"):
            self._idle = pull.delivered == 0
        else:
            self._problem = f"{status} {(msg.headers or {}).get('Description', '')}".strip()
        self._wakeup.set()

    # -- acknowledgements ------------------------------------------------------

    def _send(self, items: list[tuple[str, bytes]]) -> None:
        if items:
            self._spawn(self._publish_all(items))

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _publish_all(self, items: list[tuple[str, bytes]]) -> None:
        from nats.errors import Error as NatsError

        nc = self._nc
        if nc is None:
            self.stats.ack_failures += len(items)
            return
        for done, (reply, payload) in enumerate(items):
            try:
                await nc.publish(reply, payload)
            except (NatsError, OSError) as exc:
                self.stats.ack_failures += len(items) - done
                _log.warning("nats: cannot acknowledge (%s); JetStream will redeliver those messages", exc)
                return

    async def _keep_in_progress(self) -> None:
        """Mark messages held longer than a quarter of the ack wait as in progress.

        Checked every quarter, a message is marked by half its ack wait at the latest,
        leaving the other half for a busy event loop and the network.
        """
        period = self.settings.ack_wait / 4
        while True:
            await asyncio.sleep(period)
            old = time.monotonic() - period
            replies = [reply for d in self._in_flight.values() if d.since <= old for reply in d.replies]
            if self._buffer and self._buffer_since <= old:
                replies += [msg.reply for msg in self._buffer]
            replies += [reply for reply, _ in self._to_terminate]
            self._send([(reply, _PROGRESS) for reply in replies])

    # -- connection events -----------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        _log.warning("nats: %s", exc or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            _log.warning("nats: disconnected from %s; reconnecting", self.settings.url)

    async def _on_reconnected(self) -> None:
        _log.warning("nats: reconnected to %s", self.settings.url)
        self._pull = None  # the server may have lost the open request: ask again
        self._wakeup.set()


async def ensure_stream(js: JetStreamContext, stream: str, subject: str) -> bool:
    """Create ``stream`` (file storage, work-queue retention) on ``subject`` if missing; True if created.

    Work-queue retention removes each message once a batcher has acknowledged it,
    i.e. once it is archived; the stream holds only what is not archived yet.
    """
    from nats.js import errors as js_errors
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    try:
        await js.stream_info(stream)
        return False
    except js_errors.NotFoundError:
        pass
    config = StreamConfig(
        name=stream, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE
    )
    try:
        await js.add_stream(config)
    except js_errors.APIError as exc:
        if exc.err_code == 10058:  # created meanwhile by another process with the same name
            return False
        raise ConfigurationError(f"cannot create JetStream stream {stream!r} on {subject!r}: {exc}") from exc
    _log.warning("created JetStream stream %s on subject %s (work-queue retention)", stream, subject)
    return True


def _import_nats() -> Any:
    try:
        import nats
    except ImportError:
        raise ConfigurationError(
            "a nats:// source needs nats-py: pip install 'poh-batcher[nats]'"
        ) from None
    return nats


def _strip_newline(data: bytes) -> bytes:
    return data.rstrip(b"\r\n") if data.endswith((b"\n", b"\r")) else data


def _term_reason(reason: str) -> bytes:
    return " ".join(reason.split())[:200].encode("utf-8", "replace")


def _once(callback: Callable[[], None]) -> Callable[[], None]:
    called = False

    def call() -> None:
        nonlocal called
        if not called:
            called = True
            callback()

    return call
