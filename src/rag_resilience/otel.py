"""OpenTelemetry metrics for every resilience decision (extra ``[otel]``).

    from rag_resilience import add_listener
    from rag_resilience.otel import OTelListener
    add_listener(OTelListener())          # uses the global MeterProvider

Instruments (all tagged with ``rag_resilience.name``, the policy/breaker/limit name):

* ``rag_resilience.calls`` (counter): calls by ``outcome`` = success | fallback | failure,
  and ``source`` for fallbacks (cache, generic_fallback, fallback, rejected);
* ``rag_resilience.retries`` (counter): retries by ``reason`` (http_503, rate_limited, ...);
* ``rag_resilience.rejections`` (counter): calls refused without an upstream call, by
  ``reason`` (circuit_open, queue_full, wait_timeout);
* ``rag_resilience.breaker.transitions`` (counter): by ``from`` and ``to`` state;
* ``rag_resilience.call.duration`` (histogram, seconds): per call, by ``outcome``.

Only the API is imported: with no SDK configured every instrument is a no-op.
"""

from __future__ import annotations

from typing import Any

from .events import Event, EventKind

try:
    from opentelemetry import metrics
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rag_resilience.otel needs opentelemetry-api: pip install 'rag-resilience[otel]'"
    ) from exc

__all__ = ["OTelListener"]

_OUTCOME = {
    EventKind.SUCCESS: "success",
    EventKind.FALLBACK: "fallback",
    EventKind.FAILURE: "failure",
}


class OTelListener:
    """An event listener that records OpenTelemetry metrics.

    It wants routine events (successes) so call counts and latency are complete; that
    costs one Event per call on the hot path, which is why it is opt-in.
    """

    routine = True

    def __init__(self, meter_provider: Any = None, *, prefix: str = "rag_resilience") -> None:
        meter = (
            meter_provider.get_meter("rag_resilience")
            if meter_provider is not None
            else metrics.get_meter("rag_resilience")
        )
        self._calls = meter.create_counter(f"{prefix}.calls", description="calls by outcome")
        self._retries = meter.create_counter(f"{prefix}.retries", description="retries by reason")
        self._rejections = meter.create_counter(
            f"{prefix}.rejections", description="calls refused without an upstream call"
        )
        self._transitions = meter.create_counter(
            f"{prefix}.breaker.transitions", description="circuit breaker state changes"
        )
        self._duration = meter.create_histogram(
            f"{prefix}.call.duration", unit="s", description="call duration by outcome"
        )

    def __call__(self, event: Event) -> None:
        kind = event.kind
        attrs: dict[str, Any] = {"rag_resilience.name": event.name}
        outcome = _OUTCOME.get(kind)
        if outcome is not None:
            attrs["outcome"] = outcome
            if event.extra is not None and event.extra.get("nested") is True:
                attrs["nested"] = True  # a component of an outer wrapper's user call
            if event.served_from is not None:
                attrs["source"] = event.served_from
            self._calls.add(1, attrs)
            if event.duration is not None:
                self._duration.record(event.duration, attrs)
        elif kind is EventKind.RETRY:
            attrs["reason"] = event.reason or "unknown"
            self._retries.add(1, attrs)
        elif kind is EventKind.REJECTED:
            attrs["reason"] = event.reason or "unknown"
            self._rejections.add(1, attrs)
        elif kind is EventKind.STATE_CHANGE:
            attrs["from"] = event.old_state or "unknown"
            attrs["to"] = event.new_state or "unknown"
            self._transitions.add(1, attrs)
