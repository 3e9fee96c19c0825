"""Reading an archive back: the batches and ACKs of a source, in key order.

A *source* names what to read, as ``cat``/``ls``/``verify`` take it:

* one batch: ``/data/20250101/03/ack_batch_000007.json.zst``, or the same as
  ``file://`` or ``s3://bucket/prefix/20250101/03/ack_batch_000007.json.zst``;
* an hour or a day folder: ``/data/20250101/03``, ``s3://bucket/p/20250101``;
* a whole archive: ``./batches``, ``file:///data``, ``s3://bucket/prefix``.

Keys are ordered by (prefix, hour, writer id, seq), the seq compared as a
number, so a single writer's batches come back in the order they were written
and ``cat`` of an archive gives back its input stream. ``since``/``until``
select hour folders; both name an hour that is *included*.

The codec comes from the key's extension and is checked against the magic
number of the stored bytes; a frame that ends early (a truncated file) or
fails its checksum is an error, never a silently shorter batch. Each ACK is
returned as the bytes stored in the batch's JSON array (``msgspec.Raw``),
untouched. Batches are fetched a few at a time ahead of the consumer, and
decompressed and split on a worker thread.

Use :class:`ArchiveReader` from async code, or :func:`iter_batches` /
:func:`iter_acks` from plain scripts.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlsplit

import msgspec

try:  # pragma: no branch - which arm runs depends on the environment
    import zstandard as _zstd
except ImportError:  # pragma: no cover - exercised by hiding the module in tests
    _zstd = None  # type: ignore[assignment]

from .compression import sniff_codec
from .errors import ConfigurationError, PohBatcherError, StorageError
from .naming import parse_key
from .storage.base import StorageBackend
from .storage.local import LocalStorage
from .types import Codec

__all__ = [
    "ArchiveReader",
    "Batch",
    "BatchError",
    "BatchRef",
    "BatchStat",
    "decode_batch",
    "iter_acks",
    "iter_batches",
    "parse_hour",
    "resolve_source",
]

DEFAULT_PREFETCH = 8
T = TypeVar("T")
ErrorHandler = Callable[["BatchError"], None]

_DAY = re.compile(r"\d{8}")
_HOUR = re.compile(r"\d{2}")
_BATCH_NAME = re.compile(r".+\.json(?P<ext>\.zst|\.gz)?")
_CODEC_OF_EXT: dict[str | None, Codec] = {".zst": "zstd", ".gz": "gzip", None: "none"}
_HOUR_TEXT = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})(?:[T /](\d{2}).*)?")
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])


class BatchError(PohBatcherError):
    """A stored batch cannot be read back: missing, corrupted, truncated, not an ACK array."""

    def __init__(self, ref: BatchRef, reason: str) -> None:
        self.ref = ref
        self.reason = reason
        super().__init__(f"{ref.url}: {reason}")


@dataclass(frozen=True, slots=True)
class BatchRef:
    """One batch of a source, known from its key alone (nothing read yet)."""

    key: str
    """The key, relative to the storage root."""
    url: str
    codec: Codec
    """From the extension."""
    hour: datetime | None = None
    """The UTC hour folder; None for a batch file outside the ``YYYYMMDD/HH/`` layout."""
    prefix: str = ""
    writer_id: str | None = None
    seq: int | None = None

    @property
    def order(self) -> tuple[str, datetime, str, int, str]:
        """The sort key of key order: prefix, hour, writer id, seq (as a number)."""
        return (
            self.prefix,
            self.hour or datetime.min.replace(tzinfo=UTC),
            self.writer_id or "",
            -1 if self.seq is None else self.seq,
            self.key,
        )


@dataclass(frozen=True, slots=True)
class BatchStat:
    """What ``ls`` shows of a batch; the fields a HEAD cannot tell are None."""

    ref: BatchRef
    stored_bytes: int
    ack_count: int | None
    raw_bytes: int | None = None
    codec: str | None = None
    """As recorded in the object's metadata (or found by reading it)."""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch read back: its ACKs, each the exact bytes stored."""

    ref: BatchRef
    acks: list[bytes]
    stored_bytes: int
    raw_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)
    """The object's metadata (``ack-count``, ``codec``) when the backend keeps it, else empty."""

    @property
    def declared_count(self) -> int | None:
        """The ACK count the metadata claims, if any."""
        value = self.metadata.get("ack-count")
        return int(value) if value is not None and value.isdigit() else None


@runtime_checkable
class _Headable(Protocol):
    async def head(self, key: str) -> Any: ...


# -- sources ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedSource:
    """A source as a backend, plus either one key or the listing prefix to read."""

    text: str
    storage: StorageBackend
    listing: str = ""
    key: str | None = None


def resolve_source(source: str, **storage_options: Any) -> ResolvedSource:
    """Turn a source (path, ``file://`` or ``s3://`` URL) into a backend and what to read from it.

    ``storage_options`` go to the S3 backend (``endpoint``, ``region``, …).
    """
    if not source:
        raise ConfigurationError("empty source; expected a batch file, a folder, or an s3:// URL")
    parts = urlsplit(source) if "://" in source else None
    scheme = parts.scheme.lower() if parts is not None else "file"
    if parts is not None and scheme in ("s3", "s3a"):
        if not parts.netloc:
            raise ConfigurationError(f"S3 source {source!r} names no bucket; expected s3://bucket/prefix")
        segments = [s for s in unquote(parts.path).split("/") if s]
        root, listing, key = _split(segments, is_object=bool(segments) and _is_batch_name(segments[-1]))
        from .storage.s3 import S3Storage

        storage: StorageBackend = S3Storage(parts.netloc, "/".join(root), **storage_options)
        return ResolvedSource(source, storage, listing, key)
    if scheme != "file":
        raise ConfigurationError(f"unsupported source {source!r}; expected a path, file:// or s3://")
    path = Path(_local_path(source, parts))
    if path.is_file():
        root, listing, key = _split(list(path.absolute().parts[1:]), is_object=True)
        if key is not None and not _is_batch_name(key.rpartition("/")[2]):
            raise ConfigurationError(
                f"{source}: not a batch file (expected a name ending .json, .json.zst or .json.gz)"
            )
        return ResolvedSource(source, LocalStorage(Path("/", *root)), listing, key)
    if path.is_dir():
        root, listing, _ = _split(list(path.absolute().parts[1:]), is_object=False)
        return ResolvedSource(source, LocalStorage(Path("/", *root)), listing)
    raise ConfigurationError(f"{source}: no such batch file or folder")


def _local_path(source: str, parts: Any) -> str:
    if parts is None:
        return source
    if parts.netloc not in ("", "localhost"):
        return unquote(parts.netloc + parts.path)  # file://./rel or file://rel/path
    return unquote(parts.path)


def _is_batch_name(name: str) -> bool:
    return _BATCH_NAME.fullmatch(name) is not None


def _split(segments: list[str], *, is_object: bool) -> tuple[list[str], str, str | None]:
    """``(root segments, listing prefix, key)`` of a path, the root above any ``YYYYMMDD/HH``."""
    if is_object:
        if len(segments) >= 3 and parse_key("/".join(segments[-3:])) is not None:
            return segments[:-3], "", "/".join(segments[-3:])
        return segments[:-1], "", segments[-1]
    if len(segments) >= 2 and _DAY.fullmatch(segments[-2]) and _HOUR.fullmatch(segments[-1]):
        return segments[:-2], f"{segments[-2]}/{segments[-1]}/", None
    if segments and _DAY.fullmatch(segments[-1]):
        return segments[:-1], f"{segments[-1]}/", None
    return segments, "", None


def parse_hour(text: str) -> datetime:
    """The UTC hour named by ``2025-01-01T03`` (also ``2025-01-01``, ``20250101/03``, full ISO times)."""
    match = _HOUR_TEXT.fullmatch(text.strip())
    if match is None:
        raise ConfigurationError(f"cannot read {text!r} as a UTC hour; expected e.g. 2025-01-01T03")
    if match[4] is not None and len(text.strip()) > 13:
        try:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ConfigurationError(f"cannot read {text!r} as a UTC time; expected e.g. 2025-01-01T03") from None
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        return when.replace(minute=0, second=0, microsecond=0)
    try:
        return datetime(int(match[1]), int(match[2]), int(match[3]), int(match[4] or 0), tzinfo=UTC)
    except ValueError as exc:
        raise ConfigurationError(f"cannot read {text!r} as a UTC hour: {exc}") from None


# -- decoding ---------------------------------------------------------------------


class _FormatError(Exception):
    pass


def decode_batch(codec: Codec, payload: bytes) -> tuple[int, list[bytes]]:
    """``(raw bytes, ACKs)`` of a stored batch; ``ValueError`` says what is wrong with it.

    The stored bytes must start with the magic number of ``codec`` (the
    extension's), decompress completely (a frame cut short is an error), and
    hold a JSON array of objects.
    """
    try:
        raw = _decompress(codec, payload)
    except _FormatError as exc:
        raise ValueError(str(exc)) from None
    try:
        items = _raw_list.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a JSON array of ACKs: {exc}") from None
    acks = [bytes(item) for item in items]
    for index, ack in enumerate(acks):
        if not ack.startswith(b"{"):
            raise ValueError(f"element {index} of the array is not a JSON object")
    return len(raw), acks


def _decompress(codec: Codec, payload: bytes) -> bytes:
    if not payload:
        raise _FormatError("empty file (0 bytes)")
    found = sniff_codec(payload)
    if found != codec:
        what = f"{found} data" if found else f"unknown data (starts {payload[:4].hex(' ')})"
        raise _FormatError(f"extension says {codec} but the file holds {what}")
    if codec == "zstd":
        if _zstd is None:  # pragma: no cover - exercised by hiding the module in tests
            raise _FormatError("reading zstd batches needs the 'zstandard' package: pip install zstandard")
        chunks: list[bytes] = []
        data = payload
        while data:
            if sniff_codec(data) != "zstd":
                raise _FormatError(f"{len(data)} bytes of garbage after the zstd frame")
            decompressor = _zstd.ZstdDecompressor().decompressobj()
            try:
                chunks.append(decompressor.decompress(data))
            except _zstd.ZstdError as exc:
                raise _FormatError(f"corrupted zstd data: {exc}") from None
            if not decompressor.eof:
                raise _FormatError("truncated: the zstd frame ends before its end mark")
            data = decompressor.unused_data
        return b"".join(chunks)
    if codec == "gzip":
        try:
            return gzip.decompress(payload)
        except EOFError:
            raise _FormatError("truncated: the gzip stream ends before its end mark") from None
        except (OSError, zlib.error) as exc:
            raise _FormatError(f"corrupted gzip data: {exc}") from None
    return payload


# -- the reader -------------------------------------------------------------------


class ArchiveReader:
    """The batches of one source, in key order, optionally limited to some hours.

    ``source`` is a path or URL (see the module help) or a ``StorageBackend``
    (then ``listing`` limits it to keys starting with that prefix).
    """

    def __init__(
        self,
        source: str | StorageBackend,
        *,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        listing: str = "",
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(source, StorageBackend):
            self.source = ResolvedSource(repr(source), source, listing)
        else:
            self.source = resolve_source(source, **dict(storage_options or {}))
        self.storage = self.source.storage
        self.since = _hour_of(since)
        self.until = _hour_of(until)
        if self.since and self.until and self.since > self.until:
            raise ConfigurationError(f"--since {self.since:%Y-%m-%dT%H} is after --until {self.until:%Y-%m-%dT%H}")
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be at least 1, got {prefetch}")
        self.prefetch = prefetch
        self.ignored: list[str] = []
        """Keys listed under the source that are not batches (filled by :meth:`refs`)."""

    async def __aenter__(self) -> ArchiveReader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release the backend's connections."""
        await self.storage.close()

    @property
    def single(self) -> bool:
        """Whether the source names one batch rather than a folder or prefix."""
        return self.source.key is not None

    def ref(self, key: str) -> BatchRef:
        """The :class:`BatchRef` of ``key`` (a key of this reader's backend)."""
        parsed = parse_key(key)
        if parsed is not None:
            return BatchRef(
                key=key,
                url=self.storage.get_url(key),
                codec=parsed.codec,
                hour=parsed.hour,
                prefix=parsed.prefix,
                writer_id=parsed.writer_id,
                seq=parsed.seq,
            )
        match = _BATCH_NAME.fullmatch(key.rpartition("/")[2])
        if match is None:
            raise ConfigurationError(f"{key!r} is not a batch key")
        return BatchRef(key=key, url=self.storage.get_url(key), codec=_CODEC_OF_EXT[match["ext"]])

    async def refs(self) -> list[BatchRef]:
        """Every selected batch, in key order (one listing; nothing is read)."""
        if self.source.key is not None:
            return [self.ref(self.source.key)]
        refs: list[BatchRef] = []
        ignored: list[str] = []
        for key in await self.storage.list(self.source.listing):
            parsed = parse_key(key)
            if parsed is None:
                ignored.append(key)
                continue
            if (self.since and parsed.hour < self.since) or (self.until and parsed.hour > self.until):
                continue
            refs.append(self.ref(key))
        self.ignored = ignored
        refs.sort(key=lambda ref: ref.order)
        return refs

    async def metadata(self, ref: BatchRef) -> tuple[int, dict[str, str]] | None:
        """``(stored bytes, metadata)`` from a HEAD, when the backend has one (S3); else None."""
        if not isinstance(self.storage, _Headable):
            return None
        try:
            info = await self.storage.head(ref.key)
        except StorageError as exc:
            raise BatchError(ref, str(exc)) from exc
        return int(info.size), dict(info.metadata)

    async def read(self, ref: BatchRef, *, with_metadata: bool = False) -> Batch:
        """Fetch and decode one batch; :class:`BatchError` says why it cannot be."""
        meta: tuple[int, dict[str, str]] | None = None
        try:
            if with_metadata and isinstance(self.storage, _Headable):
                meta, payload = await asyncio.gather(self.metadata(ref), self.storage.load_bytes(ref.key))
            else:
                payload = await self.storage.load_bytes(ref.key)
        except StorageError as exc:
            raise BatchError(ref, f"cannot read: {exc}") from exc
        try:
            raw_bytes, acks = await asyncio.to_thread(decode_batch, ref.codec, payload)
        except ValueError as exc:
            raise BatchError(ref, str(exc)) from None
        return Batch(ref, acks, len(payload), raw_bytes, meta[1] if meta else {})

    async def stat(self, ref: BatchRef) -> BatchStat:
        """Size and ACK count: from the object's metadata when it has them, else by reading it."""
        meta = await self.metadata(ref)
        if meta is not None:
            size, metadata = meta
            count = metadata.get("ack-count", "")
            if count.isdigit():
                return BatchStat(ref, size, int(count), None, metadata.get("codec"), metadata)
        batch = await self.read(ref)
        return BatchStat(ref, batch.stored_bytes, len(batch.acks), batch.raw_bytes, ref.codec, batch.metadata)

    async def batches(
        self, *, on_error: ErrorHandler | None = None, with_metadata: bool = False
    ) -> AsyncIterator[Batch]:
        """The selected batches in key order, up to ``prefetch`` fetched ahead.

        A batch that cannot be read raises :class:`BatchError`, unless
        ``on_error`` is given: then it is passed there and skipped.
        """
        async for batch in self._in_order(await self.refs(), self.read, on_error, with_metadata=with_metadata):
            yield batch

    async def stats(self, *, on_error: ErrorHandler | None = None) -> AsyncIterator[BatchStat]:
        """:meth:`stat` of each selected batch, in key order."""
        async for stat in self._in_order(await self.refs(), self.stat, on_error):
            yield stat

    async def acks(self, *, on_error: ErrorHandler | None = None) -> AsyncIterator[bytes]:
        """Every ACK of the selected batches, in key order, as the bytes stored."""
        async for batch in self.batches(on_error=on_error):
            for ack in batch.acks:
                yield ack

    async def _in_order(
        self,
        refs: list[BatchRef],
        fetch: Callable[..., Any],
        on_error: ErrorHandler | None,
        **options: Any,
    ) -> AsyncIterator[Any]:
        pending: deque[asyncio.Task[Any]] = deque()
        upcoming = iter(refs)
        try:
            while True:
                while len(pending) < self.prefetch:
                    ref = next(upcoming, None)
                    if ref is None:
                        break
                    pending.append(asyncio.ensure_future(fetch(ref, **options)))
                if not pending:
                    return
                try:
                    result = await pending.popleft()
                except BatchError as exc:
                    if on_error is None:
                        raise
                    on_error(exc)
                    continue
                yield result
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


def _hour_of(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_hour(value)
    when = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return when.replace(minute=0, second=0, microsecond=0)


# -- synchronous helpers ----------------------------------------------------------


def iter_batches(source: str | StorageBackend, **options: Any) -> Iterator[Batch]:
    """:meth:`ArchiveReader.batches` for code without an event loop (options as the constructor's)."""
    return _iterate(source, options, lambda reader: reader.batches())


def iter_acks(source: str | StorageBackend, **options: Any) -> Iterator[bytes]:
    """Every ACK of ``source`` in key order, as the bytes stored, for code without an event loop.

    >>> for line in iter_acks("./batches", since="2025-01-01T03"):  # doctest: +SKIP
    ...     print(line.decode())
    """
    return _iterate(source, options, lambda reader: reader.acks())


def _iterate(
    source: str | StorageBackend,
    options: dict[str, Any],
    items: Callable[[ArchiveReader], AsyncIterator[T]],
) -> Iterator[T]:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("iter_batches/iter_acks cannot run inside an event loop: use ArchiveReader instead")
    loop = asyncio.new_event_loop()
    try:
        reader = ArchiveReader(source, **options)
        iterator = items(reader)
        try:
            while True:
                try:
                    yield loop.run_until_complete(_next(iterator))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                loop.run_until_complete(aclose())
            loop.run_until_complete(reader.close())
    finally:
        loop.close()


async def _next(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)
