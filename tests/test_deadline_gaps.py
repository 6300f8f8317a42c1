"""The call's deadline where it was not honoured yet (issue 18, part 1): the wait for a
concurrency permit, and `RetryStrategy` / `with_retry` used on their own inside a deadline
scope. Fake clock: only the local permit wait parks on real time (for what the fake
deadline leaves, 0.05 s here); the outcome never depends on how long it took."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from rag_resilience import deadline
from rag_resilience.errors import DeadlineExceededError, WaitTimeoutError, is_handled
from rag_resilience.fallback import GracefulFallbacks
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.policy import ResiliencePolicy, Served
from rag_resilience.retry import RetryStrategy, with_retry
from rag_resilience.stores import MemoryStore
from rag_resilience.testing import FakeClock, fake_clock


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as clk:
        yield clk


class SharedMemoryStore(MemoryStore):
    """A MemoryStore that claims to be shared: stands in for SQLite/Redis (leases)."""

    shared = True


# -- 1. the wait for a permit is cut at the call's deadline ---------------------------------
def test_a_caller_queued_past_its_deadline_is_served_degraded_for_threads_and_tasks(
    clock: FakeClock,
) -> None:
    """One call holds the only permit; six callers (threads and tasks) queue behind it
    with no wait timeout of their own. Their 0.05 s deadline ends the wait: each is
    served the generic answer as a rejection, and the holder is never disturbed. Before,
    they waited for the permit however long the holder took (the deadline counted the
    wait, but did not cut it)."""
    limit = ConcurrencyLimit(1, max_waiting=10, wait_timeout=None, name="dl-queue")
    policy = ResiliencePolicy(
        RetryStrategy(max_retries=0, retry_budget=None),
        fallbacks=GracefulFallbacks(),
        limit=limit,
        name="dl-queue",
        generic_fallback="busy, try again",
        deadline=0.05,
    )
    holding, release = threading.Event(), threading.Event()

    def hold() -> str:
        holding.set()
        release.wait(60.0)  # a safety net only: the test releases it
        return "held"

    holder_served: list[Served[str]] = []
    holder = threading.Thread(target=lambda: holder_served.append(policy.execute(hold)))
    holder.start()
    assert holding.wait(60.0)

    def never() -> str:
        raise AssertionError("a queued caller must not get the permit")

    async def anever() -> str:
        return never()

    served: list[Served[str]] = []
    lock = threading.Lock()

    def queued() -> None:
        result = policy.execute(never)
        with lock:
            served.append(result)

    async def tasks() -> None:
        results = await asyncio.gather(*(policy.aexecute(anever) for _ in range(3)))
        with lock:
            served.extend(results)

    threads = [threading.Thread(target=queued) for _ in range(3)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    release.set()
    holder.join()

    assert len(served) == 6
    for result in served:
        assert (result.value, result.source, result.degraded) == (
            "busy, try again",
            "rejected",
            True,
        )
        assert result.attempts == 0
        assert isinstance(result.error, WaitTimeoutError)
        assert "all the call's deadline left" in str(result.error)
    assert [s.source for s in holder_served] == ["live"]
    stats = limit.stats()
    assert (stats["timed_out"], stats["acquired"], stats["in_flight"], stats["waiting"]) == (
        6,
        1,
        0,
        0,
    )


def test_an_enclosing_scope_cuts_a_direct_permit_wait(clock: FakeClock) -> None:
    """`ConcurrencyLimit` used directly inside a deadline scope: the distributed waiter
    (polling on the fake clock) gives up when the scope's 0.5 s are spent, not at its
    own 10 s wait timeout; with no scope the wait timeout still applies."""
    store = SharedMemoryStore()
    key = "rag_resilience:dl-direct:limit"
    store.lease_acquire(key, "another-process", 1, 600.0, clock.time())
    limit = ConcurrencyLimit(
        1, max_waiting=2, wait_timeout=10.0, name="dl-direct", store=store, clock=clock
    )
    with deadline.scope(0.5, clock), pytest.raises(WaitTimeoutError) as info:
        limit.acquire()
    assert clock.total_slept == pytest.approx(0.5)
    assert "all the call's deadline left" in str(info.value)
    with pytest.raises(WaitTimeoutError) as info:
        limit.acquire()
    assert clock.total_slept == pytest.approx(10.5)
    assert "deadline" not in str(info.value)
    assert (limit.stats()["timed_out"], limit.in_flight, limit.waiting) == (2, 0, 0)


def test_the_uncontended_permit_ignores_an_expired_scope(clock: FakeClock) -> None:
    """A free permit is taken without reading the deadline: only a wait is cut."""
    limit = ConcurrencyLimit(1, max_waiting=1, name="dl-free")
    with deadline.scope(1.0, clock):
        clock.advance(5.0)
        limit.acquire()
    assert limit.in_flight == 1
    limit.release()


# -- 2. RetryStrategy / with_retry on their own honour an enclosing deadline --------------
def flaky_counter() -> tuple[list[int], Any]:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        raise ConnectionError("upstream reset")

    return calls, flaky


def test_retry_strategy_stops_at_an_enclosing_deadline(clock: FakeClock) -> None:
    """Backoff 1, 2, 4... s: inside a 4 s scope the strategy sleeps 1 + 2 s and stops
    (the next 4 s wait would pass it), where alone it would sleep 1 + 2 + 4 + 8 s."""
    strategy = RetryStrategy(max_retries=10, initial_delay=1.0, jitter=False, retry_budget=None)
    calls, flaky = flaky_counter()
    with deadline.scope(4.0, clock), pytest.raises(ConnectionError) as info:
        strategy.execute(flaky)
    assert clock.sleeps == [1.0, 2.0]
    assert len(calls) == 3
    assert is_handled(info.value)
    assert any("deadline" in note for note in info.value.__notes__)


def test_with_retry_honours_the_scope_for_threads_and_tasks() -> None:
    """Sync and async functions decorated with `with_retry`, called at once from three
    threads and three tasks, each inside its own 4 s scope: every caller sleeps 1 + 2 s
    and stops after three attempts. Each caller has its own fake clock, so the others'
    sleeps do not move its time: the scope is per thread and per task."""
    calls: list[str] = []
    lock = threading.Lock()
    settings: dict[str, Any] = {"max_retries": 10, "initial_delay": 1.0, "jitter": False}

    def decorated(clk: FakeClock) -> tuple[Any, Any]:
        @with_retry(retry_budget=None, clock=clk, **settings)
        def fetch(who: str) -> str:
            with lock:
                calls.append(who)
            raise ConnectionError("upstream reset")

        @with_retry(retry_budget=None, clock=clk, **settings)
        async def afetch(who: str) -> str:
            with lock:
                calls.append(who)
            raise ConnectionError("upstream reset")

        return fetch, afetch

    clocks = {f"t{i}": FakeClock() for i in range(3)} | {f"a{i}": FakeClock() for i in range(3)}
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def thread(who: str) -> None:
        fetch, _ = decorated(clocks[who])
        start.wait()
        with deadline.scope(4.0, clocks[who]):
            try:
                fetch(who)
            except ConnectionError as exc:
                with lock:
                    errors.append(exc)

    async def task(who: str) -> None:
        _, afetch = decorated(clocks[who])
        with deadline.scope(4.0, clocks[who]):
            try:
                await afetch(who)
            except ConnectionError as exc:
                errors.append(exc)

    async def tasks() -> None:
        await asyncio.gather(*(task(f"a{i}") for i in range(3)))

    threads = [threading.Thread(target=thread, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    assert len(errors) == 6
    assert all(is_handled(e) for e in errors)
    assert {who: calls.count(who) for who in clocks} == dict.fromkeys(clocks, 3)
    assert {who: clk.sleeps for who, clk in clocks.items()} == {w: [1.0, 2.0] for w in clocks}


def test_async_retry_attempt_is_cut_at_the_enclosing_deadline(clock: FakeClock) -> None:
    """An async attempt gets min(attempt_timeout, what the scope leaves) as its timeout:
    a hanging attempt inside a scope whose 0.05 s are left is cancelled then, not after
    the strategy's 1 s attempt timeout."""
    strategy = RetryStrategy(max_retries=0, attempt_timeout=1.0, retry_budget=None)
    started: list[int] = []

    async def hang() -> str:
        started.append(1)
        await asyncio.Event().wait()  # never set
        return "never"

    async def scenario() -> None:
        with deadline.scope(0.05, clock), pytest.raises(DeadlineExceededError) as info:
            await strategy.aexecute(hang)
        assert info.value.timeout == pytest.approx(0.05)

    asyncio.run(scenario())
    assert started == [1]


def test_retry_strategy_makes_no_attempt_when_the_scope_is_spent(clock: FakeClock) -> None:
    strategy = RetryStrategy(max_retries=3, retry_budget=None)
    calls, flaky = flaky_counter()
    with deadline.scope(1.0, clock):
        clock.advance(2.0)
        with pytest.raises(DeadlineExceededError) as info:
            strategy.execute(flaky)

        async def scenario() -> None:
            with pytest.raises(DeadlineExceededError):
                await strategy.aexecute(flaky)  # type: ignore[arg-type]

        asyncio.run(scenario())
    assert calls == []
    assert info.value.scope == "total" and is_handled(info.value)


def test_retry_strategy_without_scope_keeps_its_own_schedule(clock: FakeClock) -> None:
    strategy = RetryStrategy(max_retries=3, initial_delay=1.0, jitter=False, retry_budget=None)
    calls, flaky = flaky_counter()
    with pytest.raises(ConnectionError):
        strategy.execute(flaky)
    assert clock.sleeps == [1.0, 2.0, 4.0]
    assert len(calls) == 4
