"""Test helpers shipped with the package: a fake clock so suites never really sleep.

>>> from rag_resilience.testing import fake_clock
>>> with fake_clock() as clock:
...     ...  # every RetryStrategy/CircuitBreaker/... built with clock=None now uses it
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .clock import Clock, set_default_clock

__all__ = ["FakeClock", "fake_clock"]


class FakeClock:
    """A clock that only moves when told to, or when someone sleeps on it.

    `sleep` advances time instantly and records the requested duration, so a test
    can assert the exact backoff schedule. Thread-safe.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._mono = start
        self._offset = wall_start - start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._mono + self._offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        with self._lock:
            self._mono += seconds

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._mono += max(0.0, seconds)

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)  # still yield, so other tasks interleave as they would

    @property
    def total_slept(self) -> float:
        return sum(self.sleeps)

    def __repr__(self) -> str:
        return f"FakeClock(monotonic={self._mono:.3f})"


@contextmanager
def fake_clock(clock: FakeClock | None = None) -> Iterator[FakeClock]:
    """Install a FakeClock as the process default for the duration of the block."""
    fake = clock if clock is not None else FakeClock()
    previous: Clock = set_default_clock(fake)
    try:
        yield fake
    finally:
        set_default_clock(previous)
