"""A complete LCEL RAG chain (retriever over ResilientEmbeddings, prompt, ResilientLLM,
parser) under with_resilience, against the chaos server; and the callback handler as a
guard for models that were not wrapped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from rag_resilience.breaker import CircuitBreaker, CircuitState
from rag_resilience.chaos import ChaosServer
from rag_resilience.errors import CircuitOpenError
from rag_resilience.fallback import DEFAULT_GENERIC_ANSWER, GracefulFallbacks
from rag_resilience.langchain import (
    ResilienceCallbackHandler,
    ResilientEmbeddings,
    ResilientLLM,
    ResilientRunnable,
    with_resilience,
)
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DOCS = [
    "Refunds are accepted within 30 days of purchase.",
    "Support is open Monday to Friday, 9am to 5pm.",
    "Shipping to Europe takes 5 to 7 business days.",
]


@pytest.fixture(scope="module")
def server() -> Iterator[ChaosServer]:
    with ChaosServer(seed=3) as srv:
        yield srv


@pytest.fixture
def chaos(server: ChaosServer) -> ChaosServer:
    server.reset()
    server.clear_faults()
    return server


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as clk:
        yield clk


def build_chain(
    server: ChaosServer, name: str, **overrides: Any
) -> tuple[Runnable[Any, Any], dict[str, Any]]:
    emb_policy = ResiliencePolicy.preset(
        "balanced", name=f"{name}-emb", max_retries=1, failure_threshold=3
    )
    llm_policy = ResiliencePolicy.preset(
        "balanced", name=f"{name}-llm", max_retries=1, failure_threshold=3, **overrides
    )
    embeddings = ResilientEmbeddings(
        OpenAIEmbeddings(
            model="text-embedding-3-small",
            max_retries=0,
            base_url=server.base_url,
            api_key="sk-test",
            check_embedding_ctx_length=False,
        ),
        policy=emb_policy,
    )
    store = InMemoryVectorStore(embeddings)
    store.add_documents([Document(page_content=d) for d in DOCS])
    retriever = store.as_retriever(search_kwargs={"k": 2})
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from the context.\n{context}"), ("human", "{question}")]
    )
    llm = ResilientLLM(
        ChatOpenAI(model="gpt-4o-mini", max_retries=0, base_url=server.base_url, api_key="sk-test"),
        policy=llm_policy,
        generic_fallback=True,
    )

    def fmt(docs: list[Document]) -> str:
        return "\n".join(d.page_content for d in docs)

    rag = (
        {"context": retriever | RunnableLambda(fmt), "question": RunnablePassthrough()}
        | prompt
        | llm
        | StrOutputParser()
    )
    chain_policy = ResiliencePolicy.preset("balanced", name=f"{name}-chain", max_retries=0)
    return with_resilience(rag, policy=chain_policy, generic_fallback=True), {
        "llm": llm,
        "embeddings": embeddings,
        "chain_policy": chain_policy,
    }


def test_rag_chain_keeps_answering_through_an_outage(chaos: ChaosServer, clock: FakeClock) -> None:
    chain, parts = build_chain(chaos, "rag-sync")
    handler = ResilienceCallbackHandler()
    cfg: Any = {"callbacks": [handler]}
    known = chain.invoke("How long do refunds take?", config=cfg)
    assert isinstance(known, str) and known

    chaos.set_faults(outage=True)
    clock.advance(45.0)
    again = chain.invoke("How long do refunds take?", config=cfg)
    assert again == known  # from cache (the LLM's, via the cached query vector)
    new = chain.invoke("Do you ship to Mars?", config=cfg)
    assert new == DEFAULT_GENERIC_ANSWER  # no exception
    stats = handler.stats()
    assert stats["degraded"] >= 2
    assert "cache" in stats["fallbacks_by_source"]
    chain_stats = parts["chain_policy"].stats()
    assert chain_stats["fallbacks_by_source"].get("generic_fallback") == 1
    # The degraded answer was not stored as the chain's last-known-good.
    chaos.set_faults(outage=False)
    clock.advance(300.0)  # past the embeddings breaker's open period
    fresh = chain.invoke("Do you ship to Mars?")
    assert fresh != DEFAULT_GENERIC_ANSWER


async def test_rag_chain_async_through_an_outage(chaos: ChaosServer, clock: FakeClock) -> None:
    chain, _ = build_chain(chaos, "rag-async")
    known = await chain.ainvoke("When is support open?")
    chaos.set_faults(outage=True)
    clock.advance(10.0)
    assert await chain.ainvoke("When is support open?") == known
    assert await chain.ainvoke("Unknown question?") == DEFAULT_GENERIC_ANSWER
    streamed = [c async for c in chain.astream("Another unknown?")]
    assert "".join(streamed) == DEFAULT_GENERIC_ANSWER


def test_chain_cache_serves_known_input_with_age(clock: FakeClock) -> None:
    calls = {"n": 0}
    broken = threading.Event()

    def answer(question: str) -> AIMessage:
        calls["n"] += 1
        if broken.is_set():
            raise ConnectionError("upstream down")
        return AIMessage(content=f"answer to {question}")

    chain = with_resilience(
        RunnableLambda(answer),
        policy=ResiliencePolicy.preset("balanced", name="lambda-chain", max_retries=0),
    )
    assert isinstance(chain, ResilientRunnable)
    live = chain.invoke("q1")
    broken.set()
    clock.advance(12.0)
    cached = chain.invoke("q1")
    assert isinstance(cached, AIMessage) and cached.content == live.content
    meta = cached.response_metadata["resilience"]
    assert meta["source"] == "cache" and meta["age_s"] == pytest.approx(12.0)
    generic = chain.invoke("q2")
    assert generic.response_metadata["resilience"]["source"] == "generic_fallback"
    assert chain.batch(["q1", "q2"])[0].content == live.content
    assert [c.content for c in chain.stream("q1")] == [live.content]


def test_batch_in_flight_never_exceeds_the_limit(chaos: ChaosServer, clock: FakeClock) -> None:
    limit = ConcurrencyLimit(3, max_waiting=1000, name="rag-batch")
    llm_policy = ResiliencePolicy(
        None, None, GracefulFallbacks(name="rag-batch"), limit, name="rag-batch-llm"
    )
    llm = ResilientLLM(
        ChatOpenAI(model="gpt-4o-mini", max_retries=0, base_url=chaos.base_url, api_key="sk-test"),
        policy=llm_policy,
    )
    chaos.set_faults(latency=0.02)
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = with_resilience(
        prompt | llm | StrOutputParser(),
        policy=ResiliencePolicy.preset("balanced", name="rag-batch-chain", max_retries=0),
    )
    outputs = chain.batch(
        [{"question": f"q{i}"} for i in range(24)], config={"max_concurrency": 32}
    )
    assert len(outputs) == 24 and all(outputs)
    assert chaos.wait_idle()  # counters move after the answers are written
    stats = chaos.stats()
    assert stats["endpoints"]["chat"]["requests"] == 24
    assert stats["max_in_flight"] <= 3
    assert stats["max_in_flight"] >= 2  # the batch really ran concurrently


def test_handler_breaker_guards_an_unwrapped_model(clock: FakeClock) -> None:
    calls = {"n": 0}

    class Flaky(FakeListChatModel):
        def _call(self, *args: Any, **kwargs: Any) -> str:
            calls["n"] += 1
            raise ConnectionError("upstream down")

    breaker = CircuitBreaker(failure_threshold=2, recovery_timeout=30.0, name="guard")
    cache = GracefulFallbacks(name="guard-cache")
    handler = ResilienceCallbackHandler(breaker=breaker, fallbacks=cache)
    assert handler.raise_error is True
    good = FakeListChatModel(responses=["Paris"])
    good.invoke("capital of France?", config={"callbacks": [handler]})
    assert (
        handler.last_known_good(
            [
                *ChatPromptTemplate.from_messages([("human", "capital of France?")])
                .invoke({})
                .to_messages()
            ]
        )[0]
        == "Paris"
    )

    flaky = Flaky(responses=["never"])
    for _ in range(2):
        with pytest.raises(ConnectionError):
            flaky.invoke("q", config={"callbacks": [handler]})
    assert breaker.get_state() is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        flaky.invoke("q", config={"callbacks": [handler]})
    assert calls["n"] == 2  # failed fast: the model was not called
    stats = handler.stats()
    # the rejected call raised CircuitOpenError to its caller: a user-facing error too
    assert stats["errors_by_class"] == {"ConnectionError": 2, "CircuitOpenError": 1}
    assert (stats["calls"], stats["live"], stats["errors"], stats["attempts"]) == (4, 1, 3, 3)
    assert stats["rejections"] == 1
    assert stats["breaker_transitions"].get("closed->open") == 1
    assert stats["latency_s"]["count"] == 3


def test_bind_tools_and_structured_output_stay_resilient() -> None:
    from pydantic import BaseModel

    class Answer(BaseModel):
        text: str

    llm = ResilientLLM(
        ChatOpenAI(
            model="gpt-4o-mini", max_retries=0, base_url="http://127.0.0.1:9/v1", api_key="sk-test"
        )
    )
    bound = llm.bind_tools([Answer])
    assert getattr(bound, "bound", None) is llm and "tools" in bound.kwargs  # type: ignore[attr-defined]
    structured = llm.with_structured_output(Answer)
    first = structured.bound.first  # type: ignore[attr-defined]  # under TypedOutput
    assert first.bound is llm


def test_chain_ending_in_a_chat_model_degrades_to_a_message(clock: FakeClock) -> None:
    # A chat model's OutputType is an Annotated union of message classes: the generic
    # answer of a chain ending in one must be an AIMessage carrying the metadata, not a str,
    # even before any live answer was seen.
    class Down(FakeListChatModel):
        def _call(self, *args: Any, **kwargs: Any) -> str:
            raise ConnectionError("upstream down")

    prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
    chain = with_resilience(
        prompt | Down(responses=["unused"]),
        policy=ResiliencePolicy.preset("balanced", name="typed-chain", max_retries=0),
    )
    out = chain.invoke({"q": "never asked"})
    assert isinstance(out, AIMessage)
    assert out.response_metadata["resilience"]["source"] == "generic_fallback"
    assert out.content == DEFAULT_GENERIC_ANSWER
