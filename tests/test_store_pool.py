"""A crowd on a healthy Redis with a small pool: load, never an outage (issue 17, item 3).

Each test runs its own redis-server (tests/_redis_server.py). What is asserted is what the
calls did (lease requests in flight at once, op timeouts a call paid), not milliseconds.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

import pytest

import test_store_faults as _faults
from _crowd import Crowd
from _redis_server import RedisServer
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.stores.redis import RedisStore

pytestmark = pytest.mark.enable_socket

LEASE = "p:lease:{rag_resilience:llm:limit}"
redis_server, raw, _until = _faults.redis_server, _faults.raw, _faults._until

_CALL: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("call", default=None)


class _AskCountingStore(RedisStore):
    """Counts lease requests in flight at once, and the op timeouts each call paid."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asking = self.peak_asking = 0
        self._count_lock = threading.Lock()

    def _asks(self, delta: int) -> None:
        with self._count_lock:
            self.asking += delta
            self.peak_asking = max(self.peak_asking, self.asking)

    def lease_wait(self, *args: Any) -> bool:
        self._asks(1)
        try:
            return super().lease_wait(*args)
        finally:
            self._asks(-1)

    def lease_acquire(self, *args: Any) -> bool:
        self._asks(1)
        try:
            return super().lease_acquire(*args)
        finally:
            self._asks(-1)

    async def alease_wait(self, *args: Any) -> bool:
        self._asks(1)
        try:
            return await super().alease_wait(*args)
        finally:
            self._asks(-1)

    async def alease_acquire(self, *args: Any) -> bool:
        self._asks(1)
        try:
            return await super().alease_acquire(*args)
        finally:
            self._asks(-1)

    def _fault(self, exc: BaseException) -> bool:
        call = _CALL.get()
        if call is not None and isinstance(
            exc, (self._redis.exceptions.TimeoutError, TimeoutError)
        ):
            call[0] += 1
        return super()._fault(exc)


def _new_call() -> list[int]:
    call = [0]
    _CALL.set(call)
    return call


async def test_a_crowd_of_waiters_sends_a_bounded_number_of_requests(
    redis_server: RedisServer, raw: Any
) -> None:
    """150 tasks and 4 threads share a limit of 4 through a pool of 4 connections. Before,
    every waiter polled Redis: ~150 lease requests at once ran the pool dry and starved
    the event loop, so requests to a healthy Redis timed out (a call paid up to 8 op
    timeouts in benchmarks/faults.py). Now at most max(limit, 16) waiters of a process ask
    at once; the others queue in the process, in arrival order."""
    store = _AskCountingStore(redis_server.url, prefix="p", max_connections=4)
    limit = ConcurrencyLimit(4, max_waiting=1000, wait_timeout=30.0, name="llm", store=store)

    async def acall() -> None:
        async with limit.aslot():
            await asyncio.sleep(0.001)

    def call() -> None:
        with limit.slot():
            time.sleep(0.001)

    crowd = Crowd(call, acall, threads=4, tasks=150, start_call=_new_call)
    crowd.start()
    await _until(lambda: crowd.done > 400, "calls flowing")
    await crowd.finish()
    seen = f"counters {store.counters}, {len(crowd.calls)} calls, peak asks {store.peak_asking}"
    assert crowd.errors == [], f"{crowd.errors[:3]!r}; {seen}"
    assert store.peak_asking <= 16, seen
    worst = max(c[0] for c in crowd.calls)
    assert worst <= 1, f"a call paid {worst} op timeouts; {seen}"
    assert store.counters["outages"] == 0 and not store.degraded, seen
    assert limit.in_flight == 0
    # the releases a busy pool deferred are sent without any later call to trigger them
    await _until(lambda: raw.zcard(LEASE) == 0, "no lease held in Redis")
    await _until(lambda: raw.zcard(f"{LEASE}:q") == 0, "no waiter queued in Redis")
    await store.aclose()


async def test_a_release_the_busy_pool_deferred_is_sent_without_a_later_call(
    redis_server: RedisServer, raw: Any
) -> None:
    """The only pooled connection is taken when a permit is released: the release is
    deferred (busy, not an outage). Before, it was sent only by the next successful
    operation, so the last releases of a burst held their permits for lease_s (60 s)."""
    store = RedisStore(redis_server.url, prefix="p", max_connections=1)
    assert store.lease_acquire("rag_resilience:llm:limit", "t1", 4, 60.0, time.time())
    pool = store._client.connection_pool
    taken = pool.get_connection()  # the pool is empty now
    try:
        store.lease_release("rag_resilience:llm:limit", "t1")
        assert store.counters["busy"] >= 1 and not store.degraded
        assert raw.zcard(LEASE) == 1  # not sent yet
    finally:
        pool.release(taken)
    await _until(lambda: raw.zcard(LEASE) == 0, "the deferred release sent")
    assert store.counters["outages"] == 0
    store.close()


async def test_a_caller_that_may_not_wait_still_asks_when_the_askers_are_busy(
    redis_server: RedisServer,
) -> None:
    """With `max_waiting=0` the one ask is a caller's only chance: it is sent even while
    the process's askers are all busy (else a free permit would be refused)."""
    store = RedisStore(redis_server.url, prefix="p")
    limit = ConcurrencyLimit(2, name="llm", store=store)  # max_waiting=0
    for _ in range(limit._asks.capacity):  # every asker's turn is taken
        assert limit._asks.try_enter()
    limit.acquire()
    await limit.aacquire()
    assert limit.in_flight == 2
    limit.release()
    await limit.arelease()
    await store.aclose()
