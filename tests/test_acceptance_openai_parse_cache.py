"""Acceptance: caching a parsed completion raises no serializer warning.

Found with ``ResilientOpenAIClient.beta.chat.completions.parse(response_format=City)``: every
live answer printed pydantic's ``PydanticSerializationUnexpectedValue(Expected `none` ...
field_name='parsed')`` (the raw SDK prints nothing), and an app whose tests turn warnings into
errors silently lost its last-known-good answers (the cache write failed and was skipped).
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from rag_resilience import AsyncResilientOpenAIClient, ResiliencePolicy, ResilientOpenAIClient
from rag_resilience.chaos import ChaosServer
from rag_resilience.testing import FakeClock, fake_clock


class City(BaseModel):
    name: str
    population: int


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


KNOWN = [{"role": "user", "content": "About 'Lyon', 513000 people"}]


def test_parse_caches_without_warnings(chaos_server: ChaosServer, clock: FakeClock) -> None:
    policy = ResiliencePolicy.preset("balanced", name="acc-parse-warn")
    client = ResilientOpenAIClient(api_key="sk-test", base_url=chaos_server.base_url, policy=policy)
    aclient = AsyncResilientOpenAIClient(
        api_key="sk-test", base_url=chaos_server.base_url, policy=policy
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under `pytest -W error`
        live = client.beta.chat.completions.parse(
            model="gpt-4o-mini", messages=KNOWN, response_format=City
        )
        alive = asyncio.run(
            aclient.beta.chat.completions.parse(
                model="gpt-4o-mini", messages=KNOWN, response_format=City
            )
        )
    assert live.choices[0].message.parsed == alive.choices[0].message.parsed
    chaos_server.set_faults(outage=True)
    cached = client.beta.chat.completions.parse(
        model="gpt-4o-mini", messages=KNOWN, response_format=City
    )
    assert cached.resilience["source"] == "cache"  # type: ignore[attr-defined]
    assert cached.choices[0].message.parsed == City(name="Lyon", population=513000)
