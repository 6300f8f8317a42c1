"""One deadline per user call, propagated through nested wrappers (as gRPC does).

The outermost policy opens a scope; every policy, wrapper, pacer or probe-wait nested inside
it reads what is left with `remaining()` and never waits past it. A scope only ever shortens
what is left: an inner scope with a longer budget keeps the outer expiry.

The expiry is kept with the clock it was read from, so an injected fake clock and the
system clock never mix: `remaining(clock)` answers on the scope's own clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

from .clock import Clock, get_clock

__all__ = ["Deadline", "bound", "current", "remaining", "scope"]


class Deadline(NamedTuple):
    """An absolute expiry on `clock`'s monotonic time."""

    expires_at: float
    clock: Clock

    def remaining(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.expires_at - self.clock.monotonic())


_current: ContextVar[Deadline | None] = ContextVar("rag_resilience_deadline", default=None)


def current() -> Deadline | None:
    """The innermost deadline in force for this thread or task, or None."""
    return _current.get()


def remaining(clock: Clock | None = None) -> float | None:
    """Seconds left before the call's deadline, or None when no deadline is in force.

    `clock` is accepted for symmetry with the other components; the answer always comes
    from the clock the scope was opened with.
    """
    deadline = _current.get()
    if deadline is None:
        return None
    del clock
    return deadline.remaining()


def bound(timeout: float | None) -> float | None:
    """`timeout` shortened to what the deadline leaves (None: no bound from either)."""
    left = remaining()
    if left is None:
        return timeout
    return left if timeout is None else min(timeout, left)


@contextmanager
def scope(seconds: float | None, clock: Clock | None = None) -> Iterator[Deadline | None]:
    """Run the body under a deadline `seconds` from now, never later than an enclosing one.

    `seconds=None` keeps whatever deadline is already in force (possibly none).
    """
    outer = _current.get()
    if seconds is None:
        yield outer
        return
    clk = get_clock(clock)
    expires_at = clk.monotonic() + seconds
    if outer is not None:
        left = outer.remaining()
        if left <= seconds:
            yield outer
            return
    token = _current.set(Deadline(expires_at, clk))
    try:
        yield _current.get()
    finally:
        _current.reset(token)
