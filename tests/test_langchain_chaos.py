"""ResilientLLM / ResilientEmbeddings with the real ChatOpenAI / OpenAIEmbeddings
(max_retries=0) against the chaos server: upstream request counts come from the server,
waits from the fake clock (nothing really sleeps)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import openai
import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from rag_resilience.adapters import NestedRetriesWarning
from rag_resilience.breaker import CircuitState
from rag_resilience.chaos import ChaosServer
from rag_resilience.fallback import DEFAULT_GENERIC_ANSWER
from rag_resilience.langchain import (
    ResilienceCallbackHandler,
    ResilientEmbeddings,
    ResilientLLM,
    _common,
)
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def server() -> Iterator[ChaosServer]:
    with ChaosServer(seed=1) as srv:
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


def chat(server: ChaosServer, **kw: object) -> ChatOpenAI:
    return ChatOpenAI(
        model="gpt-4o-mini", max_retries=0, base_url=server.base_url, api_key="sk-test", **kw
    )


def embeddings(server: ChaosServer) -> OpenAIEmbeddings:
    return OpenAIEmbeddings(
        model="text-embedding-3-small",
        max_retries=0,
        base_url=server.base_url,
        api_key="sk-test",
        check_embedding_ctx_length=False,
    )


def policy(name: str, **overrides: object) -> ResiliencePolicy:
    return ResiliencePolicy.preset("balanced", name=name, **overrides)


def requests(server: ChaosServer, endpoint: str = "chat") -> int:
    assert server.wait_idle()  # counters move after the answer is written: read them idle
    return int(server.stats()["endpoints"][endpoint]["requests"])


def test_500_500_200_recovers_with_three_requests(chaos: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(chat(chaos), policy=policy("t-500"))
    chaos.set_faults(fail_next=2, fail_next_status=500)
    answer = llm.invoke("What is RAG?")
    assert answer.content
    assert answer.response_metadata["resilience"] == {
        "source": "live",
        "attempts": 3,
        "age_s": None,
        "degraded": False,
    }
    assert requests(chaos) == 3
    assert len(clock.sleeps) == 2  # two backoffs, on the fake clock


async def test_async_500_500_200_recovers(chaos: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(chat(chaos), policy=policy("t-500-async"))
    chaos.set_faults(fail_next=2, fail_next_status=500)
    answer = await llm.ainvoke("What is RAG?")
    assert answer.response_metadata["resilience"]["attempts"] == 3
    assert requests(chaos) == 3


def test_429_retry_after_is_honoured(chaos: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(chat(chaos), policy=policy("t-429"))
    chaos.set_faults(fail_next=1, fail_next_status=429, retry_after=7.0)
    answer = llm.invoke("hello")
    assert answer.response_metadata["resilience"]["attempts"] == 2
    assert clock.sleeps == [7.0]
    assert requests(chaos) == 2


def test_400_is_attempted_once_and_never_masked(chaos: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(chat(chaos), policy=policy("t-400"), generic_fallback=True)
    chaos.set_faults(fail_next=1, fail_next_status=400)
    with pytest.raises(openai.BadRequestError):
        llm.invoke("a very long prompt")
    assert requests(chaos) == 1
    assert clock.sleeps == []


def test_insufficient_quota_is_attempted_once(chaos: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(chat(chaos), policy=policy("t-quota"), generic_fallback=False)
    chaos.set_faults(fail_next=1, fail_next_status="insufficient_quota")
    with pytest.raises(openai.RateLimitError):
        llm.invoke("hello")
    assert requests(chaos) == 1
    # With the generic answer on, billing exhaustion degrades (upstream condition), still once.
    llm2 = ResilientLLM(chat(chaos), policy=policy("t-quota2"), generic_fallback=True)
    chaos.set_faults(fail_next=1, fail_next_status="insufficient_quota")
    answer = llm2.invoke("hello")
    assert answer.content == DEFAULT_GENERIC_ANSWER
    assert answer.response_metadata["resilience"]["source"] == "generic_fallback"
    assert requests(chaos) == 2


def test_outage_breaker_cache_generic_and_half_open_recovery(
    chaos: ChaosServer, clock: FakeClock
) -> None:
    pol = policy("t-outage", failure_threshold=3, max_retries=1)
    llm = ResilientLLM(chat(chaos), policy=pol, generic_fallback=True)
    known = llm.invoke("What is the refund policy?")
    assert known.response_metadata["resilience"]["source"] == "live"

    chaos.set_faults(outage=True)
    clock.advance(30.0)
    served = [llm.invoke(f"new question {i}") for i in range(3)]
    assert all(a.content == DEFAULT_GENERIC_ANSWER for a in served)
    assert pol.breaker is not None and pol.breaker.get_state() is CircuitState.OPEN
    before = requests(chaos)

    cached = llm.invoke("What is the refund policy?")
    meta = cached.response_metadata["resilience"]
    assert cached.content == known.content
    assert meta["source"] == "cache" and meta["degraded"] is True
    assert meta["age_s"] is not None and meta["age_s"] >= 30.0
    unknown = llm.invoke("Something never asked")
    assert unknown.content == DEFAULT_GENERIC_ANSWER
    assert unknown.response_metadata["resilience"]["source"] == "generic_fallback"
    assert requests(chaos) == before  # open circuit: zero upstream requests

    chaos.set_faults(outage=False)
    clock.advance(pol.breaker.retry_after() + 0.1)
    probe = llm.invoke("after the outage")
    assert probe.response_metadata["resilience"]["source"] == "live"
    assert pol.breaker.get_state() is CircuitState.CLOSED
    transitions = pol.stats()["breaker_transitions"]
    assert transitions.get("closed->open") == 1
    assert transitions.get("open->half_open") == 1
    assert transitions.get("half_open->closed") == 1


def test_fallback_model_serves_while_primary_circuit_open(
    chaos: ChaosServer, clock: FakeClock
) -> None:
    pol = policy("t-fb", failure_threshold=2, max_retries=0)
    backup = FakeListChatModel(responses=["answer from the backup model"])
    llm = ResilientLLM(chat(chaos), policy=pol, fallback_models=[backup])
    chaos.set_faults(outage=True)
    for _ in range(2):
        assert llm.invoke("q").content == "answer from the backup model"
    assert pol.breaker is not None and pol.breaker.get_state() is CircuitState.OPEN
    before = requests(chaos)
    answer = llm.invoke("q2")
    assert answer.content == "answer from the backup model"
    meta = answer.response_metadata["resilience"]
    assert meta["source"] == "fallback" and meta["degraded"] is True
    assert meta["error"].startswith("CircuitOpenError")
    assert requests(chaos) == before
    fb_stats = llm.stats()["fallback_models"][0]
    assert fb_stats["breaker_state"] == "closed"  # the backup has its own breaker


def test_stream_retried_before_first_token(chaos: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(chat(chaos), policy=policy("t-stream"))
    chaos.set_faults(fail_next=1, fail_next_status=503)
    chunks = list(llm.stream("tell me a story"))
    assert "".join(str(c.content) for c in chunks)
    assert chunks[0].response_metadata["resilience"]["attempts"] == 2
    assert requests(chaos) == 2


def test_stream_not_retried_after_first_token(chaos: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(chat(chaos), policy=policy("t-stream-break"))
    chaos.set_faults(stream_break_after=2)
    received = []
    with pytest.raises(Exception):  # noqa: B017 - the transport error of a cut stream
        for chunk in llm.stream("tell me a story"):
            received.append(chunk)
    assert received  # tokens reached the caller before the cut
    assert requests(chaos) == 1


async def test_astream_retried_before_first_token(chaos: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(chat(chaos), policy=policy("t-astream"))
    chaos.set_faults(fail_next=1, fail_next_status=502)
    chunks = [c async for c in llm.astream("tell me a story")]
    assert "".join(str(c.content) for c in chunks)
    assert requests(chaos) == 2


def test_tokens_reach_callback_handlers(chaos: ChaosServer, clock: FakeClock) -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []
            self.starts = 0

        def on_chat_model_start(self, *a: object, **k: object) -> None:
            self.starts += 1

        def on_llm_new_token(self, token: str, **k: object) -> None:
            self.tokens.append(token)

    llm = ResilientLLM(chat(chaos, streaming=True), policy=policy("t-tokens"))
    handler = Tokens()
    answer = llm.invoke("hi", config={"callbacks": [handler]})
    assert handler.starts == 1  # one run, not a nested second one
    assert "".join(handler.tokens).strip() and answer.content


def test_embeddings_per_text_cache_and_sub_batches(chaos: ChaosServer, clock: FakeClock) -> None:
    emb = ResilientEmbeddings(
        embeddings(chaos), policy=policy("t-emb", max_retries=1), batch_size=2
    )
    docs = ["alpha", "beta", "gamma", "delta"]
    chaos.set_faults(fail_next=1, fail_next_status=500)
    vectors = emb.embed_documents(docs)
    assert len(vectors) == 4
    assert requests(chaos, "embeddings") == 3  # only the failing sub-batch was retried

    chaos.set_faults(outage=True)
    again = emb.embed_documents(docs[:2])
    assert [list(map(lambda x: round(x, 5), v)) for v in again] == [
        list(map(lambda x: round(x, 5), v)) for v in vectors[:2]
    ]
    assert emb.last_result is not None and emb.last_result.degraded
    with pytest.raises(openai.InternalServerError) as info:
        emb.embed_query("never embedded")
    assert "never invented" in "\n".join(getattr(info.value, "__notes__", []))


def test_nested_retries_and_timeout_copy(chaos: ChaosServer) -> None:
    _common.reset_warnings()
    inner = ChatOpenAI(model="gpt-4o-mini", base_url=chaos.base_url, api_key="sk-test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = ResilientLLM(inner, policy="balanced")
        ResilientEmbeddings(OpenAIEmbeddings(base_url=chaos.base_url, api_key="sk-test"))
    nested = [str(w.message) for w in caught if issubclass(w.category, NestedRetriesWarning)]
    assert len(nested) == 2
    assert "up to 12 upstream requests" in nested[0] and "max_retries=0" in nested[0]
    # The policy's attempt timeout reaches the inner client; the user's object is untouched.
    copy = llm._rt.primary.model
    assert inner.request_timeout is None and copy.request_timeout == 30.0
    assert copy.root_client.timeout == 30.0


def test_callback_handler_sees_retries_and_fallbacks(chaos: ChaosServer, clock: FakeClock) -> None:
    pol = policy("t-handler", failure_threshold=2, max_retries=1)
    llm = ResilientLLM(chat(chaos), policy=pol, generic_fallback=True)
    handler = ResilienceCallbackHandler()
    cfg = {"callbacks": [handler]}
    chaos.set_faults(fail_next=1, fail_next_status=500)
    llm.invoke("q1", config=cfg)
    chaos.set_faults(outage=True)
    llm.invoke("q2", config=cfg)
    llm.invoke("q1", config=cfg)
    stats = handler.stats()
    assert stats["calls"] == 3
    assert stats["retries"] >= 1
    assert stats["fallbacks_by_source"].get("cache") == 1
    assert stats["fallbacks_by_source"].get("generic_fallback") == 1
    assert stats["breaker_transitions"].get("closed->open") == 1
    assert stats["latency_s"]["count"] == 3
