"""Recovery without turning the crowd away (issue 15): probe-wait, slow start, and callers
with nothing to degrade to waiting for the next probe instead of failing.

Crowds are threads and asyncio tasks together; time is a FakeClock; the only real waits
are thread hand-offs (`wait_until`), never backoff or open periods. Shared breakers run on
a real Redis under a unique prefix, two `RedisStore` instances standing for two processes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from rag_resilience import deadline
from rag_resilience.breaker import CircuitBreaker, CircuitState
from rag_resilience.errors import CircuitOpenError
from rag_resilience.fallback import GracefulFallbacks
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.probewait import Signal, default_probe_wait
from rag_resilience.retry import RetryStrategy
from rag_resilience.slowstart import SlowStart
from rag_resilience.testing import FakeClock

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
THREADS, TASKS = 8, 24


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Spin until `predicate` holds: only for thread hand-offs."""
    limit = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > limit:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


class Crowd:
    """`threads` threads running `sync_fn` and `tasks` asyncio tasks (on one loop in its
    own thread) running `async_fn`, started at once; `join()` returns every outcome."""

    def __init__(
        self,
        sync_fn: Callable[[], Any],
        async_fn: Callable[[], Awaitable[Any]],
        threads: int = THREADS,
        tasks: int = TASKS,
    ) -> None:
        self.results: list[Any] = []
        self._lock = threading.Lock()

        def one() -> None:
            try:
                result: Any = sync_fn()
            except Exception as exc:
                result = exc
            with self._lock:
                self.results.append(result)

        async def many() -> None:
            out = await asyncio.gather(*(async_fn() for _ in range(tasks)), return_exceptions=True)
            with self._lock:
                self.results.extend(out)

        self.size = threads + tasks
        self._threads = [threading.Thread(target=one, daemon=True) for _ in range(threads)]
        self._threads.append(threading.Thread(target=lambda: asyncio.run(many()), daemon=True))
        for t in self._threads:
            t.start()

    def join(self) -> list[Any]:
        for t in self._threads:
            t.join(20)
        assert not any(t.is_alive() for t in self._threads), "crowd hung"
        return self.results


class Upstream:
    """Counts calls; `probe()` blocks until `finish()` and then succeeds or raises."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None

    def count(self) -> None:
        with self.lock:
            self.calls += 1

    def probe(self) -> str:
        self.count()
        self.entered.set()
        assert self.release.wait(20)
        if self.error is not None:
            raise self.error
        return "probe"

    def ok(self) -> str:
        self.count()
        return "ok"

    async def aok(self) -> str:
        self.count()
        await asyncio.sleep(0)
        return "ok"

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.release.set()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"no Redis at {REDIS_URL}: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    prefix = f"rr-probewait-{uuid.uuid4().hex[:12]}"
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def pair(kind: str, clock: FakeClock, prefix: str | None, **kw: Any) -> tuple[Any, Any]:
    """(breaker that probes, breaker whose callers wait): one local breaker, or two
    breakers of one name on two RedisStores (two processes sharing a circuit)."""
    kw = {"failure_threshold": 1, "recovery_timeout": 5.0, "clock": clock, **kw}
    if kind == "local":
        cb = CircuitBreaker(name="pw", **kw)
        return cb, cb
    from rag_resilience.stores.redis import RedisStore

    a = CircuitBreaker(name="pw", store=RedisStore(REDIS_URL, prefix=prefix, op_timeout=2), **kw)
    b = CircuitBreaker(name="pw", store=RedisStore(REDIS_URL, prefix=prefix, op_timeout=2), **kw)
    return a, b


KINDS = pytest.mark.parametrize("kind", ["local", "redis"])


@pytest.fixture
def prefix_for(request: pytest.FixtureRequest) -> str | None:
    kind = request.node.callspec.params.get("kind")
    if kind == "redis":
        return str(request.getfixturevalue("redis_prefix"))
    return None


def trip(cb: CircuitBreaker, clock: FakeClock) -> None:
    with pytest.raises(ConnectionError):
        cb.call(lambda: (_ for _ in ()).throw(ConnectionError("down")))
    assert cb.get_state() is CircuitState.OPEN
    clock.advance(5.0)  # the open period is over: the next call is the probe


def start_probe(cb: CircuitBreaker, up: Upstream) -> threading.Thread:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(cb.call(up.probe))
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(up.entered.is_set)
    return thread


# -- probe-wait ------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@KINDS
def test_callers_wait_for_a_probe_in_flight_and_go_live_when_it_succeeds(
    kind: str, prefix_for: str | None
) -> None:
    """Before: everyone but the probe got CircuitOpenError at once (49 of 50 generic)."""
    clock = FakeClock()
    prober, crowd_cb = pair(kind, clock, prefix_for)
    trip(prober, clock)
    up = Upstream()
    probe = start_probe(prober, up)
    crowd = Crowd(lambda: crowd_cb.call(up.ok), lambda: crowd_cb.acall(up.aok))
    wait_until(lambda: crowd_cb.waited == crowd.size)  # all parked on the verdict
    assert up.calls == 1  # nobody but the probe reached the upstream
    up.finish()
    results = crowd.join()
    probe.join(10)
    assert results == ["ok"] * crowd.size
    assert up.calls == 1 + crowd.size
    assert crowd_cb.get_state() is CircuitState.CLOSED and crowd_cb.rejected == 0
    if kind == "redis":  # the verdict crossed "processes" by pub/sub, not by polling
        assert crowd_cb.store._rag_resilience_notifier.received >= 1


@pytest.mark.timeout(30)
@KINDS
def test_a_failed_probe_rejects_its_waiters_at_once(kind: str, prefix_for: str | None) -> None:
    clock = FakeClock()
    prober, crowd_cb = pair(kind, clock, prefix_for)
    trip(prober, clock)
    up = Upstream()
    probe = start_probe(prober, up)
    crowd = Crowd(lambda: crowd_cb.call(up.ok), lambda: crowd_cb.acall(up.aok))
    wait_until(lambda: crowd_cb.waited == crowd.size)
    up.finish(ConnectionError("still down"))
    results = crowd.join()
    probe.join(10)
    assert all(isinstance(r, CircuitOpenError) and r.state == "open" for r in results), results
    assert up.calls == 1  # the probe only
    assert prober.get_state() is CircuitState.OPEN


@pytest.mark.timeout(30)
def test_policy_waiters_are_served_degraded_at_once_after_a_failed_probe() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(failure_threshold=1, recovery_timeout=5.0, clock=clock, name="pwp")
    policy = ResiliencePolicy(breaker=cb, generic_fallback="sorry", clock=clock, name="pwp")
    trip(cb, clock)
    up = Upstream()
    probe = threading.Thread(target=lambda: policy.run(up.probe))
    probe.start()
    wait_until(up.entered.is_set)
    crowd = Crowd(lambda: policy.run(up.ok), lambda: policy.arun(up.aok))
    wait_until(lambda: cb.waited == crowd.size)
    up.finish(ConnectionError("still down"))
    results = crowd.join()
    probe.join(10)
    assert [(r.value, r.source) for r in results] == [("sorry", "generic_fallback")] * crowd.size
    assert up.calls == 1


def test_probe_wait_is_bounded_by_the_callers_deadline() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(failure_threshold=1, recovery_timeout=5.0, clock=clock, name="pwd")
    trip(cb, clock)
    up = Upstream()
    probe = start_probe(cb, up)
    try:
        with deadline.scope(0.001), pytest.raises(CircuitOpenError) as info:
            cb.call(up.ok)  # 1 ms left: waits at most that, then is refused
        assert info.value.state == "half_open" and up.calls == 1
    finally:
        up.finish()
        probe.join(10)


def test_probe_wait_zero_rejects_at_once_and_settings_are_checked() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(failure_threshold=1, recovery_timeout=5.0, clock=clock, probe_wait=0)
    trip(cb, clock)
    up = Upstream()
    probe = start_probe(cb, up)
    try:
        with pytest.raises(CircuitOpenError):
            cb.call(up.ok)
        assert cb.waited == 0
    finally:
        up.finish()
        probe.join(10)
    with pytest.raises(ValueError, match=r"probe_wait must be in \[0, probe_timeout=60.0\]"):
        CircuitBreaker(probe_wait=-1)
    with pytest.raises(ValueError, match="probe_wait"):
        CircuitBreaker(probe_wait=61.0)
    with pytest.raises(ValueError, match="slow start limit"):
        SlowStart(0)
    assert default_probe_wait(30.0) == 5.0 and default_probe_wait(2.0) == 2.0


def test_signal_never_misses_a_publish_between_look_and_wait() -> None:
    signal = Signal()
    epoch = signal.epoch
    signal.publish()
    assert signal.wait(epoch, 10.0)  # returns at once: the epoch moved
    assert asyncio.run(signal.await_(epoch, 10.0))


# -- slow start ------------------------------------------------------------------------------
class Gate:
    """Upstream calls park here until the test lets one through (threads and tasks)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.tickets = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event: asyncio.Event | None = None

    def _take(self) -> bool:
        with self.cond:
            if self.tickets:
                self.tickets -= 1
                return True
            return False

    def release(self) -> None:
        with self.cond:
            self.tickets += 1
            self.cond.notify()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        event, self.event = self.event, asyncio.Event()
        if event is not None:
            event.set()

    def acquire(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.tickets > 0)
            self.tickets -= 1

    async def aacquire(self) -> None:
        if self.loop is None:
            self.loop, self.event = asyncio.get_running_loop(), asyncio.Event()
        while True:
            event = self.event
            if self._take():
                return
            assert event is not None
            await event.wait()


@pytest.mark.timeout(120)
def test_slow_start_a_crowd_of_500_never_exceeds_the_ramp() -> None:
    """After the probe closes the circuit, a crowd of 500 (20 threads, 480 tasks) enters as
    the ramp allows: in flight <= 1 + completions (doubling per round trip) up to the
    policy's limit of 16. Before: every waiter went at once (up to the limit)."""
    clock = FakeClock()
    ramp = SlowStart(16, initial=1)
    cb = CircuitBreaker(
        failure_threshold=1, recovery_timeout=5.0, clock=clock, name="ss", slow_start=ramp
    )
    limit = ConcurrencyLimit(16, max_waiting=1000, name="ss")
    policy = ResiliencePolicy(breaker=cb, limit=limit, clock=clock, name="ss")
    with pytest.raises(ConnectionError):
        policy.run(lambda: (_ for _ in ()).throw(ConnectionError("down")))
    clock.advance(5.0)
    up = Upstream()
    probe = threading.Thread(target=lambda: policy.run(up.probe), daemon=True)
    probe.start()
    wait_until(up.entered.is_set)
    lock = threading.Lock()
    state = {"entered": 0, "returned": 0, "now": 0, "peak": 0, "violations": 0}
    gate = Gate()

    def enter() -> None:
        with lock:
            state["entered"] += 1
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            if state["entered"] > ramp.initial + 2 * state["returned"]:
                state["violations"] += 1

    def leave() -> str:
        with lock:
            state["now"] -= 1
            state["returned"] += 1
        return "ok"

    def work() -> str:
        enter()
        gate.acquire()
        return leave()

    async def awork() -> str:
        enter()
        await gate.aacquire()
        return leave()

    crowd = Crowd(lambda: policy.run(work), lambda: policy.arun(awork), threads=20, tasks=480)
    # 15 permit holders wait for the probe's verdict, the rest queue for a permit
    wait_until(lambda: cb.waited == 15 and limit.waiting == crowd.size - 15)
    up.finish()
    probe.join(10)
    for released in range(crowd.size):
        expected = min(1 + released, 16, crowd.size - released)
        wait_until(lambda e=expected: state["now"] == e)  # type: ignore[misc]
        assert state["violations"] == 0
        gate.release()
    results = crowd.join()
    assert [(r.value, r.source) for r in results] == [("ok", "live")] * crowd.size
    assert state["peak"] == 16 and not ramp.active and ramp.ramps == 1
    assert cb.quiet  # the ramp is over: the healthy path costs nothing again


# -- nothing to degrade to: wait, don't fail ------------------------------------------------
def make_policy(clock: FakeClock, **kw: Any) -> ResiliencePolicy:
    cb = CircuitBreaker(failure_threshold=1, recovery_timeout=5.0, clock=clock, name="nd")
    return ResiliencePolicy(
        retry=RetryStrategy(max_retries=0, clock=clock, retry_budget=None),
        breaker=cb,
        fallbacks=GracefulFallbacks(clock=clock, name="nd"),
        limit=ConcurrencyLimit(4, max_waiting=100, name="nd"),
        deadline=kw.pop("deadline", 30.0),
        clock=clock,
        name="nd",
        **kw,
    )


def waited_out(clock: FakeClock, deadline: float = 30.0) -> None:
    """The call that opened the circuit had nothing to degrade to either: it waited for the
    next probe within its deadline, was that probe, and raised the upstream's error when
    it failed. Forget that sleep: the test is about the next caller."""
    assert clock.sleeps and sum(clock.sleeps) <= deadline
    clock.sleeps.clear()


@pytest.mark.timeout(30)
def test_a_caller_with_nothing_to_degrade_to_waits_for_the_next_probe() -> None:
    """Before: CircuitOpenError at once, although the upstream was back within the call's
    deadline (ResilientOpenAIClient's defaults raised more than the raw SDK)."""
    clock = FakeClock()
    policy = make_policy(clock)
    up = Upstream()
    with pytest.raises(ConnectionError):
        policy.run(lambda: (_ for _ in ()).throw(ConnectionError("down")))
    waited_out(clock)
    served = policy.run(up.ok)  # open for 5 s: waits (fake time) for the probe
    assert (served.value, served.source) == ("ok", "live")
    assert clock.sleeps == [pytest.approx(5.0)] and up.calls == 1


@pytest.mark.timeout(30)
def test_a_crowd_with_nothing_to_degrade_to_recovers_live_threads_and_tasks() -> None:
    clock = FakeClock()
    policy = make_policy(clock)
    up = Upstream()
    with pytest.raises(ConnectionError):
        policy.run(lambda: (_ for _ in ()).throw(ConnectionError("down")))
    results = Crowd(lambda: policy.run(up.ok), lambda: policy.arun(up.aok)).join()
    assert [(r.value, r.source) for r in results] == [("ok", "live")] * (THREADS + TASKS)
    assert policy.limit is not None and policy.limit.in_flight == 0


def test_a_caller_with_a_degraded_answer_gets_it_at_once() -> None:
    clock = FakeClock()
    policy = make_policy(clock)
    up = Upstream()
    assert policy.run(up.ok, key="q").source == "live"
    with pytest.raises(ConnectionError):
        policy.run(lambda: (_ for _ in ()).throw(ConnectionError("down")))
    waited_out(clock)
    served = policy.run(up.ok, key="q")
    assert (served.value, served.source) == ("ok", "cache") and clock.sleeps == []


def test_a_deadline_shorter_than_the_open_period_raises_at_once() -> None:
    clock = FakeClock()
    policy = make_policy(clock, deadline=3.0)
    with pytest.raises(ConnectionError):
        policy.run(lambda: (_ for _ in ()).throw(ConnectionError("down")))
    with pytest.raises(CircuitOpenError):
        policy.run(Upstream().ok)
    assert clock.sleeps == []


async def test_async_caller_with_nothing_to_degrade_to_waits_for_the_next_probe() -> None:
    clock = FakeClock()
    policy = make_policy(clock)
    up = Upstream()

    async def down() -> str:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await policy.arun(down)

    waited_out(clock)
    served = await policy.arun(up.aok)
    assert (served.value, served.source) == ("ok", "live") and clock.sleeps == [5.0]


@pytest.mark.timeout(30)
def test_a_close_seen_by_another_process_starts_its_ramp_too(redis_prefix: str) -> None:
    """Two processes share a circuit on Redis: when one's probe closes it, the other learns
    it by pub/sub and ramps its own admissions (the ramp is per process)."""
    from rag_resilience.stores.redis import RedisStore

    clock = FakeClock()
    ramps = [SlowStart(8), SlowStart(8)]
    a, b = (
        CircuitBreaker(
            failure_threshold=1,
            recovery_timeout=5.0,
            clock=clock,
            name="ss-shared",
            slow_start=ramp,
            store=RedisStore(REDIS_URL, prefix=redis_prefix, op_timeout=2),
        )
        for ramp in ramps
    )
    trip(a, clock)
    assert a.call(Upstream().ok) == "ok"  # a's probe closes the shared circuit
    assert ramps[0].active and ramps[0].ramps == 1
    wait_until(lambda: ramps[1].ramps == 1)  # b heard it
    assert b.admit() < 0 and ramps[1].in_flight == 1  # a ramped admission (RAMPED ticket)


def test_a_stream_with_nothing_to_degrade_to_waits_for_the_next_probe() -> None:
    clock = FakeClock()
    policy = make_policy(clock)
    with pytest.raises(ConnectionError):
        policy.run(lambda: (_ for _ in ()).throw(ConnectionError("down")))
    waited_out(clock)
    assert list(policy.stream(lambda: iter(["a", "b"]))) == ["a", "b"]
    assert clock.sleeps == [pytest.approx(5.0)]


async def test_an_async_stream_with_nothing_to_degrade_to_waits_for_the_next_probe() -> None:
    clock = FakeClock()
    policy = make_policy(clock)
    with pytest.raises(ConnectionError):
        policy.run(lambda: (_ for _ in ()).throw(ConnectionError("down")))
    waited_out(clock)

    async def chunks() -> Any:
        for item in ("a", "b"):
            yield item

    assert [x async for x in policy.astream(chunks)] == ["a", "b"]
    assert clock.sleeps == [pytest.approx(5.0)]
