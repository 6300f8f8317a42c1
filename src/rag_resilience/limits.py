"""Backpressure: a bounded request queue, its worker, and a concurrency limit.

Unbounded queues turn a traffic spike into memory exhaustion and minutes of latency;
a bounded one says "no" early, which callers can handle (the seed's "Please try again
shortly"). Three pieces:

* `RequestQueue`: the seed's bounded, thread-safe FIFO. `enqueue` returns False when
  full instead of growing.
* `QueueWorker`: background thread(s) draining a `RequestQueue` through a function.
  `stop()` drains or hands back what is left, never drops an item silently, never hangs.
* `ConcurrencyLimit`: at most `max_concurrency` calls in flight, at most `max_waiting`
  callers queued behind them (FIFO); beyond that `QueueFullError` at once. One instance
  serves threads and asyncio tasks on any number of event loops together. With a shared
  store (SQLite, Redis) permits are leases, so the limit spans processes and a crashed
  process's permits free themselves when their lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

from . import _validate as _v
from ._askgate import AskGate
from ._counter import AtomicCounter
from .clock import Clock, SystemClock, get_clock
from .deadline import bound as _deadline_bound
from .errors import QueueFullError, WaitTimeoutError
from .events import EventBus, EventKind, Listener
from .stores.base import Store, shared_time
from .stores.redis_notify import notifier_for

__all__ = ["ConcurrencyLimit", "QueueWorker", "RequestQueue"]

logger = logging.getLogger("rag_resilience")

T = TypeVar("T")

# Distributed waiters poll the store: first after 5 ms, backing off to 50 ms.
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.05
# At most this many (or the limit, if larger) waiters of one process ask the store at once.
_ASKERS_MIN = 16


# ---------------------------------------------------------------------------------------
# RequestQueue
# ---------------------------------------------------------------------------------------
class RequestQueue(Generic[T]):
    """Bounded FIFO: `enqueue` refuses (returns False) instead of growing past `max_size`.

    Thread-safe. `dequeue()` never blocks unless given a `timeout`. `None` is returned for
    "nothing available", so do not enqueue `None` itself. A queue object is always truthy
    (use `len()` or `size()`), so ``queue or RequestQueue()`` never replaces an empty one.
    """

    def __init__(self, max_size: int = 1000) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be an integer >= 1, got {max_size!r}")
        self.max_size = max_size
        self._items: deque[T] = deque()
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)  # item added, queue closed, worker stop
        self._changed = threading.Condition(lock)  # item taken or finished (wait_idle)
        self._closed = False
        self.total_enqueued = 0
        self.total_dequeued = 0
        self.total_rejected = 0
        self.peak_size = 0

    def enqueue(self, item: T) -> bool:
        """Append `item`; False (and counted as rejected) when full or closed: backpressure."""
        with self._not_empty:
            size = len(self._items)
            if size >= self.max_size or self._closed:
                self.total_rejected += 1
                return False
            self._items.append(item)
            self.total_enqueued += 1
            if size >= self.peak_size:
                self.peak_size = size + 1
            self._not_empty.notify()
        return True

    def dequeue(self, timeout: float | None = None) -> T | None:
        """Oldest item, or None if empty. With `timeout` (seconds), wait up to that long."""
        with self._not_empty:
            if not self._items and timeout is not None and timeout > 0 and not self._closed:
                deadline = time.monotonic() + timeout
                while not self._items and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._not_empty.wait(remaining)
            if not self._items:
                return None
            item = self._items.popleft()
            self.total_dequeued += 1
            self._changed.notify_all()
            return item

    def drain(self) -> list[T]:
        """Remove and return every queued item (oldest first)."""
        with self._not_empty:
            items = list(self._items)
            self._items.clear()
            self.total_dequeued += len(items)
            self._changed.notify_all()
            return items

    def size(self) -> int:
        return len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse new items and wake every blocked `dequeue` (queued items stay dequeuable)."""
        with self._not_empty:
            self._closed = True
            self._not_empty.notify_all()
            self._changed.notify_all()

    def stats(self) -> dict[str, Any]:
        """Snapshot: depth, capacity and counters (the seed prints it as ``key: value``)."""
        with self._not_empty:
            size = len(self._items)
            offered = self.total_enqueued + self.total_rejected
            return {
                "size": size,
                "max_size": self.max_size,
                "utilization": round(size / self.max_size, 4),
                "total_enqueued": self.total_enqueued,
                "total_rejected": self.total_rejected,
                "total_dequeued": self.total_dequeued,
                "rejection_rate": round(self.total_rejected / offered, 4) if offered else 0.0,
                "peak_size": self.peak_size,
                "closed": self._closed,
            }

    def __repr__(self) -> str:
        return f"RequestQueue(size={len(self._items)}, max_size={self.max_size})"


# ---------------------------------------------------------------------------------------
# QueueWorker
# ---------------------------------------------------------------------------------------
class _Run:
    """One start()..stop() generation; a stuck thread of an old run keeps its own flag."""

    __slots__ = ("stopping", "threads")

    def __init__(self) -> None:
        self.stopping = False
        self.threads: list[threading.Thread] = []


class QueueWorker(Generic[T]):
    """Daemon thread(s) that take items from a `RequestQueue` and call `fn(item)`.

    An exception from `fn` is logged (logger ``rag_resilience``) and counted in `failed`;
    it never kills the worker. `stop()` drains by default and returns whatever it could
    not process, so nothing is dropped silently; it is bounded by `timeout`.
    """

    def __init__(
        self,
        queue: RequestQueue[T],
        fn: Callable[[T], object],
        *,
        num_workers: int = 1,
        name: str = "queue-worker",
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
        self.queue = queue
        self.fn = fn
        self.num_workers = num_workers
        self.name = name
        self._cond = queue._changed  # shares the queue's lock: take + mark busy is atomic
        self._run: _Run | None = None
        self._current: dict[int, T] = {}  # thread ident -> item being processed
        self.processed = 0
        self.failed = 0
        self.returned = 0  # items handed back by stop() unprocessed

    # -- lifecycle
    def start(self) -> None:
        """Start the worker threads (no-op if already running)."""
        with self._cond:
            if self._run is not None and not self._run.stopping:
                return
            run = self._run = _Run()
            for i in range(self.num_workers):
                thread = threading.Thread(
                    target=self._loop, args=(run,), name=f"{self.name}-{i}", daemon=True
                )
                run.threads.append(thread)
        for thread in run.threads:
            thread.start()

    def stop(self, drain: bool = True, timeout: float | None = 10.0) -> list[T]:
        """Stop the workers; return the items left unprocessed (removed from the queue).

        With `drain`, queued items are processed first (up to `timeout` seconds). Whatever
        is still queued then is taken out of the queue and returned, with a warning, so the
        caller owns it. An `fn` still running when `timeout` expires is reported (warning,
        `in_progress`) and left to finish in its daemon thread: stop never hangs on it.
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            run = self._run
            if run is None or run.stopping:
                return []
        if drain:
            self.wait_idle(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._cond:
            run.stopping = True
            self.queue._not_empty.notify_all()
        left = self.queue.drain()
        current = threading.current_thread()
        for thread in run.threads:
            if thread is current:
                continue
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if left:
            with self._cond:
                self.returned += len(left)
            logger.warning(
                "[%s] stopped with %d unprocessed item(s); returned to the caller",
                self.name,
                len(left),
            )
        stuck = [t for t in run.threads if t.is_alive() and t is not current]
        if stuck:
            logger.warning(
                "[%s] %d worker thread(s) still inside fn after the %ss stop timeout; "
                "items in progress: %r",
                self.name,
                len(stuck),
                timeout,
                self.in_progress,
            )
        return left

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the queue is empty and no item is in progress; False on timeout."""
        queue = self.queue
        with self._cond:
            return self._cond.wait_for(lambda: not queue._items and not self._current, timeout)

    @property
    def is_running(self) -> bool:
        run = self._run
        return run is not None and not run.stopping and any(t.is_alive() for t in run.threads)

    @property
    def in_progress(self) -> list[T]:
        with self._cond:
            return list(self._current.values())

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "name": self.name,
                "running": self._run is not None and not self._run.stopping,
                "num_workers": self.num_workers,
                "processed": self.processed,
                "failed": self.failed,
                "in_progress": len(self._current),
                "returned_unprocessed": self.returned,
                "queue_size": len(self.queue._items),
            }

    def __enter__(self) -> QueueWorker[T]:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the thread body
    def _loop(self, run: _Run) -> None:
        queue = self.queue
        not_empty = queue._not_empty
        ident = threading.get_ident()
        while True:
            with not_empty:
                while not queue._items and not run.stopping and not queue._closed:
                    not_empty.wait()
                if run.stopping or not queue._items:
                    return  # stopped, or closed and empty
                item = queue._items.popleft()
                queue.total_dequeued += 1
                self._current[ident] = item
            ok = False
            try:
                self.fn(item)
                ok = True
            except BaseException:  # SystemExit too: it would end this thread silently
                logger.exception("[%s] fn raised on item %r; worker continues", self.name, item)
            finally:
                with self._cond:
                    del self._current[ident]
                    if ok:
                        self.processed += 1
                    else:
                        self.failed += 1
                    self._cond.notify_all()

    def __repr__(self) -> str:
        return f"QueueWorker(name={self.name!r}, processed={self.processed}, failed={self.failed})"


# ---------------------------------------------------------------------------------------
# ConcurrencyLimit
# ---------------------------------------------------------------------------------------
class _ThreadWaiter:
    """A blocked thread: parks on a pre-acquired lock the releaser unlocks."""

    __slots__ = ("_lock", "granted")

    def __init__(self) -> None:
        self.granted = False
        self._lock = threading.Lock()
        self._lock.acquire()

    def wait(self, timeout: float | None) -> None:
        self._lock.acquire(timeout=-1 if timeout is None else timeout)

    def wake(self) -> bool:
        self._lock.release()
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _AsyncWaiter:
    """A waiting task: a future on its own loop, resolved thread-safely by the releaser."""

    __slots__ = ("future", "granted", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.granted = False
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def wake(self) -> bool:
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:  # its loop is closed: the task is gone, pass the permit on
            return False
        return True


_CUT = ", all the call's deadline left"


def _check_timeout(param: str, value: float | None) -> None:
    _v.positive(param, value, none_ok=True, unit="seconds (None waits forever)")


class ConcurrencyLimit:
    """At most `max_concurrency` calls in flight; at most `max_waiting` queued behind them.

    A caller that finds every permit taken waits (FIFO) if fewer than `max_waiting` are
    already waiting, else gets `QueueFullError` at once: the queue never grows past its
    bound. A waiter without a permit after `wait_timeout` seconds gets `WaitTimeoutError`.
    One instance is shared by threads (`acquire`/`release`, `slot()`) and asyncio tasks
    (`aacquire`/`arelease`, `aslot()`) on any number of event loops; an async wait never
    blocks its loop, and a cancelled waiter never leaks a permit.

    With a shared `store` (``store.shared``), permits are leases at key
    ``rag_resilience:{name}:limit`` taken with `lease_s` expiry: the limit holds across
    processes, waiting polls the store (5 ms backing off to 50 ms, on `clock`; a release in
    this process wakes its oldest waiter at once; only the first max(limit, 16) waiters of a
    process poll, the rest queue in the process, so a crowd cannot run the store's
    connection pool dry), waiters are served first come, first
    served across processes where the store can queue them (Redis, SQLite, and the local
    fallback; see `Store.lease_wait`), and `in_flight` counts this process's permits only.
    On Redis a release hands the permit to the oldest waiter of any process and says so
    over pub/sub (`stores.redis_notify`): that waiter is admitted without asking again.
    A caller cancelled while its lease request is in flight releases that lease (its token
    is chosen before the request), so cancellation never strands a permit. A background
    thread renews held leases every `lease_s / 3` seconds while any is held;
    a crashed process stops renewing, so its permits free themselves within `lease_s`.
    `lease_s` must therefore exceed the longest stall of a live process (GC pause, paused
    VM), or a stalled holder's permit can be taken by another process. With a `FakeClock`
    a polling waiter advances fake time itself, so it can outlive a live holder's lease:
    tests simulate other processes with leases written to the store directly.
    If the store fails, a call falls back to a process-local limit and a warning is logged.

    Permits are not owned: any thread or task may release one (like a semaphore).
    """

    def __init__(
        self,
        max_concurrency: int,
        max_waiting: int = 0,
        wait_timeout: float | None = None,
        *,
        name: str = "limit",
        store: Store | None = None,
        lease_s: float = 60.0,
        clock: Clock | None = None,
        listeners: Iterable[Listener] | None = None,
    ) -> None:
        _v.integer("max_concurrency", max_concurrency, 1)
        _v.integer("max_waiting", max_waiting, 0)
        _check_timeout("wait_timeout", wait_timeout)
        _v.positive("lease_s", lease_s)
        self.name = name
        self.wait_timeout = wait_timeout
        self.lease_s = float(lease_s)
        self._max = max_concurrency
        self._max_waiting = max_waiting
        self._clock = clock
        self._bus = EventBus(listeners)
        self._lock = threading.Lock()
        # Local mode: the free permits themselves. Taking one is `pop()` and giving one back
        # `append()`, each a single C call, atomic under the GIL: an uncontended call takes
        # no lock. The lock orders the waiters and the hand-offs to them.
        self._free: list[None] = [None] * max_concurrency
        self._in_flight = 0  # distributed mode: permits this process holds
        self._waiters: deque[_ThreadWaiter | _AsyncWaiter] = deque()
        self._peak = 0
        self._acquired = AtomicCounter()
        self._rejected = 0
        self._timed_out = 0
        self._cancelled = 0
        # distributed mode
        self._store: Store | None = store if store is not None and store.shared else None
        self.key = f"rag_resilience:{name}:limit"
        self._tokens: deque[str | None] = deque()  # None: admitted by the local fallback
        self._dist_waiting = 0
        # Distributed waiters of this process asleep between polls, oldest first: a
        # release here wakes the oldest to ask the store at once (it is likely next in
        # the store's queue), instead of leaving the permit idle until its next poll.
        self._sleepers: deque[_ThreadWaiter | _AsyncWaiter] = deque()
        # Only the first few waiters of this process poll the store; the rest queue here
        # (a crowd of pollers ran the connection pool dry and timed out a healthy Redis).
        self._asks = AskGate(max(max_concurrency, _ASKERS_MIN))
        # token = random per-instance prefix + counter: unique across processes, and
        # ~10x cheaper than a uuid4 (an os.urandom syscall) per acquisition
        self._token_prefix = uuid.uuid4().hex
        self._token_seq = itertools.count()
        self._renewer: threading.Thread | None = None
        self._forgotten: set[asyncio.Task[None]] = set()
        self._store_warned = False
        # A release in another replica wakes a waiter here (Redis pub/sub, published by
        # the release script itself): cross-process hand-offs do not wait for a poll.
        self._notifier = notifier_for(self._store, self.key, self._remote_release)
        self._asking: dict[str, bool] = {}  # waiting token -> a release handed it a permit
        self._sleeping: dict[str, _ThreadWaiter | _AsyncWaiter] = {}  # token -> its doze
        self._slot = _Slot(self, None)  # stateless: one shared instance for the common case
        self._aslot = _AsyncSlot(self, None)

    # -- introspection
    @property
    def max_concurrency(self) -> int:
        return self._max

    @property
    def max_waiting(self) -> int:
        return self._max_waiting

    @property
    def in_flight(self) -> int:
        """Permits held in this process."""
        return self._in_flight if self._store is not None else self._max - len(self._free)

    @property
    def waiting(self) -> int:
        """Callers of this process waiting for a permit."""
        return len(self._waiters) + self._dist_waiting

    @property
    def distributed(self) -> bool:
        return self._store is not None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            snapshot: dict[str, Any] = {
                "name": self.name,
                "in_flight": self.in_flight,
                "waiting": len(self._waiters) + self._dist_waiting,
                "max_concurrency": self._max,
                "max_waiting": self._max_waiting,
                "peak_in_flight": self._peak,
                "acquired": self._acquired.value,
                "rejected": self._rejected,
                "timed_out": self._timed_out,
                "cancelled": self._cancelled,
                "distributed": self._store is not None,
            }
        if self._store is not None:
            try:
                now = self._now()
                snapshot["global_in_flight"] = self._store.lease_count(self.key, now)
            except Exception as exc:
                snapshot["global_in_flight"] = f"unavailable: {exc!r}"
        return snapshot

    def __repr__(self) -> str:
        return (
            f"ConcurrencyLimit(name={self.name!r}, in_flight={self.in_flight}/{self._max}, "
            f"waiting={self.waiting}/{self._max_waiting})"
        )

    # -- public API
    def try_acquire(self) -> bool:
        """Take a permit only if one is free right now (never waits, never counts a rejection)."""
        if self._store is not None:
            return self._lease_once(self._new_token())
        return not self._waiters and self._take_free()

    def acquire(self, timeout: float | None = None) -> None:
        """Take a permit, waiting up to `timeout` (default `wait_timeout`) in FIFO order.

        Raises `QueueFullError` at once if `max_waiting` callers already wait, and
        `WaitTimeoutError` if no permit came in time. Pair with `release()`.
        """
        if self._store is not None:
            self._acquire_distributed(timeout)
            return
        if not self._waiters and self._take_free():  # the common case: no lock
            return
        waiter = self._take_or_queue(timeout, None)
        if waiter is None:
            return
        asked = self.wait_timeout if timeout is None else timeout
        wait_for = _deadline_bound(asked)  # the call's deadline cuts the wait (deadline.py)
        try:
            waiter.wait(wait_for)
        except BaseException:  # KeyboardInterrupt while parked: never keep a handed-off permit
            self._abandon(waiter)
            raise
        self._finish_wait(waiter, wait_for, wait_for != asked)

    async def aacquire(self, timeout: float | None = None) -> None:
        """Async `acquire`: waits on a future, never blocking the event loop."""
        if self._store is not None:
            await self._aacquire_distributed(timeout)
            return
        if not self._waiters and self._take_free():  # as in `acquire`
            return
        waiter = self._take_or_queue(timeout, asyncio.get_running_loop())
        if waiter is None:
            return
        asked = self.wait_timeout if timeout is None else timeout
        wait_for = _deadline_bound(asked)  # as in `acquire`
        timer = (
            None if wait_for is None else waiter.loop.call_later(wait_for, _resolve, waiter.future)
        )
        try:
            await waiter.future
        except BaseException:  # cancelled: pass on a permit handed to us concurrently
            self._abandon(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self._finish_wait(waiter, wait_for, wait_for != asked)

    @overload
    def _take_or_queue(self, timeout: float | None, loop: None) -> _ThreadWaiter | None: ...
    @overload
    def _take_or_queue(
        self, timeout: float | None, loop: asyncio.AbstractEventLoop
    ) -> _AsyncWaiter | None: ...
    def _take_or_queue(
        self, timeout: float | None, loop: asyncio.AbstractEventLoop | None
    ) -> _ThreadWaiter | _AsyncWaiter | None:
        """`acquire`'s decision when no permit was free at first sight, shared by sync and
        async: take one freed meanwhile (None), or queue a waiter (on `loop` for async
        callers), or raise `QueueFullError`.

        Waiters are served first (FIFO): a permit is taken directly only while none wait.
        A waiter is queued before it looks for a permit freed meanwhile, and `release`
        frees its permit before it looks for waiters, so one of them always sees the other.
        """
        lock = self._lock  # acquire/release, not `with`: half the cost
        lock.acquire()
        try:
            if not self._waiters and self._take_free():
                return None
            _check_timeout("timeout", timeout)
            if len(self._waiters) < self._max_waiting:
                waiter = _ThreadWaiter() if loop is None else _AsyncWaiter(loop)
                self._waiters.append(waiter)
                self._drain()  # a permit freed since we looked: to the oldest waiter
                return waiter
            self._rejected += 1
            error: QueueFullError = self._full_error()
        finally:
            lock.release()
        self._publish_rejection(error, "queue_full")
        raise error

    def release(self) -> None:
        """Give a permit back: handed straight to the oldest waiter if there is one."""
        if self._store is not None:
            token = self._pop_token()
            if token is not None:
                try:
                    self._store.lease_release(self.key, token)
                except Exception as exc:
                    self._warn_store(exc, "release")
            if self._sleepers:
                self._wake_sleeper()
            return
        free = self._free
        free.append(None)
        if len(free) > self._max:
            free.pop()
            raise RuntimeError(f"ConcurrencyLimit '{self.name}' released more than acquired")
        if self._waiters:  # after freeing the permit: see `_take_or_queue`
            lock = self._lock
            lock.acquire()
            try:
                self._drain()
            finally:
                lock.release()

    async def arelease(self) -> None:
        """Async `release` (uses the store's async client in distributed mode)."""
        if self._store is not None:
            token = self._pop_token()
            if token is not None:
                try:
                    await self._store.alease_release(self.key, token)
                except Exception as exc:
                    self._warn_store(exc, "release")
            if self._sleepers:
                self._wake_sleeper()
            return
        self.release()

    def slot(self, timeout: float | None = None) -> _Slot:
        """``with limit.slot(): ...`` holds one permit for the block."""
        return self._slot if timeout is None else _Slot(self, timeout)

    def aslot(self, timeout: float | None = None) -> _AsyncSlot:
        """``async with limit.aslot(): ...`` holds one permit for the block."""
        return self._aslot if timeout is None else _AsyncSlot(self, timeout)

    # -- local mode internals (callers hold no lock unless the name says so)
    def _take_free(self) -> bool:
        """Take a free permit if there is one (lock or no lock: `pop` is atomic)."""
        free = self._free
        try:
            free.pop()
        except IndexError:
            return False
        self._acquired.add()
        n = self._max - len(free)
        if n > self._peak:  # racing updates can keep a lower peak, never one over the bound
            self._peak = n
        return True

    def _drain(self) -> None:
        """With the lock held: hand free permits to the oldest live waiters."""
        waiters, free = self._waiters, self._free
        while waiters:
            try:
                free.pop()
            except IndexError:
                return
            waiter = waiters.popleft()
            waiter.granted = True
            if not waiter.wake():  # its event loop is gone: the permit goes back
                free.append(None)
            elif self._max - len(free) > self._peak:
                self._peak = self._max - len(free)

    def _finish_wait(
        self, waiter: _ThreadWaiter | _AsyncWaiter, wait_for: float | None, cut: bool
    ) -> None:
        with self._lock:
            if waiter.granted:
                self._acquired.add()
                return
            self._waiters.remove(waiter)
            self._timed_out += 1
            error = self._full_error(timeout=wait_for, cut=cut)
        self._publish_rejection(error, "wait_timeout")
        raise error

    def _abandon(self, waiter: _ThreadWaiter | _AsyncWaiter) -> None:
        with self._lock:
            self._cancelled += 1
            if waiter.granted:  # pass the permit it was handed on, or back to the pool
                self._free.append(None)
                self._drain()
            else:
                self._waiters.remove(waiter)

    def _full_error(self, timeout: float | None = None, cut: bool = False) -> QueueFullError:
        in_flight, waiting = self.in_flight, len(self._waiters) + self._dist_waiting
        if timeout is None:
            return QueueFullError(
                f"concurrency limit '{self.name}' is full: {in_flight}/{self._max} in flight, "
                f"{waiting}/{self._max_waiting} waiting",
                in_flight=in_flight,
                waiting=waiting,
                limit=self._max,
            )
        return WaitTimeoutError(
            f"concurrency limit '{self.name}': no permit within {timeout:.3g}s"
            f"{_CUT if cut else ''} ({in_flight}/{self._max} in flight, {waiting} waiting)",
            in_flight=in_flight,
            waiting=waiting,
            limit=self._max,
        )

    def _publish_rejection(self, error: QueueFullError, reason: str) -> None:
        self._bus.publish(
            EventKind.REJECTED,
            self.name,
            reason=reason,
            error=error,
            extra={"in_flight": error.in_flight, "waiting": error.waiting, "limit": error.limit},
        )

    # -- distributed mode internals
    def _warn_store(self, exc: BaseException, op: str) -> None:
        if not self._store_warned:
            self._store_warned = True
            logger.warning(
                "[%s] store %s failed (%r); using a process-local limit until it recovers",
                self.name,
                op,
                exc,
            )

    def _admitted(self, token: str | None) -> None:
        """With the lock held: record a permit (a lease token, or None for a local one)."""
        self._tokens.append(token)
        self._in_flight += 1
        self._acquired.add()
        if self._in_flight > self._peak:
            self._peak = self._in_flight
        if token is not None and self._renewer is None:
            self._renewer = threading.Thread(
                target=self._renew_loop, name=f"{self.name}-lease-renewer", daemon=True
            )
            self._renewer.start()

    def _after_lease(self, token: str, ok: bool | None, exc: BaseException | None) -> bool:
        if exc is not None:
            self._warn_store(exc, "lease_acquire")
            with self._lock:
                if self._in_flight < self._max:
                    self._admitted(None)
                    return True
                return False
        if ok:
            self._store_warned = False
            with self._lock:
                self._admitted(token)
            return True
        return False

    def _now(self) -> float:
        """Lease times on the store's clock when it has one: a host whose clock runs ahead
        must not expire other hosts' live leases."""
        return shared_time(self._store, get_clock(self._clock))

    def _lease_once(self, token: str, wait: bool = False) -> bool:
        assert self._store is not None
        now = self._now()
        ask = self._store.lease_wait if wait else self._store.lease_acquire
        try:
            ok = ask(self.key, token, self._max, self.lease_s, now)
        except Exception as exc:
            return self._after_lease(token, None, exc)
        except BaseException:  # interrupted mid-request: the store may have granted it
            self._forget_lease(token)
            raise
        return self._after_lease(token, ok, None)

    async def _alease_once(self, token: str, wait: bool = False) -> bool:
        assert self._store is not None
        now = self._now()
        ask = self._store.alease_wait if wait else self._store.alease_acquire
        try:
            ok = await ask(self.key, token, self._max, self.lease_s, now)
        except Exception as exc:
            return self._after_lease(token, None, exc)
        except BaseException:  # cancelled mid-request: the store may have granted it
            self._forget_lease(token)
            raise
        return self._after_lease(token, ok, None)

    def _forget_lease(self, token: str) -> None:
        """Release a lease whose grant the caller never learned (cancelled or interrupted
        while the request was in flight). The token was chosen before the request, so it
        can be released; stores refuse a grant that arrives after its release."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            try:
                self._release_lease(token)
            except Exception as exc:
                self._warn_store(exc, "release")
            return
        task = loop.create_task(self._arelease_lease(token))
        self._forgotten.add(task)  # a strong reference until it is done
        task.add_done_callback(self._forgotten.discard)

    def _release_lease(self, token: str) -> None:
        assert self._store is not None
        self._store.lease_forget(self.key, token)

    async def _arelease_lease(self, token: str) -> None:
        assert self._store is not None
        try:
            await self._store.alease_forget(self.key, token)
        except Exception as exc:
            self._warn_store(exc, "release")

    def _enter_wait(self, timeout: float | None) -> None:
        _check_timeout("timeout", timeout)
        with self._lock:
            if self._dist_waiting >= self._max_waiting:
                self._rejected += 1
                error = self._full_error()
            else:
                self._dist_waiting += 1
                return
        self._publish_rejection(error, "queue_full")
        raise error

    def _leave_wait(
        self, acquired: bool, wait_for: float | None, cancelled: bool = False, cut: bool = False
    ) -> None:
        with self._lock:
            self._dist_waiting -= 1
            if acquired:
                return
            if cancelled:
                self._cancelled += 1
                return
            self._timed_out += 1
            error = self._full_error(timeout=wait_for, cut=cut)
        self._publish_rejection(error, "wait_timeout")
        raise error

    def _acquire_distributed(self, timeout: float | None) -> None:
        token = self._new_token()
        if self._ask_once(token):
            return
        # A fresh token to wait with: a one-shot ask Redis did not answer is forgotten
        # (tombstoned), and a waiter's token must stay grantable.
        token = self._new_token()
        self._enter_wait(timeout)
        asked = self.wait_timeout if timeout is None else timeout
        wait_for = _deadline_bound(asked)  # the call's deadline cuts the wait (deadline.py)
        clock = get_clock(self._clock)
        deadline = None if wait_for is None else clock.monotonic() + wait_for
        gated = isinstance(clock, SystemClock)  # a fake clock's waiters never block for real
        try:
            turn = not gated or self._asks.enter(wait_for)
        except BaseException:
            self._leave_wait(False, wait_for, cancelled=True)
            raise
        if not turn:
            self._leave_wait(False, wait_for, cut=wait_for != asked)  # raises
        try:
            self._poll_until(token, clock, deadline, asked, wait_for)
        finally:
            if gated:
                self._asks.leave()

    def _ask_once(self, token: str) -> bool:
        """Ask for a lease at once, if this process's askers leave room (a burst of new
        calls must not send one request each: they queue at the gate instead). Without
        room to wait (`max_waiting=0`) this ask is the caller's only chance: it is sent."""
        if not self._asks.try_enter():
            return not self._max_waiting and self._lease_once(token)
        try:
            return self._lease_once(token)
        finally:
            self._asks.leave()

    async def _aask_once(self, token: str) -> bool:
        """Async twin of `_ask_once`."""
        if not self._asks.try_enter():
            return not self._max_waiting and await self._alease_once(token)
        try:
            return await self._alease_once(token)
        finally:
            self._asks.leave()

    def _poll_until(
        self,
        token: str,
        clock: Clock,
        deadline: float | None,
        asked: float | None,
        wait_for: float | None,
    ) -> None:
        delay, acquired = _POLL_FIRST_S, False
        self._asking[token] = False
        try:
            # Queue at once (stores that can serve waiters in arrival order), then poll.
            acquired = self._lease_once(token, wait=True)
            while not acquired:
                pause = delay if deadline is None else min(delay, deadline - clock.monotonic())
                if pause <= 0:
                    break
                self._doze(clock, pause, token)
                acquired = self._take_handed(token) or self._lease_once(token, wait=True)
                delay = self._next_poll(token, delay)
        except BaseException:  # cancelled / interrupted while polling
            if not acquired:
                self._forget_lease(token)  # leave the queue; release a grant we never saw
            self._asking.pop(token, None)
            self._leave_wait(acquired, wait_for, cancelled=True)
            raise
        self._asking.pop(token, None)
        if not acquired:
            self._forget_lease(token)  # leave the store's waiter queue
        self._leave_wait(acquired, wait_for, cut=wait_for != asked)

    async def _aacquire_distributed(self, timeout: float | None) -> None:
        token = self._new_token()
        if await self._aask_once(token):
            return
        # A fresh token to wait with: a one-shot ask Redis did not answer is forgotten
        # (tombstoned), and a waiter's token must stay grantable.
        token = self._new_token()
        self._enter_wait(timeout)
        asked = self.wait_timeout if timeout is None else timeout
        wait_for = _deadline_bound(asked)  # the call's deadline cuts the wait (deadline.py)
        clock = get_clock(self._clock)
        deadline = None if wait_for is None else clock.monotonic() + wait_for
        gated = isinstance(clock, SystemClock)  # as in _acquire_distributed
        try:
            turn = not gated or await self._asks.aenter(wait_for)
        except BaseException:
            self._leave_wait(False, wait_for, cancelled=True)
            raise
        if not turn:
            self._leave_wait(False, wait_for, cut=wait_for != asked)  # raises
        try:
            await self._apoll_until(token, clock, deadline, asked, wait_for)
        finally:
            if gated:
                self._asks.leave()

    async def _apoll_until(
        self,
        token: str,
        clock: Clock,
        deadline: float | None,
        asked: float | None,
        wait_for: float | None,
    ) -> None:
        delay, acquired = _POLL_FIRST_S, False
        self._asking[token] = False
        try:
            acquired = await self._alease_once(token, wait=True)  # queue at once, then poll
            while not acquired:
                pause = delay if deadline is None else min(delay, deadline - clock.monotonic())
                if pause <= 0:
                    break
                await self._adoze(clock, pause, token)
                acquired = self._take_handed(token) or await self._alease_once(token, wait=True)
                delay = self._next_poll(token, delay)
        except BaseException:  # cancelled / interrupted while polling
            if not acquired:
                self._forget_lease(token)  # leave the queue; release a grant we never saw
            self._asking.pop(token, None)
            self._leave_wait(acquired, wait_for, cancelled=True)
            raise
        self._asking.pop(token, None)
        if not acquired:
            self._forget_lease(token)  # leave the store's waiter queue
        self._leave_wait(acquired, wait_for, cut=wait_for != asked)

    def _next_poll(self, token: str, delay: float) -> float:
        """Back off (5 ms doubling to 50 ms), except near the front of the store's queue:
        the next permit is ours, so ask again soon."""
        assert self._store is not None
        rank = self._store.waiter_rank(token)
        if rank is not None and rank < self._max:
            return _POLL_FIRST_S
        return min(delay * 2, _POLL_MAX_S)

    def _remote_release(self, state: str) -> None:
        """A release freed a permit while waiters queue (`stores.redis_notify`): handed to
        one of our waiters ("granted:<token>": it is admitted without asking again), or
        free to ask for ("release": the oldest sleeper asks)."""
        if state == "release":
            if self._sleepers:
                self._wake_sleeper()
            return
        token = state.partition("granted:")[2]
        with self._lock:
            if token not in self._asking:
                return  # another process's waiter, or one that gave up (it releases it)
            self._asking[token] = True
            sleeper = self._sleeping.pop(token, None)
            try:  # not yet woken by a local release (a waiter is woken once)
                if sleeper is not None:
                    self._sleepers.remove(sleeper)
            except ValueError:
                sleeper = None
        if sleeper is not None:
            sleeper.wake()

    def _take_handed(self, token: str) -> bool:
        """Whether a release handed `token` its permit (admitted here, no round trip)."""
        if not self._asking.get(token):
            return False
        self._after_lease(token, True, None)
        return True

    def _wake_sleeper(self) -> None:
        with self._lock:
            while self._sleepers:
                if self._sleepers.popleft().wake():
                    return

    def _doze(self, clock: Clock, pause: float, token: str) -> None:
        """Sleep between polls: on a real clock, until `pause`, a release here or a
        permit handed to `token` (or freed) by a release in another process."""
        if not isinstance(clock, SystemClock):
            clock.sleep(pause)
            return
        sleeper = _ThreadWaiter()
        if not self._sleep_as(token, sleeper):
            return
        try:
            sleeper.wait(pause)
        finally:
            self._woke(token, sleeper)

    async def _adoze(self, clock: Clock, pause: float, token: str) -> None:
        if not isinstance(clock, SystemClock):
            await clock.asleep(pause)
            return
        sleeper = _AsyncWaiter(asyncio.get_running_loop())
        if not self._sleep_as(token, sleeper):
            return
        timer = sleeper.loop.call_later(pause, _resolve, sleeper.future)
        try:
            await sleeper.future
        finally:
            timer.cancel()
            self._woke(token, sleeper)

    def _sleep_as(self, token: str, sleeper: _ThreadWaiter | _AsyncWaiter) -> bool:
        """Register a doze; False if a permit was already handed to `token`."""
        with self._lock:
            if self._asking.get(token):
                return False
            self._sleepers.append(sleeper)
            self._sleeping[token] = sleeper
            return True

    def _woke(self, token: str, sleeper: _ThreadWaiter | _AsyncWaiter) -> None:
        with self._lock:
            if self._sleeping.get(token) is sleeper:
                del self._sleeping[token]
            with contextlib.suppress(ValueError):
                self._sleepers.remove(sleeper)

    def _new_token(self) -> str:
        return f"{self._token_prefix}-{next(self._token_seq)}"

    def _pop_token(self) -> str | None:
        with self._lock:
            if not self._tokens:
                raise RuntimeError(f"ConcurrencyLimit '{self.name}' released more than acquired")
            token = self._tokens.popleft()  # permits are fungible: drop the oldest lease
            self._in_flight -= 1
            return token

    def _renew_loop(self) -> None:
        """Keep this process's leases alive while held.

        Renews every `lease_s / 3` seconds; exits at the first tick with nothing held, so
        a busy limit reuses one thread instead of starting one per acquisition.
        """
        store = self._store
        assert store is not None
        while True:
            time.sleep(self.lease_s / 3)
            with self._lock:
                held = [t for t in self._tokens if t is not None]
                if not held:
                    self._renewer = None
                    return
            now = self._now()
            for token in held:
                try:
                    ok = store.lease_acquire(self.key, token, self._max, self.lease_s, now)
                except Exception as exc:
                    self._warn_store(exc, "lease renewal")
                    continue
                with self._lock:
                    still_held = token in self._tokens
                if not still_held:  # released while we renewed: do not resurrect it
                    try:
                        store.lease_release(self.key, token)
                    except Exception as exc:
                        self._warn_store(exc, "release")
                elif not ok:
                    logger.warning(
                        "[%s] lease %s expired before renewal and its permit was taken; "
                        "lease_s (%ss) must exceed the longest call",
                        self.name,
                        token,
                        self.lease_s,
                    )


class _Slot:
    __slots__ = ("_limit", "_timeout")

    def __init__(self, limit: ConcurrencyLimit, timeout: float | None) -> None:
        self._limit = limit
        self._timeout = timeout

    def __enter__(self) -> ConcurrencyLimit:
        self._limit.acquire(self._timeout)
        return self._limit

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._limit.release()


class _AsyncSlot:
    __slots__ = ("_limit", "_timeout")

    def __init__(self, limit: ConcurrencyLimit, timeout: float | None) -> None:
        self._limit = limit
        self._timeout = timeout

    async def __aenter__(self) -> ConcurrencyLimit:
        await self._limit.aacquire(self._timeout)
        return self._limit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._limit.arelease()
