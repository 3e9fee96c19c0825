"""Object keys: ``[prefix/]YYYYMMDD/HH/ack_batch_[<writer>_]<seq>.json[.zst|.gz]``.

The namer hands out keys whose seq is never reused by a writer: on the first
batch of an hour it lists that hour's folder and continues past the highest
seq it finds for its own writer id, and when a key turns out to be taken
anyway (another process, a lost race) the caller asks for the next one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .compression import EXTENSIONS
from .errors import ConfigurationError
from .types import Codec

if TYPE_CHECKING:
    from .storage.base import StorageBackend

SEQ_DIGITS = 6
_WRITER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
_SEGMENT = re.compile(r"[A-Za-z0-9._=+-]+")
KEY_PATTERN = re.compile(
    r"(?:(?P<prefix>.+)/)?(?P<day>\d{8})/(?P<hour>\d{2})/"
    r"ack_batch_(?:(?P<writer>[A-Za-z0-9][A-Za-z0-9.-]*)_)?(?P<seq>\d{6,})"
    r"\.json(?P<ext>\.zst|\.gz)?"
)
_CODEC_OF_EXT: dict[str | None, Codec] = {".zst": "zstd", ".gz": "gzip", None: "none"}


@dataclass(frozen=True, slots=True)
class BatchKey:
    """A parsed batch key."""

    key: str
    prefix: str
    hour: datetime
    writer_id: str | None
    seq: int
    codec: Codec


def validate_writer_id(writer_id: str | None) -> str | None:
    """Check that a writer id cannot change the shape of a key (no '/', '_', '..')."""
    if writer_id is None or writer_id == "":
        return None
    if not _WRITER_ID.fullmatch(writer_id):
        raise ConfigurationError(
            f"writer id {writer_id!r} is invalid: use 1-64 letters, digits, '.' or '-', "
            "starting with a letter or digit"
        )
    return writer_id


def normalize_prefix(prefix: str) -> str:
    """Strip outer slashes and refuse segments that could escape the destination."""
    cleaned = prefix.strip("/")
    if not cleaned:
        return ""
    for segment in cleaned.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise ConfigurationError(
                f"prefix {prefix!r} is invalid: segment {segment!r} must be letters, digits "
                "or '._=+-', and not '.' or '..'"
            )
    return cleaned


def hour_folder(when: datetime, prefix: str = "") -> str:
    """``[prefix/]YYYYMMDD/HH/`` of the UTC hour containing ``when``."""
    utc = when.astimezone(UTC)
    folder = f"{utc.year:04d}{utc.month:02d}{utc.day:02d}/{utc.hour:02d}/"  # 0.5 µs; strftime takes 1.4 µs
    return f"{prefix}/{folder}" if prefix else folder


def make_key(when: datetime, seq: int, codec: Codec, *, prefix: str = "", writer_id: str | None = None) -> str:
    """The key of batch ``seq`` flushed at ``when``."""
    writer = f"{writer_id}_" if writer_id else ""
    return f"{hour_folder(when, prefix)}ack_batch_{writer}{seq:0{SEQ_DIGITS}d}.json{EXTENSIONS[codec]}"


def parse_key(key: str) -> BatchKey | None:
    """Parse a batch key; None when ``key`` is not one (a stray file, a temp file)."""
    match = KEY_PATTERN.fullmatch(key)
    if match is None:
        return None
    try:
        hour = datetime.strptime(match["day"] + match["hour"], "%Y%m%d%H").replace(tzinfo=UTC)
    except ValueError:
        return None
    return BatchKey(
        key=key,
        prefix=match["prefix"] or "",
        hour=hour,
        writer_id=match["writer"],
        seq=int(match["seq"]),
        codec=_CODEC_OF_EXT[match["ext"]],
    )


class KeyNamer:
    """Hands out batch keys in order, continuing past what storage already holds."""

    def __init__(
        self,
        storage: StorageBackend,
        codec: Codec,
        *,
        prefix: str = "",
        writer_id: str | None = None,
    ) -> None:
        self._storage = storage
        self._codec = codec
        self._prefix = normalize_prefix(prefix)
        self._writer_id = validate_writer_id(writer_id)
        self._folder: str | None = None
        self._next_seq = 0

    async def next_key(self, when: datetime) -> tuple[str, int]:
        """The next unused key for a batch flushed at ``when``, and its seq."""
        folder = hour_folder(when, self._prefix)
        if folder != self._folder:
            self._next_seq = await self._first_free_seq(folder)
            self._folder = folder
        seq = self._next_seq
        self._next_seq += 1
        return make_key(when, seq, self._codec, prefix=self._prefix, writer_id=self._writer_id), seq

    async def _first_free_seq(self, folder: str) -> int:
        highest = -1
        for key in await self._storage.list(folder):
            parsed = parse_key(key)
            if parsed is not None and parsed.writer_id == self._writer_id:
                highest = max(highest, parsed.seq)
        return highest + 1
