"""One outage signal per upstream: breakers of wrappers that call the same host share
what they learn.

Each wrapper keeps its own breaker (one endpoint failing alone, e.g. chat overloaded while
embeddings work, opens only that one), and joins the group of its upstream (`upstream=`,
default: the host of the wrapped model's or client's base URL). The group links them:

* opens together: when a member trips, every member that has failures counted and no
  success since (it is failing too) opens with it, following the one that tripped;
* probes together: while several members are open, only the leader probes; a failed probe
  pushes the followers' open periods past the leader's next probe, so the dead host gets
  one probe per recovery period, not one per wrapper;
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

    def add(self, breaker: CircuitBreaker) -> None:
        with self._lock:
            if breaker in self._members:
                return
            self._members.add(breaker)
        breaker.upstream = self
        ref = weakref.ref(breaker)

        def changed(old: Any, new: Any) -> None:
            self._changed(ref, new)

        breaker.add_state_listener(changed)

    def members(self) -> list[CircuitBreaker]:
        with self._lock:
            return list(self._members)

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
                period = leader.retry_after() + _STAGGER_S
                for member in others:
                    member.follow(period)
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
