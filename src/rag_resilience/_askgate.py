"""How many of one process's distributed waiters may ask the shared store at once.

Why: every waiter of a distributed `ConcurrencyLimit` polls the store. With 200 waiting
tasks in one process that is 200 concurrent Redis operations for 8 permits: the
connection pool runs dry, the event loop falls behind, and operations on a healthy
Redis time out (a call paid up to 3 op timeouts in `benchmarks/faults.py`). Only the
first `capacity` waiters of a process ask; the others wait here, first come first served,
until one of the askers leaves (admitted, timed out or cancelled) and hands its turn on.
Nothing is lost by waiting here: a process's later waiters cannot be served before its
earlier ones anyway (the store serves waiters in arrival order).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

__all__ = ["AskGate"]


class _Turn:
    """One waiter parked at the gate; `given` once an asker handed it its turn."""

    __slots__ = ("event", "future", "given", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.given = False
        self.loop = loop
        self.future: asyncio.Future[None] | None = None
        self.event: threading.Event | None = None
        if loop is None:
            self.event = threading.Event()
        else:
            self.future = loop.create_future()

    def wake(self) -> bool:
        if self.event is not None:
            self.event.set()
            return True
        assert self.loop is not None and self.future is not None
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:  # its loop is closed: the task is gone, pass the turn on
            return False
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class AskGate:
    """At most `capacity` holders at once; the rest wait in arrival order. Thread-safe,
    for threads and tasks of any event loop together."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.holders = 0
        self._queue: deque[_Turn] = deque()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Waiters parked at the gate (not yet allowed to ask)."""
        return len(self._queue)

    def try_enter(self) -> bool:
        """Take a turn only if one is free and nobody waits for one (never blocks)."""
        with self._lock:
            if self.holders < self.capacity and not self._queue:
                self.holders += 1
                return True
            return False

    def _park(self, loop: asyncio.AbstractEventLoop | None) -> _Turn | None:
        """Take a turn at once (None) or queue one."""
        with self._lock:
            if self.holders < self.capacity and not self._queue:
                self.holders += 1
                return None
            turn = _Turn(loop)
            self._queue.append(turn)
            return turn

    def _gave_up(self, turn: _Turn) -> bool:
        """A parked waiter stops waiting; True if its turn had come meanwhile (it holds
        it now and must `leave`)."""
        with self._lock:
            if turn.given:
                return True
            self._queue.remove(turn)
            return False

    def enter(self, timeout: float | None) -> bool:
        """Wait for a turn (a thread); False if `timeout` seconds passed first."""
        turn = self._park(None)
        if turn is None:
            return True
        assert turn.event is not None
        try:
            turn.event.wait(timeout)
        except BaseException:  # interrupted: a turn that came meanwhile is passed on
            if self._gave_up(turn):
                self.leave()
            raise
        return turn.given or self._gave_up(turn)

    async def aenter(self, timeout: float | None) -> bool:
        """Wait for a turn (a task); False on timeout. Cancellation hands a turn that
        came meanwhile on, so it is never lost."""
        turn = self._park(asyncio.get_running_loop())
        if turn is None:
            return True
        assert turn.future is not None and turn.loop is not None
        timer = None if timeout is None else turn.loop.call_later(timeout, _resolve, turn.future)
        try:
            await turn.future
        except BaseException:
            if self._gave_up(turn):
                self.leave()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return turn.given or self._gave_up(turn)

    def leave(self) -> None:
        """Give the turn back: to the oldest parked waiter, if any."""
        with self._lock:
            while self._queue:
                turn = self._queue.popleft()
                turn.given = True
                if turn.wake():
                    return
            self.holders -= 1
