"""What a Redis stall costs one call, and permits handed between replicas (issue 17).

Each test runs its own redis-server (tests/_redis_server.py) so it can `DEBUG SLEEP` it.
Nothing here asserts milliseconds: a stall is measured by what a call *did* (Redis
operations that timed out, operations sent while the store was marked degraded), which a
loaded machine cannot change.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import test_store_faults as _faults
from _crowd import Crowd
from _redis_server import RedisServer
from rag_resilience.breaker import CircuitBreaker
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.stores.redis import RedisStore

pytestmark = pytest.mark.enable_socket

LEASE = "p:lease:{rag_resilience:llm:limit}"

# per call: [op timeouts paid to the stall, Redis ops attempted while the store was degraded]
# the private redis-server fixtures and the bounded wait of test_store_faults
redis_server, raw, _until = _faults.redis_server, _faults.raw, _faults._until

_CALL: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("call", default=None)
_OP_STARTED: contextvars.ContextVar[float] = contextvars.ContextVar("op", default=0.0)


class _CountingStore(RedisStore):
    """Counts, per user call, the Redis operations begun after `stalled_at` that timed
    out, and the ones attempted (sent) while the store was already marked degraded."""

    stalled_at = float("inf")
    stall_ended = float("inf")

    def _run(self, remote: Callable[[Any], Any], local: Any, *args: Any) -> Any:
        _OP_STARTED.set(time.monotonic())
        return super()._run(self._watch(remote), local, *args)

    async def _arun(self, remote: Any, sync_remote: Any, local: Any, *args: Any) -> Any:
        _OP_STARTED.set(time.monotonic())
        degraded = self.degraded

        async def watched(c: Any) -> Any:
            self._attempt(degraded)
            return await remote(c)

        return await super()._arun(watched, self._watch(sync_remote), local, *args)

    def _watch(self, remote: Callable[[Any], Any]) -> Callable[[Any], Any]:
        degraded = self.degraded

        def watched(c: Any) -> Any:
            self._attempt(degraded)
            return remote(c)

        return watched

    def _attempt(self, degraded: bool) -> None:
        call = _CALL.get()
        if call is not None and degraded:
            call[1] += 1

    def _fault(self, exc: BaseException) -> bool:
        call = _CALL.get()
        timeout = (self._redis.exceptions.TimeoutError, asyncio.TimeoutError)
        started = _OP_STARTED.get()
        if call is not None and isinstance(exc, timeout) and self.stalled_at <= started:
            call[0] += started < self.stall_ended
        return super()._fault(exc)


def _until_asleep(server: RedisServer) -> float:
    """Wait until Redis leaves a PING unanswered for 50 ms (DEBUG SLEEP has begun);
    return when it last answered one (monotonic): it fell asleep after that."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(0.05)
        awake = time.monotonic()
        while True:
            sock.sendall(b"PING\r\n")
            try:
                sock.recv(64)
            except TimeoutError:
                return awake
            awake = time.monotonic()
            time.sleep(0.001)


async def test_a_stall_costs_a_call_at_most_one_op_timeout(
    redis_server: RedisServer, raw: Any
) -> None:
    """Threads and tasks call through a shared breaker and a shared limit while Redis
    stalls for 1.5 s (retry_interval 0.2 s). Each call pays at most one op timeout, and
    once the store is marked degraded no call sends Redis anything: the store's probe is
    a background PING. Before, every retry_interval a user call probed the stalled Redis
    and paid another op timeout (and the benchmark's worst added latency was 27-170 ms)."""
    store = _CountingStore(redis_server.url, prefix="p", op_timeout=0.05, retry_interval=0.2)
    limit = ConcurrencyLimit(6, max_waiting=200, wait_timeout=30.0, name="llm", store=store)
    breaker = CircuitBreaker(5, 30.0, name="chat", store=store)
    policy = ResiliencePolicy(breaker=breaker, limit=limit, name="stall")

    async def upstream() -> str:
        await asyncio.sleep(0.001)
        return "ok"

    def sync_upstream() -> str:
        time.sleep(0.001)
        return "ok"

    def new_call() -> list[int]:
        call = [0, 0]
        _CALL.set(call)
        return call

    crowd = Crowd(
        lambda: policy.call(sync_upstream),
        lambda: policy.acall(upstream),
        threads=3,
        tasks=12,
        start_call=new_call,
    )
    crowd.start()
    calls, errors = crowd.calls, crowd.errors
    await _until(lambda: len(calls) > 50, "calls flowing")
    # Only the stall's timeouts count (ops begun while Redis was asleep): on a loaded box
    # a call may also pay one to load just before it or in the reconnect rush after it
    # (a slow reply, checked and found alive), which is not what this measures.
    stall = redis_server.stall(1.5)
    store.stalled_at = await asyncio.to_thread(_until_asleep, redis_server)
    assert (await asyncio.to_thread(stall.recv, 64)).startswith(b"+OK")
    store.stall_ended = time.monotonic()
    stall.close()
    await _until(lambda: not store.degraded, "recovered")
    before = len(calls)
    await _until(lambda: len(calls) > before + 50, "calls flowing again")
    await crowd.finish()
    # every message carries the store's counters: a failure under load explains itself
    seen = f"counters {dict(store.counters)}, {len(calls)} calls"
    assert errors == [], f"{errors[:3]!r}; {seen}"
    assert store.counters["outages"] >= 1, f"the stall was never seen; {seen}"
    paid = sorted((c[0] for c in calls), reverse=True)[:5]
    assert paid[0] <= 1, f"a call paid more than one op timeout: worst {paid}; {seen}"
    sent = sum(c[1] for c in calls)
    assert sent == 0, f"{sent} ops sent to Redis while degraded; {seen}"
    assert store.counters.get("probes", 0) >= 1, f"no background probe; {seen}"
    assert limit.in_flight == 0
    await _until(lambda: raw.zcard(LEASE) == 0, "no lease held in Redis")
    await store.aclose()


async def test_try_acquire_that_timed_out_holds_no_lease(
    redis_server: RedisServer, raw: Any
) -> None:
    """`try_acquire` from threads and tasks while Redis is asleep: each lease script sits
    in Redis's socket buffer and runs after the callers gave up (False). Before, those late
    grants held permits for lease_s (60 s); now each token is released with a tombstone
    once Redis answers, so nothing stays held and the limit is free again."""
    store = RedisStore(redis_server.url, prefix="p", op_timeout=0.05, retry_interval=0.05)
    limit = ConcurrencyLimit(8, name="llm", store=store)
    assert limit.try_acquire()  # connect and load the scripts while Redis answers
    limit.release()
    stall = redis_server.stall(0.5)
    await asyncio.sleep(0.05)  # Redis is asleep (on a loaded box perhaps not yet)

    async def task_try() -> bool:
        return await asyncio.to_thread(limit.try_acquire)

    got = await asyncio.gather(*(task_try() for _ in range(3)))
    got += [limit.try_acquire() for _ in range(2)]
    for ok in got:  # granted before the stall began (a loaded box): a normal permit
        if ok:
            limit.release()
    assert (await asyncio.to_thread(stall.recv, 64)).startswith(b"+OK")
    stall.close()
    # any operation starts the background probe; its PING ends the outage
    await _until(lambda: store.get("x") is None and not store.degraded, "recovered")
    await _until(lambda: raw.zcard(LEASE) == 0, "late grants released")
    assert limit.in_flight == 0
    for _ in range(8):
        assert limit.try_acquire()  # every permit is free again
    assert not limit.try_acquire()
    for _ in range(8):
        limit.release()
    await store.aclose()


async def test_release_hands_the_permit_to_the_oldest_waiter_of_any_replica(
    redis_server: RedisServer, raw: Any
) -> None:
    """Limit 1 on two replicas (two stores): waiters queue alternately on each. Every
    release hands the permit straight to the oldest waiter, whichever replica it is on,
    and the grant is the handed lease itself (no second ask): order = arrival order."""
    a_store = RedisStore(redis_server.url, prefix="p")
    b_store = RedisStore(redis_server.url, prefix="p")
    a = ConcurrencyLimit(1, max_waiting=10, wait_timeout=30.0, name="llm", store=a_store)
    b = ConcurrencyLimit(1, max_waiting=10, wait_timeout=30.0, name="llm", store=b_store)
    order: list[int] = []
    a.acquire()  # the holder

    def thread_waiter(i: int) -> None:
        b.acquire()
        order.append(i)
        assert raw.zcard(LEASE) == 1
        b.release()

    async def task_waiter(i: int) -> None:
        await a.aacquire()
        order.append(i)
        await a.arelease()

    threads: list[threading.Thread] = []
    tasks: list[asyncio.Task[None]] = []
    for i in range(8):
        if i % 2:
            threads.append(threading.Thread(target=thread_waiter, args=(i,)))
            threads[-1].start()
        else:
            tasks.append(asyncio.create_task(task_waiter(i)))
        await _until(lambda n=i + 1: raw.zcard(f"{LEASE}:q") == n, f"waiter {i} queued")
    a.release()
    await asyncio.gather(*tasks)
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    assert order == list(range(8))
    assert raw.zcard(LEASE) == 0 and raw.zcard(f"{LEASE}:q") == 0
    assert a.stats()["acquired"] + b.stats()["acquired"] == 9
    await a_store.aclose()
    await b_store.aclose()


async def test_two_replicas_crowd_never_exceed_the_limit(
    redis_server: RedisServer, raw: Any
) -> None:
    """Threads and tasks on two replicas hammer a limit of 3 with hand-offs on every
    release: the number inside never exceeds 3, every call gets through, nothing leaks."""
    stores = [RedisStore(redis_server.url, prefix="p", op_timeout=1.0) for _ in range(2)]
    limits = [
        ConcurrencyLimit(3, max_waiting=100, wait_timeout=60.0, name="llm", store=s) for s in stores
    ]
    lock = threading.Lock()
    state = {"in": 0, "peak": 0, "done": 0}

    def inside(delta: int) -> None:
        with lock:
            state["in"] += delta
            state["peak"] = max(state["peak"], state["in"])
            state["done"] += delta < 0

    def thread_worker(limit: ConcurrencyLimit) -> None:
        for _ in range(15):
            with limit.slot():
                inside(1)
                time.sleep(0.001)
                inside(-1)

    async def task_worker(limit: ConcurrencyLimit) -> None:
        for _ in range(5):
            async with limit.aslot():
                inside(1)
                await asyncio.sleep(0.001)
                inside(-1)

    threads = [threading.Thread(target=thread_worker, args=(limits[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    await asyncio.gather(*(task_worker(limits[i % 2]) for i in range(16)))
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    assert state["done"] == 4 * 15 + 16 * 5
    assert state["peak"] <= 3
    assert raw.zcard(LEASE) == 0 and raw.zcard(f"{LEASE}:q") == 0
    assert all(s.counters["outages"] == 0 for s in stores)
    for s in stores:
        await s.aclose()
