"""A counter for hot paths: increments take no lock."""

from __future__ import annotations

import itertools
import threading

__all__ = ["AtomicCounter"]


class AtomicCounter:
    """A counter without a lock on the increment: `next()` on `itertools.count` is a single
    C call, atomic under the GIL. Reading consumes a step, which `_reads` accounts for."""

    __slots__ = ("_it", "_lock", "_reads")

    def __init__(self) -> None:
        self._it = itertools.count()
        self._reads = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        next(self._it)

    @property
    def value(self) -> int:
        with self._lock:
            value = next(self._it) - self._reads
            self._reads += 1
            return value
