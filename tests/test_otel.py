"""OTelListener records real OpenTelemetry metrics (SDK in-memory reader) for a policy run."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rag_resilience import ResiliencePolicy
from rag_resilience.events import Event
from rag_resilience.otel import OTelListener
from rag_resilience.testing import fake_clock


class APIError(Exception):
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        super().__init__(f"HTTP {status_code}")


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


def total(pts: list[Any], **attrs: str) -> int:
    return sum(p.value for p in pts if all(p.attributes.get(k) == v for k, v in attrs.items()))


def test_policy_decisions_become_metrics() -> None:
    reader = InMemoryMetricReader()
    listener = OTelListener(MeterProvider(metric_readers=[reader]))
    with fake_clock():
        policy = ResiliencePolicy.preset(
            "balanced", name="otel", listeners=[listener], generic_fallback=True
        )
        state = {"n": 0}

        def flaky() -> str:
            state["n"] += 1
            if state["n"] <= 2:
                raise APIError(503)
            return "ok"

        assert policy.call(flaky, key="q") == "ok"  # 2 retries, then live

        def down() -> str:
            raise APIError(503)

        # 5 failed calls x 4 attempts open the circuit (the presets count failed calls);
        # the 6th is rejected without a call
        for _ in range(6):
            policy.call(down, key="q")

    got = points(reader)
    calls = got["rag_resilience.calls"]
    assert total(calls, outcome="success") == 1
    assert total(calls, outcome="fallback", source="cache") == 6
    assert total(got["rag_resilience.retries"], reason="http_503") == 2 + 5 * 3
    assert total(got["rag_resilience.breaker.transitions"], **{"from": "closed", "to": "open"}) == 1
    assert total(got["rag_resilience.rejections"], reason="circuit_open") >= 1
    durations = got["rag_resilience.call.duration"]
    assert sum(p.count for p in durations) == 7


def test_polly_style_events_genai_duration_and_gauges_over_the_chaos_server(
    chaos_server: Any,
) -> None:
    """The real openai SDK over HTTP: one `rag_resilience.events` meter with Polly's names,
    `gen_ai.client.operation.duration` with the traced call's GenAI attributes, and the
    observed policy's breaker state, in-flight and queue depth as gauges."""
    from opentelemetry.sdk.trace import TracerProvider

    from rag_resilience import ResilientOpenAIClient
    from rag_resilience.otel_traces import trace_policy

    reader = InMemoryMetricReader()
    listener = OTelListener(MeterProvider(metric_readers=[reader]))
    msg = [{"role": "user", "content": "hi"}]
    with fake_clock():
        policy = ResiliencePolicy.preset(
            "balanced", name="om-chaos", listeners=[listener], generic_fallback=True
        )
        trace_policy(policy, TracerProvider())
        listener.observe(policy)
        client = ResilientOpenAIClient(
            api_key="sk-test", base_url=chaos_server.base_url, policy=policy
        )
        chaos_server.set_faults(fail_next=1, fail_next_status=503)
        client.chat.completions.create(model="gpt-4o-mini", messages=msg)
        chaos_server.set_faults(outage=True)
        for _ in range(6):  # 5 failed calls (x 4 attempts) open the circuit, 1 rejected
            client.chat.completions.create(model="gpt-4o-mini", messages=msg)
        assert chaos_server.wait_idle()
        got = points(reader)  # gauges read now, on the fake clock: the circuit is open
    events = got["rag_resilience.events"]
    assert total(events, **{"event.name": "OnRetry", "reason": "http_503"}) == 1 + 5 * 3
    assert total(events, **{"event.name": "OnCircuitOpened"}) == 1
    assert total(events, **{"event.name": "OnCircuitRejected"}) >= 1
    assert total(events, **{"event.name": "OnFallback"}) == 6
    assert total(events, **{"event.name": "ExecutionAttempt"}) == int(
        chaos_server.stats()["requests"]
    ) + total(events, **{"event.name": "OnCircuitRejected"})
    genai = got["gen_ai.client.operation.duration"]
    assert sum(p.count for p in genai) == 7
    assert {p.attributes["gen_ai.request.model"] for p in genai} == {"gpt-4o-mini"}
    assert {p.attributes["gen_ai.operation.name"] for p in genai} == {"chat"}
    state = {p.attributes["state"]: p.value for p in got["rag_resilience.breaker.state"]}
    assert state == {"open": 1, "closed": 0, "half_open": 0}
    assert [p.value for p in got["rag_resilience.limit.in_flight"]] == [0]
    assert [p.value for p in got["rag_resilience.limit.queue_depth"]] == [0]


def test_unknown_kinds_are_counted_by_name() -> None:
    """A kind added later flows through without code here knowing it."""
    reader = InMemoryMetricReader()
    listener = OTelListener(MeterProvider(metric_readers=[reader]))

    class Later:
        value = "later"

    listener(Event(Later(), "om-later", delay=0.5))  # type: ignore[arg-type]
    listener(Event(Later(), "om-later"))  # type: ignore[arg-type]
    got = points(reader)
    assert total(got["rag_resilience.events"], **{"event.name": "later"}) == 2


def test_a_full_queue_is_a_rate_limiter_rejection() -> None:
    """One caller holds the only permit; the next is refused at once (no queue): Polly's
    OnRateLimiterRejected, a rejection by reason, and a degraded call served generic."""
    import threading

    from rag_resilience import ConcurrencyLimit

    reader = InMemoryMetricReader()
    listener = OTelListener(MeterProvider(metric_readers=[reader]))
    policy = ResiliencePolicy(
        limit=ConcurrencyLimit(1, max_waiting=0, name="om-full"),
        name="om-full",
        listeners=[listener],
        generic_fallback=True,
    )
    inside, release = threading.Event(), threading.Event()

    def hold() -> str:
        inside.set()
        release.wait()
        return "held"

    holder = threading.Thread(target=lambda: policy.call(hold))
    holder.start()
    inside.wait()
    try:
        served = policy.run(lambda: "never")
    finally:
        release.set()
        holder.join()
    assert served.source == "rejected"
    got = points(reader)
    assert total(got["rag_resilience.events"], **{"event.name": "OnRateLimiterRejected"}) == 1
    assert total(got["rag_resilience.rejections"], reason="queue_full") == 1
    assert total(got["rag_resilience.calls"], outcome="fallback", source="rejected") == 1


def test_gauges_report_every_live_policy_heard_from_without_observe() -> None:
    """A policy whose events reached the listener is reported (in-flight, queue depth,
    breaker state) without `observe`; once it is gone, it is not (weakly referenced)."""
    import gc

    from rag_resilience import add_listener, remove_listener

    reader = InMemoryMetricReader()
    listener = OTelListener(MeterProvider(metric_readers=[reader]))
    add_listener(listener)
    try:
        with fake_clock():
            heard = ResiliencePolicy.preset("balanced", name="om-heard")
            silent = ResiliencePolicy.preset("balanced", name="om-silent")
            heard.call(lambda: "ok")
            got = points(reader)
            names = {
                p.attributes["rag_resilience.name"] for p in got["rag_resilience.limit.in_flight"]
            }
            assert "om-heard" in names and "om-silent" not in names
            state = {
                p.attributes["state"]: p.value
                for p in got["rag_resilience.breaker.state"]
                if p.attributes["rag_resilience.name"] == "om-heard"
            }
            assert state == {"closed": 1, "open": 0, "half_open": 0}
            del heard, silent
            gc.collect()
            got = points(reader)
            names = {
                p.attributes["rag_resilience.name"]
                for p in got.get("rag_resilience.limit.in_flight", [])
            }
            assert "om-heard" not in names
    finally:
        remove_listener(listener)
