"""Events for every decision, listeners that receive them, and `stats()` snapshots.

Every retry, fallback, rejection and breaker transition is an `Event`. Components
hand events to an `EventBus`: their own listeners plus the process-wide ones
(`add_listener`). The default global listener logs to the stdlib logger
``rag_resilience`` so nothing degraded is silent even when nobody subscribed.

Listeners must be cheap and must not raise; an exception in a listener is logged
and swallowed, never propagated into the user's call. A listener that does not
care about the high-volume routine events (``attempt`` and ``success``) sets the
attribute ``routine = False`` so the hot path does not build events for it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "Event",
    "EventBus",
    "EventKind",
    "Listener",
    "LoggingListener",
    "StatsCollector",
    "add_listener",
    "refresh_routine",
    "remove_listener",
]

logger = logging.getLogger("rag_resilience")


class EventKind(str, Enum):
    """What happened. Terminal kinds (one per call): SUCCESS, FALLBACK, FAILURE."""

    ATTEMPT = "attempt"  # an attempt is starting (routine)
    RETRY = "retry"  # an attempt failed, a retry is scheduled after `delay` for `reason`
    SUCCESS = "success"  # the call succeeded live (routine)
    FAILURE = "failure"  # the call failed and nothing could be served: the user sees `error`
    FALLBACK = "fallback"  # a degraded answer was served from `served_from`
    REJECTED = "rejected"  # no call made: circuit open, queue full, retry budget, deadline
    STATE_CHANGE = "state_change"  # breaker moved from `old_state` to `new_state`
    # Waits, published only when a caller really waited (never on the no-wait path):
    PACED = "paced"  # waited `duration` s for a rate-limit slot (extra: upstream)
    PROBE_WAIT = "probe_wait"  # waited `duration` s for a probe's verdict; `reason`: outcome

    def __str__(self) -> str:
        return self.value


ROUTINE_KINDS = frozenset({EventKind.ATTEMPT, EventKind.SUCCESS})

# Plain module globals for the hot path: on Python < 3.12 every `EventKind.X` lookup
# goes through the enum metaclass (about 0.25 µs each), several per call.
_ATTEMPT = EventKind.ATTEMPT
_RETRY = EventKind.RETRY
_SUCCESS = EventKind.SUCCESS
_FAILURE = EventKind.FAILURE
_FALLBACK = EventKind.FALLBACK
_REJECTED = EventKind.REJECTED
_STATE_CHANGE = EventKind.STATE_CHANGE


@dataclass(slots=True)
class Event:
    """One decision. Fields that do not apply to a kind are None."""

    kind: EventKind
    name: str
    attempt: int = 0
    delay: float | None = None
    reason: str | None = None
    error: BaseException | None = None
    duration: float | None = None
    old_state: str | None = None
    new_state: str | None = None
    served_from: str | None = None
    age_s: float | None = None
    timestamp: float = field(default_factory=time.time)
    extra: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (the error as its class name and message)."""
        out: dict[str, Any] = {"kind": self.kind.value, "name": self.name}
        for key in (
            "attempt",
            "delay",
            "reason",
            "duration",
            "old_state",
            "new_state",
            "served_from",
            "age_s",
            "timestamp",
            "extra",
        ):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.error is not None:
            out["error"] = f"{type(self.error).__name__}: {self.error}"
        return out


Listener = Callable[[Event], None]

_global_listeners: list[Listener] = []


# How many global listeners want routine events, and every bus, so that a global
# subscription updates each bus's `routine` flag (read on every call; changed rarely).
_global_routine = [0]
_buses: weakref.WeakSet[EventBus] = weakref.WeakSet()
_buses_lock = threading.RLock()  # re-entrant: a listener's `routine` is user code


def _count_routine(listeners: list[Listener]) -> int:
    return sum(1 for listener in listeners if getattr(listener, "routine", True))


def _global_changed() -> None:
    with _buses_lock:
        _global_routine[0] = _count_routine(_global_listeners)
        for bus in list(_buses):
            bus._refresh()


def refresh_routine() -> None:
    """Read every listener's `routine` wish again, on every bus: for a listener whose
    wish changes after it subscribed (rare: e.g. the LlamaIndex bridge, which wants
    routine events only while a ResilienceEventHandler is open)."""
    _global_changed()


def add_listener(listener: Listener) -> None:
    """Subscribe `listener` to the events of every component in this process."""
    if listener not in _global_listeners:
        _global_listeners.append(listener)
        _global_changed()


def remove_listener(listener: Listener) -> None:
    """Unsubscribe a global listener (a no-op if it was not subscribed)."""
    if listener in _global_listeners:
        _global_listeners.remove(listener)
        _global_changed()


class EventBus:
    """Fan-out of events to a component's listeners and the global ones.

    `routine`: does anyone want attempt/success events? An attribute, not a method, as
    drivers read it on every call; kept current by `add`/`remove` here and by global
    subscriptions. A listener's own `routine` attribute is read when it subscribes.
    """

    __slots__ = ("__weakref__", "_listeners", "_routine", "routine")

    def __init__(self, listeners: Iterable[Listener] | None = None) -> None:
        self._listeners: list[Listener] = list(listeners or ())
        with _buses_lock:
            self._refresh()
            _buses.add(self)

    def _refresh(self) -> None:
        self._routine = _count_routine(self._listeners)
        self.routine: bool = self._routine > 0 or _global_routine[0] > 0

    def add(self, listener: Listener) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)
            with _buses_lock:
                self._refresh()

    def remove(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
            with _buses_lock:
                self._refresh()

    def wants_routine(self) -> bool:
        """`routine`, for callers that prefer a method."""
        return self.routine

    @property
    def listeners(self) -> list[Listener]:
        return [*self._listeners, *_global_listeners]

    def wants(self, kind: EventKind) -> bool:
        """Cheap check before building an event on the hot path."""
        if kind not in ROUTINE_KINDS:
            return bool(self._listeners or _global_listeners)
        return self.routine

    def emit(self, event: Event) -> None:
        routine = event.kind in ROUTINE_KINDS
        for listener in (*self._listeners, *_global_listeners):
            if routine and not getattr(listener, "routine", True):
                continue
            try:
                listener(event)
            except Exception:  # a broken listener must never break the user's call
                logger.exception("rag_resilience listener %r raised; ignored", listener)

    def publish(self, kind: EventKind, name: str, **fields: Any) -> None:
        """Build and emit an event only if someone listens for this kind.

        One pass over the listeners. A plain `StatsCollector` is told about a routine
        event (attempt, success) without an `Event` being built for it: that pair is
        published on every call, and the collector only needs the counts and duration.
        """
        listeners = self._listeners
        if not listeners and not _global_listeners:
            return
        routine = kind in ROUTINE_KINDS
        event: Event | None = None
        for listener in (*listeners, *_global_listeners):  # a snapshot: listeners may unsubscribe
            if routine:
                if not getattr(listener, "routine", True):
                    continue
                if type(listener) is StatsCollector and "extra" not in fields:
                    try:
                        listener._routine(kind, fields.get("duration"))
                    except Exception:
                        logger.exception("rag_resilience listener %r raised; ignored", listener)
                    continue
            if event is None:
                event = Event(kind, name, **fields)
            try:
                listener(event)
            except Exception:  # a broken listener must never break the user's call
                logger.exception("rag_resilience listener %r raised; ignored", listener)


class LoggingListener:
    """Logs every non-routine event to the ``rag_resilience`` logger.

    Retries, fallbacks, rejections and breaker transitions are WARNING (degraded
    service must be visible); a call that fails to the user is ERROR.
    """

    routine = False

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.log = log or logger

    def __call__(self, event: Event) -> None:
        kind = event.kind
        if kind is EventKind.RETRY:
            self.log.warning(
                "[%s] attempt %d failed (%s: %s); retrying in %.2fs",
                event.name,
                event.attempt,
                event.reason,
                _err(event.error),
                event.delay or 0.0,
            )
        elif kind is EventKind.STATE_CHANGE:
            self.log.warning("[%s] circuit %s -> %s", event.name, event.old_state, event.new_state)
        elif kind is EventKind.FALLBACK:
            age = f", age {event.age_s:.1f}s" if event.age_s is not None else ""
            self.log.warning(
                "[%s] served degraded answer from %s%s after %s",
                event.name,
                event.served_from,
                age,
                _err(event.error),
            )
        elif kind is EventKind.REJECTED:
            self.log.warning("[%s] rejected without calling upstream: %s", event.name, event.reason)
        elif kind is EventKind.FAILURE:
            self.log.error(
                "[%s] failed after %d attempt(s): %s", event.name, event.attempt, _err(event.error)
            )
        elif self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("[%s] %s", event.name, event.as_dict())


def _err(error: BaseException | None) -> str:
    if error is None:
        return "-"
    return f"{type(error).__name__}: {error}"


DEFAULT_LOGGING_LISTENER = LoggingListener()
add_listener(DEFAULT_LOGGING_LISTENER)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


#: Terminal reasons that are not an attempt's error (no upstream call was made for them).
_NO_ATTEMPT_REASONS = frozenset({"circuit_open", "queue_full", "deadline"})


class StatsCollector:
    """A listener that aggregates events into a `stats()` snapshot.

    The snapshot (documented in the README, "Reading stats()") keeps two kinds of numbers
    apart. Per user call, one outcome each: ``calls`` = ``live`` + ``degraded`` +
    ``errors``, ``degraded_by_source``, ``errors_by_class`` (what the users saw) and the
    latency. Per component, every attempt: ``attempts``, ``retries``,
    ``retries_by_reason``, ``attempt_errors_by_class``, ``rejections`` and the breaker
    transitions. ``successes``, ``failures``, ``fallbacks_by_source`` and ``retry_reasons``
    are the older names of ``live``, ``errors``, ``degraded_by_source`` and
    ``retries_by_reason``.

    `user_calls`: an aggregate over several wrappers (the framework handlers) counts a
    call nested in an outer wrapper's call (its event says ``extra={"nested": True}``)
    only per component: the user call is counted once, by the outer wrapper.

    Counts are exact; latency percentiles are over the last `latency_window` calls.
    `gauges` callables add live gauges (breaker state, queue depth) to each snapshot.
    """

    routine = True

    def __init__(self, latency_window: int = 4096, *, user_calls: bool = False) -> None:
        if latency_window < 1:
            raise ValueError(f"latency_window must be >= 1, got {latency_window}")
        self.user_calls = user_calls
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self.gauges: dict[str, Callable[[], Any]] = {}
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls = 0
            self.successes = 0
            self.failures = 0
            self.attempts = 0
            self.retries = 0
            self.rejections = 0
            self.degraded = 0
            self.parse_failures = 0
            self.interrupted = 0  # cancelled or interrupted (KeyboardInterrupt...) calls
            self.errors_by_class: Counter[str] = Counter()
            self.attempt_errors_by_class: Counter[str] = Counter()
            self.retry_reasons: Counter[str] = Counter()
            self.rejections_by_reason: Counter[str] = Counter()
            self.fallbacks_by_source: Counter[str] = Counter()
            self.transitions: Counter[str] = Counter()
            self.last_state: dict[str, str] = {}
            self._latencies.clear()

    def __call__(self, event: Event) -> None:
        kind = event.kind
        extra = event.extra
        nested = self.user_calls and extra is not None and extra.get("nested") is True
        if kind is _ATTEMPT or (kind is _SUCCESS and not nested):
            if extra is not None and extra.get("inner_degraded") is not None:
                self._inner_degraded(kind, event.duration, extra["inner_degraded"])
                return
            self._routine(kind, event.duration)
            return
        with self._lock:
            if kind is _RETRY:
                self.retries += 1
                self.retry_reasons[event.reason or "unknown"] += 1
                if event.error is not None:
                    self.attempt_errors_by_class[type(event.error).__name__] += 1
            elif kind is _FALLBACK or kind is _FAILURE:
                error = event.error
                if error is not None and event.reason not in _NO_ATTEMPT_REASONS:
                    self.attempt_errors_by_class[type(error).__name__] += 1  # the last attempt's
                if nested:
                    return
                self.calls += 1
                if kind is _FALLBACK:
                    self.degraded += 1
                    self.fallbacks_by_source[event.served_from or "unknown"] += 1
                else:
                    self.failures += 1
                    if event.reason == "parse_failure":
                        self.parse_failures += 1
                    if error is not None:
                        self.errors_by_class[type(error).__name__] += 1
                if event.duration is not None:
                    self._latencies.append(event.duration)
            elif kind is _REJECTED:
                self.rejections += 1
                self.rejections_by_reason[event.reason or "unknown"] += 1
            elif kind is _STATE_CHANGE:
                self.transitions[f"{event.old_state}->{event.new_state}"] += 1
                if event.new_state is not None:
                    self.last_state[event.name] = event.new_state

    def note_parse_failure(self) -> None:
        """Count a model answer that did not parse, outside any policy attempt (a parser
        step after the model); inside one, the FAILURE event counts it."""
        with self._lock:
            self.parse_failures += 1

    def count_interrupted(self) -> None:
        """A call ended with no outcome (cancelled, interrupted): counted as a call."""
        with self._lock:
            self.calls += 1
            self.interrupted += 1

    def _inner_degraded(self, kind: EventKind, duration: float | None, source: str) -> None:
        """A live answer of an outer wrapper built on a degraded inner answer: a degraded
        user call (from `source`), not a live one."""
        with self._lock:
            self.calls += 1
            self.degraded += 1
            self.fallbacks_by_source[source] += 1
            if duration is not None:
                self._latencies.append(duration)

    def reclassify_degraded(self, source: str) -> None:
        """Turn one call already counted live into a degraded one (see `_inner_degraded`)."""
        with self._lock:
            self.successes -= 1
            self.degraded += 1
            self.fallbacks_by_source[source] += 1

    def _routine(self, kind: EventKind, duration: float | None) -> None:
        """Count an attempt or a live success (no `Event` needed: see `EventBus.publish`)."""
        with self._lock:
            if kind is _ATTEMPT:
                self.attempts += 1
            elif kind is _SUCCESS:
                self.calls += 1
                self.successes += 1
                if duration is not None:
                    self._latencies.append(duration)

    def stats(self) -> dict[str, Any]:
        """A point-in-time snapshot (plain dict, JSON-serialisable)."""
        with self._lock:
            lat = sorted(self._latencies)
            calls = self.calls
            by_source = dict(self.fallbacks_by_source)
            reasons = dict(self.retry_reasons)
            snapshot: dict[str, Any] = {
                # per user call: calls == live + degraded + errors + interrupted
                "calls": calls,
                "live": self.successes,
                "degraded": self.degraded,
                "errors": self.failures,
                "degraded_by_source": by_source,
                "errors_by_class": dict(self.errors_by_class),
                "interrupted": self.interrupted,
                "error_rate": (self.failures / calls) if calls else 0.0,
                "degraded_rate": (self.degraded / calls) if calls else 0.0,
                # per component: every attempt
                "attempts": self.attempts,
                "retries": self.retries,
                "retries_by_reason": reasons,
                "attempt_errors_by_class": dict(self.attempt_errors_by_class),
                "parse_failures": self.parse_failures,
                "rejections": self.rejections,
                "rejections_by_reason": dict(self.rejections_by_reason),
                # older names of live, errors, degraded_by_source and retries_by_reason
                "successes": self.successes,
                "failures": self.failures,
                "fallbacks_by_source": dict(by_source),
                "retry_reasons": dict(reasons),
                "breaker_transitions": dict(self.transitions),
                "breaker_states": dict(self.last_state),
                "latency_s": {
                    "p50": _percentile(lat, 0.50),
                    "p95": _percentile(lat, 0.95),
                    "p99": _percentile(lat, 0.99),
                    "max": lat[-1] if lat else None,
                    "count": len(lat),
                },
            }
        for key, gauge in self.gauges.items():
            try:
                snapshot[key] = gauge()
            except Exception as exc:  # a gauge must not break stats()
                snapshot[key] = f"unavailable: {exc!r}"
        return snapshot
