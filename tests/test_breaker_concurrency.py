"""One breaker (and one policy with its ConcurrencyLimit) hammered by 32 threads and 500
asyncio tasks: counters exact, probes and in-flight calls within their bounds, no deadlock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from rag_resilience.breaker import CircuitBreaker, CircuitState
from rag_resilience.errors import CircuitOpenError
from rag_resilience.events import StatsCollector
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.retry import RetryStrategy
from rag_resilience.stores.memory import MemoryStore
from rag_resilience.testing import FakeClock

THREADS = 32
TASKS = 500


class Gauge:
    """Counts calls in flight and remembers the peak."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.total = 0

    def __enter__(self) -> Gauge:
        with self.lock:
            self.now += 1
            self.total += 1
            self.peak = max(self.peak, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1


def run_threads(n: int, target: Callable[[int], None]) -> None:
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            barrier.wait(5)
            target(i)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "threads hung"
    assert not errors, errors[:3]


def breaker(store: bool, clock: FakeClock, **kw: Any) -> CircuitBreaker:
    return CircuitBreaker(clock=clock, store=MemoryStore() if store else None, **kw)


@pytest.fixture(autouse=True)
def _quiet_log() -> Any:
    """Thousands of rejections each log a warning; formatting them would dominate runtime."""
    log = logging.getLogger("rag_resilience")
    previous = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(previous)


STORES = pytest.mark.parametrize("store", [False, True], ids=["local", "store"])


# -- threads --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@STORES
def test_threads_failure_count_is_exact(store: bool) -> None:
    cb = breaker(store, FakeClock(), failure_threshold=10**9)
    per_thread = 40

    def down() -> None:
        raise ConnectionError("down")

    def work(i: int) -> None:
        for _ in range(per_thread):
            with pytest.raises(ConnectionError):
                cb.call(down)

    run_threads(THREADS, work)
    assert cb.failure_count == THREADS * per_thread
    assert cb.get_state() is CircuitState.CLOSED


@pytest.mark.timeout(60)
@STORES
def test_threads_rate_window_counts_every_call(store: bool) -> None:
    cb = breaker(store, FakeClock(), mode="rate", minimum_calls=10**9, window_seconds=60.0)
    per_thread = 30
    outcomes = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def work(i: int) -> None:
        for j in range(per_thread):
            try:
                cb.call(lambda j=j: j if (i + j) % 3 else (_ for _ in ()).throw(ConnectionError()))
                key = "ok"
            except ConnectionError:
                key = "failed"
            with lock:
                outcomes[key] += 1

    run_threads(THREADS, work)
    window = cb._snapshot().window
    calls = sum(b[0] for b in window.values())
    failures = sum(b[1] for b in window.values())
    assert calls == THREADS * per_thread == outcomes["ok"] + outcomes["failed"]
    assert (
        failures
        == outcomes["failed"]
        == sum(1 for i in range(THREADS) for j in range(per_thread) if (i + j) % 3 == 0)
    )


@pytest.mark.timeout(60)
@STORES
def test_threads_trip_once_and_rejections_are_exact(store: bool) -> None:
    clock = FakeClock()
    collector = StatsCollector()
    cb = breaker(store, clock, failure_threshold=5, recovery_timeout=30.0, listeners=[collector])
    per_thread = 25
    seen = {"failed": 0, "rejected": 0}
    lock = threading.Lock()
    made = Gauge()

    def down() -> None:
        with made:
            raise ConnectionError("down")

    def work(i: int) -> None:
        for _ in range(per_thread):
            try:
                cb.call(down)
            except CircuitOpenError:
                key = "rejected"
            except ConnectionError:
                key = "failed"
            with lock:
                seen[key] += 1

    run_threads(THREADS, work)
    total = THREADS * per_thread
    assert seen["failed"] + seen["rejected"] == total
    assert made.total == seen["failed"]  # every upstream call made is a failure seen
    assert 5 <= seen["failed"] <= 5 + THREADS  # in flight when it tripped
    stats = collector.stats()
    assert stats["rejections"] == seen["rejected"]
    assert cb.stats()["rejected"] == seen["rejected"]
    assert stats["breaker_transitions"] == {"closed->open": 1}


@pytest.mark.timeout(60)
@STORES
def test_threads_half_open_probes_never_above_bound(store: bool) -> None:
    clock = FakeClock()
    cb = breaker(
        store,
        clock,
        failure_threshold=1,
        recovery_timeout=5.0,
        half_open_max_calls=3,
        success_threshold=10**9,
    )
    with pytest.raises(ConnectionError):
        cb.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    clock.advance(5.0)
    probes = Gauge()
    seen = {"ok": 0, "rejected": 0}
    lock = threading.Lock()

    def probe() -> str:
        with probes:
            time.sleep(0.001)
            return "ok"

    def work(i: int) -> None:
        for _ in range(15):
            try:
                cb.call(probe)
                key = "ok"
            except CircuitOpenError:
                key = "rejected"
            with lock:
                seen[key] += 1

    run_threads(THREADS, work)
    assert seen["ok"] + seen["rejected"] == THREADS * 15
    assert probes.total == seen["ok"] > 3
    assert 1 <= probes.peak <= 3
    assert cb.get_state() is CircuitState.HALF_OPEN
    assert cb.stats()["probes_in_flight"] == 0  # every slot given back


@pytest.mark.timeout(60)
@STORES
def test_threads_half_open_closes_after_success_threshold(store: bool) -> None:
    clock = FakeClock()
    cb = breaker(
        store,
        clock,
        failure_threshold=1,
        recovery_timeout=5.0,
        half_open_max_calls=2,
        success_threshold=4,
    )
    transitions: list[tuple[str, str]] = []
    cb.add_state_listener(lambda o, n: transitions.append((o.value, n.value)))
    with pytest.raises(ConnectionError):
        cb.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    clock.advance(5.0)
    probes = Gauge()

    def probe() -> str:
        with probes:
            time.sleep(0.001)
            return "ok"

    def work(i: int) -> None:
        for _ in range(10):
            with contextlib.suppress(CircuitOpenError):
                cb.call(probe)

    run_threads(THREADS, work)
    assert cb.get_state() is CircuitState.CLOSED
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


@pytest.mark.timeout(60)
def test_lock_is_not_held_around_the_call_or_listeners() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(failure_threshold=1, recovery_timeout=5.0, clock=clock)
    states: list[str] = []
    cb.add_state_listener(
        lambda o, n: states.append(cb.get_state().value + str(cb.stats()["state"]))
    )

    def reentrant() -> str:
        cb.reset()  # takes the transition lock: would deadlock if held around the call
        return cb.get_state().value

    assert cb.call(reentrant) == "closed"
    cb.force_open()
    assert states == ["openopen"]

    # a thread blocked inside a protected call does not block others
    inside = threading.Event()
    release = threading.Event()
    cb.reset()

    def slow() -> None:
        inside.set()
        release.wait(5)

    t = threading.Thread(target=cb.call, args=(slow,))
    t.start()
    assert inside.wait(5)
    start = time.perf_counter()
    for _ in range(100):
        cb.call(lambda: None)
        with pytest.raises(ConnectionError):
            cb.call(lambda: (_ for _ in ()).throw(ConnectionError()))
        cb.reset()
    assert time.perf_counter() - start < 4.0  # not held by the slow call (5 s)
    release.set()
    t.join(5)
    assert not t.is_alive()


# -- asyncio --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@STORES
async def test_tasks_counters_exact_and_single_trip(store: bool) -> None:
    clock = FakeClock()
    collector = StatsCollector()
    cb = breaker(store, clock, failure_threshold=10, recovery_timeout=30.0, listeners=[collector])
    made = 0

    async def down() -> None:
        nonlocal made
        made += 1
        await asyncio.sleep(0)
        raise ConnectionError("down")

    async def one() -> str:
        try:
            await cb.acall(down)
        except CircuitOpenError:
            return "rejected"
        except ConnectionError:
            return "failed"
        return "ok"  # pragma: no cover

    results = await asyncio.gather(*(one() for _ in range(TASKS)))
    assert len(results) == TASKS
    assert results.count("failed") == made and results.count("ok") == 0
    assert results.count("rejected") == TASKS - made == cb.stats()["rejected"]
    assert collector.stats()["rejections"] == results.count("rejected")
    assert collector.stats()["breaker_transitions"] == {"closed->open": 1}
    assert cb.get_state() is CircuitState.OPEN


@pytest.mark.timeout(60)
@STORES
async def test_tasks_half_open_probes_never_above_bound(store: bool) -> None:
    clock = FakeClock()
    cb = breaker(
        store,
        clock,
        failure_threshold=1,
        recovery_timeout=5.0,
        half_open_max_calls=4,
        success_threshold=10**9,
    )
    with pytest.raises(ConnectionError):
        cb.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    clock.advance(5.0)
    probes = Gauge()

    async def probe() -> str:
        with probes:
            for _ in range(3):
                await asyncio.sleep(0)
            return "ok"

    async def one() -> str:
        for _ in range(20):  # keep trying: rejected tasks come back after a yield
            try:
                return await cb.acall(probe)
            except CircuitOpenError:
                await asyncio.sleep(0)
        return "gave up"

    results = await asyncio.gather(*(one() for _ in range(TASKS)))
    assert probes.peak == 4  # the bound is reached and never passed
    assert probes.total == results.count("ok") > 4
    assert results.count("ok") + results.count("gave up") == TASKS
    assert cb.stats()["probes_in_flight"] == 0


@pytest.mark.timeout(60)
@STORES
async def test_tasks_cancelled_probes_free_their_slots(store: bool) -> None:
    clock = FakeClock()
    cb = breaker(
        store,
        clock,
        failure_threshold=1,
        recovery_timeout=5.0,
        half_open_max_calls=2,
        probe_wait=0,  # reject at once (probe-wait has its own tests)
    )
    with pytest.raises(ConnectionError):
        cb.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    clock.advance(5.0)

    async def hang() -> None:
        await asyncio.Event().wait()

    tasks = [asyncio.ensure_future(cb.acall(hang)) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in tasks) == 48  # rejected at once; 2 probes hang
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert cb.stats()["probes_in_flight"] == 0

    async def ok() -> str:
        return "ok"

    assert await cb.acall(ok) == "ok" and cb.get_state() is CircuitState.CLOSED


# -- one policy with its concurrency limit --------------------------------------------------
def make_policy(limit: int, clock: FakeClock) -> ResiliencePolicy:
    return ResiliencePolicy(
        retry=RetryStrategy(
            max_retries=2, initial_delay=0.0, max_delay=0.0, clock=clock, retry_budget=None
        ),
        breaker=CircuitBreaker(failure_threshold=10**9, clock=clock, name="hammer"),
        limit=ConcurrencyLimit(limit, max_waiting=10_000, name="hammer"),
        clock=clock,
        name="hammer",
    )


@pytest.mark.timeout(60)
def test_policy_threads_in_flight_within_limit_and_counts_exact() -> None:
    clock = FakeClock()
    policy = make_policy(4, clock)
    gauge = Gauge()
    per_thread = 10
    attempts_by_call: dict[tuple[int, int], int] = {}
    lock = threading.Lock()

    def fn(i: int, j: int) -> str:
        with gauge:
            with lock:
                n = attempts_by_call[(i, j)] = attempts_by_call.get((i, j), 0) + 1
            time.sleep(0.0005)
            if (i + j) % 4 == 0 and n == 1:
                raise ConnectionError("first attempt fails")
            return f"{i}:{j}"

    results: list[str] = []

    def work(i: int) -> None:
        for j in range(per_thread):
            value = policy.call(fn, i, j)
            with lock:
                results.append(value)

    run_threads(THREADS, work)
    total = THREADS * per_thread
    assert sorted(results) == sorted(f"{i}:{j}" for i in range(THREADS) for j in range(per_thread))
    assert 1 <= gauge.peak <= 4
    retried = sum(1 for i in range(THREADS) for j in range(per_thread) if (i + j) % 4 == 0)
    assert gauge.total == total + retried
    stats = policy.stats()
    assert stats["calls"] == stats["successes"] == total
    assert stats["retries"] == retried and stats["attempts"] == total + retried
    assert policy.limit is not None and policy.limit.in_flight == 0


@pytest.mark.timeout(60)
async def test_policy_tasks_in_flight_within_limit_and_counts_exact() -> None:
    clock = FakeClock()
    policy = make_policy(8, clock)
    gauge = Gauge()
    tries: dict[int, int] = {}

    async def fn(i: int) -> int:
        with gauge:
            tries[i] = tries.get(i, 0) + 1
            await asyncio.sleep(0)
            if i % 5 == 0 and tries[i] == 1:
                raise ConnectionError("first attempt fails")
            return i

    results = await asyncio.gather(*(policy.acall(fn, i) for i in range(TASKS)))
    assert results == list(range(TASKS))
    assert gauge.peak == 8
    assert gauge.total == TASKS + TASKS // 5
    stats = policy.stats()
    assert stats["calls"] == stats["successes"] == TASKS
    assert stats["retries"] == TASKS // 5
    assert policy.limit is not None and policy.limit.in_flight == 0


@pytest.mark.timeout(60)
async def test_policy_threads_and_tasks_share_one_limit() -> None:
    clock = FakeClock()
    policy = make_policy(3, clock)
    gauge = Gauge()

    def sync_fn() -> str:
        with gauge:
            time.sleep(0.001)
            return "t"

    async def async_fn() -> str:
        with gauge:
            await asyncio.sleep(0.001)
            return "a"

    loop = asyncio.get_running_loop()
    thread_calls = [loop.run_in_executor(None, policy.call, sync_fn) for _ in range(40)]
    task_calls = [policy.acall(async_fn) for _ in range(100)]
    results = await asyncio.gather(*thread_calls, *task_calls)
    assert results.count("t") == 40 and results.count("a") == 100
    assert 2 <= gauge.peak <= 3
    assert policy.stats()["calls"] == 140
