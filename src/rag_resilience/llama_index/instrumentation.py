"""Our decisions as LlamaIndex instrumentation events, and a handler that turns them into stats.

Every policy used by a LlamaIndex wrapper gets `BRIDGE` as a listener: each retry,
fallback, failure, rejection and breaker transition is dispatched as a `ResilienceEvent`
subclass through ``instrument.get_dispatcher("rag_resilience.llama_index")`` (which
propagates to the root dispatcher), so Arize/Langfuse/OpenTelemetry handlers attached
there see degraded service next to LlamaIndex's own events.

Routine events (attempt, success) are dispatched only while a `ResilienceEventHandler`
exists: nobody else needs them, and without them a wrapped model emits exactly the same
instrumentation events as the bare one when nothing fails.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, ClassVar

import llama_index.core.instrumentation as instrument
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent

from ..events import Event, EventKind, StatsCollector, refresh_routine

__all__ = [
    "BRIDGE",
    "InstrumentationBridge",
    "ResilienceAttemptEvent",
    "ResilienceBreakerEvent",
    "ResilienceEvent",
    "ResilienceEventHandler",
    "ResilienceFailureEvent",
    "ResilienceFallbackEvent",
    "ResilienceRejectedEvent",
    "ResilienceRetryEvent",
    "ResilienceSuccessEvent",
]

dispatcher = instrument.get_dispatcher("rag_resilience.llama_index")  # type: ignore[attr-defined]


class ResilienceEvent(BaseEvent):
    """One rag-resilience decision (see `rag_resilience.events.Event` for the fields)."""

    kind: str
    name: str
    attempt: int = 0
    delay: float | None = None
    reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    duration: float | None = None
    old_state: str | None = None
    new_state: str | None = None
    served_from: str | None = None
    age_s: float | None = None
    #: True for a call inside an outer wrapper's (engine's) call: one component of it
    nested: bool = False
    #: the exception itself, for in-process handlers; never serialised
    error: Any = Field(default=None, exclude=True, repr=False)

    @classmethod
    def class_name(cls) -> str:
        return "ResilienceEvent"

    def to_event(self) -> Event:
        """Back to a rag-resilience `Event` (what `StatsCollector` consumes)."""
        return Event(
            EventKind(self.kind),
            self.name,
            attempt=self.attempt,
            delay=self.delay,
            reason=self.reason,
            error=self.error if isinstance(self.error, BaseException) else None,
            duration=self.duration,
            old_state=self.old_state,
            new_state=self.new_state,
            served_from=self.served_from,
            age_s=self.age_s,
            extra={"nested": True} if self.nested else None,
        )


class ResilienceAttemptEvent(ResilienceEvent):
    @classmethod
    def class_name(cls) -> str:
        return "ResilienceAttemptEvent"


class ResilienceRetryEvent(ResilienceEvent):
    """An attempt failed; another follows after `delay` seconds (`reason` says why)."""

    @classmethod
    def class_name(cls) -> str:
        return "ResilienceRetryEvent"


class ResilienceSuccessEvent(ResilienceEvent):
    @classmethod
    def class_name(cls) -> str:
        return "ResilienceSuccessEvent"


class ResilienceFailureEvent(ResilienceEvent):
    """Nothing could be served: the caller sees the error."""

    @classmethod
    def class_name(cls) -> str:
        return "ResilienceFailureEvent"


class ResilienceFallbackEvent(ResilienceEvent):
    """A degraded answer was served from `served_from` (cache, fallback, generic_fallback...)."""

    @classmethod
    def class_name(cls) -> str:
        return "ResilienceFallbackEvent"


class ResilienceRejectedEvent(ResilienceEvent):
    """No upstream call was made (circuit open, queue full, budget, deadline)."""

    @classmethod
    def class_name(cls) -> str:
        return "ResilienceRejectedEvent"


class ResilienceBreakerEvent(ResilienceEvent):
    """A circuit breaker moved from `old_state` to `new_state`."""

    @classmethod
    def class_name(cls) -> str:
        return "ResilienceBreakerEvent"


_EVENT_CLASSES: dict[EventKind, type[ResilienceEvent]] = {
    EventKind.ATTEMPT: ResilienceAttemptEvent,
    EventKind.RETRY: ResilienceRetryEvent,
    EventKind.SUCCESS: ResilienceSuccessEvent,
    EventKind.FAILURE: ResilienceFailureEvent,
    EventKind.FALLBACK: ResilienceFallbackEvent,
    EventKind.REJECTED: ResilienceRejectedEvent,
    EventKind.STATE_CHANGE: ResilienceBreakerEvent,
}

_routine_handlers: weakref.WeakSet[ResilienceEventHandler] = weakref.WeakSet()
_routine_lock = threading.Lock()


def to_llama_event(event: Event) -> ResilienceEvent:
    """Our `Event` as the matching `ResilienceEvent` subclass."""
    cls = _EVENT_CLASSES[event.kind]
    error = event.error
    return cls(
        kind=event.kind.value,
        name=event.name,
        attempt=event.attempt,
        delay=event.delay,
        reason=event.reason,
        duration=event.duration,
        old_state=event.old_state,
        new_state=event.new_state,
        served_from=event.served_from,
        age_s=event.age_s,
        nested=bool(event.extra and event.extra.get("nested") is True),
        error=error,
        error_type=type(error).__name__ if error is not None else None,
        error_message=str(error) if error is not None else None,
    )


class InstrumentationBridge:
    """A rag-resilience listener dispatching events through LlamaIndex's dispatcher."""

    @property
    def routine(self) -> bool:
        # EventBus reads this per event: routine events only while someone collects them.
        return len(_routine_handlers) > 0

    def __call__(self, event: Event) -> None:
        dispatcher.event(to_llama_event(event))

    def __repr__(self) -> str:
        return "InstrumentationBridge()"


BRIDGE = InstrumentationBridge()


class ResilienceEventHandler(BaseEventHandler):
    """Collects `stats()` from our events, like the LangChain `ResilienceCallbackHandler`.

    Attach it where LlamaIndex handlers go::

        handler = ResilienceEventHandler()
        instrument.get_dispatcher().add_event_handler(handler)
        ...
        handler.stats()   # calls, retries, breaker transitions, fallbacks served, latency

    `names` restricts it to the policies with those names. While a handler exists, our
    routine events (attempt, success) are dispatched too, so its counts are complete.
    """

    names: frozenset[str] | None = None
    _collector: StatsCollector = PrivateAttr(
        default_factory=lambda: StatsCollector(user_calls=True)
    )
    _routine_kinds: ClassVar[frozenset[str]] = frozenset({"attempt", "success"})

    def __init__(
        self, names: list[str] | set[str] | frozenset[str] | None = None, **data: Any
    ) -> None:
        super().__init__(**data)
        self.names = frozenset(names) if names is not None else None
        with _routine_lock:
            opened = not _routine_handlers
            _routine_handlers.add(self)
        if opened:  # policies built before the first handler read the bridge's wish then
            refresh_routine()

    @classmethod
    def class_name(cls) -> str:
        return "ResilienceEventHandler"

    def handle(self, event: BaseEvent, **kwargs: Any) -> Any:
        if not isinstance(event, ResilienceEvent):
            return None
        if self.names is not None and event.name not in self.names:
            return None
        self._collector(event.to_event())
        return None

    def stats(self) -> dict[str, Any]:
        """The same snapshot as `ResiliencePolicy.stats()`, over every policy it saw."""
        return self._collector.stats()

    def reset(self) -> None:
        self._collector.reset()

    def close(self) -> None:
        """Stop asking for routine events (they are dispatched while any handler is open)."""
        with _routine_lock:
            _routine_handlers.discard(self)
            closed = not _routine_handlers
        if closed:
            refresh_routine()

    def __hash__(self) -> int:  # WeakSet membership; pydantic models are unhashable otherwise
        return id(self)
