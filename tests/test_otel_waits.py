"""Time spent paced and waiting for a probe, on spans and in metrics (OpenTelemetry SDK
in-memory exporters), and the rate-limit gauges scraped over HTTP from Prometheus: the
real openai SDK over real HTTP to the chaos server, crowds of threads and asyncio tasks."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rag_resilience import (
    AsyncResilientOpenAIClient,
    CircuitBreaker,
    CircuitState,
    ResiliencePolicy,
    ResilientOpenAIClient,
    RetryStrategy,
    add_listener,
    remove_listener,
)
from rag_resilience.chaos import ChaosServer
from rag_resilience.events import Event, EventKind
from rag_resilience.otel import OTelListener
from rag_resilience.otel_traces import instrument, uninstrument
from rag_resilience.prometheus import PrometheusListener, serve
from rag_resilience.testing import FakeClock, fake_clock

MSG = [{"role": "user", "content": "What is a circuit breaker?"}]
THREADS, TASKS, EACH = 4, 4, 4


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        uninstrument()


def crowd(server: ChaosServer, policy: ResiliencePolicy, api_key: str) -> list[BaseException]:
    """THREADS threads and TASKS asyncio tasks, EACH chat calls each."""
    sync = ResilientOpenAIClient(api_key=api_key, base_url=server.base_url, policy=policy)
    errors: list[BaseException] = []

    def worker() -> None:
        for _ in range(EACH):
            try:
                sync.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            except Exception as exc:
                errors.append(exc)

    async def tasks() -> None:
        aclient = AsyncResilientOpenAIClient(
            api_key=api_key, base_url=server.base_url, policy=policy
        )

        async def one() -> None:
            for _ in range(EACH):
                try:
                    await aclient.chat.completions.create(model="gpt-4o-mini", messages=MSG)
                except Exception as exc:
                    errors.append(exc)

        await asyncio.gather(*(one() for _ in range(TASKS)))

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    threads.append(threading.Thread(target=asyncio.run, args=(tasks(),)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.wait_idle()
    return errors


def call_spans(exporter: InMemorySpanExporter, policy: str) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("rag_resilience.policy") == policy
    ]


def test_paced_calls_carry_their_wait_on_spans_and_in_metrics(
    chaos_server_factory: Callable[..., ChaosServer], spans: InMemorySpanExporter
) -> None:
    clock = FakeClock()
    server = chaos_server_factory(clock=clock, rate_limit_rps=20.0, rate_limit_burst=2)
    reader = InMemoryMetricReader()
    metrics = OTelListener(MeterProvider(metric_readers=[reader]))
    policy = ResiliencePolicy.preset("balanced", name="ow-paced", clock=clock, listeners=[metrics])
    assert crowd(server, policy, "sk-paced") == []

    rate = policy.stats()["rate_limit"]
    assert rate["paced"] > 0
    calls = call_spans(spans, "ow-paced")
    assert len(calls) == (THREADS + TASKS) * EACH
    paced = [s for s in calls if "rag_resilience.paced.wait_s" in (s.attributes or {})]
    # every call that waited (before its first attempt or a retry), and only those, says
    # how long in all; one span event per wait; together: what the limiter paced
    waited = sum(float(s.attributes["rag_resilience.paced.wait_s"]) for s in paced)  # type: ignore[index, arg-type]
    assert waited == pytest.approx(rate["paced_seconds"], rel=1e-6, abs=1e-6)
    per_call = {id(s): _paced_events(spans, s) for s in calls}
    # pacing comes before an attempt starts: its events are the call span's
    assert (
        sum(1 for s in calls for e in s.events if e.name == "rag_resilience.paced")
        == (rate["paced"])
    )
    assert sum(per_call.values()) == rate["paced"]
    assert all(per_call[id(s)] >= 1 for s in paced)
    assert all(per_call[id(s)] == 0 for s in calls if s not in paced)

    got = points(reader)
    (hist,) = [p for p in got["rag_resilience.wait.duration"] if p.attributes["wait"] == "paced"]
    assert hist.count == rate["paced"]
    assert hist.sum == pytest.approx(rate["paced_seconds"], rel=1e-6, abs=1e-6)
    events = got["rag_resilience.events"]
    assert (
        sum(p.value for p in events if p.attributes["event.name"] == "OnRateLimiterPaced")
        == (rate["paced"])
    )
    # gauges of the learned limit, per upstream: no observe() needed, the policy published
    (upstream,) = rate["upstreams"]
    assert "sk-paced" not in upstream
    limits = {
        p.attributes["resource"]: (p.value, p.attributes["source"])
        for p in got["rag_resilience.ratelimit.limit"]
        if p.attributes["upstream"] == upstream
    }
    learned = rate["upstreams"][upstream]
    assert limits["requests"] == (learned["requests_per_s"], "headers")
    assert 0 < limits["requests"][0] <= 20  # learned below the limit (ratelimit tests: how close)
    headroom = [
        p.value
        for p in got["rag_resilience.ratelimit.headroom"]
        if p.attributes["upstream"] == upstream and p.attributes["resource"] == "requests"
    ]
    assert len(headroom) == 1 and 0.0 <= headroom[0] <= 1.0


def test_a_call_that_waited_for_the_probe_says_so(
    chaos_server: ChaosServer, spans: InMemorySpanExporter
) -> None:
    """A half-open circuit's probe stalls at the server; threads and tasks that arrive
    wait for its verdict, then go live: each call span has the wait and its outcome."""
    reader = InMemoryMetricReader()
    metrics = OTelListener(MeterProvider(metric_readers=[reader]))
    add_listener(metrics)
    try:
        with fake_clock() as clock:
            breaker = CircuitBreaker(
                failure_threshold=1,
                recovery_timeout=5.0,
                half_open_max_calls=1,
                success_threshold=1,
                probe_timeout=120.0,
                probe_wait=60.0,
                name="ow-probe",
            )
            policy = ResiliencePolicy(
                RetryStrategy(max_retries=0, retry_budget=None), breaker, name="ow-probe"
            )
            client = ResilientOpenAIClient(
                api_key="sk-probe", base_url=chaos_server.base_url, policy=policy
            )
            chaos_server.set_faults(outage=True)
            with pytest.raises(Exception):  # noqa: B017 - the SDK's 503 error
                client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            assert breaker.get_state() is CircuitState.OPEN
            clock.advance(5.0)
            chaos_server.set_faults(outage=False, stall=True)
            probe = threading.Thread(
                target=lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            )
            probe.start()
            _until(lambda: breaker.stats()["probes_in_flight"] == 1)
            waiters = [
                threading.Thread(
                    target=lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
                )
                for _ in range(2)
            ]

            async def tasks() -> None:
                aclient = AsyncResilientOpenAIClient(
                    api_key="sk-probe", base_url=chaos_server.base_url, policy=policy
                )
                await asyncio.gather(
                    *(
                        aclient.chat.completions.create(model="gpt-4o-mini", messages=MSG)
                        for _ in range(2)
                    )
                )

            waiters.append(threading.Thread(target=asyncio.run, args=(tasks(),)))
            for t in waiters:
                t.start()
            _until(lambda: breaker.waited == 4)  # all four are parked on the verdict
            chaos_server.set_faults(stall=False)  # the probe answers: the circuit closes
            for t in [probe, *waiters]:
                t.join()
            assert breaker.get_state() is CircuitState.CLOSED
    finally:
        remove_listener(metrics)
    assert chaos_server.wait_idle()
    calls = call_spans(spans, "ow-probe")
    assert len(calls) == 1 + 1 + 4  # the failure, the probe, the waiters
    waited = [s for s in calls if "rag_resilience.probe_wait.wait_s" in (s.attributes or {})]
    assert len(waited) == 4
    for span in waited:
        attrs = span.attributes or {}
        assert attrs["rag_resilience.outcome"] == "success"
        assert float(attrs["rag_resilience.probe_wait.wait_s"]) >= 0.0  # type: ignore[arg-type]
        # on the attempt the wait delayed (the call's only child)
        (attempt,) = _tree(spans, span)[1:]
        (event,) = [e for s in _tree(spans, span) for e in s.events if "probe_wait" in e.name]
        assert event in attempt.events
        assert (event.attributes or {})["reason"] == "admitted"
        assert (event.attributes or {})["extra.waited_for"] == "probe"
    got = points(reader)
    (hist,) = [p for p in got["rag_resilience.wait.duration"] if p.attributes["wait"] == "probe"]
    assert (hist.count, hist.attributes["outcome"]) == (4, "admitted")
    assert chaos_server.stats()["statuses"] == {503: 1, 200: 5}


def test_waits_are_published_only_when_someone_waited() -> None:
    """The no-wait path publishes nothing: a call with room at the rate limit and a
    closed circuit emits no PACED or PROBE_WAIT event."""
    got: list[Event] = []
    with fake_clock():
        policy = ResiliencePolicy.preset("balanced", name="ow-none", listeners=[got.append])
        for _ in range(5):
            policy.call(lambda: "ok")
    assert not [e for e in got if e.kind in (EventKind.PACED, EventKind.PROBE_WAIT)]


def test_prometheus_scrape_has_learned_limits_and_headroom(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    clock = FakeClock()
    server = chaos_server_factory(clock=clock, rate_limit_tpm=60 * 3000.0)
    registry = CollectorRegistry()
    prom = PrometheusListener(registry)
    policy = ResiliencePolicy.preset("balanced", name="ow-prom", clock=clock, listeners=[prom])
    assert crowd(server, policy, "sk-prom") == []
    http = serve(0, registry=registry)
    try:
        url = f"http://127.0.0.1:{http.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        http.shutdown()
    samples = {
        (s.name, s.labels.get("resource", ""), s.labels.get("source", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("rag_resilience_name") == "ow-prom"
    }
    (upstream,) = policy.stats()["rate_limit"]["upstreams"].values()
    assert (
        samples[("rag_resilience_ratelimit_limit", "tokens", "headers")]
        == (upstream["tokens_per_s"])
    )
    assert 0 < upstream["tokens_per_s"] <= 3000
    assert 0.0 <= samples[("rag_resilience_ratelimit_headroom", "tokens", "")] <= 1.0
    assert samples[("rag_resilience_ratelimit_waiting", "", "")] == 0
    assert "sk-prom" not in text


def _until(condition: Callable[[], bool], limit: float = 60.0) -> None:
    """Wait for another thread to get somewhere (a readiness poll, not a timed assertion)."""
    give_up = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < give_up, "the other threads never got there"
        time.sleep(0.005)


def _paced_events(exporter: InMemorySpanExporter, call: ReadableSpan) -> int:
    return sum(
        1 for s in _tree(exporter, call) for e in s.events if e.name == "rag_resilience.paced"
    )


def _tree(exporter: InMemorySpanExporter, root: ReadableSpan) -> list[ReadableSpan]:
    assert root.context is not None
    kids = [
        s
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == root.context.span_id
    ]
    return [root, *kids]
