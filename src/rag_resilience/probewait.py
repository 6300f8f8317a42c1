"""Probe-wait: callers that find the half-open probe in flight wait for its verdict.

A `Signal` is a broadcast with an epoch: a caller notes `epoch`, looks at the state, and if
it must wait, waits until the epoch moves (so a verdict published between the look and the
wait is never missed). Threads park on a condition, asyncio tasks on a future of their own
loop (resolved thread-safely), so one signal serves both at once.

A breaker publishes on its signal every time a probe reports (the circuit closed, opened
again, or a slot freed) and `SlowStart` every time a ramped call ends. With a shared store
the verdicts of other processes arrive through `stores.redis_notify` (Redis pub/sub), which
publishes on the same local signal.

`WaitBudget` is how long a caller may wait in total: `probe_wait` and the caller's deadline
(`deadline.bound`), measured in real time, since the wait really blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from contextvars import ContextVar

from . import deadline

__all__ = ["OUTER_SERVES", "Signal", "WaitBudget", "default_probe_wait"]

#: Set by a policy that always has a degraded answer (a generic answer or fallbacks) around
#: its call: the policies nested inside it then never wait for a recovery (the "nothing to
#: degrade to" wait), since the outer one serves its caller at once.
OUTER_SERVES: ContextVar[bool] = ContextVar("rag_resilience_outer_serves", default=False)

#: The default probe-wait cap: a probe's verdict usually comes within seconds.
PROBE_WAIT_CAP = 5.0


def default_probe_wait(attempt_timeout: float | None) -> float:
    """The attempt timeout capped at `PROBE_WAIT_CAP` seconds (the cap without one)."""
    if attempt_timeout is None:
        return PROBE_WAIT_CAP
    return min(attempt_timeout, PROBE_WAIT_CAP)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Signal:
    """A thread- and task-safe broadcast that callers wait on by epoch."""

    __slots__ = ("_cond", "_epoch", "_futures")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._epoch = 0
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def epoch(self) -> int:
        """Read before looking at the state; wait with it (a plain read: no lock)."""
        return self._epoch

    @property
    def waiting(self) -> int:
        """Async waiters parked right now (threads are not counted)."""
        return len(self._futures)

    def publish(self, n: int | None = None) -> None:
        """Move the epoch; wake every waiter, or `n` threads and `n` tasks."""
        with self._cond:
            self._epoch += 1
            if n is None:
                futures, self._futures = self._futures, []
                self._cond.notify_all()
            else:
                futures, self._futures = self._futures[:n], self._futures[n:]
                self._cond.notify(n)
        for loop, future in futures:
            # a closed loop raises RuntimeError: nobody waits there any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future)

    def wait(self, epoch: int, timeout: float) -> bool:
        """Block until the epoch differs from `epoch` or `timeout` (real seconds) passed.
        True when it moved."""
        with self._cond:
            if self._epoch != epoch:
                return True
            self._cond.wait(max(0.0, timeout))
            return self._epoch != epoch

    async def await_(self, epoch: int, timeout: float) -> bool:
        """Async `wait`: never blocks the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._cond:
            if self._epoch != epoch:
                return True
            self._futures.append(entry)
        timer = loop.call_later(max(0.0, timeout), _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            with self._cond:
                if entry in self._futures:
                    self._futures.remove(entry)
        return self._epoch != epoch


class WaitBudget:
    """How long one caller may still wait: `seconds`, shortened by the caller's deadline."""

    __slots__ = ("_until",)

    def __init__(self, seconds: float) -> None:
        bounded = deadline.bound(seconds)
        self._until = time.monotonic() + max(0.0, bounded if bounded is not None else seconds)

    def left(self) -> float:
        return max(0.0, self._until - time.monotonic())
