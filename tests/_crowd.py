"""A crowd of threads and asyncio tasks calling through shared state until told to stop.

The store fault tests (test_store_faults, test_store_stall, test_store_pool) all need the
same thing: callers of both kinds at once, every error kept, a per-call record (what the
call paid, set in a ContextVar by `start_call`) and a count of calls that succeeded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any


class Crowd:
    """`threads` threads run `sync_call()` and `tasks` tasks await `async_call()`, each in
    a loop until `finish()`. `start_call()` runs before each call (in the caller's own
    context) and its return value is appended to `calls` once the call ends."""

    def __init__(
        self,
        sync_call: Callable[[], Any],
        async_call: Callable[[], Awaitable[Any]],
        *,
        threads: int,
        tasks: int,
        start_call: Callable[[], Any] = lambda: None,
    ) -> None:
        self.sync_call, self.async_call = sync_call, async_call
        self.n_threads, self.n_tasks = threads, tasks
        self.start_call = start_call
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.calls: list[Any] = []
        self.done = 0  # calls that returned
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _ended(self, record: Any, error: BaseException | None) -> None:
        with self._lock:
            self.calls.append(record)
            if error is None:
                self.done += 1
            else:
                self.errors.append(error)

    def _thread(self) -> None:
        while not self.stop.is_set():
            record = self.start_call()
            try:
                self.sync_call()
            except BaseException as exc:
                self._ended(record, exc)
            else:
                self._ended(record, None)

    async def _task(self) -> None:
        while not self.stop.is_set():
            record = self.start_call()
            try:
                await self.async_call()
            except BaseException as exc:
                self._ended(record, exc)
            else:
                self._ended(record, None)

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._thread) for _ in range(self.n_threads)]
        for t in self._threads:
            t.start()
        self._tasks = [asyncio.create_task(self._task()) for _ in range(self.n_tasks)]

    async def finish(self) -> None:
        """Stop every caller and wait until each has returned."""
        self.stop.set()
        await asyncio.gather(*self._tasks)
        await asyncio.to_thread(lambda: [t.join() for t in self._threads])
