"""Backoff schedules and the retry budget: pure arithmetic, no I/O, no sleeping.

Jitter modes follow AWS's "Exponential Backoff and Jitter" study: *full* (the
default: uniform in [0, capped exponential], which did the least total work),
*equal* (half fixed, half random), *decorrelated* (random walk between the initial
delay and 3x the previous delay) and *none* (the plain capped exponential).
"""

from __future__ import annotations

import random
import threading
from typing import Literal

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
    """

    __slots__ = ("_buckets", "_clock", "_lock", "bucket_s", "min_per_second", "ratio", "window")

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 5.0,
        window: float = 10.0,
        *,
        clock: Clock | None = None,
    ) -> None:
        if not 0.0 <= ratio <= 10.0:
            raise ValueError(f"ratio must be in [0, 10], got {ratio}")
        if min_per_second < 0:
            raise ValueError(f"min_per_second must be >= 0, got {min_per_second}")
        if window <= 0:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self.bucket_s = window / 10.0
        self._clock = clock
        self._lock = threading.Lock()
        # bucket index -> [requests, retries]
        self._buckets: dict[int, list[int]] = {}

    def _bucket(self) -> list[int]:
        idx = int(get_clock(self._clock).monotonic() // self.bucket_s)
        bucket = self._buckets.get(idx)
        if bucket is None:
            oldest = idx - 9
            for stale in [k for k in self._buckets if k < oldest]:
                del self._buckets[stale]
            bucket = self._buckets[idx] = [0, 0]
        return bucket

    def record_request(self, now: float | None = None) -> None:
        """Count one original (first-attempt) request. On every call: kept lean.

        `now` (monotonic, on this budget's clock) saves a clock read when the caller has it.
        """
        if now is None:
            now = get_clock(self._clock).monotonic()
        idx = int(now // self.bucket_s)
        with self._lock:
            bucket = self._buckets.get(idx)
            if bucket is None:
                bucket = self._bucket()
            bucket[0] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when the window's budget is spent."""
        with self._lock:
            bucket = self._bucket()
            requests = sum(b[0] for b in self._buckets.values())
            retries = sum(b[1] for b in self._buckets.values())
            if retries + 1 > self.ratio * requests + self.min_per_second * self.window:
                return False
            bucket[1] += 1
            return True

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            self._bucket()
            requests = sum(b[0] for b in self._buckets.values())
            retries = sum(b[1] for b in self._buckets.values())
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
