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

import llama_index.core.instrumentation as instrument
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.callbacks import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation.events.embedding import (
    EmbeddingEndEvent,
    EmbeddingStartEvent,
)

from ..adapters import model_identity
from ..embedding_cache import EmbeddingEngine, EmbeddingResult
from ..ingest import OPENAI_MAX_REQUEST_TOKENS, BatchHook, Ingestor, Progress
from ..knobs import check_unknown, pop_knobs
from ..knobs import resolve_policy as resolve_knobs
from ..policy import ResiliencePolicy
from ..ratelimit_instrument import instrument as feed_limiter
from ..ratelimit_instrument import model_upstream
from ..upstream import join_upstream, upstream_of
from ._common import (
    async_embedding_calls,
    record_degraded,
    resolve_policy,
    sync_embedding_calls,
    timed_copy,
    warn_nested,
)
from .callbacks import CallbackForwarder
from .typed import warn_rewrapped

__all__ = ["ResilientEmbedding", "ResilientEmbeddings"]

# The base class's dispatcher: our batch events come from where LlamaIndex's would.
dispatcher = instrument.get_dispatcher("llama_index.core.base.embeddings.base")  # type: ignore[attr-defined]


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
    _sync: dict[str, Any] = PrivateAttr(default_factory=dict)
    _async: dict[str, Any] = PrivateAttr(default_factory=dict)
    _policy: ResiliencePolicy = PrivateAttr()
    _text_engine: EmbeddingEngine = PrivateAttr()
    _query_engine: EmbeddingEngine = PrivateAttr()
    _last: EmbeddingResult | None = PrivateAttr(default=None)
    _ingestor: Ingestor = PrivateAttr()

    def __init__(
        self,
        embed_model: BaseEmbedding | None = None,
        policy: ResiliencePolicy | str | None = None,
        *,
        name: str | None = None,
        embed_batch_size: int | None = None,
        callback_manager: CallbackManager | None = None,
        warn_nested_retries: bool = True,
        batch_tokens: int = OPENAI_MAX_REQUEST_TOKENS,
        concurrency: int = 4,
        progress: Progress | bool | None = None,
        resume: bool = False,
        upstream: str | None = None,
        **kwargs: Any,
    ) -> None:
        knobs = pop_knobs("ResilientEmbedding", kwargs)
        check_unknown("ResilientEmbedding", kwargs, type(self).model_fields)
        if isinstance(embed_model, ResilientEmbedding):  # one policy, not two multiplied
            warn_rewrapped(embed_model, "ResilientEmbedding")
            embed_model = embed_model.embed_model
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
        if knobs:
            policy = resolve_knobs(
                "ResilientEmbedding",
                policy,
                knobs,
                name=name or f"llama_index.embeddings:{embed_model.model_name}",
            )
        resolved = resolve_policy(
            policy, name=name or f"llama_index.embeddings:{embed_model.model_name}"
        )
        resolved.add_listener(CallbackForwarder(self))
        self._inner = embed_model
        self._policy = resolved
        join_upstream(resolved.breaker, upstream_of(embed_model) if upstream is None else upstream)
        self._sync_inner = timed_copy(embed_model, resolved.attempt_timeout, "embedding")
        self._sync = sync_embedding_calls(self._sync_inner, resolved.attempt_timeout)
        self._async = async_embedding_calls(embed_model)
        # Query and document vectors of the same string may differ (instructions, modes).
        self._text_engine = EmbeddingEngine(resolved, model_id=model_id, batch_size=batch)
        self._query_engine = EmbeddingEngine(resolved, model_id=f"{model_id}:query", batch_size=1)
        if resolved.rate_limiter is not None:  # pace to the limits its responses report
            feed_limiter(self._sync_inner, resolved.rate_limiter)
            feed_limiter(embed_model, resolved.rate_limiter)
            upstream = model_upstream(embed_model)
            self._text_engine.upstream = self._query_engine.upstream = upstream
        self._ingestor = Ingestor(
            self._text_engine,
            max_inputs=batch,
            batch_tokens=batch_tokens,
            concurrency=concurrency,
            progress=progress,
            resume=resume,
        )
        resolved.collector.gauges["ingest"] = self._ingestor.stats.snapshot
        if warn_nested_retries:
            warn_nested(embed_model, resolved, "embedding batch")

    @classmethod
    def class_name(cls) -> str:
        return "ResilientEmbedding"

    def __getattr__(self, name: str) -> Any:
        """The inner model's attributes (``dimensions``...) stay readable on the wrapper."""
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            private = self.__pydantic_private__ or {}
            inner = private.get("_inner") if isinstance(private, dict) else None
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)

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

    @property
    def ingestor(self) -> Ingestor:
        """The bulk-ingestion settings and counts (`rag_resilience.ingest.Ingestor`)."""
        ingestor = self._ingestor
        ingestor.max_inputs = self._batch_engine().batch_size
        return ingestor

    def _ingests(self, texts: list[str], show_progress: bool) -> bool:
        """Does this load take the bulk path? Not when it is one batch nobody watches
        (the base class's path, unchanged), nor when LlamaIndex's own embeddings cache or
        rate limiter is set on the wrapper (the base class applies those)."""
        if self.embeddings_cache is not None or self.rate_limiter is not None:
            return False
        return show_progress or not self.ingestor.plain(texts)

    def _batch_events(self) -> BatchHook:
        """LlamaIndex's events for one embedded batch, as the base class emits them
        (start and end together, when the batch is done: concurrent batches would
        interleave them otherwise)."""
        model_dict = self.to_payload()
        manager = self.callback_manager

        def emit(chunks: list[str], vectors: list[Embedding]) -> None:
            dispatcher.event(EmbeddingStartEvent(model_dict=model_dict))
            event_id = manager.on_event_start(
                CBEventType.EMBEDDING, payload={EventPayload.SERIALIZED: model_dict}
            )
            manager.on_event_end(
                CBEventType.EMBEDDING,
                payload={EventPayload.CHUNKS: chunks, EventPayload.EMBEDDINGS: vectors},
                event_id=event_id,
            )
            dispatcher.event(EmbeddingEndEvent(chunks=chunks, embeddings=vectors))

        return emit

    # -- bulk loads ----------------------------------------------------------------------------
    def get_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        """Bulk path for loads of more than one batch (see `rag_resilience.ingest`):
        concurrent batches, partial results (`PartialEmbeddingError`), resume, progress."""
        if not self._ingests(texts, show_progress):
            return super().get_text_embedding_batch(texts, show_progress, **kwargs)
        result = self._ingestor.embed(
            texts,
            self._sync_inner._get_text_embeddings,
            hook=self._batch_events(),
            progress=True if show_progress else None,
        )
        return self._done(result)

    async def aget_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        if not self._ingests(texts, show_progress):
            return await super().aget_text_embedding_batch(texts, show_progress, **kwargs)
        result = await self._ingestor.aembed(
            texts,
            self._async["_aget_text_embeddings"],
            hook=self._batch_events(),
            progress=True if show_progress else None,
        )
        return self._done(result)

    # -- the hooks BaseEmbedding calls ---------------------------------------------------------
    def _get_query_embedding(self, query: str) -> Embedding:
        result = self._query_engine.embed_one(query, self._sync["_get_query_embedding"])
        return self._done(EmbeddingResult.of_one(result))[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        result = await self._query_engine.aembed_one(query, self._async["_aget_query_embedding"])
        return self._done(EmbeddingResult.of_one(result))[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        result = self._batch_engine().embed_one(text, self._sync["_get_text_embedding"])
        return self._done(EmbeddingResult.of_one(result))[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        result = await self._batch_engine().aembed_one(text, self._async["_aget_text_embedding"])
        return self._done(EmbeddingResult.of_one(result))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        embed = self._sync["_get_text_embeddings"]
        return self._done(self._batch_engine().embed(texts, embed))

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._done(
            await self._batch_engine().aembed(texts, self._async["_aget_text_embeddings"])
        )


#: Alias, matching the LangChain adapter's name.
ResilientEmbeddings = ResilientEmbedding
