"""The metric vocabulary, shared by the OpenTelemetry and Prometheus exporters.

One table (`METRICS`) names every instrument, its unit and its attributes; one listener
(`MetricsRecorder`) turns events into updates on a backend (a `MetricSink`), so
``rag_resilience.calls{outcome="fallback", source="cache"}`` means the same thing in both.
Prometheus spells the names with underscores (``rag_resilience_calls_total``,
``gen_ai_client_operation_duration_seconds``).

==========================================  =========  ==========================================
metric                                      kind       attributes
==========================================  =========  ==========================================
``rag_resilience.events``                   counter    ``event.name`` (Polly's names: OnRetry,
                                                       OnFallback, OnCircuitOpened, OnCircuitClosed,
                                                       OnCircuitHalfOpened, OnCircuitRejected,
                                                       OnRateLimiterRejected, OnRejected (other
                                                       reasons), ExecutionAttempt,
                                                       OnFailure; a kind we do not know is counted
                                                       under its own name), ``reason``
``rag_resilience.calls``                    counter    ``outcome`` (success|fallback|failure),
                                                       ``source`` (live|cache|fallback|
                                                       generic_fallback|rejected)
``rag_resilience.retries``                  counter    ``reason`` (http_503, rate_limited, ...)
``rag_resilience.rejections``               counter    ``reason`` (circuit_open, queue_full, ...)
``rag_resilience.breaker.transitions``      counter    ``from``, ``to``
``rag_resilience.call.duration``            histogram  ``outcome`` (seconds)
``gen_ai.client.operation.duration``        histogram  ``error.type``, and ``gen_ai.operation.name``
                                                       / ``gen_ai.request.model`` when traced
``rag_resilience.breaker.state``            gauge      ``state``: 1 for the circuit's state, 0 else
``rag_resilience.limit.in_flight``          gauge      calls holding a permit (observed limits)
``rag_resilience.limit.queue_depth``        gauge      callers waiting for a permit
``rag_resilience.ratelimit.headroom``       gauge      ``resource``: remaining / limit, from any
                                                       event whose ``extra`` has ``remaining`` and
                                                       ``limit`` (pacing events, when they exist)
==========================================  =========  ==========================================

Every metric also carries ``rag_resilience.name``: the policy, breaker or limit.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from .events import Event, EventKind

__all__ = [
    "CALL_ATTRIBUTE_HOOKS",
    "METRICS",
    "MetricSink",
    "MetricSpec",
    "MetricsRecorder",
    "polly_event_name",
]

NAME = "rag_resilience.name"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: str  # counter | histogram | gauge
    unit: str
    description: str
    attributes: tuple[str, ...]


_GENAI = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model")

METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "rag_resilience.events",
            "counter",
            "1",
            "resilience events by name (Polly's event names)",
            (NAME, "event.name", "reason"),
        ),
        MetricSpec(
            "rag_resilience.calls",
            "counter",
            "1",
            "calls by outcome and source of the answer",
            (NAME, "outcome", "source"),
        ),
        MetricSpec("rag_resilience.retries", "counter", "1", "retries by reason", (NAME, "reason")),
        MetricSpec(
            "rag_resilience.rejections",
            "counter",
            "1",
            "calls refused without an upstream call, by reason",
            (NAME, "reason"),
        ),
        MetricSpec(
            "rag_resilience.breaker.transitions",
            "counter",
            "1",
            "circuit breaker state changes",
            (NAME, "from", "to"),
        ),
        MetricSpec(
            "rag_resilience.call.duration",
            "histogram",
            "s",
            "call duration by outcome",
            (NAME, "outcome"),
        ),
        MetricSpec(
            "gen_ai.client.operation.duration",
            "histogram",
            "s",
            "GenAI operation duration as the user saw it (retries and fallbacks included)",
            (NAME, "error.type", *_GENAI),
        ),
        MetricSpec(
            "rag_resilience.breaker.state",
            "gauge",
            "1",
            "1 for the circuit's current state, 0 for the others",
            (NAME, "state"),
        ),
        MetricSpec(
            "rag_resilience.limit.in_flight",
            "gauge",
            "1",
            "calls holding a concurrency permit",
            (NAME,),
        ),
        MetricSpec(
            "rag_resilience.limit.queue_depth",
            "gauge",
            "1",
            "callers waiting for a concurrency permit",
            (NAME,),
        ),
        MetricSpec(
            "rag_resilience.ratelimit.headroom",
            "gauge",
            "1",
            "remaining / limit of an upstream's rate limit",
            (NAME, "resource"),
        ),
    )
}

BREAKER_STATES = ("closed", "half_open", "open")

#: Callables returning attributes of the call in progress (e.g. the GenAI attributes a
#: tracer read off the wrapped model), merged into `gen_ai.client.operation.duration`.
CALL_ATTRIBUTE_HOOKS: list[Callable[[], dict[str, Any] | None]] = []

_OUTCOME = {
    EventKind.SUCCESS: "success",
    EventKind.FALLBACK: "fallback",
    EventKind.FAILURE: "failure",
}
_TRANSITION_NAMES = {
    "open": "OnCircuitOpened",
    "closed": "OnCircuitClosed",
    "half_open": "OnCircuitHalfOpened",
}


_REJECTION_NAMES = {
    "circuit_open": "OnCircuitRejected",
    "queue_full": "OnRateLimiterRejected",  # Polly's concurrency limiter is a rate limiter
    "wait_timeout": "OnRateLimiterRejected",
    "rate_limited": "OnRateLimiterRejected",
}


def polly_event_name(event: Event) -> str | None:
    """The Polly-style name of a resilience event; None for a live success (not an event)."""
    kind = event.kind
    if kind is EventKind.SUCCESS:
        return None
    if kind is EventKind.RETRY:
        return "OnRetry"
    if kind is EventKind.FALLBACK:
        return "OnFallback"
    if kind is EventKind.FAILURE:
        return "OnFailure"
    if kind is EventKind.ATTEMPT:
        return "ExecutionAttempt"
    if kind is EventKind.STATE_CHANGE:
        return _TRANSITION_NAMES.get(event.new_state or "", "OnCircuitStateChange")
    if kind is EventKind.REJECTED:
        return _REJECTION_NAMES.get(event.reason or "", "OnRejected")
    return str(getattr(kind, "value", kind))  # a kind added later: counted by its name


class MetricSink(Protocol):
    """A metrics backend: counters, histograms; gauges are pulled with `gauges()`."""

    def add(self, metric: str, value: float, attributes: dict[str, str]) -> None: ...

    def record(self, metric: str, value: float, attributes: dict[str, str]) -> None: ...


class MetricsRecorder:
    """The listener behind both exporters: events in, `sink.add`/`sink.record` out, and
    `gauges()` for the pull side (breaker state, in-flight, queue depth, headroom).

    It wants routine events (attempts and successes) so call counts and latency are
    complete; that costs one `Event` per call, which is why exporters are opt-in.
    """

    routine = True

    def __init__(self, sink: MetricSink) -> None:
        self.sink = sink
        self._lock = threading.Lock()
        self._states: dict[str, str] = {}
        self._headroom: dict[tuple[str, str], float] = {}
        self._observed: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    # -- push: one event -> counters and histograms
    def __call__(self, event: Event) -> None:
        kind = event.kind
        name = event.name
        sink = self.sink
        outcome = _OUTCOME.get(kind)
        if outcome is not None:
            source = event.served_from or ("live" if kind is EventKind.SUCCESS else "none")
            sink.add("rag_resilience.calls", 1, {NAME: name, "outcome": outcome, "source": source})
            if event.duration is not None:
                sink.record(
                    "rag_resilience.call.duration", event.duration, {NAME: name, "outcome": outcome}
                )
                genai: dict[str, str] = {NAME: name}
                if kind is EventKind.FAILURE and event.error is not None:
                    genai["error.type"] = type(event.error).__qualname__
                for hook in CALL_ATTRIBUTE_HOOKS:
                    extra = hook()
                    if extra:
                        genai.update({k: str(v) for k, v in extra.items() if k in _GENAI})
                sink.record("gen_ai.client.operation.duration", event.duration, genai)
        elif kind is EventKind.RETRY:
            sink.add("rag_resilience.retries", 1, {NAME: name, "reason": event.reason or "unknown"})
        elif kind is EventKind.REJECTED:
            reason = event.reason or "unknown"
            sink.add("rag_resilience.rejections", 1, {NAME: name, "reason": reason})
        elif kind is EventKind.STATE_CHANGE:
            old, new = event.old_state or "unknown", event.new_state or "unknown"
            sink.add("rag_resilience.breaker.transitions", 1, {NAME: name, "from": old, "to": new})
            with self._lock:
                self._states[name] = new
        event_name = polly_event_name(event)
        if event_name is not None:
            attrs = {NAME: name, "event.name": event_name}
            if event.reason is not None:
                attrs["reason"] = event.reason
            sink.add("rag_resilience.events", 1, attrs)
        extra = event.extra
        if extra is not None and "remaining" in extra and extra.get("limit"):
            try:
                headroom = float(extra["remaining"]) / float(extra["limit"])
            except (TypeError, ValueError):
                return
            with self._lock:
                self._headroom[(name, str(extra.get("resource", "requests")))] = headroom

    # -- pull: live gauges
    def observe(self, *components: Any) -> None:
        """Report the live state of these policies, breakers or limits as gauges (kept by
        weak reference: observing does not keep a component alive)."""
        for component in components:
            self._observed[id(component)] = component

    def gauges(self) -> Iterator[tuple[str, float, dict[str, str]]]:
        """(metric, value, attributes) of every gauge, read now."""
        breakers: dict[str, str] = {}
        limits: dict[str, Any] = {}
        for component in list(self._observed.values()):
            breaker = getattr(component, "breaker", None)
            limit = getattr(component, "limit", None)
            if hasattr(component, "get_state"):
                breaker = component
            if hasattr(component, "in_flight") and hasattr(component, "waiting"):
                limit = component
            if breaker is not None:
                with contextlib.suppress(Exception):  # a store outage must not break a scrape
                    breakers[breaker.name] = breaker.get_state().value
            if limit is not None:
                limits[limit.name] = limit
        with self._lock:
            states = {**self._states, **breakers}
            headroom = dict(self._headroom)
        for name, state in states.items():
            for candidate in BREAKER_STATES:
                value = 1.0 if candidate == state else 0.0
                yield "rag_resilience.breaker.state", value, {NAME: name, "state": candidate}
        for name, limit in limits.items():
            yield "rag_resilience.limit.in_flight", float(limit.in_flight), {NAME: name}
            yield "rag_resilience.limit.queue_depth", float(limit.waiting), {NAME: name}
        for (name, resource), value in headroom.items():
            yield "rag_resilience.ratelimit.headroom", value, {NAME: name, "resource": resource}
