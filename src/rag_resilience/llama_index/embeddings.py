"""`ResilientEmbedding`: any LlamaIndex `BaseEmbedding` behind a policy, with per-text
last-known-good vectors.

Only the underscore hooks are implemented, so `BaseEmbedding`'s public methods keep
emitting LlamaIndex's instrumentation events and callbacks exactly once (ours), and the
wrapped model is called through its underscore hooks (no second set of events).

Batching: the base class cuts a document load into `embed_batch_size` batches and hands
each to `_get_text_embeddings`; the embedding engine runs each through the policy as one
sub-batch of the same size, so one request is one policy call and a failing batch is
retried alone. Async batches run concurrently, bounded by the policy's ConcurrencyLimit.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.callbacks import CallbackManager

from ..adapters import model_identity
from ..embedding_cache import EmbeddingEngine, EmbeddingResult
from ..policy import ResiliencePolicy
from ..upstream import join_upstream, upstream_of
from ._common import record_degraded, resolve_policy, timed_copy, warn_nested
from .callbacks import CallbackForwarder

__all__ = ["ResilientEmbedding", "ResilientEmbeddings"]


class ResilientEmbedding(BaseEmbedding):
    """Retry, circuit breaking, concurrency limit and per-text cached vectors for an embedding model.

    >>> Settings.embed_model = ResilientEmbedding(OpenAIEmbedding(max_retries=0))

    `policy`: a `ResiliencePolicy`, a preset name ("balanced" by default) or None.
    A batch that fails after its retries is served from the per-text cache only if every
    text in it has a cached vector; otherwise the original error is raised (vectors are
    never invented). ``last_served`` tells how the most recent call was served.
    """

    _inner: BaseEmbedding = PrivateAttr()
    _sync_inner: BaseEmbedding = PrivateAttr()
    _policy: ResiliencePolicy = PrivateAttr()
    _text_engine: EmbeddingEngine = PrivateAttr()
    _query_engine: EmbeddingEngine = PrivateAttr()
    _last: EmbeddingResult | None = PrivateAttr(default=None)

    def __init__(
        self,
        embed_model: BaseEmbedding | None = None,
        policy: ResiliencePolicy | str | None = None,
        *,
        name: str | None = None,
        embed_batch_size: int | None = None,
        callback_manager: CallbackManager | None = None,
        warn_nested_retries: bool = True,
        upstream: str | None = None,
        **kwargs: Any,
    ) -> None:
        if embed_model is None:
            raise ValueError("embed_model must be a llama_index BaseEmbedding, got None")
        if not isinstance(embed_model, BaseEmbedding):
            raise ValueError(
                f"embed_model must be a llama_index BaseEmbedding, got {type(embed_model).__name__}"
            )
        batch = embed_batch_size if embed_batch_size is not None else embed_model.embed_batch_size
        if not isinstance(batch, int) or not 1 <= batch <= 2048:
            raise ValueError(f"embed_batch_size must be an integer in 1..2048, got {batch!r}")
        super().__init__(
            model_name=embed_model.model_name,
            embed_batch_size=batch,
            callback_manager=callback_manager or embed_model.callback_manager,
            num_workers=embed_model.num_workers,
            embeddings_cache=embed_model.embeddings_cache,
            rate_limiter=embed_model.rate_limiter,
            **kwargs,
        )
        model_id = model_identity(embed_model)
        resolved = resolve_policy(
            policy, name=name or f"llama_index.embeddings:{embed_model.model_name}"
        )
        resolved.add_listener(CallbackForwarder(self))
        self._inner = embed_model
        self._policy = resolved
        join_upstream(resolved.breaker, upstream_of(embed_model) if upstream is None else upstream)
        self._sync_inner = timed_copy(embed_model, resolved.attempt_timeout, "embedding")
        # Query and document vectors of the same string may differ (instructions, modes).
        self._text_engine = EmbeddingEngine(resolved, model_id=model_id, batch_size=batch)
        self._query_engine = EmbeddingEngine(resolved, model_id=f"{model_id}:query", batch_size=1)
        if warn_nested_retries:
            warn_nested(embed_model, resolved, "embedding batch")

    @classmethod
    def class_name(cls) -> str:
        return "ResilientEmbedding"

    # -- introspection -------------------------------------------------------------------
    @property
    def embed_model(self) -> BaseEmbedding:
        """The wrapped model."""
        return self._inner

    @property
    def policy(self) -> ResiliencePolicy:
        return self._policy

    @property
    def last_served(self) -> EmbeddingResult | None:
        """How the most recent call was served (vectors, per-sub-batch `Served`)."""
        return self._last

    def stats(self) -> dict[str, Any]:
        return self._policy.stats()

    def to_payload(self) -> dict[str, Any]:
        payload = super().to_payload()
        payload["wrapped_class_name"] = self._inner.class_name()
        return payload

    # -- helpers -------------------------------------------------------------------------
    def _done(self, result: EmbeddingResult) -> list[Embedding]:
        self._last = result
        for served in result.served:
            record_degraded(self._policy.name, served)
        return result.vectors

    def _batch_engine(self) -> EmbeddingEngine:
        engine = self._text_engine
        engine.batch_size = self.embed_batch_size  # follow later changes of the field
        return engine

    # -- the hooks BaseEmbedding calls ---------------------------------------------------------
    def _get_query_embedding(self, query: str) -> Embedding:
        result = self._query_engine.embed_one(query, self._sync_inner._get_query_embedding)
        return self._done(EmbeddingResult.of_one(result))[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        result = await self._query_engine.aembed_one(query, self._inner._aget_query_embedding)
        return self._done(EmbeddingResult.of_one(result))[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        result = self._batch_engine().embed_one(text, self._sync_inner._get_text_embedding)
        return self._done(EmbeddingResult.of_one(result))[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        result = await self._batch_engine().aembed_one(text, self._inner._aget_text_embedding)
        return self._done(EmbeddingResult.of_one(result))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        inner = self._sync_inner
        return self._done(self._batch_engine().embed(texts, inner._get_text_embeddings))

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._done(
            await self._batch_engine().aembed(texts, self._inner._aget_text_embeddings)
        )


#: Alias, matching the LangChain adapter's name.
ResilientEmbeddings = ResilientEmbedding
