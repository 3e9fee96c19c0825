"""poh-batcher: archive Proof-of-History ACKs as compressed batches, never losing one."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .batcher import AsyncBatcher, Batcher, BatchReceipt, pack_acks, unpack_batch
from .compression import compress, decompress
from .errors import (
    ConfigurationError,
    DeliveryError,
    InvalidAckError,
    KeyExistsError,
    PohBatcherError,
    StorageError,
)
from .reader import ArchiveReader, Batch, BatchError, BatchRef, iter_acks, iter_batches
from .retry import RetryPolicy
from .storage import LocalStorage, StorageBackend, storage_from_url
from .types import AckItem, AckRequest, BatchHeader, PackedBatch

try:
    __version__ = version("poh-batcher")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "AckItem",
    "AckRequest",
    "ArchiveReader",
    "AsyncBatcher",
    "Batch",
    "BatchError",
    "BatchHeader",
    "BatchReceipt",
    "BatchRef",
    "Batcher",
    "ConfigurationError",
    "DeliveryError",
    "InvalidAckError",
    "KeyExistsError",
    "LocalStorage",
    "PackedBatch",
    "PohBatcherError",
    "RetryPolicy",
    "StorageBackend",
    "StorageError",
    "__version__",
    "compress",
    "decompress",
    "iter_acks",
    "iter_batches",
    "pack_acks",
    "storage_from_url",
    "unpack_batch",
]
