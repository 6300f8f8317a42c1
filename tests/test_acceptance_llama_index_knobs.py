"""Acceptance: ResilientQueryEngine and ResilientChatEngine take policy knobs as keywords.

Found writing the LlamaIndex starter app: ``ResilientQueryEngine(qe, initial_delay=0.02,
recovery_timeout=1)`` raised ``TypeError: unexpected keyword argument 'initial_delay'``, while
ResilientLLM, ResilientEmbedding and LangChain's ``with_resilience`` take them (README,
"Drop-in": the wrappers take policy knobs as keywords).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import ChaosServer
from rag_resilience.llama_index import ResilientChatEngine, ResilientQueryEngine
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DOCS = [Document(text="A circuit breaker stops calling a failing service for a while.")]
KNOWN = "What does a circuit breaker do?"


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


@pytest.fixture
def server(chaos_server_factory: Any) -> ChaosServer:
    small: ChaosServer = chaos_server_factory(seed=5, embedding_dim=16)
    return small


def index_and_llm(server: ChaosServer) -> tuple[VectorStoreIndex, OpenAI]:
    llm = OpenAI(model="gpt-4o-mini", api_base=server.base_url, api_key="sk-test", max_retries=0)
    emb = OpenAIEmbedding(api_base=server.base_url, api_key="sk-test", max_retries=0)
    return VectorStoreIndex.from_documents(DOCS, embed_model=emb), llm


def test_query_engine_takes_policy_knobs(server: ChaosServer, clock: FakeClock) -> None:
    index, llm = index_and_llm(server)
    engine = ResilientQueryEngine(
        index.as_query_engine(llm=llm), max_retries=2, failure_threshold=50, name="acc-qe"
    )
    assert engine.policy.retry.max_retries == 2
    server.set_faults(fail_next=2)  # the whole query is retried twice, then answers live
    live = engine.query(KNOWN)
    assert live.metadata["resilience"]["source"] == "live"
    assert live.metadata["resilience"]["attempts"] == 3


async def test_chat_engine_takes_policy_knobs(server: ChaosServer, clock: FakeClock) -> None:
    index, llm = index_and_llm(server)
    engine = ResilientChatEngine(index.as_chat_engine(llm=llm), max_retries=0, name="acc-ce")
    assert engine.policy.retry.max_retries == 0
    server.set_faults(fail_next=1)  # no retry: the one failure is served degraded
    reply = await engine.achat(KNOWN)
    assert reply.metadata["resilience"]["degraded"] is True  # type: ignore[index]


def test_engine_knobs_are_checked(server: ChaosServer) -> None:
    index, llm = index_and_llm(server)
    qe = index.as_query_engine(llm=llm)
    with pytest.raises(TypeError, match="max_retries"):  # a typo names the accepted keywords
        ResilientQueryEngine(qe, max_retrys=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="must be an int"):
        ResilientQueryEngine(qe, max_retries="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="override a preset"):
        ResilientChatEngine(
            index.as_chat_engine(llm=llm), ResiliencePolicy.preset("balanced"), max_retries=1
        )
