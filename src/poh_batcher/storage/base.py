"""The storage seam: a small abstract interface every backend implements.

Keys are relative to the backend's root (a folder, or a bucket and prefix);
the batcher never builds a path or URL itself. All I/O methods are coroutines,
so a backend that blocks (the local disk) moves the work to a thread and one
that is natively async (object stores) does not pay for a thread hop.
"""

from __future__ import annotations

import json
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from ..errors import StorageError


class StorageBackend(ABC):
    """Where batches are stored. Writes are atomic and never overwrite."""

    @abstractmethod
    async def save_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        content_encoding: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Store ``data`` under ``key`` durably; raise ``KeyExistsError`` if the key is taken."""

    async def save_json(self, key: str, obj: Any) -> None:
        """Store ``obj`` as minified UTF-8 JSON (no overwrite, like ``save_bytes``)."""
        data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        await self.save_bytes(key, data, content_type="application/json")

    @abstractmethod
    async def load_bytes(self, key: str) -> bytes:
        """The stored bytes of ``key``; ``StorageError`` if it does not exist."""

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""

    @abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix``, sorted."""

    @abstractmethod
    def get_url(self, key: str) -> str:
        """A URL naming ``key`` (``file:///…``, ``s3://bucket/…``), for messages and tools."""

    async def preflight(self) -> None:  # noqa: B027 - optional hook
        """Fail fast, before any input is read, if the destination cannot be written."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections; the default holds none."""


def check_key(key: str) -> str:
    """Refuse keys that are absolute, empty or could climb out of the root."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"invalid key {key!r}", retryable=False)
    if any(part in ("", ".", "..") for part in key.split("/")) or posixpath.normpath(key) != key:
        raise StorageError(f"key {key!r} would escape the storage root", retryable=False)
    return key
