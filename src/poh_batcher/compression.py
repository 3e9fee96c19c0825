"""Compression codecs: zstd (preferred), gzip (fallback), none.

Frames are the standard ones, so ``zstd -d`` and ``gzip -d`` read every file.
Output is deterministic for the same input, codec and level (gzip's mtime is
fixed at 0): a batch rebuilt after a crash compresses to the same bytes, which
is how a replay recognises an object it already stored.
"""

from __future__ import annotations

import gzip
import threading

from .types import Codec

try:  # pragma: no branch - which arm runs depends on the environment
    import zstandard as _zstd
except ImportError:  # pragma: no cover - exercised by hiding the module in tests
    _zstd = None  # type: ignore[assignment]

CODECS: tuple[Codec, ...] = ("zstd", "gzip", "none")
EXTENSIONS: dict[Codec, str] = {"zstd": ".zst", "gzip": ".gz", "none": ""}
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"

# ZstdCompressor objects are not safe to share between threads, and making one
# per batch costs more than compressing a small batch: keep one per thread.
_local = threading.local()


def resolve_codec(codec: str) -> Codec:
    """Turn a requested codec (``auto`` included) into the one that will be used."""
    if codec == "auto":
        return "zstd" if _zstd is not None else "gzip"
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of auto, zstd, gzip, none")
    if codec == "zstd" and _zstd is None:
        raise RuntimeError("codec 'zstd' needs the 'zstandard' package: pip install zstandard")
    return codec


def check_level(codec: Codec, level: int) -> None:
    """Reject a level the codec does not have, before any data is at stake."""
    if codec == "gzip" and not 0 <= level <= 9:
        raise ValueError(f"gzip level must be 0..9, got {level}")
    if codec == "zstd" and not -7 <= level <= 22:
        raise ValueError(f"zstd level must be -7..22, got {level}")


def compress(data: bytes, level: int = 3, codec: str = "auto") -> tuple[Codec, bytes]:
    """Compress ``data``; return the codec actually used and the frame."""
    chosen = resolve_codec(codec)
    check_level(chosen, level)
    if chosen == "zstd":
        return chosen, _zstd_compressor(level).compress(data)
    if chosen == "gzip":
        return chosen, gzip.compress(data, compresslevel=level, mtime=0)
    return chosen, bytes(data)


def decompress(codec: str, data: bytes) -> bytes:
    """Decompress a frame written by :func:`compress` (or the command-line tools)."""
    if codec == "zstd":
        if _zstd is None:
            raise RuntimeError("codec 'zstd' needs the 'zstandard' package: pip install zstandard")
        # decompressobj copes with frames that do not record their content size
        # (as written by streaming tools), unlike ZstdDecompressor.decompress. It
        # stops at the end of one frame and says nothing about a cut-off frame:
        # check both, like gzip.decompress (concatenated frames, EOFError).
        chunks: list[bytes] = []
        rest = bytes(data)
        while True:
            frame = _zstd.ZstdDecompressor().decompressobj()
            chunks.append(frame.decompress(rest))
            if not frame.eof:
                raise EOFError("zstd data is truncated: the frame ends before its end mark")
            rest = frame.unused_data
            if not rest:
                return b"".join(chunks)
    if codec == "gzip":
        return gzip.decompress(data)
    if codec == "none":
        return bytes(data)
    raise ValueError(f"unknown codec {codec!r}; expected one of zstd, gzip, none")


def sniff_codec(data: bytes) -> Codec | None:
    """The codec whose magic number starts ``data``; None if it is not a batch."""
    if data.startswith(_ZSTD_MAGIC):
        return "zstd"
    if data.startswith(_GZIP_MAGIC):
        return "gzip"
    if data.lstrip()[:1] == b"[":
        return "none"
    return None


def _zstd_compressor(level: int) -> _zstd.ZstdCompressor:
    cache: dict[int, _zstd.ZstdCompressor] | None = getattr(_local, "zstd", None)
    if cache is None:
        cache = _local.zstd = {}
    compressor = cache.get(level)
    if compressor is None:
        # The frame checksum lets `zstd -d` and our reader detect corruption.
        compressor = cache[level] = _zstd.ZstdCompressor(level=level, write_checksum=True)
    return compressor
