"""The demo's LlamaIndex RAG app: a VectorStoreIndex and its query engine.

Wrapped: `ResilientEmbedding` over ``OpenAIEmbedding(max_retries=0)``, `ResilientLLM` over
``OpenAI(max_retries=0)``, and the query engine under `ResilientQueryEngine`. Unwrapped:
the same index and engine with the classes' defaults (OpenAI: 3 tenacity attempts of 3
SDK requests each; OpenAIEmbedding: 10 attempts for up to 60 s). Models are passed to the
index and engine directly, never through the global ``Settings``, so two apps can run side
by side in one process.
"""

from __future__ import annotations

from typing import Any

from llama_index.core import Document, PromptTemplate, VectorStoreIndex
from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from ..llama_index import ResilientEmbedding, ResilientLLM, ResilientQueryEngine
from ..policy import ResiliencePolicy
from .common import API_KEY, DOCUMENTS, Reply, demo_policies

__all__ = ["LlamaIndexApp"]

CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
# The same prompt shape as the LangChain app, so both apps' answers read alike.
_QA_PROMPT = PromptTemplate(
    "Answer the question using only the context.\nContext: {context_str}\nQuestion: {query_str}"
)


class LlamaIndexApp:
    """``VectorStoreIndex(...).as_query_engine()``, wrapped or not."""

    framework = "llama-index"

    def __init__(
        self,
        base_url: str | None,
        *,
        wrapped: bool,
        policies: dict[str, ResiliencePolicy] | None = None,
        api_key: str = API_KEY,
    ) -> None:
        self.wrapped = wrapped
        self._policies: dict[str, ResiliencePolicy] = {}
        common: dict[str, Any] = {"api_base": base_url, "api_key": api_key}
        if wrapped:
            self._policies = policies or demo_policies("llama-index")
            emb_policy, llm_policy = self._policies["embeddings"], self._policies["llm"]
            embed_model: Any = ResilientEmbedding(
                OpenAIEmbedding(model=EMBEDDING_MODEL, max_retries=0, **common),
                policy=emb_policy,
            )
            llm: Any = ResilientLLM(
                OpenAI(model=CHAT_MODEL, max_retries=0, **common),
                policy=llm_policy,
                generic_fallback=False,  # the engine-level wrapper decides what to serve
            )
        else:
            embed_model = OpenAIEmbedding(model=EMBEDDING_MODEL, **common)
            llm = OpenAI(model=CHAT_MODEL, **common)
        # The demo's documents are indexed with faults off, once per app.
        index = VectorStoreIndex.from_documents(
            [Document(text=t) for t in DOCUMENTS], embed_model=embed_model
        )
        engine: BaseQueryEngine = index.as_query_engine(
            llm=llm, similarity_top_k=2, text_qa_template=_QA_PROMPT
        )
        if wrapped:
            engine = ResilientQueryEngine(engine, self._policies["app"], generic_fallback=True)
        self.engine = engine

    def policies(self) -> dict[str, ResiliencePolicy]:
        return dict(self._policies)

    async def aask(self, question: str) -> Reply:
        response = await self.engine.aquery(question)
        text = str(getattr(response, "response", response) or "")
        meta: dict[str, Any] = dict(
            (getattr(response, "metadata", None) or {}).get("resilience") or {}
        )
        if not self.wrapped:
            return Reply(text, "live")
        return Reply(
            text,
            str(meta.get("source", "live")),
            bool(meta.get("degraded", False)),
            meta.get("age_s"),
        )
