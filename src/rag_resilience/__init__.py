"""rag-resilience: retry, circuit breakers, last-known-good fallbacks and backpressure
for LLM and RAG applications.

The public API is re-exported here; integrations live in `rag_resilience.langchain`,
`rag_resilience.llama_index` and `rag_resilience.openai_client` and load their
framework only when imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backoff import RetryBudget
from .breaker import CircuitBreaker, CircuitState
from .classify import ErrorVerdict, classify_error, make_classifier
from .clock import Clock, SystemClock, get_clock, set_default_clock
from .errors import (
    CircuitOpenError,
    DeadlineExceededError,
    MalformedResponseError,
    QueueFullError,
    RateLimitedError,
    ResilienceError,
    RetryBudgetExceededError,
    UpstreamUnavailableError,
    WaitTimeoutError,
)
from .events import (
    Event,
    EventBus,
    EventKind,
    LoggingListener,
    StatsCollector,
    add_listener,
    remove_listener,
)
from .fallback import GracefulFallbacks, stable_key
from .limits import ConcurrencyLimit, QueueWorker, RequestQueue
from .policy import PRESETS, Codec, ResiliencePolicy, Served
from .ratelimit import RateLimiter
from .retry import RetryStrategy, with_retry
from .stores import MemoryStore, Store

if TYPE_CHECKING:
    from .ingest import PartialEmbeddingError
    from .openai_client import AsyncResilientOpenAIClient, ResilientOpenAIClient
    from .stores.redis import RedisStore
    from .stores.sqlite import SQLiteStore

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AsyncResilientOpenAIClient",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "Clock",
    "Codec",
    "ConcurrencyLimit",
    "DeadlineExceededError",
    "ErrorVerdict",
    "Event",
    "EventBus",
    "EventKind",
    "GracefulFallbacks",
    "LoggingListener",
    "MalformedResponseError",
    "MemoryStore",
    "PartialEmbeddingError",
    "QueueFullError",
    "QueueWorker",
    "RateLimitedError",
    "RateLimiter",
    "RedisStore",
    "RequestQueue",
    "ResilienceError",
    "ResiliencePolicy",
    "ResilientOpenAIClient",
    "RetryBudget",
    "RetryBudgetExceededError",
    "RetryStrategy",
    "SQLiteStore",
    "Served",
    "StatsCollector",
    "Store",
    "SystemClock",
    "UpstreamUnavailableError",
    "WaitTimeoutError",
    "__version__",
    "add_listener",
    "classify_error",
    "get_clock",
    "make_classifier",
    "remove_listener",
    "set_default_clock",
    "stable_key",
    "with_retry",
]

_LAZY = {
    "ResilientOpenAIClient": ".openai_client",
    "AsyncResilientOpenAIClient": ".openai_client",
    "SQLiteStore": ".stores.sqlite",
    "RedisStore": ".stores.redis",
    "PartialEmbeddingError": ".ingest",
}


# Submodules reachable as attributes after a plain `import rag_resilience` (the README's
# `rag_resilience.add_listener(rag_resilience.otel.OTelListener())`), imported on first use.
_SUBMODULES = frozenset(
    {"chaos", "deadline", "langchain", "llama_index", "openai_client", "otel", "stores", "testing"}
)


def __getattr__(name: str) -> Any:
    # Optional dependencies (openai, redis, frameworks) load only when these names are used.
    from importlib import import_module

    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module, __name__), name)
