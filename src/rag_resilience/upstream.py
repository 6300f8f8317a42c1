"""One outage signal per upstream: breakers of wrappers that call the same host share
what they learn.

Each wrapper keeps its own breaker (one endpoint failing alone, e.g. chat overloaded while
embeddings work, opens only that one), and joins the group of its upstream (`upstream=`,
default: the host of the wrapped model's or client's base URL). The group links them:

* counts together: a member's consecutive failures add up with those of the members that
  are failing too (failures counted, no success since), so the host trips after
  `failure_threshold` failures across its wrappers, as one breaker guarding them all would
  (benchmarks/chaos.py outage: the LangChain/LlamaIndex chat breaker opened ~45 ms later
  than ResilientOpenAIClient's, having seen only the chat share of the failing attempts);
  a member that succeeds has 0 failures, so an endpoint failing alone still counts alone;
* opens together: when a member trips, every member that has failures counted and no
  success since (it is failing too) opens with it, following the one that tripped;
* probes together: while several members are open, only the leader probes; a failed probe
  pushes the followers' open periods past the leader's next probe, so the dead host gets
  one probe per recovery period, not one per wrapper; a member whose period ends while a
  sibling's probe is in flight does not probe too: its callers wait for that verdict like
  probe-waiters (benchmarks/chaos.py outage: without this the chat and the embeddings
  wrapper sometimes probed 3 ms apart when the leader's probe came late);
* closes together: when any member's probe succeeds, every open member may probe at once
  (its open period ends now), so a recovered host is used again by every wrapper.

Groups live in this process (a registry keyed by upstream name, holding breakers weakly);
with a shared store the members' records are shared as usual.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .breaker import CircuitBreaker

__all__ = ["UpstreamGroup", "join_upstream", "upstream_of"]

_STAGGER_S = 0.001  # followers' probe comes after the leader's


class UpstreamGroup:
    """The breakers of one upstream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._members: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._busy = threading.local()  # re-entrancy guard: our own force-opens notify us
        # held while a member counts a failure: two members failing at once each see the
        # other's count (else both could read a stale sum and neither trip)
        self.failure_lock = threading.Lock()
        self._seq = 0  # failures counted in this group, for `sibling_failures`
        self._joined: weakref.WeakKeyDictionary[CircuitBreaker, int] = weakref.WeakKeyDictionary()
        self._last_failure: weakref.WeakKeyDictionary[CircuitBreaker, tuple[int, float]] = (
            weakref.WeakKeyDictionary()
        )

    def add(self, breaker: CircuitBreaker) -> None:
        with self._lock:
            if breaker in self._members:
                return
            self._members.add(breaker)
            self._joined[breaker] = self._seq
        breaker.upstream = self
        ref = weakref.ref(breaker)

        def changed(old: Any, new: Any) -> None:
            self._changed(ref, new)

        breaker.add_state_listener(changed)

    def members(self) -> list[CircuitBreaker]:
        with self._lock:
            return list(self._members)

    def sibling_failures(self, breaker: CircuitBreaker) -> int:
        """Consecutive failures counted by the other closed members that are failing now:
        0 for one that succeeded since its last failure, and nothing from one whose last
        failure came before `breaker` joined or more than one first open period ago (a
        wrapper of yesterday's outage, or one built per request and dropped, says nothing
        about this one)."""
        joined = self._joined.get(breaker, 0)
        now = breaker.local_now()
        window = breaker.first_open_period()
        total = 0
        for member in self.members():
            if member is breaker or member.mode != "consecutive":
                continue
            seq, at = self._last_failure.get(member, (0, 0.0))
            if seq > joined and now - at <= window:
                total += member.closed_failures()
        return total

    def failed(self, breaker: CircuitBreaker) -> None:
        """`breaker` counted a failure (its clock's time): see `sibling_failures`."""
        with self._lock:
            self._seq += 1
            self._last_failure[breaker] = (self._seq, breaker.local_now())

    def sibling_probing(self, breaker: CircuitBreaker) -> bool:
        """Another member has a half-open probe in flight."""
        return any(m.probing() for m in self.members() if m is not breaker)

    def _changed(self, ref: weakref.ReferenceType[CircuitBreaker], new: Any) -> None:
        leader = ref()
        if leader is None or getattr(self._busy, "on", False):
            return
        self._busy.on = True
        try:
            state = new.value
            others = [m for m in self.members() if m is not leader]
            if state == "open":
                # seconds, not a time: members may read different clocks (local/shared)
                period, count = leader.retry_after() + _STAGGER_S, leader.open_count()
                for member in others:
                    member.follow(period, count)
            elif state == "closed":
                for member in others:
                    member.probe_now()
        finally:
            self._busy.on = False


_groups: dict[str, UpstreamGroup] = {}
_groups_lock = threading.Lock()


def join_upstream(breaker: CircuitBreaker | None, name: str | None) -> UpstreamGroup | None:
    """Put `breaker` in the group of upstream `name` (None: no group)."""
    if breaker is None or not name:
        return None
    with _groups_lock:
        group = _groups.get(name)
        if group is None:
            group = _groups[name] = UpstreamGroup(name)
    group.add(breaker)
    return group


def upstream_of(inner: Any) -> str | None:
    """The host (and port) of a wrapped model's or client's base URL, or None.

    Looks at `base_url`, `openai_api_base`, `api_base` of the object and of its
    `root_client`/`client`/`_client` (ChatOpenAI, OpenAIEmbeddings, LlamaIndex OpenAI,
    openai clients)."""
    candidates = (
        inner,
        getattr(inner, "root_client", None),
        getattr(inner, "client", None),
        getattr(inner, "_client", None),
    )
    for obj in candidates:
        if obj is None:
            continue
        for attr in ("base_url", "openai_api_base", "api_base"):
            value = getattr(obj, attr, None)
            if value:
                host = urlsplit(str(value)).netloc
                if host:
                    return host
    return None
