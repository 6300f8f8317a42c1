"""The two pieces of arithmetic a pacer is made of: a GCRA bucket (a theoretical arrival
time, an interval per unit, a capacity) and the bounds a server's rate-limit reports put on
its refill rate. Pure state, no locking: `ratelimit.Pacer` holds them under its lock."""

from __future__ import annotations

import collections

from .ratelimit_headers import BucketInfo

__all__ = ["Bucket", "RateEstimate"]

_SAMPLES = 16  # responses the rate estimate remembers


class Bucket:
    """GCRA state: `interval` seconds per unit, `capacity` units of burst, `tat` the
    theoretical arrival time (the bucket is full when ``tat <= now``)."""

    __slots__ = ("capacity", "interval", "tat")

    def __init__(self, interval: float, capacity: float, tat: float) -> None:
        self.interval = interval
        self.capacity = capacity
        self.tat = tat

    def allowed_at(self, now: float, cost: float) -> float:
        return max(self.tat, now) + (cost - self.capacity) * self.interval

    def take(self, at: float, cost: float) -> None:
        self.tat = max(self.tat, at) + cost * self.interval

    def available(self, now: float) -> float:
        if self.interval <= 0:
            return self.capacity
        return min(self.capacity, max(0.0, self.capacity - (self.tat - now) / self.interval))

    def lower_to(self, now: float, units: float) -> None:
        """Never believe more is available than `units` (what the server says is left)."""
        units = max(0.0, min(units, self.capacity))
        self.tat = max(self.tat, now + (self.capacity - units) * self.interval)

    def block_until(self, when: float) -> None:
        """Admit nothing before `when` (a Retry-After), then pace as usual."""
        self.tat = max(self.tat, when + (self.capacity - 1.0) * self.interval)


class RateEstimate:
    """Bounds on a server bucket's refill rate from its recent reports. Reports taken
    with the bucket nearly full bound the rate only from above; they do not push the
    informative ones (a lower bound > 0) out of the window."""

    __slots__ = ("highs", "limit", "lows")

    def __init__(self) -> None:
        self.lows: collections.deque[float] = collections.deque(maxlen=_SAMPLES)
        self.highs: collections.deque[float] = collections.deque(maxlen=_SAMPLES)
        self.limit: float | None = None

    def add(self, info: BucketInfo) -> None:
        if info.limit is not None and info.limit > 0:
            if self.limit is not None and info.limit != self.limit:
                self.clear()  # the limit changed: old reports say nothing now
            self.limit = info.limit
        limit, remaining, reset, age = self.limit, info.remaining, info.reset, info.age
        if limit is None or remaining is None or reset is None or reset + age <= 0:
            return
        used = limit - remaining
        if used <= 0:
            return
        # Resets are rounded or truncated (to the millisecond, or the second): widen
        # the bounds by the largest error that leaves. An absolute reset read `age` s
        # after it may have been stamped is longer by up to `age`: only the lower bound
        # moves. A reset within its own error says nothing about the upper bound (taking
        # the error as the reset turned a stale answer into "1 per 15 s": issue 16).
        res = info.resolution
        lo = max(0.0, used - 1.0) / (reset + res + age)
        hi = used / (reset - res) if reset > 2.0 * res else None
        if (hi is not None and self.lows and hi < max(self.lows) * 0.95) or (
            self.highs and lo > min(self.highs) * 1.05
        ):
            self.clear()  # inconsistent with what we knew: the rate moved
        if lo > 0 and (not self.lows or lo >= 0.5 * max(self.lows)):
            # (a much looser bound, e.g. from a stale answer, would only push the
            # informative ones out of the window)
            self.lows.append(lo)
        if hi is not None:
            self.highs.append(hi)

    def clear(self) -> None:
        self.lows.clear()
        self.highs.clear()

    def upper(self) -> float | None:
        """The tightest upper bound on the rate reported so far (None: none)."""
        return min(self.highs) if self.highs else None

    def rate(self) -> float | None:
        """The middle of the tightest bounds [max lower, min upper] of the recent reports
        (None: nothing known yet). The lower bound alone would settle below the real rate:
        paced below it, the server's bucket stays full and its reports stop bounding the
        rate from below; `safety` and the remaining-count sync keep the middle safe."""
        if not self.highs:
            # a lower bound alone (every report's reset within its error): 10 % above it
            return max(self.lows) * 1.1 if self.lows else None
        hi = min(self.highs)
        if not self.lows:
            return hi
        lo = max(self.lows)
        # the middle, but never more than 10 % above what is proven (a loose upper bound,
        # e.g. from a reset of uncertain age, says little)
        return min(lo + 0.5 * max(0.0, hi - lo), lo * 1.1)
