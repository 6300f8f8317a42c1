"""ResiliencePolicy: composition of limit -> retry -> breaker -> call -> fallback chain,
served sources, streams, nesting, presets and stats. All time is a FakeClock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from rag_resilience.breaker import CircuitBreaker, CircuitState
from rag_resilience.errors import CircuitOpenError, QueueFullError, is_handled
from rag_resilience.events import Event, EventKind
from rag_resilience.fallback import BUSY_ANSWER, DEFAULT_GENERIC_ANSWER, GracefulFallbacks
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.policy import ResiliencePolicy, Served
from rag_resilience.retry import RetryStrategy
from rag_resilience.stores import MemoryStore
from rag_resilience.testing import FakeClock, fake_clock


class APIError(Exception):
    def __init__(self, status_code: int, code: str | None = None) -> None:
        self.status_code = status_code
        self.response = SimpleNamespace(status_code=status_code, headers={})
        self.code = code
        super().__init__(f"HTTP {status_code}" + (f" {code}" if code else ""))


class Upstream:
    """Raises the scripted errors in order (the last one forever if `forever`), then answers."""

    def __init__(self, *errors: BaseException, result: Any = "live", forever: bool = False) -> None:
        self.errors = list(errors)
        self.forever = forever
        self.result = result
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.errors:
            err = self.errors[0] if self.forever else self.errors.pop(0)
            raise err
        return self.result


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _quiet_log() -> Iterator[None]:
    log = logging.getLogger("rag_resilience")
    previous = log.level
    log.setLevel(logging.CRITICAL)
    yield
    log.setLevel(previous)


def make(
    clock: FakeClock,
    *,
    retries: int = 3,
    threshold: int = 3,
    recovery: float = 60.0,
    cache: bool = True,
    limit: ConcurrencyLimit | None = None,
    name: str = "t",
    **kw: Any,
) -> ResiliencePolicy:
    return ResiliencePolicy(
        retry=RetryStrategy(
            max_retries=retries, initial_delay=1.0, jitter=False, clock=clock, retry_budget=None
        ),
        breaker=CircuitBreaker(threshold, recovery, clock=clock, name=name),
        fallbacks=GracefulFallbacks(clock=clock, name=name) if cache else None,
        limit=limit,
        clock=clock,
        name=name,
        **kw,
    )


# -- the live path and composition ----------------------------------------------------------
def test_500_500_200_is_live_after_three_attempts(clock: FakeClock) -> None:
    up = Upstream(APIError(500), APIError(500), result="answer")
    served = make(clock).run(up, "q")
    assert isinstance(served, Served)
    assert (served.value, served.source, served.attempts, served.degraded) == (
        "answer",
        "live",
        3,
        False,
    )
    assert up.calls == 3 and clock.sleeps == [1.0, 2.0]
    assert served.metadata() == {"source": "live", "attempts": 3, "age_s": None, "degraded": False}


def test_call_returns_the_value_and_passes_arguments(clock: FakeClock) -> None:
    seen: list[Any] = []

    def fn(a: int, *, b: int) -> int:
        seen.append((a, b))
        return a + b

    assert make(clock).call(fn, 1, b=2) == 3 and seen == [(1, 2)]


def test_composition_order(clock: FakeClock) -> None:
    """limit outside everything; the breaker inside the retry loop; fallbacks last."""
    events: list[Event] = []
    limit = ConcurrencyLimit(1, max_waiting=0, name="order")
    policy = make(
        clock, retries=5, threshold=2, limit=limit, listeners=[events.append], generic_fallback=True
    )
    # 1. a full limit rejects before any attempt or breaker check
    limit.acquire()
    up = Upstream()
    served = policy.run(up)
    limit.release()
    assert served.source == "rejected" and up.calls == 0
    assert not [e for e in events if e.kind is EventKind.ATTEMPT]
    assert policy.breaker is not None and policy.breaker.get_state() is CircuitState.CLOSED
    # 2. every attempt passes the breaker: it opens after 2 of the 6 allowed attempts and
    #    the loop stops there, without sleeping through the remaining backoff
    down = Upstream(APIError(503), forever=True)
    served = policy.run(down)
    assert down.calls == 2 and clock.sleeps == [1.0]
    assert policy.breaker.get_state() is CircuitState.OPEN
    # 3. then the fallback chain serves
    assert served.source == "generic_fallback" and served.attempts == 2
    assert isinstance(served.error, APIError)


# -- the caller's own errors ----------------------------------------------------------------
@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_error_raised_untouched_and_never_masked(clock: FakeClock, status: int) -> None:
    fb_calls = 0

    def fb(*args: Any) -> str:
        nonlocal fb_calls
        fb_calls += 1
        return "fallback"

    policy = make(clock, generic_fallback=True, fallback_fns=[fb])
    policy.run(Upstream(result="cached answer"), "q", key="q")  # warm the cache
    err = APIError(status)
    up = Upstream(err)
    with pytest.raises(APIError) as info:
        policy.run(up, "q", key="q")
    assert info.value is err and up.calls == 1 and clock.sleeps == [] and fb_calls == 0
    assert getattr(err, "__notes__", None) is None and not is_handled(err)
    assert policy.breaker is not None and policy.breaker.failure_count == 0
    assert policy.stats()["failures"] == 1 and policy.stats()["degraded"] == 0


def test_programming_error_raised_untouched(clock: FakeClock) -> None:
    err = TypeError("bad argument")
    up = Upstream(err)
    with pytest.raises(TypeError) as info:
        make(clock, generic_fallback=True).run(up, key="q")
    assert info.value is err and up.calls == 1


# -- outage: breaker opens, degraded answers, no sleeping -----------------------------------
def test_outage_serves_cache_with_age_then_generic(clock: FakeClock) -> None:
    policy = make(clock, retries=5, threshold=3, generic_fallback=True)
    assert policy.run(Upstream(result="fresh"), "q", key="q").source == "live"
    clock.advance(30.0)
    down = Upstream(APIError(503), forever=True)
    first = policy.run(down, "q", key="q")
    assert down.calls == 3 and clock.sleeps == [1.0, 2.0]  # opened on the 3rd failure
    assert (first.value, first.source, first.attempts, first.degraded) == (
        "fresh",
        "cache",
        3,
        True,
    )
    assert first.age_s == pytest.approx(33.0)
    assert policy.breaker is not None and policy.breaker.get_state() is CircuitState.OPEN

    sleeps_before = list(clock.sleeps)
    clock.advance(7.0)
    second = policy.run(down, "q", key="q")
    assert down.calls == 3  # zero upstream calls while open
    assert second.source == "cache" and second.age_s == pytest.approx(40.0)
    assert second.attempts == 0 and isinstance(second.error, CircuitOpenError)
    generic = policy.run(down, "other", key="other")
    assert generic.source == "generic_fallback" and generic.value == DEFAULT_GENERIC_ANSWER
    assert down.calls == 3 and clock.sleeps == sleeps_before


def test_outage_without_fallbacks_raises(clock: FakeClock) -> None:
    policy = make(clock, retries=5, threshold=3, cache=False)
    down = Upstream(APIError(503), forever=True)
    with pytest.raises(APIError) as info:
        policy.run(down)
    assert is_handled(info.value) and down.calls == 3
    with pytest.raises(CircuitOpenError) as open_info:
        policy.run(down)
    assert down.calls == 3 and open_info.value.retry_after == pytest.approx(60.0)


def test_recovery_after_open_period(clock: FakeClock) -> None:
    policy = make(clock, retries=0, threshold=1, recovery=10.0, generic_fallback=True)
    assert policy.run(Upstream(APIError(503))).source == "generic_fallback"
    assert policy.run(Upstream()).source == "generic_fallback"
    clock.advance(10.0)
    served = policy.run(Upstream(result="back"))
    assert (served.value, served.source) == ("back", "live")
    assert policy.breaker is not None and policy.breaker.get_state() is CircuitState.CLOSED


# -- other degraded sources -----------------------------------------------------------------
def test_queue_full_served_rejected_with_generic_else_raised(clock: FakeClock) -> None:
    limit = ConcurrencyLimit(1, max_waiting=0, name="q")
    up = Upstream()
    limit.acquire()
    try:
        served = make(clock, limit=limit, cache=False, generic_fallback=True).run(up)
        assert (served.value, served.source, served.attempts) == (BUSY_ANSWER, "rejected", 0)
        assert isinstance(served.error, QueueFullError)
        with pytest.raises(QueueFullError):
            make(clock, limit=limit, cache=False).run(up)
    finally:
        limit.release()
    assert up.calls == 0 and limit.in_flight == 0


def test_fallback_fns_tried_in_order_with_the_calls_arguments(clock: FakeClock) -> None:
    seen: list[tuple[str, Any, Any]] = []

    def first(*args: Any, **kwargs: Any) -> str:
        seen.append(("first", args, kwargs))
        raise ConnectionError("backup down too")

    def second(*args: Any, **kwargs: Any) -> str:
        seen.append(("second", args, kwargs))
        return "from backup"

    def third(*args: Any, **kwargs: Any) -> str:  # pragma: no cover - must not run
        raise AssertionError("tried after a fallback served")

    policy = make(clock, retries=1, fallback_fns=[first, second, third], generic_fallback=True)
    primary = APIError(503)
    served = policy.run(Upstream(primary, forever=True), "q", temperature=0)
    assert (served.value, served.source, served.fallback_index) == ("from backup", "fallback", 1)
    assert served.error is primary and served.attempts == 2
    assert seen == [("first", ("q",), {"temperature": 0}), ("second", ("q",), {"temperature": 0})]
    assert any("fallback #0 failed" in note for note in primary.__notes__)
    assert served.metadata()["fallback_index"] == 1


def test_insufficient_quota_one_attempt_then_fallback(clock: FakeClock) -> None:
    policy = make(clock, retries=5, generic_fallback=True)
    policy.run(Upstream(result="cached"), key="q")
    quota = Upstream(APIError(429, code="insufficient_quota"), forever=True)
    served = policy.run(quota, key="q")
    assert quota.calls == 1 and clock.sleeps == []
    assert (served.source, served.value) == ("cache", "cached")
    assert policy.run(quota, key="unknown").source == "generic_fallback"
    assert quota.calls == 2


# -- streams --------------------------------------------------------------------------------
def test_stream_retried_before_first_item(clock: FakeClock) -> None:
    calls = 0

    def gen() -> Iterator[str]:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise APIError(503)
        yield from ["a", "b", "c"]

    served: list[Served[None]] = []
    policy = make(clock)
    items = list(policy.execute_stream(gen, on_served=served.append))
    assert items == ["a", "b", "c"] and calls == 3 and clock.sleeps == [1.0, 2.0]
    assert served[0].source == "live" and served[0].attempts == 3


def test_stream_error_after_first_item_propagates_and_trips(clock: FakeClock) -> None:
    calls = 0
    err = ConnectionError("dropped mid-stream")

    def gen() -> Iterator[str]:
        nonlocal calls
        calls += 1
        yield "partial"
        raise err

    policy = make(clock, threshold=1, generic_fallback=True)
    got: list[str] = []
    with pytest.raises(ConnectionError) as info:
        for item in policy.stream(gen):
            got.append(item)
    assert info.value is err and got == ["partial"] and calls == 1 and clock.sleeps == []
    assert policy.breaker is not None and policy.breaker.get_state() is CircuitState.OPEN


def test_stream_degraded_when_open_and_cached(clock: FakeClock) -> None:
    policy = make(clock, threshold=1, retries=0)
    assert list(policy.stream(lambda: iter(["x", "y"]), key="s")) == ["x", "y"]
    with pytest.raises(APIError):
        policy.run(Upstream(APIError(503)), key="other")  # opens the circuit (no cache for it)
    served: list[Served[None]] = []
    never = Upstream()
    assert list(policy.execute_stream(never, key="s", on_served=served.append)) == ["x", "y"]
    assert never.calls == 0 and served[0].source == "cache"


async def test_astream_retried_before_first_item_only(clock: FakeClock) -> None:
    calls = 0

    async def agen() -> AsyncIterator[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise APIError(502)
        yield "a"
        yield "b"
        if calls == 2:
            raise ConnectionError("mid-stream")

    policy = make(clock, threshold=2)  # the early failure counts 1, the mid-stream one 2
    got: list[str] = []
    with pytest.raises(ConnectionError):
        async for item in policy.astream(agen):
            got.append(item)
    assert got == ["a", "b"] and calls == 2 and clock.sleeps == [1.0]
    assert policy.breaker is not None and policy.breaker.get_state() is CircuitState.OPEN


# -- async ----------------------------------------------------------------------------------
async def test_arun_attempt_timeout_cancels_and_retries(clock: FakeClock) -> None:
    calls = 0
    cancelled = 0

    async def fn(x: int) -> int:
        nonlocal calls, cancelled
        calls += 1
        if calls == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled += 1
                raise
        return x * 2

    policy = make(clock, attempt_timeout=0.02)
    served = await policy.arun(fn, 21)
    assert (served.value, served.source, served.attempts) == (42, "live", 2)
    assert cancelled == 1 and clock.sleeps == [1.0]


async def test_acall_outage_and_cache(clock: FakeClock) -> None:
    policy = make(clock, retries=2, threshold=2)

    async def ok() -> str:
        return "fresh"

    async def down() -> str:
        raise APIError(503)

    assert await policy.acall(ok, key="k") == "fresh"
    clock.advance(5.0)
    served = await policy.arun(down, key="k")
    assert served.source == "cache" and served.attempts == 2
    assert served.age_s == pytest.approx(6.0)


async def test_success_between_failures_resets_the_breaker_through_the_policy(
    clock: FakeClock,
) -> None:
    """A slow call admitted while the breaker was clean that succeeds after two failures
    breaks their run: two more failures must not open a threshold-3 circuit."""
    policy = make(clock, retries=0, threshold=3, cache=False)
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "ok"

    async def down() -> str:
        raise ConnectionError("down")

    task = asyncio.ensure_future(policy.acall(slow))
    await asyncio.sleep(0)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await policy.acall(down)
    release.set()
    assert await task == "ok"
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await policy.acall(down)
    assert policy.breaker is not None and policy.breaker.get_state() is CircuitState.CLOSED


# -- nesting --------------------------------------------------------------------------------
def test_nested_policies_do_not_multiply_attempts(clock: FakeClock) -> None:
    inner = make(clock, retries=2, threshold=100, cache=False, name="inner")
    outer = make(clock, retries=3, threshold=100, cache=False, name="outer")
    down = Upstream(APIError(503), forever=True)
    with pytest.raises(APIError) as info:
        outer.call(lambda: inner.call(down))
    assert down.calls == 3  # the inner policy's attempts, not 3 x 4
    assert is_handled(info.value)
    assert outer.stats()["retries"] == 0 and inner.stats()["retries"] == 2


def test_nested_policies_through_raise_from_none_do_not_multiply(clock: FakeClock) -> None:
    """Code between the policies re-raises ``RuntimeError(...) from None``: before, the
    outer policy retried it (16 requests instead of 4)."""
    inner = make(clock, retries=3, threshold=100, cache=False, name="inner")
    outer = make(clock, retries=3, threshold=100, cache=False, name="outer")
    down = Upstream(APIError(503), forever=True)

    def middle() -> None:
        try:
            inner.call(down)
        except APIError:
            raise RuntimeError("retrieval failed") from None

    with pytest.raises(RuntimeError):
        outer.call(middle)
    assert down.calls == 4
    assert outer.stats()["retries"] == 0


def test_nested_outer_may_still_serve_its_own_fallback(clock: FakeClock) -> None:
    inner = make(clock, retries=1, threshold=100, cache=False, name="inner")
    outer = make(clock, retries=3, threshold=100, generic_fallback="outer says sorry", name="outer")
    down = Upstream(APIError(500), forever=True)
    served = outer.run(lambda: inner.call(down))
    assert (served.value, served.source, served.attempts) == (
        "outer says sorry",
        "generic_fallback",
        1,
    )
    assert down.calls == 2


def test_inner_open_circuit_is_not_retried_by_outer(clock: FakeClock) -> None:
    inner = make(clock, retries=0, threshold=1, cache=False, name="inner")
    outer = make(clock, retries=4, threshold=100, cache=False, name="outer")
    down = Upstream(APIError(503), forever=True)
    with pytest.raises(APIError):
        outer.call(lambda: inner.call(down))
    with pytest.raises(CircuitOpenError):
        outer.call(lambda: inner.call(down))
    assert down.calls == 1 and clock.sleeps == []


# -- presets --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "retries", "delay", "threshold", "recovery", "queue"),
    [
        ("conservative", 5, 2.0, 3, 120.0, 500),
        ("balanced", 3, 1.0, 5, 60.0, 1000),
        ("aggressive", 2, 0.5, 10, 30.0, 2000),
        ("cost_optimized", 1, 2.0, 5, 60.0, 500),
    ],
)
def test_presets_have_the_seeds_numbers(
    clock: FakeClock,
    preset: str,
    retries: int,
    delay: float,
    threshold: int,
    recovery: float,
    queue: int,
) -> None:
    d = ResiliencePolicy.preset(preset, clock=clock).describe()
    assert d["retry"]["max_retries"] == retries and d["retry"]["initial_delay"] == delay
    # The seed's threshold counts failed calls (count="calls", the default): the breaker,
    # which counts attempts, opens after threshold x attempts per call in a row.
    assert d["breaker"]["failure_threshold"] == threshold * (retries + 1)
    first_release = ResiliencePolicy.preset(preset, clock=clock, count="attempts").describe()
    assert first_release["breaker"]["failure_threshold"] == threshold
    assert d["breaker"]["recovery_timeout"] == recovery
    assert d["limit"]["max_waiting"] == queue
    assert d["name"] == preset


def test_preset_behaves_like_its_numbers(clock: FakeClock) -> None:
    policy = ResiliencePolicy.preset("cost_optimized", clock=clock, generic_fallback=True)
    down = Upstream(APIError(503), forever=True)
    served = policy.run(down)
    assert down.calls == 2 and served.source == "generic_fallback"  # 1 retry
    assert len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] <= 2.0


def test_preset_overrides_and_bad_names(clock: FakeClock) -> None:
    d = ResiliencePolicy.preset("balanced", max_retries=0, clock=clock).describe()
    assert d["retry"]["max_retries"] == 0
    with pytest.raises(ValueError, match="preset"):
        ResiliencePolicy.preset("reckless")
    with pytest.raises(ValueError, match="override"):
        ResiliencePolicy.preset("balanced", max_retires=1)
    assert ResiliencePolicy.resolve(None).name == "balanced"
    with pytest.raises(TypeError):
        ResiliencePolicy.resolve(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"attempt_timeout": 0}, "attempt_timeout"), ({"deadline": -1}, "deadline")],
)
def test_invalid_configuration_names_the_parameter(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(ValueError, match=param):
        ResiliencePolicy(**kwargs)


# -- stats ----------------------------------------------------------------------------------
def test_stats_counts(clock: FakeClock) -> None:
    limit = ConcurrencyLimit(1, max_waiting=0, name="stats")
    policy = make(clock, retries=5, threshold=3, limit=limit, generic_fallback=True)
    policy.run(Upstream(APIError(500), result="a"), key="q")  # live after 1 retry
    down = Upstream(APIError(503), forever=True)
    policy.run(down, key="q")  # 2 retries, opens, served from cache
    policy.run(down, key="q")  # rejected by the breaker, cache
    policy.run(down, key="new")  # rejected by the breaker, generic
    limit.acquire()
    policy.run(down, key="new2")  # rejected by the limit
    limit.release()
    s = policy.stats()
    assert s["calls"] == 5 and s["successes"] == 1 and s["degraded"] == 4
    assert s["retries"] == 3
    assert s["fallbacks_by_source"] == {"cache": 2, "generic_fallback": 1, "rejected": 1}
    assert s["rejections"] == 3
    assert s["rejections_by_reason"] == {"circuit_open": 2, "queue_full": 1}
    assert s["breaker_transitions"] == {"closed->open": 1}
    assert s["breaker_state"] == "open" and s["in_flight"] == 0
    assert s["name"] == "t"
    policy.reset_stats()
    assert policy.stats()["calls"] == 0


# -- probes and streams that end abnormally ---------------------------------------------
def _half_open(clock: FakeClock) -> ResiliencePolicy:
    policy = make(clock, retries=0, threshold=1, recovery=5.0, cache=False)
    with pytest.raises(APIError):
        policy.run(Upstream(APIError(503)))
    clock.advance(5.0)
    return policy


async def test_cancelled_probe_through_policy_frees_its_slot(clock: FakeClock) -> None:
    policy = _half_open(clock)

    async def hang() -> None:
        await asyncio.Event().wait()

    task = asyncio.ensure_future(policy.acall(hang))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def ok() -> str:
        return "ok"

    assert await policy.acall(ok) == "ok"


def test_interrupted_probe_through_policy_frees_its_slot(clock: FakeClock) -> None:
    policy = _half_open(clock)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        policy.call(interrupted)
    assert policy.call(lambda: "ok") == "ok"


def test_stream_closed_early_during_probe_frees_its_slot(clock: FakeClock) -> None:
    policy = _half_open(clock)
    stream = policy.stream(lambda: iter(["a", "b", "c"]))
    assert next(stream) == "a"
    stream.close()
    assert policy.call(lambda: "ok") == "ok"


def test_mid_stream_failure_is_counted_in_stats(clock: FakeClock) -> None:
    policy = make(clock)

    def gen() -> Iterator[str]:
        yield "a"
        raise ConnectionError("dropped")

    with pytest.raises(ConnectionError):
        list(policy.stream(gen))
    s = policy.stats()
    assert s["calls"] == 1 and s["failures"] == 1


async def test_astream_closed_early_during_probe_frees_its_slot(clock: FakeClock) -> None:
    policy = _half_open(clock)

    async def agen() -> AsyncIterator[str]:
        for item in ("a", "b", "c"):
            yield item

    stream = policy.astream(agen)
    assert await stream.__anext__() == "a"
    await stream.aclose()  # type: ignore[attr-defined]

    async def ok() -> str:
        return "ok"

    assert await policy.acall(ok) == "ok"
    assert policy.breaker is not None and policy.breaker.get_state() is CircuitState.CLOSED


async def test_mid_astream_failure_is_counted_in_stats(clock: FakeClock) -> None:
    policy = make(clock)

    async def agen() -> AsyncIterator[str]:
        yield "a"
        raise ConnectionError("dropped")

    with pytest.raises(ConnectionError):
        async for _ in policy.astream(agen):
            pass
    s = policy.stats()
    assert s["calls"] == 1 and s["failures"] == 1


class _BrokenStore(MemoryStore):
    """A store whose cache is down: every read and write raises."""

    def cache_get(self, namespace: str, key: str, now: float) -> Any:
        raise OSError("cache store unreachable")

    def cache_set(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("cache store unreachable")


def test_a_broken_cache_never_replaces_the_users_result_or_error() -> None:
    with fake_clock():
        fallbacks = GracefulFallbacks(name="broken", store=_BrokenStore())
        policy = ResiliencePolicy(RetryStrategy(max_retries=0), None, fallbacks, None)
        # The live answer is returned although remembering it failed.
        assert policy.call(lambda: "live", key="q") == "live"
        # On failure the original error comes out, with the cache failure noted on it.
        boom = APIError(503)

        def down() -> None:
            raise boom

        with pytest.raises(APIError) as info:
            policy.call(down, key="q")
        assert info.value is boom
        assert any("cache fallback failed too" in n for n in info.value.__notes__)


async def test_a_broken_cache_never_replaces_the_result_async() -> None:
    with fake_clock():
        fallbacks = GracefulFallbacks(name="broken-async", store=_BrokenStore())
        policy = ResiliencePolicy(
            RetryStrategy(max_retries=0), None, fallbacks, None, generic_fallback="sorry"
        )

        async def live() -> str:
            return "live"

        async def down() -> None:
            raise APIError(503)

        assert await policy.acall(live, key="q") == "live"
        served = await policy.arun(down, key="q")
        assert served.source == "generic_fallback" and served.value == "sorry"


def test_a_generic_callable_that_fails_leaves_the_original_error() -> None:
    def bad_generic(error: BaseException) -> str:
        raise RuntimeError("template missing")

    policy = ResiliencePolicy(RetryStrategy(max_retries=0), generic_fallback=bad_generic)
    boom = APIError(503)

    def down() -> None:
        raise boom

    with pytest.raises(APIError) as info:
        policy.call(down)
    assert info.value is boom
    assert any("generic fallback failed too" in n for n in info.value.__notes__)


def test_stats_count_every_call_exactly_under_threads() -> None:
    """First-try live answers are counted without a lock and folded in when read; the
    totals must still be exact with many threads, retried calls and a reset mid-way."""
    import threading

    with fake_clock():
        policy = ResiliencePolicy.preset("balanced", name="threads")
        policy.retry.retry_budget = None  # every retried call gets its retry
        failing_once = threading.local()

        def flaky(i: int) -> int:
            if i % 10 == 0 and not getattr(failing_once, "done", False):
                failing_once.done = True
                raise APIError(503)
            failing_once.done = False
            return i

        def worker(offset: int) -> None:
            for i in range(offset, offset + 200):
                assert policy.call(flaky, i, key=f"q{i % 7}") == i

        policy.call(flaky, 1)
        policy.reset_stats()  # what came before is gone, what comes after is all counted
        threads = [threading.Thread(target=worker, args=(t * 1000,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = policy.stats()
    calls = 16 * 200
    retried = 16 * 20  # every tenth call fails once, then succeeds
    assert stats["calls"] == stats["successes"] == calls
    assert stats["attempts"] == calls + retried
    assert stats["retries"] == retried
    assert stats["latency_s"]["count"] == calls


# -- the permit through every way out of a call (drivers hold it without a _Call until the
# first failure, then through the _Call): never leaked, never given back twice -------------
def _limited(clock: FakeClock, **kw: Any) -> tuple[ResiliencePolicy, ConcurrencyLimit]:
    limit = ConcurrencyLimit(2, max_waiting=0, name="permits", clock=clock)
    return make(clock, limit=limit, **kw), limit


def test_permit_given_back_on_every_sync_path(clock: FakeClock) -> None:
    policy, limit = _limited(clock, generic_fallback=True)
    assert policy.call(Upstream()) == "live"  # first try
    assert policy.call(Upstream(APIError(500), APIError(503))) == "live"  # after backoff
    assert policy.call(Upstream(APIError(500), forever=True)) == DEFAULT_GENERIC_ANSWER
    with pytest.raises(APIError):  # the caller's own error, re-raised as is
        make(clock, limit=limit).call(Upstream(APIError(400)))

    assert limit.in_flight == 0
    assert policy.breaker is not None
    assert policy.breaker.get_state() is CircuitState.OPEN  # the outage above tripped it
    assert policy.call(Upstream()) == DEFAULT_GENERIC_ANSWER  # open before the first attempt
    assert limit.in_flight == 0
    policy.breaker.reset()

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        policy.call(interrupted)
    assert limit.in_flight == 0
    assert policy.call(Upstream()) == "live"
    assert limit.in_flight == 0 and limit.stats()["peak_in_flight"] == 1


def test_permit_not_given_back_twice_when_the_retry_is_rejected(clock: FakeClock) -> None:
    """Backoff gives the permit back; if the queue is full when the call comes back for it,
    the call is served degraded without one, and nothing is released that it does not hold."""
    policy, limit = _limited(clock, generic_fallback=True)

    def fail_then_fill_the_limit() -> str:
        if limit.in_flight == 1:  # our own permit: during backoff two others take both
            clock_sleep = clock.sleep

            def sleep_and_fill(seconds: float) -> None:
                clock_sleep(seconds)
                limit.acquire()
                limit.acquire()
                clock.sleep = clock_sleep  # type: ignore[method-assign]

            clock.sleep = sleep_and_fill  # type: ignore[method-assign]
            raise APIError(503)
        return "live"

    served = policy.run(fail_then_fill_the_limit)
    assert served.source == "rejected" and isinstance(served.error, QueueFullError)
    assert limit.in_flight == 2  # the two taken during backoff, and not one less
    limit.release()
    limit.release()
    assert limit.in_flight == 0


async def test_permit_given_back_on_every_async_path(clock: FakeClock) -> None:
    policy, limit = _limited(clock, generic_fallback=True)

    async def answer(result: str = "live") -> str:
        return result

    async def flaky(state: list[int]) -> str:
        state[0] += 1
        if state[0] < 3:
            raise APIError(503)
        return "live"

    assert await policy.acall(answer) == "live"
    assert await policy.acall(flaky, [0]) == "live"
    assert limit.in_flight == 0

    started = asyncio.Event()

    async def hang() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    task = asyncio.ensure_future(policy.acall(hang))  # cancelled in its first attempt
    await started.wait()
    assert limit.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limit.in_flight == 0

    backing_off = asyncio.Event()
    real_asleep = clock.asleep

    async def asleep(seconds: float) -> None:
        backing_off.set()
        await asyncio.Event().wait()  # cancelled while sleeping, without the permit

    clock.asleep = asleep  # type: ignore[method-assign]
    try:
        task = asyncio.ensure_future(policy.acall(flaky, [0]))
        await backing_off.wait()
        assert limit.in_flight == 0  # backoff holds no permit
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        clock.asleep = real_asleep  # type: ignore[method-assign]
    assert limit.in_flight == 0
    assert await policy.acall(answer) == "live"  # and the limit still works
    assert limit.in_flight == 0


# -- degraded streams, every way in, sync and async ------------------------------------------
def test_stream_degraded_paths_and_permit(clock: FakeClock) -> None:
    policy, limit = _limited(clock, generic_fallback=True, retries=1)
    served: list[Served[None]] = []
    # a full limit before the stream starts: the busy answer as one item
    limit.acquire()
    limit.acquire()
    busy = list(policy.execute_stream(Upstream(), on_served=served.append))
    assert busy == [BUSY_ANSWER] and served[-1].source == "rejected" and served[-1].degraded
    limit.release()
    limit.release()
    # live, remembered under its key; then an outage serves the items from the cache
    assert list(policy.stream(lambda: iter(["x", "y"]), key="s")) == ["x", "y"]
    failing = Upstream(APIError(503), forever=True)
    got = list(policy.execute_stream(failing, key="s", on_served=served.append))
    assert got == ["x", "y"] and failing.calls == 2 and served[-1].source == "cache"
    # a fallback stream, and the generic answer for a question never answered
    fb = list(policy.execute_stream(failing, fallbacks=[lambda: iter(["f"])]))
    assert fb == ["f"]
    assert list(policy.execute_stream(failing, on_served=served.append)) == [DEFAULT_GENERIC_ANSWER]
    assert served[-1].source == "generic_fallback"
    assert limit.in_flight == 0


async def test_astream_degraded_paths_and_permit(clock: FakeClock) -> None:
    policy, limit = _limited(clock, generic_fallback=True, retries=1)
    served: list[Served[None]] = []

    async def items(*values: str) -> AsyncIterator[str]:
        for value in values:
            yield value

    async def failing() -> AsyncIterator[str]:
        raise APIError(503)
        yield "never"  # pragma: no cover - makes this an async generator

    async def collect(stream: AsyncIterator[str]) -> list[str]:
        return [item async for item in stream]

    limit.acquire()
    limit.acquire()
    busy = await collect(policy.aexecute_stream(failing, on_served=served.append))
    assert busy == [BUSY_ANSWER] and served[-1].source == "rejected"
    limit.release()
    limit.release()
    assert await collect(policy.aexecute_stream(lambda: items("x", "y"), key="s")) == ["x", "y"]
    got = await collect(policy.aexecute_stream(failing, key="s", on_served=served.append))
    assert got == ["x", "y"] and served[-1].source == "cache" and served[-1].degraded
    fallback = await collect(policy.aexecute_stream(failing, fallbacks=[lambda: items("f")]))
    assert fallback == ["f"]  # an async iterator from the fallback is iterated as such
    assert await collect(policy.aexecute_stream(failing)) == [DEFAULT_GENERIC_ANSWER]
    assert limit.in_flight == 0


async def test_early_closed_async_stream_closes_upstream_before_its_permit_is_reused() -> None:
    """Before: after aclose() the permit went to the next caller while the upstream
    stream was still open (upstream in flight peaked above the limit)."""
    from rag_resilience.limits import ConcurrencyLimit

    policy = ResiliencePolicy(limit=ConcurrencyLimit(1, max_waiting=10, wait_timeout=5.0))
    open_now = 0
    peak = 0

    async def upstream() -> Any:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            for i in range(100):
                yield f"tok{i}"
                await asyncio.sleep(0)
        finally:
            open_now -= 1

    async def read_one() -> str:
        stream = policy.aexecute_stream(upstream)
        first = await stream.__anext__()
        await stream.aclose()  # the reader stops early
        return str(first)

    results = await asyncio.gather(*(read_one() for _ in range(8)))
    assert results == ["tok0"] * 8
    assert peak == 1 and open_now == 0


def test_early_closed_sync_stream_closes_upstream_before_its_permit_is_reused() -> None:
    import threading

    from rag_resilience.limits import ConcurrencyLimit

    policy = ResiliencePolicy(limit=ConcurrencyLimit(1, max_waiting=10, wait_timeout=5.0))
    lock = threading.Lock()
    state = {"open": 0, "peak": 0}

    def upstream() -> Any:
        with lock:
            state["open"] += 1
            state["peak"] = max(state["peak"], state["open"])
        try:
            yield from (f"tok{i}" for i in range(100))
        finally:
            with lock:
                state["open"] -= 1

    def read_one() -> None:
        stream = policy.execute_stream(upstream)
        next(stream)
        stream.close()

    threads = [threading.Thread(target=read_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["peak"] == 1 and state["open"] == 0


async def test_stats_count_cancelled_and_interrupted_calls() -> None:
    """Before: cancelled or interrupted calls were missing from stats() (4,427 counted of
    4,840 started). Tasks cancelled while holding a permit or waiting for one, a thread
    interrupted mid-attempt, and threads that succeed: every call is counted."""
    import threading

    from rag_resilience.limits import ConcurrencyLimit

    policy = ResiliencePolicy(limit=ConcurrencyLimit(2, max_waiting=100), name="counted")
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "ok"

    tasks = [asyncio.create_task(policy.acall(slow)) for _ in range(20)]
    for _ in range(5):
        await asyncio.sleep(0)  # two hold permits, eighteen wait
    for task in tasks[::2]:
        task.cancel()  # both kinds: holders and waiters
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 10

    def interrupted() -> str:
        raise KeyboardInterrupt

    def thread_calls() -> None:
        for _ in range(5):
            assert policy.call(lambda: "ok") == "ok"

    threads = [threading.Thread(target=thread_calls) for _ in range(3)]
    for t in threads:
        t.start()
    with pytest.raises(KeyboardInterrupt):
        policy.call(interrupted)
    for t in threads:
        t.join()
    s = policy.stats()
    assert s["calls"] == 20 + 1 + 15
    assert s["interrupted"] == 11 and s["successes"] == 25
