"""Slow start: after a circuit closes, admitted concurrency ramps up instead of releasing
the whole backlog on a recovering upstream at once.

The ramp starts at `initial` calls in flight (the probe count) and grows by one per call
that completes, which doubles it every round trip (as TCP's slow start does), up to
`limit` (the policy's `max_concurrency`). Callers beyond the ramp wait for a ramped call to
end (bounded by the breaker's wait budget and their deadline). Once the ramp reaches
`limit` it switches itself off: from then on it costs nothing (the breaker is quiet again).

The ramp is per process: with a shared breaker each process ramps its own admissions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .probewait import Signal

__all__ = ["SlowStart"]


class SlowStart:
    """A ramp of admitted concurrency after closing. `begin()` starts it; `try_take()` /
    `give()` bracket each ramped call; waiters wait on `signal`."""

    def __init__(self, limit: int, initial: int = 1) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"slow start limit must be an integer >= 1, got {limit!r}")
        if isinstance(initial, bool) or not isinstance(initial, int) or initial < 1:
            raise ValueError(f"slow start initial must be an integer >= 1, got {initial!r}")
        self.limit = limit
        self.initial = min(initial, limit)
        self.signal = Signal()
        self.active = False
        self.on_done: Callable[[], None] | None = None  # told when the ramp switches off
        self._lock = threading.Lock()
        self._cap = limit
        self._in_flight = 0
        self.ramps = 0  # ramps started
        self.peak_in_flight = 0  # the most ramped calls in flight at once, over every ramp

    @property
    def cap(self) -> int:
        """Calls admitted at once right now (`limit` when no ramp is on)."""
        return self._cap if self.active else self.limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def begin(self) -> None:
        """The circuit just closed: admit `initial` calls, then ramp."""
        if self.initial >= self.limit:
            return
        with self._lock:
            self.active = True
            self._cap = self.initial
            self.ramps += 1

    def try_take(self) -> bool | None:
        """Take a ramp slot: True, False (ramp full: wait), None (no ramp on)."""
        if not self.active:
            return None
        with self._lock:
            if not self.active:
                return None
            if self._in_flight >= self._cap:
                return False
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            return True

    def give(self) -> None:
        """A ramped call ended: its slot frees and the ramp grows by one."""
        done = False
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if self.active:
                self._cap += 1
                if self._cap >= self.limit:
                    self.active = False
                    done = True
        # the freed slot plus the new one; everyone when the ramp is over
        self.signal.publish(None if done else 2)
        if done and self.on_done is not None:
            self.on_done()

    def stop(self) -> None:
        """The circuit opened again (or was reset): no ramp; waiters re-check at once."""
        with self._lock:
            was = self.active
            self.active = False
        if was:
            self.signal.publish()
            if self.on_done is not None:
                self.on_done()

    def stats(self) -> dict[str, int | bool]:
        return {
            "active": self.active,
            "cap": self.cap,
            "in_flight": self._in_flight,
            "ramps": self.ramps,
            "peak_in_flight": self.peak_in_flight,
        }
