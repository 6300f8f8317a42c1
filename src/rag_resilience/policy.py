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
the upstream is known to be down. This module builds policies (presets) and holds the
public entry points; the parts and every decision live in `policy_core.py`, the drivers
in `_async/drivers.py`, with their sync twin generated from it (`_sync/drivers.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

from . import _validate as _v
from ._async.drivers import AsyncDrivers
from ._sync.drivers import SyncDrivers
from .backoff import RetryBudget
from .breaker import CircuitBreaker
from .classify import Classifier
from .clock import Clock
from .events import Listener
from .fallback import GracefulFallbacks
from .limits import ConcurrencyLimit
from .policy_core import _NO_KEY, CacheHooks, Codec, Served, T
from .probewait import default_probe_wait
from .ratelimit import RateLimiter
from .retry import RetryStrategy
from .slowstart import SlowStart
from .stores.base import Store

__all__ = ["PRESETS", "CacheHooks", "Codec", "ResiliencePolicy", "Served"]

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


class ResiliencePolicy(SyncDrivers, AsyncDrivers):
    """Composition of ConcurrencyLimit, RetryStrategy, CircuitBreaker and GracefulFallbacks.

    Any part may be None (not used). `generic_fallback`: False (re-raise), True (the
    default messages), a string, or a callable `error -> value`. `fallback_fns` are
    tried in order with the call's own arguments after the primary gives up.
    """

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
