"""S3 backend (AWS S3 or any S3-compatible server), through obstore.

obstore is async-native (a Rust client on its own runtime), so no call here
takes a thread. What each write carries, and why:

* **Never overwrite.** Every object is written with one conditional PUT,
  ``mode="create"`` (``If-None-Match: *``); a ``412 Precondition Failed``
  becomes :class:`KeyExistsError` and the batcher takes the next seq. Batches
  are never uploaded as multipart (``use_multipart=False``): a single PUT is
  atomic and carries the condition; a batch is far below the 5 GiB limit.
* **Integrity.** obstore cannot send ``Content-MD5`` per request, but it
  supports the S3 "additional checksums": the store is built with
  ``checksum_algorithm="SHA256"``, so each PUT carries
  ``x-amz-checksum-sha256`` (stored with the object, shown by
  ``HeadObject(ChecksumMode=ENABLED)``) and the server rejects a body that
  does not match with ``400 BadDigest`` (tested by corrupting a body in a
  proxy). The payload is also SigV4-signed (``unsigned_payload`` stays off),
  so AWS verifies ``x-amz-content-sha256`` too; SeaweedFS 4.48 does not
  check that one (a corrupted body with only a signed payload was accepted),
  which is why the additional checksum is needed. A rejected body
  (``BadDigest``, ``XAmzContentSHA256Mismatch``) was corrupted in transit and
  is retried. ``config={"checksum_algorithm": "CRC64NVME"}`` also works.
* **Content type, encoding and metadata** go as ``Content-Type``,
  ``Content-Encoding`` and ``x-amz-meta-*`` (``ack-count``, ``codec``), so
  :meth:`S3Storage.head` (and any ``ls`` tool) shows them without a download.
* **A PUT whose answer was lost.** When a PUT fails retryably (a dropped
  connection, a timeout) the object may nevertheless have been stored. If the
  retry then meets ``412``, the existing object's ETag is compared with the
  MD5 of our bytes: equal means it is our own earlier write, and the save
  succeeds instead of storing the same batch twice under two seqs. A
  different or unknown ETag (e.g. SSE-KMS) stays a :class:`KeyExistsError`:
  a duplicate at worst, never a loss.

Retries: the batcher retries with exponential back-off and full jitter, so
obstore's own retry is kept low (2 retries within 15 s, 50 ms .. 1 s back-off)
rather than disabled: it hides a stale pooled connection or a one-off 503
without costing a batcher attempt, and does not multiply into minutes of
hidden waiting. Pass ``retry_config`` to change it.

Errors become :class:`StorageError` with one line that names the bucket (and
key) and the cause; the secret key is never part of it. 5xx, 429, ``SlowDown``,
``RequestTimeout``, timeouts and connection errors are retryable; bad or
unknown credentials, ``AccessDenied`` and a missing bucket are not.

Credentials and region come from the standard AWS sources as obstore reads
them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, web identity, ECS/EKS, EC2 instance
metadata). obstore does not read ``~/.aws`` profiles itself: when
``AWS_PROFILE`` is set (and no key is given) and boto3 is installed, the
profile's credentials are used through ``obstore.auth.boto3``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    InvalidPathError,
    NotSupportedError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
    UnknownConfigurationKeyError,
)
from obstore.store import S3Store

from ..errors import ConfigurationError, KeyExistsError, StorageError
from ..naming import normalize_prefix
from .base import StorageBackend, check_key

if TYPE_CHECKING:
    from obstore import Attributes
    from obstore.store import ClientConfig, RetryConfig, S3Config

__all__ = ["DEFAULT_RETRY_CONFIG", "ObjectInfo", "S3Storage"]

DEFAULT_RETRY_CONFIG: RetryConfig = {
    "max_retries": 2,
    "retry_timeout": timedelta(seconds=15),
    "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=1), "base": 2},
}
"""obstore's own retry: low, because the batcher retries with back-off and jitter itself."""

CHECKSUM_ALGORITHM = "SHA256"
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")
_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_RETRIES = re.compile(r"\bretries: (\d+)")

# S3 error codes that trying again can cure.
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "BadDigest",
        "XAmzContentSHA256Mismatch",
        "IncompleteBody",
        "OperationAborted",
    }
)
_CREDENTIAL_HINTS = {
    "InvalidAccessKeyId": "the access key id is not known to the server (check AWS_ACCESS_KEY_ID or the profile)",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id (check AWS_SECRET_ACCESS_KEY)",
    "AccessDenied": "access denied: the credentials lack permission for this bucket or prefix",
    "AllAccessDisabled": "all access to this bucket has been disabled",
    "AccountProblem": "the AWS account has a problem that prevents access",
    "ExpiredToken": "the session token has expired (refresh AWS_SESSION_TOKEN)",
    "InvalidToken": "the session token is invalid (check AWS_SESSION_TOKEN)",
    "TokenRefreshRequired": "the session token must be refreshed",
    "RequestTimeTooSkewed": "this machine's clock differs too much from the server's; fix the clock",
    "AuthorizationHeaderMalformed": "the request was signed for the wrong region (set AWS_REGION or --s3-region)",
    "PermanentRedirect": "the bucket lives in another region or endpoint (set AWS_REGION or --s3-endpoint)",
}


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a HEAD tells about one object, without downloading it."""

    key: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    """User metadata (``x-amz-meta-*``), e.g. ``{"ack-count": "256", "codec": "zstd"}``."""
    content_type: str | None = None
    content_encoding: str | None = None
    etag: str | None = None


class S3Storage(StorageBackend):
    """Batches as objects in ``bucket`` under ``prefix``; keys are relative to the prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        allow_http: bool | None = None,
        client_options: ClientConfig | None = None,
        retry_config: RetryConfig | None = None,
        config: S3Config | None = None,
    ) -> None:
        if not bucket or "/" in bucket or not _BUCKET.fullmatch(bucket.lower()):
            raise ConfigurationError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.endpoint = (endpoint or _endpoint_from_env() or "").rstrip("/") or None
        options: dict[str, Any] = dict(client_options or {})
        if allow_http is None and "allow_http" not in options and self.endpoint is not None:
            allow_http = self.endpoint.lower().startswith("http://")
        if allow_http is not None:
            options["allow_http"] = allow_http
        s3_config: dict[str, Any] = dict(config or {})
        s3_config.setdefault("checksum_algorithm", CHECKSUM_ALGORITHM)
        if self.endpoint is not None:
            s3_config["endpoint"] = self.endpoint
        if region is not None:
            s3_config["region"] = region
        if access_key_id is not None:
            s3_config["access_key_id"] = access_key_id
        if secret_access_key is not None:
            s3_config["secret_access_key"] = secret_access_key
        if session_token is not None:
            s3_config["session_token"] = session_token
        # Kept only to scrub it from messages, should a server ever echo it.
        self._secret = secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or None
        credential_provider = None
        if access_key_id is None and "access_key_id" not in s3_config:
            credential_provider = _profile_credentials()
        try:
            self._store = S3Store(
                bucket,
                config=s3_config,  # type: ignore[arg-type]
                client_options=options,  # type: ignore[arg-type]
                retry_config=retry_config if retry_config is not None else DEFAULT_RETRY_CONFIG,
                credential_provider=credential_provider,
            )
        except (BaseError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot configure S3 bucket {bucket!r}: {self._scrub(_first_line(str(exc)))}"
            ) from None
        self._uncertain: set[str] = set()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Storage:
        """``s3://bucket[/prefix]``; ``options`` are the keyword arguments of the constructor."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("s3", "s3a"):
            raise ConfigurationError(f"not an S3 URL: {url!r}; expected s3://bucket/prefix")
        if not parts.netloc:
            raise ConfigurationError(f"S3 URL {url!r} names no bucket; expected s3://bucket/prefix")
        if parts.query or parts.fragment:
            raise ConfigurationError(f"S3 URL {url!r} must not have a query or fragment")
        return cls(parts.netloc, normalize_prefix(unquote(parts.path)), **options)

    def __repr__(self) -> str:
        where = f", endpoint={self.endpoint!r}" if self.endpoint else ""
        return f"S3Storage({self.bucket!r}, {self.prefix!r}{where})"

    # -- keys ----------------------------------------------------------------

    def _path(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def get_url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._path(key)}"

    @property
    def url(self) -> str:
        """``s3://bucket[/prefix]``, the destination as a whole."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # -- writing -------------------------------------------------------------

    async def save_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        content_encoding: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        path = self._path(key)
        attributes: Attributes = {}
        if content_type:
            attributes["Content-Type"] = content_type
        if content_encoding:
            attributes["Content-Encoding"] = content_encoding
        for name, value in (metadata or {}).items():
            attributes[name.lower()] = value
        try:
            await obstore.put_async(
                self._store,
                path,
                data,
                attributes=attributes,
                mode="create",
                use_multipart=False,
            )
        except (AlreadyExistsError, PreconditionError) as exc:
            retried = _retries_of(exc) != 0  # unknown counts as retried
            if (retried or path in self._uncertain) and await self._holds(path, data):
                self._uncertain.discard(path)
                return  # our own earlier PUT had landed; its answer was lost
            self._uncertain.discard(path)
            raise KeyExistsError(key) from None
        except Exception as exc:
            error = self._error("PUT", path, exc)
            if error.retryable:
                self._uncertain.add(path)
            raise error from exc
        self._uncertain.discard(path)

    async def _holds(self, path: str, data: bytes) -> bool:
        """Whether the object at ``path`` has exactly ``data`` (single-part ETag = MD5)."""
        try:
            meta = await obstore.head_async(self._store, path)
        except Exception:
            return False
        etag = (meta.get("e_tag") or "").strip('"').lower()
        return etag == hashlib.md5(data, usedforsecurity=False).hexdigest()

    # -- reading -------------------------------------------------------------

    async def load_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            result = await obstore.get_async(self._store, path)
            return bytes(await result.bytes_async())
        except Exception as exc:
            raise self._error("GET", path, exc) from exc

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        try:
            await obstore.head_async(self._store, path)
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self._error("HEAD", path, exc) from exc
        return True

    async def head(self, key: str) -> ObjectInfo:
        """Size, user metadata, content type and encoding of ``key``, without its bytes."""
        path = self._path(key)
        try:
            result = await obstore.get_async(self._store, path, options={"head": True})
        except Exception as exc:
            raise self._error("HEAD", path, exc) from exc
        attributes = dict(result.attributes)
        content_type = attributes.pop("Content-Type", None)
        content_encoding = attributes.pop("Content-Encoding", None)
        for standard in ("Content-Disposition", "Content-Language", "Cache-Control", "Storage-Class"):
            attributes.pop(standard, None)
        meta = result.meta
        return ObjectInfo(
            key=key,
            size=meta["size"],
            metadata={str(name): str(value) for name, value in attributes.items()},
            content_type=content_type,
            content_encoding=content_encoding,
            etag=meta.get("e_tag"),
        )

    async def list(self, prefix: str = "") -> list[str]:
        # obstore lists whole path segments ("a/b" matches "a/b/x", not "a/bc"),
        # so list the folder that holds the prefix and filter by string.
        folder = prefix.rpartition("/")[0]
        if folder:
            check_key(folder)
        parts = [part for part in (self.prefix, folder) if part]
        listed = "/".join(parts) if parts else None
        strip = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        try:
            async for chunk in obstore.list(self._store, listed, chunk_size=1000):
                for meta in chunk:
                    path = meta["path"]
                    if not path.startswith(strip):
                        continue
                    key = path[len(strip) :]
                    if key.startswith(prefix):
                        keys.append(key)
        except Exception as exc:
            raise self._error("LIST", (listed or "") + "/", exc) from exc
        keys.sort()
        return keys

    async def preflight(self) -> None:
        """Fail fast, with one clear line, if the bucket is missing or the credentials do not work.

        Lists at most one key under the prefix: this needs the bucket to exist
        and the credentials to be valid and allowed to list, as the batcher
        itself needs (it lists an hour's folder to continue the seq).
        """
        listed = self.prefix or None
        try:
            stream = obstore.list(self._store, listed, chunk_size=1)
            async for _chunk in stream:
                break
        except Exception as exc:
            reason, retryable = self._classify("LIST", exc)
            raise StorageError(f"cannot use {self.url}: {reason}", retryable=retryable) from exc

    async def close(self) -> None:
        """obstore keeps a pooled HTTP client that is released with the store; nothing to flush."""

    # -- errors --------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return text

    def _error(self, operation: str, path: str, exc: BaseException) -> StorageError:
        """One line naming the operation, the object and the cause, and whether to retry."""
        if isinstance(exc, StorageError):
            return exc
        reason, retryable = self._classify(operation, exc)
        return StorageError(f"S3 {operation} s3://{self.bucket}/{path} failed: {reason}", retryable=retryable)

    def _classify(self, operation: str, exc: BaseException) -> tuple[str, bool]:
        """Why ``exc`` happened, in words, and whether trying again may help."""
        text = str(exc)
        status_match = _STATUS.search(text)
        status = int(status_match[1]) if status_match else None
        code_match = _CODE.search(text)
        code = code_match[1] if code_match else None
        if code == "NoSuchBucket" or (operation == "LIST" and status == 404):
            return f"bucket {self.bucket!r} does not exist{self._at()}; create it or fix the URL", False
        if code in _CREDENTIAL_HINTS:
            return f"access to bucket {self.bucket!r}{self._at()} refused: {code}: {_CREDENTIAL_HINTS[code]}", False
        if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or status in (401, 403):
            hint = "credentials rejected or lacking permission (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            return f"access to bucket {self.bucket!r}{self._at()} refused: HTTP {status or 403}: {hint}", False
        if isinstance(exc, FileNotFoundError) or status == 404:
            return "no such object", False
        if isinstance(exc, (InvalidPathError, NotSupportedError, UnknownConfigurationKeyError, ValueError)):
            return self._scrub(_first_line(text)), False
        cause = self._cause(text, status, code)
        if status is not None:
            return cause, status >= 500 or status == 429 or code in _RETRYABLE_CODES
        # No HTTP status: the request never got an answer (refused, reset, timed out).
        return f"{cause}{self._at()}", True

    def _at(self) -> str:
        return f" at {self.endpoint}" if self.endpoint else ""

    def _cause(self, text: str, status: int | None, code: str | None) -> str:
        if status is not None:
            message_match = _MESSAGE.search(text)
            parts = [f"HTTP {status}"]
            if code:
                parts.append(code)
            if message_match and message_match[1].strip():
                parts.append(message_match[1].strip())
            return self._scrub(": ".join(parts))
        line = _first_line(text)
        # "... Error performing PUT http://... in 1.2ms - HTTP error: error sending request"
        detail = line.rpartition(" - ")[2] if " - " in line else line
        lowered = text.lower().replace("retry_timeout", "")
        for needles, label in (
            (("connectionrefused", "connection refused"), "connection refused"),
            (("connectionreset", "connection reset"), "connection reset"),
            (("incompletemessage", "connection closed", "broken pipe", "unexpectedeof"), "connection closed early"),
            (("timedout", "timed out", "kind: timeout"), "timed out"),
            (("dns error", "failed to lookup"), "DNS lookup failed"),
        ):
            if any(needle in lowered for needle in needles):
                detail = f"{detail} ({label})"
                break
        return self._scrub(detail)


def _endpoint_from_env() -> str | None:
    for name in _ENDPOINT_VARIABLES:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _profile_credentials() -> Any:
    """A boto3-backed credential provider when ``AWS_PROFILE`` is set and no key is in the environment."""
    profile = os.environ.get("AWS_PROFILE")
    if not profile or os.environ.get("AWS_ACCESS_KEY_ID"):
        return None
    try:
        import boto3  # type: ignore[import-untyped]
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise ConfigurationError(
            f"AWS_PROFILE={profile!r} needs boto3 to read ~/.aws profiles: pip install boto3, "
            "or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    try:
        return Boto3CredentialProvider(boto3.Session(profile_name=profile))
    except Exception as exc:  # botocore's ProfileNotFound, NoCredentialsError, a broken config file
        raise ConfigurationError(f"cannot use AWS profile {profile!r}: {_first_line(str(exc))}") from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


def _retries_of(exc: BaseException) -> int | None:
    match = _RETRIES.search(str(exc))
    return int(match[1]) if match else None
