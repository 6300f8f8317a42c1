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
    informative ones (a lower bound > 0) out of the window.

    Relative resets ("25ms") bound the rate from each report alone. Absolute resets
    (RFC 3339) are read on our wall clock, not the server's: a constant offset between
    the two would bias every such bound, either way. What an offset cannot touch is the
    *difference* of two absolute resets: the server's bucket is full at its reset time
    (a GCRA "theoretical arrival time"), and each admitted request moves that time by at
    least one interval, so two admitted requests' resets are at least 1/rate apart. That
    holds for a bucket of requests (`unit_cost`: each costs one); a token bucket's
    requests cost what they cost, so its absolute resets are read one by one."""

    __slots__ = ("headroom", "highs", "limit", "lows", "marks", "unit_cost")

    def __init__(self, unit_cost: bool = False) -> None:
        self.unit_cost = unit_cost
        self.lows: collections.deque[float] = collections.deque(maxlen=_SAMPLES)
        self.highs: collections.deque[float] = collections.deque(maxlen=_SAMPLES)
        #: absolute reset times (POSIX, on the server's clock) of admitted requests
        self.marks: collections.deque[float] = collections.deque(maxlen=_SAMPLES)
        self.limit: float | None = None
        #: the share of the server's bucket free in the last report (see `rate`)
        self.headroom = 1.0

    def add(self, info: BucketInfo, admitted: bool = True) -> None:
        """Learn from one report; `admitted`: the request it answers was admitted (not
        refused with a 429)."""
        if info.limit is not None and info.limit > 0:
            if self.limit is not None and info.limit != self.limit:
                self.clear()  # the limit changed: old reports say nothing now
            self.limit = info.limit
        limit, remaining, reset, age = self.limit, info.remaining, info.reset, info.age
        if limit is not None and remaining is not None:
            self.headroom = min(1.0, remaining / limit)
        if info.reset_at is not None and self.unit_cost:
            # (a bucket reported full says nothing: its reset is the report's own time)
            if admitted and limit is not None and remaining is not None and remaining < limit:
                self._add_mark(info.reset_at, info.resolution)
            return
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
        self.add_low(lo)
        if hi is not None:
            self.highs.append(hi)

    def _add_mark(self, mark: float, resolution: float) -> None:
        # k admitted requests' distinct resets span at least (k - 1) intervals (each is
        # truncated, early by less than `resolution`): the widest span says the most. An
        # equal reset is taken for the same request reported twice.
        if mark in self.marks:
            return
        self.marks.append(mark)
        ordered = sorted(self.marks)
        at = ordered.index(mark)
        best = 0.0
        for i, other in enumerate(ordered):
            if i != at:
                best = max(best, abs(i - at) / (abs(mark - other) + resolution))
        self.add_low(best)

    def add_low(self, lo: float) -> None:
        """Learn a lower bound on the rate proven otherwise (`Pacer`: by throughput)."""
        if lo > 0 and (not self.lows or lo >= 0.5 * max(self.lows)):
            # (a much looser bound, e.g. from a stale answer, would only push the
            # informative ones out of the window)
            self.lows.append(lo)

    def clear(self) -> None:
        self.lows.clear()
        self.highs.clear()
        self.marks.clear()
        self.headroom = 1.0

    def upper(self) -> float | None:
        """The tightest upper bound on the rate reported so far (None: none)."""
        return min(self.highs) if self.highs else None

    def rate(self) -> float | None:
        """The middle of the tightest bounds [max lower, min upper] of the recent reports
        (None: nothing known yet), never more than 10 % above the lower bound (a loose
        upper bound, e.g. from a stale answer, says little), less as the server's bucket
        empties. The lower bound alone
        would settle below the real rate: paced below it, the server's bucket stays full
        and its reports stop bounding the rate from below (a bucket of 5 proves about
        4/5 of its rate that way: issue 16's crowd stuck at 29.5/s of 40); `Pacer` then
        adds what the throughput it was granted proves. `safety` and the remaining-count
        sync keep the middle safe."""
        if not self.highs:
            # A lower bound alone (every report's reset within its error, or absolute
            # resets): up to 10 % above it, as much as the server's bucket has room (so
            # paced faster, the next reports raise it), at it when the bucket is empty.
            return max(self.lows) * (1.0 + 0.1 * self.headroom) if self.lows else None
        hi = min(self.highs)
        if not self.lows:
            return hi
        lo = max(self.lows)
        # (up to 10 % above the lower bound as the server reports room: a lower bound
        # proven by what we sent is tight once we send at the rate, and the server's
        # bucket then empties)
        return min(lo + 0.5 * max(0.0, hi - lo), lo * (1.0 + 0.1 * self.headroom))
