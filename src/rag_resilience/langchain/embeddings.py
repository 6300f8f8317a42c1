"""`ResilientEmbeddings`: any LangChain `Embeddings` behind the policy, with per-text
last-known-good vectors and sub-batching (both from `EmbeddingEngine`).

When a sub-batch fails after retries it is served from cache only if every text in
it has a cached vector; otherwise the original error is raised. Vectors are never
invented: a generic answer makes no sense for an embedding.
"""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings

from ..adapters import model_identity
from ..degraded import note_degraded
from ..embedding_cache import EmbeddingEngine, EmbeddingResult, Vector, take_vectors
from ..policy import ResiliencePolicy, Served
from ..upstream import join_upstream, upstream_of
from . import _common as c

__all__ = ["ResilientEmbeddings"]


class ResilientEmbeddings(Embeddings):
    """Embeddings with retry, circuit breaker, per-text fallback cache and a concurrency limit.

    >>> embeddings = ResilientEmbeddings(OpenAIEmbeddings(max_retries=0), policy="balanced")

    `batch_size`: texts per upstream call; a failing sub-batch is retried alone.
    """

    def __init__(
        self,
        embeddings: Embeddings | None = None,
        policy: ResiliencePolicy | str | None = None,
        *,
        batch_size: int = 64,
        upstream: str | None = None,
    ) -> None:
        if embeddings is None:
            raise TypeError(
                "ResilientEmbeddings needs the embeddings to wrap: "
                "ResilientEmbeddings(OpenAIEmbeddings(max_retries=0))"
            )
        if not isinstance(embeddings, Embeddings):
            raise TypeError(
                f"embeddings must be a LangChain Embeddings, got {type(embeddings).__name__}"
            )
        if isinstance(embeddings, ResilientEmbeddings):
            raise ValueError("embeddings is already a ResilientEmbeddings; wrap the model once")
        if policy is not None and not isinstance(policy, (str, ResiliencePolicy)):
            raise ValueError(
                "policy must be a ResiliencePolicy, a preset name or None, got "
                f"{type(policy).__name__}"
            )
        identity = model_identity(embeddings)
        self.policy = ResiliencePolicy.resolve(policy, name=f"langchain-embeddings:{identity}")
        # one outage signal per upstream (default: the base URL host): rag_resilience.upstream
        join_upstream(
            self.policy.breaker, upstream_of(embeddings) if upstream is None else upstream
        )
        self.embeddings = embeddings
        c.warn_nested(embeddings, self.policy, "embeddings")
        self._inner = c.with_timeout(embeddings, self.policy.attempt_timeout)
        self.engine = EmbeddingEngine(self.policy, model_id=identity, batch_size=batch_size)
        self._last: EmbeddingResult | Served[Vector] | None = None

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    @property
    def last_result(self) -> EmbeddingResult | None:
        """How the latest call was served (per sub-batch sources, ages; not its vectors:
        a whole document load's vectors must not stay alive until the next call)."""
        last = self._last
        return EmbeddingResult([], [last]) if isinstance(last, Served) else last

    def _done(self, result: EmbeddingResult) -> list[Vector]:
        vectors, result.vectors = result.vectors, []
        self._last = result
        if result.degraded:
            self._degraded(result.metadata())
        return vectors

    def _done_one(self, served: Served[Vector]) -> Vector:
        """`_done` for a query, without building an `EmbeddingResult` on every call."""
        vector: Vector = take_vectors(served)
        self._last = served
        if served.degraded:
            self._degraded(EmbeddingResult([], [served]).metadata())
        return vector

    def _degraded(self, meta: dict[str, Any]) -> None:
        note_degraded(meta)
        c.dispatch_adhoc(c.event_data("embeddings", self.policy, None, **meta))

    def _failed(self, exc: BaseException) -> None:
        c.dispatch_adhoc(c.event_data("embeddings", self.policy, None, exc))

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        try:
            result = self.engine.embed(texts, self._inner.embed_documents)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done(result)

    def embed_query(self, text: str) -> list[float]:
        try:
            served = self.engine.embed_one(text, self._inner.embed_query)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done_one(served)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        try:
            result = await self.engine.aembed(texts, self._inner.aembed_documents)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done(result)

    async def aembed_query(self, text: str) -> list[float]:
        try:
            served = await self.engine.aembed_one(text, self._inner.aembed_query)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done_one(served)

    def stats(self) -> dict[str, Any]:
        return self.policy.stats()

    def __repr__(self) -> str:
        return f"ResilientEmbeddings({self.embeddings!r}, policy={self.policy.name!r})"
