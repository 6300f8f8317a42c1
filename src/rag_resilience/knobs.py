"""Policy knobs as keyword arguments of the drop-in wrappers.

``ResilientLLM(llm, max_retries=1, failure_threshold=3)`` overrides single numbers of the
preset, exactly as ``ResiliencePolicy.preset("balanced", max_retries=1, ...)`` does. A
keyword the wrapper does not know raises `TypeError` naming the accepted ones (a typo must
not be silently ignored); a knob of the wrong type raises `TypeError` at construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "POLICY_KNOBS",
    "ArgumentTypeError",
    "check_given_policy",
    "check_unknown",
    "pop_knobs",
    "resolve_policy",
]


class ArgumentTypeError(TypeError, ValueError):
    """A constructor argument of the wrong type: a TypeError (Python's convention) that is
    also a ValueError (the project's "bad config" error), so either ``except`` catches it."""


_INTS = (
    "max_retries",
    "failure_threshold",
    "max_waiting",
    "max_concurrency",
    "half_open_max_calls",
    "success_threshold",
    "cache_max_entries",
)
_NUMBERS = (
    "initial_delay",
    "recovery_timeout",
    "max_delay",
    "min_recovery_timeout",
    "cache_ttl",
    "retry_after_jitter",
    "max_retry_after",
)
_OPTIONAL_NUMBERS = ("deadline", "attempt_timeout", "wait_timeout")
_OTHER = ("jitter", "retry_budget", "store", "clock", "listeners", "classifier", "count")

#: Keyword arguments every wrapper accepts as overrides of its preset.
POLICY_KNOBS: frozenset[str] = frozenset(_INTS + _NUMBERS + _OPTIONAL_NUMBERS + _OTHER)


def _check_type(owner: str, name: str, value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in _INTS and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ArgumentTypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if name in _NUMBERS and not number:
        raise ArgumentTypeError(f"{owner}: {name} must be a number, got {type(value).__name__}")
    if name in _OPTIONAL_NUMBERS and value is not None and not number:
        raise ArgumentTypeError(
            f"{owner}: {name} must be a number or None, got {type(value).__name__}"
        )
    if name == "jitter" and not isinstance(value, bool):
        raise ArgumentTypeError(f"{owner}: jitter must be a bool, got {type(value).__name__}")


def pop_knobs(owner: str, data: dict[str, Any]) -> dict[str, Any]:
    """Remove the policy knobs from `data` (type-checked) and return them."""
    knobs = {k: data.pop(k) for k in list(data) if k in POLICY_KNOBS}
    for name, value in knobs.items():
        _check_type(owner, name, value)
    return knobs


def check_given_policy(owner: str, policy: Any, knobs: dict[str, Any]) -> None:
    """Knobs override a preset: with a ResiliencePolicy object they have nothing to override."""
    from .policy import ResiliencePolicy

    if knobs and isinstance(policy, ResiliencePolicy):
        raise ArgumentTypeError(
            f"{owner}: {sorted(knobs)} override a preset; got a ResiliencePolicy object "
            "(set them when you build it, or pass policy='balanced' etc.)"
        )


def check_unknown(owner: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """TypeError naming the accepted keywords when `given` has one that is not."""
    allowed = set(accepted) | POLICY_KNOBS
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise TypeError(
            f"{owner} got unexpected keyword argument(s) {unknown}; accepted: "
            f"{', '.join(sorted(allowed))}"
        )


def resolve_policy(owner: str, policy: Any, knobs: dict[str, Any], **preset_kwargs: Any) -> Any:
    """`ResiliencePolicy.resolve` with the knobs applied to the preset."""
    from .policy import ResiliencePolicy

    check_given_policy(owner, policy, knobs)
    if isinstance(policy, ResiliencePolicy):
        return policy
    extra = {k: v for k, v in knobs.items() if k in ("store", "clock", "listeners", "classifier")}
    overrides = {k: v for k, v in knobs.items() if k not in extra}
    try:
        return ResiliencePolicy.resolve(policy, **preset_kwargs, **extra, **overrides)
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}") from exc
