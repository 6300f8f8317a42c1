"""Bad configuration fails at construction: NaN, inf and bools are refused with the
parameter named (issue 17, item 8). Before, NaN passed every `x <= 0` check, silently
disabling deadlines, and `True` was taken as a failure threshold of 1."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rag_resilience import _validate as v
from rag_resilience.backoff import RetryBudget
from rag_resilience.breaker import CircuitBreaker
from rag_resilience.fallback import GracefulFallbacks
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.retry import RetryStrategy
from rag_resilience.stores.sqlite import SQLiteStore

NAN, INF = math.nan, math.inf

CASES: list[tuple[str, Callable[[Any], object]]] = [
    ("initial_delay", lambda x: RetryStrategy(initial_delay=x)),
    ("max_delay", lambda x: RetryStrategy(max_delay=x)),
    ("exponential_base", lambda x: RetryStrategy(exponential_base=x)),
    ("deadline", lambda x: RetryStrategy(deadline=x)),
    ("attempt_timeout", lambda x: RetryStrategy(attempt_timeout=x)),
    ("max_retry_after", lambda x: RetryStrategy(max_retry_after=x)),
    ("retry_after_jitter", lambda x: RetryStrategy(retry_after_jitter=x)),
    ("max_retries", lambda x: RetryStrategy(max_retries=x)),
    ("ratio", lambda x: RetryBudget(ratio=x)),
    ("min_per_second", lambda x: RetryBudget(min_per_second=x)),
    ("window", lambda x: RetryBudget(window=x)),
    ("failure_threshold", lambda x: CircuitBreaker(failure_threshold=x)),
    ("recovery_timeout", lambda x: CircuitBreaker(recovery_timeout=x)),
    ("success_threshold", lambda x: CircuitBreaker(success_threshold=x)),
    ("half_open_max_calls", lambda x: CircuitBreaker(half_open_max_calls=x)),
    ("window_seconds", lambda x: CircuitBreaker(window_seconds=x)),
    ("probe_timeout", lambda x: CircuitBreaker(probe_timeout=x)),
    ("min_recovery_timeout", lambda x: CircuitBreaker(min_recovery_timeout=x)),
    ("failure_rate_threshold", lambda x: CircuitBreaker(failure_rate_threshold=x)),
    ("minimum_calls", lambda x: CircuitBreaker(minimum_calls=x)),
    ("ttl", lambda x: GracefulFallbacks(ttl=x)),
    ("max_entries", lambda x: GracefulFallbacks(max_entries=x)),
    ("max_concurrency", lambda x: ConcurrencyLimit(x)),
    ("max_waiting", lambda x: ConcurrencyLimit(1, max_waiting=x)),
    ("wait_timeout", lambda x: ConcurrencyLimit(1, wait_timeout=x)),
    ("lease_s", lambda x: ConcurrencyLimit(1, lease_s=x)),
    ("deadline", lambda x: ResiliencePolicy(deadline=x)),
    ("attempt_timeout", lambda x: ResiliencePolicy(attempt_timeout=x)),
    # preset overrides reach the same checks, named as the user spelled them
    ("initial_delay", lambda x: ResiliencePolicy.preset(initial_delay=x)),
    ("deadline", lambda x: ResiliencePolicy.preset(deadline=x)),
    ("attempt_timeout", lambda x: ResiliencePolicy.preset(attempt_timeout=x)),
    ("max_retry_after", lambda x: ResiliencePolicy.preset(max_retry_after=x)),
    ("recovery_timeout", lambda x: ResiliencePolicy.preset(recovery_timeout=x)),
    ("failure_threshold", lambda x: ResiliencePolicy.preset(failure_threshold=x)),
    ("cache_ttl", lambda x: ResiliencePolicy.preset(cache_ttl=x)),
    ("cache_max_entries", lambda x: ResiliencePolicy.preset(cache_max_entries=x)),
    ("wait_timeout", lambda x: ResiliencePolicy.preset(wait_timeout=x)),
    ("max_concurrency", lambda x: ResiliencePolicy.preset(max_concurrency=x)),
]

INTEGERS = {
    "max_retries",
    "failure_threshold",
    "success_threshold",
    "half_open_max_calls",
    "minimum_calls",
    "max_entries",
    "max_concurrency",
    "max_waiting",
    "cache_max_entries",
}


@pytest.mark.parametrize(
    ("param", "build"), CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CASES)]
)
@pytest.mark.parametrize(
    "bad", [NAN, INF, -INF, True, "1"], ids=["nan", "inf", "-inf", "True", "str"]
)
def test_bad_numbers_are_refused_naming_the_parameter(
    param: str, build: Callable[[Any], object], bad: Any
) -> None:
    with pytest.raises(ValueError, match=rf"^{param} must be") as info:
        build(bad)
    assert ("integer" in str(info.value)) == (param in INTEGERS)


INT_CASES = [(p, b) for p, b in CASES if p in INTEGERS]


@pytest.mark.parametrize(("param", "build"), INT_CASES, ids=[p for p, _ in INT_CASES])
def test_floats_are_refused_where_an_integer_is_needed(
    param: str, build: Callable[[Any], object]
) -> None:
    with pytest.raises(ValueError, match=rf"^{param} must be an integer"):
        build(2.0)


def test_store_parameters(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    from rag_resilience.stores.redis import RedisStore

    for bad in (NAN, INF, True):
        with pytest.raises(ValueError, match=r"^op_timeout must be"):
            RedisStore("redis://127.0.0.1:1/0", op_timeout=bad)
        with pytest.raises(ValueError, match=r"^retry_interval must be"):
            RedisStore("redis://127.0.0.1:1/0", retry_interval=bad)
        with pytest.raises(ValueError, match=r"^timeout must be"):
            SQLiteStore(tmp_path / "s.db", timeout=bad)


def test_messages_give_the_allowed_range() -> None:
    with pytest.raises(ValueError, match=r"deadline must be > 0 seconds or None \(finite\)"):
        v.positive("deadline", NAN, none_ok=True)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 10\], got 11"):
        v.in_range("ratio", 11, 0, 10)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got True \(bool\)"):
        v.integer("n", True, 1)
    assert v.positive("x", None, none_ok=True) is None
    assert v.at_least("x", 0, 0) == 0
    assert v.integer("x", 3, 1) == 3


def test_good_values_still_work() -> None:
    RetryStrategy(initial_delay=0, max_delay=0, deadline=None, attempt_timeout=1)
    CircuitBreaker(failure_threshold=1, recovery_timeout=0.5, min_recovery_timeout=0.5)
    ConcurrencyLimit(1, max_waiting=0, wait_timeout=None, lease_s=1)
    ResiliencePolicy.preset(cache_ttl=None, wait_timeout=2, max_retries=0)
