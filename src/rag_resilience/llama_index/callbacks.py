"""`ResilienceCallbackHandler` for LlamaIndex's legacy `CallbackManager`.

Attach it to ``Settings.callback_manager`` (or a component's) to get, in one place:

* our decisions (retries, fallbacks, breaker transitions...) from every wrapper whose
  callback manager holds the handler, as the same `stats()` as the LangChain handler;
* plain counts of LLM / embedding / query calls and their exceptions for components
  you did not wrap (``stats()["components"]``);
* optionally, a breaker guard: with ``breaker=CircuitBreaker(...)`` an LLM or embedding
  call on an unwrapped component fails fast with `CircuitOpenError` while the circuit
  is open, and its exceptions/successes feed the breaker.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter, deque
from typing import Any

from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.callbacks.schema import CBEventType, EventPayload

from ..breaker import ADMITTED_CLEAN, CircuitBreaker
from ..events import Event, StatsCollector

__all__ = ["CallbackForwarder", "ResilienceCallbackHandler"]

_GUARDED = (CBEventType.LLM, CBEventType.EMBEDDING)


class ResilienceCallbackHandler(BaseCallbackHandler):
    """Stats of our decisions plus LLM/embedding/query call counts; optional breaker guard."""

    def __init__(self, breaker: CircuitBreaker | None = None) -> None:
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])
        self.breaker = breaker
        self._collector = StatsCollector(user_calls=True)  # a user call counts once
        self._lock = threading.Lock()
        self._recent: deque[Event] = deque(maxlen=64)
        self._tickets: dict[str, int] = {}
        self._calls: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()

    # -- our events (forwarded by the wrappers) ------------------------------------------
    def on_resilience_event(self, event: Event) -> None:
        """Receive one rag-resilience event (a shared policy may forward it twice: once counts)."""
        with self._lock:
            if any(seen is event for seen in self._recent):
                return
            self._recent.append(event)
        self._collector(event)

    # -- legacy callback protocol ------------------------------------------------------------
    def on_event_start(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        parent_id: str = "",
        **kwargs: Any,
    ) -> str:
        if self.breaker is not None and event_type in _GUARDED:
            ticket = self.breaker.before_call()  # raises CircuitOpenError while open
            if ticket != ADMITTED_CLEAN:
                with self._lock:
                    self._tickets[event_id] = ticket
        return event_id

    def on_event_end(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        **kwargs: Any,
    ) -> None:
        error = (payload or {}).get(EventPayload.EXCEPTION)
        with self._lock:
            self._calls[event_type.value] += 1
            if error is not None:
                self._errors[event_type.value] += 1
            ticket = self._tickets.pop(event_id, ADMITTED_CLEAN)
        if self.breaker is not None and event_type in _GUARDED:
            if isinstance(error, BaseException):
                self.breaker.on_failure(error, ticket)
            else:
                self.breaker.on_success(ticket)  # a clean ticket still breaks a failure run

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(
        self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None
    ) -> None:
        return None

    # -- results -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        snapshot = self._collector.stats()
        with self._lock:
            snapshot["components"] = {
                kind: {"calls": n, "errors": self._errors[kind]} for kind, n in self._calls.items()
            }
        if self.breaker is not None:
            snapshot["guard_state"] = self.breaker.get_state().value
        return snapshot

    def reset(self) -> None:
        self._collector.reset()
        with self._lock:
            self._calls.clear()
            self._errors.clear()
            self._recent.clear()


class CallbackForwarder:
    """A policy listener handing events to the `ResilienceCallbackHandler`s found in a
    wrapper's callback manager at the time of the event (Settings may replace it)."""

    routine = True

    def __init__(self, owner: Any) -> None:
        self._owner = weakref.ref(owner)

    def __call__(self, event: Event) -> None:
        owner = self._owner()
        manager = getattr(owner, "callback_manager", None) if owner is not None else None
        for handler in getattr(manager, "handlers", ()) or ():
            if isinstance(handler, ResilienceCallbackHandler):
                handler.on_resilience_event(event)
