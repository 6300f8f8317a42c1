"""Exceptions raised by rag-resilience, and helpers to annotate the user's own.

Hierarchy::

    Exception
    └── ResilienceError                 base of everything we raise ourselves
        ├── CircuitOpenError            breaker is OPEN (or HALF_OPEN and out of probes): no call made
        │                               (also a ConnectionError: code that handles an unreachable
        │                               upstream handles a rejected call the same way)
        ├── QueueFullError              concurrency limit / queue full: backpressure, no call made
        │   ├── WaitTimeoutError        waited `wait_timeout` for a permit and got none
        │   └── RateLimitedError        pacing to the upstream's rate limit would wait past the
        │                               call's deadline (or the pacing queue is full): no call made
        ├── RetryBudgetExceededError    never raised alone: noted on the original error
        ├── DeadlineExceededError       (also a TimeoutError) attempt or total deadline passed
        ├── UpstreamUnavailableError    the upstream failed and no degraded answer of the
        │                               requested type exists (structured output, tool call,
        │                               dict chain); the upstream error is its __cause__
        └── MalformedResponseError      the upstream answered 200 with a body that is not
                                        the API's (e.g. a text/plain page): an upstream fault

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
    "MalformedResponseError",
    "QueueFullError",
    "RateLimitedError",
    "ResilienceError",
    "RetryBudgetExceededError",
    "UpstreamUnavailableError",
    "WaitTimeoutError",
    "add_note",
    "attempts_of",
    "is_handled",
    "mark_handled",
    "mark_malformed_response",
    "set_attempts",
]

_HANDLED_ATTR = "__rag_resilience_handled__"
_MALFORMED_ATTR = "__rag_resilience_malformed_response__"


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


class RateLimitedError(QueueFullError):
    """Our pacer would have to hold the call past its deadline (or its wait queue is full).

    Raised before any request is sent, at once rather than after waiting: the upstream is
    rate limited and this call's turn comes too late. `wait` is the seconds the call would
    have had to wait (None when rejected because the queue is full), `max_wait` what its
    deadline allowed, `upstream` the pacer's key (never an API key).
    """

    def __init__(
        self,
        message: str,
        *,
        upstream: str = "",
        wait: float | None = None,
        max_wait: float | None = None,
        waiting: int = 0,
    ) -> None:
        self.upstream = upstream
        self.wait = wait
        self.max_wait = max_wait
        super().__init__(message, waiting=waiting)


class RetryBudgetExceededError(ResilienceError):
    """The retry budget for the window is spent; retrying would amplify an outage."""


class DeadlineExceededError(ResilienceError, TimeoutError):
    """An attempt or the whole call ran past its deadline."""

    def __init__(self, message: str, *, timeout: float | None = None, scope: str = "total") -> None:
        self.timeout = timeout
        #: "attempt" (one attempt ran too long: retryable) or "total" (the call's deadline: final)
        self.scope = scope
        super().__init__(message)


class UpstreamUnavailableError(ResilienceError):
    """The upstream failed and nothing of the requested type can be served instead.

    Raised where a plain-text generic answer would be the wrong type (structured output,
    tool calls, dict outputs of a chain) and there is no cached answer of the same call,
    no fallback model answer and no typed `generic_fallback`. Always raised ``from`` the
    upstream error (its ``__cause__``). `attempts` is how many upstream attempts were made
    (0: rejected by the breaker or the limit), `breaker_state` the circuit's state then,
    `expected` what the caller asked for ("structured output", "tool call", ...).
    """

    def __init__(
        self,
        expected: str,
        *,
        attempts: int | None = None,
        breaker_state: str | None = None,
        policy: str | None = None,
        hint: str = "",
    ) -> None:
        self.expected = expected
        self.attempts = attempts
        self.breaker_state = breaker_state
        self.policy = policy
        self.hint = hint
        tried = f" after {attempts} attempt(s)" if attempts is not None else ""
        state = f", circuit {breaker_state}" if breaker_state else ""
        where = f"[{policy}] " if policy else ""
        super().__init__(
            f"{where}upstream unavailable{tried}{state}: no cached answer of this call and no "
            f"degraded answer that is a valid {expected}" + (f"; {hint}" if hint else "")
        )


_ATTEMPTS_ATTR = "__rag_resilience_attempts__"


def set_attempts(exc: BaseException, attempts: int) -> None:
    """Record how many attempts a policy made before giving up on `exc`."""
    with contextlib.suppress(Exception):
        setattr(exc, _ATTEMPTS_ATTR, attempts)


def attempts_of(exc: BaseException) -> int | None:
    """The attempts a policy recorded on `exc` (None if no policy gave up on it)."""
    value = getattr(exc, _ATTEMPTS_ATTR, None)
    return value if isinstance(value, int) else None


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


class MalformedResponseError(ResilienceError):
    """The upstream answered 200 with a body that is not the API's answer (a text/plain
    gateway page where JSON was due...). An upstream fault: retried, counted by the
    breaker, may be served degraded. `body` holds the start of what came back."""

    def __init__(self, message: str, *, body: Any = None) -> None:
        self.body = body
        super().__init__(message)


def mark_malformed_response(exc: BaseException) -> BaseException:
    """Mark `exc`, raised while the SDK read a 200 answer (a truncated JSON body gives
    `json.JSONDecodeError`), as an upstream fault: classified retryable and a breaker
    failure, unlike the same exception raised by the caller's own parsing. Returns `exc`
    so adapters can ``raise mark_malformed_response(exc)`` and keep the original."""
    with contextlib.suppress(Exception):
        setattr(exc, _MALFORMED_ATTR, True)
    return exc


def is_malformed_response(exc: BaseException) -> bool:
    return isinstance(exc, MalformedResponseError) or bool(getattr(exc, _MALFORMED_ATTR, False))


def mark_handled(exc: BaseException) -> None:
    """Record that a policy already spent its attempts on `exc` (outer policies won't retry)."""
    with contextlib.suppress(Exception):  # exceptions that refuse attributes
        setattr(exc, _HANDLED_ATTR, True)


def is_handled(exc: BaseException) -> bool:
    """True if a policy already retried `exc`, or it is a CircuitOpenError/QueueFullError."""
    return bool(getattr(exc, _HANDLED_ATTR, False)) or isinstance(
        exc, (CircuitOpenError, QueueFullError)
    )
