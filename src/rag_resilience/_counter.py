"""A counter for hot paths: increments take no lock."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

__all__ = ["AtomicCounter"]


class AtomicCounter:
    """A counter without a lock on the increment: `next()` on `itertools.count` is a single
    C call, atomic under the GIL. Reading consumes a step, which `_reads` accounts for.

    `add()` is that C call itself (the count's bound `__next__`), not a method around it:
    it runs on every policy call, where a Python frame costs more than the increment."""

    __slots__ = ("_it", "_lock", "_reads", "add")

    def __init__(self) -> None:
        self._it = itertools.count()
        self._reads = 0
        self._lock = threading.Lock()
        self.add: Callable[[], object] = self._it.__next__

    @property
    def value(self) -> int:
        with self._lock:
            value = next(self._it) - self._reads
            self._reads += 1
            return value
