"""The demo's LangChain RAG app: InMemoryVectorStore retrieval, a prompt and ChatOpenAI.

Wrapped: `ResilientEmbeddings` over ``OpenAIEmbeddings(max_retries=0)``, `ResilientLLM`
over ``ChatOpenAI(max_retries=0)``, and the whole chain under `with_resilience` (so a new
question still gets a generic answer when the query embedding fails). Unwrapped: the same
chain with the classes' defaults (the SDK retries twice with its own backoff).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from ..langchain import EVENT_NAME, ResilientEmbeddings, ResilientLLM, with_resilience
from ..policy import ResiliencePolicy
from .common import API_KEY, DOCUMENTS, Reply, demo_policies

__all__ = ["LangChainApp"]

CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"

_PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using only the context."),
        ("human", "Context: {context}\nQuestion: {question}"),
    ]
)


def _format(docs: list[Document]) -> str:
    return " ".join(d.page_content for d in docs)


class _HowServed(BaseCallbackHandler):
    """Catches the event `with_resilience` dispatches after each call: how the chain's
    answer was served (source, age, degraded). The answer itself is a plain string."""

    run_inline = True

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}

    def on_custom_event(
        self,
        name: str,
        data: Any,
        *,
        run_id: UUID,
        tags: Any = None,
        metadata: Any = None,
        **kwargs: Any,
    ) -> None:
        if name == EVENT_NAME and isinstance(data, dict) and data.get("component") == "chain":
            self.meta = dict(data)


class LangChainApp:
    """``{context: retriever | format, question} | prompt | chat model | parser``, wrapped or not."""

    framework = "langchain"

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
        common: dict[str, Any] = {"base_url": base_url, "api_key": api_key}
        # Send raw text: the token-length check needs tiktoken's encoding file, a download.
        emb_kw: dict[str, Any] = {**common, "check_embedding_ctx_length": False}
        if wrapped:
            self._policies = policies or demo_policies("langchain")
            emb_policy, llm_policy = self._policies["embeddings"], self._policies["llm"]
            embeddings: Any = ResilientEmbeddings(
                OpenAIEmbeddings(model=EMBEDDING_MODEL, max_retries=0, **emb_kw),
                policy=emb_policy,
            )
            llm: Any = ResilientLLM(
                ChatOpenAI(model=CHAT_MODEL, max_retries=0, **common),
                policy=llm_policy,
                generic_fallback=False,  # the chain-level wrapper decides what to serve
            )
        else:
            embeddings = OpenAIEmbeddings(model=EMBEDDING_MODEL, **emb_kw)
            llm = ChatOpenAI(model=CHAT_MODEL, **common)
        # The demo's documents are indexed with faults off, once per app.
        store = InMemoryVectorStore.from_texts(list(DOCUMENTS), embedding=embeddings)
        retriever = store.as_retriever(search_kwargs={"k": 2})
        chain: Runnable[Any, Any] = (
            {"context": retriever | RunnableLambda(_format), "question": RunnablePassthrough()}
            | _PROMPT
            | llm
            | StrOutputParser()
        )
        if wrapped:
            chain = with_resilience(chain, self._policies["app"], generic_fallback=True)
        self.chain = chain

    def policies(self) -> dict[str, ResiliencePolicy]:
        return dict(self._policies)

    async def aask(self, question: str) -> Reply:
        if not self.wrapped:
            return Reply(str(await self.chain.ainvoke(question)), "live")
        served = _HowServed()
        text = await self.chain.ainvoke(question, config={"callbacks": [served]})
        meta = served.meta
        return Reply(
            str(text),
            str(meta.get("source", "live")),
            bool(meta.get("degraded", False)),
            meta.get("age_s"),
        )
