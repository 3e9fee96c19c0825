"""Storage backends and the URL that chooses one.

``file:///abs/path``, ``file://./rel/path`` and plain paths store on local disk;
``s3://bucket/prefix`` stores in S3 or any S3-compatible server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ..errors import ConfigurationError
from .base import StorageBackend
from .local import LocalStorage

if TYPE_CHECKING:
    from .s3 import S3Storage

SUPPORTED_SCHEMES = "file:// (or a plain path), s3://"

__all__ = ["LocalStorage", "S3Storage", "StorageBackend", "storage_from_url"]


def storage_from_url(url: str, **options: Any) -> StorageBackend:
    """The backend a destination URL names; ``options`` go to remote backends."""
    if "://" not in url:
        if not url:
            raise ConfigurationError("empty storage URL; expected " + SUPPORTED_SCHEMES)
        return LocalStorage(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            # file://./rel or file://rel/path: the "host" is the first path segment.
            return LocalStorage(unquote(parts.netloc + parts.path))
        if not parts.path:
            raise ConfigurationError(f"storage URL {url!r} has no path")
        return LocalStorage(unquote(parts.path))
    if scheme == "s3":
        from .s3 import S3Storage

        backend: StorageBackend = S3Storage.from_url(url, **options)
        return backend
    raise ConfigurationError(f"unsupported storage URL {url!r}; supported schemes: {SUPPORTED_SCHEMES}")


def __getattr__(name: str) -> Any:
    # S3Storage is imported on first use so that local-only users do not pay
    # for (or need) the object-store client.
    if name == "S3Storage":
        from .s3 import S3Storage

        return S3Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
