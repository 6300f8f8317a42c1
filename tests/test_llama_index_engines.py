"""Whole RAG pipelines: VectorStoreIndex + ResilientQueryEngine / ResilientChatEngine over the
chaos server keep answering through an outage (known questions from cache, new ones generic)."""

from __future__ import annotations

import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_index.llms.openai")

from llama_index.core import Document, VectorStoreIndex
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import ChaosServer
from rag_resilience.fallback import DEFAULT_GENERIC_ANSWER
from rag_resilience.llama_index import (
    ResilientChatEngine,
    ResilientEmbedding,
    ResilientLLM,
    ResilientQueryEngine,
)
from rag_resilience.testing import FakeClock, fake_clock

DOCS = [
    Document(text="A circuit breaker stops calling a failing service for a while."),
    Document(text="Exponential backoff waits longer after each failed attempt."),
    Document(text="A last-known-good cache serves the previous answer when live fails."),
]
KNOWN = "What does a circuit breaker do?"
NEW = "How do bulkheads isolate failures?"


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


@pytest.fixture
def server(chaos_server_factory: Any) -> ChaosServer:
    small: ChaosServer = chaos_server_factory(seed=5, embedding_dim=16)
    return small


def models(server: ChaosServer, wrapped: bool = True) -> tuple[Any, Any]:
    llm = OpenAI(model="gpt-4o-mini", api_base=server.base_url, api_key="sk-test", max_retries=0)
    emb = OpenAIEmbedding(api_base=server.base_url, api_key="sk-test", max_retries=0)
    if not wrapped:
        return llm, emb
    fast = {"max_retries": 1}
    return (
        ResilientLLM(llm, policy=ResiliencePolicy.preset("balanced", name="t-llm", **fast)),
        ResilientEmbedding(emb, policy=ResiliencePolicy.preset("balanced", name="t-emb", **fast)),
    )


def build(server: ChaosServer, wrapped: bool = True) -> tuple[VectorStoreIndex, Any]:
    llm, emb = models(server, wrapped)
    index = VectorStoreIndex.from_documents(DOCS, embed_model=emb)
    return index, llm


def test_query_engine_keeps_answering_through_an_outage(
    server: ChaosServer, clock: FakeClock
) -> None:
    index, llm = build(server)
    engine = ResilientQueryEngine(
        index.as_query_engine(llm=llm, similarity_top_k=1),
        policy=ResiliencePolicy.preset("balanced", name="t-qe"),
    )
    live = engine.query(KNOWN)
    assert live.metadata["resilience"]["source"] == "live"
    assert "circuit breaker" in str(live) and live.source_nodes
    clock.advance(60)
    server.set_faults(outage=True)
    known = engine.query(KNOWN)
    assert str(known) == str(live)
    meta = known.metadata["resilience"]
    assert meta["degraded"] is True and meta["source"] == "cache" and meta["age_s"] >= 60
    assert [n.node.get_content() for n in known.source_nodes] == [
        n.node.get_content() for n in live.source_nodes
    ]
    new = engine.query(NEW)  # its query embedding fails: no vector, no answer upstream
    assert str(new) == DEFAULT_GENERIC_ANSWER
    assert new.metadata["resilience"]["source"] == "generic_fallback"
    server.set_faults(outage=False)
    clock.advance(600)
    recovered = engine.query(NEW)
    assert recovered.metadata["resilience"]["source"] == "live" and "bulkheads" in str(recovered)


def test_query_engine_over_bare_models_serves_its_own_cache(
    server: ChaosServer, clock: FakeClock
) -> None:
    index, llm = build(server, wrapped=False)
    engine = ResilientQueryEngine(
        index.as_query_engine(llm=llm),
        policy=ResiliencePolicy.preset("balanced", name="t-qe2", max_retries=1),
    )
    server.set_faults(fail_next=1)
    live = engine.query(KNOWN)  # the whole query is retried once
    assert live.metadata["resilience"]["attempts"] == 2
    server.set_faults(outage=True)
    cached = engine.query(KNOWN)
    assert str(cached) == str(live) and cached.metadata["resilience"]["source"] == "cache"
    assert str(engine.query(NEW)) == DEFAULT_GENERIC_ANSWER


async def test_async_query_engine_through_an_outage(server: ChaosServer, clock: FakeClock) -> None:
    index, llm = build(server)
    engine = ResilientQueryEngine(
        index.as_query_engine(llm=llm), policy=ResiliencePolicy.preset("balanced", name="t-aqe")
    )
    live = await engine.aquery(KNOWN)
    server.set_faults(outage=True)
    known = await engine.aquery(KNOWN)
    assert str(known) == str(live) and known.metadata["resilience"]["degraded"] is True
    new = await engine.aquery(NEW)
    assert str(new) == DEFAULT_GENERIC_ANSWER


def test_inner_generic_answer_prefers_the_engine_cache(
    server: ChaosServer, clock: FakeClock
) -> None:
    # The question is embedded fine (cached vector) but the LLM answers generic: the
    # engine's own cached answer for the question wins over the LLM's generic message.
    index, llm = build(server)
    engine = ResilientQueryEngine(
        index.as_query_engine(llm=llm), policy=ResiliencePolicy.preset("balanced", name="t-qe3")
    )
    live = engine.query(KNOWN)
    llm.policy.fallbacks.clear()  # forget the LLM-level answer: only the engine knows it
    server.set_faults(outage=True)
    known = engine.query(KNOWN)
    assert str(known) == str(live)
    assert known.metadata["resilience"]["source"] == "cache"
    components = {c["component"]: c["source"] for c in known.metadata["resilience"]["components"]}
    assert components == {"t-emb": "cache", "t-llm": "generic_fallback"}


def test_chat_engine_keeps_answering_through_an_outage(
    server: ChaosServer, clock: FakeClock
) -> None:
    index, llm = build(server)
    engine = ResilientChatEngine(
        index.as_chat_engine(llm=llm), policy=ResiliencePolicy.preset("balanced", name="t-chat")
    )
    live = engine.chat(KNOWN)
    assert live.metadata["resilience"]["source"] == "live" and str(live)
    history = len(engine.chat_history)
    server.set_faults(outage=True)
    known = engine.chat(KNOWN)
    assert str(known) == str(live) and known.metadata["resilience"]["degraded"] is True
    new = engine.chat(NEW)
    assert str(new) == DEFAULT_GENERIC_ANSWER
    assert new.metadata["resilience"]["source"] == "generic_fallback"
    assert len(engine.chat_history) == history  # degraded answers are not written to memory
    stream = engine.stream_chat(NEW)
    assert "".join(stream.response_gen) == DEFAULT_GENERIC_ANSWER


async def test_async_chat_engine_through_an_outage(server: ChaosServer, clock: FakeClock) -> None:
    index, llm = build(server)
    engine = ResilientChatEngine(
        index.as_chat_engine(llm=llm), policy=ResiliencePolicy.preset("balanced", name="t-achat")
    )
    live = await engine.achat(KNOWN)
    server.set_faults(outage=True)
    known = await engine.achat(KNOWN)
    assert str(known) == str(live)
    new = await engine.achat(NEW)
    assert str(new) == DEFAULT_GENERIC_ANSWER
    stream = await engine.astream_chat(NEW)
    assert "".join([t async for t in stream.async_response_gen()]) == DEFAULT_GENERIC_ANSWER


def test_wrapped_pipeline_answers_like_the_bare_one(server: ChaosServer, clock: FakeClock) -> None:
    bare_index, bare_llm = build(server, wrapped=False)
    index, llm = build(server)
    bare = bare_index.as_query_engine(llm=bare_llm).query(KNOWN)
    ours = ResilientQueryEngine(index.as_query_engine(llm=llm)).query(KNOWN)
    assert str(ours) == str(bare)
    assert [n.node.get_content() for n in ours.source_nodes] == [
        n.node.get_content() for n in bare.source_nodes
    ]


def test_example_runs_without_an_api_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llama_index.core import Settings

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = Path(__file__).resolve().parents[1] / "examples" / "llama_index_settings.py"
    namespace = runpy.run_path(str(path), run_name="example")  # in-process: no re-import cost
    saved = (Settings._llm, Settings._embed_model)
    try:
        assert namespace["main"]() == 0
    finally:
        Settings._llm, Settings._embed_model = saved
    out = capsys.readouterr().out
    assert "source=cache" in out and "source=generic_fallback" in out
