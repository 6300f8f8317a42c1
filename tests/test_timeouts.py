"""Async attempt timeouts served by one watchdog timer per event loop.

These run on the real event loop with timeouts of a few milliseconds: what is under test
is the loop's own timer machinery, which an injected clock would bypass.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from rag_resilience import timeouts
from rag_resilience.errors import DeadlineExceededError
from rag_resilience.timeouts import _watchdog, run_with_timeout


async def _hang() -> None:
    await asyncio.Event().wait()


async def test_an_attempt_past_its_timeout_is_cancelled_and_reported() -> None:
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(DeadlineExceededError) as info:
        await run_with_timeout(slow(), 0.005)
    assert info.value.scope == "attempt" and info.value.timeout == 0.005
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert cancelled.is_set()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # our cancellation was taken back


async def test_results_and_errors_pass_through_and_leave_nothing_watched() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def boom() -> None:
        raise ValueError("the attempt's own error")

    assert await run_with_timeout(answer(), 5.0) == 42
    with pytest.raises(ValueError, match="own error"):
        await run_with_timeout(boom(), 5.0)
    assert not _watchdog(asyncio.get_running_loop()).watches


async def test_the_attempts_own_timeout_error_is_not_ours() -> None:
    async def own_timeout() -> None:
        raise TimeoutError("upstream read timeout")

    with pytest.raises(TimeoutError, match="upstream read timeout") as info:
        await run_with_timeout(own_timeout(), 5.0)
    assert not isinstance(info.value, DeadlineExceededError)


async def test_no_time_left_never_starts_the_attempt() -> None:
    started = False

    async def attempt() -> None:
        nonlocal started
        started = True

    with pytest.raises(DeadlineExceededError):
        await run_with_timeout(attempt(), 0.0)
    assert not started


async def test_someone_elses_cancellation_wins() -> None:
    task = asyncio.create_task(run_with_timeout(_hang(), 5.0))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _watchdog(asyncio.get_running_loop()).watches


async def test_an_earlier_deadline_registered_later_still_fires_first() -> None:
    """One timer is armed for the long deadline; a shorter one must arm an earlier timer."""
    loop = asyncio.get_running_loop()
    long = asyncio.create_task(run_with_timeout(_hang(), 30.0))
    await asyncio.sleep(0)
    started = loop.time()
    with pytest.raises(DeadlineExceededError):
        await run_with_timeout(_hang(), 0.01)
    assert loop.time() - started < 5.0
    assert not long.done()
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long


async def test_many_concurrent_attempts_each_expire_on_their_own_deadline() -> None:
    async def attempt(timeout: float, work: float) -> str:
        async def body() -> str:
            await asyncio.sleep(work)
            return "done"

        try:
            return await run_with_timeout(body(), timeout)
        except DeadlineExceededError:
            return "timed out"

    # Timeouts 4..40 ms, in shuffled order; half finish well inside theirs, half hang.
    cases = [((i * 7) % 10 + 1) * 0.004 for i in range(40)]
    results = await asyncio.gather(
        *(attempt(t, 0.0 if i % 2 else 60.0) for i, t in enumerate(cases))
    )
    assert results == ["timed out" if i % 2 == 0 else "done" for i in range(40)]
    assert not _watchdog(asyncio.get_running_loop()).watches


async def test_a_timer_run_early_within_clock_resolution_still_expires_its_attempt() -> None:
    """The loop runs timers up to its clock resolution early: due means due by the timer."""
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(run_with_timeout(_hang(), 100.0))
    await asyncio.sleep(0)
    dog = _watchdog(loop)
    (watch,) = dog.watches
    dog._fire(watch.deadline)  # as the loop would, slightly before the deadline
    with pytest.raises(DeadlineExceededError):
        await task


async def test_nested_timeouts_each_report_their_own_scope() -> None:
    inner_first = run_with_timeout(run_with_timeout(_hang(), 0.005), 5.0)
    with pytest.raises(DeadlineExceededError) as info:
        await inner_first
    assert info.value.timeout == 0.005

    outer_first = run_with_timeout(run_with_timeout(_hang(), 5.0), 0.005)
    with pytest.raises(DeadlineExceededError) as info:
        await outer_first
    assert info.value.timeout == 0.005
    assert not _watchdog(asyncio.get_running_loop()).watches


async def test_an_attempt_that_swallows_the_cancellation_leaves_the_task_clean() -> None:
    async def stubborn() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "swallowed"
        return "unreachable"

    assert await run_with_timeout(stubborn(), 0.005) == "swallowed"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no stray cancellation left pending on this task


def test_the_registry_does_not_keep_a_finished_loop_alive() -> None:
    async def main() -> weakref.ref[asyncio.AbstractEventLoop]:
        await run_with_timeout(asyncio.sleep(0), 30.0)  # leaves a 30 s timer pending
        return weakref.ref(asyncio.get_running_loop())

    loop_ref = asyncio.run(main())
    gc.collect()
    assert loop_ref() is None


async def test_a_loop_without_weak_references_falls_back_to_asyncio_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Unreferenceable:
        def get(self, loop: object) -> None:
            raise TypeError("cannot create weak reference to 'Loop' object")

    monkeypatch.setattr(timeouts, "_watchdogs", Unreferenceable())
    assert await run_with_timeout(asyncio.sleep(0, result="ok"), 5.0) == "ok"
    with pytest.raises(DeadlineExceededError) as info:
        await run_with_timeout(_hang(), 0.005)
    assert info.value.scope == "attempt"

    async def own_timeout() -> None:
        raise TimeoutError("upstream read timeout")

    with pytest.raises(TimeoutError, match="upstream") as own:
        await run_with_timeout(own_timeout(), 5.0)
    assert not isinstance(own.value, DeadlineExceededError)
