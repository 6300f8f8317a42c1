"""The policy's drivers: one call (or stream) through deadline -> pacing -> permit ->
breaker -> attempts -> fallback chain. Written once: `_async/drivers.py` is the source
and `_sync/drivers.py` is generated from it by `scripts/unasync.py` (httpcore's way), so
the sync and async paths cannot drift apart. Every decision that does not wait lives in `PolicyCore`.

Most calls succeed at once, so that path builds neither a `_Call` (what the fallback
chain needs, and the permit from then on) nor a `RetryRun`: both are built at the first
failure, and until then the permit is held by the driver.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from .. import deadline as _deadline
from .._twins import aiter_items, asettle
from ..breaker import ADMITTED_CLEAN
from ..clock import get_clock
from ..deadline import enter as _enter_deadline
from ..deadline import leave as _leave_deadline
from ..errors import CircuitOpenError, QueueFullError, RateLimitedError
from ..policy_core import (
    _NO_KEY,
    AsyncStreamSource,
    CacheHooks,
    Codec,
    PolicyCore,
    Served,
    T,
    _Call,
    _Degrade,
    _Request,
    _served_record,
    _waits_for_probe,
)
from ..probewait import OUTER_SERVES
from ..ratelimit import PaceRequest
from ..retry import RetryRun, count_attempt
from ..streams import aclose_upstream
from ..timeouts import run_with_timeout  # unasync: drop
from .attempts import astream_of, first_timeout  # unasync: drop

__all__ = ["AsyncDrivers"]


class AsyncDrivers(PolicyCore):
    """`execute`, `execute_stream` and the steps of theirs that wait."""

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
        """The adapters' entry point: explicit args, cache `codec`, extra fallbacks, generic.

        `cache` replaces the key-based last-known-good cache with the caller's own
        (e.g. one entry per text of an embeddings batch). Async attempts past the attempt
        timeout or the deadline are cancelled; sync adapters pass the time left as their
        request timeout (`deadline.py`).
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
            return await self._adegrade(self._expired(clock), _Call(request, None, False))
        limit = self.limit
        call: _Call | None = None
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
                if not isinstance(exc, Exception):  # interrupted or cancelled while waiting
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
            timeout = first_timeout(self.attempt_timeout, left, limit, clock, now)  # unasync: drop
            breaker = self.breaker
            while True:
                if breaker is None or breaker.quiet:  # nothing to check or count
                    ticket = ADMITTED_CLEAN
                else:
                    try:
                        ticket = await breaker.aadmit()  # may wait for a probe's verdict
                    except CircuitOpenError as exc:
                        if call is None:
                            call = _Call(request, limit, True)
                        plan = self._plan(exc, attempts - 1, started)
                        served = await self._arefused(plan, call)
                        if served is None:
                            continue  # waited for the next probe: ask again
                        return served
                try:
                    pending = fn(*args, **kwargs) if kwargs else fn(*args)
                    value = await run_with_timeout(pending, timeout)
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
                        run, attempts = None, attempts + 1  # waited for the probe: try again
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
                if ticket or (breaker is not None and not breaker.quiet):  # else nothing to do
                    await breaker.aon_success(ticket)  # type: ignore[union-attr]
                if key is not _NO_KEY:
                    await self._astore(key, value, codec)
                return self._succeeded(value, attempts, started, clock)
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

    async def aexecute_stream(
        self,
        fn: AsyncStreamSource[T],
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
                    stream = await astream_of(fn(*call.args, **call.kwargs), timeout)
                    iterator = stream.__aiter__()
                    first = await run_with_timeout(iterator.__anext__(), timeout)
                except StopAsyncIteration:
                    first = _NO_KEY
                except CircuitOpenError as exc:
                    plan = self._plan(exc, run.attempts - 1, run.started)
                    served = await self._arefused(plan, call)
                    if served is None:  # waited for the next probe: ask again
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
                async for item in aiter_items(served.value):
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
            self._succeeded(None, run.attempts, run.started, run.clock)
            if items is not None:  # `items` is None exactly when nothing would keep it
                await self._astore(key, items, codec)
        finally:
            await call.agive()
            if token is not None:
                _leave_deadline(token)

    # -- the steps that wait --------------------------------------------------------------
    async def _adegrade(self, plan: _Degrade, call: _Call) -> Served[Any]:
        self._check(plan)
        served = await self._aserve(plan, call)
        if served is None:
            self._give_up(plan)
        return served  # type: ignore[return-value]

    async def _aserve(self, plan: _Degrade, call: _Call) -> Served[Any] | None:
        """The fallback chain: a degraded answer, or None when there is none to serve."""
        for index, fb in enumerate([*self.fallback_fns, *call.fallbacks]):
            try:
                value = await asettle(fb(*call.args, **call.kwargs))
            except Exception as exc:
                self._fallback_failed(plan, index, exc)
                continue
            return self._degraded(plan, value, "fallback", index=index)
        served = await self._alookup(plan, call.key, call.codec)
        if served is not None:
            return served
        return self._generic(plan, call.generic)

    async def _arefused(
        self, plan: _Degrade, call: _Call, opened: bool = False
    ) -> Served[Any] | None:
        """The circuit refused the call (`opened`: opened while the call was retrying, its
        error is the upstream's): a degraded answer at once if there is one. With nothing
        to degrade to, wait (permit given back) for the next probe if its verdict can come
        within the call's deadline: None means "ask the breaker again"; else the error."""
        served = await self._aserve(plan, call)
        if served is not None:
            return served
        breaker = self.breaker
        if breaker is not None and _waits_for_probe(plan.error, opened):
            await call.agive()  # waiting is not in flight
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

    async def _apause(
        self, call: _Call, run: RetryRun, delay: float, cause: BaseException
    ) -> QueueFullError | None:
        """Sleep `delay` without holding the permit; the rejection if it can't be had back
        (or if the next attempt's turn at the rate limit comes after the deadline)."""
        await call.agive()
        await run.clock.asleep(delay)
        try:
            if self.rate_limiter is not None:
                await self._apublished(call.pace, _deadline.remaining())
            await call.atake()
        except QueueFullError as rejected:
            return self._requeue_rejected(rejected, cause)
        return None

    async def _apublished(self, pace: PaceRequest | None, left: float | None) -> None:
        """The limiter's turn for a retry or a stream; a pace-out is published as for a
        first attempt (REJECTED, reason rate_limit_wait)."""
        assert self.rate_limiter is not None
        try:
            await self.rate_limiter.aacquire(pace or self._default_pace, left)
        except RateLimitedError as exc:
            self._pace_rejected(exc)
            raise

    async def _astore(self, key: Any, value: Any, codec: Codec | None) -> None:
        """Keep a live answer under `key`, or through the caller's `CacheHooks`. A failing
        cache (store down, value not encodable) must never turn the user's success into an
        error: it is logged and skipped."""
        try:
            if isinstance(key, CacheHooks):
                await asettle(key.store(value))
            elif key is not _NO_KEY and self.fallbacks is not None:
                await self.fallbacks.aupdate_cache(key, codec.encode(value) if codec else value)
        except Exception:
            self._cache_failed("write")

    async def _alookup(self, plan: _Degrade, key: Any, codec: Codec | None) -> Served[Any] | None:
        try:
            if isinstance(key, CacheHooks):
                found, codec = await asettle(key.lookup()), None
            elif key is not _NO_KEY and self.fallbacks is not None:
                found = await self.fallbacks.aget_last_known_good(key)
            else:
                return None
        except Exception as exc:
            self._fallback_failed(plan, "cache", exc)
            return None
        return self._from_cache(plan, found, codec)
