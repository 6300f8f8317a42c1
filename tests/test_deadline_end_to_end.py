"""One deadline per user call, end to end, against a REAL stalled HTTP server (issue 18, 1).

These are the suite's only tests that wait in real time: a stalled upstream can only be
cut by real timeouts. Every caller's question is answered once while the server is
healthy (so each layer has a last-known-good answer), then the server stalls every
request and a crowd of threads and asyncio tasks asks again at the same time. Each caller
must get its cached answer within the deadline plus a generous margin, although the
inner wrappers have deadlines (and attempt timeouts) of their own: nested deadlines do not
add up, and sync calls are cut by the per-request timeout the wrappers pass to the SDK.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from rag_resilience import AsyncResilientOpenAIClient, ResiliencePolicy, ResilientOpenAIClient
from rag_resilience.chaos import ChaosServer
from rag_resilience.langchain import ResilientEmbeddings, ResilientLLM, with_resilience

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DEADLINE = 1.0
MARGIN = 0.5  # the target: the whole call answers within deadline + 0.5 s
QUESTIONS = [
    "How long do refunds take?",
    "When is support open?",
    "Do you ship to Europe?",
    "Can I pay by card?",
]
DOCS = [
    "Refunds are accepted within 30 days of purchase.",
    "Support is open Monday to Friday, 9am to 5pm.",
    "Shipping to Europe takes 5 to 7 business days.",
]
MSG = [{"role": "user", "content": "What is a circuit breaker?"}]


@pytest.fixture
def server(chaos_server_factory: Callable[..., ChaosServer]) -> Iterator[ChaosServer]:
    """A server of its own: its stalled connections are dropped when it stops."""
    yield chaos_server_factory(seed=18)


def policy(name: str, **overrides: Any) -> ResiliencePolicy:
    return ResiliencePolicy.preset("balanced", name=name, deadline=DEADLINE, **overrides)


def build_chain(server: ChaosServer, name: str) -> Runnable[Any, Any]:
    """The issue's setup: with_resilience around a RAG chain whose embeddings and LLM are
    wrapped too, every layer with the same deadline (and attempt timeouts longer than it)."""
    embeddings = ResilientEmbeddings(
        OpenAIEmbeddings(
            model="text-embedding-3-small",
            max_retries=0,
            base_url=server.base_url,
            api_key="sk-test",
            check_embedding_ctx_length=False,
        ),
        policy=policy(f"{name}-emb"),
    )
    store = InMemoryVectorStore(embeddings)
    store.add_documents([Document(page_content=d) for d in DOCS])
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from the context.\n{context}"), ("human", "{question}")]
    )
    llm = ResilientLLM(
        ChatOpenAI(model="gpt-4o-mini", max_retries=0, base_url=server.base_url, api_key="sk-test"),
        policy=policy(f"{name}-llm"),
    )

    def fmt(docs: list[Document]) -> str:
        return "\n".join(d.page_content for d in docs)

    retriever = store.as_retriever(search_kwargs={"k": 2})
    rag = (
        {"context": retriever | RunnableLambda(fmt), "question": RunnablePassthrough()}
        | prompt
        | llm
        | StrOutputParser()
    )
    return with_resilience(rag, policy=policy(f"{name}-chain", max_retries=1))


def crowd(
    sync_calls: list[Callable[[], Any]], async_calls: list[Callable[[], Any]]
) -> list[tuple[str, Any, float]]:
    """Run the sync calls in threads and the async ones as tasks, all at once; returns
    (label, result or exception, seconds) per call."""
    results: list[tuple[str, Any, float]] = []
    lock = threading.Lock()

    def timed(label: str, fn: Callable[[], Any]) -> None:
        start = time.monotonic()
        try:
            value = fn()
        except Exception as exc:  # reported by the assertions below
            value = exc
        with lock:
            results.append((label, value, time.monotonic() - start))

    async def atimed(label: str, fn: Callable[[], Any]) -> None:
        start = time.monotonic()
        try:
            value = await fn()
        except Exception as exc:
            value = exc
        with lock:
            results.append((label, value, time.monotonic() - start))

    async def tasks() -> None:
        await asyncio.gather(*(atimed(f"task{i}", fn) for i, fn in enumerate(async_calls)))

    threads = [
        threading.Thread(target=timed, args=(f"thread{i}", fn)) for i, fn in enumerate(sync_calls)
    ]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join(timeout=60)
    return results


def check(results: list[tuple[str, Any, float]], expected: dict[str, Any]) -> None:
    assert len(results) == len(expected)
    for label, value, seconds in results:
        assert value == expected[label], (label, value)
        assert seconds < DEADLINE + MARGIN, f"{label} answered after {seconds:.2f}s"


def test_chain_with_nested_wrappers_answers_within_one_deadline(server: ChaosServer) -> None:
    chain = build_chain(server, "e2e-chain")
    known = {q: chain.invoke(q) for q in QUESTIONS}
    assert all(isinstance(a, str) and a for a in known.values())

    server.set_faults(stall=True)
    results = crowd(
        [lambda q=q: chain.invoke(q) for q in QUESTIONS[:2]],  # type: ignore[misc]
        [lambda q=q: chain.ainvoke(q) for q in QUESTIONS[2:]],  # type: ignore[misc]
    )
    expected = {"thread0": known[QUESTIONS[0]], "thread1": known[QUESTIONS[1]]}
    expected |= {"task0": known[QUESTIONS[2]], "task1": known[QUESTIONS[3]]}
    check(results, expected)


def test_openai_clients_stop_at_the_deadline(server: ChaosServer) -> None:
    """A passed-in SDK client keeps its 600 s read timeout and a built one with
    attempt_timeout=None has none of ours: the deadline still cuts both."""
    passed_in = ResilientOpenAIClient(
        client=openai.OpenAI(api_key="sk-test", base_url=server.base_url, max_retries=0),
        policy=policy("e2e-oai-passed", attempt_timeout=5.0),
    )
    built = ResilientOpenAIClient(
        api_key="sk-test",
        base_url=server.base_url,
        policy=policy("e2e-oai-built", attempt_timeout=None),
    )
    aclient = AsyncResilientOpenAIClient(
        client=openai.AsyncOpenAI(api_key="sk-test", base_url=server.base_url, max_retries=0),
        policy=policy("e2e-oai-async", attempt_timeout=5.0),
    )

    def ask(client: Any) -> str:
        return str(client.chat.completions.create(model="gpt-4o-mini", messages=MSG).choices[0])

    async def aask() -> str:
        answer = await aclient.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        return str(answer.choices[0])

    known = {"thread0": ask(passed_in), "thread1": ask(built), "task0": asyncio.run(aask())}

    server.set_faults(stall=True, endpoints=("chat",))
    results = crowd([lambda: ask(passed_in), lambda: ask(built)], [aask])
    check(results, known)
    for client in (passed_in, built):
        stats = client.stats()
        assert stats["fallbacks_by_source"] == {"cache": 1}, stats


def test_llama_index_models_stop_at_the_deadline(server: ChaosServer) -> None:
    """LlamaIndex's OpenAI LLM and OpenAIEmbedding keep their own 60 s timeouts; the
    deadline cuts their sync requests (and cancels the async ones)."""
    from llama_index.core.llms import ChatMessage
    from llama_index.embeddings.openai import OpenAIEmbedding
    from llama_index.llms.openai import OpenAI

    from rag_resilience.llama_index import ResilientEmbedding
    from rag_resilience.llama_index import ResilientLLM as LlamaResilientLLM

    llm = LlamaResilientLLM(
        OpenAI(api_base=server.base_url, api_key="sk-test", max_retries=0),
        policy=policy("e2e-li-llm"),
    )
    embed = ResilientEmbedding(
        OpenAIEmbedding(api_base=server.base_url, api_key="sk-test", max_retries=0),
        policy=policy("e2e-li-emb"),
    )
    messages = [ChatMessage(role="user", content="What is a circuit breaker?")]

    def chat() -> str:
        return str(llm.chat(messages).message.content)

    async def achat() -> str:
        return str((await llm.achat(messages)).message.content)

    def query() -> list[float]:
        return embed.get_query_embedding("refund policy")

    async def aquery() -> list[float]:
        return await embed.aget_query_embedding("refund policy")

    known = {"thread0": chat(), "thread1": query()}
    known |= {"task0": known["thread0"], "task1": known["thread1"]}

    server.set_faults(stall=True)
    results = crowd([chat, query], [achat, aquery])
    check(results, known)
