"""Backoff schedules and the retry budget: pure arithmetic, no I/O, no sleeping.

Jitter modes follow AWS's "Exponential Backoff and Jitter" study: *full* (the
default: uniform in [0, capped exponential], which did the least total work),
*equal* (half fixed, half random), *decorrelated* (random walk between the initial
delay and 3x the previous delay) and *none* (the plain capped exponential).
"""

from __future__ import annotations

import math
import random
import threading
from typing import Literal

from . import _validate as _v
from ._counter import AtomicCounter
from .clock import Clock, get_clock

__all__ = ["JITTER_MODES", "JitterMode", "RetryBudget", "compute_delay", "normalize_jitter"]

JitterMode = Literal["full", "equal", "decorrelated", "none"]
JITTER_MODES: tuple[str, ...] = ("full", "equal", "decorrelated", "none")


def normalize_jitter(jitter: bool | str) -> JitterMode:
    """`True` means "full", `False` means "none"; strings must be a known mode."""
    if jitter is True:
        return "full"
    if jitter is False:
        return "none"
    if isinstance(jitter, str) and jitter in JITTER_MODES:
        return jitter  # type: ignore[return-value]
    raise ValueError(f"jitter must be True, False or one of {JITTER_MODES}, got {jitter!r}")


def compute_delay(
    retry_number: int,
    *,
    initial_delay: float,
    max_delay: float,
    exponential_base: float,
    jitter: JitterMode,
    previous_delay: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Delay before retry number `retry_number` (1 for the first retry), in [0, max_delay]."""
    rand = rng.random if rng is not None else random.random
    if jitter == "decorrelated":
        prev = previous_delay if previous_delay else initial_delay
        upper = min(max_delay, max(initial_delay, prev * 3.0))
        low = min(initial_delay, upper)
        return low + (upper - low) * rand()
    try:
        ceiling = initial_delay * exponential_base ** (retry_number - 1)
    except OverflowError:
        ceiling = max_delay
    ceiling = min(max_delay, ceiling)
    if jitter == "full":
        return ceiling * rand()
    if jitter == "equal":
        return ceiling / 2.0 + (ceiling / 2.0) * rand()
    return ceiling


class RetryBudget:
    """Caps retries at a fraction of requests over a sliding window (Finagle/Envoy style).

    During an outage every request fails; unbounded retries would multiply the load
    on a struggling upstream by (1 + max_retries). With a budget, retries add at most
    `ratio` of the offered load plus `min_per_second` (so low-traffic callers still
    retry). Thread-safe; the window is split into 10 buckets.

    Every call records a request, so that path takes no lock: requests are one running
    count (`AtomicCounter`), and each bucket keeps the count at its first request; the
    window's requests are the count now minus the mark of its oldest bucket. Only the
    first request of a bucket, and retries (rare), take the lock.
    """

    __slots__ = (
        "_clock",
        "_edge",
        "_lock",
        "_marks",
        "_requests",
        "_retries",
        "_start",
        "bucket_s",
        "min_per_second",
        "ratio",
        "window",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 5.0,
        window: float = 10.0,
        *,
        clock: Clock | None = None,
    ) -> None:
        _v.in_range("ratio", ratio, 0, 10)
        _v.at_least("min_per_second", min_per_second, 0, unit="retries per second")
        _v.positive("window", window)
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self.bucket_s = window / 10.0
        self._clock = clock
        self._lock = threading.Lock()
        self._requests = AtomicCounter()
        # bucket index -> requests counted before its first request; -> retries spent in it
        self._marks: dict[int, int] = {}
        self._retries: dict[int, int] = {}
        # the current bucket, [start, edge) in monotonic seconds: requests inside it only count
        self._start, self._edge = math.inf, -math.inf

    def record_request(self, now: float | None = None) -> None:
        """Count one original (first-attempt) request. On every call: no lock, no division.

        `now` (monotonic, on this budget's clock) saves a clock read when the caller has it.
        A request racing the start of a bucket may be counted in either: the window is
        approximate at bucket edges by design.
        """
        if now is None:
            now = get_clock(self._clock).monotonic()
        if not self._start <= now < self._edge:
            self._mark(now)
        self._requests.add()

    def _mark(self, now: float) -> None:
        """A request outside the current bucket: the bucket it falls in becomes current,
        and the first request of a bucket remembers the count it starts from."""
        idx = int(now // self.bucket_s)
        with self._lock:
            if idx not in self._marks:
                self._marks[idx] = self._requests.value
                self._prune(idx)
            self._start, self._edge = idx * self.bucket_s, (idx + 1) * self.bucket_s

    def _prune(self, idx: int) -> int:
        """With the lock held: forget buckets that slid out; the window's oldest index."""
        oldest = idx - 9
        for marks in (self._marks, self._retries):
            for stale in [k for k in marks if k < oldest]:
                del marks[stale]
        return oldest

    def _now_index(self) -> int:
        return int(get_clock(self._clock).monotonic() // self.bucket_s)

    def _window(self, idx: int) -> tuple[int, int]:
        """With the lock held: (requests, retries) in the window ending in bucket `idx`."""
        oldest = self._prune(idx)
        first = min((k for k in self._marks if k >= oldest), default=None)
        requests = 0 if first is None else self._requests.value - self._marks[first]
        return requests, sum(self._retries.values())

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when the window's budget is spent."""
        with self._lock:
            idx = self._now_index()
            requests, retries = self._window(idx)
            if retries + 1 > self.ratio * requests + self.min_per_second * self.window:
                return False
            self._retries[idx] = self._retries.get(idx, 0) + 1
            return True

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            requests, retries = self._window(self._now_index())
        allowed = self.ratio * requests + self.min_per_second * self.window
        return {
            "requests": requests,
            "retries": retries,
            "allowed": allowed,
            "window_s": self.window,
        }

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"window={self.window})"
        )
