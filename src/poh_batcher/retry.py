"""Retry with exponential back-off and full jitter.

Full jitter (a uniform delay between 0 and the exponential cap) spreads the
retries of many writers hitting one recovering server, as recommended by the
AWS architecture blog "Exponential Backoff and Jitter".
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .clock import Clock
from .errors import StorageError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a failing store is retried.

    ``attempts`` counts the first try; ``attempts=None`` retries until the
    operation succeeds or fails permanently (the command uses this, since its
    spool keeps the data meanwhile).
    """

    attempts: int | None = 5
    initial_delay: float = 0.1
    max_delay: float = 10.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("delays must be >= 0 and the multiplier >= 1")

    def delay(self, retry: int, rng: random.Random) -> float:
        """Back-off before retry number ``retry`` (1-based): uniform in [0, cap]."""
        cap = min(self.max_delay, self.initial_delay * self.multiplier ** (retry - 1))
        return rng.uniform(0.0, cap)


def is_retryable(exc: BaseException) -> bool:
    """Whether trying again may help; storage errors say so themselves."""
    if isinstance(exc, StorageError):
        return exc.retryable
    return isinstance(exc, Exception)


async def call_with_retry(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    clock: Clock,
    *,
    rng: random.Random | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Run ``operation`` until it succeeds, fails permanently, or attempts run out."""
    attempt = 1
    while True:
        try:
            return await operation()
        except Exception as exc:
            if not is_retryable(exc) or (policy.attempts is not None and attempt >= policy.attempts):
                raise
            if rng is None:
                rng = random.Random()  # only on a retry: seeding costs more than a whole fast store
            delay = policy.delay(attempt, rng)
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            attempt += 1
            await clock.sleep(delay)
