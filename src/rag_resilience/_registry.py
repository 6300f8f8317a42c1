"""Every live `ResiliencePolicy` of the process, weakly referenced.

Exporters use it to report the live gauges (breaker state, in-flight, queue depth, rate
limits) of every policy whose events they receive, without `observe(policy)`. Registering
happens once per policy, at construction; nothing is done per call.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

__all__ = ["live_policies", "register"]

_policies: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()


def register(policy: Any) -> None:
    with _lock:
        _policies.add(policy)


def live_policies() -> list[Any]:
    """The policies alive now (a snapshot: safe while others are being built)."""
    with _lock:
        return list(_policies)
