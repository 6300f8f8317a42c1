"""Time as a dependency: every component reads the clock and sleeps through a `Clock`.

Tests and demos swap the process-wide default (`set_default_clock`, or
`rag_resilience.testing.fake_clock()`) so no test waits for real backoff, the way
stamina's ``set_testing`` does. Components built with ``clock=None`` resolve the
default at call time, so a clock installed after construction still applies.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock", "get_clock", "set_default_clock"]


@runtime_checkable
class Clock(Protocol):
    """Monotonic time for intervals, wall time for ages that outlive a process, and sleep."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    async def asleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    __slots__ = ()

    # The C functions themselves, not methods wrapping them: read on every call, and a
    # Python frame per read was a tenth of the policy's own cost.
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
_default: Clock = SYSTEM_CLOCK


def get_clock(clock: Clock | None = None) -> Clock:
    """Return `clock` if given, else the process-wide default."""
    return clock if clock is not None else _default


def set_default_clock(clock: Clock | None) -> Clock:
    """Install `clock` as the default (None restores the system clock); returns the previous one."""
    global _default
    previous = _default
    _default = clock if clock is not None else SYSTEM_CLOCK
    return previous
