"""The store interface: where breaker state, cache entries and limiter leases live.

Three small families of operations, each what one component needs:

* key/value with an atomic read-modify-write (`update`) for circuit breaker state;
* bounded, expiring cache entries (`cache_get` / `cache_set`) for last-known-good answers;
* leases with expiry (`lease_acquire` / `lease_release`) for a distributed concurrency
  limit, so a crashed process cannot hold a permit forever.

Values are JSON-serialisable (dict, list, str, int, float, bool, None). Stores that
cross a process boundary serialise with `json`, never pickle: a shared cache must not
be a code-execution hole. Times are wall-clock seconds passed in by the caller (the
component's `Clock`), so fake clocks work against every store and hosts agree.

Async twins default to calling the sync method (fine for memory and SQLite, whose
operations are short); network stores override them with real async clients.
Implementations must be safe to use from many threads at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from ..clock import Clock, SystemClock

__all__ = ["JSON", "Store", "UpdateFn", "shared_time"]

JSON = Any  # JSON-serialisable value
R = TypeVar("R")
UpdateFn = Callable[[JSON | None], tuple[JSON | None, R]]


class Store(ABC):
    """Shared state behind CircuitBreaker, GracefulFallbacks and ConcurrencyLimit."""

    #: True when state is visible to other processes (SQLite file, Redis).
    shared: bool = False

    # -- key/value -------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str) -> JSON | None:
        """The value at `key`, or None."""

    @abstractmethod
    def set(self, key: str, value: JSON, ttl: float | None = None) -> None:
        """Store `value` at `key`, expiring after `ttl` seconds if given."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` (no error if absent)."""

    @abstractmethod
    def update(self, key: str, fn: UpdateFn[R], ttl: float | None = None) -> R:
        """Atomically apply `fn` to the value at `key`.

        `fn(current) -> (new_value, result)`; `new_value` None deletes the key. `fn`
        must be pure: optimistic stores may call it more than once. Returns `result`.
        """

    # -- bounded cache ---------------------------------------------------------------
    @abstractmethod
    def cache_get(self, namespace: str, key: str, now: float) -> tuple[JSON, float] | None:
        """`(value, stored_at)` if present and not expired at `now`; refreshes LRU recency."""

    @abstractmethod
    def cache_set(
        self,
        namespace: str,
        key: str,
        value: JSON,
        *,
        stored_at: float,
        ttl: float | None,
        max_entries: int | None,
    ) -> None:
        """Store an entry; evict least recently used entries beyond `max_entries`."""

    @abstractmethod
    def cache_delete(self, namespace: str, key: str) -> None:
        """Drop one entry."""

    @abstractmethod
    def cache_clear(self, namespace: str) -> None:
        """Drop every entry of `namespace`."""

    @abstractmethod
    def cache_len(self, namespace: str, now: float) -> int:
        """Number of live entries in `namespace`."""

    # -- leases ----------------------------------------------------------------------
    @abstractmethod
    def lease_acquire(self, key: str, token: str, limit: int, lease_s: float, now: float) -> bool:
        """Take one of `limit` permits at `key` for `token` until `now + lease_s`.

        Expired leases are dropped first. Re-acquiring a held token renews it.
        Returns False (without blocking) when all permits are held.
        """

    def lease_wait(self, key: str, token: str, limit: int, lease_s: float, now: float) -> bool:
        """`lease_acquire` for a caller that keeps asking until granted: stores that can
        (Redis) queue `token` on its first call and grant in arrival order, so waiters of
        every process are served first come, first served. A waiter that gives up calls
        `lease_release` with its token to leave the queue. Default: `lease_acquire`."""
        return self.lease_acquire(key, token, limit, lease_s, now)

    @abstractmethod
    def lease_release(self, key: str, token: str) -> None:
        """Give back the permit held by `token` (no error if it already expired)."""

    def waiter_rank(self, token: str) -> int | None:
        """Where `token` stood in the waiter queue at its last `lease_wait` (0 = next),
        or None if unknown. Waiters near the front ask again sooner."""
        return None

    def lease_forget(self, key: str, token: str) -> None:
        """Release a lease whose grant the caller never learned (cancelled, interrupted
        or timed out mid-request), or leave the waiter queue: stores whose requests can
        execute late (Redis) also refuse that token any later grant. Default:
        `lease_release`."""
        self.lease_release(key, token)

    @abstractmethod
    def lease_count(self, key: str, now: float) -> int:
        """Permits currently held (unexpired) at `key`."""

    # -- time ------------------------------------------------------------------------
    def server_time(self) -> float | None:
        """The store's own wall clock in seconds, the same for every process that shares
        it (Redis: its `TIME`), or None when the store has none (memory, SQLite)."""
        return None

    # -- async twins -----------------------------------------------------------------
    async def aget(self, key: str) -> JSON | None:
        return self.get(key)

    async def aset(self, key: str, value: JSON, ttl: float | None = None) -> None:
        self.set(key, value, ttl)

    async def adelete(self, key: str) -> None:
        self.delete(key)

    async def aupdate(self, key: str, fn: UpdateFn[R], ttl: float | None = None) -> R:
        return self.update(key, fn, ttl)

    async def acache_get(self, namespace: str, key: str, now: float) -> tuple[JSON, float] | None:
        return self.cache_get(namespace, key, now)

    async def acache_set(
        self,
        namespace: str,
        key: str,
        value: JSON,
        *,
        stored_at: float,
        ttl: float | None,
        max_entries: int | None,
    ) -> None:
        self.cache_set(namespace, key, value, stored_at=stored_at, ttl=ttl, max_entries=max_entries)

    async def alease_acquire(
        self, key: str, token: str, limit: int, lease_s: float, now: float
    ) -> bool:
        return self.lease_acquire(key, token, limit, lease_s, now)

    async def alease_wait(
        self, key: str, token: str, limit: int, lease_s: float, now: float
    ) -> bool:
        return self.lease_wait(key, token, limit, lease_s, now)  # queued, as sync waiters

    async def alease_release(self, key: str, token: str) -> None:
        self.lease_release(key, token)

    async def alease_forget(self, key: str, token: str) -> None:
        await self.alease_release(key, token)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections/files. Idempotent."""

    async def aclose(self) -> None:
        self.close()


def shared_time(store: Store | None, clock: Clock) -> float:
    """Wall time for state shared through `store`: the store's clock when it has one and
    `clock` is a real one (a host whose clock is off by minutes must not expire other
    hosts' leases or keep a circuit open for an hour), else `clock.time()` (fake clocks in
    tests, stores without a clock)."""
    if store is not None and isinstance(clock, SystemClock):
        now = store.server_time()
        if now is not None:
            return now
    return clock.time()
