"""LlamaIndex integration: set ``Settings.llm`` / ``Settings.embed_model`` to our wrappers and
everything downstream (indexing, retrieval, query and chat engines) becomes resilient.

    from llama_index.llms.openai import OpenAI
    from llama_index.embeddings.openai import OpenAIEmbedding
    from rag_resilience.llama_index import ResilientLLM, ResilientEmbedding

    Settings.llm = ResilientLLM(OpenAI(model="gpt-4o-mini", max_retries=0))
    Settings.embed_model = ResilientEmbedding(OpenAIEmbedding(max_retries=0))
    engine = ResilientQueryEngine(index.as_query_engine())

Needs the ``[llama-index]`` extra (llama-index-core).
"""

from __future__ import annotations

try:
    import llama_index.core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rag_resilience.llama_index needs llama-index-core: "
        "pip install 'rag-resilience[llama-index]'"
    ) from exc

from .callbacks import ResilienceCallbackHandler
from .embeddings import ResilientEmbedding, ResilientEmbeddings
from .engines import ResilientChatEngine, ResilientQueryEngine
from .instrumentation import (
    ResilienceAttemptEvent,
    ResilienceBreakerEvent,
    ResilienceEvent,
    ResilienceEventHandler,
    ResilienceFailureEvent,
    ResilienceFallbackEvent,
    ResilienceRejectedEvent,
    ResilienceRetryEvent,
    ResilienceSuccessEvent,
)
from .llm import ResilientLLM

__all__ = [
    "ResilienceAttemptEvent",
    "ResilienceBreakerEvent",
    "ResilienceCallbackHandler",
    "ResilienceEvent",
    "ResilienceEventHandler",
    "ResilienceFailureEvent",
    "ResilienceFallbackEvent",
    "ResilienceRejectedEvent",
    "ResilienceRetryEvent",
    "ResilienceSuccessEvent",
    "ResilientChatEngine",
    "ResilientEmbedding",
    "ResilientEmbeddings",
    "ResilientLLM",
    "ResilientQueryEngine",
]
