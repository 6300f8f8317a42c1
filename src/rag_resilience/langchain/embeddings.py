"""`ResilientEmbeddings`: any LangChain `Embeddings` behind the policy, with per-text
last-known-good vectors and sub-batching (both from `EmbeddingEngine`).

When a sub-batch fails after retries it is served from cache only if every text in
it has a cached vector; otherwise the original error is raised. Vectors are never
invented: a generic answer makes no sense for an embedding.
"""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings

from ..adapters import accepts_request_timeout, marked_async, model_identity, timed_call
from ..degraded import note_degraded
from ..embedding_cache import EmbeddingEngine, EmbeddingResult, Vector, take_vectors
from ..ingest import OPENAI_MAX_REQUEST_TOKENS, Ingestor, Progress
from ..knobs import check_unknown, pop_knobs, resolve_policy
from ..policy import ResiliencePolicy, Served
from ..ratelimit_instrument import instrument, model_upstream
from ..upstream import join_upstream, upstream_of
from . import _common as c
from . import dropin

__all__ = ["ResilientEmbeddings"]


class ResilientEmbeddings(Embeddings):
    """Embeddings with retry, circuit breaker, per-text fallback cache and a concurrency limit.

    >>> embeddings = ResilientEmbeddings(OpenAIEmbeddings(max_retries=0), policy="balanced")

    `batch_size`: texts per upstream call; a failing sub-batch is retried alone.

    Bulk loads (`embed_documents` over thousands of texts, see `rag_resilience.ingest`):
    batches of at most `batch_size` texts and `batch_tokens` estimated tokens run
    `concurrency` at a time; a failed batch does not lose the others
    (`PartialEmbeddingError` carries every vector obtained and the failed indices);
    `resume=True` skips texts whose vector is already kept in the policy's cache (use a
    SQLite or Redis store to resume after a restart); `progress` is a callable
    ``(done, total)``, True/False, or None (a tqdm bar when stderr is a terminal).
    """

    embeddings: Embeddings
    policy: ResiliencePolicy

    def __init__(
        self,
        embeddings: Embeddings | None = None,
        policy: ResiliencePolicy | str | None = None,
        *,
        batch_size: int = 64,
        batch_tokens: int = OPENAI_MAX_REQUEST_TOKENS,
        concurrency: int = 4,
        progress: Progress | bool | None = None,
        resume: bool = False,
        upstream: str | None = None,
        **knobs: Any,
    ) -> None:
        unknown = {k: v for k, v in knobs.items()}
        knobs = pop_knobs("ResilientEmbeddings", unknown)
        check_unknown(
            "ResilientEmbeddings",
            unknown,
            (
                "embeddings",
                "policy",
                "batch_size",
                "batch_tokens",
                "concurrency",
                "progress",
                "resume",
                "upstream",
            ),
        )
        if embeddings is None:
            raise TypeError(
                "ResilientEmbeddings needs the embeddings to wrap: "
                "ResilientEmbeddings(OpenAIEmbeddings(max_retries=0))"
            )
        if not isinstance(embeddings, Embeddings):
            raise TypeError(
                f"embeddings must be a LangChain Embeddings, got {type(embeddings).__name__}"
            )
        if isinstance(embeddings, ResilientEmbeddings):  # one policy, not two multiplied
            dropin.warn_rewrapped(embeddings, "ResilientEmbeddings")
            embeddings = embeddings.embeddings
        if policy is not None and not isinstance(policy, (str, ResiliencePolicy)):
            raise ValueError(
                "policy must be a ResiliencePolicy, a preset name or None, got "
                f"{type(policy).__name__}"
            )
        identity = model_identity(embeddings)
        self.policy = resolve_policy(
            "ResilientEmbeddings", policy, knobs, name=f"langchain-embeddings:{identity}"
        )
        # one outage signal per upstream (default: the base URL host): rag_resilience.upstream
        join_upstream(
            self.policy.breaker, upstream_of(embeddings) if upstream is None else upstream
        )
        self.embeddings = embeddings
        c.warn_nested(embeddings, self.policy, "embeddings")
        c.warn_deadline_uncut(embeddings, self.policy)
        self._inner = c.with_timeout(embeddings, self.policy.attempt_timeout)
        # Sync calls cannot be cancelled: models that pass `timeout=` to the SDK get what
        # the call's deadline leaves as each request's timeout.
        self._embed_documents: Any = self._inner.embed_documents
        self._embed_query: Any = self._inner.embed_query
        self._aembed_documents: Any = self._inner.aembed_documents
        self._aembed_query: Any = self._inner.aembed_query
        if accepts_request_timeout(embeddings):
            self._embed_documents = timed_call(self._embed_documents, self.policy.attempt_timeout)
            self._embed_query = timed_call(self._embed_query, self.policy.attempt_timeout)
            # async attempts are cancelled at the deadline; a broken 200 is still marked
            self._aembed_documents = marked_async(self._aembed_documents)
            self._aembed_query = marked_async(self._aembed_query)
        if self.policy.rate_limiter is not None:  # learn the limits from its responses
            instrument(self._inner, self.policy.rate_limiter)
        self.engine = EmbeddingEngine(self.policy, model_id=identity, batch_size=batch_size)
        if self.policy.rate_limiter is not None:  # one pacer per model and key
            self.engine.upstream = model_upstream(embeddings)
        self.ingestor = Ingestor(
            self.engine,
            max_inputs=batch_size,
            batch_tokens=batch_tokens,
            concurrency=concurrency,
            progress=progress,
            resume=resume,
        )
        self.policy.collector.gauges["ingest"] = self.ingestor.stats.snapshot
        self._last: EmbeddingResult | Served[Vector] | None = None

    def __getattr__(self, name: str) -> Any:
        """The inner model's attributes (``model``, ``dimensions``...) stay readable."""
        inner = self.__dict__.get("embeddings")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

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
        elif any(s.attempts > 1 for s in result.served):
            self._report(result.metadata())
        return vectors

    def _done_one(self, served: Served[Vector]) -> Vector:
        """`_done` for a query, without building an `EmbeddingResult` on every call."""
        vector: Vector = take_vectors(served)
        self._last = served
        if served.degraded:
            self._degraded(EmbeddingResult([], [served]).metadata())
        elif served.attempts > 1:
            self._report(EmbeddingResult([], [served]).metadata())
        return vector

    def _degraded(self, meta: dict[str, Any]) -> None:
        note_degraded(meta)
        self._report(meta)

    def _report(self, meta: dict[str, Any]) -> None:
        """Tell the run's handlers how the call was served (a live call only when it was
        retried: the handler's retry count is exact, and a clean call costs nothing)."""
        c.dispatch_adhoc(c.event_data("embeddings", self.policy, None, **meta))

    def _failed(self, exc: BaseException) -> None:
        c.dispatch_adhoc(c.event_data("embeddings", self.policy, None, exc))

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        try:
            result = self.ingestor.embed(texts, self._embed_documents)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done(result)

    def embed_query(self, text: str) -> list[float]:
        try:
            served = self.engine.embed_one(text, self._embed_query)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done_one(served)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        try:
            result = await self.ingestor.aembed(texts, self._aembed_documents)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done(result)

    async def aembed_query(self, text: str) -> list[float]:
        try:
            served = await self.engine.aembed_one(text, self._aembed_query)
        except Exception as exc:
            self._failed(exc)
            raise
        return self._done_one(served)

    def stats(self) -> dict[str, Any]:
        return self.policy.stats()

    def __repr__(self) -> str:
        return f"ResilientEmbeddings({self.embeddings!r}, policy={self.policy.name!r})"
