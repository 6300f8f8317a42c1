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
``rag_resilience.wait.duration``            histogram  ``wait`` (paced|probe|slow_start|next_probe),
                                                       ``outcome``: time a call waited for a
                                                       rate-limit slot or a probe's verdict
``rag_resilience.ratelimit.headroom``       gauge      ``upstream``, ``resource`` (requests|tokens):
                                                       share of the pacer's burst free now (1 full,
                                                       0 the next call waits)
``rag_resilience.ratelimit.limit``          gauge      ``upstream``, ``resource``, ``source``
                                                       (headers|aimd|configured): the learned or
                                                       told limit, per second
``rag_resilience.ratelimit.waiting``        gauge      ``upstream``: callers waiting for a slot
==========================================  =========  ==========================================

Every metric also carries ``rag_resilience.name``: the policy, breaker or limit.

Gauges are read when the backend collects: from the components given to `observe`, and
from every live `ResiliencePolicy` whose events the recorder has received (by weak
reference: a policy that is gone is no longer reported), so `observe` is only needed for
a policy that has not published anything yet, or a bare breaker or limit. ``upstream`` is
the pacer's key: base URL, model and a hash of the API key (never the key).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ._registry import live_policies
from .events import Event, EventKind

__all__ = [
    "CALL_ATTRIBUTE_HOOKS",
    "METRICS",
    "MetricSink",
    "MetricSpec",
    "MetricsRecorder",
    "polly_event_name",
    "rate_limit_gauges",
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
            "rag_resilience.wait.duration",
            "histogram",
            "s",
            "time a call waited for a rate-limit slot or a probe's verdict",
            (NAME, "wait", "outcome"),
        ),
        MetricSpec(
            "rag_resilience.ratelimit.headroom",
            "gauge",
            "1",
            "share of an upstream's rate-limit burst free now (1 full, 0 the next call waits)",
            (NAME, "upstream", "resource"),
        ),
        MetricSpec(
            "rag_resilience.ratelimit.limit",
            "gauge",
            "1/s",
            "an upstream's learned (or told) rate limit, per second",
            (NAME, "upstream", "resource", "source"),
        ),
        MetricSpec(
            "rag_resilience.ratelimit.waiting",
            "gauge",
            "1",
            "callers waiting for a rate-limit slot",
            (NAME, "upstream"),
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


_WAITS = frozenset({EventKind.PACED, EventKind.PROBE_WAIT})

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
    if kind is EventKind.PACED:
        return "OnRateLimiterPaced"
    if kind is EventKind.PROBE_WAIT:
        return "OnCircuitProbeWait"
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
        self._heard: set[str] = set()  # names of components we received events from
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
        elif kind in _WAITS and event.duration is not None:
            extra = event.extra or {}
            wait = "paced" if kind is EventKind.PACED else str(extra.get("waited_for", "probe"))
            attrs = {NAME: name, "wait": wait, "outcome": event.reason or "waited"}
            sink.record("rag_resilience.wait.duration", event.duration, attrs)
        if name not in self._heard:
            self._heard.add(name)  # a set's add is atomic; read by `gauges`
        event_name = polly_event_name(event)
        if event_name is not None:
            attrs = {NAME: name, "event.name": event_name}
            if event.reason is not None:
                attrs["reason"] = event.reason
            sink.add("rag_resilience.events", 1, attrs)

    # -- pull: live gauges
    def observe(self, *components: Any) -> None:
        """Report the live state of these policies, breakers or limits as gauges (kept by
        weak reference: observing does not keep a component alive)."""
        for component in components:
            self._observed[id(component)] = component

    def _components(self) -> list[Any]:
        """What the gauges report: the observed components, and every live policy we
        received events from (itself or through its breaker, limit or rate limiter)."""
        found = {id(c): c for c in list(self._observed.values())}
        heard = set(self._heard)
        if heard:
            for policy in live_policies():
                if id(policy) not in found and heard.intersection(_names_of(policy)):
                    found[id(policy)] = policy
        return list(found.values())

    def gauges(self) -> Iterator[tuple[str, float, dict[str, str]]]:
        """(metric, value, attributes) of every gauge, read now."""
        breakers: dict[str, str] = {}
        limits: dict[str, Any] = {}
        limiters: dict[str, Any] = {}
        for component in self._components():
            breaker = getattr(component, "breaker", None)
            limit = getattr(component, "limit", None)
            limiter = getattr(component, "rate_limiter", None)
            if hasattr(component, "get_state"):
                breaker = component
            if hasattr(component, "in_flight") and hasattr(component, "waiting"):
                limit = component
            if hasattr(component, "pacer") and hasattr(component, "stats"):
                limiter = component
            if breaker is not None:
                with contextlib.suppress(Exception):  # a store outage must not break a scrape
                    breakers[breaker.name] = breaker.get_state().value
            if limit is not None:
                limits[limit.name] = limit
            if limiter is not None:
                limiters[limiter.name] = limiter
        with self._lock:
            states = {**self._states, **breakers}
        for name, state in states.items():
            for candidate in BREAKER_STATES:
                value = 1.0 if candidate == state else 0.0
                yield "rag_resilience.breaker.state", value, {NAME: name, "state": candidate}
        for name, limit in limits.items():
            yield "rag_resilience.limit.in_flight", float(limit.in_flight), {NAME: name}
            yield "rag_resilience.limit.queue_depth", float(limit.waiting), {NAME: name}
        for name, limiter in limiters.items():
            try:
                upstreams = limiter.stats()["upstreams"]
            except Exception:  # a scrape must not fail on one limiter
                continue
            yield from rate_limit_gauges(name, upstreams)


def _names_of(policy: Any) -> set[str]:
    names = {str(getattr(policy, "name", ""))}
    for part in ("breaker", "limit", "rate_limiter"):
        component = getattr(policy, part, None)
        if component is not None:
            names.add(str(getattr(component, "name", "")))
    retry = getattr(policy, "retry", None)
    if retry is not None and getattr(retry, "name", None):
        names.add(str(retry.name))
    return names


def rate_limit_gauges(
    name: str, upstreams: dict[str, Any]
) -> Iterator[tuple[str, float, dict[str, str]]]:
    """The rate-limit gauges of one limiter's `stats()["upstreams"]`."""
    for upstream, snap in upstreams.items():
        for resource in ("requests", "tokens"):
            headroom = snap.get(f"{resource}_headroom")
            attrs = {NAME: name, "upstream": upstream, "resource": resource}
            if headroom is not None:
                yield "rag_resilience.ratelimit.headroom", float(headroom), attrs
            rate = snap.get(f"{resource}_per_s")
            if rate is not None:
                source = str(snap.get(f"{resource}_source") or "unknown")
                yield "rag_resilience.ratelimit.limit", float(rate), {**attrs, "source": source}
        waiting = float(snap.get("waiting") or 0)
        yield "rag_resilience.ratelimit.waiting", waiting, {NAME: name, "upstream": upstream}
