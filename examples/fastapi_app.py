"""A FastAPI endpoint serving a resilient LangChain RAG chain, with its stats exposed.

    GET /ask?q=...   the answer and how it was served (live | cache | generic_fallback | rejected)
    GET /stats       policy stats of the chain, the LLM and the embeddings, and the
                     ResilienceCallbackHandler's numbers

Install what it needs with ``pip install "rag-resilience[examples]"`` (LangChain, FastAPI,
uvicorn). Run it (starts the bundled chaos server when OPENAI_BASE_URL is not set):

    python examples/fastapi_app.py            # serves on http://127.0.0.1:8000
    python examples/fastapi_app.py --selftest # in-process: a few requests, through an outage
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import warnings
from typing import Any
from uuid import UUID

from fastapi import FastAPI
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import ChaosServer
from rag_resilience.langchain import (
    EVENT_NAME,
    ResilienceCallbackHandler,
    ResilientEmbeddings,
    ResilientLLM,
    with_resilience,
)

DOCS = [
    "Refunds are accepted within 30 days of purchase with the original receipt.",
    "Support is open Monday to Friday, 9:00 to 17:00 CET, by chat and email.",
    "Orders ship within two business days; express shipping takes one day.",
]


class HowServed(BaseCallbackHandler):
    """Catches the event `with_resilience` dispatches after each call (source, age, ...)."""

    run_inline = True

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if name == EVENT_NAME and isinstance(data, dict) and data.get("component") == "chain":
            self.meta = data


def policy(name: str, fast: bool, **extra: Any) -> ResiliencePolicy:
    """The "balanced" preset; `fast` shortens its waits (for the self-test only)."""
    quick: dict[str, Any] = (
        {
            "initial_delay": 0.05,
            "max_delay": 0.2,
            "recovery_timeout": 1.0,
            "min_recovery_timeout": 1.0,
        }
        if fast
        else {}
    )
    return ResiliencePolicy.preset("balanced", name=name, **quick, **extra)


def build_app(base_url: str | None, api_key: str, *, fast: bool = False) -> FastAPI:
    common: dict[str, Any] = {"base_url": base_url, "api_key": api_key}
    embeddings = ResilientEmbeddings(
        OpenAIEmbeddings(
            model="text-embedding-3-small",
            max_retries=0,
            check_embedding_ctx_length=False,  # no tiktoken download
            **common,
        ),
        policy=policy("embeddings", fast),
    )
    llm = ResilientLLM(
        ChatOpenAI(model="gpt-4o-mini", max_retries=0, **common),
        policy=policy("llm", fast),
        generic_fallback=False,  # the chain-level wrapper answers when everything fails
    )
    retriever = InMemoryVectorStore.from_texts(DOCS, embedding=embeddings).as_retriever(
        search_kwargs={"k": 1}
    )
    prompt = ChatPromptTemplate.from_messages(
        [("human", "Context: {context}\nQuestion: {question}")]
    )

    def format_docs(docs: list[Document]) -> str:
        return " ".join(d.page_content for d in docs)

    rag = (
        {"context": retriever | RunnableLambda(format_docs), "question": RunnablePassthrough()}
        | prompt
        | llm
        | StrOutputParser()
    )
    chain = with_resilience(
        rag, policy("chain", fast, max_concurrency=16, max_waiting=64), generic_fallback=True
    )
    handler = ResilienceCallbackHandler()
    handler.watch(llm)

    app = FastAPI(title="rag-resilience example")

    @app.get("/ask")
    async def ask(q: str) -> dict[str, Any]:
        served = HowServed()
        answer = await chain.ainvoke(q, config={"callbacks": [handler, served]})
        meta = served.meta
        return {
            "question": q,
            "answer": answer,
            "source": meta.get("source", "live"),
            "degraded": bool(meta.get("degraded", False)),
            "age_s": meta.get("age_s"),
            "breaker": llm.resilience_policy.breaker.get_state().value
            if llm.resilience_policy.breaker
            else None,
        }

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return {
            "chain": chain.stats(),
            "llm": llm.stats(),
            "embeddings": embeddings.stats(),
            "handler": handler.stats(),
        }

    return app


def selftest(app: FastAPI, server: ChaosServer | None) -> int:
    from fastapi.testclient import TestClient

    def show(client: TestClient, question: str) -> None:
        body = client.get("/ask", params={"q": question}).json()
        age = f" ({body['age_s']:.1f}s old)" if body.get("age_s") is not None else ""
        print(f"GET /ask?q={question!r}: {body['source']}{age}, breaker {body['breaker']}")
        print(f"    -> {body['answer'][:70]}")

    with TestClient(app) as client:
        show(client, "How long do I have to ask for a refund?")
        if server is not None:
            server.set_faults(fail_next=2, fail_next_status=500)
            show(client, "When is support open?")  # two 500s, retried
            server.set_faults(outage=True, outage_status=503)
            print("-- outage: every upstream request now fails with 503 --")
            show(client, "How long do I have to ask for a refund?")  # known: cached answer
            show(client, "Do you ship to Norway?")  # new: generic answer
            server.set_faults(outage=False)
        stats = client.get("/stats").json()
        chain, llm, handler = stats["chain"], stats["llm"], stats["handler"]
        print(
            f"GET /stats: chain calls={chain['calls']} degraded={chain['degraded']} "
            f"fallbacks={chain['fallbacks_by_source']}; llm retries={llm['retries']} "
            f"breaker={llm.get('breaker_state')}; handler calls={handler['calls']} "
            f"errors={handler['errors']}"
        )
    print("selftest ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--selftest", action="store_true", help="run a few requests and exit")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.getLogger("rag_resilience").setLevel(logging.CRITICAL)  # we print what happens
    warnings.simplefilter("ignore", ResourceWarning)
    with contextlib.ExitStack() as stack:
        server = None
        base_url = os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            server = stack.enter_context(ChaosServer(seed=5))
            base_url = server.base_url
        app = build_app(base_url, os.environ.get("OPENAI_API_KEY", "sk-demo"), fast=args.selftest)
        if args.selftest:
            return selftest(app, server)
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
