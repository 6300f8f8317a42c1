"""Events: delivery to component and global listeners, routine filtering, broken listeners,
the logging listener's levels, and StatsCollector snapshots (exact under threads)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from rag_resilience import events as ev
from rag_resilience.events import (
    Event,
    EventBus,
    EventKind,
    LoggingListener,
    StatsCollector,
    add_listener,
    remove_listener,
)


@pytest.fixture
def no_globals() -> Iterator[None]:
    """Run with no process-wide listeners (the default logging one included)."""
    saved = list(ev._global_listeners)
    for listener in saved:
        remove_listener(listener)
    try:
        yield
    finally:
        for listener in list(ev._global_listeners):
            remove_listener(listener)
        for listener in saved:
            add_listener(listener)


class Quiet:
    """A listener that does not want attempt/success events."""

    routine = False

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)


def test_default_logging_listener_is_subscribed() -> None:
    assert any(isinstance(listener, LoggingListener) for listener in ev._global_listeners)


def test_component_listener_gets_fields(no_globals: None) -> None:
    got: list[Event] = []
    bus = EventBus([got.append])
    err = ConnectionError("reset")
    bus.publish(EventKind.RETRY, "emb", attempt=2, delay=1.5, reason="connection", error=err)
    assert len(got) == 1
    e = got[0]
    assert (e.kind, e.name, e.attempt, e.delay, e.reason, e.error) == (
        EventKind.RETRY,
        "emb",
        2,
        1.5,
        "connection",
        err,
    )
    assert e.old_state is None and e.served_from is None


def test_nobody_listening_means_nothing_wanted(no_globals: None) -> None:
    bus = EventBus()
    assert not bus.wants(EventKind.RETRY) and not bus.wants(EventKind.ATTEMPT)
    bus.publish(EventKind.FAILURE, "x", error=ValueError())  # no listener: a no-op
    quiet = Quiet()
    bus.add(quiet)
    assert bus.wants(EventKind.RETRY) and not bus.wants(EventKind.ATTEMPT)
    assert not bus.wants(EventKind.SUCCESS)
    bus.add(quiet)  # adding twice does not deliver twice
    bus.publish(EventKind.RETRY, "x")
    assert len(quiet.events) == 1
    bus.remove(quiet)
    assert not bus.wants(EventKind.RETRY)


def test_routine_events_skip_listeners_that_opt_out(no_globals: None) -> None:
    quiet, loud = Quiet(), []
    bus = EventBus([quiet, loud.append])
    assert bus.wants(EventKind.ATTEMPT)
    for kind in EventKind:
        bus.publish(kind, "n")
    assert [e.kind for e in loud] == list(EventKind)
    assert [e.kind for e in quiet.events] == [
        k for k in EventKind if k not in (EventKind.ATTEMPT, EventKind.SUCCESS)
    ]


def test_global_listeners_see_every_bus(no_globals: None) -> None:
    got: list[Event] = []
    a, b = EventBus(), EventBus()
    add_listener(got.append)
    add_listener(got.append)  # idempotent
    a.publish(EventKind.REJECTED, "a", reason="queue_full")
    b.publish(EventKind.ATTEMPT, "b", attempt=1)
    assert [(e.name, e.kind) for e in got] == [("a", EventKind.REJECTED), ("b", EventKind.ATTEMPT)]
    remove_listener(got.append)
    remove_listener(got.append)  # a no-op when absent
    a.publish(EventKind.REJECTED, "a")
    assert len(got) == 2
    assert not a.wants(EventKind.REJECTED)


def test_global_quiet_listener_does_not_make_routine_wanted(no_globals: None) -> None:
    add_listener(Quiet())
    bus = EventBus()
    assert bus.wants(EventKind.RETRY)
    assert not bus.wants(EventKind.ATTEMPT)


def test_broken_listener_is_logged_and_others_still_run(
    no_globals: None, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    bus = EventBus([broken, got.append])
    with caplog.at_level(logging.ERROR, logger="rag_resilience"):
        bus.publish(EventKind.FAILURE, "n", error=KeyError("k"))
        bus.publish(EventKind.SUCCESS, "n", duration=0.1)
    assert [e.kind for e in got] == [EventKind.FAILURE, EventKind.SUCCESS]
    assert sum("listener" in r.getMessage() for r in caplog.records) == 2


def test_listener_may_unsubscribe_itself_while_handling(no_globals: None) -> None:
    got: list[str] = []
    bus = EventBus()

    def once(event: Event) -> None:
        got.append("once")
        bus.remove(once)

    bus.add(once)
    bus.add(lambda e: got.append("other"))
    bus.publish(EventKind.RETRY, "n")
    bus.publish(EventKind.RETRY, "n")
    assert got == ["once", "other", "other"]


def test_event_as_dict_is_json_friendly() -> None:
    e = Event(
        EventKind.FALLBACK,
        "chat",
        attempt=3,
        served_from="cache",
        age_s=12.5,
        error=ConnectionError("down"),
        timestamp=1.0,
    )
    d = e.as_dict()
    assert d == {
        "kind": "fallback",
        "name": "chat",
        "attempt": 3,
        "served_from": "cache",
        "age_s": 12.5,
        "timestamp": 1.0,
        "error": "ConnectionError: down",
    }
    json.dumps(d)
    assert str(EventKind.STATE_CHANGE) == "state_change"


# -- logging listener -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("event", "level", "text"),
    [
        (
            Event(
                EventKind.RETRY,
                "emb",
                attempt=1,
                delay=2.5,
                reason="http_503",
                error=ConnectionError("x"),
            ),
            logging.WARNING,
            "retrying in 2.50s",
        ),
        (
            Event(EventKind.STATE_CHANGE, "emb", old_state="closed", new_state="open"),
            logging.WARNING,
            "circuit closed -> open",
        ),
        (
            Event(EventKind.FALLBACK, "emb", served_from="cache", age_s=61.0),
            logging.WARNING,
            "from cache, age 61.0s",
        ),
        (Event(EventKind.REJECTED, "emb", reason="circuit_open"), logging.WARNING, "circuit_open"),
        (
            Event(EventKind.FAILURE, "emb", attempt=4, error=TimeoutError("slow")),
            logging.ERROR,
            "failed after 4 attempt(s): TimeoutError: slow",
        ),
    ],
)
def test_logging_listener_levels(
    caplog: pytest.LogCaptureFixture, event: Event, level: int, text: str
) -> None:
    listener = LoggingListener(logging.getLogger("rag_resilience.test"))
    with caplog.at_level(logging.DEBUG, logger="rag_resilience.test"):
        listener(event)
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert (
        record.levelno == level and text in record.getMessage() and "[emb]" in record.getMessage()
    )


def test_logging_listener_is_not_routine(caplog: pytest.LogCaptureFixture) -> None:
    assert LoggingListener.routine is False
    listener = LoggingListener(logging.getLogger("rag_resilience.test2"))
    with caplog.at_level(logging.INFO, logger="rag_resilience.test2"):
        listener(Event(EventKind.SUCCESS, "n"))
    assert caplog.records == []


# -- stats ----------------------------------------------------------------------------------
def feed(collector: StatsCollector, *events: tuple[EventKind, dict[str, Any]]) -> None:
    bus = EventBus([collector])
    for kind, fields in events:
        bus.publish(kind, "p", **fields)


def test_stats_collector_counts(no_globals: None) -> None:
    c = StatsCollector()
    feed(
        c,
        (EventKind.ATTEMPT, {"attempt": 1}),
        (EventKind.RETRY, {"reason": "http_503", "error": ConnectionError()}),
        (EventKind.ATTEMPT, {"attempt": 2}),
        (EventKind.SUCCESS, {"duration": 1.0}),
        (EventKind.ATTEMPT, {"attempt": 1}),
        (EventKind.FALLBACK, {"served_from": "cache", "duration": 3.0}),
        (EventKind.ATTEMPT, {"attempt": 1}),
        (EventKind.FAILURE, {"error": TimeoutError(), "duration": 2.0}),
        (EventKind.REJECTED, {"reason": "circuit_open"}),
        (EventKind.STATE_CHANGE, {"old_state": "closed", "new_state": "open"}),
    )
    s = c.stats()
    assert (s["calls"], s["successes"], s["failures"], s["degraded"]) == (3, 1, 1, 1)
    assert s["attempts"] == 4 and s["retries"] == 1
    assert s["error_rate"] == pytest.approx(1 / 3) and s["degraded_rate"] == pytest.approx(1 / 3)
    assert s["retry_reasons"] == {"http_503": 1}
    # what users saw apart from what attempts met (issue 18: errors 0 beside 12 by class)
    assert s["errors"] == s["failures"] == 1 and s["live"] == 1
    assert s["calls"] == s["live"] + s["degraded"] + s["errors"]
    assert s["errors_by_class"] == {"TimeoutError": 1}
    assert s["attempt_errors_by_class"] == {"ConnectionError": 1, "TimeoutError": 1}
    assert s["retries_by_reason"] == s["retry_reasons"] and s["degraded_by_source"] == {"cache": 1}
    assert s["rejections"] == 1 and s["rejections_by_reason"] == {"circuit_open": 1}
    assert s["fallbacks_by_source"] == {"cache": 1}
    assert s["breaker_transitions"] == {"closed->open": 1}
    assert s["breaker_states"] == {"p": "open"}
    assert s["latency_s"]["p50"] == 2.0 and s["latency_s"]["max"] == 3.0
    assert s["latency_s"]["count"] == 3
    json.dumps(s)


def test_stats_direct_calls_match_bus_delivery(no_globals: None) -> None:
    via_bus, direct = StatsCollector(), StatsCollector()
    events = [(EventKind.ATTEMPT, {}), (EventKind.SUCCESS, {"duration": 0.5})] * 10
    feed(via_bus, *events)
    for kind, fields in events:
        direct(Event(kind, "p", **fields))
    assert via_bus.stats() == direct.stats()
    assert direct.stats()["successes"] == 10 and direct.stats()["attempts"] == 10


def test_stats_percentiles_window_gauges_and_reset(no_globals: None) -> None:
    c = StatsCollector(latency_window=100)
    feed(c, *[(EventKind.SUCCESS, {"duration": float(i)}) for i in range(1, 201)])
    lat = c.stats()["latency_s"]
    assert lat["count"] == 100  # only the last 100 calls
    assert lat["p50"] == pytest.approx(150.0, abs=1) and lat["p99"] == pytest.approx(199.0, abs=1)
    assert lat["max"] == 200.0
    c.gauges["depth"] = lambda: 7
    c.gauges["broken"] = lambda: 1 / 0
    s = c.stats()
    assert s["depth"] == 7 and str(s["broken"]).startswith("unavailable")
    c.reset()
    s = c.stats()
    assert s["calls"] == 0 and s["latency_s"]["p50"] is None and s["error_rate"] == 0.0
    with pytest.raises(ValueError, match="latency_window"):
        StatsCollector(latency_window=0)


def test_stats_exact_under_threads(no_globals: None) -> None:
    c = StatsCollector()
    bus = EventBus([c])

    def work() -> None:
        for i in range(500):
            bus.publish(EventKind.ATTEMPT, "p", attempt=1)
            if i % 5 == 0:
                bus.publish(EventKind.RETRY, "p", reason="r")
                bus.publish(EventKind.FAILURE, "p", duration=0.1)
            else:
                bus.publish(EventKind.SUCCESS, "p", duration=0.1)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    s = c.stats()
    assert s["attempts"] == 16 * 500 and s["calls"] == 16 * 500
    assert s["failures"] == s["retries"] == 16 * 100 and s["successes"] == 16 * 400
