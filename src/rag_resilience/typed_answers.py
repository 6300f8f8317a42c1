"""Typed answers, framework-free: what the adapters share to keep a degraded answer's type.

- `unavailable`: the `UpstreamUnavailableError` to raise ``from`` an upstream failure when
  nothing of the requested type can be served (never for the caller's own errors or a
  parse failure, which are raised as they are);
- parse failures (a 200 whose answer does not parse or validate) are counted once in the
  policy's stats (`parse_failures`), whether they happened inside an attempt or after it;
- `generic_arity`: a user's generic is ``fn(error)`` or ``fn(input, error)``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

from .classify import is_parse_failure
from .errors import CircuitOpenError, QueueFullError, UpstreamUnavailableError, attempts_of
from .policy import ResiliencePolicy

__all__ = [
    "count_parse_failure",
    "generic_arity",
    "mark_counted",
    "parse_failure_in",
    "unavailable",
]

_COUNTED = "__rag_resilience_parse_counted__"


def unavailable(
    exc: BaseException, policy: ResiliencePolicy, expected: str
) -> UpstreamUnavailableError | None:
    """The error to raise ``from exc`` when an upstream failure left nothing of the
    `expected` type to serve; None when `exc` is not an upstream failure (the caller's own
    error or a parse failure is raised as it is)."""
    if isinstance(exc, UpstreamUnavailableError):
        return None
    verdict = policy.classify(exc)
    if not verdict.fallback_ok or verdict.reason == "parse_failure":
        return None
    attempts = attempts_of(exc)
    if attempts is None and isinstance(exc, (CircuitOpenError, QueueFullError)):
        attempts = 0
    breaker = policy.breaker
    return UpstreamUnavailableError(
        expected,
        attempts=attempts,
        breaker_state=breaker.get_state().value if breaker is not None else None,
        policy=policy.name,
        hint="generic_fallback=callable(input, error) can supply one of the right type",
    )


def mark_counted(exc: BaseException) -> None:
    """The policy already counted this parse failure (it happened inside an attempt)."""
    with contextlib.suppress(Exception):  # exceptions that refuse attributes
        setattr(exc, _COUNTED, True)


def count_parse_failure(policy: ResiliencePolicy, exc: BaseException) -> None:
    if getattr(exc, _COUNTED, False):
        return
    mark_counted(exc)
    note = getattr(policy.collector, "note_parse_failure", None)
    if callable(note):
        note()


def generic_arity(fn: Callable[..., Any]) -> int:
    """1 for ``fn(error)``, 2 for ``fn(input, error)``."""
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return 1
    return 2 if len(params) >= 2 else 1


def parse_failure_in(exc: BaseException) -> bool:
    seen = 0
    link: BaseException | None = exc
    while link is not None and seen < 8:
        if is_parse_failure(link):
            return True
        link, seen = link.__cause__, seen + 1
    return False
