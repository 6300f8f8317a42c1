"""OpenTelemetry metrics for every resilience decision (extra ``[otel]``).

    from rag_resilience import add_listener
    from rag_resilience.otel_metrics import OTelListener
    listener = OTelListener()          # the global MeterProvider, or OTelListener(meter_provider)
    add_listener(listener)             # every component in the process
    listener.observe(policy)           # optional: gauges of policies it hears from anyway

The instruments and their attributes are `rag_resilience.telemetry.METRICS` (the same
names the Prometheus exporter uses): one ``rag_resilience.events`` counter of named
resilience events in Polly's style (``event.name`` = OnRetry, OnCircuitOpened, OnFallback,
OnRateLimiterRejected, ...), calls by outcome and source, retries and rejections by
reason, breaker transitions, ``rag_resilience.call.duration`` and the GenAI convention's
``gen_ai.client.operation.duration``, and observable gauges. Only the API is imported:
with no SDK configured every instrument is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .events import Event
from .telemetry import METRICS, MetricsRecorder

try:
    from opentelemetry import metrics
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rag_resilience.otel_metrics needs opentelemetry-api: pip install 'rag-resilience[otel]'"
    ) from exc

__all__ = ["OTelListener"]


class OTelListener:
    """An event listener that records OpenTelemetry metrics (see the module docstring).

    `prefix` renames our own instruments (``rag_resilience.*``); the GenAI convention's
    ``gen_ai.client.operation.duration`` keeps its name.
    """

    routine = True

    def __init__(self, meter_provider: Any = None, *, prefix: str = "rag_resilience") -> None:
        meter = (
            meter_provider.get_meter("rag_resilience")
            if meter_provider is not None
            else metrics.get_meter("rag_resilience")
        )
        self._prefix = prefix
        self._instruments: dict[str, Any] = {}
        self._recorder = MetricsRecorder(self)
        for spec in METRICS.values():
            name = self._rename(spec.name)
            if spec.kind == "counter":
                self._instruments[spec.name] = meter.create_counter(
                    name, unit=spec.unit, description=spec.description
                )
            elif spec.kind == "histogram":
                self._instruments[spec.name] = meter.create_histogram(
                    name, unit=spec.unit, description=spec.description
                )
            else:
                meter.create_observable_gauge(
                    name,
                    callbacks=[self._callback(spec.name)],
                    unit=spec.unit,
                    description=spec.description,
                )

    def _rename(self, name: str) -> str:
        if name.startswith("rag_resilience.") and self._prefix != "rag_resilience":
            return self._prefix + name[len("rag_resilience") :]
        return name

    def _callback(self, metric: str) -> Callable[[Any], Iterable[Any]]:
        def observe(options: Any) -> Iterable[Any]:
            return [
                metrics.Observation(value, attrs)
                for name, value, attrs in self._recorder.gauges()
                if name == metric
            ]

        return observe

    # MetricSink
    def add(self, metric: str, value: float, attributes: dict[str, str]) -> None:
        self._instruments[metric].add(value, attributes)

    def record(self, metric: str, value: float, attributes: dict[str, str]) -> None:
        self._instruments[metric].record(value, attributes)

    def __call__(self, event: Event) -> None:
        self._recorder(event)

    def observe(self, *components: Any) -> None:
        """Report these policies', breakers' or limits' live state as gauges."""
        self._recorder.observe(*components)
