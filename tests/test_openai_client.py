"""ResilientOpenAIClient with the real openai SDK over real HTTP to the chaos server."""

from __future__ import annotations

import warnings
from typing import Any

import httpx
import openai
import pytest

from rag_resilience import (
    AsyncResilientOpenAIClient,
    CircuitState,
    ResiliencePolicy,
    ResilientOpenAIClient,
)
from rag_resilience.adapters import NestedRetriesWarning, reset_warnings
from rag_resilience.chaos import ChaosServer
from rag_resilience.errors import is_handled
from rag_resilience.testing import FakeClock, fake_clock

MSG = [{"role": "user", "content": "What is a circuit breaker?"}]


def requests(server: ChaosServer) -> int:
    assert server.wait_idle()  # counters move after the answer is written: read them idle
    return int(server.stats()["requests"])


@pytest.fixture
def clock() -> Any:
    with fake_clock() as c:
        yield c


def make(server: ChaosServer, **kw: Any) -> ResilientOpenAIClient:
    policy = kw.pop("policy", None) or ResiliencePolicy.preset("balanced", name="oai-test", **kw)
    return ResilientOpenAIClient(api_key="sk-test", base_url=server.base_url, policy=policy)


def test_500_500_200_recovers_with_exactly_three_requests(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    client = make(chaos_server)
    chaos_server.set_faults(fail_next=2, fail_next_status=500)
    result = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert "circuit breaker" in result.choices[0].message.content.lower()
    assert requests(chaos_server) == 3
    assert result.resilience == {"source": "live", "attempts": 3, "age_s": None, "degraded": False}
    assert len(clock.sleeps) == 2
    assert client.stats()["retries"] == 2


def test_429_retry_after_is_honoured(chaos_server: ChaosServer, clock: FakeClock) -> None:
    client = make(chaos_server)
    chaos_server.set_faults(fail_next=1, fail_next_status=429, retry_after=1)
    start = clock.monotonic()
    result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(result.data) == 2 and requests(chaos_server) == 2
    # The second request was not sent before the server's Retry-After had passed.
    assert clock.sleeps == [1.0]
    assert clock.monotonic() - start >= 1.0


def test_400_is_sent_exactly_once_and_raised_untouched(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    client = make(chaos_server, generic_fallback=True)
    chaos_server.set_faults(fail_next=1, fail_next_status=400)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert info.value.code == "context_length_exceeded"
    assert requests(chaos_server) == 1
    assert not getattr(info.value, "__notes__", None)  # untouched
    assert clock.sleeps == []


def test_insufficient_quota_is_not_retried(chaos_server: ChaosServer, clock: FakeClock) -> None:
    client = make(chaos_server)
    chaos_server.set_faults(fail_next=1, fail_next_status="insufficient_quota")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert requests(chaos_server) == 1 and clock.sleeps == []


def test_outage_opens_circuit_then_zero_upstream_requests(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    client = make(chaos_server, generic_fallback=True)
    known = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    chaos_server.set_faults(outage=True)
    clock.advance(30)
    for _ in range(5):  # balanced: 5 failed calls (x 4 attempts) open the circuit
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert client.policy.breaker.get_state() is CircuitState.OPEN
    sent = requests(chaos_server)
    slept = len(clock.sleeps)
    for _ in range(20):
        served = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert served.resilience["source"] == "cache" and served.resilience["degraded"]
        assert served.resilience["age_s"] >= 30
        assert served.choices[0].message.content == known.choices[0].message.content
    new = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "new?"}]
    )
    assert new.resilience["source"] == "generic_fallback"
    assert requests(chaos_server) == sent  # zero upstream requests while open
    assert len(clock.sleeps) == slept  # and nobody slept through backoff
    # Recovery: the API comes back, the next call after the open period probes and closes.
    chaos_server.set_faults(outage=False)
    clock.advance(client.policy.breaker.retry_after())
    live = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert live.resilience["source"] == "live"
    assert client.policy.breaker.get_state() is CircuitState.CLOSED


def test_outage_without_fallbacks_raises_the_original_error(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    client = make(chaos_server)
    chaos_server.set_faults(outage=True)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "?"}]
        )
    assert is_handled(info.value)
    assert any("gave up after 4 attempt(s)" in n for n in info.value.__notes__)
    assert requests(chaos_server) == 4


def test_streaming_retried_before_first_chunk_only(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    client = make(chaos_server)
    chaos_server.set_faults(fail_next=2, fail_next_status=503)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "circuit breaker" in text.lower() and requests(chaos_server) == 3
    assert stream.resilience is not None and stream.resilience["attempts"] == 3
    # A stream that breaks after the first chunks is not retried: the error propagates.
    chaos_server.reset()
    chaos_server.set_faults(stream_break_after=2)
    broken = client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    got = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        for chunk in broken:
            got.append(chunk)
    assert len(got) >= 1 and requests(chaos_server) == 1


def test_handed_client_with_retries_is_copied_with_zero_and_warned(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    reset_warnings()
    inner = openai.OpenAI(api_key="sk-test", base_url=chaos_server.base_url)  # max_retries=2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = ResilientOpenAIClient(client=inner, policy="balanced")
        ResilientOpenAIClient(client=inner, policy="balanced")
    nested = [w for w in caught if issubclass(w.category, NestedRetriesWarning)]
    assert len(nested) == 1 and "up to 12 upstream requests" in str(nested[0].message)
    assert client.client.max_retries == 0 and inner.max_retries == 2
    chaos_server.set_faults(fail_next=1, fail_next_status=503)
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert requests(chaos_server) == 2  # our retry, not the SDK's on top


async def test_async_client_retries_and_streams(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    client = AsyncResilientOpenAIClient(
        api_key="sk-test",
        base_url=chaos_server.base_url,
        policy=ResiliencePolicy.preset("balanced", name="oai-async"),
    )
    chaos_server.set_faults(fail_next=3, fail_next_status=503)
    result = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert result.resilience["attempts"] == 4 and requests(chaos_server) == 4
    emb = await client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(emb.data[0].embedding) == 1536
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
    chunks = [c async for c in stream]
    assert chunks and stream.resilience["source"] == "live"
