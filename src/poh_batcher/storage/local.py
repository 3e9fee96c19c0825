"""Local-disk backend: atomic, durable, never overwriting.

A batch is written to a hidden temporary file in its final folder, flushed,
then hard-linked to its key. ``link`` fails when the key exists, so two writers
can never overwrite each other (``rename`` would silently replace the target).
The folder is fsync'd afterwards so the new name survives a power cut
(``durable.py``).
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from ..errors import KeyExistsError, StorageError
from .base import StorageBackend, check_key
from .durable import FileTakenError, create_durably

FILE_MODE = 0o644
DIR_MODE = 0o755


class LocalStorage(StorageBackend):
    """Batches as files below ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def path_of(self, key: str) -> Path:
        """The file that holds ``key``."""
        return self.root / check_key(key)

    async def save_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        content_encoding: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        # Content type, encoding and metadata are carried by the key's extension
        # on disk; readers derive them from the name.
        await asyncio.to_thread(self.write_durably, key, data)

    def write_durably(self, key: str, data: bytes) -> None:
        """Blocking body of :meth:`save_bytes`, for callers already on a worker thread.

        Rewriting a key with the very bytes it holds succeeds: that is an earlier
        attempt whose answer was lost, not a second object.
        """
        path = self.path_of(key)
        try:
            _make_folders(path.parent)
            create_durably(path, data, FILE_MODE)
        except FileTakenError:
            raise KeyExistsError(key) from None
        except OSError as exc:
            raise _storage_error(key, path, exc) from exc

    async def preflight(self) -> None:
        await asyncio.to_thread(self._check_writable)

    def _check_writable(self) -> None:
        try:
            _make_folders(self.root)
        except OSError as exc:
            raise StorageError(f"cannot create {self.root}: {exc.strerror or exc}", retryable=False) from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write to {self.root}: permission denied", retryable=False)

    async def load_bytes(self, key: str) -> bytes:
        path = self.path_of(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise _storage_error(key, path, exc) from exc

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_of(key).is_file)

    async def list(self, prefix: str = "") -> builtins.list[str]:
        return await asyncio.to_thread(self._list, prefix)

    def _list(self, prefix: str) -> builtins.list[str]:
        folder = prefix.rpartition("/")[0]
        start = self.root / check_key(folder) if folder else self.root
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            base = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue  # temporary files of writes in progress
                key = name if base == "." else f"{base}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        keys.sort()
        return keys

    def get_url(self, key: str) -> str:
        # Same string as self.path_of(key).as_uri(), without pathlib (called once per batch).
        return self._root_uri + quote(check_key(key))

    @functools.cached_property
    def _root_uri(self) -> str:
        uri = self.root.as_uri()
        return uri if uri.endswith("/") else uri + "/"


def _make_folders(folder: Path) -> None:
    """Create ``folder`` and missing parents as 0755 whatever the umask, so 0644 files stay readable."""
    if folder.is_dir():
        return
    _make_folders(folder.parent)
    try:
        folder.mkdir(mode=DIR_MODE)
    except FileExistsError:
        return  # another writer made it meanwhile
    os.chmod(folder, DIR_MODE)


def _storage_error(key: str, path: Path, exc: OSError) -> StorageError:
    """Map an OS error to a StorageError that says whether retrying can help."""
    transient = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR)
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOENT and not transient:
        return StorageError(f"no object {key!r} at {path}: {reason}", retryable=False)
    hint = " (disk full: free space and it will be retried)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return StorageError(f"cannot write {path}: {reason}{hint}", retryable=transient)
