"""OTelListener records real OpenTelemetry metrics (SDK in-memory reader) for a policy run."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rag_resilience import ResiliencePolicy
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

        for _ in range(3):  # 4 + 1 failures open the circuit; then rejected without a call
            policy.call(down, key="q")

    got = points(reader)
    calls = got["rag_resilience.calls"]
    assert total(calls, outcome="success") == 1
    assert total(calls, outcome="fallback", source="cache") == 3
    assert total(got["rag_resilience.retries"], reason="http_503") == 2 + 3
    assert total(got["rag_resilience.breaker.transitions"], **{"from": "closed", "to": "open"}) == 1
    assert total(got["rag_resilience.rejections"], reason="circuit_open") >= 1
    durations = got["rag_resilience.call.duration"]
    assert sum(p.count for p in durations) == 4
