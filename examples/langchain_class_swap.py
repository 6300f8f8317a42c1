"""Swap one class in a LangChain RAG chain and watch it ride out an outage.

Runs with no API key: when OPENAI_BASE_URL is not set it starts the bundled chaos server
(an OpenAI-compatible fake that fails on purpose) and points the models at it.

    python examples/langchain_class_swap.py
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from rag_resilience.chaos import ChaosServer
from rag_resilience.langchain import ResilientEmbeddings, ResilientLLM, with_resilience
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.testing import fake_clock


def main() -> int:
    # The demo prints what happened; silence the library's own warning/error log lines
    # (LangChain logs the guard's CircuitOpenError before raising it, too).
    for name in ("rag_resilience", "langchain_core.callbacks.manager"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # we print what happens
    warnings.simplefilter("ignore")
    with contextlib.ExitStack() as stack:
        server = None
        base_url = os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            server = stack.enter_context(ChaosServer(seed=7))
            base_url = server.base_url
            # The demo skips real backoff waits; drop this line in production.
            stack.enter_context(fake_clock())
        api_key = os.environ.get("OPENAI_API_KEY", "sk-test")

        # The one-line swaps: wrap the models you already had (with max_retries=0).
        embeddings = ResilientEmbeddings(
            OpenAIEmbeddings(
                model="text-embedding-3-small",
                max_retries=0,
                base_url=base_url,
                api_key=api_key,
                check_embedding_ctx_length=False,
            ),
            policy=ResiliencePolicy.preset("balanced", name="demo-embeddings"),
        )
        llm = ResilientLLM(
            ChatOpenAI(model="gpt-4o-mini", max_retries=0, base_url=base_url, api_key=api_key),
            policy=ResiliencePolicy.preset("balanced", name="demo-llm"),
        )

        store = InMemoryVectorStore(embeddings)
        store.add_documents(
            [
                Document(page_content=t)
                for t in (
                    "Refunds are accepted within 30 days of purchase.",
                    "Support is open Monday to Friday, 9am to 5pm.",
                )
            ]
        )
        prompt = ChatPromptTemplate.from_messages(
            [("system", "Answer from the context:\n{context}"), ("human", "{question}")]
        )
        rag = (
            {
                "context": store.as_retriever(search_kwargs={"k": 1})
                | RunnableLambda(lambda docs: "\n".join(d.page_content for d in docs)),
                "question": RunnablePassthrough(),
            }
            | prompt
            | llm
            | StrOutputParser()
        )
        chain = with_resilience(rag, policy=ResiliencePolicy.preset("balanced", name="demo-chain"))

        print("1. healthy upstream")
        print("   ->", chain.invoke("How long do I have to ask for a refund?")[:70])
        answer = llm.invoke("Say hello")
        print("   llm metadata:", answer.response_metadata["resilience"])

        if server is not None:
            print("2. two 500s, then success (retried, 3 upstream requests)")
            before = server.stats()["requests"]
            server.set_faults(fail_next=2, fail_next_status=500)
            answer = llm.invoke("Say hello again")
            print(
                "   attempts:",
                answer.response_metadata["resilience"]["attempts"],
                "| upstream requests:",
                server.stats()["requests"] - before,
            )

            print("3. full outage")
            server.set_faults(outage=True)
            known = chain.invoke("How long do I have to ask for a refund?")
            print("   known question  ->", known[:70])
            unknown = chain.invoke("Can I pay with bitcoin?")
            print("   new question    ->", unknown[:70])
            print(
                "   llm breaker:",
                llm.resilience_policy.stats()["breaker_state"],
                "| served by source:",
                llm.stats()["fallbacks_by_source"],
                "| chain:",
                chain.stats()["fallbacks_by_source"],
            )
            server.clear_faults()
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
