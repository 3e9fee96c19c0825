"""Exception hierarchy.

One base class, so that callers can catch everything poh-batcher raises with a
single ``except PohBatcherError``, and specific subclasses for the cases a caller
handles differently: a bad line is skipped, a key collision takes the next seq,
a transient storage failure is retried, a permanent one stops the run.
"""

from __future__ import annotations


class PohBatcherError(Exception):
    """Base class of every error raised on purpose by poh-batcher."""


class ConfigurationError(PohBatcherError, ValueError):
    """An option, URL or argument is invalid; the message says which and why."""


class InvalidAckError(PohBatcherError, ValueError):
    """A line or object is not a valid ACK.

    ``reason`` is the short human explanation (``"missing field 'id'"``);
    ``line`` is the 1-based input line number when the ACK came from a stream.
    """

    def __init__(self, reason: str, line: int | None = None) -> None:
        self.reason = reason
        self.line = line
        super().__init__(f"line {line}: {reason}" if line is not None else reason)


class StorageError(PohBatcherError):
    """Storing or reading an object failed.

    ``retryable`` tells the batcher whether trying again may help (a timeout,
    a 503) or cannot (bad credentials, a missing bucket, a key outside the root).
    """

    retryable: bool = True

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class KeyExistsError(StorageError):
    """The key is already taken: objects are never overwritten."""

    retryable = False

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"refusing to overwrite existing object {key!r}", retryable=False)


class DeliveryError(PohBatcherError):
    """A batch could not be stored after every retry; its ACKs were not delivered."""
