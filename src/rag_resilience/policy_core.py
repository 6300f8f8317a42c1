"""What `ResiliencePolicy`'s sync and async drivers share: its state, built once in
`PolicyCore.__init__`, and every decision that does not wait (classify a failure, plan the
fallback chain, record a success, publish events). The drivers themselves live in
`_async/drivers.py`, and `_sync/drivers.py` is generated from it (`scripts/unasync.py`),
so each algorithm is written once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from . import _registry
from . import _validate as _v
from ._counter import AtomicCounter
from .breaker import PROBE, CircuitBreaker
from .classify import Classifier, ErrorVerdict, make_classifier
from .clock import Clock, get_clock
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
from .probewait import OUTER_SERVES
from .ratelimit import PaceRequest, RateLimiter
from .retry import RetryRun, RetryStrategy

_logger = logging.getLogger("rag_resilience")

T = TypeVar("T")
_NO_KEY: Any = object()


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


#: What `execute_stream` and `aexecute_stream` call to open a stream.
StreamSource = Callable[..., Iterable[T]]
AsyncStreamSource = Callable[..., AsyncIterator[T] | Awaitable[AsyncIterator[T]]]


class PolicyCore:
    """The policy's parts and shared decisions; `ResiliencePolicy` adds the drivers."""

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

    # -- shared decisions -----------------------------------------------------------------
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

    def _cache_failed(self, what: str) -> None:
        _logger.warning(
            "[%s] fallback cache %s failed; the call goes on without it",
            self.name,
            what,
            exc_info=True,
        )

    def _succeeded(self, value: T, attempts: int, started: float, clock: Clock) -> Served[T]:
        """Record a live answer: count it, publish SUCCESS if anyone listens (the drivers
        keep it in the cache first, `_store`)."""
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

    def _remembers(self, key: Any) -> bool:
        """Will a live answer under `key` be kept (so a stream must collect its items)?"""
        return isinstance(key, CacheHooks) or (key is not _NO_KEY and self.fallbacks is not None)

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
