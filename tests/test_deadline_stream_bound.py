"""One place computes "time left for this call" (issue 18, part 1): `deadline.remaining()`.

The policy used to recompute it three ways (its own deadline for the first pacing, the retry
run's for later ones, a sum from the call's start for the probe wait); a stream's run starts
after its permit, so its figures were not a plain call's. Now a plain call and a stream,
sync and async, from threads and tasks at once, get the same bound under a nested deadline:
the enclosing 2 s, not the policy's 30 s.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from rag_resilience import ResiliencePolicy, RetryStrategy, deadline
from rag_resilience.errors import RateLimitedError
from rag_resilience.ratelimit import RateLimiter
from rag_resilience.testing import fake_clock

OUTER = 2.0  # the enclosing deadline; the policy's own is 30 s


class Down(ConnectionError):
    """An upstream fault: retried, after `initial_delay` (no jitter)."""


def make_policy(clock: Any) -> ResiliencePolicy:
    return ResiliencePolicy(
        name="bound",
        retry=RetryStrategy(max_retries=1, initial_delay=0.5, jitter=False, retry_budget=None),
        rate_limiter=RateLimiter(requests_per_second=0.1, clock=clock),  # slots 10 s apart
        deadline=30.0,
    )


def answer() -> str:
    return "live"


def fail() -> str:
    raise Down("503")


def chunks(fn: Callable[[], str]) -> Iterator[str]:
    yield fn()


async def afn(fn: Callable[[], str]) -> str:
    return fn()


async def achunks(fn: Callable[[], str]) -> AsyncIterator[str]:
    yield fn()


def sync_ways(policy: ResiliencePolicy, fn: Callable[[], str]) -> dict[str, Callable[[], Any]]:
    return {"call": lambda: policy.call(fn), "stream": lambda: list(policy.stream(chunks, fn))}


def async_ways(policy: ResiliencePolicy, fn: Callable[[], str]) -> dict[str, Callable[[], Any]]:
    async def astream() -> list[str]:
        return [c async for c in policy.astream(achunks, fn)]

    return {"acall": lambda: policy.acall(afn, fn), "astream": astream}


def crowd_max_waits(policy: ResiliencePolicy, fn: Callable[[], str]) -> dict[str, float | None]:
    """Each way of calling, under `deadline.scope(OUTER)`, from threads and tasks at once:
    the `max_wait` of the pacing rejection it got."""
    got: dict[str, float | None] = {}
    lock = threading.Lock()

    def thread(name: str, run: Callable[[], Any]) -> None:
        with deadline.scope(OUTER):
            try:
                run()
                seen = None
            except RateLimitedError as exc:
                seen = exc.max_wait
        with lock:
            got[name] = seen

    async def task(name: str, run: Callable[[], Any]) -> None:
        with deadline.scope(OUTER):
            try:
                await run()
                seen = None
            except RateLimitedError as exc:
                seen = exc.max_wait
        with lock:
            got[name] = seen

    async def tasks() -> None:
        await asyncio.gather(*(task(n, r) for n, r in async_ways(policy, fn).items()))

    threads = [threading.Thread(target=thread, args=kv) for kv in sync_ways(policy, fn).items()]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    return got


def test_first_pacing_is_bounded_by_the_enclosing_deadline_alike() -> None:
    with fake_clock() as clock:
        policy = make_policy(clock)
        assert policy.call(answer) == "live"  # takes the free slot; the next is 10 s away
        got = crowd_max_waits(policy, answer)
    assert got == {name: pytest.approx(OUTER) for name in ("call", "stream", "acall", "astream")}


def test_a_retry_is_paced_within_the_same_time_left() -> None:
    """The first attempt fails; its retry's turn (10 s away) is refused against what the
    enclosing deadline leaves after the 0.5 s backoff: 1.5 s for every way of calling."""
    with fake_clock() as clock:
        policy = make_policy(clock)
        got: dict[str, float | None] = {}
        for name, run in sync_ways(policy, fail).items():
            clock.advance(20.0)  # a fresh slot for the first attempt
            with deadline.scope(OUTER), pytest.raises(RateLimitedError) as info:
                run()
            got[name] = info.value.max_wait

        async def each() -> None:
            for name, run in async_ways(policy, fail).items():
                clock.advance(20.0)
                with deadline.scope(OUTER), pytest.raises(RateLimitedError) as info:
                    await run()
                got[name] = info.value.max_wait

        asyncio.run(each())
    assert got == {n: pytest.approx(OUTER - 0.5) for n in ("call", "stream", "acall", "astream")}


@pytest.mark.parametrize(("recovery", "waits"), [(1.5, True), (3.0, False)])
def test_the_wait_for_the_next_probe_is_bounded_alike(recovery: float, waits: bool) -> None:
    """Nothing to degrade to and the circuit open: each way of calling waits for the next
    probe only if it is due within what the enclosing deadline leaves (2 s), then goes live;
    otherwise it is refused at once. The same for a plain call and a stream."""
    from rag_resilience.breaker import CircuitBreaker
    from rag_resilience.errors import CircuitOpenError

    outcomes: dict[str, tuple[str, list[float]]] = {}
    with fake_clock() as clock:
        breaker = CircuitBreaker(
            name=f"probe-bound-{recovery}",
            failure_threshold=1,
            recovery_timeout=recovery,
            clock=clock,
        )
        policy = ResiliencePolicy(name="probe-bound", breaker=breaker, deadline=30.0)

        def trip() -> None:  # a fresh breaker state, opened by one failure now
            breaker.reset()
            with pytest.raises(Down):
                policy.call(fail)
            assert breaker.stats()["state"] == "open"
            clock.sleeps.clear()

        def record(name: str, outcome: str) -> None:
            outcomes[name] = (outcome, list(clock.sleeps))

        for name, run in sync_ways(policy, answer).items():
            trip()
            with deadline.scope(OUTER):
                try:
                    run()
                    record(name, "live")
                except CircuitOpenError:
                    record(name, "refused")

        async def each() -> None:
            for name, run in async_ways(policy, answer).items():
                trip()
                with deadline.scope(OUTER):
                    try:
                        await run()
                        record(name, "live")
                    except CircuitOpenError:
                        record(name, "refused")

        asyncio.run(each())
    expected = ("live", [pytest.approx(recovery)]) if waits else ("refused", [])
    assert outcomes == {n: expected for n in ("call", "stream", "acall", "astream")}
