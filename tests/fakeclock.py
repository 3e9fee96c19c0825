"""A controllable clock for tests: time only moves when the test advances it.

``FakeClock`` implements :class:`poh_batcher.clock.Clock`. ``sleep(s)`` parks the
caller until :meth:`FakeClock.advance` moves time to or past its deadline, so a
test can show "not flushed before the timeout, flushed at it" without waiting
for real time to pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

DEFAULT_START = datetime(2025, 1, 1, 12, 30, tzinfo=UTC)


class FakeClock:
    """Monotonic time starting at 0 and a UTC wall clock ``start`` + elapsed."""

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        self._now = 0.0
        self._start = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.sleeps: list[float] = []  # every duration asked for, in order

    def monotonic(self) -> float:
        return self._now

    def utcnow(self) -> datetime:
        return self._start + timedelta(seconds=self._now)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._now + seconds, future)
        self._sleepers.append(entry)
        try:
            await future
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    @property
    def sleeping(self) -> int:
        """How many callers are parked in :meth:`sleep`."""
        return sum(1 for _, future in self._sleepers if not future.done())

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come."""
        if seconds < 0:
            raise ValueError("time does not go back")
        self._now += seconds
        for deadline, future in list(self._sleepers):
            if deadline <= self._now + 1e-9 and not future.done():
                future.set_result(None)


async def settle(rounds: int = 20) -> None:
    """Let every ready task run (several loop iterations), without real waiting."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def wait_real(awaitable: Awaitable[Any], limit: float = 5.0) -> Any:
    """Await something that finishes on a worker thread (packing, disk I/O), with a safety limit."""
    return await asyncio.wait_for(asyncio.ensure_future(awaitable), limit)


async def drive(clock: FakeClock, future: asyncio.Future[Any], step: float = 1.0, limit: float = 5.0) -> None:
    """Advance ``clock`` by ``step`` until ``future`` is done (for retry back-off).

    Yields to the loop (and briefly to worker threads) between steps; gives up
    after ``limit`` real seconds so a broken batcher fails the test, not hangs it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not future.done():
        if loop.time() > deadline:
            raise TimeoutError("future not done while driving the fake clock")
        clock.advance(step)
        await asyncio.sleep(0.005)
