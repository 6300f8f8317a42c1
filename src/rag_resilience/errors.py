"""Exceptions raised by rag-resilience, and helpers to annotate the user's own.

Hierarchy::

    Exception
    └── ResilienceError                 base of everything we raise ourselves
        ├── CircuitOpenError            breaker is OPEN (or HALF_OPEN and out of probes): no call made
        │                               (also a ConnectionError: code that handles an unreachable
        │                               upstream handles a rejected call the same way)
        ├── QueueFullError              concurrency limit / queue full: backpressure, no call made
        │   └── WaitTimeoutError        waited `wait_timeout` for a permit and got none
        ├── RetryBudgetExceededError    never raised alone: noted on the original error
        └── DeadlineExceededError       (also a TimeoutError) attempt or total deadline passed

Upstream errors are never replaced by ours: when retries are exhausted the caller gets
the original exception, with the attempt history added as a note (PEP 678), and marked
as handled so an outer policy does not retry it again (nesting must not multiply attempts).
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = [
    "CircuitOpenError",
    "DeadlineExceededError",
    "QueueFullError",
    "ResilienceError",
    "RetryBudgetExceededError",
    "WaitTimeoutError",
    "add_note",
    "is_handled",
    "mark_handled",
]

_HANDLED_ATTR = "__rag_resilience_handled__"


class ResilienceError(Exception):
    """Base class of the errors this library raises itself."""


class CircuitOpenError(ResilienceError, ConnectionError):
    """The circuit is open: the call was rejected without reaching the upstream.

    `retry_after` is the number of seconds until the breaker admits a probe. `state` is
    "open", "half_open" (a probe's verdict did not come within `probe_wait`) or "slow_start"
    (the ramp after closing stayed full past the caller's wait budget). It is a
    ConnectionError too, so existing ``except ConnectionError`` handlers (the seed's
    demos have them) treat "the breaker refused" like "the upstream refused".
    """

    def __init__(self, name: str, retry_after: float, state: str = "open") -> None:
        self.name = name
        self.retry_after = max(0.0, retry_after)
        self.state = state
        super().__init__(f"circuit '{name}' is {state}; next probe in {self.retry_after:.1f}s")


class QueueFullError(ResilienceError):
    """Backpressure: the concurrency limit and its wait queue are full; the call was not made."""

    def __init__(
        self, message: str, *, in_flight: int = 0, waiting: int = 0, limit: int = 0
    ) -> None:
        self.in_flight = in_flight
        self.waiting = waiting
        self.limit = limit
        super().__init__(message)


class WaitTimeoutError(QueueFullError):
    """A caller waited its `wait_timeout` for a permit and none became free."""


class RetryBudgetExceededError(ResilienceError):
    """The retry budget for the window is spent; retrying would amplify an outage."""


class DeadlineExceededError(ResilienceError, TimeoutError):
    """An attempt or the whole call ran past its deadline."""

    def __init__(self, message: str, *, timeout: float | None = None, scope: str = "total") -> None:
        self.timeout = timeout
        #: "attempt" (one attempt ran too long: retryable) or "total" (the call's deadline: final)
        self.scope = scope
        super().__init__(message)


def add_note(exc: BaseException, note: str) -> None:
    """PEP 678 `add_note`, also on Python 3.10."""
    adder = getattr(exc, "add_note", None)
    if adder is not None:
        adder(note)
        return
    notes: Any = getattr(exc, "__notes__", None)
    if notes is None:
        notes = []
        try:
            exc.__notes__ = notes  # type: ignore[attr-defined]
        except Exception:  # pragma: no cover - exotic exception types
            return
    notes.append(note)


def mark_handled(exc: BaseException) -> None:
    """Record that a policy already spent its attempts on `exc` (outer policies won't retry)."""
    with contextlib.suppress(Exception):  # exceptions that refuse attributes
        setattr(exc, _HANDLED_ATTR, True)


def is_handled(exc: BaseException) -> bool:
    """True if a policy already retried `exc`, or it is a CircuitOpenError/QueueFullError."""
    return bool(getattr(exc, _HANDLED_ATTR, False)) or isinstance(
        exc, (CircuitOpenError, QueueFullError)
    )
