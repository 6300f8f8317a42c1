"""`ResiliencePolicy`: one call through limit -> retry loop -> breaker -> the call, then
the fallback chain. Every adapter (LangChain, LlamaIndex, OpenAI client, decorators)
calls into this.

    caller -> ConcurrencyLimit (bounded in-flight + bounded wait; full -> QueueFullError)
           -> retry loop (classify, backoff + jitter, Retry-After, deadline, budget)
              -> CircuitBreaker.before_call (OPEN -> CircuitOpenError, no upstream call)
                 -> fn(*args, **kwargs)
           <- on final failure of an *upstream* kind (never the caller's own 4xx):
              fallback callables in order -> last-known-good cache (with age) ->
              generic answer (if enabled) -> re-raise the original error, annotated.

An open circuit stops the retry loop at once: nobody sleeps through backoff while
the upstream is known to be down. Sync and async drivers share every decision
(`_failed`, `_succeeded`, `_degrade_plan`); they differ only where they await.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from . import _registry
from . import _validate as _v
from . import deadline as _deadline
from ._counter import AtomicCounter
from .backoff import RetryBudget
from .breaker import ADMITTED_CLEAN, PROBE, CircuitBreaker
from .classify import Classifier, ErrorVerdict, make_classifier
from .clock import Clock, get_clock
from .deadline import enter as _enter_deadline
from .deadline import leave as _leave_deadline
from .degraded import nested as _nested
from .errors import (
    CircuitOpenError,
    DeadlineExceededError,
    QueueFullError,
    RateLimitedError,
    add_note,
    mark_handled,
    set_attempts,
)
from .events import Event, EventBus, EventKind, Listener, StatsCollector
from .failover import check_failover, has_healthy_fallback
from .fallback import BUSY_ANSWER, DEFAULT_GENERIC_ANSWER, GracefulFallbacks
from .limits import ConcurrencyLimit
from .probewait import OUTER_SERVES, default_probe_wait
from .ratelimit import PaceRequest, RateLimiter
from .retry import RetryRun, RetryStrategy, attempt_timeout_for, count_attempt
from .slowstart import SlowStart
from .stores.base import Store
from .streams import aclose_upstream, close_upstream
from .timeouts import run_with_timeout

_logger = logging.getLogger("rag_resilience")

__all__ = ["PRESETS", "CacheHooks", "Codec", "ResiliencePolicy", "Served"]

T = TypeVar("T")
_NO_KEY: Any = object()

PRESETS: dict[str, dict[str, Any]] = {
    # The seed's numbers: retries, initial delay, breaker threshold, recovery, queue size.
    "conservative": {
        "max_retries": 5,
        "initial_delay": 2.0,
        "failure_threshold": 3,
        "recovery_timeout": 120.0,
        "max_waiting": 500,
        "max_concurrency": 32,
        "deadline": 120.0,
        "attempt_timeout": 60.0,
    },
    "balanced": {
        "max_retries": 3,
        "initial_delay": 1.0,
        "failure_threshold": 5,
        "recovery_timeout": 60.0,
        "max_waiting": 1000,
        "max_concurrency": 64,
        "deadline": 60.0,
        "attempt_timeout": 30.0,
    },
    "aggressive": {
        "max_retries": 2,
        "initial_delay": 0.5,
        "failure_threshold": 10,
        "recovery_timeout": 30.0,
        "max_waiting": 2000,
        "max_concurrency": 128,
        "deadline": 30.0,
        "attempt_timeout": 20.0,
    },
    "cost_optimized": {
        "max_retries": 1,
        "initial_delay": 2.0,
        "failure_threshold": 5,
        "recovery_timeout": 60.0,
        "max_waiting": 500,
        "max_concurrency": 16,
        "deadline": 60.0,
        "attempt_timeout": 30.0,
    },
}
#: First open period of the presets' breakers; doubles after each failed probe.
PRESET_MIN_RECOVERY = 2.0
#: The retry budget of presets built with count="calls": retries up to the offered load
#: (benchmarks/recovery.py: at 50% random 503s a call needs 0.875 retries on average). An
#: outage is the breaker's job: it opens after `failure_threshold` calls' worth of attempts.
PRESET_RETRY_RATIO = 1.0


def _bus_of(component: Any) -> EventBus | None:
    if component is None:
        return None
    bus = getattr(component, "events", None) or getattr(component, "_bus", None)
    return bus if isinstance(bus, EventBus) else None


class _PolicyStats(StatsCollector):
    """The policy's own collector: fed directly on the live path (no Event built per call)
    and counting attempts from each call's terminal event instead of one event per attempt.
    Live answers on the first attempt (nearly all calls) are counted without the lock and
    folded into the totals when read."""

    routine = False

    def __init__(self) -> None:
        self._first_try = AtomicCounter()
        self._folded = 0
        super().__init__()

    def record_live(self, attempts: int, duration: float) -> None:
        if attempts == 1:
            self._first_try.add()
            self._latencies.append(duration)  # deque.append is atomic
            return
        with self._lock:
            self.calls += 1
            self.successes += 1
            self.attempts += attempts
            self._latencies.append(duration)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            total = self._first_try.value
            fresh, self._folded = total - self._folded, total
            self.calls += fresh
            self.successes += fresh
            self.attempts += fresh
        return super().stats()

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self._folded = self._first_try.value

    def __call__(self, event: Event) -> None:
        if event.kind is _FALLBACK or event.kind is _FAILURE:
            with self._lock:
                self.attempts += event.attempt
        super().__call__(event)


_FALLBACK = EventKind.FALLBACK
_FAILURE = EventKind.FAILURE
_SUCCESS = EventKind.SUCCESS
_NESTED: dict[str, Any] = {"nested": True}  # `Event.extra` of a call inside an outer wrapper


@dataclass(slots=True)
class Served(Generic[T]):
    """A result and how it was served. `degraded` is True for anything but a live answer."""

    value: T
    source: str = "live"  # live | cache | fallback | generic_fallback | rejected
    attempts: int = 1
    age_s: float | None = None
    degraded: bool = False
    error: BaseException | None = field(default=None, repr=False)
    fallback_index: int | None = None

    def metadata(self) -> dict[str, Any]:
        """JSON-friendly `{"source", "attempts", "age_s", "degraded"[, "error"]}`."""
        meta: dict[str, Any] = {
            "source": self.source,
            "attempts": self.attempts,
            "age_s": None if self.age_s is None else round(self.age_s, 3),
            "degraded": self.degraded,
        }
        if self.error is not None:
            meta["error"] = f"{type(self.error).__name__}: {self.error}"
        if self.fallback_index is not None:
            meta["fallback_index"] = self.fallback_index
        return meta


@dataclass(slots=True)
class Codec:
    """How a live value is stored in the cache (JSON for shared stores) and read back."""

    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


class CacheHooks:
    """A caller-owned last-known-good cache: `store(value)` after a live success,
    `lookup() -> (value, age_s) | None` when degrading. Either may return an awaitable
    on the async path.

    Pass the two callables, or subclass and override both methods (one object per call
    on a hot path, instead of two closures).
    """

    __slots__ = ("_lookup", "_store")

    def __init__(
        self,
        store: Callable[[Any], Any] | None = None,
        lookup: Callable[[], Any] | None = None,
    ) -> None:
        self._store = store
        self._lookup = lookup

    def store(self, value: Any) -> Any:
        if self._store is None:
            raise NotImplementedError("CacheHooks needs a store callable or an override")
        return self._store(value)

    def lookup(self) -> Any:
        if self._lookup is None:
            raise NotImplementedError("CacheHooks needs a lookup callable or an override")
        return self._lookup()


# (args, kwargs, key, codec, fallbacks, generic, pace): what a call was asked to do
_Request = tuple[
    Sequence[Any],
    "dict[str, Any] | None",
    Any,
    "Codec | None",
    Sequence[Callable[..., Any]],
    "Callable[[BaseException], Any] | bool | None",
    "PaceRequest | None",
]


class _Call:
    """One call: what it was asked to do (carried through the attempts and the fallback
    chain) and its concurrency permit. The permit is given back while the call sleeps
    between attempts: backoff is not in flight, and must not occupy a slot of the limit.
    `execute`/`aexecute` build one only when the first attempt does not simply succeed;
    until then the permit is theirs."""

    __slots__ = (
        "args",
        "codec",
        "fallbacks",
        "generic",
        "held",
        "key",
        "kwargs",
        "limit",
        "pace",
    )

    def __init__(self, request: _Request, limit: ConcurrencyLimit | None, held: bool) -> None:
        self.args, kwargs, self.key, self.codec, self.fallbacks, self.generic, self.pace = request
        self.kwargs: dict[str, Any] = kwargs or {}
        self.limit = limit
        self.held = held and limit is not None

    def take(self) -> None:
        if self.limit is not None:
            self.limit.acquire()
            self.held = True

    async def atake(self) -> None:
        if self.limit is not None:
            await self.limit.aacquire()
            self.held = True

    def give(self) -> None:
        if self.held and self.limit is not None:
            self.held = False
            self.limit.release()

    async def agive(self) -> None:
        if self.held and self.limit is not None:
            self.held = False
            await self.limit.arelease()


@dataclass(slots=True)
class _Degrade:
    """What the fallback chain should try, decided once for sync and async."""

    error: BaseException
    verdict: ErrorVerdict
    attempts: int
    started: float


def _served_record(served: Served[Any]) -> Served[None]:
    """How a degraded stream was served, without its items (for `on_served`)."""
    return replace(served, value=None, degraded=True)


def _waits_for_probe(error: BaseException, opened: bool = False) -> bool:
    """Refused while open, or `opened` while retrying (not after a probe-wait ran out, nor
    a full ramp: those callers have waited their turn already), and no enclosing policy
    serves its caller at once."""
    refused = opened or (isinstance(error, CircuitOpenError) and error.state == "open")
    return refused and not OUTER_SERVES.get()


def _items_of(value: Any) -> Iterable[Any]:
    """A degraded stream's items: a fallback's iterable, or one text as a single item."""
    return (value,) if isinstance(value, (str, bytes)) else value


class ResiliencePolicy:
    """Composition of ConcurrencyLimit, RetryStrategy, CircuitBreaker and GracefulFallbacks.

    Any part may be None (not used). `generic_fallback`: False (re-raise), True (the
    default messages), a string, or a callable `error -> value`. `fallback_fns` are
    tried in order with the call's own arguments after the primary gives up.
    """

    def __init__(
        self,
        retry: RetryStrategy | None = None,
        breaker: CircuitBreaker | None = None,
        fallbacks: GracefulFallbacks | None = None,
        limit: ConcurrencyLimit | None = None,
        *,
        classifier: Classifier | None = None,
        listeners: list[Listener] | None = None,
        name: str = "policy",
        generic_fallback: bool | str | Callable[[BaseException], Any] = False,
        fallback_fns: Sequence[Callable[..., Any]] = (),
        attempt_timeout: float | None = None,
        deadline: float | None = None,
        clock: Clock | None = None,
        rate_limiter: RateLimiter | None = None,
        failover: str = "after_retries",
    ) -> None:
        _v.positive("attempt_timeout", attempt_timeout, none_ok=True)
        _v.positive("deadline", deadline, none_ok=True)
        self.name = name
        self.retry = retry if retry is not None else RetryStrategy(max_retries=0, retry_budget=None)
        self._has_retry = retry is not None
        self.breaker = breaker
        self.fallbacks = fallbacks
        self.limit = limit
        #: paces calls to the upstream's rate limit before the concurrency permit (None: off)
        self.rate_limiter = rate_limiter
        self._default_pace = PaceRequest(name)
        self.generic_fallback = generic_fallback
        self.fallback_fns = list(fallback_fns)
        #: "immediate": an upstream error goes to a healthy fallback at once (failover.py)
        self.failover = check_failover(failover)
        # always something to serve degraded: nested policies need not wait for recovery
        self._serves = bool(self.fallback_fns) or generic_fallback not in (False, None)
        self.attempt_timeout = (
            attempt_timeout if attempt_timeout is not None else self.retry.attempt_timeout
        )
        self.deadline = deadline if deadline is not None else self.retry.deadline
        self.clock = clock
        self._classifier_arg = classifier
        self.classify: Callable[[BaseException], ErrorVerdict] = (
            make_classifier(classifier) if classifier is not None else self.retry.classify
        )
        self.events = EventBus(listeners)
        self.collector: StatsCollector = _PolicyStats()
        # Our stats see every component's events, each event once.
        for bus in (
            self.retry.events,
            breaker.events if breaker else None,
            _bus_of(limit),
            self.events,
        ):
            if bus is not None:
                bus.add(self.collector)
                for listener in listeners or ():
                    if bus is not self.events:
                        bus.add(listener)
        if breaker is not None:
            self.collector.gauges["breaker_state"] = lambda: breaker.get_state().value
        if limit is not None:
            self.collector.gauges["in_flight"] = lambda: limit.in_flight
            self.collector.gauges["queue_depth"] = lambda: limit.waiting
        if fallbacks is not None:
            self.collector.gauges["cache_entries"] = lambda: len(fallbacks)
        if rate_limiter is not None:
            self.collector.gauges["rate_limit"] = rate_limiter.stats
            for listener in listeners or ():  # pacing waits (a shared limiter: all its waits)
                rate_limiter.events.add(listener)
        _registry.register(self)  # exporters report the gauges of policies they hear from

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def preset(
        cls,
        preset: str = "balanced",
        *,
        name: str | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        listeners: list[Listener] | None = None,
        classifier: Classifier | None = None,
        generic_fallback: bool | str | Callable[[BaseException], Any] = False,
        rate_limit: bool | RateLimiter = True,
        **overrides: Any,
    ) -> ResiliencePolicy:
        """The seed's profiles: conservative | balanced | aggressive | cost_optimized.

        `overrides` replace single numbers (e.g. ``max_retries=1``); `store` shares
        breaker, cache and limit state (SQLite/Redis), keyed by `name`. `rate_limit`:
        pace to the rate limits learned from the wire (True, the default), a
        `RateLimiter` of your own, or False (off). `count`: what `failure_threshold`
        counts, ``"calls"`` (the default: failed calls' worth of attempts in a row, retry
        budget 100%) or ``"attempts"`` (the first release: failed attempts, budget 20%).
        """
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        cfg = {**PRESETS[preset], **overrides}
        unknown = (
            set(overrides)
            - set(PRESETS[preset])
            - {
                "max_delay",
                "jitter",
                "min_recovery_timeout",
                "cache_ttl",
                "cache_max_entries",
                "retry_budget",
                "half_open_max_calls",
                "success_threshold",
                "wait_timeout",
                "retry_after_jitter",
                "max_retry_after",
                "probe_wait",
                "slow_start",
                "failover",
                "count",
            }
        )
        if unknown:
            raise ValueError(f"unknown preset override(s): {sorted(unknown)}")
        _v.positive("recovery_timeout", cfg["recovery_timeout"])
        _v.positive("cache_ttl", cfg.get("cache_ttl"), none_ok=True)
        _v.integer("cache_max_entries", cfg.get("cache_max_entries"), 1, none_ok=True)
        _v.integer("max_concurrency", cfg["max_concurrency"], 1)  # the ramp is built from it
        _v.integer("failure_threshold", cfg["failure_threshold"], 1)  # multiplied below
        pname = name or preset
        # count="calls" (the default): the seed's threshold counts failed calls, so the
        # breaker (which counts attempts) trips after threshold x attempts per call in a row,
        # and retries may reach the offered load (benchmarks/recovery.py: >= 90% live at 50%
        # random 503s). "attempts": the first release's rule (threshold attempts, budget 20%).
        count = cfg.get("count", "calls")
        if count not in ("attempts", "calls"):
            raise ValueError(f"count must be 'attempts' or 'calls', got {count!r}")
        per_failure = cfg["max_retries"] + 1 if count == "calls" else 1
        ratio = PRESET_RETRY_RATIO if count == "calls" else 0.2
        retry = RetryStrategy(
            max_retries=cfg["max_retries"],
            initial_delay=cfg["initial_delay"],
            max_delay=cfg.get("max_delay", 30.0),
            jitter=cfg.get("jitter", True),
            deadline=cfg["deadline"],
            attempt_timeout=cfg["attempt_timeout"],
            retry_budget=cfg.get("retry_budget", RetryBudget(ratio, clock=clock)),
            max_retry_after=cfg.get("max_retry_after", 60.0),
            retry_after_jitter=cfg.get("retry_after_jitter", 0.0),
            classifier=classifier,
            name=pname,
            clock=clock,
        )
        breaker = CircuitBreaker(
            failure_threshold=cfg["failure_threshold"] * per_failure,
            recovery_timeout=cfg["recovery_timeout"],
            min_recovery_timeout=cfg.get(
                "min_recovery_timeout", min(PRESET_MIN_RECOVERY, cfg["recovery_timeout"])
            ),
            open_from="first_failure",
            half_open_max_calls=cfg.get("half_open_max_calls", 1),
            success_threshold=cfg.get("success_threshold", 1),
            probe_wait=cfg.get("probe_wait", default_probe_wait(cfg["attempt_timeout"])),
            slow_start=SlowStart(cfg["max_concurrency"], cfg.get("half_open_max_calls", 1))
            if cfg.get("slow_start", True)
            else None,
            classifier=classifier,
            name=pname,
            store=store,
            clock=clock,
        )
        fallbacks = GracefulFallbacks(
            ttl=cfg.get("cache_ttl", 86_400.0),
            max_entries=cfg.get("cache_max_entries", 10_000),
            name=pname,
            store=store,
            clock=clock,
        )
        limit = ConcurrencyLimit(
            cfg["max_concurrency"],
            max_waiting=cfg["max_waiting"],
            wait_timeout=cfg.get("wait_timeout"),
            name=pname,
            store=store,
            clock=clock,
        )
        if isinstance(rate_limit, RateLimiter):
            limiter: RateLimiter | None = rate_limit
        elif rate_limit is True:
            limiter = RateLimiter(
                name=pname, max_queue=cfg["max_waiting"], clock=clock, store=store
            )
        elif rate_limit is False or rate_limit is None:
            limiter = None
        else:
            raise ValueError(f"rate_limit must be True, False or a RateLimiter, got {rate_limit!r}")
        return cls(
            retry,
            breaker,
            fallbacks,
            limit,
            classifier=classifier,
            listeners=listeners,
            name=pname,
            generic_fallback=generic_fallback,
            clock=clock,
            rate_limiter=limiter,
            failover=cfg.get("failover", "immediate"),
        )

    @classmethod
    def resolve(
        cls, policy: ResiliencePolicy | str | None, **preset_kwargs: Any
    ) -> ResiliencePolicy:
        """A policy from a policy, a preset name, or None (the "balanced" preset)."""
        if isinstance(policy, ResiliencePolicy):
            return policy
        if policy is None:
            policy = "balanced"
        if isinstance(policy, str):
            return cls.preset(policy, **preset_kwargs)
        raise TypeError(f"policy must be a ResiliencePolicy, a preset name or None, got {policy!r}")

    def derive(self, name: str) -> ResiliencePolicy:
        """Same settings, its own breaker and stats (e.g. for a fallback model)."""
        breaker = None
        if self.breaker is not None:
            b = self.breaker
            breaker = CircuitBreaker(
                b.failure_threshold,
                b.recovery_timeout,
                b.expected_exception,
                name=name,
                success_threshold=b.success_threshold,
                half_open_max_calls=b.half_open_max_calls,
                mode=b.mode,
                failure_rate_threshold=b.failure_rate_threshold,
                minimum_calls=b.minimum_calls,
                window_seconds=b.window_seconds,
                min_recovery_timeout=b.min_recovery_timeout,
                open_from=b.open_from,
                probe_timeout=b.probe_timeout,
                probe_wait=b.probe_wait,
                classifier=self._classifier_arg,
                store=b.store,
                clock=b.clock,
            )
        return ResiliencePolicy(
            self.retry if self._has_retry else None,
            breaker,
            self.fallbacks,
            None,
            classifier=self._classifier_arg,
            name=name,
            attempt_timeout=self.attempt_timeout,
            deadline=self.deadline,
            clock=self.clock,
            rate_limiter=self.rate_limiter,
        )

    # -- public entry points --------------------------------------------------------------
    def call(self, fn: Callable[..., T], *args: Any, key: Any = _NO_KEY, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` under the policy; returns the (possibly degraded) value."""
        return self.execute(fn, args, kwargs, key=key).value

    def run(self, fn: Callable[..., T], *args: Any, key: Any = _NO_KEY, **kwargs: Any) -> Served[T]:
        """Like `call`, returning a `Served` that says how the value was obtained."""
        return self.execute(fn, args, kwargs, key=key)

    async def acall(
        self, fn: Callable[..., Awaitable[T]], *args: Any, key: Any = _NO_KEY, **kwargs: Any
    ) -> T:
        return (await self.aexecute(fn, args, kwargs, key=key)).value

    async def arun(
        self, fn: Callable[..., Awaitable[T]], *args: Any, key: Any = _NO_KEY, **kwargs: Any
    ) -> Served[T]:
        return await self.aexecute(fn, args, kwargs, key=key)

    def stream(
        self, fn: Callable[..., Iterable[T]], *args: Any, key: Any = _NO_KEY, **kwargs: Any
    ) -> Iterator[T]:
        """Iterate `fn(*args, **kwargs)`; retried only until the first item is yielded."""
        return self.execute_stream(fn, args, kwargs, key=key)

    def astream(
        self,
        fn: Callable[..., AsyncIterator[T] | Awaitable[AsyncIterator[T]]],
        *args: Any,
        key: Any = _NO_KEY,
        **kwargs: Any,
    ) -> AsyncIterator[T]:
        return self.aexecute_stream(fn, args, kwargs, key=key)

    # -- shared decisions -----------------------------------------------------------------
    def _pause(
        self, call: _Call, run: RetryRun, delay: float, cause: BaseException
    ) -> QueueFullError | None:
        """Sleep `delay` without holding the permit; the rejection if it can't be had back
        (or if the next attempt's turn at the rate limit comes after the deadline)."""
        call.give()
        run.clock.sleep(delay)
        try:
            if self.rate_limiter is not None:
                self._published(self.rate_limiter.acquire, call.pace, _deadline.remaining())
            call.take()
        except QueueFullError as rejected:
            return self._requeue_rejected(rejected, cause)
        return None

    async def _apause(
        self, call: _Call, run: RetryRun, delay: float, cause: BaseException
    ) -> QueueFullError | None:
        await call.agive()
        await run.clock.asleep(delay)
        try:
            if self.rate_limiter is not None:
                await self._apublished(call.pace, _deadline.remaining())
            await call.atake()
        except QueueFullError as rejected:
            return self._requeue_rejected(rejected, cause)
        return None

    def _published(
        self, acquire: Callable[[PaceRequest, float | None], T], pace: Any, left: Any
    ) -> T:
        """The limiter's `acquire` for a retry or a stream; a pace-out is published as for
        a first attempt (REJECTED, reason rate_limit_wait)."""
        try:
            return acquire(pace or self._default_pace, left)
        except RateLimitedError as exc:
            self._pace_rejected(exc)
            raise

    async def _apublished(self, pace: Any, left: Any) -> None:
        assert self.rate_limiter is not None
        try:
            await self.rate_limiter.aacquire(pace or self._default_pace, left)
        except RateLimitedError as exc:
            self._pace_rejected(exc)
            raise

    def _pace_rejected(self, exc: RateLimitedError) -> None:
        self.events.publish(
            EventKind.REJECTED, self.name, reason="rate_limit_wait", delay=exc.wait, error=exc
        )

    def _pace(
        self, limiter: RateLimiter, pace: PaceRequest | None
    ) -> RateLimitedError | tuple[float, Clock]:
        """The call's turn at the upstream's rate limit: (seconds to wait for it, clock),
        or the rejection if it comes after the deadline (then nothing is sent and
        nothing is retried). The drivers sleep; no coroutine frame when there is room."""
        try:
            # the policy's own deadline: the limiter shortens it to the deadline in force
            # (`deadline.bound`) only when the call must wait, so a call with room reads
            # no clock for it (the hot path)
            return limiter.reserve(pace or self._default_pace, self.deadline)
        except RateLimitedError as exc:
            self._pace_rejected(exc)
            return exc

    def _requeue_rejected(self, rejected: QueueFullError, cause: BaseException) -> QueueFullError:
        rejected.__context__ = cause
        add_note(
            rejected,
            f"rag_resilience[{self.name}]: rejected when queueing to retry after "
            f"{type(cause).__name__}: {cause}",
        )
        return rejected

    def _new_run(self, started: float | None = None, attempts: int = 0) -> RetryRun:
        # RetryRun shortens its deadline to the call's deadline in force (deadline.py).
        return RetryRun(
            self.retry,
            self.name,
            deadline=self.deadline,
            attempt_timeout=self.attempt_timeout,
            started=started,
            attempts=attempts,
        )

    def _expired(self, clock: Clock) -> _Degrade:
        """The plan for a call whose deadline had passed before it started."""
        error = DeadlineExceededError(
            f"rag_resilience[{self.name}]: the call's deadline had passed before it started "
            "(an enclosing call spent it); no attempt made",
            timeout=0.0,
            scope="total",
        )
        return self._plan(error, 0, clock.monotonic())

    def _failed(
        self, run: RetryRun, exc: BaseException, ticket: int, call: _Call
    ) -> tuple[ErrorVerdict, float | None]:
        """After a failed attempt: verdict, and the delay before the next one (None: stop)."""
        verdict = self.classify(exc)
        if self.rate_limiter is not None and verdict.status is not None:
            self.rate_limiter.observe_error(exc, verdict.status)
        breaker = self.breaker
        if breaker is not None:
            breaker.on_failure(exc, ticket, verdict)
            if verdict.retryable and breaker.retry_after() > 0:
                run.stop("stopped", exc, verdict)  # circuit opened: don't sleep through backoff
                return verdict, None
        if (
            self.failover == "immediate"
            and verdict.retryable
            and verdict.fallback_ok
            and (call.fallbacks or self.fallback_fns)
            and has_healthy_fallback([*self.fallback_fns, *call.fallbacks])
        ):
            run.stop("failover", exc, verdict)
            return verdict, None
        return verdict, run.on_error(exc, verdict)

    async def _astore(self, key: Any, value: Any, codec: Codec | None) -> None:
        """The async path's cache write (`_succeeded` does the sync one): the caller's
        hooks or the store may be async. Failures are logged and skipped, as there."""
        try:
            if isinstance(key, CacheHooks):
                stored = key.store(value)
                if inspect.isawaitable(stored):
                    await stored
            elif key is not _NO_KEY and self.fallbacks is not None:
                await self.fallbacks.aupdate_cache(key, codec.encode(value) if codec else value)
        except Exception:
            self._cache_failed("write")

    def _cache_failed(self, what: str) -> None:
        _logger.warning(
            "[%s] fallback cache %s failed; the call goes on without it",
            self.name,
            what,
            exc_info=True,
        )

    def _succeeded(
        self, value: T, attempts: int, started: float, clock: Clock, key: Any, codec: Codec | None
    ) -> Served[T]:
        """Record a live answer: remember it under `key` (or through the caller's
        `CacheHooks`), count it, publish SUCCESS if anyone listens. A failing cache (store
        down, value not encodable) must never turn the user's success into an error: it is
        logged and skipped."""
        if key is not _NO_KEY:
            try:
                if isinstance(key, CacheHooks):
                    key.store(value)
                elif self.fallbacks is not None:
                    self.fallbacks.update_cache(
                        key, value if codec is None else codec.encode(value)
                    )
            except Exception:
                self._cache_failed("write")
        duration = clock.monotonic() - started
        collector = self.collector
        if type(collector) is _PolicyStats:
            collector.record_live(attempts, duration)
        events = self.events
        if events.routine:
            if _nested(self):  # one component of an outer wrapper's user call
                events.publish(
                    _SUCCESS, self.name, attempt=attempts, duration=duration, extra=_NESTED
                )
            else:
                events.publish(_SUCCESS, self.name, attempt=attempts, duration=duration)
        return Served(value, "live", attempts)

    def count_inner_degraded(self, source: str) -> None:
        """An outer wrapper (a chain) answered live on a degraded inner answer: count the
        call degraded from `source`, not live."""
        reclassify = getattr(self.collector, "reclassify_degraded", None)
        if reclassify is not None:
            reclassify(source)

    def _check(self, plan: _Degrade) -> None:
        """Caller's own errors are never masked: re-raise them untouched."""
        if not plan.verdict.fallback_ok:
            self._publish_failure(plan)
            raise plan.error

    def generic_answer(self, error: BaseException, setting: Any = None) -> Any:
        """The generic answer for `error` under `setting` (None: this policy's
        `generic_fallback`): a callable's result, a string, the busy message for a
        rejection, or the default message. None when generic answers are off. Adapters
        wrap it in their framework's message type."""
        gen = self.generic_fallback if setting is None else setting
        if gen is False or gen is None:
            return None
        if callable(gen):
            return gen(error)
        if isinstance(gen, str):
            return gen
        if isinstance(error, QueueFullError):
            return BUSY_ANSWER
        return (
            self.fallbacks.generic_answer if self.fallbacks is not None else DEFAULT_GENERIC_ANSWER
        )

    def _generic(
        self, plan: _Degrade, generic: Callable[[BaseException], Any] | bool | None
    ) -> Served[Any] | None:
        # generic=False disables the policy's generic answer for this call (e.g. embeddings:
        # a string is never a valid vector).
        error = plan.error
        try:
            value = self.generic_answer(error, generic)
        except Exception as exc:
            if exc is not error:  # a callable that re-raises the error means "nothing to serve"
                self._fallback_failed(plan, "generic", exc)
            return None
        if value is None:
            return None
        rejected = isinstance(error, QueueFullError)
        return self._degraded(plan, value, "rejected" if rejected else "generic_fallback")

    def _from_cache(
        self, plan: _Degrade, found: tuple[Any, float] | None, codec: Codec | None
    ) -> Served[Any] | None:
        if found is None:
            return None
        value, age = found
        try:
            decoded = codec.decode(value) if codec else value
        except Exception as exc:  # a corrupt entry: note it, go on down the chain
            self._fallback_failed(plan, "cache", exc)
            return None
        return self._degraded(plan, decoded, "cache", age=age)

    def _lookup(self, plan: _Degrade, key: Any, codec: Codec | None) -> Served[Any] | None:
        try:
            if isinstance(key, CacheHooks):
                found, codec = key.lookup(), None
            elif key is not _NO_KEY and self.fallbacks is not None:
                found = self.fallbacks.get_last_known_good(key)
            else:
                return None
        except Exception as exc:
            self._fallback_failed(plan, "cache", exc)
            return None
        return self._from_cache(plan, found, codec)

    async def _alookup(self, plan: _Degrade, key: Any, codec: Codec | None) -> Served[Any] | None:
        try:
            if isinstance(key, CacheHooks):
                found, codec = key.lookup(), None
                if inspect.isawaitable(found):
                    found = await found
            elif key is not _NO_KEY and self.fallbacks is not None:
                found = await self.fallbacks.aget_last_known_good(key)
            else:
                return None
        except Exception as exc:
            self._fallback_failed(plan, "cache", exc)
            return None
        return self._from_cache(plan, found, codec)

    def _degraded(
        self,
        plan: _Degrade,
        value: Any,
        source: str,
        *,
        age: float | None = None,
        index: int | None = None,
    ) -> Served[Any]:
        clock = get_clock(self.clock)
        self.events.publish(
            EventKind.FALLBACK,
            self.name,
            attempt=plan.attempts,
            error=plan.error,
            served_from=source,
            age_s=age,
            duration=clock.monotonic() - plan.started,
            reason=plan.verdict.reason,
            extra=_NESTED if _nested(self) else None,
        )
        return Served(value, source, plan.attempts, age, True, plan.error, index)

    def _fallback_failed(self, plan: _Degrade, index: int | str, exc: BaseException) -> None:
        what = f"fallback #{index}" if isinstance(index, int) else f"the {index} fallback"
        add_note(
            plan.error,
            f"rag_resilience[{self.name}]: {what} failed too: {type(exc).__name__}: {exc}",
        )

    def _publish_failure(self, plan: _Degrade) -> None:
        clock = get_clock(self.clock)
        self.events.publish(
            EventKind.FAILURE,
            self.name,
            attempt=plan.attempts,
            error=plan.error,
            reason=plan.verdict.reason,
            duration=clock.monotonic() - plan.started,
            extra=_NESTED if _nested(self) else None,
        )

    def _give_up(self, plan: _Degrade) -> None:
        self._publish_failure(plan)
        mark_handled(plan.error)
        set_attempts(plan.error, plan.attempts)
        raise plan.error

    def _plan(
        self, exc: BaseException, attempts: int, started: float, verdict: ErrorVerdict | None = None
    ) -> _Degrade:
        return _Degrade(exc, verdict or self.classify(exc), attempts, started)

    # -- sync driver ----------------------------------------------------------------------
    def execute(
        self,
        fn: Callable[..., T],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        key: Any = _NO_KEY,
        codec: Codec | None = None,
        fallbacks: Sequence[Callable[..., Any]] = (),
        generic: Callable[[BaseException], Any] | bool | None = None,
        cache: CacheHooks | None = None,
        pace: PaceRequest | None = None,
    ) -> Served[T]:
        """The adapters' entry point: explicit args, cache `codec`, extra fallbacks, generic.

        `cache` replaces the key-based last-known-good cache with the caller's own
        (e.g. one entry per text of an embeddings batch).

        Most calls succeed at once, so that path builds neither a `_Call` (what the
        fallback chain needs, and the permit from then on) nor a `RetryRun`: both are built
        at the first failure, and until then the permit is held here.
        """
        if cache is not None:
            key = cache
        request: _Request = (args, kwargs, key, codec, fallbacks, generic, pace)
        strategy = self.retry
        clock = get_clock(strategy.clock)
        # One deadline per user call (deadline.py): ours, or an enclosing policy's sooner one.
        now = clock.monotonic()
        token, left = _enter_deadline(self.deadline, clock, now)
        if left is not None and left <= 0.0:  # an enclosing call spent it (token is None)
            return self._degrade(self._expired(clock), _Call(request, None, False))
        limit = self.limit
        call: _Call | None = None
        limiter = self.rate_limiter
        if limiter is not None:  # deadline -> pacing -> permit -> breaker
            try:
                turn = self._pace(limiter, pace)
                if not isinstance(turn, RateLimitedError) and turn[0] > 0.0:
                    limiter.wait(pace or self._default_pace, *turn)
            except BaseException:
                if token is not None:
                    _leave_deadline(token)
                raise
            if isinstance(turn, RateLimitedError):
                try:
                    call = _Call(request, limit, False)
                    return self._degrade(self._plan(turn, 0, clock.monotonic()), call)
                finally:
                    if token is not None:
                        _leave_deadline(token)
        if limit is not None:
            try:
                limit.acquire()
            except QueueFullError as exc:
                try:
                    call = _Call(request, limit, False)
                    return self._degrade(self._plan(exc, 0, clock.monotonic()), call)
                finally:
                    if token is not None:
                        _leave_deadline(token)
            except BaseException as exc:
                if not isinstance(exc, Exception):  # interrupted while waiting
                    self.collector.count_interrupted()
                if token is not None:
                    _leave_deadline(token)
                raise
        serves = fallbacks or (self._serves if generic is None else generic is not False)
        mark = OUTER_SERVES.set(True) if serves else None
        try:
            started = now  # the call's time includes its wait for a permit
            count_attempt(strategy, self.name, 1, started)
            run: RetryRun | None = None
            attempts = 1
            breaker = self.breaker
            while True:
                if breaker is None or breaker.quiet:  # nothing to check or count
                    ticket = ADMITTED_CLEAN
                else:
                    try:
                        ticket = breaker.admit()  # may wait for a probe's verdict
                    except CircuitOpenError as exc:
                        if call is None:
                            call = _Call(request, limit, True)
                        served = self._refused(self._plan(exc, attempts - 1, started), call)
                        if served is None:
                            continue  # waited for the next probe: ask again
                        return served
                try:
                    value = fn(*args, **kwargs) if kwargs else fn(*args)
                except Exception as exc:
                    if call is None:
                        call = _Call(request, limit, True)
                    if run is None:
                        run = self._new_run(started, attempts)
                    verdict, delay = self._failed(run, exc, ticket, call)
                    if delay is None:
                        plan = self._plan(exc, attempts, started, verdict)
                        if not self._opened(verdict, ticket):
                            return self._degrade(plan, call)
                        served = self._refused(plan, call, opened=True)
                        if served is not None:
                            return served
                        run, attempts = None, attempts + 1  # waited for the probe: try again
                        continue
                    rejected = self._pause(call, run, delay, exc)
                    if rejected is not None:
                        return self._degrade(self._plan(rejected, attempts, started), call)
                    run.start_attempt()
                    attempts = run.attempts
                    continue
                except BaseException:
                    if breaker is not None:
                        breaker.on_abandon(ticket)
                    raise
                if ticket or (breaker is not None and not breaker.quiet):  # else nothing to do
                    breaker.on_success(ticket)  # type: ignore[union-attr]
                return self._succeeded(value, attempts, started, clock, key, codec)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled/interrupted: still a call
                self.collector.count_interrupted()
            raise
        finally:
            if mark is not None:
                OUTER_SERVES.reset(mark)
            if call is not None:
                call.give()
            elif limit is not None:
                limit.release()
            if token is not None:
                _leave_deadline(token)

    def _degrade(self, plan: _Degrade, call: _Call) -> Served[Any]:
        self._check(plan)
        served = self._serve(plan, call)
        if served is None:
            self._give_up(plan)
        return served  # type: ignore[return-value]

    def _serve(self, plan: _Degrade, call: _Call) -> Served[Any] | None:
        """The fallback chain: a degraded answer, or None when there is none to serve."""
        for index, fb in enumerate([*self.fallback_fns, *call.fallbacks]):
            try:
                value = fb(*call.args, **call.kwargs)
            except Exception as exc:
                self._fallback_failed(plan, index, exc)
                continue
            return self._degraded(plan, value, "fallback", index=index)
        served = self._lookup(plan, call.key, call.codec)
        if served is not None:
            return served
        return self._generic(plan, call.generic)

    def _opened(self, verdict: ErrorVerdict, ticket: int) -> bool:
        """The circuit is open after a retryable failure (`_failed` stopped the retries) of
        an attempt that was not a half-open probe (a failed probe is the outcome the call
        waited for: the upstream is still down)."""
        breaker = self.breaker
        return (
            breaker is not None
            and ticket < PROBE
            and verdict.retryable
            and breaker.retry_after() > 0
        )

    def _refused(self, plan: _Degrade, call: _Call, opened: bool = False) -> Served[Any] | None:
        """The circuit refused the call (`opened`: opened while the call was retrying, its
        error is the upstream's): a degraded answer at once if there is one. With nothing
        to degrade to, wait (permit given back) for the next probe if its verdict can come
        within the call's deadline: None means "ask the breaker again"; else the error."""
        served = self._serve(plan, call)
        if served is not None:
            return served
        breaker = self.breaker
        if breaker is not None and _waits_for_probe(plan.error, opened):
            call.give()  # waiting is not in flight
            waited = breaker.wait_recovery(_deadline.patience())
            try:
                call.take()
            except QueueFullError as rejected:
                rejected = self._requeue_rejected(rejected, plan.error)
                return self._degrade(self._plan(rejected, plan.attempts, plan.started), call)
            if waited:
                return None
        self._give_up(plan)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _arefused(
        self, plan: _Degrade, call: _Call, opened: bool = False
    ) -> Served[Any] | None:
        served = await self._aserve(plan, call)
        if served is not None:
            return served
        breaker = self.breaker
        if breaker is not None and _waits_for_probe(plan.error, opened):
            await call.agive()
            waited = await breaker.await_recovery(_deadline.patience())
            try:
                await call.atake()
            except QueueFullError as rejected:
                rejected = self._requeue_rejected(rejected, plan.error)
                return await self._adegrade(self._plan(rejected, plan.attempts, plan.started), call)
            if waited:
                return None
        self._give_up(plan)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- async driver ---------------------------------------------------------------------
    async def aexecute(
        self,
        fn: Callable[..., Awaitable[T]],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        key: Any = _NO_KEY,
        codec: Codec | None = None,
        fallbacks: Sequence[Callable[..., Any]] = (),
        generic: Callable[[BaseException], Any] | bool | None = None,
        cache: CacheHooks | None = None,
        pace: PaceRequest | None = None,
    ) -> Served[T]:
        """Async twin of `execute`; attempts past the attempt timeout/deadline are cancelled."""
        if cache is not None:
            key = cache
        request: _Request = (args, kwargs, key, codec, fallbacks, generic, pace)
        strategy = self.retry
        clock = get_clock(strategy.clock)
        now = clock.monotonic()
        token, left = _enter_deadline(self.deadline, clock, now)  # as in `execute`
        if left is not None and left <= 0.0:
            return await self._adegrade(self._expired(clock), _Call(request, None, False))
        limit = self.limit
        call: _Call | None = None  # built at the first failure, as in `execute`
        limiter = self.rate_limiter
        if limiter is not None:  # deadline -> pacing -> permit -> breaker
            try:
                turn = self._pace(limiter, pace)
                if not isinstance(turn, RateLimitedError) and turn[0] > 0.0:
                    await limiter.await_(pace or self._default_pace, *turn)
            except BaseException:
                if token is not None:
                    _leave_deadline(token)
                raise
            if isinstance(turn, RateLimitedError):
                try:
                    call = _Call(request, limit, False)
                    return await self._adegrade(self._plan(turn, 0, clock.monotonic()), call)
                finally:
                    if token is not None:
                        _leave_deadline(token)
        if limit is not None:
            try:
                await limit.aacquire()
            except QueueFullError as exc:
                try:
                    call = _Call(request, limit, False)
                    return await self._adegrade(self._plan(exc, 0, clock.monotonic()), call)
                finally:
                    if token is not None:
                        _leave_deadline(token)
            except BaseException as exc:
                if not isinstance(exc, Exception):  # cancelled while waiting
                    self.collector.count_interrupted()
                if token is not None:
                    _leave_deadline(token)
                raise
        serves = fallbacks or (self._serves if generic is None else generic is not False)
        mark = OUTER_SERVES.set(True) if serves else None
        try:
            started = now  # the call's time includes its wait for a permit
            count_attempt(strategy, self.name, 1, started)
            run: RetryRun | None = None
            attempts = 1
            if left is not None and limit is not None:  # what the permit wait left
                left -= clock.monotonic() - now
            timeout = attempt_timeout_for(self.attempt_timeout, left)
            breaker = self.breaker
            while True:
                if breaker is None or breaker.quiet:  # as in `execute`
                    ticket = ADMITTED_CLEAN
                else:
                    try:
                        ticket = await breaker.aadmit()
                    except CircuitOpenError as exc:
                        if call is None:
                            call = _Call(request, limit, True)
                        plan = self._plan(exc, attempts - 1, started)
                        served = await self._arefused(plan, call)
                        if served is None:
                            continue
                        return served
                try:
                    value = await run_with_timeout(
                        fn(*args, **kwargs) if kwargs else fn(*args), timeout
                    )
                except Exception as exc:
                    if call is None:
                        call = _Call(request, limit, True)
                    if run is None:
                        run = self._new_run(started, attempts)
                    verdict, delay = self._failed(run, exc, ticket, call)
                    if delay is None:
                        plan = self._plan(exc, attempts, started, verdict)
                        if not self._opened(verdict, ticket):
                            return await self._adegrade(plan, call)
                        served = await self._arefused(plan, call, opened=True)
                        if served is not None:
                            return served
                        run, attempts = None, attempts + 1  # as in `execute`
                        continue
                    rejected = await self._apause(call, run, delay, exc)
                    if rejected is not None:
                        plan = self._plan(rejected, attempts, started)
                        return await self._adegrade(plan, call)
                    timeout = run.start_attempt()
                    attempts = run.attempts
                    continue
                except BaseException:
                    if breaker is not None:
                        await breaker.aon_abandon(ticket)
                    raise
                if ticket or (breaker is not None and not breaker.quiet):
                    await breaker.aon_success(ticket)  # type: ignore[union-attr]
                if key is not _NO_KEY:
                    await self._astore(key, value, codec)
                return self._succeeded(value, attempts, started, clock, _NO_KEY, None)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled/interrupted: still a call
                self.collector.count_interrupted()
            raise
        finally:
            if mark is not None:
                OUTER_SERVES.reset(mark)
            if call is not None:
                await call.agive()
            elif limit is not None:
                await limit.arelease()
            if token is not None:
                _leave_deadline(token)

    async def _adegrade(self, plan: _Degrade, call: _Call) -> Served[Any]:
        self._check(plan)
        served = await self._aserve(plan, call)
        if served is None:
            self._give_up(plan)
        return served  # type: ignore[return-value]

    async def _aserve(self, plan: _Degrade, call: _Call) -> Served[Any] | None:
        for index, fb in enumerate([*self.fallback_fns, *call.fallbacks]):
            try:
                value = fb(*call.args, **call.kwargs)
                if inspect.isawaitable(value):
                    value = await value
            except Exception as exc:
                self._fallback_failed(plan, index, exc)
                continue
            return self._degraded(plan, value, "fallback", index=index)
        served = await self._alookup(plan, call.key, call.codec)
        if served is not None:
            return served
        return self._generic(plan, call.generic)

    # -- streams --------------------------------------------------------------------------
    def execute_stream(
        self,
        fn: Callable[..., Iterable[T]],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        key: Any = _NO_KEY,
        codec: Codec | None = None,
        fallbacks: Sequence[Callable[..., Iterable[T]]] = (),
        generic: Callable[[BaseException], Iterable[T]] | bool | None = None,
        cache: CacheHooks | None = None,
        on_served: Callable[[Served[None]], None] | None = None,
        pace: PaceRequest | None = None,
    ) -> Iterator[T]:
        """Stream with retries before the first item only; after it, errors propagate.

        A degraded stream yields the fallback's items (cache `codec.decode` must return an
        iterable of items). `codec.encode` receives the list of all items of a complete
        live stream. `on_served` is told how the stream is served before its first item.
        `cache` replaces the key-based cache (its `store` gets the list of items).
        """
        if cache is not None:
            key = cache
        call = _Call((args, kwargs, key, codec, fallbacks, generic, pace), self.limit, False)
        breaker = self.breaker
        plan: _Degrade | None = None  # set when the stream is served degraded
        # The deadline bounds the attempts until the first item; it is left before the
        # first yield (a generator must not leave its context variable set in the caller's).
        clock = get_clock(self.retry.clock)
        token, left = _enter_deadline(self.deadline, clock, clock.monotonic())
        served: Served[Any] | None = None  # ... and how, if decided already
        try:
            try:
                if left is not None and left <= 0.0:
                    plan = self._expired(clock)
                else:
                    if self.rate_limiter is not None:  # deadline -> pacing -> permit
                        self._published(self.rate_limiter.acquire, pace, self.deadline)
                    call.take()
            except QueueFullError as exc:
                plan = self._plan(exc, 0, get_clock(self.clock).monotonic())
            run = self._new_run()  # after the permit: waiting for one is not the call's time
            while plan is None:
                run.start_attempt()
                ticket = ADMITTED_CLEAN
                try:
                    if breaker is not None:
                        ticket = breaker.admit()
                    iterator = iter(fn(*call.args, **call.kwargs))
                    first = next(iterator)
                except StopIteration:
                    iterator, first = iter(()), _NO_KEY
                except CircuitOpenError as exc:
                    plan = self._plan(exc, run.attempts - 1, run.started)
                    served = self._refused(plan, call)
                    if served is None:  # waited for the next probe: ask again
                        plan, run.attempts = None, run.attempts - 1
                    continue
                except Exception as exc:
                    verdict, delay = self._failed(run, exc, ticket, call)
                    if delay is None:
                        plan = self._plan(exc, run.attempts, run.started, verdict)
                    else:
                        rejected = self._pause(call, run, delay, exc)
                        if rejected is not None:
                            plan = self._plan(rejected, run.attempts, run.started)
                    continue
                except BaseException:
                    if breaker is not None:
                        breaker.on_abandon(ticket)
                    raise
                break
            if plan is not None:
                if served is None:
                    served = self._degrade(plan, call)
                if token is not None:
                    _leave_deadline(token)
                    token = None
                if on_served is not None:
                    on_served(_served_record(served))
                yield from _items_of(served.value)
                return
            if token is not None:
                _leave_deadline(token)
                token = None
            if on_served is not None:
                on_served(Served(None, "live", run.attempts))
            items: list[T] | None = [] if self._remembers(key) else None
            try:
                if first is not _NO_KEY:
                    if items is not None:
                        items.append(first)
                    yield first
                for item in iterator:
                    if items is not None:
                        items.append(item)
                    yield item
            except Exception as exc:
                verdict = self.classify(exc)
                if breaker is not None:
                    breaker.on_failure(exc, ticket, verdict)
                self._publish_failure(self._plan(exc, run.attempts, run.started, verdict))
                raise
            except BaseException:  # closed early (GeneratorExit) or interrupted
                close_upstream(iterator)  # before `finally` hands the permit on
                if breaker is not None:
                    breaker.on_abandon(ticket)
                raise
            if breaker is not None:
                breaker.on_success(ticket)
            # `items` is None exactly when nothing would keep it (see `_remembers`)
            self._succeeded(items, run.attempts, run.started, run.clock, key, codec)
        finally:
            call.give()
            if token is not None:
                _leave_deadline(token)

    def _remembers(self, key: Any) -> bool:
        """Will a live answer under `key` be kept (so a stream must collect its items)?"""
        return isinstance(key, CacheHooks) or (key is not _NO_KEY and self.fallbacks is not None)

    async def aexecute_stream(
        self,
        fn: Callable[..., AsyncIterator[T] | Awaitable[AsyncIterator[T]]],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        key: Any = _NO_KEY,
        codec: Codec | None = None,
        fallbacks: Sequence[Callable[..., Any]] = (),
        generic: Callable[[BaseException], Any] | bool | None = None,
        cache: CacheHooks | None = None,
        on_served: Callable[[Served[None]], None] | None = None,
        pace: PaceRequest | None = None,
    ) -> AsyncIterator[T]:
        """Async twin of `execute_stream` (`fn` returns an async iterator, or a coroutine of one)."""
        if cache is not None:
            key = cache
        call = _Call((args, kwargs, key, codec, fallbacks, generic, pace), self.limit, False)
        breaker = self.breaker
        plan: _Degrade | None = None  # set when the stream is served degraded
        clock = get_clock(self.retry.clock)
        token, left = _enter_deadline(self.deadline, clock, clock.monotonic())  # as above
        served: Served[Any] | None = None
        try:
            try:
                if left is not None and left <= 0.0:
                    plan = self._expired(clock)
                else:
                    if self.rate_limiter is not None:  # deadline -> pacing -> permit
                        await self._apublished(pace, self.deadline)
                    await call.atake()
            except QueueFullError as exc:
                plan = self._plan(exc, 0, get_clock(self.clock).monotonic())
            run = self._new_run()  # after the permit: waiting for one is not the call's time
            while plan is None:
                timeout = run.start_attempt()
                ticket = ADMITTED_CLEAN
                try:
                    if breaker is not None:
                        ticket = await breaker.aadmit()
                    stream: Any = fn(*call.args, **call.kwargs)
                    if inspect.isawaitable(stream):
                        stream = await run_with_timeout(stream, timeout)
                    iterator = stream.__aiter__()
                    first = await run_with_timeout(iterator.__anext__(), timeout)
                except StopAsyncIteration:
                    first = _NO_KEY
                except CircuitOpenError as exc:
                    plan = self._plan(exc, run.attempts - 1, run.started)
                    served = await self._arefused(plan, call)
                    if served is None:
                        plan, run.attempts = None, run.attempts - 1
                    continue
                except Exception as exc:
                    verdict, delay = self._failed(run, exc, ticket, call)
                    if delay is None:
                        plan = self._plan(exc, run.attempts, run.started, verdict)
                    else:
                        rejected = await self._apause(call, run, delay, exc)
                        if rejected is not None:
                            plan = self._plan(rejected, run.attempts, run.started)
                    continue
                except BaseException:
                    if breaker is not None:
                        await breaker.aon_abandon(ticket)
                    raise
                break
            if plan is not None:
                if served is None:
                    served = await self._adegrade(plan, call)
                if token is not None:
                    _leave_deadline(token)
                    token = None
                if on_served is not None:
                    on_served(_served_record(served))
                value = served.value
                if hasattr(value, "__aiter__") and not isinstance(value, (str, bytes)):
                    async for item in value:
                        yield item
                else:
                    for item in _items_of(value):
                        yield item
                return
            if token is not None:
                _leave_deadline(token)
                token = None
            if on_served is not None:
                on_served(Served(None, "live", run.attempts))
            items: list[T] | None = [] if self._remembers(key) else None
            try:
                if first is not _NO_KEY:
                    if items is not None:
                        items.append(first)
                    yield first
                    async for item in iterator:
                        if items is not None:
                            items.append(item)
                        yield item
            except Exception as exc:
                verdict = self.classify(exc)
                if breaker is not None:
                    await breaker.aon_failure(exc, ticket, verdict)
                self._publish_failure(self._plan(exc, run.attempts, run.started, verdict))
                raise
            except BaseException:  # closed early (GeneratorExit), cancelled or interrupted
                await aclose_upstream(iterator)  # before `finally` hands the permit on
                if breaker is not None:
                    await breaker.aon_abandon(ticket)
                raise
            if breaker is not None:
                await breaker.aon_success(ticket)
            self._succeeded(None, run.attempts, run.started, run.clock, _NO_KEY, None)
            if items is not None:
                await self._astore(key, items, codec)
        finally:
            await call.agive()
            if token is not None:
                _leave_deadline(token)

    # -- introspection --------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts, error and degraded rates, retries, transitions, fallbacks, latency, gauges."""
        snapshot = self.collector.stats()
        snapshot["name"] = self.name
        return snapshot

    def reset_stats(self) -> None:
        self.collector.reset()

    def add_listener(self, listener: Listener) -> None:
        """Subscribe to this policy's events and its components'."""
        for bus in (
            self.retry.events,
            self.breaker.events if self.breaker else None,
            _bus_of(self.limit),
            _bus_of(self.rate_limiter),
            self.events,
        ):
            if bus is not None:
                bus.add(listener)

    def describe(self) -> dict[str, Any]:
        """The effective settings, as plain data."""
        return {
            "name": self.name,
            "retry": self.retry.describe() if self._has_retry else None,
            "breaker": self.breaker.describe() if self.breaker else None,
            "fallbacks": self.fallbacks.describe() if self.fallbacks else None,
            "limit": {
                "name": self.limit.name,
                "max_concurrency": self.limit.max_concurrency,
                "max_waiting": self.limit.max_waiting,
                "wait_timeout": self.limit.wait_timeout,
                "distributed": self.limit.distributed,
            }
            if self.limit
            else None,
            "attempt_timeout": self.attempt_timeout,
            "deadline": self.deadline,
            "generic_fallback": self.generic_fallback
            if isinstance(self.generic_fallback, (bool, str))
            else "callable",
            "fallback_fns": len(self.fallback_fns),
            "failover": self.failover,
        }

    def __repr__(self) -> str:
        return f"ResiliencePolicy(name={self.name!r})"
