"""CircuitBreaker: the seed's lifecycle, filtering, rate mode, growing open periods, probes,
decorators, listeners, and a hypothesis state machine run against a local and a store-backed
breaker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from rag_resilience.breaker import ADMITTED_CLEAN, PROBE, CircuitBreaker, CircuitState
from rag_resilience.errors import CircuitOpenError
from rag_resilience.events import Event, EventKind
from rag_resilience.stores.memory import MemoryStore
from rag_resilience.testing import FakeClock

CLOSED, OPEN, HALF = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class APIError(Exception):
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        self.response = SimpleNamespace(status_code=status_code, headers={})
        super().__init__(f"HTTP {status_code}")


def down() -> str:
    raise ConnectionError("Service is down")


def up() -> str:
    return "Service OK"


def fail_n(cb: CircuitBreaker, n: int, exc: type[BaseException] = ConnectionError) -> None:
    for _ in range(n):
        with pytest.raises(exc):
            cb.call(down)


@pytest.fixture(params=["local", "store"])
def make(request: pytest.FixtureRequest) -> Any:
    """Build breakers on a FakeClock, local or backed by a MemoryStore."""
    clock = FakeClock(start=0.0)

    def build(**kw: Any) -> CircuitBreaker:
        if request.param == "store":
            kw.setdefault("store", MemoryStore())
        return CircuitBreaker(clock=clock, **kw)

    build.clock = clock  # type: ignore[attr-defined]
    return build


# -- the seed's lifecycle -------------------------------------------------------------------
def test_seed_lifecycle_closed_open_half_open_closed(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=3, recovery_timeout=5.0, expected_exception=ConnectionError)
    seen: list[tuple[CircuitState, CircuitState]] = []
    cb.add_state_listener(lambda old, new: seen.append((old, new)))
    calls = 0

    def counted(ok: bool) -> str:
        nonlocal calls
        calls += 1
        return up() if ok else down()

    assert cb.get_state() is CLOSED and cb.get_state().value == "closed"
    for i in range(2):
        with pytest.raises(ConnectionError):
            cb.call(counted, False)
        assert cb.get_state() is CLOSED and cb.failure_count == i + 1
    with pytest.raises(ConnectionError):
        cb.call(counted, False)
    assert cb.get_state() is OPEN and calls == 3
    # the seed's 4th call: rejected without calling, still caught by `except ConnectionError`
    with pytest.raises(ConnectionError) as info:
        cb.call(counted, True)
    assert isinstance(info.value, CircuitOpenError) and calls == 3
    assert info.value.retry_after == pytest.approx(5.0)
    clock.advance(4.0)
    with pytest.raises(CircuitOpenError) as info:
        cb.call(counted, True)
    assert info.value.retry_after == pytest.approx(1.0) and calls == 3
    assert cb.retry_after() == pytest.approx(1.0)
    clock.advance(1.0)
    assert cb.get_state() is HALF  # the wait is over: the next call is a probe
    assert cb.call(counted, True) == "Service OK"
    assert calls == 4 and cb.get_state() is CLOSED and cb.failure_count == 0
    assert [(o.value, n.value) for o, n in seen] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_failed_probe_reopens_for_a_full_period(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=10.0)
    fail_n(cb, 1)
    clock.advance(10.0)
    fail_n(cb, 1)  # the probe
    assert cb.get_state() is OPEN and cb.retry_after() == pytest.approx(10.0)


def test_success_resets_consecutive_failures(make: Any) -> None:
    cb = make(failure_threshold=3)
    for _ in range(5):
        fail_n(cb, 2)
        assert cb.call(up) == "Service OK"
    assert cb.get_state() is CLOSED


# -- what counts as a failure ---------------------------------------------------------------
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_caller_errors_do_not_count(make: Any, status: int) -> None:
    cb = make(failure_threshold=2)

    def bad() -> None:
        raise APIError(status)

    for _ in range(10):
        with pytest.raises(APIError):
            cb.call(bad)
    assert cb.get_state() is CLOSED and cb.failure_count == 0


def test_rate_limiting_does_not_trip(make: Any) -> None:
    # A 429 rate_limit_exceeded is an upstream that is up and throttling: retried after
    # its Retry-After, never counted against its health.
    cb = make(failure_threshold=2)

    def throttled() -> None:
        raise APIError(429)

    for _ in range(5):
        with pytest.raises(APIError):
            cb.call(throttled)
    assert cb.get_state() is CLOSED and cb.failure_count == 0


@pytest.mark.parametrize("status", [500, 503, 529])
def test_upstream_errors_count(make: Any, status: int) -> None:
    cb = make(failure_threshold=2)

    def bad() -> None:
        raise APIError(status)

    for _ in range(2):
        with pytest.raises(APIError):
            cb.call(bad)
    assert cb.get_state() is OPEN


def test_expected_exception_filters(make: Any) -> None:
    cb = make(failure_threshold=2, expected_exception=ConnectionError)

    def timeout() -> None:
        raise TimeoutError("slow")  # retryable upstream error, but not what this breaker watches

    for _ in range(5):
        with pytest.raises(TimeoutError):
            cb.call(timeout)
    assert cb.get_state() is CLOSED
    fail_n(cb, 2)
    assert cb.get_state() is OPEN
    cb2 = make(failure_threshold=1, expected_exception=(KeyError, ConnectionError))
    fail_n(cb2, 1)
    assert cb2.get_state() is OPEN


def test_ignored_error_on_a_probe_frees_its_slot(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=5.0)
    fail_n(cb, 1)
    clock.advance(5.0)
    with pytest.raises(APIError):
        cb.call(lambda: (_ for _ in ()).throw(APIError(404)))
    assert cb.get_state() is HALF  # a 404 says nothing: still probing, slot free again
    assert cb.call(up) == "Service OK" and cb.get_state() is CLOSED


# -- rate mode ------------------------------------------------------------------------------
def test_rate_mode_needs_minimum_calls_and_threshold(make: Any) -> None:
    cb = make(mode="rate", failure_rate_threshold=0.5, minimum_calls=6, window_seconds=10.0)
    fail_n(cb, 5)  # 100% failures but only 5 calls
    assert cb.get_state() is CLOSED
    for _ in range(4):
        cb.call(up)
    fail_n(cb, 1)  # 6 failures / 10 calls = 60%
    assert cb.get_state() is OPEN


def test_rate_mode_below_threshold_stays_closed(make: Any) -> None:
    cb = make(mode="rate", failure_rate_threshold=0.5, minimum_calls=4, window_seconds=10.0)
    for _ in range(20):
        cb.call(up)
        cb.call(up)
        fail_n(cb, 1)  # 33%
    assert cb.get_state() is CLOSED


def test_rate_mode_window_slides(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(mode="rate", failure_rate_threshold=0.5, minimum_calls=4, window_seconds=10.0)
    fail_n(cb, 3)
    clock.advance(11.0)  # those three are out of the window
    fail_n(cb, 3)
    assert cb.get_state() is CLOSED
    fail_n(cb, 1)
    assert cb.get_state() is OPEN


def test_rate_mode_window_clears_after_recovery(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(mode="rate", failure_rate_threshold=0.5, minimum_calls=2, recovery_timeout=5.0)
    fail_n(cb, 2)
    assert cb.get_state() is OPEN
    clock.advance(5.0)
    cb.call(up)
    assert cb.get_state() is CLOSED
    fail_n(cb, 1)  # the old failures do not count any more
    assert cb.get_state() is CLOSED


def test_rate_mode_sub_second_window_still_trips(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(mode="rate", failure_rate_threshold=0.5, minimum_calls=3, window_seconds=0.5)
    fail_n(cb, 3)  # three failures in the same instant
    assert cb.get_state() is OPEN
    cb2 = make(mode="rate", failure_rate_threshold=0.5, minimum_calls=3, window_seconds=1.5)
    fail_n(cb2, 2)
    clock.advance(1.0)
    fail_n(cb2, 1)  # 1 s later: still inside a 1.5 s window
    assert cb2.get_state() is OPEN


# -- growing open periods -------------------------------------------------------------------
def test_min_recovery_timeout_doubles_up_to_recovery_timeout_and_resets(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=20.0, min_recovery_timeout=2.0)
    fail_n(cb, 1)
    periods = []
    for _ in range(6):
        periods.append(cb.retry_after())
        clock.advance(cb.retry_after())
        fail_n(cb, 1)  # the probe fails
    assert periods == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    clock.advance(cb.retry_after())
    cb.call(up)
    assert cb.get_state() is CLOSED
    fail_n(cb, 1)
    assert cb.retry_after() == pytest.approx(2.0)  # a new outage starts short again


def test_open_rejects_until_the_period_ends(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=3.0)
    fail_n(cb, 1)
    calls = 0

    def probe() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    for _ in range(29):
        clock.advance(0.1)
        with pytest.raises(CircuitOpenError):
            cb.call(probe)
    assert calls == 0
    clock.advance(0.1 + 1e-9)
    assert cb.call(probe) == "ok" and calls == 1


# -- probes ---------------------------------------------------------------------------------
def test_success_threshold_needs_several_probe_successes(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=5.0, success_threshold=3)
    fail_n(cb, 1)
    clock.advance(5.0)
    cb.call(up)
    cb.call(up)
    assert cb.get_state() is HALF
    cb.call(up)
    assert cb.get_state() is CLOSED
    # and a failure in between re-opens
    fail_n(cb, 1)
    clock.advance(5.0)
    cb.call(up)
    fail_n(cb, 1)
    assert cb.get_state() is OPEN


def test_half_open_max_calls_bounds_concurrent_probes(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=5.0, half_open_max_calls=2, success_threshold=2)
    fail_n(cb, 1)
    clock.advance(5.0)
    t1 = cb.before_call()
    t2 = cb.before_call()
    assert t1 >= PROBE and t2 >= PROBE
    with pytest.raises(CircuitOpenError) as info:
        cb.before_call()
    assert info.value.state == "half_open"
    cb.on_success(t1)
    t3 = cb.before_call()  # t1's slot is free
    with pytest.raises(CircuitOpenError):
        cb.before_call()
    cb.on_success(t2)
    assert cb.get_state() is CLOSED
    cb.on_success(t3)  # a probe reporting after the close changes nothing
    assert cb.get_state() is CLOSED


def test_probe_timeout_frees_a_slot_that_never_reported(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=5.0, probe_timeout=10.0)
    fail_n(cb, 1)
    clock.advance(5.0)
    cb.before_call()  # a probe that hangs forever
    clock.advance(9.0)
    with pytest.raises(CircuitOpenError):
        cb.call(up)
    clock.advance(1.0)
    assert cb.call(up) == "Service OK" and cb.get_state() is CLOSED


def test_cancelled_probe_frees_its_slot(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=5.0)
    fail_n(cb, 1)
    clock.advance(5.0)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cb.call(interrupted)
    assert cb.get_state() is HALF
    assert cb.call(up) == "Service OK"


async def test_cancelled_async_probe_frees_its_slot(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=5.0)
    fail_n(cb, 1)
    clock.advance(5.0)

    async def hang() -> None:
        await asyncio.Event().wait()

    task = asyncio.ensure_future(cb.acall(hang))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def ok() -> str:
        return "ok"

    assert await cb.acall(ok) == "ok" and cb.get_state() is CLOSED


# -- decorator, listeners, events, reset ----------------------------------------------------
def test_decorator_sync(make: Any) -> None:
    cb = make(failure_threshold=2)
    calls = 0

    @cb
    def fetch(x: int) -> int:
        """Doc."""
        nonlocal calls
        calls += 1
        if x < 0:
            raise ConnectionError("down")
        return x + 1

    assert fetch(1) == 2 and fetch.__name__ == "fetch" and fetch.__doc__ == "Doc."
    for _ in range(2):
        with pytest.raises(ConnectionError):
            fetch(-1)
    with pytest.raises(CircuitOpenError):
        fetch(1)
    assert calls == 3


async def test_decorator_async(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=2, recovery_timeout=5.0)
    calls = 0

    @cb
    async def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        if x < 0:
            raise ConnectionError("down")
        return x + 1

    assert asyncio.iscoroutinefunction(fetch)
    assert await fetch(1) == 2
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await fetch(-1)
    with pytest.raises(CircuitOpenError):
        await fetch(1)
    assert calls == 3
    clock.advance(5.0)
    assert await fetch(1) == 2 and cb.get_state() is CLOSED


def test_state_change_events_and_rejections(make: Any) -> None:
    clock: FakeClock = make.clock
    events: list[Event] = []
    cb = make(failure_threshold=1, recovery_timeout=5.0, name="emb", listeners=[events.append])
    fail_n(cb, 1)
    with pytest.raises(CircuitOpenError):
        cb.call(up)
    clock.advance(5.0)
    cb.call(up)
    changes = [(e.old_state, e.new_state) for e in events if e.kind is EventKind.STATE_CHANGE]
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    rejected = [e for e in events if e.kind is EventKind.REJECTED]
    assert len(rejected) == 1 and rejected[0].reason == "circuit_open"
    assert rejected[0].delay == pytest.approx(5.0) and rejected[0].name == "emb"
    assert cb.stats()["rejected"] == 1


def test_listener_errors_never_break_calls(make: Any) -> None:
    cb = make(failure_threshold=1)

    def broken(old: CircuitState, new: CircuitState) -> None:
        raise RuntimeError("listener bug")

    cb.add_state_listener(broken)
    fail_n(cb, 1)
    assert cb.get_state() is OPEN


def test_reset_and_force_open(make: Any) -> None:
    clock: FakeClock = make.clock
    seen: list[tuple[str, str]] = []
    cb = make(failure_threshold=2, recovery_timeout=30.0)
    cb.add_state_listener(lambda o, n: seen.append((o.value, n.value)))
    cb.force_open()
    assert cb.get_state() is OPEN and cb.retry_after() == pytest.approx(30.0)
    with pytest.raises(CircuitOpenError):
        cb.call(up)
    cb.reset()
    assert cb.get_state() is CLOSED and cb.call(up) == "Service OK"
    fail_n(cb, 1)
    cb.reset()
    fail_n(cb, 1)
    assert cb.get_state() is CLOSED  # reset cleared the first failure
    clock.advance(1.0)
    assert seen == [("closed", "open"), ("open", "closed")]
    assert cb.stats()["state"] == "closed" and cb.describe()["failure_threshold"] == 2


def test_two_breakers_on_one_store_share_a_circuit() -> None:
    clock = FakeClock()
    store = MemoryStore()
    a = CircuitBreaker(2, 10.0, name="shared", store=store, clock=clock)
    b = CircuitBreaker(2, 10.0, name="shared", store=store, clock=clock)
    other = CircuitBreaker(2, 10.0, name="other", store=store, clock=clock)
    fail_n(a, 1)
    fail_n(b, 1)
    assert a.get_state() is OPEN and b.get_state() is OPEN and other.get_state() is CLOSED
    with pytest.raises(CircuitOpenError):
        b.call(up)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": 2.5}, "failure_threshold"),
        ({"recovery_timeout": 0}, "recovery_timeout"),
        ({"success_threshold": 0}, "success_threshold"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"mode": "sliding"}, "mode"),
        ({"failure_rate_threshold": 0.0}, "failure_rate_threshold"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"minimum_calls": 0}, "minimum_calls"),
        ({"window_seconds": 0}, "window_seconds"),
        ({"min_recovery_timeout": 0}, "min_recovery_timeout"),
        ({"recovery_timeout": 5.0, "min_recovery_timeout": 6.0}, "min_recovery_timeout"),
        ({"probe_timeout": 0}, "probe_timeout"),
    ],
)
def test_invalid_configuration_names_the_parameter(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(ValueError, match=param):
        CircuitBreaker(**kwargs)


# -- concurrency of reports, deterministically ----------------------------------------------
def test_success_between_failures_resets_even_if_admitted_when_clean() -> None:
    """A call admitted while the count was 0 that succeeds after failures were reported
    still proves the upstream healthy: the failures are no longer consecutive.

    Local breakers only: a store-backed one skips that read to keep one round trip per
    call (it may trip early, never late; the state machine checks both bounds)."""
    cb = CircuitBreaker(failure_threshold=3, clock=FakeClock())
    slow = cb.before_call()  # admitted while clean, still in flight
    fail_n(cb, 2)
    cb.on_success(slow)
    fail_n(cb, 2)
    assert cb.get_state() is CLOSED  # fail, fail, success, fail, fail: never 3 in a row


def test_quiet_flag_follows_what_calls_need_from_the_breaker() -> None:
    cb = CircuitBreaker(failure_threshold=2, recovery_timeout=5.0, clock=FakeClock(start=0.0))
    assert cb.quiet  # closed, nothing counted: nothing to check or reset
    cb.on_failure(ConnectionError("down"), ADMITTED_CLEAN)
    assert not cb.quiet  # a failure counted: the next success must reset it
    cb.on_success()
    assert cb.quiet
    cb.force_open()
    assert not cb.quiet
    cb.reset()
    assert cb.quiet
    assert not CircuitBreaker(mode="rate").quiet  # every success is recorded in the window
    assert not CircuitBreaker(store=MemoryStore()).quiet  # the state lives in the store


def test_policy_success_resets_failures_counted_while_it_was_in_flight() -> None:
    """The policy skips the breaker's bookkeeping while it is quiet; a call admitted then
    must still reset failures that other calls reported while it ran."""
    from rag_resilience.policy import ResiliencePolicy

    cb = CircuitBreaker(failure_threshold=3, clock=FakeClock())
    policy = ResiliencePolicy(breaker=cb)

    def slow_success() -> str:
        fail_n(cb, 2)  # other calls fail meanwhile
        return "ok"

    assert cb.quiet
    assert policy.call(slow_success) == "ok"
    assert cb.failure_count == 0 and cb.quiet
    fail_n(cb, 2)
    assert cb.get_state() is CLOSED  # fail, fail, success, fail, fail: never 3 in a row


def test_late_report_of_an_expired_probe_does_not_free_a_live_probes_slot(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=5.0, probe_timeout=10.0, success_threshold=2)
    fail_n(cb, 1)
    clock.advance(5.0)
    stale = cb.before_call()
    clock.advance(10.0)  # `stale` is presumed lost
    live = cb.before_call()
    cb.on_success(stale)  # ... and reports after all
    with pytest.raises(CircuitOpenError):
        cb.before_call()  # `live` still holds the only probe slot
    cb.on_success(live)
    assert cb.get_state() is HALF or cb.get_state() is CLOSED


def test_probe_from_an_earlier_half_open_round_does_not_count(make: Any) -> None:
    clock: FakeClock = make.clock
    cb = make(failure_threshold=1, recovery_timeout=5.0, half_open_max_calls=2)
    fail_n(cb, 1)
    clock.advance(5.0)
    old = cb.before_call()
    failing = cb.before_call()
    cb.on_failure(ConnectionError(), failing)  # the round fails: open again
    assert cb.get_state() is OPEN
    clock.advance(5.0)
    new1 = cb.before_call()
    new2 = cb.before_call()
    cb.on_success(old)  # a probe of the failed round finishes late
    with pytest.raises(CircuitOpenError):
        cb.before_call()  # new1 and new2 still hold both slots
    assert cb.get_state() is HALF
    cb.on_success(new1)
    assert cb.get_state() is CLOSED
    cb.on_success(new2)


# -- the state machine ----------------------------------------------------------------------
@dataclass
class Pending:
    ticket: int
    kind: str  # "closed" | "probe"
    admitted_at: float
    episode: int


class BreakerMachine(RuleBasedStateMachine):
    """Random success/failure/time/concurrent-call sequences against a small model.

    Checked: never opens before `failure_threshold` consecutive failure reports (for a
    store-backed breaker, counting only successes it records: one admitted while the count
    was clean is skipped to save a round trip), and is open once there were that many; never more
    than `half_open_max_calls` live probes of one half-open round; closes after
    `success_threshold` timely probe successes (and never before that many); rejects while
    open exactly until the open period ends, with the right `retry_after`; never rejects while
    closed; the open period follows the doubling schedule.
    """

    use_store = False

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(start=0.0)

    @initialize(
        f=st.integers(1, 4),
        s=st.integers(1, 3),
        h=st.integers(1, 3),
        recovery=st.sampled_from([4.0, 10.0]),
        min_recovery=st.sampled_from([None, 1.0, 2.0]),
        probe_timeout=st.sampled_from([3.0, 1000.0]),
    )
    def setup(
        self,
        f: int,
        s: int,
        h: int,
        recovery: float,
        min_recovery: float | None,
        probe_timeout: float,
    ) -> None:
        self.f, self.s, self.h = f, s, h
        self.recovery, self.min_recovery, self.pt = recovery, min_recovery, probe_timeout
        self.cb = CircuitBreaker(
            f,
            recovery,
            ConnectionError,
            success_threshold=s,
            half_open_max_calls=h,
            min_recovery_timeout=min_recovery,
            probe_timeout=probe_timeout,
            clock=self.clock,
            store=MemoryStore() if self.use_store else None,
            name="machine",
        )
        self.transitions: list[tuple[str, str]] = []
        self.cb.add_state_listener(lambda o, n: self.transitions.append((o.value, n.value)))
        self.state = "closed"
        self.consec = 0  # failures since the last success the breaker records
        self.strict = 0  # failures since the last success of any kind
        self.k = 0
        self.open_until = 0.0
        self.episode = 0
        self.succ_all = 0
        self.succ_timely = 0
        self.pending: list[Pending] = []

    def period(self) -> float:
        if self.min_recovery is None:
            return self.recovery
        return min(self.recovery, self.min_recovery * 2 ** (self.k - 1))

    def sync(self) -> None:
        now = self.clock.monotonic()
        for old, new in self.transitions:
            assert old == self.state, (old, self.state)
            if (old, new) == ("closed", "open"):
                assert self.consec >= self.f, f"opened after {self.consec} < {self.f} failures"
                self.k = 1
            elif (old, new) == ("open", "half_open"):
                assert now >= self.open_until
                self.succ_all = self.succ_timely = 0
            elif (old, new) == ("half_open", "open"):
                self.k += 1
            elif (old, new) == ("half_open", "closed"):
                assert self.succ_all >= self.s, f"closed after {self.succ_all} < {self.s}"
                self.k = 0
            else:
                raise AssertionError(f"unexpected transition {old}->{new}")
            if new == "open":
                self.open_until = now + self.period()
            self.consec = self.strict = 0
            self.episode += 1
            self.state = new
        self.transitions.clear()

    def live_probes(self, now: float) -> int:
        return sum(
            1
            for p in self.pending
            if p.kind == "probe" and p.episode == self.episode and p.admitted_at + self.pt > now
        )

    def start(self) -> Pending | None:
        now = self.clock.monotonic()
        try:
            ticket = self.cb.before_call()
        except CircuitOpenError as exc:
            self.sync()
            assert self.state != "closed", "rejected while closed"
            if self.state == "open":
                assert now < self.open_until
                assert exc.retry_after == pytest.approx(self.open_until - now)
            else:
                assert self.live_probes(now) >= self.h, "probe slot leaked"
            return None
        self.sync()
        assert self.state != "open", "admitted while open"
        if self.state == "half_open":
            assert ticket >= PROBE
            assert self.live_probes(now) + 1 <= self.h, "too many concurrent probes"
            p = Pending(ticket, "probe", now, self.episode)
        else:
            assert ticket < PROBE
            p = Pending(ticket, "closed", now, self.episode)
        self.pending.append(p)
        return p

    def finish(self, p: Pending, ok: bool) -> None:
        self.pending.remove(p)
        now = self.clock.monotonic()
        before = self.state
        same_round = p.kind == "probe" and p.episode == self.episode and before == "half_open"
        timely = now < p.admitted_at + self.pt
        if p.kind == "closed" and before == "closed":
            recorded = not self.use_store or p.ticket != ADMITTED_CLEAN
            if ok:
                self.strict = 0
                self.consec = 0 if recorded else self.consec
            else:
                self.strict += 1
                self.consec += 1
        if same_round and ok:
            self.succ_all += 1
            self.succ_timely += int(timely)
        if ok:
            self.cb.on_success(p.ticket)
        else:
            self.cb.on_failure(ConnectionError("down"), p.ticket)
        self.sync()
        if p.kind == "closed" and before == "closed" and not ok and self.strict >= self.f:
            assert self.state == "open", f"still closed after {self.strict} failures in a row"
        if same_round and timely and not ok:
            assert self.state == "open", "a failed probe must re-open"
        if same_round and ok and self.succ_timely >= self.s:
            assert self.state == "closed", "did not close after success_threshold probes"

    @rule(ok=st.booleans())
    def call_now(self, ok: bool) -> None:
        p = self.start()
        if p is not None:
            self.finish(p, ok)

    @rule()
    def start_concurrent(self) -> None:
        if len(self.pending) < 6:
            self.start()

    @rule(data=st.data(), ok=st.booleans())
    def finish_one(self, data: st.DataObject, ok: bool) -> None:
        if self.pending:
            self.finish(data.draw(st.sampled_from(self.pending)), ok)

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0, 11.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)

    # Macro steps, so deep states (a second half-open round, a timed-out probe) are
    # reached in a few rules rather than by luck.
    @rule()
    def fail_until_open(self) -> None:
        for _ in range(self.f):
            if self.state != "closed":
                break
            self.call_now(False)

    @rule()
    def wait_out_open_period(self) -> None:
        now = self.clock.monotonic()
        if self.state == "open" and self.open_until > now:
            self.clock.advance(self.open_until - now)

    @rule()
    def wait_out_probe_timeout(self) -> None:
        self.clock.advance(self.pt if self.pt < 100 else 1.0)

    @invariant()
    def state_matches_model(self) -> None:
        if not hasattr(self, "cb"):
            return
        now = self.clock.monotonic()
        expected = self.state
        if expected == "open" and now >= self.open_until:
            expected = "half_open"
        assert self.cb.get_state().value == expected
        if expected == "open":
            assert self.cb.retry_after() == pytest.approx(self.open_until - now)
        # Drivers skip before_call/on_success while `quiet`: it must never be True when
        # either would matter (a store, a state other than CLOSED, a failure counted).
        rec = self.cb._snapshot()
        assert self.cb.quiet == (not self.use_store and rec.state == "closed" and rec.failures == 0)


class StoreBreakerMachine(BreakerMachine):
    use_store = True


_machine_settings = settings(
    max_examples=200,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBreakerStateMachine = BreakerMachine.TestCase
TestBreakerStateMachine.settings = _machine_settings
TestStoreBreakerStateMachine = StoreBreakerMachine.TestCase
TestStoreBreakerStateMachine.settings = _machine_settings
