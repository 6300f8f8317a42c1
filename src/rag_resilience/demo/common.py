"""What both demo apps share: the documents, the demo policy, and the app interface.

The demo runs in real time (no fake clock), so its policies use the "balanced" preset's
numbers with every delay scaled down (see `DEMO_SETTINGS`); the demo prints them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..breaker import CircuitBreaker
from ..fallback import GracefulFallbacks
from ..limits import ConcurrencyLimit
from ..policy import ResiliencePolicy
from ..retry import RetryStrategy

__all__ = [
    "API_KEY",
    "DEMO_SETTINGS",
    "DOCUMENTS",
    "USER_TIMEOUT_S",
    "RagApp",
    "Reply",
    "demo_policies",
    "timed",
]

API_KEY = "sk-demo"
"""Any key works against the chaos server; it is never sent anywhere else."""

USER_TIMEOUT_S = 4.0
"""How long the demo's "user" waits for one answer before giving up (like a gateway timeout).

It only matters for the unwrapped apps: LlamaIndex's OpenAIEmbedding retries for up to 60 s
by default, and the demo must not stall on it. Async calls are cancelled at this point,
so the abandoned retries stop too."""

DOCUMENTS: tuple[str, ...] = (
    "A circuit breaker stops calling an upstream service after repeated failures, "
    "fails fast while open, and probes the service again after a recovery timeout.",
    "Exponential backoff with jitter spaces retries out so that many clients do not retry "
    "at the same moment and overload a recovering service.",
    "A last-known-good cache serves the previous successful answer, with its age, when the "
    "live service fails, so users see a slightly stale answer instead of an error.",
    "A bounded request queue with a concurrency limit provides backpressure: excess "
    "requests are rejected quickly instead of exhausting memory during a traffic spike.",
    "Retrieval-augmented generation embeds the question, retrieves similar documents from "
    "a vector store, and asks a language model to answer using those documents.",
    "Errors such as 400 or 401 are the caller's own mistakes and are never retried; 429, "
    "500, 502, 503 and 504 are transient and worth retrying with backoff.",
)

DEMO_SETTINGS: dict[str, Any] = {
    "max_retries": 4,
    "initial_delay": 0.05,
    "max_delay": 0.5,
    "failure_threshold": 10,
    "recovery_timeout": 2.0,
    "attempt_timeout": 3.0,
    "deadline": 6.0,
    "max_concurrency": 8,
    "max_waiting": 92,
}
"""The demo's policy. Waits are scaled down for a real-time demo (the presets use an initial
delay of 0.5-2 s, recovery of 30-120 s, deadlines of 30-120 s). 4 retries and a threshold of
10 failures in a row (the "aggressive" preset's) keep a 60% failure rate from opening the
circuit while a real outage opens it within two questions. The app-level limit (8 in
flight, 92 waiting) mirrors the seed's spike demo, where a queue of 100 absorbs 100 of 150
requests."""


def demo_policies(prefix: str, seed: int = 0) -> dict[str, ResiliencePolicy]:
    """The wrapped app's policies: ``embeddings`` and ``llm`` share one breaker (one upstream,
    the OpenAI API: an outage seen by either opens it for both), ``app`` guards the whole
    chain: bounded concurrency and queue, last-known-good answers, generic message."""
    cfg = DEMO_SETTINGS
    breaker = CircuitBreaker(
        cfg["failure_threshold"],
        cfg["recovery_timeout"],
        min_recovery_timeout=cfg["recovery_timeout"],
        name=f"{prefix}-openai",
    )
    policies: dict[str, ResiliencePolicy] = {}
    for index, role in enumerate(("embeddings", "llm")):
        name = f"{prefix}-{role}"
        retry = RetryStrategy(
            max_retries=cfg["max_retries"],
            initial_delay=cfg["initial_delay"],
            max_delay=cfg["max_delay"],
            deadline=cfg["deadline"],
            attempt_timeout=cfg["attempt_timeout"],
            name=name,
            rng=random.Random(seed * 10 + index),
        )
        policies[role] = ResiliencePolicy(
            retry,
            breaker,
            GracefulFallbacks(name=name),
            ConcurrencyLimit(64, max_waiting=1000, name=name),
            name=name,
        )
    name = f"{prefix}-app"
    policies["app"] = ResiliencePolicy(
        None,
        None,
        GracefulFallbacks(name=name),
        ConcurrencyLimit(cfg["max_concurrency"], max_waiting=cfg["max_waiting"], name=name),
        name=name,
        generic_fallback=True,
    )
    return policies


@dataclass
class Reply:
    """What one user got back for one question."""

    answer: str
    source: str  # live | cache | generic_fallback | rejected | error | timeout
    degraded: bool = False
    age_s: float | None = None
    error: str | None = None
    latency_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """The user saw an error (an exception or a timeout), not an answer."""
        return self.source in ("error", "timeout")


class RagApp(Protocol):
    """One small RAG app, wrapped by rag-resilience or not."""

    framework: str
    wrapped: bool

    async def aask(self, question: str) -> Reply:
        """Answer one question; exceptions are the caller's to turn into a `Reply`."""
        ...

    def policies(self) -> dict[str, ResiliencePolicy]:
        """The app's policies by role (empty when unwrapped)."""
        ...


async def timed(call: Callable[[], Awaitable[Reply]], timeout: float = USER_TIMEOUT_S) -> Reply:
    """Run one question as a user would: an exception or a timeout is an error reply."""
    import asyncio

    start = time.perf_counter()
    try:
        reply = await asyncio.wait_for(call(), timeout)
    except asyncio.TimeoutError:
        reply = Reply(
            f"(no answer after {timeout:g} s: the user gave up)",
            "timeout",
            error=f"timed out after {timeout:g} s",
        )
    except Exception as exc:
        reply = Reply(f"ERROR {type(exc).__name__}", "error", error=f"{type(exc).__name__}: {exc}")
    reply.latency_s = time.perf_counter() - start
    return reply
