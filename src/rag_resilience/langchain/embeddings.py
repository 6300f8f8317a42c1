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
from ..embedding_cache import EmbeddingEngine, EmbeddingResult
from ..policy import ResiliencePolicy
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
        self.embeddings = embeddings
        c.warn_nested(embeddings, self.policy, "embeddings")
        self._inner = c.with_timeout(embeddings, self.policy.attempt_timeout)
        self.engine = EmbeddingEngine(self.policy, model_id=identity, batch_size=batch_size)
        self.last_result: EmbeddingResult | None = None
        """How the latest call was served (per sub-batch sources, ages; not its vectors)."""

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    def _done(self, result: EmbeddingResult) -> list[list[float]]:
        vectors, result.vectors = result.vectors, []
        # `last_result` says how the call was served; it must not keep the vectors (a
        # whole document load, otherwise) alive until the next call.
        self.last_result = result
        if result.degraded:
            meta = result.metadata()
            note_degraded(meta)
            c.dispatch_adhoc(c.event_data("embeddings", self.policy, None, **meta))
        return vectors

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
            result = self.engine.embed_one(text, self._inner.embed_query)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done(result)[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        try:
            result = await self.engine.aembed(texts, self._inner.aembed_documents)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done(result)

    async def aembed_query(self, text: str) -> list[float]:
        try:
            result = await self.engine.aembed_one(text, self._inner.aembed_query)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done(result)[0]

    def stats(self) -> dict[str, Any]:
        return self.policy.stats()

    def __repr__(self) -> str:
        return f"ResilientEmbeddings({self.embeddings!r}, policy={self.policy.name!r})"
