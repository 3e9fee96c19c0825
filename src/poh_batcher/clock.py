"""Time as a dependency, so tests can advance it instead of sleeping.

The batcher reads the monotonic clock for flush deadlines and the wall clock
(UTC) for key names, and sleeps for timers and retry back-off; all three go
through a ``Clock``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """What the batcher needs to know about time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""

    def utcnow(self) -> datetime:
        """The current UTC time (names the hour folder of a batch)."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def utcnow(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
