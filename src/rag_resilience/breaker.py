"""Circuit breaker: stop calling an upstream that is down, probe it, recover.

States: CLOSED (calls flow, failures counted) -> OPEN (calls rejected at once with
`CircuitOpenError`, no upstream call) -> HALF_OPEN (a bounded number of probes) ->
CLOSED after `success_threshold` probe successes, or OPEN again on a probe failure.

Two ways to trip: `mode="consecutive"` (the seed's: `failure_threshold` failures in a
row) and `mode="rate"` (failure rate over a sliding time window once `minimum_calls`
were seen, like resilience4j/Polly). With `min_recovery_timeout` the open period
starts short and doubles after each failed probe up to `recovery_timeout`, so a
2-second blip costs seconds of degraded answers while a long outage is probed rarely.

All transitions are pure functions of a small record (`_Record`). The record lives in
this object (default: fast, lock-free reads on the hot path) or in a `Store` under the
breaker's `name`, so every process using the same name shares one circuit. The lock
covers state transitions only, never the protected call.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, ParamSpec, TypeVar

from . import _validate as _v
from .classify import Classifier, ErrorVerdict, make_classifier
from .clock import Clock, get_clock
from .errors import CircuitOpenError
from .events import EventBus, EventKind, Listener
from .probewait import PROBE_WAIT_CAP, Signal, WaitBudget
from .slowstart import SlowStart
from .stores.base import Store, shared_time
from .stores.redis_notify import notifier_for

__all__ = ["CircuitBreaker", "CircuitState"]

P = ParamSpec("P")
T = TypeVar("T")

# before_call() tickets: what the caller must report back.
ADMITTED_CLEAN = 0  # closed and clean when admitted: a success only reads (the fast path)
ADMITTED = 1  # closed, a success must be recorded (failures to reset / rate window)
PROBE = 2  # half-open probe: every ticket >= PROBE is one, carrying the probe's own id
RAMPED = -2  # closed, admitted by the slow-start ramp: its end frees a ramp slot
_REJECT = -1  # internal: not admitted
_RAMP_FULL = "ramp"  # internal state name: closed, but the slow-start ramp is full
# Shared breakers re-read the store while waiting: verdicts of other processes come by
# notification (Redis pub/sub) when the store has it, this is the safety net.
_POLL_NOTIFIED_S = 1.0
_POLL_SHARED_S = 0.1
_PROBE_ID_BITS = 52  # ids stay exact in JSON numbers (shared stores)
# internal state name: open, its period over, but a sibling on the same upstream is probing
# (upstream.py): wait for that verdict (it wakes this breaker's waiters) instead of probing
_HELD = "held"
_HELD_WAIT = 0.1  # the retry hint of a caller rejected while held (as for busy probe slots)
# a held caller whose probe-wait ran out has waited its turn, like a half-open waiter
_REJECTED_AS = {_RAMP_FULL: "slow_start", _HELD: "half_open"}


def _held(ticket: int, wait: float, state: str, held: bool) -> str:
    """`state`, or `_HELD` for a step `_t_admit` refused because a sibling is probing."""
    return _HELD if held and ticket < 0 and wait == 0.0 and state == _OPEN else state


def _new_probe_id() -> int:
    """A probe ticket unique across processes sharing a store (drawn outside the pure
    transition, which optimistic stores may run more than once)."""
    return PROBE + 1 + random.getrandbits(_PROBE_ID_BITS)


class CircuitState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


_CLOSED, _OPEN, _HALF = "closed", "open", "half_open"

logger = logging.getLogger("rag_resilience")
_bad_record_logged = False  # one warning per process: a bad value is re-read on every call


class _Record:
    """Breaker state; JSON round-trips for stores."""

    __slots__ = (
        "failing_since",
        "failures",
        "open_count",
        "open_until",
        "opened_at",
        "probes",
        "state",
        "successes",
        "window",
    )

    def __init__(self) -> None:
        self.state = _CLOSED
        self.failures = 0
        self.failing_since: float | None = None  # the first failure of the current run
        self.successes = 0
        self.opened_at = 0.0
        self.open_until = 0.0
        self.open_count = 0
        self.probes: list[list[float]] = []  # [probe id, expiry] of each probe in flight
        self.window: dict[str, list[int]] = {}  # bucket second -> [calls, failures]

    def to_json(self) -> dict[str, Any]:
        return {
            "s": self.state,
            "f": self.failures,
            "fs": self.failing_since,
            "ok": self.successes,
            "oa": self.opened_at,
            "ou": self.open_until,
            "oc": self.open_count,
            "p": self.probes,
            "w": self.window,
        }

    @classmethod
    def from_json(cls, data: Any) -> _Record:
        """The record stored as `data`; an unreadable one (wrong types, unknown state,
        non-finite times) is logged once and read as a fresh CLOSED record, which the
        next write replaces: a bad value never makes calls fail."""
        try:
            return cls._parse(data)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            global _bad_record_logged
            if not _bad_record_logged:
                _bad_record_logged = True
                logger.warning(
                    "circuit breaker record unreadable (%s: %s): %.200r; read as closed and "
                    "overwritten by the next write",
                    type(exc).__name__,
                    exc,
                    data,
                )
            return cls()

    @classmethod
    def _parse(cls, data: Any) -> _Record:
        rec = cls()
        if data is not None and not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        if isinstance(data, dict):
            rec.state = str(data.get("s", _CLOSED))
            rec.failures = int(data.get("f", 0))
            since = data.get("fs")
            rec.failing_since = None if since is None else float(since)
            rec.successes = int(data.get("ok", 0))
            rec.opened_at = float(data.get("oa", 0.0))
            rec.open_until = float(data.get("ou", 0.0))
            rec.open_count = int(data.get("oc", 0))
            rec.probes = [
                [float(PROBE), float(p)]
                if isinstance(p, (int, float))
                else [float(p[0]), float(p[1])]
                for p in data.get("p", [])
            ]
            rec.window = {str(k): [int(v[0]), int(v[1])] for k, v in data.get("w", {}).items()}
            if rec.state not in (_CLOSED, _OPEN, _HALF):
                raise ValueError(f"unknown state {rec.state!r}")
            if not all(map(math.isfinite, (rec.opened_at, rec.open_until))) or (
                rec.failing_since is not None and not math.isfinite(rec.failing_since)
            ):
                raise ValueError("non-finite open time")
        return rec


class CircuitBreaker:
    """Seed-compatible: ``CircuitBreaker(failure_threshold=3, recovery_timeout=5.0,
    expected_exception=ConnectionError)``, ``cb.call(fn, *args)``, ``cb.get_state()``.

    Only exceptions that are instances of `expected_exception` *and* that the
    classifier counts as upstream failures trip the breaker: a 400/401/404 says
    nothing about the upstream's health.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        recovery_timeout: float = 60.0,
        expected_exception: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        *,
        name: str | None = None,
        success_threshold: int = 1,
        half_open_max_calls: int = 1,
        mode: str = "consecutive",
        failure_rate_threshold: float = 0.5,
        minimum_calls: int = 10,
        window_seconds: float = 60.0,
        min_recovery_timeout: float | None = None,
        open_from: str = "trip",
        probe_timeout: float = 60.0,
        probe_wait: float | None = None,
        slow_start: SlowStart | None = None,
        classifier: Classifier | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        listeners: list[Listener] | None = None,
    ) -> None:
        _v.integer("failure_threshold", failure_threshold, 1)
        _v.positive("recovery_timeout", recovery_timeout)
        _v.integer("success_threshold", success_threshold, 1)
        _v.integer("half_open_max_calls", half_open_max_calls, 1)
        if half_open_max_calls < 1 or success_threshold < 1:  # pragma: no cover - checked above
            raise ValueError("invalid probe settings")
        if mode not in ("consecutive", "rate"):
            raise ValueError(f"mode must be 'consecutive' or 'rate', got {mode!r}")
        _v.in_range("failure_rate_threshold", failure_rate_threshold, 0, 1, low_open=True)
        _v.integer("minimum_calls", minimum_calls, 1)
        _v.positive("window_seconds", window_seconds)
        _v.positive("min_recovery_timeout", min_recovery_timeout, none_ok=True)
        if min_recovery_timeout is not None and not 0 < min_recovery_timeout <= recovery_timeout:
            raise ValueError(
                f"min_recovery_timeout must be in (0, recovery_timeout={recovery_timeout}], "
                f"got {min_recovery_timeout}"
            )
        if open_from not in ("trip", "first_failure"):
            raise ValueError(f"open_from must be 'trip' or 'first_failure', got {open_from!r}")
        _v.positive("probe_timeout", probe_timeout)
        if probe_wait is not None and not 0 <= probe_wait <= probe_timeout:
            raise ValueError(
                f"probe_wait must be in [0, probe_timeout={probe_timeout}] seconds or None, "
                f"got {probe_wait!r}"
            )
        self.failure_threshold = failure_threshold
        self.recovery_timeout = float(recovery_timeout)
        self.expected_exception = expected_exception
        self.name = name or f"breaker-{id(self):x}"
        self.success_threshold = success_threshold
        self.half_open_max_calls = half_open_max_calls
        self.mode = mode
        self.failure_rate_threshold = failure_rate_threshold
        self.minimum_calls = minimum_calls
        self.window_seconds = float(window_seconds)
        self.min_recovery_timeout = min_recovery_timeout
        #: when the first open period starts: at the trip, or ("first_failure", the presets)
        #: at the first failure of the run that tripped it (consecutive mode), see `_t_failure`
        self.open_from = open_from
        self.probe_timeout = probe_timeout
        #: how long `admit` waits for a probe in flight (0: reject at once, as `before_call`)
        self.probe_wait = (
            float(probe_wait) if probe_wait is not None else min(probe_timeout, PROBE_WAIT_CAP)
        )
        self.slow_start = slow_start
        #: published on every probe report and state change: what probe-waiters wait on
        self.verdicts = Signal()
        self.classify: Callable[[BaseException], ErrorVerdict] = make_classifier(classifier)
        self.clock = clock
        self.events = EventBus(listeners)
        self.store = store
        self.key = f"rag_resilience:{self.name}:breaker"
        self._lock = threading.Lock()
        self._rec = _Record()
        # True while a call needs no bookkeeping here at all: a local breaker, CLOSED, no
        # failure counted, consecutive mode. Then `before_call` admits without a write and
        # `on_success` has nothing to reset, so drivers read this flag (on every call)
        # instead of calling both. `_apply` keeps it current under the lock.
        self.quiet: bool = store is None and mode == "consecutive"
        self._state_listeners: list[Callable[[CircuitState, CircuitState], None]] = []
        self.rejected = 0  # calls refused while open (local count)
        self.waited = 0  # calls that waited for a probe's verdict or the ramp (local count)
        self.upstream: Any = None  # the UpstreamGroup this breaker joined (upstream.py)
        self._notifier = notifier_for(store, self.key, self._remote_verdict)
        self._poll_s = (
            None
            if store is None or not store.shared
            else _POLL_NOTIFIED_S
            if self._notifier is not None
            else _POLL_SHARED_S
        )
        if slow_start is not None:
            slow_start.on_done = self._refresh_quiet

    # -- time ---------------------------------------------------------------------------
    def _now(self) -> float:
        clock = get_clock(self.clock)
        # Shared state must use one wall clock: monotonic clocks differ between processes,
        # and hosts' wall clocks drift (the store's own clock when it has one).
        return shared_time(self.store, clock) if self.store is not None else clock.monotonic()

    def _capped(self, rec: _Record, now: float) -> _Record:
        """No open period longer than recovery_timeout from `now`: a record written by a
        host whose clock ran ahead (or read after this clock stepped back) would otherwise
        keep the circuit open for the skew. The next write stores the capped value."""
        if rec.state == _OPEN and rec.open_until - now > self.recovery_timeout:
            rec.open_until = now + self.recovery_timeout
        return rec

    # -- record access (one place decides local vs store) -------------------------------
    def _apply(self, fn: Callable[[_Record, float], Any]) -> tuple[Any, str, str]:
        now = self._now()
        if self.store is None:
            with self._lock:
                rec = self._rec
                old = rec.state
                result = fn(rec, now)
                self.quiet = self._quiet(rec)
                return result, old, rec.state

        def update(data: Any) -> tuple[Any, tuple[Any, str, str]]:
            rec = self._capped(_Record.from_json(data), now)
            old = rec.state
            result = fn(rec, now)
            return rec.to_json(), (result, old, rec.state)

        out: tuple[Any, str, str] = self.store.update(self.key, update)
        return out

    async def _aapply(self, fn: Callable[[_Record, float], Any]) -> tuple[Any, str, str]:
        if self.store is None:
            return self._apply(fn)
        now = self._now()

        def update(data: Any) -> tuple[Any, tuple[Any, str, str]]:
            rec = self._capped(_Record.from_json(data), now)
            old = rec.state
            result = fn(rec, now)
            return rec.to_json(), (result, old, rec.state)

        out: tuple[Any, str, str] = await self.store.aupdate(self.key, update)
        return out

    def _quiet(self, rec: _Record) -> bool:
        ramp = self.slow_start
        return (
            rec.state == _CLOSED
            and not rec.failures
            and self.mode != "rate"
            and (ramp is None or not ramp.active)
        )

    def _refresh_quiet(self) -> None:
        if self.store is None:
            with self._lock:
                self.quiet = self._quiet(self._rec)

    def _snapshot(self) -> _Record:
        if self.store is None:
            return self._rec
        return _Record.from_json(self.store.get(self.key))

    # -- transitions (pure: record + now in, record mutated) ----------------------------
    def _open_period(self, open_count: int) -> float:
        if self.min_recovery_timeout is None:
            return self.recovery_timeout
        return min(self.recovery_timeout, self.min_recovery_timeout * 2.0 ** max(0, open_count - 1))

    def _trip(self, rec: _Record, now: float) -> None:
        rec.state = _OPEN
        rec.open_count += 1
        rec.opened_at = now
        rec.open_until = now + self._open_period(rec.open_count)
        rec.successes = 0
        rec.probes = []

    def _schedule_from(self, rec: _Record, start: float, now: float) -> None:
        """`open_from="first_failure"`: a circuit that just opened (`_trip`) at `now` on
        failures that began at `start` probes on the schedule it would have had opening at
        `start` (open periods doubling from the trip's), skipping the probe times already
        past: the failing attempts of that time said what those probes would have said.

        Why: the threshold decides whether to open; how long the upstream has been seen
        down decides when to look again. A crowd reaches 20 failed attempts
        (count="calls") 0.2-0.3 s into a scaled outage, later under load: timed from the
        trip, every probe came that much later (benchmarks/chaos.py outage: the first live
        answer 0.65 s after recovery instead of 0.45 s), and a trip past the first probe
        time still probed twice in a 1 s outage (the zero-upstream share fell under 95%).
        At most one period is credited (a run longer than that counts as one failed probe)."""
        count = rec.open_count
        # credit at most one open period: a lone caller whose failed calls spread over 30 s
        # is not told to wait out the 30 s schedule (its next probe: one period later)
        start = max(start, now - self._open_period(count))
        until = start + self._open_period(count)
        while until <= now:
            period = self._open_period(count + 1)
            if period >= self.recovery_timeout:  # periods stopped doubling: jump
                skip = math.floor((now - until) / period) + 1
                count, until = count + skip, until + skip * period
                break
            count, until = count + 1, until + period
        rec.open_count = count
        rec.open_until = until

    def _close(self, rec: _Record) -> None:
        rec.state = _CLOSED
        rec.failures = 0
        rec.failing_since = None
        rec.successes = 0
        rec.open_count = 0
        rec.probes = []
        rec.window = {}

    def _t_admit(
        self, rec: _Record, now: float, probe_id: int, held: bool = False
    ) -> tuple[int, float]:
        """`held`: a sibling on the same upstream has its probe in flight (upstream.py):
        an open circuit whose period ended waits for that verdict instead of probing too
        (returned as a rejection with no wait, which `_held` recognises)."""
        if rec.state == _OPEN:
            if now < rec.open_until:
                return -1, rec.open_until - now
            if held:
                return -1, 0.0
            rec.state = _HALF
            rec.successes = 0
            rec.probes = []
        if rec.state == _HALF:
            rec.probes = [p for p in rec.probes if p[1] > now]
            if len(rec.probes) >= self.half_open_max_calls:
                # Every probe slot is busy: hint at a short wait (a probe's verdict usually
                # comes within seconds), never 0, which invites a tight retry loop.
                earliest = min(p[1] for p in rec.probes) - now
                return -1, max(0.1, min(1.0, earliest))
            rec.probes.append([float(probe_id), now + self.probe_timeout])
            return probe_id, 0.0
        if self.mode == "rate" or rec.failures:
            return ADMITTED, 0.0
        return ADMITTED_CLEAN, 0.0

    def _probe_sent(self, rec: _Record, ticket: int) -> float | None:
        """When probe `ticket` was admitted (None: not in flight in this round)."""
        for probe_id, expiry in rec.probes:
            if probe_id == ticket:
                return expiry - self.probe_timeout
        return None

    def _release_probe(self, rec: _Record, ticket: int) -> bool:
        """Free the slot of probe `ticket`; False if it is not in flight in this round.

        A probe that timed out (its slot was reused) or belongs to an earlier half-open
        round reports stale news: it must neither free a live probe's slot (that would
        let more than `half_open_max_calls` probes run) nor count toward closing.
        """
        for i, (probe_id, _) in enumerate(rec.probes):
            if probe_id == ticket or ticket == PROBE:  # bare PROBE: legacy, any slot
                del rec.probes[i]
                return True
        return False

    def _t_success(self, rec: _Record, now: float, ticket: int) -> None:
        if ticket >= PROBE:
            if rec.state != _HALF or not self._release_probe(rec, ticket):
                return
            rec.successes += 1
            if rec.successes >= self.success_threshold:
                self._close(rec)
            return
        if rec.state != _CLOSED:
            return
        rec.failures = 0
        if self.mode == "rate":
            self._record_window(rec, now, failed=False)

    def _t_failure(self, rec: _Record, now: float, ticket: int, pooled: int = 0) -> None:
        """`pooled`: failures counted by siblings on the same upstream (upstream.py)."""
        if ticket >= PROBE:
            sent = self._probe_sent(rec, ticket)
            if rec.state == _HALF and self._release_probe(rec, ticket):
                self._trip(rec, now)
                if self.open_from == "first_failure" and sent is not None:
                    # from the probe's send: the schedule does not drift by each failed
                    # probe's round trip (or its timeout)
                    self._schedule_from(rec, sent, now)
            return
        if rec.state != _CLOSED:
            return
        if not rec.failures or rec.failing_since is None:
            rec.failing_since = now
        rec.failures += 1
        if self.mode == "consecutive":
            if rec.failures + pooled >= self.failure_threshold:
                since = rec.failing_since
                self._trip(rec, now)
                if self.open_from == "first_failure" and since is not None:
                    self._schedule_from(rec, since, now)
            return
        calls, failures = self._record_window(rec, now, failed=True)
        if calls >= self.minimum_calls and failures / calls >= self.failure_rate_threshold:
            self._trip(rec, now)

    def _t_ignored(self, rec: _Record, now: float, ticket: int) -> None:
        if ticket >= PROBE and rec.state == _HALF:
            self._release_probe(rec, ticket)

    def _record_window(self, rec: _Record, now: float, *, failed: bool) -> tuple[int, int]:
        second = int(now)
        # whole-second buckets: a window under 1 s (or a fraction) still spans >= 1 bucket,
        # else every call evicted the current bucket and the rate never reached minimum_calls
        oldest = second - max(1, math.ceil(self.window_seconds)) + 1
        window = rec.window
        for key in [k for k in window if int(k) < oldest]:
            del window[key]
        bucket = window.setdefault(str(second), [0, 0])
        bucket[0] += 1
        if failed:
            bucket[1] += 1
        return sum(b[0] for b in window.values()), sum(b[1] for b in window.values())

    # -- the protocol the policy drives -------------------------------------------------
    def before_call(self) -> int:
        """Admit a call or raise CircuitOpenError. Returns a ticket for the outcome report."""
        # Hot path: CLOSED needs no write. Locally that is a plain attribute read (no
        # lock); with a store it is one read, so a shared breaker costs one round trip.
        rec = self._rec if self.store is None else _Record.from_json(self.store.get(self.key))
        if rec.state == _CLOSED:
            return ADMITTED if (rec.failures or self.mode == "rate") else ADMITTED_CLEAN
        probe_id, held = _new_probe_id(), self._sibling_probing()
        (ticket, wait), old, new = self._apply(lambda r, now: self._t_admit(r, now, probe_id, held))
        return self._admitted(ticket, max(wait, _HELD_WAIT) if held else wait, old, new)

    async def abefore_call(self) -> int:
        if self.store is None:
            return self.before_call()
        rec = _Record.from_json(await self.store.aget(self.key))
        if rec.state == _CLOSED:
            return ADMITTED if (rec.failures or self.mode == "rate") else ADMITTED_CLEAN
        probe_id, held = _new_probe_id(), self._sibling_probing()
        (ticket, wait), old, new = await self._aapply(
            lambda r, now: self._t_admit(r, now, probe_id, held)
        )
        return self._admitted(ticket, max(wait, _HELD_WAIT) if held else wait, old, new)

    def _admitted(self, ticket: int, wait: float, old: str, new: str) -> int:
        if old != new:
            self._transition(old, new)
        if ticket < 0:
            self._reject(wait, new)
        return ticket

    def _reject(self, wait: float, state: str) -> None:
        with self._lock:  # `+=` on an attribute is not atomic across threads
            self.rejected += 1
        self.events.publish(EventKind.REJECTED, self.name, reason="circuit_open", delay=wait)
        raise CircuitOpenError(self.name, wait, state)

    # -- admission with probe-wait and slow start (what the policy drives) ---------------
    def _ramped(self, ticket: int, state: str) -> tuple[int, str]:
        """A closed admission through the slow-start ramp, if one is on."""
        ramp = self.slow_start
        if ramp is None or ticket >= PROBE:
            return ticket, state
        took = ramp.try_take()
        if took is None:
            return ticket, state
        return (RAMPED, state) if took else (_REJECT, _RAMP_FULL)

    def _read(self, data: Any) -> tuple[int, float, str] | None:
        """The closed fast case of a step from the record's raw data (None: not closed)."""
        rec = self._rec if self.store is None else _Record.from_json(data)
        if rec.state != _CLOSED:
            return None
        ticket = ADMITTED if (rec.failures or self.mode == "rate") else ADMITTED_CLEAN
        ticket, state = self._ramped(ticket, _CLOSED)
        return ticket, 0.0, state

    def _admit_result(self, ticket: int, wait: float, old: str, new: str) -> tuple[int, float, str]:
        if new == _HELD:  # the record stayed open: no transition
            return ticket, _HELD_WAIT, new
        if old != new:
            self._transition(old, new)
        if ticket < 0:
            return ticket, wait, new
        ticket, state = self._ramped(ticket, new)
        return ticket, wait, state

    def _step(self) -> tuple[int, float, str]:
        """One admission attempt: (ticket or _REJECT, retry_after, state)."""
        closed = self._read(None if self.store is None else self.store.get(self.key))
        if closed is not None:
            return closed
        probe_id, held = _new_probe_id(), self._sibling_probing()
        (ticket, wait), old, new = self._apply(lambda r, now: self._t_admit(r, now, probe_id, held))
        return self._admit_result(ticket, wait, old, _held(ticket, wait, new, held))

    async def _astep(self) -> tuple[int, float, str]:
        if self.store is None:
            return self._step()
        closed = self._read(await self.store.aget(self.key))
        if closed is not None:
            return closed
        probe_id, held = _new_probe_id(), self._sibling_probing()
        (ticket, wait), old, new = await self._aapply(
            lambda r, now: self._t_admit(r, now, probe_id, held)
        )
        return self._admit_result(ticket, wait, old, _held(ticket, wait, new, held))

    def _wait_plan(self, state: str, budgets: list[WaitBudget | None]) -> float:
        """After a rejected step: how long to wait now (0: reject). `budgets` holds the
        caller's [probe-wait, ramp-wait] budgets, made at its first wait of each kind.

        A probe in flight (half-open): wait for its report within `probe_wait` and the
        caller's deadline. A full ramp: wait for a ramped call to end, within the caller's
        deadline (or `probe_timeout` without one): the ramp drains in round trips. Open:
        never here (see `wait_recovery`). `probe_wait=0` turns the probe wait off, not the ramp's.
        """
        ramp = state == _RAMP_FULL
        if state == _OPEN or (self.probe_wait <= 0 and not ramp):
            return 0.0  # (_HELD waits like half-open: the sibling's verdict wakes us)
        budget = budgets[ramp]
        if budget is None:
            budget = budgets[ramp] = WaitBudget(self.probe_timeout if ramp else self.probe_wait)
            if budgets[not ramp] is None:
                with self._lock:
                    self.waited += 1
        left = budget.left()
        if self._poll_s is not None:
            left = min(left, self._poll_s)
        return left

    def _signal(self, state: str) -> Signal:
        ramp = self.slow_start
        return ramp.signal if state == _RAMP_FULL and ramp is not None else self.verdicts

    def _epochs(self) -> tuple[int, int]:
        ramp = self.slow_start
        return self.verdicts.epoch, (ramp.signal.epoch if ramp is not None else 0)

    def admit(self) -> int:
        """`before_call` that waits instead of rejecting while a half-open probe is in
        flight (for its verdict: closed -> admitted live, open again -> CircuitOpenError at
        once) or while the slow-start ramp is full, each within `probe_wait` and the
        caller's deadline (`rag_resilience.deadline`). Open: CircuitOpenError at once."""
        if self.quiet:  # closed and clean, no ramp: nothing to check (the hot path)
            return ADMITTED_CLEAN
        budgets: list[WaitBudget | None] = [None, None]
        waited: tuple[float, str] | None = None  # (since, on what): set once a wait began
        while True:
            epochs = self._epochs()
            ticket, retry_after, state = self._step()
            if ticket != _REJECT:
                if waited is not None:
                    self._probe_waited(waited, "admitted")
                return ticket
            left = self._wait_plan(state, budgets)
            if left <= 0:
                if waited is not None:
                    self._probe_waited(waited, "rejected")
                self._reject(retry_after, _REJECTED_AS.get(state, state))
            waited = waited or (time.monotonic(), state)
            self._signal(state).wait(epochs[state == _RAMP_FULL], left)

    async def aadmit(self) -> int:
        """Async `admit`: waiters park on futures, never blocking the event loop."""
        if self.quiet:
            return ADMITTED_CLEAN
        budgets: list[WaitBudget | None] = [None, None]
        waited: tuple[float, str] | None = None
        while True:
            epochs = self._epochs()
            ticket, retry_after, state = await self._astep()
            if ticket != _REJECT:
                if waited is not None:
                    self._probe_waited(waited, "admitted")
                return ticket
            left = self._wait_plan(state, budgets)
            if left <= 0:
                if waited is not None:
                    self._probe_waited(waited, "rejected")
                self._reject(retry_after, _REJECTED_AS.get(state, state))
            waited = waited or (time.monotonic(), state)
            await self._signal(state).await_(epochs[state == _RAMP_FULL], left)

    def _probe_waited(self, waited: tuple[float, str], outcome: str) -> None:
        """Publish `EventKind.PROBE_WAIT`: how long (real seconds, as `WaitBudget` counts)
        a caller waited for a probe's verdict (or a slow-start slot), and its `outcome`
        (``admitted`` or ``rejected``, in `reason`)."""
        since, state = waited
        on = "slow_start" if state == _RAMP_FULL else "probe"
        self.events.publish(
            EventKind.PROBE_WAIT,
            self.name,
            duration=max(0.0, time.monotonic() - since),
            reason=outcome,
            extra={"waited_for": on},
        )

    def _recovery_wait(self, patience: float) -> float | None:
        """For a caller with nothing to degrade to and `patience` seconds left: the sleep
        (on the clock) until the next probe is admitted, or None when it comes too late."""
        wait = self.retry_after()
        if patience <= 0 or wait > patience:
            return None
        with self._lock:
            self.waited += 1
        return wait

    def wait_recovery(self, patience: float) -> bool:
        """Nothing to degrade to: sleep until the circuit admits its next probe, if that
        is within `patience` seconds. True: try `admit` again (which then waits for the
        probe's verdict); False: too late, serve the rejection."""
        wait = self._recovery_wait(patience)
        if wait is None:
            return False
        get_clock(self.clock).sleep(wait)
        self._recovery_waited(wait)
        return True

    async def await_recovery(self, patience: float) -> bool:
        wait = self._recovery_wait(patience)
        if wait is None:
            return False
        await get_clock(self.clock).asleep(wait)
        self._recovery_waited(wait)
        return True

    def _recovery_waited(self, wait: float) -> None:
        """`EventKind.PROBE_WAIT` for a caller that slept until the next probe was due."""
        self.events.publish(
            EventKind.PROBE_WAIT,
            self.name,
            duration=wait,
            reason="next_probe_due",
            extra={"waited_for": "next_probe"},
        )

    def on_success(self, ticket: int = ADMITTED) -> None:
        """Report a successful call admitted with `ticket`.

        A call admitted while the count was clean must still report: failures of other
        calls may have been counted while it was in flight, and its success breaks their
        run (they are no longer consecutive). The check is a plain read; no write unless
        there is something to reset. With a store that read would be a second round trip
        per call, so a shared breaker skips it: a success racing other processes' failures
        may then leave their run unbroken (the circuit can trip a little early, never late).
        """
        if ticket == ADMITTED_CLEAN:
            if self.store is not None:
                return
            rec = self._rec  # `_needs_reset`, inlined: this runs on every call
            if rec.state != _CLOSED or not (rec.failures or self.mode == "rate"):
                return
            ticket = ADMITTED
        elif ticket == RAMPED:
            ticket = self._unramp()
        _, old, new = self._apply(lambda rec, now: self._t_success(rec, now, ticket))
        self._reported(ticket, old, new)

    async def aon_success(self, ticket: int = ADMITTED) -> None:
        if ticket == ADMITTED_CLEAN:
            if self.store is not None or not self._needs_reset(self._rec):
                return  # see on_success: one round trip per call for shared breakers
            ticket = ADMITTED
        elif ticket == RAMPED:
            ticket = self._unramp()
        _, old, new = await self._aapply(lambda rec, now: self._t_success(rec, now, ticket))
        self._reported(ticket, old, new)

    def _unramp(self) -> int:
        """A ramped call ended: free its ramp slot; report it as a plain admitted call."""
        if self.slow_start is not None:
            self.slow_start.give()
        return ADMITTED

    def _reported(self, ticket: int, old: str, new: str) -> None:
        if old != new:
            self._transition(old, new)
        elif ticket >= PROBE:  # a probe slot freed: a waiter may take it
            self._wake(new)

    def _wake(self, state: str) -> None:
        """Tell probe-waiters here, and in other processes sharing the store."""
        self.verdicts.publish()
        if self._notifier is not None:
            self._notifier.publish(self.key, state)

    def _remote_verdict(self, state: str) -> None:
        """Another process's probe reported (from `stores.redis_notify`)."""
        if self.slow_start is not None:
            if state == _CLOSED:
                self.slow_start.begin()
            elif state == _OPEN:
                self.slow_start.stop()
        self.verdicts.publish()

    def _needs_reset(self, rec: _Record) -> bool:
        return rec.state == _CLOSED and (rec.failures > 0 or self.mode == "rate")

    def counts_as_failure(self, exc: BaseException, verdict: ErrorVerdict | None = None) -> bool:
        if not isinstance(exc, self.expected_exception):
            return False
        return (verdict or self.classify(exc)).is_failure

    def on_failure(
        self, exc: BaseException, ticket: int = ADMITTED, verdict: ErrorVerdict | None = None
    ) -> None:
        """Report a failed call; errors that say nothing about upstream health are ignored."""
        if ticket == RAMPED:
            ticket = self._unramp()
        if self.counts_as_failure(exc, verdict):
            group = self.upstream
            if group is None or ticket >= PROBE or self.mode != "consecutive":
                _, old, new = self._apply(lambda rec, now: self._t_failure(rec, now, ticket))
            else:  # one outage signal per upstream: siblings' failures count too
                with group.failure_lock:
                    pooled = group.sibling_failures(self)
                    _, old, new = self._apply(
                        lambda rec, now: self._t_failure(rec, now, ticket, pooled)
                    )
                    group.failed(self)
        elif ticket >= PROBE:
            _, old, new = self._apply(lambda rec, now: self._t_ignored(rec, now, ticket))
        else:
            return
        self._reported(ticket, old, new)

    async def aon_failure(
        self, exc: BaseException, ticket: int = ADMITTED, verdict: ErrorVerdict | None = None
    ) -> None:
        if self.store is None:
            self.on_failure(exc, ticket, verdict)
            return
        if ticket == RAMPED:
            ticket = self._unramp()
        if self.counts_as_failure(exc, verdict):
            # siblings' failures read without the group's lock (it is not held across an await)
            group, pooled = self.upstream, 0
            if group is not None and ticket < PROBE and self.mode == "consecutive":
                pooled = group.sibling_failures(self)
            _, old, new = await self._aapply(
                lambda rec, now: self._t_failure(rec, now, ticket, pooled)
            )
            if group is not None and ticket < PROBE:
                group.failed(self)
        elif ticket >= PROBE:
            _, old, new = await self._aapply(lambda rec, now: self._t_ignored(rec, now, ticket))
        else:
            return
        self._reported(ticket, old, new)

    def _transition(self, old: str, new: str) -> None:
        ramp = self.slow_start
        if ramp is not None:
            if new == _CLOSED:
                ramp.begin()
                self._refresh_quiet()
            else:
                ramp.stop()
        self._wake(new)
        self.events.publish(EventKind.STATE_CHANGE, self.name, old_state=old, new_state=new)
        old_s, new_s = CircuitState(old), CircuitState(new)
        for listener in list(self._state_listeners):
            try:
                listener(old_s, new_s)
            except Exception:  # pragma: no cover - listener bugs never break calls
                import logging

                logging.getLogger("rag_resilience").exception("state listener raised")

    # -- user-facing API ----------------------------------------------------------------
    def on_abandon(self, ticket: int) -> None:
        """A call admitted with `ticket` ended with no verdict (cancelled, interrupted, a
        stream closed early): free its probe slot now rather than at `probe_timeout`."""
        if ticket == RAMPED:
            self._unramp()
        elif ticket >= PROBE:
            _, old, new = self._apply(lambda rec, now: self._t_ignored(rec, now, ticket))
            self._reported(ticket, old, new)

    async def aon_abandon(self, ticket: int) -> None:
        if ticket == RAMPED:
            self._unramp()
        elif ticket >= PROBE:
            _, old, new = await self._aapply(lambda rec, now: self._t_ignored(rec, now, ticket))
            self._reported(ticket, old, new)

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `func` through the breaker (waiting for a probe in flight, see `admit`)."""
        ticket = self.admit()
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            self.on_failure(exc, ticket)
            raise
        except BaseException:
            self.on_abandon(ticket)  # cancelled/interrupted probe: free the slot
            raise
        self.on_success(ticket)
        return result

    async def acall(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Async twin of `call`."""
        ticket = await self.aadmit()
        try:
            result = await func(*args, **kwargs)
        except Exception as exc:
            await self.aon_failure(exc, ticket)
            raise
        except BaseException:
            await self.aon_abandon(ticket)
            raise
        await self.aon_success(ticket)
        return result

    def __call__(self, func: Callable[P, T]) -> Callable[P, T]:
        """Decorator use: ``@breaker`` on a sync or async function."""
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.acall(func, *args, **kwargs)  # type: ignore[arg-type]

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.call(func, *args, **kwargs)

        return wrapper

    def get_state(self) -> CircuitState:
        """Current state; an OPEN circuit whose wait is over reads as HALF_OPEN."""
        rec = self._snapshot()
        if rec.state == _OPEN and self._now() >= rec.open_until:
            return CircuitState.HALF_OPEN
        return CircuitState(rec.state)

    @property
    def state(self) -> CircuitState:
        return self.get_state()

    @property
    def failure_count(self) -> int:
        return self._snapshot().failures

    def retry_after(self) -> float:
        """Seconds until a probe is admitted (0 when closed or half-open)."""
        rec = self._snapshot()
        if rec.state != _OPEN:
            return 0.0
        return max(0.0, min(rec.open_until - self._now(), self.recovery_timeout))

    def add_state_listener(self, listener: Callable[[CircuitState, CircuitState], None]) -> None:
        """Call `listener(old, new)` on every transition seen by this instance."""
        self._state_listeners.append(listener)

    def reset(self) -> None:
        """Force CLOSED and clear counters."""
        _, old, new = self._apply(lambda rec, now: self._close(rec))
        if old != new:
            self._transition(old, new)

    # -- one outage signal per upstream (upstream.py drives these) ---------------------------
    def _t_follow(self, rec: _Record, now: float, period: float, open_count: int) -> None:
        if rec.state == _OPEN:
            rec.open_until = max(rec.open_until, now + period)  # probe after the leader
        elif rec.state == _CLOSED and rec.failures and period > 0:
            self._trip(rec, now)  # failing too, since its last success: open together
            rec.open_until = now + period
        else:
            return
        # one schedule per upstream: whichever member probes next, its failure doubles the
        # period as the leader's would (else it depended on which wrapper probed)
        rec.open_count = max(rec.open_count, open_count)

    def local_now(self) -> float:
        """This process's reading of the breaker's clock (never the store's shared time)."""
        return get_clock(self.clock).monotonic()

    def open_count(self) -> int:
        """Times opened since the circuit last closed: for upstream.py."""
        return self._snapshot().open_count

    def first_open_period(self) -> float:
        return self._open_period(1)

    def _sibling_probing(self) -> bool:
        group = self.upstream
        return group is not None and group.sibling_probing(self)

    def probing(self) -> bool:
        """A half-open probe is in flight: for upstream.py."""
        rec = self._snapshot()
        if rec.state != _HALF:
            return False
        now = self._now()
        return any(p[1] > now for p in rec.probes)

    def closed_failures(self) -> int:
        """Failures counted while closed (0 when open or half-open): for upstream.py."""
        rec = self._snapshot()
        return rec.failures if rec.state == _CLOSED else 0

    def follow(self, period: float, open_count: int = 0) -> None:
        """A sibling on the same upstream opened (its `open_count`-th time in a row) for
        `period` seconds: follow it (see upstream.py)."""
        _, old, new = self._apply(lambda rec, now: self._t_follow(rec, now, period, open_count))
        if old != new:
            self._transition(old, new)
        else:
            self._wake(new)  # callers held for the sibling's probe: its verdict is in

    def probe_now(self) -> None:
        """A sibling's probe succeeded: if open, admit a probe at once."""

        def fn(rec: _Record, now: float) -> None:
            if rec.state == _OPEN:
                rec.open_until = min(rec.open_until, now)

        self._apply(fn)
        self._wake(self._snapshot().state)

    def force_open(self) -> None:
        """Force OPEN now (e.g. a known maintenance window)."""
        _, old, new = self._apply(self._trip)
        if old != new:
            self._transition(old, new)

    def stats(self) -> dict[str, Any]:
        rec = self._snapshot()
        return {
            "name": self.name,
            "state": self.get_state().value,
            "failures": rec.failures,
            "open_count": rec.open_count,
            "retry_after_s": self.retry_after(),
            "probes_in_flight": len(rec.probes),
            "rejected": self.rejected,
            "waited": self.waited,
            "slow_start": self.slow_start.stats() if self.slow_start is not None else None,
            "shared": bool(self.store is not None and self.store.shared),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "failure_threshold": self.failure_threshold,
            "failure_rate_threshold": self.failure_rate_threshold if self.mode == "rate" else None,
            "minimum_calls": self.minimum_calls if self.mode == "rate" else None,
            "window_seconds": self.window_seconds if self.mode == "rate" else None,
            "recovery_timeout": self.recovery_timeout,
            "min_recovery_timeout": self.min_recovery_timeout,
            "open_from": self.open_from,
            "success_threshold": self.success_threshold,
            "half_open_max_calls": self.half_open_max_calls,
            "probe_wait": self.probe_wait,
            "slow_start": self.slow_start.limit if self.slow_start is not None else None,
            "store": type(self.store).__name__ if self.store is not None else "local",
        }

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(name={self.name!r}, state={self.get_state().value!r}, "
            f"failure_threshold={self.failure_threshold}, recovery_timeout={self.recovery_timeout})"
        )
