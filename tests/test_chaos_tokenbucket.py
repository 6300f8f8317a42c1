"""The chaos server's minimal tokens-per-minute limit, over real HTTP with the openai SDK."""

from __future__ import annotations

import openai
import pytest

from rag_resilience.chaos import ChaosServer
from rag_resilience.chaos.tokenbucket import TokenRateLimit, request_tokens
from rag_resilience.testing import FakeClock


def test_tokens_are_charged_and_a_429_says_exactly_when_they_fit() -> None:
    clock = FakeClock()
    with ChaosServer(seed=1, embedding_dim=8) as server:
        server.token_limit = TokenRateLimit(600, burst=50, clock=clock)  # 10 tokens/s
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        text = "x" * 80  # 20 tokens by the server's estimate; two per request: 40
        raw = client.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input=[text, text]
        )
        assert raw.headers["x-ratelimit-remaining-tokens"] == "10"
        assert raw.headers["x-ratelimit-limit-tokens"] == "600"
        with pytest.raises(openai.RateLimitError) as info:
            client.embeddings.create(model="text-embedding-3-small", input=[text, text])
        headers = info.value.response.headers
        assert headers["retry-after-ms"] == "3000"  # (40 - 10) / 10 tokens per second
        assert info.value.body["type"] == "tokens"  # type: ignore[index]
        clock.advance(3.0)
        client.embeddings.create(model="text-embedding-3-small", input=[text, text])
        assert server.wait_idle()
        stats = server.stats()
        assert stats["statuses"] == {200: 2, 429: 1} and stats["faults"] == {"rate_limited": 1}
        assert server.token_limit.stats() == {"admitted_tokens": 80, "rejected": 1}


def test_request_tokens_and_bad_settings() -> None:
    assert request_tokens("embeddings", b'{"input": ["abcd", [1, 2, 3]]}') == 1 + 3
    assert request_tokens("chat", b'{"messages": [{"content": "abcdefgh"}], "max_tokens": 5}') == 7
    assert request_tokens("embeddings", b"not json") == 0
    with pytest.raises(ValueError, match="tokens_per_minute"):
        TokenRateLimit(0)
    with pytest.raises(ValueError, match="burst"):
        TokenRateLimit(60, burst=0)
