"""Failover: go to a healthy fallback at once instead of spending the primary's retries.

`failover="after_retries"` (the first release's behaviour) tries the fallbacks only after
the primary's last attempt. `failover="immediate"` stops retrying the primary as soon as an
attempt fails with an upstream error (retryable: 5xx, 429, timeouts, connection errors)
while some fallback is healthy, so no call waits out a dead primary's backoff. The caller's
own errors (400, 401, 404, 422, ...) are never failed over: they go back to the caller.
An open primary circuit sends calls to the fallbacks at once in both modes; once the
primary's probe succeeds (a caller arriving after its open period is the probe), calls go
back to it.

A fallback is healthy unless it carries a `breaker` (fallback models do: the callable, or
for a `functools.partial` one of its arguments) whose circuit is open: a plain fallback
function is always worth a try.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

__all__ = ["FAILOVER_MODES", "check_failover", "has_healthy_fallback"]

FAILOVER_MODES = ("after_retries", "immediate")


def check_failover(mode: str) -> str:
    if mode not in FAILOVER_MODES:
        raise ValueError(f"failover must be one of {list(FAILOVER_MODES)}, got {mode!r}")
    return mode


def has_healthy_fallback(fallbacks: Iterable[Callable[..., Any]]) -> bool:
    """True if some fallback's circuit admits calls (or it has none)."""
    for fallback in fallbacks:
        breaker = _breaker_of(fallback)
        if breaker is None or breaker.get_state().value != "open":
            return True
    return False


def _breaker_of(fallback: Callable[..., Any]) -> Any:
    breaker = getattr(fallback, "breaker", None)
    if breaker is None and isinstance(fallback, partial):
        for arg in fallback.args:
            breaker = getattr(arg, "breaker", None)
            if breaker is not None:
                break
    return breaker
