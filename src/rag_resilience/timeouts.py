"""Per-attempt timeouts for async attempts, with one timer per event loop.

`asyncio.timeout` schedules and cancels a timer handle for every attempt (a context copy,
a heap push, a lazily purged cancelled entry): about as much as the rest of the policy
together on the success path. Attempt timeouts are long (seconds) and nearly every attempt
ends well before its own, so a per-loop watchdog keeps one timer at the earliest deadline
it knows of: registering an attempt is a dict insert, and a new timer is only needed when
a deadline comes earlier than the pending one. The cancellation semantics are
`asyncio.timeout`'s: the attempt's task is cancelled, the cancellation is taken back with
`Task.uncancel()`, and only a cancellation we caused becomes a `DeadlineExceededError`.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
import weakref
from collections.abc import Awaitable
from typing import Any, TypeVar

from .errors import DeadlineExceededError

__all__ = ["run_with_timeout"]

T = TypeVar("T")


class _Watch:
    """One attempt under watch: its task and its loop-clock deadline."""

    __slots__ = ("deadline", "expired", "task")

    def __init__(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.expired = False


class _Watchdog:
    """All attempt timeouts of one event loop, served by as few timers as possible.

    It keeps no reference to its loop, not even through a timer handle (the registry's
    weak key would never die): a timer is never cancelled, only superseded when an
    earlier deadline arrives; a superseded timer fires later, finds nothing due, and
    re-arms nothing that is already covered.
    """

    __slots__ = ("timer_at", "watches")

    def __init__(self) -> None:
        self.watches: dict[_Watch, None] = {}
        self.timer_at = math.inf  # when the earliest pending timer fires

    def watch(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], deadline: float
    ) -> _Watch:
        watch = _Watch(task, deadline)
        self.watches[watch] = None
        if deadline < self.timer_at:
            self.timer_at = deadline
            loop.call_at(deadline, self._fire, deadline)
        return watch

    def unwatch(self, watch: _Watch) -> None:
        self.watches.pop(watch, None)

    def _fire(self, when: float) -> None:
        if when == self.timer_at:
            self.timer_at = math.inf  # the earliest pending timer was this one
        loop = asyncio.get_running_loop()
        # The loop runs a timer up to its clock resolution early: due means due by `when`.
        now = max(loop.time(), when)
        earliest = math.inf
        for watch in list(self.watches):
            if watch.deadline <= now:
                del self.watches[watch]
                watch.expired = True
                watch.task.cancel()
            elif watch.deadline < earliest:
                earliest = watch.deadline
        if earliest < self.timer_at:
            self.timer_at = earliest
            loop.call_at(earliest, self._fire, earliest)


_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog] = (
    weakref.WeakKeyDictionary()
)


def _watchdog(loop: asyncio.AbstractEventLoop) -> _Watchdog | None:
    """The loop's watchdog; None for a loop that cannot be weakly referenced."""
    try:
        dog = _watchdogs.get(loop)
        if dog is None:
            dog = _watchdogs[loop] = _Watchdog()
    except TypeError:
        return None
    return dog


async def run_with_timeout(awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await with a per-attempt timeout that raises DeadlineExceededError(scope="attempt")."""
    if timeout is None:
        return await awaitable
    if timeout <= 0:  # never start an attempt that has no time left
        if inspect.iscoroutine(awaitable):
            awaitable.close()
        raise _attempt_timed_out(0.0)
    task = asyncio.current_task()
    if sys.version_info < (3, 11) or task is None:  # pragma: no cover - no Task.uncancel
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError as exc:
            raise _attempt_timed_out(timeout) from exc
    loop = task.get_loop()
    dog = _watchdog(loop)
    if dog is None:
        return await _with_asyncio_timeout(awaitable, timeout)
    cancelling = task.cancelling()
    watch = dog.watch(loop, task, loop.time() + timeout)
    try:
        return await awaitable
    except asyncio.CancelledError as exc:
        if watch.expired:
            watch.expired = False  # taken back here, not again below
            if task.uncancel() <= cancelling:
                raise _attempt_timed_out(timeout) from exc
        raise  # someone else cancelled the task as well: theirs wins
    finally:
        if watch.expired:  # the attempt swallowed our cancellation: take it back anyway
            task.uncancel()
        else:
            dog.unwatch(watch)


async def _with_asyncio_timeout(awaitable: Awaitable[T], timeout: float) -> T:
    """The same contract through `asyncio.timeout` (a timer per attempt)."""
    cm = asyncio.timeout(timeout)  # type: ignore[attr-defined,unused-ignore]
    try:
        async with cm:
            return await awaitable
    except TimeoutError as exc:
        if not cm.expired():
            raise  # the attempt's own timeout error, not ours
        raise _attempt_timed_out(timeout) from exc


def _attempt_timed_out(timeout: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"attempt timed out after {timeout:.3f}s", timeout=timeout, scope="attempt"
    )
