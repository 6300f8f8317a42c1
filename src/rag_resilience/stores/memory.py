"""The default store: process-local, thread-safe, no serialisation (values kept as given)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from typing import Any, TypeVar

from .base import JSON, Store, UpdateFn

__all__ = ["MemoryStore"]

R = TypeVar("R")

_WAITER_GONE_S = 1.0  # a lease_wait caller silent this long has left the queue


class MemoryStore(Store):
    """Dict-backed store. One lock guards every write; cache reads take none (see
    `cache_get`). Every operation is O(1) amortised."""

    shared = False

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._kv: dict[str, tuple[Any, float | None]] = {}
        self._caches: dict[str, OrderedDict[str, tuple[Any, float, float | None]]] = {}
        self._leases: dict[str, dict[str, float]] = {}
        # waiters of `lease_wait`, oldest first: token -> `now` of its last ask
        self._lease_queues: dict[str, OrderedDict[str, float]] = {}

    # -- key/value
    def _live(self, key: str) -> Any:
        item = self._kv.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and time.monotonic() >= expires:
            del self._kv[key]
            return None
        return value

    def get(self, key: str) -> JSON | None:
        with self._lock:
            return self._live(key)

    def set(self, key: str, value: JSON, ttl: float | None = None) -> None:
        with self._lock:
            self._kv[key] = (value, None if ttl is None else time.monotonic() + ttl)

    def delete(self, key: str) -> None:
        with self._lock:
            self._kv.pop(key, None)

    def update(self, key: str, fn: UpdateFn[R], ttl: float | None = None) -> R:
        with self._lock:
            new, result = fn(self._live(key))
            if new is None:
                self._kv.pop(key, None)
            else:
                self._kv[key] = (new, None if ttl is None else time.monotonic() + ttl)
            return result

    # -- cache
    def cache_get(self, namespace: str, key: str, now: float) -> tuple[JSON, float] | None:
        # Read on every embedding (the freshness check) and every fallback: no lock. Each
        # step is one call into a C dict/OrderedDict, atomic under the GIL, and a
        # concurrent write or eviction can only make the answer one step older.
        entries = self._caches.get(namespace)
        if not entries:
            return None
        item = entries.get(key)
        if item is None:
            return None
        value, stored_at, expires = item
        if expires is not None and now >= expires:
            self._expire(entries, key, item)
            return None
        try:  # noqa: SIM105 - `suppress` costs two Python calls on every read
            entries.move_to_end(key)  # LRU: a read keeps the entry
        except KeyError:  # evicted or deleted meanwhile: the read still stands
            pass
        return value, stored_at

    def _expire(
        self, entries: OrderedDict[str, tuple[Any, float, float | None]], key: str, item: Any
    ) -> None:
        with self._lock:
            if entries.get(key) is item:  # not rewritten meanwhile
                del entries[key]

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
        lock = self._lock  # acquire/release: a `with` costs twice as much, on every answer
        lock.acquire()
        try:
            entries = self._caches.get(namespace)
            if entries is None:
                entries = self._caches[namespace] = OrderedDict()
            entries[key] = (value, stored_at, None if ttl is None else stored_at + ttl)
            entries.move_to_end(key)
            if max_entries is not None:
                while len(entries) > max_entries:
                    entries.popitem(last=False)
        finally:
            lock.release()

    def cache_delete(self, namespace: str, key: str) -> None:
        with self._lock:
            entries = self._caches.get(namespace)
            if entries is not None:
                entries.pop(key, None)

    def cache_clear(self, namespace: str) -> None:
        with self._lock:
            self._caches.pop(namespace, None)

    def cache_len(self, namespace: str, now: float) -> int:
        with self._lock:
            entries = self._caches.get(namespace)
            if not entries:
                return 0
            return sum(1 for _, _, exp in entries.values() if exp is None or exp > now)

    # -- leases
    def lease_acquire(self, key: str, token: str, limit: int, lease_s: float, now: float) -> bool:
        return self._lease(key, token, limit, lease_s, now, wait=False)

    def lease_wait(self, key: str, token: str, limit: int, lease_s: float, now: float) -> bool:
        """First come, first served, as RedisStore (this store is also Redis's fallback)."""
        return self._lease(key, token, limit, lease_s, now, wait=True)

    def _lease(
        self, key: str, token: str, limit: int, lease_s: float, now: float, wait: bool
    ) -> bool:
        with self._lock:
            held = self._leases.setdefault(key, {})
            for t in [t for t, exp in held.items() if exp <= now]:
                del held[t]
            if token in held:
                held[token] = now + lease_s
                return True
            free = limit - len(held)
            queue = self._lease_queues.get(key)
            if not queue:
                if free > 0:
                    held[token] = now + lease_s
                    return True
                if not wait:
                    return False
                queue = self._lease_queues.setdefault(key, OrderedDict())
            for t in [t for t, seen in queue.items() if seen < now - _WAITER_GONE_S]:
                del queue[t]  # stopped asking: gone
            if token not in queue:
                if free > len(queue):
                    held[token] = now + lease_s
                    return True
                if not wait:
                    return False
            queue[token] = now
            if free > 0 and token in itertools.islice(queue, free):
                del queue[token]
                held[token] = now + lease_s
                return True
            return False

    def lease_release(self, key: str, token: str) -> None:
        with self._lock:
            held = self._leases.get(key)
            if held is not None:
                held.pop(token, None)
            queue = self._lease_queues.get(key)
            if queue:
                queue.pop(token, None)

    def lease_count(self, key: str, now: float) -> int:
        with self._lock:
            held = self._leases.get(key, {})
            return sum(1 for exp in held.values() if exp > now)
