"""RetryStrategy / with_retry: schedule, Retry-After, deadline, budget, exhaustion, async."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_resilience.backoff import RetryBudget
from rag_resilience.errors import DeadlineExceededError, is_handled
from rag_resilience.events import Event, EventKind
from rag_resilience.retry import RetryStrategy, with_retry
from rag_resilience.testing import FakeClock, fake_clock


class APIError(Exception):
    """The seed's error shape: `.status_code`, plus `.response.headers` like httpx/openai."""

    def __init__(
        self,
        status_code: int,
        message: str = "",
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        self.status_code = status_code
        self.response = SimpleNamespace(status_code=status_code, headers=headers or {})
        self.code = code
        super().__init__(message or f"HTTP {status_code}")


class Flaky:
    """Raises the given errors in order, then returns `result`; counts calls."""

    def __init__(
        self,
        *errors: BaseException,
        result: Any = "ok",
        clock: FakeClock | None = None,
        cost: float = 0.0,
    ) -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0
        self.clock = clock
        self.cost = cost

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.clock is not None and self.cost:
            self.clock.advance(self.cost)
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def always(exc_factory: Callable[[], BaseException]) -> Callable[..., Any]:
    def fn(*args: Any, **kwargs: Any) -> Any:
        fn.calls += 1  # type: ignore[attr-defined]
        raise exc_factory()

    fn.calls = 0  # type: ignore[attr-defined]
    return fn


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


def strategy(clock: FakeClock, **kw: Any) -> RetryStrategy:
    kw.setdefault("jitter", False)
    kw.setdefault("retry_budget", None)
    return RetryStrategy(clock=clock, **kw)


# -- schedule -------------------------------------------------------------------------------
def test_500_500_200_succeeds_on_third_attempt_with_exponential_waits(clock: FakeClock) -> None:
    fn = Flaky(APIError(500), APIError(503), result="live")
    assert strategy(clock, max_retries=3, initial_delay=1.0).execute(fn) == "live"
    assert fn.calls == 3
    assert clock.sleeps == [1.0, 2.0]


def test_max_delay_caps_the_wait(clock: FakeClock) -> None:
    fn = Flaky(*(APIError(502) for _ in range(4)))
    strategy(clock, max_retries=4, initial_delay=1.0, max_delay=5.0, exponential_base=10.0).execute(
        fn
    )
    assert clock.sleeps == [1.0, 5.0, 5.0, 5.0]


@pytest.mark.parametrize(
    ("mode", "low", "high"),
    [
        ("full", [0, 0, 0], [1, 2, 4]),
        ("equal", [0.5, 1, 2], [1, 2, 4]),
        ("decorrelated", [1, 1, 1], [3, 9, 27]),
        ("none", [1, 2, 4], [1, 2, 4]),
    ],
)
def test_each_jitter_mode_in_its_band(mode: str, low: list[float], high: list[float]) -> None:
    for seed in range(20):
        clock = FakeClock()
        fn = Flaky(*(ConnectionError("reset") for _ in range(3)))
        s = strategy(
            clock,
            max_retries=3,
            initial_delay=1.0,
            max_delay=100.0,
            jitter=mode,
            rng=random.Random(seed),
        )
        assert s.jitter == mode
        s.execute(fn)
        assert len(clock.sleeps) == 3
        for d, lo, hi in zip(clock.sleeps, low, high, strict=True):
            assert lo <= d <= hi, (mode, clock.sleeps)
        if mode == "decorrelated":  # each wait at most 3x the previous one
            assert clock.sleeps[1] <= 3 * clock.sleeps[0] + 1e-9
            assert clock.sleeps[2] <= 3 * clock.sleeps[1] + 1e-9


def test_jitter_true_is_full_and_randomises(clock: FakeClock) -> None:
    s = RetryStrategy(max_retries=1, initial_delay=8.0, jitter=True, clock=clock, retry_budget=None)
    assert s.jitter == "full"
    for _ in range(15):
        s.execute(Flaky(ConnectionError()))
    assert len(set(clock.sleeps)) == 15 and all(0 <= d <= 8.0 for d in clock.sleeps)


# -- Retry-After ----------------------------------------------------------------------------
def test_retry_after_is_respected_exactly(clock: FakeClock) -> None:
    fn = Flaky(APIError(429, headers={"retry-after": "1"}), result="after")
    s = RetryStrategy(
        max_retries=3, initial_delay=10.0, jitter=True, clock=clock, retry_budget=None
    )
    assert s.execute(fn) == "after"
    assert clock.sleeps == [1.0]  # not the computed 0..10 s


def test_retry_after_beats_max_delay_but_not_max_retry_after(clock: FakeClock) -> None:
    fn = Flaky(APIError(503, headers={"retry-after": "45"}), result="ok")
    assert (
        strategy(clock, initial_delay=1.0, max_delay=5.0, max_retry_after=60.0).execute(fn) == "ok"
    )
    assert clock.sleeps == [45.0]


def test_retry_after_above_cap_stops_retrying(clock: FakeClock) -> None:
    err = APIError(429, headers={"retry-after": "120"})
    fn = Flaky(err)
    with pytest.raises(APIError) as info:
        strategy(clock, max_retries=5, max_retry_after=60.0).execute(fn)
    assert info.value is err
    assert fn.calls == 1 and clock.sleeps == []
    assert is_handled(err)
    assert "max_retry_after" in err.__notes__[-1] and "120" in err.__notes__[-1]


async def test_async_retry_after(clock: FakeClock) -> None:
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise APIError(429, headers={"retry-after": "1"})
        return "ok"

    s = RetryStrategy(max_retries=2, initial_delay=10.0, clock=clock, retry_budget=None)
    assert await s.aexecute(fn) == "ok"
    assert calls == 2 and clock.sleeps == [1.0]


# -- deadline -------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    deadline=st.floats(min_value=0.5, max_value=100.0),
    initial=st.floats(min_value=0.0, max_value=20.0),
    extra=st.floats(min_value=0.0, max_value=50.0),
    cost=st.floats(min_value=0.0, max_value=10.0),
    retry_after=st.none() | st.integers(min_value=0, max_value=30),
    jitter=st.sampled_from(["full", "equal", "decorrelated", "none"]),
    seed=st.integers(0, 1000),
)
def test_total_deadline_never_exceeded(
    deadline: float,
    initial: float,
    extra: float,
    cost: float,
    retry_after: int | None,
    jitter: str,
    seed: int,
) -> None:
    clock = FakeClock(start=0.0)
    starts: list[float] = []
    headers = {"retry-after": str(retry_after)} if retry_after is not None else {}

    def fn() -> None:
        starts.append(clock.monotonic())
        clock.advance(cost)
        raise APIError(503, headers=headers)

    s = RetryStrategy(
        max_retries=50,
        initial_delay=initial,
        max_delay=initial + extra,
        jitter=jitter,
        deadline=deadline,
        clock=clock,
        retry_budget=None,
        rng=random.Random(seed),
    )
    with pytest.raises(APIError) as info:
        s.execute(fn)
    assert starts and starts[0] == 0.0
    assert all(t < deadline for t in starts), (starts, deadline)  # never start after it
    assert len(starts) <= 51
    if cost == 0:
        assert clock.total_slept < deadline  # waits alone never reach it
    # every wait ended before the deadline: start of the next attempt = end of a wait
    assert all(start < deadline for start in starts[1:])
    assert is_handled(info.value)


def test_deadline_stop_is_noted(clock: FakeClock) -> None:
    err = APIError(503)
    fn = always(lambda: err)
    with pytest.raises(APIError) as info:
        strategy(clock, max_retries=10, initial_delay=4.0, deadline=10.0).execute(fn)
    assert info.value is err
    assert clock.sleeps == [4.0]  # 4 + 8 would pass 10 s
    assert fn.calls == 2  # type: ignore[attr-defined]
    assert "deadline" in err.__notes__[-1]


# -- retry budget ---------------------------------------------------------------------------
def test_budget_caps_retries_across_calls_and_recovers(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.1, window=10.0, clock=clock)
    s = strategy(clock, max_retries=1, initial_delay=0.0, max_delay=0.0, retry_budget=budget)
    attempts: list[int] = []
    notes: list[str] = []
    for _ in range(10):
        fn = always(lambda: ConnectionError("refused"))
        with pytest.raises(ConnectionError) as info:
            s.execute(fn)
        attempts.append(fn.calls)  # type: ignore[attr-defined]
        notes.append(info.value.__notes__[-1])
    # retries allowed after i requests: 0.5 * i + 0.1/s * 10 s (greedy, in call order)
    assert attempts == [2, 2, 1, 2, 1, 2, 1, 2, 1, 2]
    assert "budget" in notes[2] and "max_retries" in notes[0]
    assert budget.snapshot()["retries"] == 6
    clock.advance(10.0)  # the window slides past: the budget is back
    fn = Flaky(ConnectionError(), result="ok")
    assert s.execute(fn) == "ok" and fn.calls == 2


def test_default_budget_bounds_an_outage(clock: FakeClock) -> None:
    s = RetryStrategy(max_retries=3, initial_delay=0.0, max_delay=0.0, clock=clock)
    total = 0
    for _ in range(200):
        fn = always(lambda: ConnectionError())
        with pytest.raises(ConnectionError):
            s.execute(fn)
        total += fn.calls  # type: ignore[attr-defined]
    # 20% of 200 requests + 5/s * 10 s = 90 retries, not 600
    assert total - 200 == 90


# -- exhaustion and non-retryable errors ----------------------------------------------------
def test_exhaustion_reraises_the_original_with_history(clock: FakeClock) -> None:
    errors = [
        APIError(500, "boom-1"),
        APIError(502),
        ConnectionError("reset"),
        APIError(503, "last"),
    ]
    fn = Flaky(*errors)
    with pytest.raises(APIError) as info:
        strategy(clock, max_retries=3, initial_delay=1.0).execute(fn)
    exc = info.value
    assert exc is errors[-1] and str(exc) == "last"
    assert fn.calls == 4 and clock.sleeps == [1.0, 2.0, 4.0]
    assert is_handled(exc)
    assert len(exc.__notes__) == 1
    note = exc.__notes__[0]
    assert "gave up after 4 attempt(s)" in note and "max_retries=3" in note
    for i in range(1, 5):
        assert f"#{i} " in note
    assert "ConnectionError" in note and "http_503" in note


@pytest.mark.parametrize(
    "err",
    [
        APIError(404),
        APIError(400, code="context_length_exceeded"),
        APIError(401),
        TypeError("bad arg"),
        APIError(429, code="insufficient_quota"),
    ],
    ids=["404", "400", "401", "TypeError", "insufficient_quota"],
)
def test_non_retryable_raised_after_one_attempt_untouched(clock: FakeClock, err: Exception) -> None:
    fn = Flaky(err)
    with pytest.raises(type(err)) as info:
        strategy(clock, max_retries=5).execute(fn)
    assert info.value is err
    assert fn.calls == 1 and clock.sleeps == []
    assert getattr(err, "__notes__", None) is None
    assert not is_handled(err)


def test_retry_on_and_user_classifier_restrict_retries(clock: FakeClock) -> None:
    fn = Flaky(APIError(503))
    with pytest.raises(APIError):
        strategy(clock, retry_on=ConnectionError).execute(fn)
    assert fn.calls == 1
    fn2 = Flaky(ConnectionError(), result="ok")
    assert strategy(clock, retry_on=ConnectionError).execute(fn2) == "ok" and fn2.calls == 2
    fn3 = Flaky(ValueError("my own transient thing"), result="ok")
    assert strategy(clock, classifier=lambda e: True).execute(fn3) == "ok" and fn3.calls == 2
    fn4 = Flaky(APIError(500))
    with pytest.raises(APIError):
        strategy(clock, classifier=lambda e: False).execute(fn4)
    assert fn4.calls == 1


def test_seed_demo_500_then_404(clock: FakeClock) -> None:
    s = RetryStrategy(max_retries=2, initial_delay=0.3)  # the seed's line, default clock
    fn = Flaky(APIError(500, "Server error"), result="Recovered!")
    assert s.execute(fn) == "Recovered!"
    assert fn.calls == 2 and len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] <= 0.3
    fn404 = Flaky(APIError(404, "Not Found - Non-retryable"))
    with pytest.raises(APIError, match="Not Found"):
        s.execute(fn404)
    assert fn404.calls == 1 and len(clock.sleeps) == 1


def test_args_and_kwargs_are_passed_on_every_attempt(clock: FakeClock) -> None:
    seen: list[tuple[Any, ...]] = []

    def fn(a: int, *, b: str) -> str:
        seen.append((a, b))
        if len(seen) < 3:
            raise ConnectionError()
        return f"{a}{b}"

    assert strategy(clock, max_retries=3).execute(fn, 1, b="x") == "1x"
    assert seen == [(1, "x")] * 3


# -- decorator ------------------------------------------------------------------------------
def test_bare_with_retry_on_sync_function(clock: FakeClock) -> None:
    calls = 0

    @with_retry
    def fetch(text: str) -> str:
        """Doc."""
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("Embedding API temporarily unavailable")
        return f"emb:{text}"

    assert fetch("q") == "emb:q"
    assert calls == 3 and len(clock.sleeps) == 2
    assert fetch.__name__ == "fetch" and fetch.__doc__ == "Doc."
    assert fetch.retry_strategy.max_retries == 3  # type: ignore[attr-defined]


def test_with_retry_arguments_on_sync_function(clock: FakeClock) -> None:
    calls = 0

    @with_retry(max_retries=1, initial_delay=0.5, jitter=False)
    def fetch() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    with pytest.raises(ConnectionError) as info:
        fetch()
    assert calls == 2 and clock.sleeps == [0.5]
    assert is_handled(info.value)


async def test_bare_with_retry_on_async_function(clock: FakeClock) -> None:
    calls = 0

    @with_retry
    async def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise APIError(503)
        return x * 2

    assert asyncio.iscoroutinefunction(fetch)
    assert await fetch(21) == 42
    assert calls == 4 and len(clock.sleeps) == 3


async def test_with_retry_arguments_on_async_function(clock: FakeClock) -> None:
    calls = 0

    @with_retry(
        strategy=RetryStrategy(
            max_retries=2, initial_delay=2.0, jitter="none", clock=clock, retry_budget=None
        )
    )
    async def fetch() -> str:
        nonlocal calls
        calls += 1
        raise APIError(500)

    with pytest.raises(APIError) as info:
        await fetch()
    assert calls == 3 and clock.sleeps == [2.0, 4.0]
    assert "gave up after 3 attempt(s)" in info.value.__notes__[0]


def test_with_retry_rejects_strategy_and_kwargs() -> None:
    with pytest.raises(ValueError, match="strategy"):
        with_retry(strategy=RetryStrategy(), max_retries=2)


# -- async attempt timeout ------------------------------------------------------------------
async def test_attempt_timeout_cancels_a_slow_attempt_and_retries(clock: FakeClock) -> None:
    never = asyncio.Event()
    cancelled = 0
    calls = 0

    async def fn() -> str:
        nonlocal calls, cancelled
        calls += 1
        if calls == 1:
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled += 1
                raise
        return "second try"

    s = RetryStrategy(
        max_retries=2,
        initial_delay=1.0,
        jitter=False,
        attempt_timeout=0.02,
        clock=clock,
        retry_budget=None,
    )
    assert await s.aexecute(fn) == "second try"
    assert calls == 2 and cancelled == 1 and clock.sleeps == [1.0]


async def test_attempt_timeout_exhausted_raises_deadline_error(clock: FakeClock) -> None:
    async def hang() -> None:
        await asyncio.Event().wait()

    s = RetryStrategy(
        max_retries=1,
        initial_delay=1.0,
        jitter=False,
        attempt_timeout=0.01,
        clock=clock,
        retry_budget=None,
    )
    with pytest.raises(DeadlineExceededError) as info:
        await s.aexecute(hang)
    assert info.value.scope == "attempt" and info.value.timeout == 0.01
    assert isinstance(info.value, TimeoutError)
    assert "gave up after 2 attempt(s)" in info.value.__notes__[0]


async def test_async_exhaustion_and_non_retryable(clock: FakeClock) -> None:
    err = APIError(404)

    async def not_found() -> None:
        raise err

    with pytest.raises(APIError) as info:
        await strategy(clock, max_retries=3).aexecute(not_found)
    assert info.value is err and clock.sleeps == [] and getattr(err, "__notes__", None) is None


# -- events ---------------------------------------------------------------------------------
def test_events_attempt_retry_success(clock: FakeClock) -> None:
    events: list[Event] = []
    s = strategy(clock, max_retries=3, initial_delay=1.0, listeners=[events.append], name="emb")
    s.execute(Flaky(APIError(503), APIError(429, headers={"retry-after": "7"})))
    kinds = [e.kind for e in events]
    assert kinds == [
        EventKind.ATTEMPT,
        EventKind.RETRY,
        EventKind.ATTEMPT,
        EventKind.RETRY,
        EventKind.ATTEMPT,
        EventKind.SUCCESS,
    ]
    retries = [e for e in events if e.kind is EventKind.RETRY]
    assert [e.delay for e in retries] == clock.sleeps == [1.0, 7.0]
    assert [e.reason for e in retries] == ["http_503", "rate_limited"]
    assert [e.attempt for e in retries] == [1, 2]
    assert all(e.name == "emb" for e in events)
    assert isinstance(retries[0].error, APIError)
    assert events[-1].attempt == 3 and events[-1].duration == pytest.approx(8.0)


def test_events_failure_on_exhaustion(clock: FakeClock) -> None:
    events: list[Event] = []
    s = strategy(clock, max_retries=1, listeners=[events.append])
    with pytest.raises(ConnectionError):
        s.execute(always(lambda: ConnectionError()))
    assert events[-1].kind is EventKind.FAILURE
    assert events[-1].reason == "max_retries" and events[-1].attempt == 2


# -- configuration --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"initial_delay": -0.1}, "initial_delay"),
        ({"initial_delay": 5.0, "max_delay": 1.0}, "max_delay"),
        ({"exponential_base": 0.5}, "exponential_base"),
        ({"jitter": "gaussian"}, "jitter"),
        ({"deadline": 0}, "deadline"),
        ({"attempt_timeout": -1}, "attempt_timeout"),
        ({"max_retry_after": -1}, "max_retry_after"),
        ({"classifier": "not callable"}, "classifier"),
    ],
)
def test_invalid_configuration_names_the_parameter(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(ValueError, match=param):
        RetryStrategy(**kwargs)


def test_zero_retries_means_one_attempt(clock: FakeClock) -> None:
    fn = always(lambda: ConnectionError())
    with pytest.raises(ConnectionError) as info:
        strategy(clock, max_retries=0).execute(fn)
    assert fn.calls == 1 and clock.sleeps == []  # type: ignore[attr-defined]
    assert is_handled(info.value)


def test_server_paced_429_does_not_spend_the_retry_budget() -> None:
    # A budget that allows no retries at all: our own backoff retries are refused, but a
    # 429 that says when to come back is paced by the server and still retried.
    with fake_clock() as clock:
        budget = RetryBudget(ratio=0.0, min_per_second=0.0, clock=clock)
        strategy = RetryStrategy(max_retries=2, initial_delay=0.1, retry_budget=budget)
        throttled = Flaky(APIError(429, headers={"retry-after": "2"}), result="ok")
        assert strategy.execute(throttled) == "ok"
        assert throttled.calls == 2 and clock.sleeps == [2.0]

        down = Flaky(APIError(503), result="ok")
        with pytest.raises(APIError) as info:
            strategy.execute(down)
        assert down.calls == 1
        assert any("retry budget" in note for note in info.value.__notes__)


def test_retry_after_jitter_stretches_but_never_shortens_the_wait() -> None:
    with fake_clock() as clock:
        strategy = RetryStrategy(
            max_retries=1, retry_after_jitter=0.5, retry_budget=None, rng=random.Random(3)
        )
        waits = []
        for _ in range(20):
            clock.sleeps.clear()
            strategy.execute(Flaky(APIError(429, headers={"retry-after": "2"})))
            waits.append(clock.sleeps[0])
        assert all(2.0 <= w <= 3.0 for w in waits)
        assert len(set(waits)) > 1  # spread out, not in lockstep
    with pytest.raises(ValueError, match="retry_after_jitter"):
        RetryStrategy(retry_after_jitter=1.5)
