"""AskGate: how many of a process's distributed waiters ask the store at once."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from rag_resilience._askgate import AskGate


async def test_turns_pass_in_arrival_order_between_threads_and_tasks() -> None:
    gate = AskGate(1)
    assert gate.enter(None)  # the one turn
    order: list[str] = []

    async def task(name: str) -> None:
        assert await gate.aenter(None)
        order.append(name)
        gate.leave()

    first = asyncio.create_task(task("task-1"))
    await asyncio.sleep(0)  # parked
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(gate.enter(None)))
    thread.start()
    while gate.waiting < 2:
        await asyncio.sleep(0.001)
    gate.leave()  # -> task-1 -> thread
    await first
    await asyncio.to_thread(thread.join)
    assert order == ["task-1"] and got == [True]
    gate.leave()
    assert (gate.holders, gate.waiting) == (0, 0)


async def test_a_timed_out_or_cancelled_waiter_loses_no_turn() -> None:
    gate = AskGate(1)
    assert gate.try_enter() and not gate.try_enter()
    assert gate.enter(0.0) is False  # timed out: not parked any more
    assert await gate.aenter(0.0) is False
    parked = asyncio.create_task(gate.aenter(None))
    await asyncio.sleep(0)
    assert gate.waiting == 1
    gate.leave()  # the turn goes to the parked task ...
    parked.cancel()  # ... which is cancelled before it runs: the turn is handed back
    with contextlib.suppress(asyncio.CancelledError):
        await parked
    assert (gate.holders, gate.waiting) == (0, 0)
    assert gate.try_enter()
