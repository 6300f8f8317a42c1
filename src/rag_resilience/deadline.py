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
from contextvars import ContextVar, Token
from typing import NamedTuple

from .clock import Clock, get_clock

__all__ = ["Deadline", "bound", "current", "enter", "leave", "patience", "remaining", "scope"]


class Deadline(NamedTuple):
    """An absolute expiry on `clock`'s monotonic time."""

    expires_at: float
    clock: Clock

    def remaining(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.expires_at - self.clock.monotonic())


# The variable holds a plain (expires_at, clock) tuple: building a NamedTuple costs about
# as much again as setting the variable, on every call of every policy with a deadline.
_Raw = tuple[float, Clock]
_current: ContextVar[_Raw | None] = ContextVar("rag_resilience_deadline", default=None)
_get = _current.get
_set = _current.set
_NOTHING: tuple[None, None] = (None, None)


def current() -> Deadline | None:
    """The innermost deadline in force for this thread or task, or None."""
    raw = _get()
    return None if raw is None else Deadline(*raw)


def remaining(clock: Clock | None = None) -> float | None:
    """Seconds left before the call's deadline, or None when no deadline is in force.

    `clock` is accepted for symmetry with the other components; the answer always comes
    from the clock the scope was opened with.
    """
    raw = _get()
    if raw is None:
        return None
    del clock
    return max(0.0, raw[0] - raw[1].monotonic())


def patience() -> float:
    """How long a call may wait for something it cannot do without (a probe's verdict):
    what its deadline leaves, the same for plain calls and streams; 0 with no deadline
    (an unbounded wait is never implied)."""
    left = remaining()
    return 0.0 if left is None else left


def bound(timeout: float | None) -> float | None:
    """`timeout` shortened to what the deadline leaves (None: no bound from either)."""
    left = remaining()
    if left is None:
        return timeout
    return left if timeout is None else min(timeout, left)


def enter(
    seconds: float | None, clock: Clock, now: float
) -> tuple[Token[_Raw | None] | None, float | None]:
    """`scope` for hot paths (no generator): open a deadline `seconds` after `now` (read
    from `clock`) unless an enclosing one ends sooner.

    Returns the token to pass to `leave` (None when nothing was set) and the seconds the
    call has left from `now` (None: no deadline at all; 0.0 or less: already expired).
    """
    outer = _get()
    if outer is None:
        if seconds is None:
            return _NOTHING
        return _set((now + seconds, clock)), seconds
    expires_at, outer_clock = outer
    left = expires_at - (now if outer_clock is clock else outer_clock.monotonic())
    if seconds is None or left <= seconds:
        return None, left
    return _set((now + seconds, clock)), seconds


#: Close what `enter` opened, in the same thread or task (only a token that is not None).
leave = _current.reset


@contextmanager
def scope(seconds: float | None, clock: Clock | None = None) -> Iterator[Deadline | None]:
    """Run the body under a deadline `seconds` from now, never later than an enclosing one.

    `seconds=None` keeps whatever deadline is already in force (possibly none).
    """
    if seconds is None:
        yield current()
        return
    clk = get_clock(clock)
    token, _ = enter(seconds, clk, clk.monotonic())
    try:
        yield current()
    finally:
        if token is not None:
            leave(token)
