"""The chaos server's tokens-per-minute bucket (`Faults.rate_limit_tpm`), over real HTTP with
the openai SDK and a fake clock: what a token 429 says, and a limit on embeddings only."""

from __future__ import annotations

from collections.abc import Callable

import openai
import pytest

from rag_resilience.chaos import ChaosServer, Faults
from rag_resilience.chaos.ratelimits import request_cost
from rag_resilience.testing import FakeClock

MODEL = "text-embedding-3-small"


def test_tokens_are_charged_and_a_429_says_exactly_when_they_fit(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    clock = FakeClock()
    server = chaos_server_factory(
        seed=1,
        embedding_dim=8,
        clock=clock,
        rate_limit_tpm=600,  # 10 tokens/s
        rate_limit_token_burst=50,
        endpoints=("embeddings",),
    )
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    text = "x" * 80  # 20 tokens by the server's estimate; two per request: 40
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=[text, text])
    assert raw.headers["x-ratelimit-remaining-tokens"] == "10"
    assert raw.headers["x-ratelimit-limit-tokens"] == "50"  # the bucket's capacity
    assert raw.headers["x-ratelimit-reset-tokens"] == "4s"  # 40 tokens at 10 per second
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model=MODEL, input=[text, text])
    headers = info.value.response.headers
    assert headers["retry-after-ms"] == "3000"  # (40 - 10) / 10 tokens per second
    assert info.value.body["type"] == "tokens"  # type: ignore[index]
    # the limit is on embeddings only: chat is not charged nor refused
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    clock.advance(3.0)
    client.embeddings.create(model=MODEL, input=[text, text])
    assert server.wait_idle()
    stats = server.stats()
    assert stats["statuses"] == {200: 3, 429: 1} and stats["faults"] == {"rate_limited": 1}
    assert stats["rate_limits"] == {"admitted_tokens": 80, "rejected": {"requests": 0, "tokens": 1}}
    assert stats["endpoints"]["chat"]["statuses"] == {200: 1}


def test_another_key_has_its_own_bucket_and_reset_refills(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    clock = FakeClock()
    server = chaos_server_factory(
        embedding_dim=8, clock=clock, rate_limit_tpm=600, rate_limit_token_burst=50
    )
    a = openai.OpenAI(base_url=server.base_url, api_key="sk-a", max_retries=0)
    b = openai.OpenAI(base_url=server.base_url, api_key="sk-b", max_retries=0)
    big = ["x" * 160]  # 40 tokens
    a.embeddings.create(model=MODEL, input=big)
    b.embeddings.create(model=MODEL, input=big)  # its own full bucket
    with pytest.raises(openai.RateLimitError):
        a.embeddings.create(model=MODEL, input=big)
    assert server.wait_idle()
    server.reset()  # fresh buckets and counters
    a.embeddings.create(model=MODEL, input=big)
    assert server.wait_idle()
    assert server.stats()["rate_limits"]["admitted_tokens"] == 40


def test_request_cost_and_bad_settings() -> None:
    assert request_cost("embeddings", b'{"input": ["abcd", [1, 2, 3]]}') == 1 + 3
    assert request_cost("embeddings", b'{"input": [1, 2, 3]}') == 3  # one tokenized input
    assert request_cost("embeddings", b"not json") == 1
    with pytest.raises(ValueError, match="rate_limit_tpm"):
        Faults(rate_limit_tpm=0)
    with pytest.raises(ValueError, match="rate_limit_token_burst"):
        Faults(rate_limit_tpm=60, rate_limit_token_burst=0)
