"""The deadline context: nested scopes only shorten, threads and tasks each see their own."""

from __future__ import annotations

import asyncio
import threading

from rag_resilience import deadline
from rag_resilience.testing import fake_clock


def test_no_scope_means_no_deadline() -> None:
    assert deadline.remaining() is None
    assert deadline.bound(5.0) == 5.0
    assert deadline.bound(None) is None


def test_nested_scopes_only_shorten() -> None:
    with fake_clock() as clock:
        with deadline.scope(3.0, clock):
            clock.advance(1.0)
            assert deadline.remaining() == 2.0
            with deadline.scope(10.0, clock):  # longer: keeps the outer expiry
                assert deadline.remaining() == 2.0
                assert deadline.bound(30.0) == 2.0
            with deadline.scope(0.5, clock):  # shorter: wins inside
                assert deadline.remaining() == 0.5
            with deadline.scope(None, clock):
                assert deadline.remaining() == 2.0
            clock.advance(5.0)
            assert deadline.remaining() == 0.0
        assert deadline.remaining() is None


def test_threads_and_tasks_each_see_their_own_scope() -> None:
    seen: dict[str, float | None] = {}

    def worker(name: str, seconds: float) -> None:
        with deadline.scope(seconds):
            seen[name] = deadline.bound(1000.0)

    async def task(name: str, seconds: float) -> None:
        with deadline.scope(seconds):
            await asyncio.sleep(0)
            seen[name] = deadline.bound(1000.0)

    async def crowd() -> None:
        await asyncio.gather(*(task(f"task{i}", 100.0 + i) for i in range(20)))

    threads = [threading.Thread(target=worker, args=(f"thread{i}", 200.0 + i)) for i in range(8)]
    for t in threads:
        t.start()
    asyncio.run(crowd())
    for t in threads:
        t.join()
    for i in range(20):
        value = seen[f"task{i}"]
        assert value is not None and 100.0 + i - 5 < value <= 100.0 + i
    for i in range(8):
        value = seen[f"thread{i}"]
        assert value is not None and 200.0 + i - 5 < value <= 200.0 + i
    assert deadline.remaining() is None
