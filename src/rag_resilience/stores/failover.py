"""Health of a shared store, and the process-local state that stands in while it is down.

One object per store (Redis, SQLite) decides, for every operation, whether to try the
shared backend or serve locally, and keeps what an outage must not lose:

* **Outage vs. load.** A fault (refused connection, timeout, corrupted file) marks the
  store degraded: one warning, then the backend is skipped for `retry_interval` (one
  probe per interval), so a dead backend costs one op timeout, not one per call. Stores
  that give a `probe` (Redis: a PING on a connection of its own) probe in the background:
  while degraded no user call touches the backend at all, so no call pays a second op
  timeout for a probe into a backend that is still stalled. A busy
  backend (connection pool exhausted, SQLite write lock held) is *not* an outage: that
  one operation is served locally and counted as `busy`, the next one tries again.
* **A local mirror.** Values read or written remotely are kept in `local`, so an
  operation that falls back starts from the last shared state seen (a half-open circuit
  stays half-open), not from an empty store.
* **Releases are never lost.** A lease released while the backend cannot be reached is
  kept in `pending` and sent on the first successful operation, so a stall never strands
  shared permits until their lease expires.
* **Bad values fail soft.** An unreadable value is logged once per key, treated as absent
  and overwritten by the next write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .memory import MemoryStore

__all__ = ["Failover"]

logger = logging.getLogger("rag_resilience")

_MAX_PENDING = 10_000  # releases kept for a backend that stays down (oldest dropped)


class Failover:
    """Degraded/probe bookkeeping for one store; thread-safe."""

    def __init__(
        self,
        kind: str,
        owner: object,
        retry_interval: float,
        probe: Callable[[], bool] | None = None,
    ) -> None:
        self.kind = kind  # "redis", "sqlite": the word in log lines
        self.owner = owner  # the store, for its repr in log lines
        self.retry_interval = retry_interval
        #: True if the backend answers now; run in a background thread while degraded
        #: (None: the first operation of each interval probes, as SQLite does).
        self.probe = probe
        self._probing = False
        self.local = MemoryStore()
        self.degraded = False
        self.last_error: BaseException | None = None
        self.pending: dict[tuple[str, str], None] = {}  # (lease key, token) to release
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._outage_started = 0.0
        self._busy_warned = False
        self._verifying = False
        #: True while a timeout is being checked: operations skip the backend meanwhile
        #: (served as busy), so a stall costs a call one op timeout, not one per operation.
        self.suspect = False
        self._bad_keys: set[str] = set()
        self.counters = {
            "remote_ops": 0,
            "local_ops": 0,
            "faults": 0,
            "outages": 0,
            "recoveries": 0,
            "busy": 0,
            "bad_values": 0,
            "probes": 0,
        }

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters)

    def try_remote(self) -> bool:
        """Whether this operation should try the backend (False: serve locally)."""
        if not self.degraded:
            return True
        with self._lock:
            now = time.monotonic()
            if self.degraded and now < self._retry_at:
                self.counters["local_ops"] += 1
                return False
            # Claim this interval's single probe; other callers keep using local state.
            self._retry_at = now + self.retry_interval
            if self.probe is None:
                return True
            self.counters["local_ops"] += 1
            if self._probing:
                return False
            self._probing = True
        threading.Thread(target=self._probe, name=f"{self.kind}-store-probe", daemon=True).start()
        return False

    def _probe(self) -> None:
        """Background probe of a degraded backend: its answer ends the outage."""
        assert self.probe is not None
        try:
            alive = self.probe()
        except Exception:
            alive = False
        with self._lock:
            self._probing = False
            self.counters["probes"] += 1
            if not alive:
                self._retry_at = time.monotonic() + self.retry_interval
        if alive:
            self.on_success(remote=False)

    def on_fault(self, exc: BaseException) -> None:
        with self._lock:
            self.counters["faults"] += 1
            self.counters["local_ops"] += 1
            self.last_error = exc
            now = time.monotonic()
            self._retry_at = now + self.retry_interval
            if self.degraded:
                return
            self.degraded = True
            self._outage_started = now
            self.counters["outages"] += 1
        logger.warning(
            "%s store %r unreachable (%s: %s); serving from local in-process state, "
            "retrying every %.3gs",
            self.kind,
            self.owner,
            type(exc).__name__,
            exc,
            self.retry_interval,
        )

    def on_timeout(self, exc: BaseException, verify: Callable[[], bool]) -> bool:
        """An operation timed out: a stalled backend, or only a slow reply under a burst
        (a starved event loop reads late). This op is served as busy at once, and one
        background check (`verify()`: True if the backend answers) decides; an outage
        is declared only if it fails. True if treated as busy."""
        if self.degraded:
            self.on_fault(exc)
            return False
        self.on_busy(exc, warn=False)
        with self._lock:
            if self._verifying:
                return True
            self._verifying = self.suspect = True

        def check() -> None:
            try:
                alive = verify()
            except Exception:
                alive = False
            if not alive:
                self.on_fault(exc)  # degraded before `suspect` clears: no gap
            with self._lock:
                self._verifying = self.suspect = False

        threading.Thread(target=check, name=f"{self.kind}-store-check", daemon=True).start()
        return True

    def on_busy(self, exc: BaseException, *, warn: bool = True) -> None:
        """The backend is up but could not take this operation in time: serve it locally."""
        with self._lock:
            self.counters["busy"] += 1
            self.counters["local_ops"] += 1
            warned, self._busy_warned = self._busy_warned, self._busy_warned or warn
        if warn and not warned:
            logger.warning(
                "%s store %r busy (%s: %s); this operation served from local state (not an "
                "outage; see counters['busy'])",
                self.kind,
                self.owner,
                type(exc).__name__,
                exc,
            )

    def on_success(self, remote: bool = True) -> None:
        if not self.degraded:
            if remote:
                with self._lock:
                    self.counters["remote_ops"] += 1
            return
        with self._lock:
            if remote:
                self.counters["remote_ops"] += 1
            if not self.degraded:
                return
            self.degraded = False
            self.counters["recoveries"] += 1
            down_for = time.monotonic() - self._outage_started
        logger.info(
            "%s back: store %r reachable after %.3fs; shared state resumes",
            self.kind,
            self.owner,
            down_for,
        )

    def local_op(self) -> None:
        with self._lock:
            self.counters["local_ops"] += 1

    def bad_value(self, key: str, problem: object) -> None:
        """An unreadable value at `key`: counted, logged once per key, treated as absent."""
        with self._lock:
            self.counters["bad_values"] += 1
            first = key not in self._bad_keys
            if first and len(self._bad_keys) < 1000:
                self._bad_keys.add(key)
        if first:
            logger.warning(
                "%s store %r: unreadable value at %r (%s); treated as absent and "
                "overwritten by the next write",
                self.kind,
                self.owner,
                key,
                problem,
            )

    # -- lease releases that could not be sent
    def defer_release(self, key: str, token: str) -> None:
        with self._lock:
            self.pending[(key, token)] = None
            if len(self.pending) > _MAX_PENDING:
                del self.pending[next(iter(self.pending))]

    def take_pending(self) -> list[tuple[str, str]]:
        if not self.pending:
            return []
        with self._lock:
            items = list(self.pending)
            self.pending.clear()
            return items
