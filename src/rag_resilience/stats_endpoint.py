"""What `rag-resilience watch` reads: per-policy samples over HTTP, or published to a store.

    from rag_resilience.stats_endpoint import StatsReport, serve_stats, StatsPublisher
    report = StatsReport(policy_a, policy_b)
    serve_stats(report, port=9465)            # GET http://127.0.0.1:9465/stats  (JSON)
    StatsPublisher(report, store).start()     # or: every replica writes its sample to Redis

A sample (one per policy, JSON) is::

    {"name": "openai-chat", "replica": "host-1234", "time": 1733220000.0,
     "breaker": {"name", "state", "failures", "open_for_s", "next_probe_s"} | null,
     "limit": {"name", "in_flight", "waiting", "max_concurrency"} | null,
     "totals": {"calls", "live", "errors", "degraded", "retries", "rejections",
                "interrupted", "parse_failures"},
     "series": [[unix second, calls, errors, degraded], ...],   # the last `window_s`
     "rate_limit": {...}}   # only with pacing: the policy's stats()["rate_limit"]

`series` holds the calls finished in each wall-clock second (from the differences of the
policy's `stats()` between samples), so samples of several replicas add up second by
second. ``rate_limit`` is `RateLimiter.stats()`: totals (``paced``, ``paced_seconds``,
``rejected``, ``throttled_429``) and per upstream (base URL, model, a hash of the API key)
the learned limits (``requests_per_s``, ``tokens_per_s``, their ``*_source``), the share
of each bucket free now (``requests_headroom``, ``tokens_headroom``) and ``waiting``.
Stdlib only; the server binds loopback unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .stores.base import Store

__all__ = [
    "STATS_KEY",
    "StatsPublisher",
    "StatsReport",
    "serve_stats",
    "stats_key",
]

_logger = logging.getLogger("rag_resilience")

#: Store key of one replica's sample for one policy (``{name}``, ``{replica}``).
STATS_KEY = "rag_resilience:{name}:stats:{replica}"
_TOTALS = (
    "calls",
    "live",
    "errors",
    "degraded",
    "retries",
    "rejections",
    "interrupted",
    "parse_failures",
)
#: stats() names before issue 18, read when a policy-like object only has those
_OLD_NAMES = {"live": "successes", "errors": "failures"}


def stats_key(name: str, replica: str) -> str:
    return STATS_KEY.format(name=name, replica=replica)


def default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _int(stats: dict[str, Any], key: str) -> int:
    value = stats.get(key, stats.get(_OLD_NAMES.get(key, key), 0))
    return int(value) if isinstance(value, (int, float)) else 0


class _Window:
    """One policy's recent per-second counts, from the differences between samples."""

    def __init__(self, policy: Any, window_s: int, name: str | None = None) -> None:
        self.policy = policy
        self.name = name or policy.name
        self.window_s = window_s
        self.previous: tuple[int, int, int] | None = None
        self.series: deque[list[int]] = deque()

    def sample(self, now: float, replica: str) -> dict[str, Any]:
        policy = self.policy
        stats = policy.stats()
        totals = {key: _int(stats, key) for key in _TOTALS}
        current = (totals["calls"], totals["errors"], totals["degraded"])
        if self.previous is not None:
            delta = [max(0, c - p) for c, p in zip(current, self.previous, strict=True)]
            second = int(now)
            if self.series and self.series[-1][0] == second:
                for i in range(3):
                    self.series[-1][i + 1] += delta[i]
            else:
                self.series.append([second, *delta])
        self.previous = current
        while self.series and self.series[0][0] <= now - self.window_s:
            self.series.popleft()
        sample = {
            "name": self.name,
            "replica": replica,
            "time": now,
            "breaker": _breaker(policy.breaker),
            "limit": _limit(policy.limit),
            "totals": totals,
            "series": [list(row) for row in self.series],
        }
        rate_limit = stats.get("rate_limit")  # what pacing learned, when a policy reports it
        if isinstance(rate_limit, dict):
            sample["rate_limit"] = rate_limit
        return sample


def _breaker(breaker: Any) -> dict[str, Any] | None:
    if breaker is None:
        return None
    try:
        rec = breaker._snapshot()
        now = breaker._now()
        state = breaker.get_state().value
    except Exception as exc:  # a store outage: say so, do not break the endpoint
        return {"name": breaker.name, "state": "unknown", "error": repr(exc)}
    is_open = state in ("open", "half_open")
    return {
        "name": breaker.name,
        "state": state,
        "failures": rec.failures,
        "open_for_s": round(now - rec.opened_at, 3) if is_open else None,
        "next_probe_s": round(max(0.0, rec.open_until - now), 3) if state == "open" else None,
    }


def _limit(limit: Any) -> dict[str, Any] | None:
    if limit is None:
        return None
    return {
        "name": limit.name,
        "in_flight": limit.in_flight,
        "waiting": limit.waiting,
        "max_concurrency": limit.max_concurrency,
    }


class StatsReport:
    """Samples of some policies: what one replica tells `watch`. A policy's series starts
    when it is added (a first sample is the baseline the next ones are counted from)."""

    def __init__(
        self,
        *policies: Any,
        replica: str | None = None,
        window_s: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s < 1:
            raise ValueError(f"window_s must be an integer >= 1 second, got {window_s!r}")
        self.replica = replica or default_replica()
        self.window_s = window_s
        self._windows: list[_Window] = []
        self._clock = clock
        self._lock = threading.Lock()
        for policy in policies:
            self.add(policy)

    def add(self, policy: Any, name: str | None = None) -> None:
        """Report `policy` too, as `name` (default: its own); its series start now."""
        window = _Window(policy, self.window_s, name)
        with self._lock:
            window.sample(self._clock(), self.replica)  # the baseline
            self._windows.append(window)

    def samples(self) -> list[dict[str, Any]]:
        with self._lock:  # two scrapes at once must not interleave their differences
            now = self._clock()
            return [window.sample(now, self.replica) for window in self._windows]

    def snapshot(self) -> dict[str, Any]:
        """The endpoint's JSON body."""
        return {"replica": self.replica, "time": self._clock(), "policies": self.samples()}


def serve_stats(report: StatsReport, port: int = 0, addr: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``GET /stats`` (the report's snapshot as JSON) from a daemon thread; returns
    the server (``server.server_port``, ``server.shutdown()``)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/stats", "/"):
                self.send_error(404)
                return
            body = json.dumps(report.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None  # no access log on stderr

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="rag-resilience-stats", daemon=True).start()
    return server


class StatsPublisher:
    """Writes a report's samples to a (shared) store every `interval_s`, each under
    `stats_key(name, replica)` with a TTL, so `watch` sees every live replica at once."""

    def __init__(
        self, report: StatsReport, store: Store, *, interval_s: float = 1.0, ttl_s: float = 15.0
    ) -> None:
        if not 0 < interval_s <= 60:
            raise ValueError(f"interval_s must be in (0, 60] seconds, got {interval_s!r}")
        if ttl_s <= interval_s:
            raise ValueError(f"ttl_s must be > interval_s ({interval_s}), got {ttl_s!r}")
        self.report = report
        self.store = store
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> None:
        """Write one round of samples now (the thread calls this every interval)."""
        for sample in self.report.samples():
            try:
                self.store.set(stats_key(sample["name"], sample["replica"]), sample, self.ttl_s)
            except Exception:  # the store logs its own outage; the app goes on
                _logger.debug("rag_resilience stats publish failed", exc_info=True)

    def start(self) -> StatsPublisher:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="rag-resilience-stats-publisher", daemon=True
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.publish()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
