"""Backoff arithmetic and the retry budget: pure functions, checked exactly and by hypothesis."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_resilience.backoff import JITTER_MODES, RetryBudget, compute_delay, normalize_jitter
from rag_resilience.testing import FakeClock


class FixedRng(random.Random):
    """An rng whose `random()` always returns `value`: pins jitter to an edge."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def delay(
    n: int,
    mode: str,
    rng: float,
    *,
    initial: float = 1.0,
    cap: float = 60.0,
    base: float = 2.0,
    prev: float | None = None,
) -> float:
    return compute_delay(
        n,
        initial_delay=initial,
        max_delay=cap,
        exponential_base=base,
        jitter=mode,
        previous_delay=prev,
        rng=FixedRng(rng),
    )  # type: ignore[arg-type]


# -- jitter modes ---------------------------------------------------------------------------
def test_normalize_jitter() -> None:
    assert normalize_jitter(True) == "full"
    assert normalize_jitter(False) == "none"
    for mode in JITTER_MODES:
        assert normalize_jitter(mode) == mode
    with pytest.raises(ValueError, match="jitter"):
        normalize_jitter("gaussian")
    with pytest.raises(ValueError, match="jitter"):
        normalize_jitter(1)  # type: ignore[arg-type]


def test_none_is_capped_exponential() -> None:
    assert [delay(n, "none", 0.5, cap=10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert [delay(n, "none", 0.5, initial=0.5, base=3.0) for n in (1, 2, 3)] == [0.5, 1.5, 4.5]


def test_full_jitter_spans_zero_to_ceiling() -> None:
    assert delay(4, "full", 0.0) == 0.0
    assert delay(4, "full", 0.5) == pytest.approx(4.0)  # ceiling 8
    assert delay(4, "full", 0.999) == pytest.approx(8 * 0.999)
    assert delay(10, "full", 0.999, cap=5.0) == pytest.approx(5 * 0.999)


def test_equal_jitter_keeps_half_fixed() -> None:
    assert delay(3, "equal", 0.0) == pytest.approx(2.0)  # ceiling 4: [2, 4]
    assert delay(3, "equal", 0.999) == pytest.approx(2 + 2 * 0.999)
    assert delay(20, "equal", 0.0, cap=6.0) == pytest.approx(3.0)


def test_decorrelated_walks_between_initial_and_three_times_previous() -> None:
    assert delay(1, "decorrelated", 0.0) == pytest.approx(1.0)
    assert delay(1, "decorrelated", 0.999) == pytest.approx(1 + 2 * 0.999)  # prev=initial
    assert delay(5, "decorrelated", 0.999, prev=2.0) == pytest.approx(1 + 5 * 0.999)
    assert delay(5, "decorrelated", 0.999, prev=50.0, cap=20.0) == pytest.approx(1 + 19 * 0.999)
    # the retry number plays no role: only the previous delay does
    assert delay(1, "decorrelated", 0.3, prev=4.0) == delay(9, "decorrelated", 0.3, prev=4.0)


def test_jitter_modes_actually_vary_with_a_real_rng() -> None:
    rng = random.Random(7)
    for mode in ("full", "equal", "decorrelated"):
        values = {
            compute_delay(
                3, initial_delay=1.0, max_delay=60.0, exponential_base=2.0, jitter=mode, rng=rng
            )
            for _ in range(20)
        }  # type: ignore[arg-type]
        assert len(values) > 10, mode
    assert {
        compute_delay(
            3, initial_delay=1.0, max_delay=60.0, exponential_base=2.0, jitter="none", rng=rng
        )
        for _ in range(5)
    } == {4.0}


def test_huge_retry_numbers_do_not_overflow() -> None:
    assert delay(100_000, "none", 0.5, base=10.0, cap=30.0) == 30.0
    assert delay(100_000, "full", 0.5, base=10.0, cap=30.0) == 15.0
    assert delay(5000, "none", 0.5, initial=1e300, base=1e10, cap=7.0) == 7.0


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=10_000),
    initial=st.floats(min_value=0.0, max_value=100.0),
    extra=st.floats(min_value=0.0, max_value=1000.0),
    base=st.floats(min_value=1.0, max_value=10.0),
    mode=st.sampled_from(JITTER_MODES),
    prev=st.none() | st.floats(min_value=0.0, max_value=1e6),
    r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_every_delay_within_zero_and_max_delay(
    n: int, initial: float, extra: float, base: float, mode: str, prev: float | None, r: float
) -> None:
    cap = initial + extra
    d = delay(n, mode, r, initial=initial, cap=cap, base=base, prev=prev)
    assert 0.0 <= d <= cap


@settings(max_examples=100, deadline=None)
@given(
    initial=st.floats(min_value=0.001, max_value=10.0),
    cap=st.floats(min_value=10.0, max_value=1000.0),
    base=st.floats(min_value=1.0, max_value=4.0),
)
def test_plain_schedule_never_decreases(initial: float, cap: float, base: float) -> None:
    schedule = [delay(n, "none", 0.5, initial=initial, cap=cap, base=base) for n in range(1, 40)]
    assert schedule == sorted(schedule)
    assert schedule[0] == pytest.approx(initial)


# -- retry budget ---------------------------------------------------------------------------
def spend_all(budget: RetryBudget) -> int:
    granted = 0
    while budget.try_spend():
        granted += 1
        assert granted < 10_000
    return granted


def test_budget_caps_retries_at_ratio_of_requests_plus_floor() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0.5, window=10.0, clock=clock)
    assert spend_all(budget) == 5  # floor only: 0.5/s * 10 s
    for _ in range(30):
        budget.record_request()
    assert spend_all(budget) == 6  # 0.2 * 30 + 5 = 11 in total
    snap = budget.snapshot()
    assert snap["requests"] == 30 and snap["retries"] == 11 and snap["allowed"] == pytest.approx(11)


def test_budget_is_a_sliding_window_that_recovers() -> None:
    clock = FakeClock(start=0.0)
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=10.0, clock=clock)
    for _ in range(4):
        budget.record_request()
    assert spend_all(budget) == 4
    clock.advance(5.0)  # half the window later: still spent, old requests still count
    budget.record_request()
    assert spend_all(budget) == 1
    clock.advance(5.5)  # the first 4 requests and their retries slid out
    snap = budget.snapshot()
    assert snap["requests"] == 1 and snap["retries"] == 1
    for _ in range(3):
        budget.record_request()
    assert spend_all(budget) == 3
    clock.advance(10.0)  # everything expired
    assert budget.snapshot() == {"requests": 0, "retries": 0, "allowed": 0.0, "window_s": 10.0}
    assert budget.try_spend() is False  # ratio-only budget with no traffic: no retries


def test_budget_is_exact_under_threads() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=1.0, window=10.0, clock=clock)
    for _ in range(100):
        budget.record_request()
    granted: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = 0
        for _ in range(50):
            if budget.try_spend():
                mine += 1
        with lock:
            granted.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sum(granted) == 60  # 0.5 * 100 + 1 * 10, never one more


def test_budget_window_follows_a_clock_set_back() -> None:
    """A clock swapped for an earlier one (a test's fake clock, say): requests at the
    earlier time open their own bucket instead of joining the later, current one."""
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=10.0, clock=FakeClock(start=0.5))
    for _ in range(5):
        budget.record_request(100.0)
    for _ in range(3):
        budget.record_request(0.5)
    assert budget.snapshot()["requests"] == 3  # the window ending at 0.5 holds only those


def test_budget_counts_every_request_from_many_threads_without_a_lock() -> None:
    """Requests are counted lock-free (every call records one); none may be lost, also
    across bucket edges crossed while the threads run."""
    clock = FakeClock(start=0.0)
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=10.0, clock=clock)
    start = threading.Barrier(8)

    def worker(offset: float) -> None:
        start.wait()
        for i in range(2000):
            budget.record_request(offset + (i % 5) * 0.5)  # spans buckets 0..2

    threads = [threading.Thread(target=worker, args=(t * 0.1,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert budget.snapshot()["requests"] == 16_000


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 11}, "ratio"),
        ({"min_per_second": -1}, "min_per_second"),
        ({"window": 0}, "window"),
    ],
)
def test_budget_rejects_bad_configuration(kwargs: dict[str, float], param: str) -> None:
    with pytest.raises(ValueError, match=param):
        RetryBudget(**kwargs)
