"""What the presets' breaker counts (issue 15): `count="calls"` keeps a flaky-but-working
upstream live (50% random 503s, 4 attempts: >= 90% live; 20%: >= 99.5%) and still opens on
an outage. Seeded, on a fake clock, 50 calls/s; benchmarks/recovery.py has the full table."""

from __future__ import annotations

import random

import pytest

from rag_resilience import ResiliencePolicy
from rag_resilience.breaker import CircuitState
from rag_resilience.policy import PRESETS
from rag_resilience.testing import FakeClock


class Http503(Exception):
    status_code = 503


def live_share(count: str, error_rate: float, calls: int = 2_000) -> float:
    clock = FakeClock()
    rng = random.Random(int(error_rate * 100))
    knobs = {} if count == "default" else {"count": count}
    policy = ResiliencePolicy.preset(
        "balanced", name=f"count-{count}", clock=clock, generic_fallback=True, **knobs
    )

    def upstream() -> str:
        if rng.random() < error_rate:
            raise Http503("overloaded")
        return "ok"

    live = 0
    for _ in range(calls):
        clock.advance(0.02)
        live += policy.run(upstream).source == "live"
    return live / calls


@pytest.mark.parametrize(("rate", "floor"), [(0.5, 0.90), (0.2, 0.995)])
def test_counting_calls_keeps_a_flaky_upstream_live(rate: float, floor: float) -> None:
    """Before (the first release's count): 1% live at 50% 503s, 95% at 20%."""
    assert live_share("calls", rate) >= floor
    assert live_share("attempts", rate) < floor  # the first release's count misses it


def test_counting_calls_still_opens_on_an_outage() -> None:
    clock = FakeClock()
    policy = ResiliencePolicy.preset("balanced", name="count-out", clock=clock, count="calls")
    assert policy.breaker is not None and policy.breaker.failure_threshold == 5 * 4

    def down() -> str:
        raise Http503("down")

    for _ in range(5):  # one caller at a time: 5 failed calls of 4 attempts
        with pytest.raises(Http503):
            policy.run(down)
    assert policy.breaker.get_state() is CircuitState.OPEN


def test_count_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="count must be 'attempts' or 'calls'"):
        ResiliencePolicy.preset("balanced", count="requests")


def test_the_presets_count_failed_calls_by_default() -> None:
    """The default is count="calls" (was "attempts": 1% live at 50% 503s); every preset's
    threshold is the seed's number of failed calls, times its attempts per call."""
    clock = FakeClock()
    for name, numbers in PRESETS.items():
        policy = ResiliencePolicy.preset(name, clock=clock)
        assert policy.breaker is not None
        per_call = numbers["max_retries"] + 1
        assert policy.breaker.failure_threshold == numbers["failure_threshold"] * per_call
    assert live_share("default", 0.5) >= 0.90


def test_wrappers_take_the_count_knob() -> None:
    from rag_resilience.knobs import POLICY_KNOBS, pop_knobs

    assert "count" in POLICY_KNOBS
    assert pop_knobs("ResilientLLM", {"count": "attempts"}) == {"count": "attempts"}
