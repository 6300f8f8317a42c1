"""The call's deadline through nested policies, on a fake clock (issue 18, part 1).

The outermost policy opens the deadline; an inner policy with a longer one of its own keeps
the outer expiry for its retries and backoff, a call whose deadline is spent degrades at
once without an attempt, and the per-request timeout handed to sync SDK calls is what is
left. Real stalled servers are in test_deadline_end_to_end.py.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from rag_resilience import deadline
from rag_resilience.adapters import request_timeout, timed_call
from rag_resilience.errors import DeadlineExceededError, is_handled
from rag_resilience.fallback import GracefulFallbacks
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.retry import RetryStrategy
from rag_resilience.testing import FakeClock, fake_clock


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as clk:
        yield clk


def inner_policy(**kw: Any) -> ResiliencePolicy:
    retry = RetryStrategy(max_retries=10, initial_delay=1.0, jitter=False, retry_budget=None)
    return ResiliencePolicy(retry, fallbacks=GracefulFallbacks(), deadline=30.0, **kw)


def outer_policy(seconds: float = 3.0) -> ResiliencePolicy:
    return ResiliencePolicy(RetryStrategy(max_retries=0, retry_budget=None), deadline=seconds)


def test_inner_retries_stop_at_the_outer_deadline(clock: FakeClock) -> None:
    inner, outer = inner_policy(), outer_policy(3.0)
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("upstream reset")

    with pytest.raises(ConnectionError) as info:
        outer.call(inner.call, flaky)
    # Backoff 1 s, then the next wait (2 s) would pass the outer's 3 s: the inner's own
    # 30 s deadline would have slept 1 + 2 + 4 + 8 s.
    assert clock.sleeps == [1.0]
    assert calls == 2
    assert is_handled(info.value)
    assert any("deadline" in note for note in getattr(info.value, "__notes__", []))
    assert deadline.remaining() is None  # nothing leaks out of the call


async def test_inner_retries_stop_at_the_outer_deadline_async(clock: FakeClock) -> None:
    inner, outer = inner_policy(), outer_policy(3.0)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("upstream reset")

    async def through_inner() -> str:
        return await inner.acall(flaky)

    with pytest.raises(ConnectionError):
        await outer.acall(through_inner)
    assert clock.sleeps == [1.0] and calls == 2
    assert deadline.remaining() is None


def test_a_spent_deadline_degrades_at_once_for_threads_and_tasks(clock: FakeClock) -> None:
    """Callers whose enclosing deadline is spent get the inner's cached answer without
    an attempt (or its DeadlineExceededError when nothing is cached)."""
    inner = inner_policy()
    outer = outer_policy(2.0)
    attempts = 0
    lock = threading.Lock()

    def answer(q: str) -> str:
        nonlocal attempts
        with lock:
            attempts += 1
        return f"answer to {q}"

    for i in range(6):
        assert inner.call(answer, f"q{i}", key=f"q{i}") == f"answer to q{i}"
    warm = attempts

    def late(q: str, key: str) -> Any:
        clock.advance(5.0)  # the outer call's time is spent before the inner call starts
        return inner.run(answer, q, key=key)

    async def alate(q: str, key: str) -> Any:
        clock.advance(5.0)

        async def aanswer(q: str) -> str:
            return answer(q)

        return await inner.arun(aanswer, q, key=key)

    served: dict[str, Any] = {}

    def thread(i: int) -> None:
        served[f"t{i}"] = outer.call(late, f"q{i}", f"q{i}")

    async def tasks() -> None:
        async def one(i: int) -> None:
            served[f"a{i}"] = await outer.acall(alate, f"q{i}", f"q{i}")

        await asyncio.gather(*(one(i) for i in range(3, 6)))

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()

    assert attempts == warm  # no upstream call once the deadline was spent
    for name, value in served.items():
        i = int(name[1:])
        assert value.value == f"answer to q{i}" and value.source == "cache", name
        assert value.attempts == 0 and isinstance(value.error, DeadlineExceededError)
    assert inner.stats()["fallbacks_by_source"] == {"cache": 6}

    with pytest.raises(DeadlineExceededError) as info:  # nothing cached: the error itself
        outer.call(late, "new", "new")
    assert info.value.scope == "total" and is_handled(info.value)
    assert attempts == warm


def test_stream_deadline_bounds_its_attempts_and_does_not_leak(clock: FakeClock) -> None:
    policy = ResiliencePolicy(RetryStrategy(max_retries=0), deadline=4.0)
    seen: list[float | None] = []

    def items() -> Iterator[str]:
        seen.append(deadline.remaining())
        yield "a"
        seen.append(deadline.remaining())  # read in the consumer's context: none
        yield "b"

    out = []
    for item in policy.stream(items):
        out.append(item)
        assert deadline.remaining() is None
    assert out == ["a", "b"] and seen == [4.0, None]


async def test_async_stream_deadline_does_not_leak(clock: FakeClock) -> None:
    policy = ResiliencePolicy(RetryStrategy(max_retries=0), deadline=4.0)
    seen: list[float | None] = []

    async def items() -> Any:
        seen.append(deadline.remaining())
        yield "a"
        yield "b"

    out = [item async for item in policy.astream(items)]
    assert out == ["a", "b"] and seen == [4.0]
    assert deadline.remaining() is None


def test_request_timeout_is_what_the_deadline_leaves(clock: FakeClock) -> None:
    assert request_timeout(30.0) == 30.0 and request_timeout(None) is None
    custom = httpx.Timeout(5.0)
    with deadline.scope(2.0):
        clock.advance(0.5)
        assert request_timeout(30.0) == 1.5
        assert request_timeout(None) == 1.5  # a client with no timeout of ours
        assert request_timeout(1.0) == 1.0
        assert request_timeout(30.0, given=0.25) == 0.25  # the caller's shorter one
        assert request_timeout(30.0, given=custom) is custom  # the caller's own object
        got: dict[str, Any] = {}
        timed_call(lambda **kw: got.update(kw), 30.0)(timeout=10.0)
        assert got == {"timeout": 1.5}


def test_a_model_that_cannot_be_cut_at_the_deadline_is_warned_about_once() -> None:
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from rag_resilience.langchain import ResilientLLM
    from rag_resilience.langchain._common import NoTimeoutWarning, reset_warnings

    class TimedFake(FakeListChatModel):
        timeout: float | None = None  # a timeout setting, but no per-request timeout

    reset_warnings()
    with pytest.warns(NoTimeoutWarning, match="not at what the call's deadline"):
        ResilientLLM(TimedFake(responses=["hi"]), policy="balanced")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoTimeoutWarning)
        ResilientLLM(TimedFake(responses=["hi"]), policy="balanced")  # once per class
