"""The Prometheus exporter, scraped over HTTP: the real openai SDK against the chaos server,
a crowd of threads and asyncio tasks, the scrape parsed with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rag_resilience import AsyncResilientOpenAIClient, ResiliencePolicy, ResilientOpenAIClient
from rag_resilience.chaos import ChaosServer
from rag_resilience.prometheus import PrometheusListener, serve
from rag_resilience.testing import FakeClock, fake_clock

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as c:
        yield c


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()
    )


def test_scraped_over_http_after_a_crowd_and_an_outage(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusListener(registry)
    policy = ResiliencePolicy.preset(
        "balanced",
        name="prom",
        listeners=[metrics],
        generic_fallback=True,
        count="attempts",  # the circuit opens after 5 failed attempts (the metrics under test)
    )
    metrics.observe(policy)
    client = ResilientOpenAIClient(api_key="sk-test", base_url=chaos_server.base_url, policy=policy)
    aclient = AsyncResilientOpenAIClient(
        api_key="sk-test", base_url=chaos_server.base_url, policy=policy
    )
    server = serve(0, registry=registry)
    try:
        chaos_server.set_faults(fail_next=3, fail_next_status=503)

        def one() -> None:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG)

        async def crowd() -> None:
            await asyncio.gather(
                *(
                    aclient.chat.completions.create(model="gpt-4o-mini", messages=MSG)
                    for _ in range(8)
                )
            )

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        asyncio.run(crowd())
        for t in threads:
            t.join()
        chaos_server.set_faults(outage=True)
        for _ in range(3):
            one()  # 5 failures in a row open the circuit; the rest is served from the cache
        assert chaos_server.wait_idle()
        samples = scrape(server.server_port)
    finally:
        server.shutdown()
    name = {"rag_resilience_name": "prom"}
    assert (
        value(samples, "rag_resilience_calls_total", outcome="success", source="live", **name) == 16
    )
    assert (
        value(samples, "rag_resilience_calls_total", outcome="fallback", source="cache", **name)
        == 3
    )
    # Every 503 the server sent was either retried or the last attempt of a degraded call.
    retries = value(samples, "rag_resilience_retries_total", reason="http_503", **name)
    gave_up = value(
        samples, "rag_resilience_events_total", event_name="OnFallback", reason="http_503", **name
    )
    statuses = chaos_server.stats()["statuses"]
    assert retries + gave_up == statuses.get(503, statuses.get("503")) and retries >= 3
    assert value(samples, "rag_resilience_rejections_total", reason="circuit_open", **name) >= 1
    assert value(samples, "rag_resilience_events_total", event_name="OnCircuitOpened", **name) == 1
    assert value(samples, "rag_resilience_breaker_state", state="open", **name) == 1
    assert value(samples, "rag_resilience_breaker_state", state="closed", **name) == 0
    assert value(samples, "rag_resilience_limit_in_flight", **name) == 0
    assert value(samples, "rag_resilience_limit_queue_depth", **name) == 0
    assert value(samples, "rag_resilience_call_duration_seconds_count", **name) == 19
    assert value(samples, "gen_ai_client_operation_duration_seconds_count", **name) == 19
    attempts = value(samples, "rag_resilience_events_total", event_name="ExecutionAttempt", **name)
    rejected = value(samples, "rag_resilience_events_total", event_name="OnCircuitRejected", **name)
    assert attempts - rejected == int(chaos_server.stats()["requests"])


def test_serve_rejects_a_bad_port() -> None:
    with pytest.raises(ValueError, match=r"port must be in 0\.\.65535"):
        serve(70000, registry=CollectorRegistry())
