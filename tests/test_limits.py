"""RequestQueue, QueueWorker and ConcurrencyLimit: the seed's queue demos, backpressure,
thread + asyncio sharing of one limit, cancellation safety, FIFO, and lease-based mode."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rag_resilience.errors import QueueFullError, WaitTimeoutError
from rag_resilience.events import Event, EventKind
from rag_resilience.limits import ConcurrencyLimit, QueueWorker, RequestQueue
from rag_resilience.stores import MemoryStore
from rag_resilience.testing import FakeClock

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Spin (1 ms naps) until `predicate` holds: only for thread handoffs, never backoff."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


async def await_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


class Probe:
    """Counts calls inside a slot under a lock; remembers the highest concurrency seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.max_seen = 0
        self.calls = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.max_seen = max(self.max_seen, self.now)

    def exit(self) -> None:
        with self.lock:
            self.now -= 1


class SharedMemoryStore(MemoryStore):
    """A MemoryStore that claims to be shared: stands in for SQLite/Redis in lease tests."""

    shared = True


class BrokenStore(SharedMemoryStore):
    def lease_acquire(self, key: str, token: str, limit: int, lease_s: float, now: float) -> bool:
        raise ConnectionError("store unreachable")

    def lease_release(self, key: str, token: str) -> None:
        raise AssertionError("no lease was taken, nothing to release")


def collect() -> tuple[list[Event], Callable[[Event], None]]:
    events: list[Event] = []
    return events, events.append


# ---------------------------------------------------------------------------------------
# RequestQueue: the seed's demos
# ---------------------------------------------------------------------------------------


def test_seed_demo_burst_of_15_into_capacity_10(capsys: pytest.CaptureFixture[str]) -> None:
    queue: RequestQueue[str] = RequestQueue(max_size=10)
    results = [queue.enqueue(f"query_{i}") for i in range(15)]
    assert results.count(True) == 10
    assert results.count(False) == 5
    assert results[:10] == [True] * 10  # the first ten get in, the rest bounce
    assert queue.size() == 10 == len(queue)
    assert queue.max_size == 10
    stats = queue.stats()
    assert stats["size"] == 10
    assert stats["max_size"] == 10
    assert stats["total_enqueued"] == 10
    assert stats["total_rejected"] == 5
    assert stats["total_dequeued"] == 0
    assert stats["rejection_rate"] == pytest.approx(5 / 15, abs=1e-4)
    assert stats["utilization"] == 1.0
    for key, value in stats.items():  # the seed prints it like this
        print(f"  {key}: {value}")
    assert "total_rejected: 5" in capsys.readouterr().out


def test_seed_demo_spike_of_100_into_50() -> None:
    spike_queue: RequestQueue[str] = RequestQueue(max_size=50)
    accepted = sum(spike_queue.enqueue(f"burst_req_{i}") for i in range(100))
    assert accepted == 50
    assert spike_queue.stats()["total_rejected"] == 50
    assert [spike_queue.dequeue() for _ in range(50)] == [f"burst_req_{i}" for i in range(50)]


def test_seed_production_rag_enqueue_then_dequeue_never_fills() -> None:
    queue: RequestQueue[str] = RequestQueue(max_size=100)
    for i in range(150):  # ProductionRAG: enqueue, then dequeue at once
        assert queue.enqueue(f"burst_query_{i}")
        assert queue.dequeue() == f"burst_query_{i}"
    assert queue.stats()["total_dequeued"] == 150
    assert queue.size() == 0


def test_dequeue_empty_returns_none_without_waiting() -> None:
    queue: RequestQueue[int] = RequestQueue(3)
    started = time.monotonic()
    assert queue.dequeue() is None
    assert time.monotonic() - started < 1.0  # generous: a loaded machine is slow, not blocked


def test_dequeue_timeout_waits_then_gives_none() -> None:
    queue: RequestQueue[int] = RequestQueue(3)
    started = time.monotonic()
    assert queue.dequeue(timeout=0.02) is None
    assert time.monotonic() - started >= 0.015


def test_dequeue_timeout_receives_item_from_another_thread() -> None:
    queue: RequestQueue[int] = RequestQueue(3)
    got: list[int | None] = []
    consumer = threading.Thread(target=lambda: got.append(queue.dequeue(timeout=5.0)))
    consumer.start()
    time.sleep(0.005)
    assert queue.enqueue(7)
    consumer.join(2.0)
    assert got == [7]


def test_close_wakes_blocked_dequeuers_and_refuses_new_items() -> None:
    queue: RequestQueue[int] = RequestQueue(3)
    got: list[int | None] = []
    consumers = [
        threading.Thread(target=lambda: got.append(queue.dequeue(timeout=30.0))) for _ in range(3)
    ]
    for consumer in consumers:
        consumer.start()
    time.sleep(0.005)
    started = time.monotonic()
    queue.close()
    for consumer in consumers:
        consumer.join(2.0)
    assert time.monotonic() - started < 1.0
    assert got == [None, None, None]
    assert queue.closed
    assert queue.enqueue(1) is False
    assert queue.stats()["total_rejected"] == 1


def test_closed_queue_still_hands_out_what_it_holds() -> None:
    queue: RequestQueue[int] = RequestQueue(3)
    queue.enqueue(1)
    queue.close()
    assert queue.dequeue(timeout=1.0) == 1
    assert queue.dequeue(timeout=1.0) is None


def test_empty_queue_is_truthy() -> None:
    queue: RequestQueue[int] = RequestQueue(3)
    assert len(queue) == 0
    assert (queue or None) is queue


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_max_size_must_be_positive_int(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"max_size must be an integer >= 1"):
        RequestQueue(max_size=bad)


@pytest.mark.timeout(30)
def test_queue_from_many_threads_loses_and_duplicates_nothing() -> None:
    queue: RequestQueue[tuple[int, int]] = RequestQueue(max_size=64)
    accepted: list[tuple[int, int]] = []
    taken: list[tuple[int, int]] = []
    lock = threading.Lock()
    producers_done = threading.Event()

    def produce(p: int) -> None:
        mine = [(p, i) for i in range(500) if queue.enqueue((p, i))]
        with lock:
            accepted.extend(mine)

    def consume() -> None:
        mine = []
        while True:
            item = queue.dequeue(timeout=0.005)
            if item is not None:
                mine.append(item)
            elif producers_done.is_set() and queue.size() == 0:
                break
        with lock:
            taken.extend(mine)

    producers = [threading.Thread(target=produce, args=(p,)) for p in range(8)]
    consumers = [threading.Thread(target=consume) for _ in range(4)]
    for thread in consumers + producers:
        thread.start()
    for thread in producers:
        thread.join()
    producers_done.set()
    for thread in consumers:
        thread.join()
    stats = queue.stats()
    assert stats["total_enqueued"] + stats["total_rejected"] == 8 * 500
    assert stats["total_enqueued"] == len(accepted) == stats["total_dequeued"]
    assert sorted(taken) == sorted(accepted)
    assert len(set(taken)) == len(taken)
    assert stats["peak_size"] <= 64


class QueueMachine(RuleBasedStateMachine):
    """The queue behaves like a bounded deque whatever the operation order."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 5
        self.queue: RequestQueue[int] = RequestQueue(self.capacity)
        self.model: deque[int] = deque()
        self.offered = 0
        self.rejected = 0
        self.taken = 0
        self.counter = 0

    @rule()
    def enqueue(self) -> None:
        self.counter += 1
        self.offered += 1
        ok = self.queue.enqueue(self.counter)
        assert ok == (len(self.model) < self.capacity)
        if ok:
            self.model.append(self.counter)
        else:
            self.rejected += 1

    @rule()
    def dequeue(self) -> None:
        expected = self.model.popleft() if self.model else None
        if expected is not None:
            self.taken += 1
        assert self.queue.dequeue() == expected

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def drain(self) -> None:
        assert self.queue.drain() == list(self.model)
        self.taken += len(self.model)
        self.model.clear()

    @invariant()
    def stats_match(self) -> None:
        stats = self.queue.stats()
        assert stats["size"] == len(self.model) == self.queue.size()
        assert stats["total_rejected"] == self.rejected
        assert stats["total_enqueued"] == self.offered - self.rejected
        assert stats["total_dequeued"] == self.taken
        assert 0.0 <= stats["utilization"] <= 1.0


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------------------------------
# QueueWorker
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_seed_demo_worker_processes_five_and_empties_queue() -> None:
    work_queue: RequestQueue[str] = RequestQueue(max_size=20)
    processed_items: list[str] = []

    def process_request(item: str) -> None:
        processed_items.append(f"Processed: {item}")

    worker = QueueWorker(work_queue, process_request)
    for i in range(5):
        work_queue.enqueue(f"task_{i}")
    assert work_queue.size() == 5
    worker.start()
    assert worker.wait_idle(timeout=5.0)
    assert len(processed_items) == 5
    assert processed_items == [f"Processed: task_{i}" for i in range(5)]  # FIFO
    assert work_queue.size() == 0
    assert worker.stop() == []
    assert not worker.is_running
    assert worker.stats()["processed"] == 5


@pytest.mark.timeout(60)
def test_worker_survives_exceptions_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    queue: RequestQueue[int] = RequestQueue(20)
    done: list[int] = []

    def fn(item: int) -> None:
        if item % 2:
            raise RuntimeError(f"bad item {item}")
        done.append(item)

    with (
        caplog.at_level(logging.ERROR, logger="rag_resilience"),
        QueueWorker(queue, fn, name="flaky") as worker,
    ):
        for i in range(10):
            queue.enqueue(i)
        assert worker.wait_idle(5.0)
        assert worker.is_running  # still alive after five failures
    assert done == [0, 2, 4, 6, 8]
    assert worker.processed == 5
    assert worker.failed == 5
    assert sum("bad item" in r.getMessage() or r.exc_info is not None for r in caplog.records) == 5


@pytest.mark.timeout(60)
def test_stop_drains_everything_queued_first() -> None:
    queue: RequestQueue[int] = RequestQueue(100)
    seen: list[int] = []
    for i in range(50):
        queue.enqueue(i)
    worker = QueueWorker(queue, seen.append)
    worker.start()
    left = worker.stop(drain=True, timeout=5.0)
    assert left == []
    assert seen == list(range(50))
    assert queue.size() == 0
    assert worker.processed == 50


@pytest.mark.timeout(60)
def test_stop_without_drain_returns_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    queue: RequestQueue[int] = RequestQueue(100)
    gate = threading.Event()
    seen: list[int] = []

    def fn(item: int) -> None:
        gate.wait(5.0)
        seen.append(item)

    worker = QueueWorker(queue, fn, name="slow")
    for i in range(5):
        queue.enqueue(i)
    worker.start()
    wait_until(lambda: worker.in_progress == [0])
    with caplog.at_level(logging.WARNING, logger="rag_resilience"):
        started = time.monotonic()
        left = worker.stop(drain=False, timeout=0.05)
        elapsed = time.monotonic() - started
    assert elapsed < 3.0  # bounded by the timeout even though fn is stuck (for 5 s)
    assert left == [1, 2, 3, 4]  # handed back, not dropped
    assert queue.size() == 0
    assert not worker.is_running
    assert worker.in_progress == [0]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "4 unprocessed item(s)" in messages
    assert "still inside fn" in messages
    gate.set()  # the stuck call finishes on its own; its item is not processed twice
    wait_until(lambda: worker.in_progress == [])
    assert seen == [0]
    assert worker.stats()["returned_unprocessed"] == 4


@pytest.mark.timeout(60)
def test_stop_with_drain_never_hangs_on_a_stuck_fn(caplog: pytest.LogCaptureFixture) -> None:
    queue: RequestQueue[int] = RequestQueue(10)
    gate = threading.Event()
    worker = QueueWorker(queue, lambda item: gate.wait(5.0))
    for i in range(3):
        queue.enqueue(i)
    worker.start()
    wait_until(lambda: worker.in_progress == [0])
    with caplog.at_level(logging.WARNING, logger="rag_resilience"):
        started = time.monotonic()
        left = worker.stop(drain=True, timeout=0.05)
        assert time.monotonic() - started < 3.0  # fn is stuck for 5 s
    assert left == [1, 2]
    assert any("still inside fn" in r.getMessage() for r in caplog.records)
    gate.set()
    wait_until(lambda: worker.processed == 1)


@pytest.mark.timeout(60)
def test_many_workers_process_each_item_exactly_once() -> None:
    queue: RequestQueue[int] = RequestQueue(500)
    seen: list[int] = []
    lock = threading.Lock()

    def fn(item: int) -> None:
        with lock:
            seen.append(item)

    worker = QueueWorker(queue, fn, num_workers=4, name="pool")
    worker.start()
    for i in range(400):
        assert queue.enqueue(i)
    assert worker.wait_idle(5.0)
    assert worker.stop() == []
    assert sorted(seen) == list(range(400))
    assert worker.processed == 400
    assert worker.stats()["num_workers"] == 4


@pytest.mark.timeout(60)
def test_worker_restarts_and_exits_when_queue_closes() -> None:
    queue: RequestQueue[int] = RequestQueue(10)
    seen: list[int] = []
    worker = QueueWorker(queue, seen.append)
    worker.start()
    worker.start()  # idempotent
    queue.enqueue(1)
    assert worker.wait_idle(5.0)
    assert worker.stop() == []
    queue.enqueue(2)
    assert worker.stop() == []  # not running: a no-op that leaves the queue alone
    assert queue.size() == 1
    worker.start()
    assert worker.wait_idle(5.0)
    queue.close()
    wait_until(lambda: not worker.is_running)
    assert seen == [1, 2]


def test_wait_idle_times_out_when_nobody_works() -> None:
    queue: RequestQueue[int] = RequestQueue(10)
    queue.enqueue(1)
    worker = QueueWorker(queue, lambda item: None)
    assert worker.wait_idle(0.01) is False


@pytest.mark.parametrize("bad", [0, -2, True])
def test_num_workers_must_be_positive(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"num_workers must be an integer >= 1"):
        QueueWorker(RequestQueue(1), lambda item: None, num_workers=bad)


# ---------------------------------------------------------------------------------------
# ConcurrencyLimit: configuration and basics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_concurrency": 0}, r"max_concurrency must be an integer >= 1"),
        ({"max_concurrency": -3}, r"max_concurrency must be an integer >= 1"),
        ({"max_concurrency": 2.5}, r"max_concurrency must be an integer >= 1"),
        ({"max_concurrency": 1, "max_waiting": -1}, r"max_waiting must be an integer >= 0"),
        ({"max_concurrency": 1, "wait_timeout": 0}, r"wait_timeout must be > 0"),
        ({"max_concurrency": 1, "wait_timeout": -1.0}, r"wait_timeout must be > 0"),
        ({"max_concurrency": 1, "wait_timeout": float("nan")}, r"wait_timeout must be > 0"),
        ({"max_concurrency": 1, "lease_s": 0}, r"lease_s must be > 0"),
    ],
)
def test_invalid_configuration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConcurrencyLimit(**kwargs)


def test_acquire_release_and_try_acquire() -> None:
    limit = ConcurrencyLimit(2, name="basic")
    assert limit.try_acquire()
    limit.acquire()
    assert limit.in_flight == 2
    assert not limit.try_acquire()  # a probe: not counted as a rejection
    limit.release()
    limit.release()
    assert limit.in_flight == 0
    with pytest.raises(RuntimeError, match="released more than acquired"):
        limit.release()
    stats = limit.stats()
    assert stats["acquired"] == 2
    assert stats["rejected"] == 0
    assert stats["peak_in_flight"] == 2
    assert stats["in_flight"] == 0
    assert stats["distributed"] is False


def test_slot_releases_on_exception() -> None:
    limit = ConcurrencyLimit(1)
    with pytest.raises(KeyError), limit.slot():
        assert limit.in_flight == 1
        raise KeyError("boom")
    assert limit.in_flight == 0


def test_non_shared_store_uses_local_fast_path() -> None:
    store = MemoryStore()
    limit = ConcurrencyLimit(1, store=store, name="local")
    assert not limit.distributed
    with limit.slot():
        assert store.lease_count("rag_resilience:local:limit", time.time()) == 0


# ---------------------------------------------------------------------------------------
# Backpressure, timeouts, events
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_backpressure_rejects_at_once_when_wait_queue_full() -> None:
    events, listener = collect()
    limit = ConcurrencyLimit(2, max_waiting=1, name="llm", listeners=[listener])
    limit.acquire()
    limit.acquire()
    got: list[str] = []
    waiter = threading.Thread(target=lambda: (limit.acquire(), got.append("in")))
    waiter.start()
    wait_until(lambda: limit.waiting == 1)

    started = time.monotonic()
    with pytest.raises(QueueFullError) as info:
        limit.acquire()
    assert time.monotonic() - started < 3.0  # immediate, no waiting (it would wait forever)
    assert not isinstance(info.value, WaitTimeoutError)
    assert (info.value.in_flight, info.value.waiting, info.value.limit) == (2, 1, 2)
    assert "max_waiting" not in str(info.value) and "llm" in str(info.value)
    assert limit.in_flight == 2
    assert limit.waiting == 1
    rejected = [e for e in events if e.kind is EventKind.REJECTED]
    assert [(e.name, e.reason) for e in rejected] == [("llm", "queue_full")]

    limit.release()  # handed straight to the waiter
    waiter.join(2.0)
    assert got == ["in"]
    assert limit.in_flight == 2
    assert limit.stats()["rejected"] == 1
    assert limit.stats()["acquired"] == 3


async def test_async_backpressure_with_no_wait_queue() -> None:
    events, listener = collect()
    limit = ConcurrencyLimit(1, name="emb", listeners=[listener])
    async with limit.aslot():
        with pytest.raises(QueueFullError):
            await limit.aacquire()
        with pytest.raises(QueueFullError):
            limit.acquire()
        assert limit.in_flight == 1
    assert limit.in_flight == 0
    assert [e.reason for e in events] == ["queue_full", "queue_full"]
    assert limit.stats()["rejected"] == 2


@pytest.mark.timeout(60)
def test_wait_timeout_raises_wait_timeout_error() -> None:
    events, listener = collect()
    limit = ConcurrencyLimit(1, max_waiting=5, wait_timeout=0.02, name="t", listeners=[listener])
    limit.acquire()
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError) as info:
        limit.acquire()
    assert time.monotonic() - started >= 0.015
    assert isinstance(info.value, QueueFullError)
    assert limit.in_flight == 1
    assert limit.waiting == 0
    with pytest.raises(WaitTimeoutError):
        limit.acquire(timeout=0.01)  # per-call override
    stats = limit.stats()
    assert stats["timed_out"] == 2
    assert stats["rejected"] == 0
    assert [e.reason for e in events] == ["wait_timeout", "wait_timeout"]
    limit.release()
    assert limit.try_acquire()


async def test_async_wait_timeout() -> None:
    limit = ConcurrencyLimit(1, max_waiting=5, wait_timeout=0.02)
    await limit.aacquire()
    with pytest.raises(WaitTimeoutError):
        await limit.aacquire()
    assert limit.waiting == 0
    assert limit.in_flight == 1
    await limit.arelease()
    assert limit.in_flight == 0
    assert limit.stats()["timed_out"] == 1


@pytest.mark.parametrize("bad", [0, -1.0])
def test_per_call_timeout_validated(bad: float) -> None:
    limit = ConcurrencyLimit(1, max_waiting=1)
    limit.acquire()
    with pytest.raises(ValueError, match=r"timeout must be > 0"):
        limit.acquire(timeout=bad)


async def test_waiting_does_not_block_the_event_loop() -> None:
    limit = ConcurrencyLimit(1, max_waiting=1)
    holder_release = threading.Event()

    def hold() -> None:
        with limit.slot():
            holder_release.wait(5.0)

    holder = threading.Thread(target=hold)
    holder.start()
    await await_until(lambda: limit.in_flight == 1)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not holder_release.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    ticking = asyncio.create_task(ticker())
    waiting = asyncio.create_task(limit.aacquire())
    await await_until(lambda: ticks >= 10)  # the loop keeps running while a task waits
    assert not waiting.done()
    holder_release.set()
    await asyncio.wait_for(waiting, 5.0)
    await ticking
    holder.join(2.0)
    assert limit.in_flight == 1
    limit.release()


# ---------------------------------------------------------------------------------------
# Many threads and tasks on one limit
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_32_threads_never_exceed_limit_and_counts_are_exact() -> None:
    limit = ConcurrencyLimit(4, max_waiting=32, name="threads")
    probe = Probe()
    per_thread = 25
    barrier = threading.Barrier(32)

    def body() -> None:
        barrier.wait()
        for _ in range(per_thread):
            with limit.slot():
                probe.enter()
                time.sleep(0)  # give others a chance to pile up
                probe.exit()

    threads = [threading.Thread(target=body) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    stats = limit.stats()
    assert probe.max_seen <= 4
    assert stats["peak_in_flight"] <= 4
    assert probe.calls == stats["acquired"] == 32 * per_thread
    assert stats["in_flight"] == 0
    assert stats["waiting"] == 0
    assert stats["rejected"] == stats["timed_out"] == 0


@pytest.mark.timeout(60)
async def test_500_tasks_never_exceed_limit_and_counts_are_exact() -> None:
    limit = ConcurrencyLimit(8, max_waiting=500, name="tasks")
    probe = Probe()

    async def body() -> None:
        async with limit.aslot():
            probe.enter()
            await asyncio.sleep(0)
            probe.exit()

    await asyncio.gather(*(body() for _ in range(500)))
    stats = limit.stats()
    assert probe.max_seen == 8  # saturated, never above
    assert probe.calls == stats["acquired"] == 500
    assert stats["in_flight"] == stats["waiting"] == 0


@pytest.mark.timeout(60)
async def test_threads_and_tasks_on_two_event_loops_share_one_limit() -> None:
    limit = ConcurrencyLimit(5, max_waiting=1000, name="mixed")
    probe = Probe()
    per_thread = 20
    errors: list[BaseException] = []

    def thread_body() -> None:
        try:
            for _ in range(per_thread):
                with limit.slot():
                    probe.enter()
                    time.sleep(0)
                    probe.exit()
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    async def task_body() -> None:
        async with limit.aslot():
            probe.enter()
            await asyncio.sleep(0)
            probe.exit()

    def other_loop() -> None:
        async def main() -> None:
            await asyncio.gather(*(task_body() for _ in range(200)))

        try:
            asyncio.run(main())
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=thread_body) for _ in range(16)]
    threads.append(threading.Thread(target=other_loop))
    for thread in threads:
        thread.start()
    await asyncio.gather(*(task_body() for _ in range(300)))
    for thread in threads:
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive()
    assert errors == []
    stats = limit.stats()
    assert probe.max_seen <= 5
    assert probe.calls == stats["acquired"] == 16 * per_thread + 200 + 300
    assert stats["in_flight"] == stats["waiting"] == 0


# ---------------------------------------------------------------------------------------
# Cancellation and fairness
# ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_cancelled_waiters_do_not_leak_permits() -> None:
    limit = ConcurrencyLimit(1, max_waiting=10)
    await limit.aacquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        async with limit.aslot():
            order.append(i)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(waiter(i)) for i in range(10)]
    await await_until(lambda: limit.waiting == 10)
    for task in tasks[::2]:
        task.cancel()
    await asyncio.sleep(0)
    await await_until(lambda: limit.waiting == 5)
    limit.release()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 5
    assert order == [1, 3, 5, 7, 9]
    assert limit.in_flight == 0
    assert limit.stats()["cancelled"] == 5
    assert limit.try_acquire()


@pytest.mark.timeout(60)
async def test_permit_handed_to_a_task_being_cancelled_is_passed_on() -> None:
    limit = ConcurrencyLimit(1, max_waiting=10)
    await limit.aacquire()
    first = asyncio.create_task(limit.aacquire())
    second = asyncio.create_task(limit.aacquire())
    await await_until(lambda: limit.waiting == 2)
    limit.release()  # grants `first` and schedules its wake-up ...
    first.cancel()  # ... but it is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 2.0)  # the permit went on to the next waiter
    assert limit.in_flight == 1
    assert limit.waiting == 0
    limit.release()
    assert limit.in_flight == 0

    # and with nobody behind it, the permit returns to the pool
    await limit.aacquire()
    lone = asyncio.create_task(limit.aacquire())
    await await_until(lambda: limit.waiting == 1)
    limit.release()
    lone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lone
    assert limit.in_flight == 0
    assert limit.try_acquire()


@pytest.mark.timeout(60)
async def test_permit_granted_as_wait_times_out_is_kept() -> None:
    limit = ConcurrencyLimit(1, max_waiting=1, wait_timeout=0.02)
    await limit.aacquire()
    task = asyncio.create_task(limit.aacquire())
    await await_until(lambda: limit.waiting == 1)
    time.sleep(0.03)  # block the loop: the wait_timeout timer is now due...
    limit.release()  # ...and the grant lands before the task resumes: it keeps the permit
    await task
    assert limit.in_flight == 1
    assert limit.stats()["timed_out"] == 0
    limit.release()


@pytest.mark.timeout(60)
def test_thread_waiters_are_served_fifo_without_barging() -> None:
    limit = ConcurrencyLimit(1, max_waiting=8)
    limit.acquire()
    order: list[int] = []
    lock = threading.Lock()

    def body(i: int) -> None:
        with limit.slot(), lock:
            order.append(i)

    threads = []
    for i in range(8):
        thread = threading.Thread(target=body, args=(i,))
        thread.start()
        threads.append(thread)
        wait_until(lambda i=i: limit.waiting == i + 1)
    assert not limit.try_acquire()  # no barging past queued waiters
    limit.release()
    for thread in threads:
        thread.join(5.0)
    assert order == list(range(8))


@pytest.mark.timeout(60)
async def test_threads_and_tasks_wait_in_one_fifo_line() -> None:
    limit = ConcurrencyLimit(1, max_waiting=6)
    await limit.aacquire()
    order: list[str] = []
    threads: list[threading.Thread] = []
    tasks: list[asyncio.Task[None]] = []

    def thread_body(tag: str) -> None:
        with limit.slot():
            order.append(tag)

    async def task_body(tag: str) -> None:
        async with limit.aslot():
            order.append(tag)

    for i in range(6):
        tag = f"{'thread' if i % 2 else 'task'}-{i}"
        if i % 2:
            thread = threading.Thread(target=thread_body, args=(tag,))
            thread.start()
            threads.append(thread)
        else:
            tasks.append(asyncio.create_task(task_body(tag)))
        await await_until(lambda i=i: limit.waiting == i + 1)
    await limit.arelease()
    await asyncio.gather(*tasks)
    for thread in threads:
        await asyncio.to_thread(thread.join, 5.0)
    assert order == ["task-0", "thread-1", "task-2", "thread-3", "task-4", "thread-5"]
    assert limit.in_flight == 0


@settings(max_examples=60, deadline=None)
@given(
    limit_size=st.integers(min_value=1, max_value=4),
    ops=st.lists(st.sampled_from(["try", "acquire", "release"]), max_size=40),
)
def test_single_caller_sequences_match_a_counter_model(limit_size: int, ops: list[str]) -> None:
    limit = ConcurrencyLimit(limit_size, name="model", listeners=[])
    held = acquired = rejected = 0
    for op in ops:
        if op == "try":
            ok = limit.try_acquire()
            assert ok == (held < limit_size)
            held += ok
            acquired += ok
        elif op == "acquire":
            if held < limit_size:
                limit.acquire()
                held += 1
                acquired += 1
            else:
                with pytest.raises(QueueFullError):
                    limit.acquire()
                rejected += 1
        elif held:
            limit.release()
            held -= 1
        assert limit.in_flight == held
    stats = limit.stats()
    assert (stats["acquired"], stats["rejected"]) == (acquired, rejected)
    assert stats["peak_in_flight"] <= limit_size


@settings(max_examples=40, deadline=None)
@given(
    n_waiters=st.integers(min_value=1, max_value=8),
    cancel_mask=st.lists(st.booleans(), min_size=8, max_size=8),
    cancel_after_release=st.booleans(),
)
def test_random_cancellations_never_leak_and_keep_fifo(
    n_waiters: int, cancel_mask: list[bool], cancel_after_release: bool
) -> None:
    async def scenario() -> None:
        limit = ConcurrencyLimit(1, max_waiting=8, listeners=[])
        await limit.aacquire()
        served: list[int] = []

        async def waiter(i: int) -> None:
            async with limit.aslot():
                served.append(i)

        tasks = [asyncio.create_task(waiter(i)) for i in range(n_waiters)]
        while limit.waiting < n_waiters:
            await asyncio.sleep(0)
        doomed = [i for i in range(n_waiters) if cancel_mask[i]]
        if not cancel_after_release:
            for i in doomed:
                tasks[i].cancel()
        limit.release()
        if cancel_after_release:  # races the hand-off: a granted permit must move on
            for i in doomed:
                tasks[i].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        survivors = [i for i in range(n_waiters) if not tasks[i].cancelled()]
        assert served == survivors  # FIFO among those who stayed
        assert limit.in_flight == 0
        assert limit.waiting == 0
        assert limit.try_acquire()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------
# Distributed (lease-based) mode
# ---------------------------------------------------------------------------------------

KEY = "rag_resilience:shared-llm:limit"


def test_leases_hold_the_limit_across_instances() -> None:
    store = SharedMemoryStore()
    clock = FakeClock()
    a = ConcurrencyLimit(2, name="shared-llm", store=store, clock=clock)
    b = ConcurrencyLimit(2, name="shared-llm", store=store, clock=clock)  # "another process"
    assert a.distributed and b.distributed
    assert a.try_acquire()
    b.acquire()
    assert store.lease_count(KEY, clock.time()) == 2
    assert not a.try_acquire()
    with pytest.raises(QueueFullError):
        b.acquire()  # max_waiting=0: reject at once
    assert a.in_flight == 1 and b.in_flight == 1
    assert a.stats()["global_in_flight"] == 2
    a.release()
    assert store.lease_count(KEY, clock.time()) == 1
    assert b.try_acquire()
    b.release()
    b.release()
    assert store.lease_count(KEY, clock.time()) == 0
    with pytest.raises(RuntimeError):
        b.release()


def test_crashed_holders_permits_free_at_lease_expiry() -> None:
    store = SharedMemoryStore()
    clock = FakeClock()
    # a process that took both permits and died: its leases are in the store, nobody renews
    assert store.lease_acquire(KEY, "dead-1", 2, 30.0, clock.time())
    assert store.lease_acquire(KEY, "dead-2", 2, 30.0, clock.time())
    limit = ConcurrencyLimit(2, name="shared-llm", store=store, lease_s=30.0, clock=clock)
    assert not limit.try_acquire()
    clock.advance(29.9)
    assert not limit.try_acquire()
    clock.advance(0.2)
    assert limit.try_acquire()
    assert limit.try_acquire()
    assert store.lease_count(KEY, clock.time()) == 2
    limit.release()
    limit.release()


def test_distributed_waiter_polls_with_backoff_until_expiry() -> None:
    store = SharedMemoryStore()
    clock = FakeClock()
    store.lease_acquire(KEY, "dead", 1, 1.0, clock.time())
    limit = ConcurrencyLimit(1, max_waiting=1, name="shared-llm", store=store, clock=clock)
    limit.acquire()  # waits (on the fake clock) until the dead lease expires
    assert clock.sleeps[:5] == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.05])
    assert max(clock.sleeps) == pytest.approx(0.05)
    assert 1.0 <= clock.total_slept < 1.0 + 0.05 + 1e-9
    assert limit.in_flight == 1
    assert limit.waiting == 0
    limit.release()


def test_distributed_wait_timeout_is_exact_on_the_clock() -> None:
    events, listener = collect()
    store = SharedMemoryStore()
    clock = FakeClock()
    store.lease_acquire(KEY, "other", 1, 60.0, clock.time())
    limit = ConcurrencyLimit(
        1,
        max_waiting=2,
        wait_timeout=0.5,
        name="shared-llm",
        store=store,
        clock=clock,
        listeners=[listener],
    )
    with pytest.raises(WaitTimeoutError):
        limit.acquire()
    assert clock.total_slept == pytest.approx(0.5)
    assert limit.waiting == 0
    assert limit.in_flight == 0
    assert limit.stats()["timed_out"] == 1
    assert [e.reason for e in events] == ["wait_timeout"]


async def test_distributed_async_waiter_gets_permit_released_by_other_instance() -> None:
    store = SharedMemoryStore()
    clock = FakeClock()
    a = ConcurrencyLimit(1, name="shared-llm", store=store, clock=clock)
    b = ConcurrencyLimit(1, max_waiting=1, name="shared-llm", store=store, clock=clock)
    await a.aacquire()
    waiting = asyncio.create_task(b.aacquire())
    await await_until(lambda: b.waiting == 1)
    with pytest.raises(QueueFullError):
        await b.aacquire()  # b's one waiting place is taken
    await a.arelease()
    await asyncio.wait_for(waiting, 5.0)
    assert b.in_flight == 1
    assert store.lease_count(KEY, clock.time()) == 1
    await b.arelease()
    assert store.lease_count(KEY, clock.time()) == 0
    async with a.aslot():
        assert a.stats()["global_in_flight"] == 1
    assert store.lease_count(KEY, clock.time()) == 0


@pytest.mark.timeout(30)
def test_threads_on_two_instances_never_exceed_distributed_limit() -> None:
    store = SharedMemoryStore()
    limits = [
        ConcurrencyLimit(3, max_waiting=16, wait_timeout=10.0, name="shared-llm", store=store)
        for _ in range(2)
    ]
    probe = Probe()

    def body(limit: ConcurrencyLimit) -> None:
        for _ in range(8):
            with limit.slot():
                probe.enter()
                time.sleep(0.001)
                probe.exit()

    threads = [threading.Thread(target=body, args=(limits[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
        assert not thread.is_alive()
    assert probe.max_seen <= 3
    assert probe.calls == sum(limit.stats()["acquired"] for limit in limits) == 64
    assert store.lease_count(KEY, time.time()) == 0


@pytest.mark.timeout(60)
def test_held_lease_is_renewed_while_the_call_runs() -> None:
    store = SharedMemoryStore()
    holder = ConcurrencyLimit(1, name="shared-llm", store=store, lease_s=0.1)
    other = ConcurrencyLimit(1, name="shared-llm", store=store, lease_s=0.1)
    with holder.slot():
        time.sleep(0.25)  # 2.5 lease periods: without renewal the lease would be gone
        assert not other.try_acquire()
    assert other.try_acquire()
    other.release()
    wait_until(lambda: holder._renewer is None and other._renewer is None)


def test_store_failure_falls_back_to_a_local_limit(caplog: pytest.LogCaptureFixture) -> None:
    limit = ConcurrencyLimit(2, name="shared-llm", store=BrokenStore(), clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="rag_resilience"):
        limit.acquire()
        assert limit.try_acquire()
        assert not limit.try_acquire()  # still bounded, by this process alone
    assert limit.in_flight == 2
    limit.release()
    limit.release()
    assert limit.in_flight == 0
    warnings = [r for r in caplog.records if "process-local limit" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not per call


@pytest.mark.timeout(60)
async def test_cancelled_distributed_waiter_frees_its_place() -> None:
    store = SharedMemoryStore()
    a = ConcurrencyLimit(1, name="shared-llm", store=store)
    b = ConcurrencyLimit(1, max_waiting=1, wait_timeout=5.0, name="shared-llm", store=store)
    await a.aacquire()
    task = asyncio.create_task(b.aacquire())
    await await_until(lambda: b.waiting == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # not masked as a WaitTimeoutError
        await task
    assert b.waiting == 0
    assert b.in_flight == 0
    assert (b.stats()["cancelled"], b.stats()["timed_out"]) == (1, 0)
    await a.arelease()
    assert store.lease_count(KEY, time.time()) == 0


@pytest.mark.timeout(60)
def test_lock_free_permits_lose_no_wakeup_under_forced_thread_switches() -> None:
    """Permits are taken and given back without the lock; waiters are queued and served
    under it. With the interpreter switching threads every microsecond the two paths
    interleave at every bytecode: the bound must hold, the counts stay exact, and every
    caller gets through (no wait_timeout: a waiter left parked would hang). Under steady
    traffic a lost wakeup would be healed by the next release, so the one window where it
    could happen is forced in the next test."""
    limit = ConcurrencyLimit(2, max_waiting=16, name="hammer")
    probe = Probe()
    barrier = threading.Barrier(12)

    def body() -> None:
        barrier.wait()
        for _ in range(400):
            limit.acquire()
            try:
                probe.enter()
                probe.exit()
            finally:
                limit.release()

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=body) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(45)
            assert not thread.is_alive(), "a waiter was left parked with a permit free"
    finally:
        sys.setswitchinterval(previous)
    stats = limit.stats()
    assert probe.max_seen <= 2 and stats["peak_in_flight"] <= 2
    assert probe.calls == stats["acquired"] == 12 * 400
    assert stats["in_flight"] == 0 and stats["waiting"] == 0


def test_release_in_the_window_before_a_caller_queues_is_not_lost() -> None:
    """The one interleaving that could lose a wakeup, forced: a caller finds no free
    permit (under the lock), and before it queues, another thread releases one (without
    the lock: nobody waits yet). The caller must still get that permit."""

    class Racy(ConcurrencyLimit):
        misses = 0

        def _take_free(self) -> bool:
            got = super()._take_free()
            if not got:
                self.misses += 1
                if self.misses == 2:  # the check under the lock, just before queueing
                    releaser = threading.Thread(target=self.release)
                    releaser.start()
                    releaser.join(5)
            return got

    limit = Racy(1, max_waiting=1, wait_timeout=2.0, name="window")
    limit.acquire()  # the permit the other thread gives back in the window
    started = time.monotonic()
    limit.acquire()  # WaitTimeoutError after 2 s if the release were lost
    assert time.monotonic() - started < 1.9
    assert limit.in_flight == 1 and limit.waiting == 0
    limit.release()
    assert limit.in_flight == 0


def test_system_exit_in_fn_does_not_kill_the_worker() -> None:
    """Before: SystemExit ended the worker thread silently and stranded the queue."""
    queue: RequestQueue[int] = RequestQueue(max_size=10)
    done: list[int] = []

    def fn(item: int) -> None:
        if item == 1:
            raise SystemExit(3)
        done.append(item)

    worker = QueueWorker(queue, fn)
    worker.start()
    for i in range(4):
        assert queue.enqueue(i)
    assert worker.wait_idle(10.0)
    assert worker.is_running
    assert done == [0, 2, 3]
    assert worker.stats()["failed"] == 1 and worker.stats()["processed"] == 3
    assert worker.stop() == []
