"""Retry with exponential backoff and jitter: `RetryStrategy`, `with_retry`.

One state machine (`RetryRun`) decides, per failed attempt, whether and how long to
wait; the sync and async drivers only call the function and sleep. `ResiliencePolicy`
drives the same state machine with a circuit breaker in the loop.

Order of the decision after a failure:
1. the error's verdict (`classify`): not retryable -> stop, the error propagates untouched;
2. attempts left (`max_retries`);
3. the server's Retry-After wins over the computed delay, unless it is longer than
   `max_retry_after` (then waiting is pointless: stop);
4. the total `deadline`: never sleep past it, never start an attempt after it;
5. the retry budget: retries may add at most a fraction of the offered load.
When retries stop for 2-5 the original exception is re-raised with the attempt
history as a note and marked handled (an outer policy will not retry it again).
"""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Awaitable, Callable
from typing import Any, Literal, ParamSpec, TypeVar, overload

from . import _validate as _v
from .backoff import JitterMode, RetryBudget, compute_delay, normalize_jitter
from .classify import Classifier, ErrorVerdict, make_classifier
from .clock import Clock, get_clock
from .deadline import current as _current_deadline
from .errors import DeadlineExceededError, add_note, mark_handled
from .events import EventBus, EventKind, Listener
from .timeouts import run_with_timeout

__all__ = ["RetryRun", "RetryStrategy", "with_retry"]

P = ParamSpec("P")
T = TypeVar("T")

_DEFAULT_BUDGET: Any = object()
_ATTEMPT = EventKind.ATTEMPT  # module globals: enum member lookup is slow before 3.12
_SUCCESS = EventKind.SUCCESS

StopReason = Literal[
    "not_retryable",
    "max_retries",
    "deadline",
    "retry_budget",
    "retry_after_too_long",
    "stopped",
    "failover",
]


class RetryStrategy:
    """How to retry: attempts, backoff, jitter, deadline, budget, classification.

    Seed-compatible: ``RetryStrategy(max_retries=3, initial_delay=0.5,
    exponential_base=2.0, jitter=True).execute(fn, *args, **kwargs)``.
    Instances are reusable and thread-safe; the retry budget is shared by every call
    made through the same strategy.
    """

    def __init__(
        self,
        max_retries: int = 3,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
        exponential_base: float = 2.0,
        jitter: bool | str = True,
        *,
        deadline: float | None = None,
        attempt_timeout: float | None = None,
        max_retry_after: float = 60.0,
        retry_after_jitter: float = 0.0,
        retry_budget: RetryBudget | None = _DEFAULT_BUDGET,
        classifier: Classifier | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        name: str | None = None,
        clock: Clock | None = None,
        listeners: list[Listener] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        _v.integer("max_retries", max_retries, 0)
        _v.at_least("initial_delay", initial_delay, 0)
        _v.at_least("max_delay", max_delay, 0)
        if max_delay < initial_delay:
            raise ValueError(
                f"max_delay must be >= initial_delay ({initial_delay}), got {max_delay}"
            )
        _v.at_least("exponential_base", exponential_base, 1, unit="")
        _v.positive("deadline", deadline, none_ok=True)
        _v.positive("attempt_timeout", attempt_timeout, none_ok=True)
        _v.at_least("max_retry_after", max_retry_after, 0)
        _v.in_range("retry_after_jitter", retry_after_jitter, 0, 1)
        self.max_retries = max_retries
        self.initial_delay = float(initial_delay)
        self.max_delay = float(max_delay)
        self.exponential_base = float(exponential_base)
        self.jitter: JitterMode = normalize_jitter(jitter)
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self.max_retry_after = float(max_retry_after)
        #: Waits after a Retry-After are stretched by up to this fraction (never shortened),
        #: so callers rejected by the same burst do not all come back at the same instant.
        self.retry_after_jitter = float(retry_after_jitter)
        self.retry_budget: RetryBudget | None = (
            RetryBudget(clock=clock) if retry_budget is _DEFAULT_BUDGET else retry_budget
        )
        self.classify: Callable[[BaseException], ErrorVerdict] = make_classifier(classifier)
        self.retry_on = retry_on
        self.name = name
        self.clock = clock
        self.events = EventBus(listeners)
        self.rng = rng

    # -- the schedule -------------------------------------------------------------------
    def compute_delay(self, retry_number: int, previous_delay: float | None = None) -> float:
        """Backoff before retry `retry_number` (1-based), without Retry-After."""
        return compute_delay(
            retry_number,
            initial_delay=self.initial_delay,
            max_delay=self.max_delay,
            exponential_base=self.exponential_base,
            jitter=self.jitter,
            previous_delay=previous_delay,
            rng=self.rng,
        )

    def new_run(
        self,
        name: str | None = None,
        *,
        deadline: float | None = None,
        attempt_timeout: float | None = None,
    ) -> RetryRun:
        """A fresh per-call state machine; `deadline`/`attempt_timeout` override the strategy's."""
        return RetryRun(
            self,
            name or self.name or "retry",
            deadline=deadline if deadline is not None else self.deadline,
            attempt_timeout=attempt_timeout
            if attempt_timeout is not None
            else self.attempt_timeout,
        )

    # -- drivers ------------------------------------------------------------------------
    def execute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `fn(*args, **kwargs)`, retrying per this strategy."""
        run = self.new_run(self.name or _fn_name(fn))
        clock = get_clock(self.clock)
        if run.deadline_at is not None and run.deadline_at <= run.started:
            raise run.spent()
        while True:
            run.start_attempt()
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                delay = run.on_error(exc)
                if delay is None:
                    run.finish_failure(exc)
                    raise
                clock.sleep(delay)
            else:
                run.finish_success()
                return result

    async def aexecute(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Async twin of `execute`; attempts past `attempt_timeout` are cancelled."""
        run = self.new_run(self.name or _fn_name(fn))
        clock = get_clock(self.clock)
        if run.deadline_at is not None and run.deadline_at <= run.started:
            raise run.spent()
        while True:
            timeout = run.start_attempt()
            try:
                result = await run_with_timeout(fn(*args, **kwargs), timeout)
            except Exception as exc:
                delay = run.on_error(exc)
                if delay is None:
                    run.finish_failure(exc)
                    raise
                await clock.asleep(delay)
            else:
                run.finish_success()
                return result

    def describe(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "initial_delay": self.initial_delay,
            "max_delay": self.max_delay,
            "exponential_base": self.exponential_base,
            "jitter": self.jitter,
            "deadline": self.deadline,
            "attempt_timeout": self.attempt_timeout,
            "max_retry_after": self.max_retry_after,
            "retry_after_jitter": self.retry_after_jitter,
            "retry_budget": repr(self.retry_budget) if self.retry_budget else None,
        }

    def __repr__(self) -> str:
        return (
            f"RetryStrategy(max_retries={self.max_retries}, initial_delay={self.initial_delay}, "
            f"max_delay={self.max_delay}, exponential_base={self.exponential_base}, "
            f"jitter={self.jitter!r}, deadline={self.deadline})"
        )


class RetryRun:
    """The per-call retry state machine shared by every driver (sync, async, policy)."""

    __slots__ = (
        "attempt_timeout",
        "attempts",
        "clock",
        "deadline",
        "deadline_at",
        "history",
        "last_delay",
        "name",
        "started",
        "stop_reason",
        "strategy",
    )

    def __init__(
        self,
        strategy: RetryStrategy,
        name: str,
        *,
        deadline: float | None = None,
        attempt_timeout: float | None = None,
        started: float | None = None,
        attempts: int = 0,
    ) -> None:
        """`started`/`attempts` resume a call whose first attempts ran without a run
        (see `count_attempt`): drivers build one only once an attempt has failed."""
        self.strategy = strategy
        self.name = name
        self.clock = get_clock(strategy.clock)
        self.attempts = attempts
        self.started = self.clock.monotonic() if started is None else started
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self.deadline_at = self.started + deadline if deadline is not None else None
        self.last_delay: float | None = None
        self.history: list[str] | None = None
        self.stop_reason: StopReason | None = None
        # The call's deadline in force (deadline.py: an enclosing policy's or scope's)
        # bounds every attempt and backoff sleep of this run when it ends sooner.
        scope = _current_deadline()
        if scope is not None:
            clock = self.clock
            at = scope.expires_at if scope.clock is clock else clock.monotonic() + scope.remaining()
            if self.deadline_at is None or at < self.deadline_at:
                self.deadline_at = at
                self.deadline = round(at - self.started, 3)

    def spent(self) -> DeadlineExceededError:
        """The error for a run whose deadline had passed before its first attempt (an
        enclosing call spent it): no attempt is made. Marked handled; FAILURE published."""
        self.stop_reason = "deadline"
        error = DeadlineExceededError(
            f"rag_resilience[{self.name}]: the call's deadline had passed before it started "
            "(an enclosing call spent it); no attempt made",
            timeout=0.0,
            scope="total",
        )
        mark_handled(error)
        self.finish_failure(error)
        return error

    def remaining(self) -> float | None:
        """Seconds left before the total deadline (None: no deadline)."""
        if self.deadline_at is None:
            return None
        return self.deadline_at - self.clock.monotonic()

    def start_attempt(self) -> float | None:
        """Count an attempt; returns its timeout (attempt_timeout capped by the deadline)."""
        self.attempts += 1
        count_attempt(self.strategy, self.name, self.attempts, self.started)
        if self.deadline_at is None:
            return self.attempt_timeout
        # The first attempt starts now: no need to read the clock again.
        now = self.started if self.attempts == 1 else self.clock.monotonic()
        return attempt_timeout_for(self.attempt_timeout, self.deadline_at - now)

    def on_error(self, exc: BaseException, verdict: ErrorVerdict | None = None) -> float | None:
        """Decide after a failed attempt: seconds to wait before retrying, or None to stop."""
        strategy = self.strategy
        if verdict is None:
            verdict = strategy.classify(exc)
        retryable = verdict.retryable and (
            strategy.retry_on is None or isinstance(exc, strategy.retry_on)
        )
        if not retryable:
            self.stop_reason = "not_retryable"
            return None
        if self.attempts > strategy.max_retries:
            self._stop("max_retries", exc, verdict)
            return None
        retry_after = verdict.retry_after
        if retry_after is not None and retry_after > strategy.max_retry_after:
            self._stop("retry_after_too_long", exc, verdict, retry_after)
            return None
        delay = self.strategy.compute_delay(self.attempts, self.last_delay)
        if retry_after is not None:
            delay = retry_after  # the server knows when it will have capacity
            if strategy.retry_after_jitter:
                rand = strategy.rng.random if strategy.rng is not None else random.random
                delay += retry_after * strategy.retry_after_jitter * rand()
        if self.deadline_at is not None and self.clock.monotonic() + delay >= self.deadline_at:
            self._stop("deadline", exc, verdict, delay)
            return None
        # The budget bounds retries we decide on. A throttled call told when to come back
        # (429 + Retry-After) is paced by the server itself, so it does not spend budget:
        # otherwise bursts above a rate limit would exhaust it and fail calls that would
        # have fitted a moment later.
        server_paced = retry_after is not None and verdict.reason == "rate_limited"
        if (
            not server_paced
            and strategy.retry_budget is not None
            and not strategy.retry_budget.try_spend()
        ):
            self._stop("retry_budget", exc, verdict)
            return None
        self.last_delay = delay
        self._remember(exc, verdict, f"retry in {delay:.2f}s")
        events = strategy.events
        if events.wants(EventKind.RETRY):
            events.publish(
                EventKind.RETRY,
                self.name,
                attempt=self.attempts,
                delay=delay,
                reason=verdict.reason,
                error=exc,
            )
        return delay

    def stop(self, reason: StopReason, exc: BaseException, verdict: ErrorVerdict) -> None:
        """Stop for a reason decided outside (e.g. the circuit opened); annotates `exc`."""
        self._stop(reason, exc, verdict)

    def _stop(
        self,
        reason: StopReason,
        exc: BaseException,
        verdict: ErrorVerdict,
        wait: float | None = None,
    ) -> None:
        self.stop_reason = reason
        detail = {
            "max_retries": f"max_retries={self.strategy.max_retries} reached",
            "deadline": f"the next wait ({wait or 0.0:.2f}s) would pass the "
            f"{self.deadline}s deadline",
            "retry_budget": "retry budget for the window is spent (protecting the upstream)",
            "retry_after_too_long": f"server asked to wait {wait or 0.0:.1f}s, above "
            f"max_retry_after={self.strategy.max_retry_after}s",
            "stopped": "the circuit breaker opened",
            "failover": "failing over to a healthy fallback",
            "not_retryable": "not retryable",
        }[reason]
        self._remember(exc, verdict, "gave up")
        elapsed = self.clock.monotonic() - self.started
        add_note(
            exc,
            f"rag_resilience[{self.name}]: gave up after {self.attempts} attempt(s) in "
            f"{elapsed:.2f}s: {detail}. History: " + "; ".join(self.history or ()),
        )
        mark_handled(exc)
        return None

    def _remember(self, exc: BaseException, verdict: ErrorVerdict, outcome: str) -> None:
        if self.history is None:
            self.history = []
        self.history.append(
            f"#{self.attempts} {type(exc).__name__} ({verdict.reason}) -> {outcome}"
        )

    def finish_success(self) -> None:
        events = self.strategy.events
        if events.routine:
            events.publish(
                _SUCCESS,
                self.name,
                attempt=self.attempts,
                duration=self.clock.monotonic() - self.started,
            )

    def finish_failure(self, exc: BaseException) -> None:
        self.strategy.events.publish(
            EventKind.FAILURE,
            self.name,
            attempt=self.attempts,
            error=exc,
            reason=self.stop_reason,
            duration=self.clock.monotonic() - self.started,
        )


def count_attempt(strategy: RetryStrategy, name: str, attempt: int, started: float) -> None:
    """An attempt's bookkeeping: the first one counts as a request for the retry budget
    (`started` saves a clock read), every one is an ATTEMPT event if anyone listens.
    A plain function so drivers can run a call's first attempt without building a
    `RetryRun`: most calls succeed at once and never need one."""
    if attempt == 1:
        budget = strategy.retry_budget
        if budget is not None:
            # Same clock as the run (the usual case): reuse the start time just read.
            budget.record_request(started if budget._clock is strategy.clock else None)
    events = strategy.events
    if events.routine:
        events.publish(_ATTEMPT, name, attempt=attempt)


def attempt_timeout_for(attempt_timeout: float | None, left: float | None) -> float | None:
    """An attempt's timeout: `attempt_timeout` capped by the `left` seconds of the deadline."""
    if left is None:
        return attempt_timeout
    if left < 0.0:
        left = 0.0
    return left if attempt_timeout is None or left < attempt_timeout else attempt_timeout


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


@overload
def with_retry(fn: Callable[P, T], /) -> Callable[P, T]: ...


@overload
def with_retry(
    fn: None = None,
    /,
    *,
    strategy: RetryStrategy | None = None,
    **strategy_kwargs: Any,
) -> Callable[[Callable[P, T]], Callable[P, T]]: ...


def with_retry(
    fn: Callable[P, T] | None = None,
    /,
    *,
    strategy: RetryStrategy | None = None,
    **strategy_kwargs: Any,
) -> Callable[P, T] | Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorator: retry a sync or async function.

    ``@with_retry``, ``@with_retry(max_retries=3, initial_delay=0.5, jitter=True)`` or
    ``@with_retry(strategy=RetryStrategy(...))``. Arguments are RetryStrategy's.
    """
    if strategy is not None and strategy_kwargs:
        raise ValueError("pass either strategy= or RetryStrategy keyword arguments, not both")

    def decorate(func: Callable[P, T]) -> Callable[P, T]:
        strat = strategy or RetryStrategy(name=_fn_name(func), **strategy_kwargs)
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await strat.aexecute(func, *args, **kwargs)  # type: ignore[arg-type]

            async_wrapper.retry_strategy = strat  # type: ignore[attr-defined]
            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return strat.execute(func, *args, **kwargs)

        wrapper.retry_strategy = strat  # type: ignore[attr-defined]
        return wrapper

    if fn is not None:
        return decorate(fn)
    return decorate
