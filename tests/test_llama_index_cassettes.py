"""ResilientLLM / ResilientEmbedding replaying the recorded LlamaIndex cassettes (no network)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

pytest.importorskip("llama_index.llms.openai")
from llama_index.core.base.llms.types import ChatMessage
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import cassettes
from rag_resilience.llama_index import ResilientEmbedding, ResilientLLM
from rag_resilience.testing import FakeClock, fake_clock

BASE = cassettes.CASSETTE_BASE_URL
Q = [ChatMessage(role="user", content="q")]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


def llm(**kw: Any) -> ResilientLLM:
    inner = OpenAI(model="gpt-4o-mini", api_base=BASE, api_key="sk-test", max_retries=0)
    return ResilientLLM(inner, policy=ResiliencePolicy.preset("balanced", name="cass-llm"), **kw)


def embed() -> ResilientEmbedding:
    inner = OpenAIEmbedding(api_base=BASE, api_key="sk-test", max_retries=0)
    return ResilientEmbedding(inner, policy=ResiliencePolicy.preset("balanced", name="cass-emb"))


@pytest.mark.parametrize(
    ("name", "requests"), [("500_then_success", 2), ("503x3_then_success", 4), ("success", 1)]
)
def test_chat_recovers_with_exact_request_count(clock: FakeClock, name: str, requests: int) -> None:
    with cassettes.use_cassette(f"llamaindex_chat/{name}") as cassette:
        response = llm().chat(Q)
    assert "resilience" not in response.additional_kwargs and response.message.content
    assert cassette.play_count == requests and len(clock.sleeps) == requests - 1


def test_chat_honours_recorded_retry_after(clock: FakeClock) -> None:
    with cassettes.use_cassette("llamaindex_chat/429_retry_after_then_success") as cassette:
        llm().chat(Q)
    assert cassette.play_count == 2 and clock.sleeps == [pytest.approx(1.0, abs=0.01)]


def test_quota_and_bad_request_are_played_once(clock: FakeClock) -> None:
    with (
        cassettes.use_cassette("llamaindex_chat/429_insufficient_quota") as cassette,
        pytest.raises(openai.RateLimitError),
    ):
        llm(generic_fallback=False).chat(Q)
    assert cassette.play_count == 1
    with (
        cassettes.use_cassette("llamaindex_chat/400_context_length_exceeded") as cassette,
        pytest.raises(openai.BadRequestError),
    ):
        llm().chat(Q)  # never masked, even with a generic answer enabled
    assert cassette.play_count == 1 and clock.sleeps == []


def test_outage_gives_the_generic_answer(clock: FakeClock) -> None:
    with cassettes.use_cassette("llamaindex_chat/outage") as cassette:
        response = llm().chat(Q)
    assert response.additional_kwargs["resilience"]["source"] == "generic_fallback"
    assert cassette.play_count == 4  # balanced: 1 + 3 retries


def test_stream_replay(clock: FakeClock) -> None:
    with cassettes.use_cassette("llamaindex_chat/stream_success"):
        text = "".join(c.delta or "" for c in llm().stream_chat(Q))
    assert text


@pytest.mark.parametrize(("name", "requests"), [("500_then_success", 2), ("503x3_then_success", 4)])
def test_embeddings_recover(clock: FakeClock, name: str, requests: int) -> None:
    with cassettes.use_cassette(f"llamaindex_embeddings/{name}") as cassette:
        vector = embed().get_text_embedding("text")
    assert vector and cassette.play_count == requests


def test_embeddings_outage_without_cache_raises(clock: FakeClock) -> None:
    with (
        cassettes.use_cassette("llamaindex_embeddings/outage") as cassette,
        pytest.raises(openai.InternalServerError),
    ):
        embed().get_text_embedding("text")
    assert cassette.play_count == 4
