"""ResilientEmbedding over the chaos server with LlamaIndex's real OpenAIEmbedding (max_retries=0)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import openai
import pytest

pytest.importorskip("llama_index.embeddings.openai")

import llama_index.core.instrumentation as instrument
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.embeddings.openai import OpenAIEmbedding

from rag_resilience import ResiliencePolicy
from rag_resilience.adapters import NestedRetriesWarning
from rag_resilience.chaos import ChaosServer
from rag_resilience.llama_index import ResilientEmbedding, ResilientEmbeddings
from rag_resilience.llama_index._common import reset_warnings
from rag_resilience.testing import FakeClock, fake_clock


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


@pytest.fixture
def server(chaos_server_factory: Any) -> ChaosServer:
    small: ChaosServer = chaos_server_factory(seed=3, embedding_dim=16)
    return small


def openai_embedding(server: ChaosServer, **kw: Any) -> OpenAIEmbedding:
    kw.setdefault("max_retries", 0)
    return OpenAIEmbedding(api_base=server.base_url, api_key="sk-test", **kw)


def policy(**overrides: Any) -> ResiliencePolicy:
    return ResiliencePolicy.preset("balanced", name="test-embed", **overrides)


def requests(server: ChaosServer) -> int:
    assert server.wait_idle()  # counters move after the answer is written: read them idle
    return int(server.stats()["endpoints"]["embeddings"]["requests"])


class Capture(BaseEventHandler):
    events: list[BaseEvent] = Field(default_factory=list)

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)


def test_same_vectors_and_events_as_the_bare_model(server: ChaosServer, clock: FakeClock) -> None:
    bare = openai_embedding(server, embed_batch_size=4)
    wrapped = ResilientEmbedding(openai_embedding(server, embed_batch_size=4), policy=policy())
    assert ResilientEmbeddings is ResilientEmbedding
    assert wrapped.embed_batch_size == 4 and wrapped.model_name == bare.model_name
    texts = [f"text {i}" for i in range(10)]
    root = instrument.get_dispatcher()
    capture = Capture()
    root.add_event_handler(capture)
    try:

        def run(model: Any) -> tuple[Any, list[str]]:
            capture.events.clear()
            out = (
                model.get_text_embedding_batch(texts),
                model.get_query_embedding("q"),
                model.get_text_embedding("one"),
            )
            return out, [type(e).__name__ for e in capture.events]

        bare_out, bare_events = run(bare)
        before = requests(server)
        wrapped_out, wrapped_events = run(wrapped)
    finally:
        root.event_handlers.remove(capture)
    assert wrapped_out == bare_out
    assert wrapped_events == bare_events and bare_events.count("EmbeddingEndEvent") == 5
    assert (
        requests(server) - before == 5
    )  # 3 batches of <= 4, one query, one text: one request each


def test_failed_batch_is_retried_alone(server: ChaosServer, clock: FakeClock) -> None:
    model = ResilientEmbedding(openai_embedding(server), policy=policy(), embed_batch_size=5)
    server.set_faults(fail_next=2, fail_next_status=502)
    vectors = model.get_text_embedding_batch([f"t{i}" for i in range(15)])
    assert len(vectors) == 15 and all(len(v) == 16 for v in vectors)
    assert requests(server) == 3 + 2  # the first batch took 3 requests, the others one each
    assert len(clock.sleeps) == 2


def test_cached_vectors_during_an_outage_never_invented(
    server: ChaosServer, clock: FakeClock
) -> None:
    model = ResilientEmbedding(openai_embedding(server), policy=policy(max_retries=1))
    live = model.get_text_embedding_batch(["alpha", "beta"])
    query = model.get_query_embedding("alpha?")
    clock.advance(10)
    server.set_faults(outage=True)
    assert model.get_text_embedding_batch(["beta", "alpha"]) == [
        pytest.approx(live[1], abs=1e-6),
        pytest.approx(live[0], abs=1e-6),
    ]
    served = model.last_served
    assert served is not None and served.degraded and served.metadata()["age_s"] >= 10
    assert model.get_query_embedding("alpha?") == pytest.approx(query, abs=1e-6)
    with pytest.raises(openai.InternalServerError) as info:
        model.get_text_embedding_batch(["alpha", "gamma"])  # gamma was never embedded
    assert any("never invented" in note for note in getattr(info.value, "__notes__", []))


def test_quota_and_bad_key_are_not_retried(server: ChaosServer, clock: FakeClock) -> None:
    model = ResilientEmbedding(openai_embedding(server), policy=policy())
    server.set_faults(fail_next=1, fail_next_status="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        model.get_query_embedding("x")
    server.set_faults(fail_next=1, fail_next_status="insufficient_quota")
    with pytest.raises(openai.RateLimitError):
        model.get_query_embedding("x")
    assert requests(server) == 2 and clock.sleeps == []


def test_indexing_1000_chunks_through_a_5_percent_failing_endpoint(
    server: ChaosServer, clock: FakeClock
) -> None:
    model = ResilientEmbedding(openai_embedding(server, embed_batch_size=10), policy=policy())
    server.set_faults(error_rate=0.05, status=503)
    texts = [f"chunk number {i} about resilience" for i in range(1000)]
    vectors = model.get_text_embedding_batch(texts)
    assert len(vectors) == 1000 and all(len(v) == 16 for v in vectors)
    ours = model.stats()
    assert ours["failures"] == 0 and ours["successes"] == 100 and ours["retries"] > 0
    # one request per batch plus one per retry (the server counts a request on arrival)
    assert requests(server) == 100 + ours["retries"]


async def test_async_batches_concurrent_and_complete(server: ChaosServer, clock: FakeClock) -> None:
    model = ResilientEmbedding(openai_embedding(server, embed_batch_size=25), policy=policy())
    server.set_faults(error_rate=0.05, status=500)
    texts = [f"async chunk {i}" for i in range(500)]
    vectors = await model.aget_text_embedding_batch(texts)
    assert len(vectors) == 500 and all(len(v) == 16 for v in vectors)
    assert await model.aget_query_embedding("q") == pytest.approx(
        openai_embedding(server).get_query_embedding("q"), abs=1e-6
    )


def test_nested_retries_warning_states_the_worst_case(server: ChaosServer) -> None:
    reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ResilientEmbedding(
            OpenAIEmbedding(api_base=server.base_url, api_key="sk-test"), policy=policy()
        )
    nested = [w for w in caught if issubclass(w.category, NestedRetriesWarning)]
    assert len(nested) == 1
    # default max_retries=10: 10 tenacity attempts x 11 SDK requests = 110, x 4 of ours
    assert "110 upstream requests" in str(nested[0].message)
    assert "up to 440 requests" in str(nested[0].message)


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError, match="embed_model"):
        ResilientEmbedding(None)
    with pytest.raises(ValueError, match="embed_batch_size"):
        ResilientEmbedding(OpenAIEmbedding(api_key="sk-test", max_retries=0), embed_batch_size=0)
