"""Acceptance (issue 15, "open on outages, not on a flaky-but-working upstream"): NOT FIXED.

The LlamaIndex starter app (VectorStoreIndex, ResilientEmbedding, ResilientLLM,
ResilientQueryEngine, "balanced" preset) against an upstream failing 50% of requests at
random answered 43 of 100 questions live (5 seeds x 20; 57 got the generic answer; this
test: 5 of 20), where 4
attempts per call could answer about 94% live: the presets' breaker counts failed
*attempts*, so 5 failures in a row (one failed call plus one failed attempt) open the
embeddings circuit of a working upstream. Marked xfail(strict) until the presets decide
what they count (breaker/policy owners); when it passes, drop the mark.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from rag_resilience.chaos import ChaosServer
from rag_resilience.llama_index import ResilientEmbedding, ResilientLLM, ResilientQueryEngine
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DOCS = [Document(text="A circuit breaker stops calling a failing service for a while.")]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


@pytest.mark.xfail(strict=True, reason="issue 15: presets open the circuit on a flaky upstream")
def test_flaky_upstream_is_mostly_answered_live(
    chaos_server_factory: Any, clock: FakeClock
) -> None:
    server: ChaosServer = chaos_server_factory(seed=1, embedding_dim=16)
    base = {"api_base": server.base_url, "api_key": "sk-test", "max_retries": 0}
    llm = ResilientLLM(OpenAI(model="gpt-4o-mini", **base), name="acc-flaky-llm")
    emb = ResilientEmbedding(OpenAIEmbedding(**base), name="acc-flaky-emb")
    index = VectorStoreIndex.from_documents(DOCS, embed_model=emb)
    engine = ResilientQueryEngine(index.as_query_engine(llm=llm), name="acc-flaky-qe")
    server.set_faults(error_rate=0.5, status=503)
    sources: Counter[str] = Counter()
    for i in range(20):
        sources[engine.query(f"flaky question {i}").metadata["resilience"]["source"]] += 1
        clock.advance(0.5)
    assert sources["live"] >= 17, sources  # ~94% expected with 4 attempts per call
