"""Pace calls to what the upstream's rate limit allows, *before* it answers 429.

One `Pacer` per upstream (base URL + model + a hash of the API key; see `upstream_key`)
holds up to two buckets in GCRA form (a "theoretical arrival time" per bucket): requests
and tokens. Their rates are learned from the wire (`RateLimiter.observe`: the
``x-ratelimit-*`` / ``anthropic-ratelimit-*`` headers of every response, success or
error), or told (`requests_per_second=`, `tokens_per_minute=`), or, when the upstream
says nothing but 429, found by AIMD: each 429 multiplies the allowed rate by
`aimd_decrease` (from what was being sent when the first one came), and it grows back
linearly (`aimd_increase` of the cut rate per second).

A call *reserves* its slot (one decision under a lock, the same for sync and async
callers), then sleeps until it: reservations are granted in arrival order (FIFO), so
callers woken by one Retry-After do not stampede. A call whose slot comes later than
its deadline allows (`rag_resilience.deadline`) is rejected at once with
`RateLimitedError`, without waiting and without spending attempts; so is a call that
finds `max_queue` callers already waiting.

Learning the rate: a server bucket of capacity L that reports R left and S seconds until
full refills at ``(L - R_exact) / S`` per second, with R_exact in [R, R + 1) since R is
rounded down (and S rounded to its resolution): each response bounds the rate. The pacer
keeps the tightest bounds of its last responses, adds the lower bound the throughput it
was granted proves (`Pacer._granted`: a bucket kept full proves little report by report),
and paces at their middle (at most 10 % above the lower bound, less as the server's
bucket empties); RFC 3339 resets, stamped on the server's clock, count only by their
differences. It paces at that times `safety`, never keeps more burst than half the server's
capacity (network jitter is absorbed by the server's bucket) and never believes more is
left than the server says. With a `RedisStore` the arrival times live in Redis
(`ratelimit_redis`), so every process pacing the same upstream shares them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import threading
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._counter import AtomicCounter
from .clock import Clock, get_clock
from .deadline import bound
from .errors import RateLimitedError
from .events import EventBus, EventKind
from .ratelimit_buckets import Bucket, RateEstimate
from .ratelimit_headers import BucketInfo, RateLimitInfo, parse_rate_limit_headers
from .ratelimit_redis import SharedBuckets

__all__ = [
    "PaceRequest",
    "Pacer",
    "RateLimiter",
    "Reservation",
    "current_reservation",
    "upstream_key",
]


class PaceRequest(NamedTuple):
    """What a call will spend, and where: the pacer's key and its estimated tokens."""

    upstream: str
    tokens: int = 0


def upstream_key(base_url: object, model: object, api_key: object = None) -> str:
    """The pacer key of an upstream: base URL + model + a blake2b hash of the API key
    (the key itself is never kept, logged or sent anywhere)."""
    secret = api_key
    getter = getattr(secret, "get_secret_value", None)  # pydantic SecretStr
    if callable(getter):
        secret = getter()
    digest = hashlib.blake2b(str(secret).encode(), digest_size=8).hexdigest() if secret else "-"
    base = str(base_url or "").rstrip("/")
    return f"{base}|{model or ''}|{digest}"


@dataclass(slots=True)
class Reservation:
    """A granted slot: which pacer, how many tokens it was charged. `observed` is set once
    the response (or error) has been learned from, so it is not learned twice."""

    pacer: Pacer
    tokens: int
    at: float = 0.0  # the slot (monotonic): the request went no earlier
    observed: bool = False
    #: the retry's slot, granted when this call's request met a 429: the first one at the
    #: server's Retry-After, ahead of callers who came later (see `Pacer.promise_retry`)
    retry_at: float | None = None


_logger = logging.getLogger("rag_resilience")

# Unpredicted 429s: once the limits are known, a pacer alone should see almost none. More
# than this share of its answers (after _SURPRISE_AFTER of them) means someone else spends
# the same limit: other processes pacing alone, most likely.
_SURPRISE_SHARE = 0.1
_SURPRISE_AFTER = 50

# answers the granted-throughput bound spans (`Pacer._granted`)
_GRANTED_WINDOW = 32

_current: ContextVar[Reservation | None] = ContextVar("rag_resilience_pace", default=None)


def current_reservation() -> Reservation | None:
    """The slot the current thread/task was last granted (response hooks read it)."""
    return _current.get()


def _widen(info: RateLimitInfo, seconds: float) -> RateLimitInfo:
    def widen(bucket: BucketInfo | None) -> BucketInfo | None:
        if bucket is None:
            return None
        return dataclasses.replace(bucket, age=bucket.age + seconds)

    return dataclasses.replace(info, requests=widen(info.requests), tokens=widen(info.tokens))


class Pacer:
    """The buckets of one upstream. All decisions are made under its lock; nobody sleeps
    holding it. Thread- and task-safe."""

    def __init__(self, limiter: RateLimiter, upstream: str, now: float) -> None:
        self.limiter = limiter
        self.upstream = upstream
        self._lock = threading.Lock()
        cfg = limiter
        self.requests: Bucket | None = None
        self.tokens: Bucket | None = None
        self.request_source: str | None = None
        self.token_source: str | None = None
        if cfg.requests_per_second is not None:
            self.requests = Bucket(1.0 / cfg.requests_per_second, cfg.burst, now)
            self.request_source = "configured"
        if cfg.tokens_per_second is not None:
            cap = cfg.token_burst if cfg.token_burst is not None else cfg.tokens_per_second
            self.tokens = Bucket(1.0 / cfg.tokens_per_second, cap, now)
            self.token_source = "configured"
        self._req_est = RateEstimate(unit_cost=True)
        # the last admitted requests' (slot, answer read at, remaining): see `_granted`
        self._granted_window: collections.deque[tuple[float, float, float]] = collections.deque(
            maxlen=_GRANTED_WINDOW
        )
        self._tok_est = RateEstimate()
        self._blocked_until = -math.inf
        self._aimd_rate: float | None = None
        self._aimd_at = 0.0
        self._aimd_quiet_until = -math.inf
        self._admitted: collections.deque[float] = collections.deque(maxlen=64)
        self.waiting = 0
        self._shared: SharedBuckets | None = None
        if limiter.store is not None:
            self._shared = SharedBuckets(limiter.store, upstream)
        # counters (read by stats())
        self._free = AtomicCounter()  # calls admitted on the lock-free path
        self._calls = 0
        self.paced = 0
        self.paced_seconds = 0.0
        self.rejected = 0
        self.throttled = 0
        self.surprises = 0  # 429s received while paced on known limits, without a store
        self.responses = 0

    # -- the decision --------------------------------------------------------------------
    @property
    def calls(self) -> int:
        return self._calls + self._free.value

    def reserve(
        self, now: float, tokens: int, max_wait: float | None, promised: float | None = None
    ) -> float:
        """Grant the next slot and return its time (monotonic), or raise
        `RateLimitedError` (nothing reserved) if it comes later than the call's deadline
        (`max_wait`, shortened by `rag_resilience.deadline`) or the wait queue is full.
        `promised`: the request slot this call already holds (a retry after a 429)."""
        if (
            self.requests is None
            and self.tokens is None
            and self._blocked_until <= now
            and self._shared is None
        ):
            # Nothing known about this upstream: admit at once, without the lock.
            self._free.add()
            self._admitted.append(now)  # deque.append is atomic
            return now
        if self._shared is not None:
            at = self._reserve_shared(now, tokens, max_wait)
            if at is not None:
                return at
        with self._lock:
            self._grow_aimd(now)
            at = self._blocked_until if self._blocked_until > now else now
            requests, token_bucket = self.requests, self.tokens
            if promised is not None:
                # its request slot was taken when the 429 was seen: keep that place
                at, requests = max(now, promised), None
            elif requests is not None:
                at = max(at, requests.allowed_at(now, 1.0))
            if token_bucket is not None and tokens > 0:
                at = max(at, token_bucket.allowed_at(now, float(tokens)))
            wait = at - now
            if wait > 0.0:
                max_wait = self.limiter._max_wait(bound(max_wait))
                if max_wait is not None and wait > max_wait:
                    self.rejected += 1
                    raise RateLimitedError(
                        f"rate limit of {self.upstream_label}: the next slot is in "
                        f"{wait:.3f}s, after the call's deadline ({max_wait:.3f}s left)",
                        upstream=self.upstream,
                        wait=wait,
                        max_wait=max_wait,
                        waiting=self.waiting,
                    )
                if self.waiting >= self.limiter.max_queue:
                    self.rejected += 1
                    raise RateLimitedError(
                        f"rate limit of {self.upstream_label}: {self.waiting} calls already "
                        f"wait for a slot (max_queue={self.limiter.max_queue})",
                        upstream=self.upstream,
                        max_wait=max_wait,
                        waiting=self.waiting,
                    )
                self.waiting += 1
                self.paced += 1
                self.paced_seconds += wait
            if requests is not None:
                requests.take(at, 1.0)
            if token_bucket is not None and tokens > 0:
                token_bucket.take(at, float(tokens))
            self._calls += 1
            self._admitted.append(at)
            return at

    def promise_retry(self, now: float) -> float | None:
        """The slot for the retry of a request that just met a 429, taken now (so callers
        who reserve while it sleeps through the Retry-After queue behind it): the first
        one the server's Retry-After allows. Without it the retry queued again after its
        sleep, behind everyone who came meanwhile, and on a crowd could meet 429 after
        429 until it ran out of attempts (issue 16). None: no local request bucket."""
        with self._lock:
            requests = self.requests
            if requests is None or self._shared is not None:
                return None
            at = max(now, self._blocked_until, requests.allowed_at(now, 1.0))
            requests.take(at, 1.0)
            return at

    def _reserve_shared(self, now: float, tokens: int, max_wait: float | None) -> float | None:
        """`reserve` on the buckets shared in Redis; None when Redis is unreachable."""
        assert self._shared is not None
        with self._lock:
            self._grow_aimd(now)
            if self.waiting >= self.limiter.max_queue:
                self.rejected += 1
                raise RateLimitedError(
                    f"rate limit of {self.upstream_label}: {self.waiting} calls already "
                    f"wait for a slot (max_queue={self.limiter.max_queue})",
                    upstream=self.upstream,
                    waiting=self.waiting,
                )
            req, tok = self.requests, self.tokens
            # no burst across processes: strict spacing, the server's bucket absorbs the
            # jitter of several network paths
            req_p = (req.interval, 1.0) if req is not None else None
            tok_p = (tok.interval, tok.capacity) if tok is not None and tokens > 0 else None
            not_before = self._blocked_until - now
        limit = self.limiter._max_wait(bound(max_wait))
        result = self._shared.reserve(req_p, tok_p, tokens, limit, not_before)
        if result is None:
            return None
        granted, wait = result
        with self._lock:
            if not granted:
                self.rejected += 1
                raise RateLimitedError(
                    f"rate limit of {self.upstream_label}: the next slot is in {wait:.3f}s, "
                    f"after the call's deadline ({limit or 0.0:.3f}s left)",
                    upstream=self.upstream,
                    wait=wait,
                    max_wait=limit,
                    waiting=self.waiting,
                )
            wait = max(0.0, wait)
            at = now + wait
            if wait > 0.0:
                self.waiting += 1
                self.paced += 1
                self.paced_seconds += wait
            # keep the local buckets close, for when Redis goes away
            if req is not None:
                req.take(at, 1.0)
            if tok is not None and tokens > 0:
                tok.take(at, float(tokens))
            self._calls += 1
            self._admitted.append(at)
        return at

    def done_waiting(self) -> None:
        with self._lock:
            self.waiting -= 1

    @property
    def upstream_label(self) -> str:
        base, _, rest = self.upstream.partition("|")
        model = rest.partition("|")[0]
        return f"{base or '?'} ({model or 'any model'})"

    # -- learning ------------------------------------------------------------------------
    def observe(
        self, info: RateLimitInfo, status: int | None, now: float, sent: float | None = None
    ) -> None:
        """Learn from one response's rate-limit headers and status; `sent`: its request's
        slot (it was sent no earlier)."""
        self._observe(info, status, now, sent)
        shared = self._shared
        if shared is None:
            return
        # what the response taught, applied to the buckets every process shares
        with self._lock:
            req, tok = self.requests, self.tokens
            adjust: list[tuple[int, float]] = []
            retry_after = info.retry_after if status == 429 else None
            if req is not None:  # shared request buckets have a capacity of 1
                if retry_after is not None and retry_after > 0:
                    adjust.append((0, min(retry_after, self.limiter.max_retry_after)))
                elif info.requests is not None and info.requests.remaining is not None:
                    left = min(info.requests.remaining, 1.0)
                    adjust.append((0, (1.0 - left) * req.interval))
            if tok is not None and info.tokens is not None and info.tokens.remaining is not None:
                left = min(info.tokens.remaining, tok.capacity)
                adjust.append((1, (tok.capacity - left) * tok.interval))
        for which, ahead in adjust:
            shared.adjust(which, "atleast", ahead)

    def _observe(
        self, info: RateLimitInfo, status: int | None, now: float, sent: float | None
    ) -> None:
        cfg = self.limiter
        with self._lock:
            self.responses += 1
            admitted = status != 429
            if info.requests is not None:
                self._req_est.add(info.requests, admitted)
                if (
                    admitted
                    and sent is not None
                    and info.requests.remaining is not None
                    and self._req_est.limit is not None  # (Azure: what is left only, AIMD)
                ):
                    self._granted(now, sent, info.requests.remaining)
                # On a 429 the Retry-After says exactly when the next request fits
                # (applied below); "0 remaining" would only delay it further.
                exact = status == 429 and info.retry_after is not None
                self.requests = self._learn(
                    self.requests, self._req_est, info.requests, now, 1.0, "requests", not exact
                )
            if info.tokens is not None:
                self._tok_est.add(info.tokens, admitted)
                self.tokens = self._learn(
                    self.tokens, self._tok_est, info.tokens, now, 0.0, "tokens", True
                )
            if status != 429:
                return
            self.throttled += 1
            if self._shared is None and (self.requests is not None or self.tokens is not None):
                self.surprises += 1
                self.limiter._check_surprises(self)
            retry_after = info.retry_after
            if self.request_source is None or self.request_source == "aimd":
                self._decrease(now, retry_after)
            if retry_after is not None and retry_after > 0:
                until = now + min(retry_after, cfg.max_retry_after)
                self._blocked_until = max(self._blocked_until, until)
                if self.requests is not None:
                    # one request's worth at `until`, then the usual spacing: callers
                    # woken by the same Retry-After do not go all at once
                    self.requests.block_until(until)

    def _granted(self, now: float, sent: float, remaining: float) -> None:
        """The request rate the server granted us proves a lower bound on its refill
        rate, however late its answers were stamped: between an earlier answer (read
        at t0, its request sent at s0, R0 left) and this one (sent at s1, R1 left) the
        server admitted at least N of our requests (this one and those sent after t0
        and answered before s1) from a bucket of at most R0 + 1, with R1 still left,
        in at most now - s0 seconds: rate >= (N + R1 - R0 - 1) / (now - s0). A bucket
        kept full proves nothing more answer by answer ('used 1'); this proves what
        was sent. The earlier answer is the oldest of the last `_GRANTED_WINDOW`."""
        window = self._granted_window
        if window:
            s0, t0, r0 = window[0]
            if sent >= t0 and now > s0:
                granted = 1 + sum(1 for s, t, _ in window if s >= t0 and t <= sent)
                self._req_est.add_low((granted + remaining - r0 - 1.0) / (now - s0))
        window.append((sent, now, remaining))

    def _learn(
        self,
        bucket: Bucket | None,
        estimate: RateEstimate,
        info: BucketInfo,
        now: float,
        min_capacity: float,
        kind: str,
        sync_remaining: bool,
    ) -> Bucket | None:
        cfg = self.limiter
        rate = estimate.rate()
        configured = (
            self.request_source == "configured"
            if kind == "requests"
            else self.token_source == "configured"
        )
        if rate is not None and rate > 0:
            rate *= cfg.safety
            limit = estimate.limit
            capacity = max(min_capacity, 1.0, math.floor((limit or 2.0) * cfg.burst_fraction))
            if bucket is None:
                bucket = Bucket(1.0 / rate, capacity, now)
            elif configured:
                # what we were told stands unless the server proves its limit is lower
                told = cfg.requests_per_second if kind == "requests" else cfg.tokens_per_second
                upper = estimate.upper()
                if told is not None and upper is not None:
                    bucket.interval = max(1.0 / told, 1.0 / (upper * cfg.safety))
            else:
                bucket.interval = 1.0 / rate
                bucket.capacity = capacity
            if not configured:
                if kind == "requests":
                    self.request_source = "headers"
                    self._aimd_rate = None
                else:
                    self.token_source = "headers"
        if bucket is not None and info.remaining is not None and sync_remaining:
            bucket.lower_to(now, info.remaining)
        return bucket

    def _decrease(self, now: float, retry_after: float | None) -> None:
        """AIMD: a 429 with no usable rate headers cuts the allowed request rate."""
        cfg = self.limiter
        if now < self._aimd_quiet_until:
            return  # the same burst of 429s: cut once
        current = self._aimd_current(now)
        if current is None:  # first 429: cut what we were sending
            current = self._admission_rate(now)
        rate = max(cfg.aimd_min_rate, current * cfg.aimd_decrease)
        self._aimd_rate, self._aimd_at = rate, now
        self._aimd_quiet_until = now + max(1.0 / rate, retry_after or 0.0)
        if self.requests is None:
            self.requests = Bucket(1.0 / rate, 1.0, now)
        else:
            self.requests.interval = 1.0 / rate
            self.requests.capacity = 1.0
        self.request_source = "aimd"

    def _aimd_current(self, now: float) -> float | None:
        if self._aimd_rate is None:
            return None
        return self._aimd_rate * (1.0 + self.limiter.aimd_increase * max(0.0, now - self._aimd_at))

    def _grow_aimd(self, now: float) -> None:
        if self._aimd_rate is not None and self.requests is not None:
            current = self._aimd_current(now)
            if current is not None:
                self.requests.interval = 1.0 / current

    def _admission_rate(self, now: float) -> float:
        # requests admitted in the last second (at least a one-second window, so a
        # burst sent at one instant does not read as an infinite rate)
        recent = sum(1 for t in self._admitted if t > now - 1.0)
        return max(self.limiter.aimd_min_rate, float(recent))

    def settle(self, reserved: int, used: int) -> None:
        """Correct the token bucket with what the response says was really used."""
        with self._lock:
            bucket = self.tokens
            if bucket is None or used < 0:
                return
            delta = (used - reserved) * bucket.interval
            bucket.tat += delta
        if self._shared is not None and delta:
            self._shared.adjust(1, "add", delta)

    # -- introspection -------------------------------------------------------------------
    def snapshot(self, now: float) -> dict[str, Any]:
        with self._lock:
            req, tok = self.requests, self.tokens
            return {
                "requests_per_s": None if req is None else round(1.0 / req.interval, 3),
                "requests_source": self.request_source,
                "requests_available": None if req is None else round(req.available(now), 2),
                "requests_headroom": _headroom(req, now),
                "tokens_per_s": None if tok is None else round(1.0 / tok.interval, 3),
                "tokens_source": self.token_source,
                "tokens_available": None if tok is None else round(tok.available(now), 2),
                "tokens_headroom": _headroom(tok, now),
                "waiting": self.waiting,
                "calls": self.calls,
                "paced": self.paced,
                "paced_seconds": round(self.paced_seconds, 6),
                "rejected": self.rejected,
                "throttled_429": self.throttled,
            }


def _headroom(bucket: Bucket | None, now: float) -> float | None:
    """Share of the bucket's burst free now: 1.0 full, 0.0 the next call waits."""
    if bucket is None or bucket.capacity <= 0:
        return None
    return round(bucket.available(now) / bucket.capacity, 4)


class RateLimiter:
    """Pacers for every upstream a policy calls, learned from the wire or told.

    Compose it into a policy (``ResiliencePolicy(..., rate_limiter=RateLimiter())``; the
    presets build one) or use it directly: ``limiter.acquire(PaceRequest(key, tokens))``.

    `requests_per_second` / `tokens_per_minute`: limits you know (else learned);
    `burst`: slots a told request limit may grant at once; `max_queue`: callers that may
    wait per upstream (more are rejected at once); `max_wait`: longest wait even without a
    deadline; `safety`: fraction of a learned rate to use; `burst_fraction`: share of the
    server's reported capacity we may burst into; `aimd_decrease` / `aimd_increase`: the
    cut per 429 and the linear regrowth per second when the server sends no headers;
    `max_retry_after`: the longest Retry-After we honour in pacing. `store`: a
    `RedisStore` to share the buckets with every process pacing the same upstream (the
    store's fail-open rules apply: while Redis is unreachable each process paces alone);
    other stores are ignored.
    """

    def __init__(
        self,
        *,
        requests_per_second: float | None = None,
        tokens_per_minute: float | None = None,
        burst: int = 1,
        token_burst: float | None = None,
        max_queue: int = 1000,
        max_wait: float | None = 60.0,
        safety: float = 0.98,
        burst_fraction: float = 0.5,
        aimd_decrease: float = 0.9,
        aimd_increase: float = 0.2,
        aimd_min_rate: float = 0.1,
        max_retry_after: float = 60.0,
        name: str = "ratelimit",
        clock: Clock | None = None,
        store: Any = None,
    ) -> None:
        def positive(param: str, value: float | None, allow_none: bool = True) -> None:
            if value is None and allow_none:
                return
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{param} must be a finite number > 0, got {value!r}")

        positive("requests_per_second", requests_per_second)
        positive("tokens_per_minute", tokens_per_minute)
        positive("token_burst", token_burst)
        positive("max_wait", max_wait)
        positive("aimd_min_rate", aimd_min_rate, False)
        positive("max_retry_after", max_retry_after, False)
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an int >= 1, got {burst!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        for param, value, low_open in (
            ("safety", safety, True),
            ("burst_fraction", burst_fraction, True),
            ("aimd_decrease", aimd_decrease, True),
        ):
            if not isinstance(value, int | float) or not (0.0 < value <= 1.0):
                raise ValueError(f"{param} must be in (0, 1], got {value!r}")
            del low_open
        if not isinstance(aimd_increase, int | float) or not (0.0 <= aimd_increase <= 10.0):
            raise ValueError(f"aimd_increase must be between 0 and 10, got {aimd_increase!r}")
        self.requests_per_second = (
            float(requests_per_second) if requests_per_second is not None else None
        )
        self.tokens_per_second = (
            float(tokens_per_minute) / 60.0 if tokens_per_minute is not None else None
        )
        self.burst = float(burst)
        self.token_burst = float(token_burst) if token_burst is not None else None
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.safety = float(safety)
        self.burst_fraction = float(burst_fraction)
        self.aimd_decrease = float(aimd_decrease)
        self.aimd_increase = float(aimd_increase)
        self.aimd_min_rate = float(aimd_min_rate)
        self.max_retry_after = float(max_retry_after)
        if store is not None and getattr(store, "_redis", None) is None:
            store = None  # only Redis shares buckets; other stores: the in-process buckets
        if store is not None:
            SharedBuckets(store, "probe")  # fails early, naming the problem, if unusable
        self.store = store
        self.name = name
        self.clock = clock
        self._pacers: dict[str, Pacer] = {}
        self._lock = threading.Lock()
        #: `EventKind.PACED` after each wait for a slot (published only when a call waited)
        self.events = EventBus()
        self._warned = False

    # -- pacers --------------------------------------------------------------------------
    def pacer(self, upstream: str) -> Pacer:
        found = self._pacers.get(upstream)
        if found is not None:
            return found
        with self._lock:
            found = self._pacers.get(upstream)
            if found is None:
                found = Pacer(self, upstream, get_clock(self.clock).monotonic())
                self._pacers[upstream] = found
            return found

    def _check_surprises(self, pacer: Pacer) -> None:
        """Warn once when a pacer keeps meeting 429s its known limits did not predict."""
        if self._warned or pacer.responses < _SURPRISE_AFTER:
            return
        if pacer.surprises <= _SURPRISE_SHARE * pacer.responses:
            return
        self._warned = True
        _logger.warning(
            "[%s] %d of the last %d answers of %s were 429 although calls were paced to its "
            "limits: something else spends the same limit (several processes each pacing "
            "alone?). Share the buckets: RateLimiter(store=RedisStore(...)) or "
            "ResiliencePolicy.preset(..., store=RedisStore(...)).",
            self.name,
            pacer.surprises,
            pacer.responses,
            pacer.upstream_label,
        )

    def _max_wait(self, max_wait: float | None) -> float | None:
        own = self.max_wait
        if max_wait is None:
            return own
        max_wait = max(0.0, max_wait)
        return max_wait if own is None else min(own, max_wait)

    def reserve(self, request: PaceRequest, max_wait: float | None = None) -> tuple[float, Clock]:
        """Grant `request` its slot: (seconds to wait, the clock to wait on). Raises
        `RateLimitedError` if the slot comes after `max_wait` seconds or after the
        deadline in force (`rag_resilience.deadline`), whichever is sooner."""
        clock = get_clock(self.clock)
        pacer = self._pacers.get(request.upstream) or self.pacer(request.upstream)
        now = clock.monotonic()
        if (
            pacer.requests is None
            and pacer.tokens is None
            and pacer._blocked_until <= now
            and pacer._shared is None
        ):  # `Pacer.reserve`'s lock-free admission, without its frame (the hot path)
            pacer._free.add()
            pacer._admitted.append(now)
            at = now
        else:
            prior = _current.get()
            promised = None
            if prior is not None and prior.pacer is pacer and prior.retry_at is not None:
                promised, prior.retry_at = prior.retry_at, None
            at = pacer.reserve(now, request.tokens, max_wait, promised)
        _current.set(Reservation(pacer, request.tokens, at))
        return at - now, clock

    def wait(self, request: PaceRequest, wait: float, clock: Clock) -> None:
        """Sleep until a slot `reserve` granted with a `wait` > 0."""
        try:
            clock.sleep(wait)
        finally:
            self.pacer(request.upstream).done_waiting()
        self._paced(request, wait)

    async def await_(self, request: PaceRequest, wait: float, clock: Clock) -> None:
        """`wait`, asynchronously."""
        try:
            await clock.asleep(wait)
        finally:
            self.pacer(request.upstream).done_waiting()
        self._paced(request, wait)

    def _paced(self, request: PaceRequest, wait: float) -> None:
        """Tell listeners (traces, metrics) a call waited `wait` s for its slot."""
        events = self.events
        if events.wants(EventKind.PACED):
            extra = {"upstream": request.upstream, "tokens": request.tokens}
            events.publish(EventKind.PACED, self.name, duration=wait, extra=extra)

    def acquire(self, request: PaceRequest, max_wait: float | None = None) -> float:
        """Wait (sync) for `request`'s slot; returns the seconds waited."""
        wait, clock = self.reserve(request, max_wait)
        if wait > 0.0:
            self.wait(request, wait, clock)
        return wait

    async def aacquire(self, request: PaceRequest, max_wait: float | None = None) -> float:
        """Wait (async) for `request`'s slot; returns the seconds waited."""
        wait, clock = self.reserve(request, max_wait)
        if wait > 0.0:
            await self.await_(request, wait, clock)
        return wait

    # -- learning ------------------------------------------------------------------------
    def observe(
        self,
        headers: Mapping[str, str] | None,
        *,
        status: int | None = None,
        upstream: str | None = None,
        usage_tokens: int | None = None,
    ) -> None:
        """Learn from one response: its headers, its status (429 cuts/blocks), and the
        tokens its `usage` reports. The upstream is the current reservation's unless
        given. Never raises."""
        try:
            reservation = _current.get()
            if upstream is not None:
                pacer = self.pacer(upstream)
                if reservation is not None and reservation.pacer is not pacer:
                    reservation = None
            elif reservation is not None and reservation.pacer.limiter is self:
                pacer = reservation.pacer
            else:
                return
            clock = get_clock(self.clock)
            wall = clock.time()
            now = clock.monotonic()
            info = parse_rate_limit_headers(headers, now=wall)
            if info.format == "anthropic" and reservation is not None:
                # An absolute reset (RFC 3339) was stamped somewhere between the slot
                # and now: counted from the stamp, it is longer by up to the answer's age.
                info = _widen(info, max(0.0, now - reservation.at))
            if not info.empty or status == 429:
                pacer.observe(info, status, now, None if reservation is None else reservation.at)
                if status == 429 and reservation is not None and reservation.retry_at is None:
                    reservation.retry_at = pacer.promise_retry(now)
            if reservation is not None and not reservation.observed:
                reservation.observed = True
                if usage_tokens is not None and pacer.tokens is not None:
                    pacer.settle(reservation.tokens, usage_tokens)
        except Exception:  # learning must never break the user's call
            return

    def observe_error(self, exc: BaseException, status: int | None) -> None:
        """Learn from a failed attempt's error (its response headers), unless a response
        hook already saw that response."""
        reservation = _current.get()
        if reservation is None or reservation.observed or reservation.pacer.limiter is not self:
            return
        from .classify import headers_of

        self.observe(headers_of(exc), status=status)

    # -- introspection -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Totals (calls, paced, seconds paced, rejected, 429s received, 429s avoided)
        and each upstream's learned limits."""
        now = get_clock(self.clock).monotonic()
        with self._lock:
            pacers = list(self._pacers.values())
        upstreams = {p.upstream: p.snapshot(now) for p in pacers}
        totals: dict[str, Any] = {
            key: sum(u[key] for u in upstreams.values())
            for key in ("calls", "paced", "rejected", "throttled_429")
        }
        totals["paced_seconds"] = round(sum(u["paced_seconds"] for u in upstreams.values()), 6)
        # Every paced call is one that would have been sent early, into a 429.
        totals["avoided_429"] = totals["paced"]
        totals["upstreams"] = upstreams
        return totals

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests_per_second": self.requests_per_second,
            "tokens_per_minute": None
            if self.tokens_per_second is None
            else self.tokens_per_second * 60.0,
            "max_queue": self.max_queue,
            "max_wait": self.max_wait,
            "safety": self.safety,
        }

    def __repr__(self) -> str:
        return f"RateLimiter(name={self.name!r}, upstreams={len(self._pacers)})"
