"""Shared state under faults (issue 17): bad values, stalls, cancellations, bursts.

Every test runs its own redis-server on a free port (tests/_redis_server.py), so it may
write garbage, `DEBUG SLEEP`, flush or kill it without touching anyone else's Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time as _time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _crowd import Crowd
from _redis_server import RedisServer, own_redis
from rag_resilience import breaker as breaker_mod
from rag_resilience.breaker import CircuitBreaker
from rag_resilience.clock import SystemClock
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.stores.redis import RedisStore

pytestmark = pytest.mark.enable_socket

KEY = "p:kv:rag_resilience:chat:breaker"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from own_redis(tmp_path)


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "rag_resilience" and r.levelno >= logging.WARNING
    ]


def _boom() -> str:
    raise ConnectionError("upstream down")


async def _answer() -> str:
    return "answer"


# -- item 4: a bad value is absent, logged once, overwritten; never an error -----------


@pytest.mark.parametrize(
    "garbage",
    [b"\x80garbage{", b'{"s":"open","f":"x"}', b'"closed"', b'{"s":"sideways"}', b"[1,2"],
    ids=["not-utf8", "bad-field", "not-an-object", "unknown-state", "truncated"],
)
def test_bad_breaker_value_is_read_as_absent_and_overwritten(
    redis_server: RedisServer,
    raw: Any,
    garbage: bytes,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(breaker_mod, "_bad_record_logged", False, raising=False)
    caplog.set_level(logging.INFO, logger="rag_resilience")
    store = RedisStore(redis_server.url, prefix="p")
    breaker = CircuitBreaker(3, 30.0, name="chat", store=store)
    raw.set(KEY, garbage)
    for _ in range(5):  # a healthy upstream: every call goes through
        assert breaker.call(lambda: "answer") == "answer"
    assert asyncio.run(breaker.acall(_answer)) == "answer"
    assert breaker.get_state().value == "closed"
    assert not store.degraded and store.counters["faults"] == 0
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "unreadable" in warnings[0], warnings
    # the next write replaces the bad value with a valid record
    with pytest.raises(ConnectionError):
        breaker.call(_boom)
    assert json.loads(raw.get(KEY))["f"] == 1
    assert breaker.failure_count == 1
    store.close()


def test_wrong_type_key_is_replaced_not_an_outage(
    redis_server: RedisServer, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A list where the breaker's string should be: before, WRONGTYPE flipped the whole
    store to local state for retry_interval, over and over."""
    caplog.set_level(logging.INFO, logger="rag_resilience")
    store = RedisStore(redis_server.url, prefix="p", retry_interval=1.0)
    breaker = CircuitBreaker(3, 30.0, name="chat", store=store)
    raw.rpush(KEY, "x")
    raw.rpush("p:lease:{rag_resilience:llm:limit}", "x")
    raw.set("p:cache:{ns}:lru", "x")
    assert breaker.call(lambda: "answer") == "answer"
    with pytest.raises(ConnectionError):
        breaker.call(_boom)
    assert json.loads(raw.get(KEY))["f"] == 1
    assert store.lease_acquire("rag_resilience:llm:limit", "t", 1, 5.0, 1.0)
    assert raw.zcard("p:lease:{rag_resilience:llm:limit}") == 1
    store.cache_set("ns", "k", "v", stored_at=1.0, ttl=None, max_entries=5)
    assert store.cache_get("ns", "k", 2.0) == ("v", 1.0)
    assert not store.degraded
    counters = store.counters
    assert counters["faults"] == 0 and counters["outages"] == 0
    assert counters["bad_values"] >= 3 and counters["remote_ops"] >= 5
    store.close()


def test_unreadable_cache_entry_is_a_miss(redis_server: RedisServer, raw: Any) -> None:
    store = RedisStore(redis_server.url, prefix="p")
    store.cache_set("ns", "k", "v", stored_at=1.0, ttl=None, max_entries=5)
    raw.hset("p:cache:{ns}:e:k", mapping={"v": b"\x80{", "t": "1.0"})
    assert store.cache_get("ns", "k", 2.0) is None
    store.cache_set("ns", "k", "v2", stored_at=3.0, ttl=None, max_entries=5)
    assert store.cache_get("ns", "k", 4.0) == ("v2", 3.0)
    assert not store.degraded and store.counters["bad_values"] == 1
    store.close()


# -- item 2: a cancelled distributed acquire never leaks its lease ----------------------

LEASE = "p:lease:{rag_resilience:llm:limit}"


async def _until(condition: Any, what: str = "condition", limit_s: float = 30.0) -> None:
    """Wait (on real time, bounded generously for a loaded machine) until `condition()`
    holds: the server's state, never a timing, is what the test asserts."""
    deadline = _time.monotonic() + limit_s
    while not condition():
        if _time.monotonic() > deadline:
            raise AssertionError(f"{what} never held")
        await asyncio.sleep(0.005)


async def test_cancelled_aacquire_releases_the_lease_redis_granted(
    redis_server: RedisServer, raw: Any
) -> None:
    """The task is cancelled while Redis is stalled with its lease script in the socket
    buffer: Redis grants the lease after the task is gone. Before, that permit stayed
    held for lease_s (60 s): with a limit of 1 the next caller got WaitTimeoutError."""
    store = RedisStore(redis_server.url, prefix="p", op_timeout=5.0)
    limit = ConcurrencyLimit(1, max_waiting=4, name="llm", store=store)
    await limit.aacquire()  # connect and load the script while Redis answers
    await limit.arelease()
    stall = redis_server.stall(0.3)
    await asyncio.sleep(0.05)  # Redis is asleep (if not yet, the task is merely granted)
    task = asyncio.create_task(limit.aacquire())
    await asyncio.sleep(0.05)  # the task's script is sent; its reply will never be read
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:  # a loaded machine granted it before the stall began: then it holds a permit
        await limit.arelease()
    assert stall.recv(64).startswith(b"+OK")  # the stall is over
    stall.close()
    await _until(lambda: not getattr(limit, "_forgotten", ()), "release sent")
    await _until(lambda: raw.zcard(LEASE) == 0, "lease freed")
    assert limit.in_flight == 0
    await limit.aacquire(timeout=1.0)  # the next caller gets the permit
    await limit.arelease()
    await store.aclose()


async def test_cancellation_storm_leaks_no_permit(redis_server: RedisServer, raw: Any) -> None:
    """Tasks and threads share a limit of 3; a third of the tasks are cancelled at random
    points (waiting, mid-request, holding). Afterwards nothing is held anywhere."""
    import random
    import threading

    rng = random.Random(17)
    store = RedisStore(redis_server.url, prefix="p", op_timeout=5.0)
    limit = ConcurrencyLimit(3, max_waiting=500, wait_timeout=30.0, name="llm", store=store)
    thread_calls: list[int] = []

    def thread_worker() -> None:
        for _ in range(10):
            with limit.slot():
                thread_calls.append(1)

    async def task_worker() -> None:
        async with limit.aslot():
            await asyncio.sleep(0)

    threads = [threading.Thread(target=thread_worker) for _ in range(4)]
    for t in threads:
        t.start()
    tasks = [asyncio.create_task(task_worker()) for _ in range(150)]
    for _ in range(60):
        await asyncio.sleep(rng.random() * 0.002)
        rng.choice(tasks).cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    await _until(lambda: not getattr(limit, "_forgotten", ()), "releases sent")
    assert len(thread_calls) == 40
    assert limit.in_flight == 0
    # no asker's turn was lost to a cancelled task (parked or asking)
    assert (limit._asks.holders, limit._asks.waiting) == (0, 0)
    assert raw.zcard(LEASE) == 0
    assert limit.stats()["peak_in_flight"] <= 3
    await store.aclose()


# -- item 1: a stall costs its own length, not lease_s ----------------------------------


async def test_one_second_stall_leaves_no_permit_held(redis_server: RedisServer, raw: Any) -> None:
    """Threads and tasks call through a shared limit of 6 while Redis stalls for 1 s
    (DEBUG SLEEP). Before: 5-6 leases stayed held in Redis for ~60 s after the stall
    (releases made while degraded went to the local store only), and callers then waited
    their full wait_timeout. Now: no call fails, nothing stays held once callers finish."""

    store = RedisStore(redis_server.url, prefix="p", op_timeout=0.05, retry_interval=0.05)
    limit = ConcurrencyLimit(6, max_waiting=200, wait_timeout=10.0, name="llm", store=store)

    async def acall() -> None:
        async with limit.aslot():
            await asyncio.sleep(0.002)

    def call() -> None:
        with limit.slot():
            _time.sleep(0.002)

    crowd = Crowd(call, acall, threads=3, tasks=12)
    crowd.start()
    await _until(lambda: crowd.done > 50, "calls flowing")
    stall = redis_server.stall(1.0)
    assert (await asyncio.to_thread(stall.recv, 64)).startswith(b"+OK")
    stall.close()
    await _until(lambda: not store.degraded, "recovered")
    before = crowd.done
    await _until(lambda: crowd.done > before + 50, "calls flowing again")
    await crowd.finish()
    assert crowd.errors == []
    assert limit.in_flight == 0
    await _until(lambda: raw.zcard(LEASE) == 0, "no lease held in Redis")
    assert store.local.lease_count("rag_resilience:llm:limit", 0.0) == 0
    await store.aclose()


# -- item 3: a burst on a healthy Redis is load, not an outage --------------------------


async def test_burst_of_300_tasks_and_threads_keeps_both_bounds(
    redis_server: RedisServer, raw: Any
) -> None:
    """300 tasks and 20 threads at once on a healthy Redis. Before:
    the pool ran dry, the store switched to local state, a half-open breaker with
    half_open_max_calls=1 let 215 of 300 through and a shared limit of 10 peaked at 15-20."""
    import threading
    import time

    from rag_resilience.errors import CircuitOpenError

    # op_timeout 1 s, not 50 ms: this measures a burst on a healthy Redis, and with a CPU
    # hog on every core a 0.2 s op timeout (and the PING that checks it) still ran out
    # twice, so the store declared an outage (each process's local limit applies). The
    # bounds asserted below stay exact.
    store = RedisStore(redis_server.url, prefix="p", op_timeout=1.0)
    breaker = CircuitBreaker(3, 30.0, name="chat", store=store, half_open_max_calls=1)
    limit = ConcurrencyLimit(10, max_waiting=400, wait_timeout=30.0, name="llm", store=store)
    now = time.time()
    raw.set(KEY, json.dumps({"s": "open", "oa": now - 60, "ou": now - 1, "oc": 1}))
    lock = threading.Lock()
    upstream = {"in": 0, "peak": 0, "probes": 0}
    in_limit = {"in": 0, "peak": 0}
    probe_may_finish = threading.Event()

    def enter(counter: dict[str, int]) -> None:
        with lock:
            counter["in"] += 1
            counter["peak"] = max(counter["peak"], counter["in"])

    def leave(counter: dict[str, int]) -> None:
        with lock:
            counter["in"] -= 1

    def upstream_call() -> str:  # a probe to the recovering upstream: held until the end
        with lock:
            upstream["probes"] += 1
        probe_may_finish.wait(30.0)
        return "ok"

    async def probe_call() -> str:
        return await asyncio.to_thread(upstream_call)

    rejected: list[int] = []

    async def task_call() -> str:
        async with limit.aslot():
            enter(in_limit)
            await asyncio.sleep(0.001)
            leave(in_limit)
        try:
            return await breaker.acall(probe_call)
        except CircuitOpenError:
            rejected.append(1)
            return "rejected"

    def thread_call(out: list[str]) -> None:
        with limit.slot():
            enter(in_limit)
            time.sleep(0.001)
            leave(in_limit)
        try:
            out.append(breaker.call(upstream_call))
        except CircuitOpenError:
            rejected.append(1)
            out.append("rejected")

    thread_out: list[str] = []
    threads = [threading.Thread(target=thread_call, args=(thread_out,)) for _ in range(20)]
    for t in threads:
        t.start()
    tasks = [asyncio.create_task(task_call()) for _ in range(300)]
    # every caller has been rejected or is inside the upstream (the probe never ends
    # before the burst does, so the circuit stays half-open throughout)
    await _until(lambda: len(rejected) + upstream["probes"] >= 320, "burst done")
    probe_may_finish.set()
    results = await asyncio.gather(*tasks)
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    assert in_limit["peak"] <= 10, (store.counters, limit.stats())
    assert limit.stats()["peak_in_flight"] <= 10
    assert results.count("ok") + thread_out.count("ok") == 1  # the one probe
    assert upstream["probes"] == 1
    assert not store.degraded and store.counters["outages"] == 0, repr(store.last_error)
    assert raw.zcard(LEASE) == 0
    await store.aclose()


# -- item 6: one clock for shared deadlines ---------------------------------------------


class _SkewedClock(SystemClock):
    """A real clock on a host whose wall clock is `skew` seconds off."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:  # type: ignore[override]
        return _time.time() + self.skew


def test_host_clock_ahead_does_not_evict_other_hosts_leases(
    redis_server: RedisServer, raw: Any
) -> None:
    """Before: a host whose clock ran 120 s ahead saw every other host's lease as
    expired and took permits over the limit (8 in flight under a limit of 4)."""
    a = ConcurrencyLimit(4, name="llm", store=RedisStore(redis_server.url, prefix="p"))
    ahead = ConcurrencyLimit(
        4,
        name="llm",
        store=RedisStore(redis_server.url, prefix="p"),
        clock=_SkewedClock(120.0),
    )
    for _ in range(4):
        a.acquire()
    assert not ahead.try_acquire()
    assert raw.zcard(LEASE) == 4
    for _ in range(4):
        a.release()
    assert ahead.try_acquire()  # and its lease is on the same clock: not already expired
    assert a.stats()["global_in_flight"] == 1
    ahead.release()


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_clock_stepped_back_an_hour_does_not_keep_the_circuit_open(
    redis_server: RedisServer, tmp_path: Path, kind: str
) -> None:
    """Before: a replica whose wall clock was an hour behind read retry_after=3599 s for a
    circuit another replica opened for 30 s. Redis: both read the server's clock. SQLite
    (no shared clock): the open period is capped at recovery_timeout."""
    from rag_resilience.errors import CircuitOpenError
    from rag_resilience.stores.base import Store
    from rag_resilience.stores.sqlite import SQLiteStore

    def store() -> Store:
        if kind == "redis":
            return RedisStore(redis_server.url, prefix="p")
        return SQLiteStore(tmp_path / "s.db")

    now = CircuitBreaker(1, 30.0, name="chat", store=store())
    behind = CircuitBreaker(1, 30.0, name="chat", store=store(), clock=_SkewedClock(-3600.0))
    with pytest.raises(ConnectionError):
        now.call(_boom)
    assert now.get_state().value == "open"
    assert 0 < behind.retry_after() <= 30.0
    with pytest.raises(CircuitOpenError) as info:
        behind.call(lambda: "answer")
    assert 0 < info.value.retry_after <= 30.0


# -- item 7: distributed waiters are served first come, first served --------------------


async def test_distributed_waiters_are_served_in_arrival_order(
    redis_server: RedisServer, raw: Any
) -> None:
    """Threads on one replica and tasks on another wait for a limit of 1. Before, waiters
    polled with backoff and a late arrival polling at 5 ms overtook early ones polling at
    50 ms (p50 5.7 ms, max ~1 s). Now the store queues them: grants follow arrival."""
    import threading

    a = ConcurrencyLimit(
        1,
        max_waiting=10,
        wait_timeout=20.0,
        name="llm",
        store=RedisStore(redis_server.url, prefix="p"),
    )
    b = ConcurrencyLimit(
        1,
        max_waiting=10,
        wait_timeout=20.0,
        name="llm",
        store=RedisStore(redis_server.url, prefix="p"),
    )
    order: list[int] = []
    a.acquire()  # the holder

    def thread_waiter(i: int) -> None:
        a.acquire()
        order.append(i)
        a.release()

    async def task_waiter(i: int) -> None:
        await b.aacquire()
        order.append(i)
        await b.arelease()

    threads: list[threading.Thread] = []
    tasks: list[asyncio.Task[None]] = []
    for i in range(8):
        if i % 2:
            tasks.append(asyncio.create_task(task_waiter(i)))
        else:
            threads.append(threading.Thread(target=thread_waiter, args=(i,)))
            threads[-1].start()
        await _until(lambda n=i + 1: raw.zcard(f"{LEASE}:q") == n, f"waiter {i} queued")
    a.release()
    await asyncio.gather(*tasks)
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    assert order == list(range(8))
    assert raw.zcard(LEASE) == 0 and raw.zcard(f"{LEASE}:q") == 0


async def test_pool_exhaustion_is_load_not_an_outage(redis_server: RedisServer, raw: Any) -> None:
    """Two pooled connections for 80 tasks and 8 threads: operations wait their turn or are
    served as busy; the store never declares an outage and the shared limit holds."""
    import threading

    store = RedisStore(redis_server.url, prefix="p", max_connections=2)
    limit = ConcurrencyLimit(4, max_waiting=200, wait_timeout=30.0, name="llm", store=store)
    breaker = CircuitBreaker(3, 30.0, name="chat", store=store)
    lock = threading.Lock()
    state = {"in": 0, "peak": 0, "ok": 0}

    def inside(delta: int) -> None:
        with lock:
            state["in"] += delta
            state["peak"] = max(state["peak"], state["in"])
            state["ok"] += delta < 0

    async def task() -> None:
        async with limit.aslot():
            inside(1)
            await breaker.acall(_answer)
            inside(-1)

    def thread() -> None:
        for _ in range(3):
            with limit.slot():
                inside(1)
                breaker.call(lambda: "answer")
                inside(-1)

    threads = [threading.Thread(target=thread) for _ in range(8)]
    for t in threads:
        t.start()
    await asyncio.gather(*(task() for _ in range(80)))
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    assert state["ok"] == 80 + 24 and state["peak"] <= 4
    assert store.counters["outages"] == 0 and not store.degraded
    await _until(lambda: raw.zcard(LEASE) == 0, "no lease held")
    await store.aclose()
