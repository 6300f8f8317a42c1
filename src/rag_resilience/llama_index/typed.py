"""Typed answers in LlamaIndex: tool calls and structured predictions keep their type.

A chat request with ``tools`` (what `chat_with_tools`, `predict_and_call`, programs,
`structured_predict`, `as_structured_llm` and agents send) or a ``response_format`` never
gets the generic text: a cached answer of the same call, a fallback LLM's answer, the
user's ``generic_fallback(input, error)``, else `UpstreamUnavailableError` from the
upstream error (instead of LlamaIndex's "Expected at least one tool call, but got 0 tool
calls", which hid the 503).

A parse or validation failure is the model's answer: raised as LlamaIndex raises it,
counted in the policy's stats (`parse_failures`), retried only with ``parse_retries=N``.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

from ..degraded import note_degraded
from ..errors import UpstreamUnavailableError, add_note
from ..policy import ResiliencePolicy
from ..typed_answers import count_parse_failure, parse_failure_in, unavailable

__all__ = ["RETRY", "RewrappedWarning", "expected_type", "on_typed_failure", "warn_rewrapped"]

logger = logging.getLogger("rag_resilience")

RETRY: Any = object()
_warned: set[str] = set()
_lock = threading.Lock()


class RewrappedWarning(UserWarning):
    """A resilient wrapper was wrapped again: the outer one uses the inner model directly."""


def warn_rewrapped(inner: Any, kind: str) -> None:
    with _lock:
        if kind in _warned:
            return
        _warned.add(kind)
    message = (
        f"{kind} wraps a {type(inner).__name__} that is already resilient: the outer one "
        "wraps its inner model directly, so attempts are not multiplied (the inner "
        "wrapper's policy is not used)"
    )
    warnings.warn(message, RewrappedWarning, stacklevel=4)
    logger.warning(message)


def reset_warnings() -> None:
    with _lock:
        _warned.clear()


def expected_type(kwargs: dict[str, Any]) -> str | None:
    """What a LlamaIndex chat call asks for beyond text."""
    if not kwargs:
        return None
    fmt = kwargs.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return "structured output"
    if kwargs.get("tools") and kwargs.get("tool_choice") != "none":
        return "tool call"
    return None


def on_typed_failure(
    exc: Exception,
    *,
    policy: ResiliencePolicy,
    tries: int,
    parse_retries: int,
    expected: str,
    generic: Any,
    request: Any,
) -> Any:
    """One failure of a typed entry point: RETRY, the typed generic, or raise."""
    if parse_failure_in(exc):
        count_parse_failure(policy, exc)
        if tries < parse_retries:
            logger.info(
                "[%s] the model's answer did not parse (%s); parse retry %d of %d",
                policy.name,
                type(exc).__name__,
                tries + 1,
                parse_retries,
            )
            return RETRY
        if parse_retries:
            add_note(exc, f"rag_resilience[{policy.name}]: {tries + 1} answer(s) did not parse")
        raise exc
    if isinstance(exc, UpstreamUnavailableError):
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        if generic is not None:
            value = generic(request, cause)
            note_degraded(
                {
                    "source": "generic_fallback",
                    "degraded": True,
                    "age_s": None,
                    "attempts": exc.attempts or 0,
                }
            )
            logger.warning(
                "[%s] served the typed generic_fallback (%s) after %s",
                policy.name,
                type(value).__name__,
                type(cause).__name__,
            )
            return value
        if exc.expected != expected:
            renamed = unavailable(cause, policy, expected)
            if renamed is not None:
                raise renamed from cause
    raise exc
