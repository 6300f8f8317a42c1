"""Last-known-good answers: serve the previous good result, with its age, when live fails.

Served only on failure and always annotated with its age, so stale data is never
mistaken for fresh. Entries expire after `ttl` and the cache is bounded (LRU), so it
never grows without limit. Entries live in a `Store`: memory by default, SQLite to
survive restarts, Redis to share across replicas (JSON values there, never pickle).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

from . import _validate as _v
from ._counter import AtomicCounter
from .clock import Clock, get_clock
from .stores.base import Store
from .stores.memory import MemoryStore

__all__ = ["DEFAULT_GENERIC_ANSWER", "GracefulFallbacks", "stable_key"]

DEFAULT_GENERIC_ANSWER = (
    "I'm sorry, I can't answer that right now: the AI service I depend on is temporarily "
    "unavailable. Please try again in a few minutes."
)
BUSY_ANSWER = "System is experiencing high load. Please try again shortly."

_MAX_PLAIN_KEY = 200


def stable_key(value: Any) -> str:
    """A key that is the same in every process: short strings as is, anything else hashed.

    Non-string values are serialised as canonical JSON (sorted keys; unknown objects by
    `repr`) and hashed with SHA-256, so a key never depends on Python's per-process
    `hash()` randomisation.
    """
    if isinstance(value, str) and len(value) <= _MAX_PLAIN_KEY:
        return value
    if isinstance(value, str):
        payload = value
    else:
        payload = json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


class GracefulFallbacks:
    """The seed's fallback cache: `update_cache`, `get_last_known_good` -> (value, age_s)."""

    def __init__(
        self,
        ttl: float | None = 86_400.0,
        max_entries: int | None = 10_000,
        *,
        name: str = "fallbacks",
        store: Store | None = None,
        generic_answer: str = DEFAULT_GENERIC_ANSWER,
        clock: Clock | None = None,
    ) -> None:
        _v.positive("ttl", ttl, none_ok=True)
        _v.integer("max_entries", max_entries, 1, none_ok=True)
        self.ttl = ttl
        self.max_entries = max_entries
        self.name = name
        self.store: Store = store if store is not None else MemoryStore()
        self.namespace = f"rag_resilience:{name}:cache"
        self.generic_answer = generic_answer
        self.clock = clock
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._writes = AtomicCounter()

    @property
    def writes(self) -> int:
        """Answers stored so far (exact under threads; counted without a lock per write)."""
        return self._writes.value

    def _now(self) -> float:
        return get_clock(self.clock).time()

    def update_cache(self, query: Any, response: Any) -> None:
        """Remember `response` as the last good answer for `query`."""
        # Runs after every live answer: the common short-string key and the clock are
        # resolved inline (same results as `stable_key` and `_now`).
        key = query if type(query) is str and len(query) <= _MAX_PLAIN_KEY else stable_key(query)
        clock = self.clock
        self.store.cache_set(
            self.namespace,
            key,
            response,
            stored_at=(clock if clock is not None else get_clock()).time(),
            ttl=self.ttl,
            max_entries=self.max_entries,
        )
        self._writes.add()

    async def aupdate_cache(self, query: Any, response: Any) -> None:
        await self.store.acache_set(
            self.namespace,
            stable_key(query),
            response,
            stored_at=self._now(),
            ttl=self.ttl,
            max_entries=self.max_entries,
        )
        self._writes.add()

    def age_of(self, query: Any) -> float | None:
        """Seconds since `query`'s answer was stored, None if there is none. Not counted as
        a hit or a miss: it is a check before writing, not a fallback."""
        # Checked after every live embedding: resolved inline, as in `update_cache`.
        key = query if type(query) is str and len(query) <= _MAX_PLAIN_KEY else stable_key(query)
        clock = self.clock
        now = (clock if clock is not None else get_clock()).time()
        found = self.store.cache_get(self.namespace, key, now)
        if found is None:
            return None
        age = now - found[1]
        return age if age > 0.0 else 0.0

    def get_last_known_good(self, query: Any) -> tuple[Any, float] | None:
        """`(response, age_seconds)` for `query`, or None if unknown or expired."""
        now = self._now()
        found = self.store.cache_get(self.namespace, stable_key(query), now)
        return self._count(found, now)

    async def aget_last_known_good(self, query: Any) -> tuple[Any, float] | None:
        now = self._now()
        found = await self.store.acache_get(self.namespace, stable_key(query), now)
        return self._count(found, now)

    def _count(self, found: tuple[Any, float] | None, now: float) -> tuple[Any, float] | None:
        with self._lock:
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
        value, stored_at = found
        return value, max(0.0, now - stored_at)

    def get_cached_or_fallback(self, query: Any, fallback: Any) -> Any:
        """The cached answer for `query` if any, else `fallback`."""
        found = self.get_last_known_good(query)
        return found[0] if found is not None else fallback

    def get_generic_answer(self, query: Any = None) -> str:
        """A helpful message for when nothing is cached: better than a stack trace."""
        return self.generic_answer

    def invalidate(self, query: Any) -> None:
        self.store.cache_delete(self.namespace, stable_key(query))

    def clear(self) -> None:
        self.store.cache_clear(self.namespace)

    def __len__(self) -> int:
        return self.store.cache_len(self.namespace, self._now())

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self),
            "max_entries": self.max_entries,
            "ttl_s": self.ttl,
            "hits": self.hits,
            "misses": self.misses,
            "writes": self.writes,
            "store": type(self.store).__name__,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ttl": self.ttl,
            "max_entries": self.max_entries,
            "store": type(self.store).__name__,
        }
