"""Prometheus exporter (extra ``[prometheus]``): the metrics of `rag_resilience.telemetry`
under Prometheus names, for apps that are scraped.

    from rag_resilience import add_listener
    from rag_resilience.prometheus import PrometheusListener, serve
    metrics = PrometheusListener()      # registers on prometheus_client's default registry
    add_listener(metrics)
    metrics.observe(policy)             # optional: policies it hears from are reported anyway
    serve(9464)                         # GET http://127.0.0.1:9464/metrics

Names: dots become underscores, counters end in ``_total`` and histograms in seconds end
in ``_seconds``: ``rag_resilience_calls_total{rag_resilience_name, outcome, source}``,
``rag_resilience_retries_total{reason}``, ``rag_resilience_rejections_total{reason}``,
``rag_resilience_events_total{event_name}``, ``rag_resilience_breaker_transitions_total``,
``rag_resilience_call_duration_seconds``, ``gen_ai_client_operation_duration_seconds``,
``rag_resilience_breaker_state{state}``, ``rag_resilience_limit_in_flight``,
``rag_resilience_limit_queue_depth``, ``rag_resilience_wait_duration_seconds{wait, outcome}``,
``rag_resilience_ratelimit_headroom{upstream, resource}``,
``rag_resilience_ratelimit_limit{upstream, resource, source}``,
``rag_resilience_ratelimit_waiting{upstream}``. An attribute a sample does not have is the
empty label. Gauges cover every live policy the listener received events from, and what
`observe` was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .events import Event
from .telemetry import METRICS, MetricSpec, MetricsRecorder

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client import start_http_server as _start_http_server
    from prometheus_client.core import GaugeMetricFamily
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rag_resilience.prometheus needs prometheus_client: "
        "pip install 'rag-resilience[prometheus]'"
    ) from exc

__all__ = ["DURATION_BUCKETS", "PrometheusListener", "prometheus_name", "serve"]

#: The GenAI semantic conventions' advice for `gen_ai.client.operation.duration` (s).
DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)


def _label(attribute: str) -> str:
    return attribute.replace(".", "_")


def prometheus_name(spec: MetricSpec) -> str:
    """The metric's Prometheus name, without the ``_total`` a counter's samples add."""
    name = spec.name.replace(".", "_")
    return f"{name}_seconds" if spec.unit == "s" else name


class PrometheusListener:
    """An event listener that keeps Prometheus metrics (see the module docstring)."""

    routine = True

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self._recorder = MetricsRecorder(self)
        self._metrics: dict[str, tuple[Any, tuple[str, ...]]] = {}
        for spec in METRICS.values():
            labels = tuple(_label(a) for a in spec.attributes)
            if spec.kind == "counter":
                metric: Any = Counter(
                    prometheus_name(spec), spec.description, labels, registry=self.registry
                )
            elif spec.kind == "histogram":
                metric = Histogram(
                    prometheus_name(spec),
                    spec.description,
                    labels,
                    registry=self.registry,
                    buckets=DURATION_BUCKETS,
                )
            else:
                continue  # gauges are read at scrape time by `collect`
            self._metrics[spec.name] = (metric, spec.attributes)
        self.registry.register(_GaugeCollector(self._recorder))

    def _child(self, metric: str, attributes: dict[str, str]) -> Any:
        family, names = self._metrics[metric]
        return family.labels(*(attributes.get(name, "") for name in names))

    # MetricSink
    def add(self, metric: str, value: float, attributes: dict[str, str]) -> None:
        self._child(metric, attributes).inc(value)

    def record(self, metric: str, value: float, attributes: dict[str, str]) -> None:
        self._child(metric, attributes).observe(value)

    def __call__(self, event: Event) -> None:
        self._recorder(event)

    def observe(self, *components: Any) -> None:
        """Report these policies', breakers' or limits' live state as gauges."""
        self._recorder.observe(*components)


class _GaugeCollector:
    """Reads the recorder's gauges at each scrape."""

    def __init__(self, recorder: MetricsRecorder) -> None:
        self._recorder = recorder

    def describe(self) -> list[Any]:
        return []  # unchecked: the label sets are only known at scrape time

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for name, value, attributes in self._recorder.gauges():
            spec = METRICS[name]
            labels = [_label(a) for a in spec.attributes]
            family = families.get(name)
            if family is None:
                family = GaugeMetricFamily(prometheus_name(spec), spec.description, labels=labels)
                families[name] = family
            family.add_metric([attributes.get(a, "") for a in spec.attributes], value)
        yield from families.values()


def serve(
    port: int = 9464, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> Any:
    """Serve ``/metrics`` on `addr`:`port` (loopback unless told otherwise; port 0 picks a
    free one) from a daemon thread. Returns the server: ``server.server_port``,
    ``server.shutdown()``."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    server, _thread = _start_http_server(
        port, addr=addr, registry=registry if registry is not None else REGISTRY
    )
    return server
