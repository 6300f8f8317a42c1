"""One deadline for the whole call (issue 18): how long a RAG chain takes to answer when the
upstream stalls, with nested wrappers, side by side with per-layer timeouts.

Usage: python benchmarks/deadline.py [--deadline 1.0] [--json PATH]

The chain is the issue's: ``with_resilience`` around retriever (ResilientEmbeddings) ->
prompt -> ResilientLLM -> parser, every layer with the same deadline, against the chaos
server. Every question is answered once while the server is healthy (so each layer has a
last-known-good answer), then every request stalls and the same question is asked again,
sync (``invoke``) and async (``ainvoke``). Baselines, side by side in the same run:
- the same wrappers, each layer on its own deadline (run in a fresh context, so nothing
  propagates: the behaviour the issue reported, where the inner deadlines add up);
- no wrappers: each model with its own request timeout equal to the deadline and the chain
  ``with_fallbacks`` to a canned answer (it answers fast, but never from a layer's cache).
The figure is the time to the answer, as a multiple of the deadline. Real time: about 15 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import machine_info, markdown_table, write_json  # noqa: E402

DOCS = ["Refunds are accepted within 30 days of purchase."]
QUESTION = "How long do refunds take?"


def _models(base_url: str, timeout: float | None) -> tuple[Any, Any]:
    """The raw models. Each gets an async HTTP client of its own: langchain-openai shares one
    per process (langchain-ai/langchain#35783), whose pooled connections would belong to an
    earlier row's closed event loop and fail the first async requests of the next row."""
    import httpx
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    emb = OpenAIEmbeddings(
        model="text-embedding-3-small",
        max_retries=0,
        base_url=base_url,
        api_key="sk-test",
        check_embedding_ctx_length=False,
        timeout=timeout,
        http_async_client=httpx.AsyncClient(),
    )
    llm = ChatOpenAI(
        model="gpt-4o-mini",
        max_retries=0,
        base_url=base_url,
        api_key="sk-test",
        timeout=timeout,
        http_async_client=httpx.AsyncClient(),
    )
    return emb, llm


def _rag(embeddings: Any, llm: Any) -> Any:
    from langchain_core.documents import Document
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore(embeddings)
    store.add_documents([Document(page_content=d) for d in DOCS])
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from the context.\n{context}"), ("human", "{question}")]
    )

    def fmt(docs: list[Any]) -> str:
        return "\n".join(d.page_content for d in docs)

    retriever = store.as_retriever(search_kwargs={"k": 1})
    return (
        {"context": retriever | fmt, "question": RunnablePassthrough()}
        | prompt
        | llm
        | StrOutputParser()
    )


def ours(base_url: str, deadline: float) -> Any:
    from rag_resilience import ResiliencePolicy
    from rag_resilience.langchain import ResilientEmbeddings, ResilientLLM, with_resilience

    def policy(name: str) -> ResiliencePolicy:
        return ResiliencePolicy.preset("balanced", name=name, deadline=deadline)

    emb, llm = _models(base_url, None)
    rag = _rag(
        ResilientEmbeddings(emb, policy=policy("bench-deadline-emb")),
        ResilientLLM(llm, policy=policy("bench-deadline-llm")),
    )
    return with_resilience(rag, policy=policy("bench-deadline-chain"))


class _Isolated:
    """Runs a wrapper's calls in a fresh context: it does not see the enclosing deadline."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def run(self, method: str, *args: Any) -> Any:
        return contextvars.Context().run(getattr(self.inner, method), *args)

    async def arun(self, method: str, *args: Any) -> Any:
        coro = getattr(self.inner, method)(*args)
        return await asyncio.create_task(coro, context=contextvars.Context())


def ours_without_propagation(base_url: str, deadline: float) -> Any:
    from langchain_core.embeddings import Embeddings
    from langchain_core.runnables import RunnableLambda

    from rag_resilience import ResiliencePolicy
    from rag_resilience.langchain import ResilientEmbeddings, ResilientLLM, with_resilience

    def policy(name: str) -> ResiliencePolicy:
        return ResiliencePolicy.preset("balanced", name=name, deadline=deadline)

    emb, llm = _models(base_url, None)
    iso_emb = _Isolated(ResilientEmbeddings(emb, policy=policy("bench-nodl-emb")))
    iso_llm = _Isolated(ResilientLLM(llm, policy=policy("bench-nodl-llm")))

    class IsolatedEmbeddings(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            result: list[list[float]] = iso_emb.run("embed_documents", texts)
            return result

        def embed_query(self, text: str) -> list[float]:
            result: list[float] = iso_emb.run("embed_query", text)
            return result

        async def aembed_query(self, text: str) -> list[float]:
            result: list[float] = await iso_emb.arun("aembed_query", text)
            return result

    async def allm(x: Any) -> Any:
        return await iso_llm.arun("ainvoke", x)

    isolated_llm = RunnableLambda(lambda x: iso_llm.run("invoke", x), afunc=allm)
    rag = _rag(IsolatedEmbeddings(), isolated_llm)
    return with_resilience(rag, policy=policy("bench-nodl-chain"))


def per_layer_timeouts(base_url: str, deadline: float) -> Any:
    from langchain_core.runnables import RunnableLambda

    emb, llm = _models(base_url, deadline)
    return _rag(emb, llm).with_fallbacks([RunnableLambda(lambda _: "cached answer")])


def measure(chain: Any, server: Any) -> dict[str, float]:
    server.set_faults(stall=False)
    chain.invoke(QUESTION)  # warm: every layer has its answer
    server.set_faults(stall=True)
    start = time.perf_counter()
    chain.invoke(QUESTION)
    sync_s = time.perf_counter() - start

    async def once() -> float:
        t0 = time.perf_counter()
        await chain.ainvoke(QUESTION)
        return time.perf_counter() - t0

    async_s = asyncio.run(once())
    server.set_faults(stall=False)
    return {"sync_s": sync_s, "async_s": async_s}


def run(deadline: float) -> dict[str, Any]:
    from rag_resilience.chaos import ChaosServer

    rows: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings(), ChaosServer(seed=18) as server:
        warnings.simplefilter("ignore")
        for name, build in (
            ("no wrappers: per-layer request timeouts + with_fallbacks", per_layer_timeouts),
            ("our wrappers, each layer its own deadline (no propagation)", ours_without_propagation),
            ("ours: one deadline (with_resilience over wrapped models)", ours),
        ):
            rows[name] = measure(build(server.base_url, deadline), server)
            server.wait_idle()
    return {"benchmark": "deadline", "deadline_s": deadline, "rows": rows, **machine_info()}


def render(result: dict[str, Any]) -> str:
    d = result["deadline_s"]
    table = markdown_table(
        ["chain (stalled upstream)", "sync answer s", "x deadline", "async answer s", "x deadline"],
        [
            [name, f"{r['sync_s']:.2f}", f"{r['sync_s'] / d:.2f}", f"{r['async_s']:.2f}",
             f"{r['async_s'] / d:.2f}"]
            for name, r in result["rows"].items()
        ],
    )  # fmt: skip
    return f"Deadline {d:g} s, every request stalled, answers from cache.\n\n{table}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline", type=float, default=1.0, help="seconds (default 1.0)")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/deadline.json")
    args = parser.parse_args(argv)
    result = run(args.deadline)
    text = render(result)
    print(text)
    path = write_json("deadline", result, Path(args.json) if args.json else None)
    path.with_suffix(".md").write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
