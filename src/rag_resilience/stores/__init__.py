"""Stores for shared state. Memory is the default; SQLite and Redis share across processes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import JSON, Store
from .memory import MemoryStore

if TYPE_CHECKING:
    from .redis import RedisStore
    from .sqlite import SQLiteStore

__all__ = ["JSON", "MemoryStore", "RedisStore", "SQLiteStore", "Store"]


def __getattr__(name: str) -> Any:
    # SQLite and Redis load lazily: the core imports no optional dependency.
    if name == "SQLiteStore":
        from .sqlite import SQLiteStore

        return SQLiteStore
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
