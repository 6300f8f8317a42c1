"""`ResilientOpenAIClient.beta.chat.completions.parse` over real HTTP against the chaos
server: a parse failure of a 200 is the model's answer; an outage gets the cached parsed
answer of the same call or UpstreamUnavailableError, never generic text."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest
from pydantic import BaseModel, ValidationError, field_validator

from rag_resilience import (
    AsyncResilientOpenAIClient,
    ResiliencePolicy,
    ResilientOpenAIClient,
    UpstreamUnavailableError,
)
from rag_resilience.chaos import ChaosServer
from rag_resilience.testing import FakeClock, fake_clock


class City(BaseModel):
    name: str
    population: int


class Capitalised(BaseModel):
    name: str

    @field_validator("name")
    @classmethod
    def _capital(cls, value: str) -> str:
        if not value[:1].isupper():
            raise ValueError("name must start with a capital letter")
        return value


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


def chat_requests(server: ChaosServer) -> int:
    assert server.wait_idle()
    return int(server.stats()["endpoints"]["chat"]["requests"])


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_parse_failure_is_the_models_answer(chaos_server: ChaosServer, clock: FakeClock) -> None:
    policy = ResiliencePolicy.preset("balanced", name="oa-parse", failure_threshold=2)
    client = ResilientOpenAIClient(api_key="sk-test", base_url=chaos_server.base_url, policy=policy)
    aclient = AsyncResilientOpenAIClient(
        api_key="sk-test", base_url=chaos_server.base_url, policy=policy
    )
    for _ in range(2):
        with pytest.raises(ValidationError):
            client.beta.chat.completions.parse(
                model="gpt-4o-mini", messages=messages("'lyon'"), response_format=Capitalised
            )

    async def twice() -> list[object]:
        calls = [
            aclient.chat.completions.parse(
                model="gpt-4o-mini", messages=messages(f"'lyon' {i}"), response_format=Capitalised
            )
            for i in range(2)
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    assert [type(e) for e in asyncio.run(twice())] == [ValidationError, ValidationError]
    assert chat_requests(chaos_server) == 4  # not retried
    stats = client.stats()
    assert stats["breaker_state"] == "closed" and stats["parse_failures"] == 4


def test_parse_in_an_outage_is_cached_or_a_clear_error(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    client = ResilientOpenAIClient(
        api_key="sk-test",
        base_url=chaos_server.base_url,
        policy=ResiliencePolicy.preset("balanced", name="oa-outage", generic_fallback=True),
    )
    known = messages("About 'Lyon', 513000 people")
    live = client.beta.chat.completions.parse(
        model="gpt-4o-mini", messages=known, response_format=City
    )
    assert live.choices[0].message.parsed == City(name="Lyon", population=513000)
    chaos_server.set_faults(outage=True)
    cached = client.beta.chat.completions.parse(
        model="gpt-4o-mini", messages=known, response_format=City
    )
    assert cached.choices[0].message.parsed == City(name="Lyon", population=513000)
    assert cached.resilience["source"] == "cache"  # type: ignore[attr-defined]
    with pytest.raises(UpstreamUnavailableError, match="structured output") as caught:
        client.chat.completions.parse(
            model="gpt-4o-mini", messages=messages("About 'Paris'"), response_format=City
        )
    assert isinstance(caught.value.__cause__, openai.APIStatusError)
    # plain text requests still get the generic answer
    text = client.chat.completions.create(model="gpt-4o-mini", messages=messages("hello"))
    assert text.resilience["source"] == "generic_fallback"  # type: ignore[attr-defined]
