"""OpenTelemetry traces: a span per user call, a child span per attempt (extra ``[otel]``).

    from rag_resilience.otel_traces import instrument
    instrument()                       # the global TracerProvider; or instrument(tracer_provider=tp)
    ...
    uninstrument()

Like the ``opentelemetry-instrumentation-*`` packages, `instrument` wraps the policy's four
entry points (`ResiliencePolicy.execute`, `aexecute`, `execute_stream`, `aexecute_stream`,
which every adapter and `call`/`run` go through) and subscribes one listener to the event
bus. Nothing is patched and nothing runs per call until it is called: the success path
of an uninstrumented process is unchanged.

The call span is a child of the caller's current span (a LangChain or LlamaIndex
instrumentation's, a web framework's) and is current while the call runs; each attempt's
span is current while that attempt runs, so the HTTP client's and the SDK's own spans
nest under the attempt that made them. A stream's spans are current only while the
policy is producing an item, never while the consumer holds it.

Span names: ``{gen_ai.operation.name} {gen_ai.request.model}`` when the wrapped callable
says what it is (an OpenAI SDK resource, a LangChain or LlamaIndex model), else
``rag_resilience {policy name}``; attempts are ``rag_resilience.attempt``. Attributes:

=========================================  ===================================================
call span
``gen_ai.operation.name``                  chat | embeddings | text_completion (when known)
``gen_ai.provider.name``                   openai | anthropic | ... (when known)
``gen_ai.request.model``                   the model (when known)
``rag_resilience.policy``                  the policy's name
``rag_resilience.outcome``                 success | fallback | failure | cancelled
``rag_resilience.source``                  live | cache | fallback | generic_fallback | rejected
``rag_resilience.degraded``                True when anything but a live answer was served
``rag_resilience.attempts``                attempts made
``rag_resilience.cache.age_s``             age of a cached answer
``rag_resilience.degraded.reason``         why the live answer was not served (http_503, ...)
``rag_resilience.rejected.reason``         circuit_open | queue_full | wait_timeout | ...
``rag_resilience.breaker.state``           last breaker state seen during the call
``rag_resilience.paced.wait_s``            seconds waited for rate-limit slots (every
                                           attempt's; from `EventKind.PACED`)
``rag_resilience.probe_wait.wait_s``       seconds waited for a half-open probe's verdict,
                                           a slow-start slot or the next probe
                                           (`EventKind.PROBE_WAIT`)
``rag_resilience.<kind>.wait_s``           the same for a kind added later (any event with
                                           a delay or duration)
``error.type``                             the exception class, when the user gets an error
attempt span
``rag_resilience.attempt``                 1, 2, ...
``http.request.resend_count``              attempt - 1 (HTTP conventions; absent on the first)
``rag_resilience.outcome``                 success | retry | failure | rejected | cancelled
``rag_resilience.retry.reason``            why it is retried (http_503, rate_limited, ...)
``rag_resilience.retry.delay_s``           the backoff before the next attempt
``rag_resilience.breaker.state``           breaker state when the attempt started (local
                                           breakers; shared ones: the last transition seen)
``error.type``                             the exception class of a failed attempt
=========================================  ===================================================

Breaker transitions are span events (``rag_resilience.breaker.state_change`` with ``from``
and ``to``); so is each wait (``rag_resilience.paced``: ``duration``, ``extra.upstream``;
``rag_resilience.probe_wait``: ``duration``, ``reason`` admitted | rejected |
next_probe_due, ``extra.waited_for`` probe | slow_start | next_probe): a probe wait on
the attempt span it delays, pacing (before an attempt starts) on the call span; events of
kinds this module does not know are span events named after the kind.
"""

from __future__ import annotations

import contextvars
import threading
import types
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from .events import Event, EventKind, add_listener, remove_listener
from .genai import genai_attributes
from .policy import ResiliencePolicy
from .telemetry import CALL_ATTRIBUTE_HOOKS

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rag_resilience.otel_traces needs opentelemetry-api: pip install 'rag-resilience[otel]'"
    ) from exc

__all__ = [
    "ATTEMPT_SPAN",
    "genai_attributes",
    "instrument",
    "is_instrumented",
    "trace_policy",
    "uninstrument",
]

ATTEMPT_SPAN = "rag_resilience.attempt"
_INTERNAL = trace.SpanKind.INTERNAL


# -- one call in flight --------------------------------------------------------------------
class _CallSpan:
    """The spans of one user call, and the context tokens it attached (detached LIFO)."""

    __slots__ = (
        "attempt",
        "attempt_span",
        "attempt_token",
        "breaker",
        "call_span",
        "closed",
        "genai",
        "names",
        "terminal",
        "tokens",
        "waits",
    )

    def __init__(self, policy: ResiliencePolicy, span: Any, genai: dict[str, Any]) -> None:
        self.call_span = span
        self.genai = genai
        self.attempt_span: Any = None
        self.attempt_token: Any = None
        self.attempt = 0
        self.breaker = policy.breaker
        self.names = _names_of(policy)
        self.tokens: list[Any] = []
        self.waits: dict[str, float] = {}
        self.terminal = False  # a success, fallback or failure event was seen
        self.closed = False

    # context: the innermost open span is current while the policy runs
    def enter(self) -> None:
        self.tokens.append(otel_context.attach(trace.set_span_in_context(self.call_span)))
        if self.attempt_span is not None:
            self._attach_attempt()

    def leave(self) -> None:
        self.attempt_token = None
        while self.tokens:
            otel_context.detach(self.tokens.pop())

    def _attach_attempt(self) -> None:
        token = otel_context.attach(trace.set_span_in_context(self.attempt_span))
        self.tokens.append(token)
        self.attempt_token = token

    # attempts
    def start_attempt(self, number: int, tracer: Any) -> None:
        self.end_attempt("cancelled")  # defensive: an attempt is never left open
        self.attempt = number
        attrs: dict[str, Any] = {"rag_resilience.attempt": number}
        if number > 1:
            attrs["http.request.resend_count"] = number - 1
        state = _breaker_state(self.breaker)
        if state is not None:
            attrs["rag_resilience.breaker.state"] = state
        ctx = trace.set_span_in_context(self.call_span)
        self.attempt_span = tracer.start_span(
            ATTEMPT_SPAN, context=ctx, kind=_INTERNAL, attributes=attrs
        )
        if self.tokens:  # inside the call's context (always, but for a stream between items)
            self._attach_attempt()

    def attempt_failed(self) -> None:
        """The attempt's callable raised: its span stops being current (what runs next, the
        backoff or the fallback chain, is the call's), and stays open for the verdict."""
        token, self.attempt_token = self.attempt_token, None
        if token is not None and self.tokens and self.tokens[-1] is token:
            otel_context.detach(self.tokens.pop())

    def end_attempt(self, outcome: str, error: BaseException | None = None) -> None:
        span = self.attempt_span
        if span is None:
            return
        self.attempt_span = None
        token, self.attempt_token = self.attempt_token, None
        if token is not None and self.tokens and self.tokens[-1] is token:
            otel_context.detach(self.tokens.pop())
        if error is None:
            span.set_attribute("rag_resilience.outcome", outcome)
        else:
            span.set_attributes(
                {"rag_resilience.outcome": outcome, "error.type": type(error).__qualname__}
            )
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
        span.end()

    def finish(self, error: BaseException | None) -> None:
        """End everything (the wrapper's `finally`). A call that ended without a terminal
        event was cancelled or interrupted (outcome ``cancelled``, with the error), or is
        a stream its consumer closed early (outcome ``closed``, not an error)."""
        if self.closed:
            return
        self.closed = True
        span = self.call_span
        closed = isinstance(error, GeneratorExit)
        if self.attempt_span is not None:
            if self.terminal:
                self.end_attempt("failure", error)
            else:
                self.end_attempt("closed" if closed else "cancelled", None if closed else error)
        self.leave()
        if not self.terminal:
            if closed:
                span.set_attribute("rag_resilience.outcome", "closed")
            elif error is not None:
                span.set_attribute("rag_resilience.outcome", "cancelled")
                _set_error(span, error)
        for kind, seconds in self.waits.items():
            span.set_attribute(f"rag_resilience.{kind}.wait_s", seconds)
        span.end()


def _names_of(policy: ResiliencePolicy) -> frozenset[str]:
    """The names the policy's components publish under (kept on the policy, rebuilt if a
    component is replaced)."""
    parts = (policy.name, policy.retry, policy.breaker, policy.limit, policy.rate_limiter)
    cached = policy.__dict__.get("_rr_trace_names")
    if cached is not None and cached[0] == parts:
        return cached[1]  # type: ignore[no-any-return]
    names = {policy.name}
    if policy.retry.name:
        names.add(policy.retry.name)
    if policy.breaker is not None:
        names.add(policy.breaker.name)
    if policy.limit is not None:
        names.add(policy.limit.name)
    if policy.rate_limiter is not None:
        names.add(policy.rate_limiter.name)
    frozen = frozenset(names)
    policy.__dict__["_rr_trace_names"] = (parts, frozen)
    return frozen


def _breaker_state(breaker: Any) -> str | None:
    if breaker is None or breaker.store is not None:
        return None  # a shared breaker's state is a store read: use the transitions seen
    return str(breaker._rec.state)


def _set_error(span: Any, error: BaseException) -> None:
    span.set_attribute("error.type", type(error).__qualname__)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))


_current: contextvars.ContextVar[_CallSpan | None] = contextvars.ContextVar(
    "rag_resilience_call_span", default=None
)


def _current_genai() -> dict[str, Any] | None:
    """The GenAI attributes of the traced call in progress (for the metrics' histogram)."""
    call = _current.get()
    return call.genai if call is not None else None


CALL_ATTRIBUTE_HOOKS.append(_current_genai)


class _TraceListener:
    """Turns the policy's events into attempt spans and attributes of the current call."""

    routine = True  # attempt and success events open and close attempt spans

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer

    def __call__(self, event: Event) -> None:
        call = _current.get()
        if call is None or call.closed or event.name not in call.names:
            return  # not ours: a call outside instrumented policies, or another component
        kind = event.kind
        span = call.call_span
        if kind is EventKind.ATTEMPT:
            call.start_attempt(event.attempt or call.attempt + 1, self.tracer)
        elif kind is EventKind.RETRY:
            attempt = call.attempt_span
            if attempt is not None:
                attempt.set_attribute("rag_resilience.retry.reason", event.reason or "unknown")
                if event.delay is not None:
                    attempt.set_attribute("rag_resilience.retry.delay_s", event.delay)
            call.end_attempt("retry", event.error)
        elif kind is EventKind.SUCCESS:
            call.terminal = True
            call.end_attempt("success")
            span.set_attributes(
                {
                    "rag_resilience.outcome": "success",
                    "rag_resilience.source": "live",
                    "rag_resilience.degraded": False,
                    "rag_resilience.attempts": event.attempt,
                }
            )
        elif kind is EventKind.FALLBACK:
            call.terminal = True
            call.end_attempt("failure", event.error)
            attrs: dict[str, Any] = {
                "rag_resilience.outcome": "fallback",
                "rag_resilience.source": event.served_from or "unknown",
                "rag_resilience.degraded": True,
                "rag_resilience.attempts": event.attempt,
            }
            if event.age_s is not None:
                attrs["rag_resilience.cache.age_s"] = event.age_s
            if event.reason is not None:
                attrs["rag_resilience.degraded.reason"] = event.reason
            if event.error is not None:
                attrs["rag_resilience.error.type"] = type(event.error).__qualname__
            span.set_attributes(attrs)
        elif kind is EventKind.FAILURE:
            call.terminal = True
            call.end_attempt("failure", event.error)
            span.set_attributes(
                {
                    "rag_resilience.outcome": "failure",
                    "rag_resilience.degraded": False,
                    "rag_resilience.attempts": event.attempt,
                }
            )
            if event.error is not None:
                _set_error(span, event.error)
                span.record_exception(event.error)
        elif kind is EventKind.REJECTED:
            reason = event.reason or "unknown"
            span.set_attribute("rag_resilience.rejected.reason", reason)
            if reason == "circuit_open":
                _breaker_seen(call, "open")
            if call.attempt_span is not None:
                call.attempt_span.set_attribute("rag_resilience.rejected.reason", reason)
                call.end_attempt("rejected")
            else:
                span.add_event("rag_resilience.rejected", {"reason": reason})
        elif kind is EventKind.STATE_CHANGE:
            change = {"from": event.old_state or "unknown", "to": event.new_state or "unknown"}
            target = call.attempt_span if call.attempt_span is not None else span
            target.add_event("rag_resilience.breaker.state_change", change)
            if event.new_state is not None:
                _breaker_seen(call, event.new_state)
        else:  # a kind added later (pacing, probe wait, ...): an event, and its time summed
            name = str(getattr(kind, "value", kind))
            target = call.attempt_span if call.attempt_span is not None else span
            target.add_event(f"rag_resilience.{name}", _scalars(event))
            seconds = event.duration if event.duration is not None else event.delay
            if seconds is not None:
                call.waits[name] = call.waits.get(name, 0.0) + seconds


def _breaker_seen(call: _CallSpan, state: str) -> None:
    call.call_span.set_attribute("rag_resilience.breaker.state", state)
    if call.attempt_span is not None:
        call.attempt_span.set_attribute("rag_resilience.breaker.state", state)


def _scalars(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in event.as_dict().items():
        if key in ("kind", "timestamp"):
            continue
        if isinstance(value, (str, bool, int, float)):
            out[key] = value
        elif isinstance(value, dict):
            for sub, inner in value.items():
                if isinstance(inner, (str, bool, int, float)):
                    out[f"{key}.{sub}"] = inner
    return out


# -- the wrappers ----------------------------------------------------------------------------
class _Instrumentation:
    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.listener = _TraceListener(tracer)
        self.originals: dict[str, Any] = {}

    def begin(self, policy: ResiliencePolicy, fn: Any, kwargs: Any) -> _CallSpan:
        genai = genai_attributes(fn, kwargs)
        op, model = genai.get("gen_ai.operation.name"), genai.get("gen_ai.request.model")
        name = f"{op} {model}" if op and model else op or f"rag_resilience {policy.name}"
        attrs: dict[str, Any] = {**genai, "rag_resilience.policy": policy.name}
        span = self.tracer.start_span(name, kind=_INTERNAL, attributes=attrs)
        return _CallSpan(policy, span, genai)


_active: list[_Instrumentation] = []
_lock = threading.Lock()
_WRAPPERS: tuple[tuple[str, Callable[[Any, _Instrumentation], Any]], ...]


def _tracer_of(tracer_provider: Any) -> Any:
    return (
        tracer_provider.get_tracer("rag_resilience")
        if tracer_provider is not None
        else trace.get_tracer("rag_resilience")
    )


_INHERITED: Any = object()  # `instrument` found the method on a base class


def is_instrumented() -> bool:
    return bool(_active)


def instrument(tracer_provider: Any = None) -> None:
    """Trace every `ResiliencePolicy` call in this process (idempotent: a second call
    replaces the tracer provider)."""
    tracer = _tracer_of(tracer_provider)
    with _lock:
        if _active:
            _active[0].tracer = tracer
            _active[0].listener.tracer = tracer
            return
        inst = _Instrumentation(tracer)
        for name, wrap in _WRAPPERS:
            # the drivers are inherited (`_async/drivers.py` and its generated sync twin):
            # wrap what the class resolves, and remember whether it was its own
            inst.originals[name] = ResiliencePolicy.__dict__.get(name, _INHERITED)
            setattr(ResiliencePolicy, name, wrap(getattr(ResiliencePolicy, name), inst))
        _active.append(inst)
        add_listener(inst.listener)


def uninstrument() -> None:
    """Undo `instrument` (a no-op when not instrumented)."""
    with _lock:
        if not _active:
            return
        inst = _active.pop()
        for name, original in inst.originals.items():
            if original is _INHERITED:
                delattr(ResiliencePolicy, name)
            else:
                setattr(ResiliencePolicy, name, original)
        remove_listener(inst.listener)


def trace_policy(policy: ResiliencePolicy, tracer_provider: Any = None) -> ResiliencePolicy:
    """Trace this one policy's calls (the others stay untouched); returns `policy`.
    Do not combine with a process-wide `instrument` (its calls would get two spans)."""
    inst = _Instrumentation(_tracer_of(tracer_provider))
    for name, wrap in _WRAPPERS:
        original = getattr(ResiliencePolicy, name)
        setattr(policy, name, types.MethodType(wrap(original, inst), policy))
    policy.add_listener(inst.listener)
    return policy


def _wrap_execute(original: Any, inst: _Instrumentation) -> Any:
    def execute(
        self: ResiliencePolicy,
        fn: Callable[..., Any],
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        call = inst.begin(self, fn, kwargs)
        token = _current.set(call)
        call.enter()
        error: BaseException | None = None

        def attempt(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except BaseException:
                call.attempt_failed()
                raise

        attempt.__wrapped__ = fn  # type: ignore[attr-defined]  # what the policy was given

        try:
            return original(self, attempt, args, kwargs, **options)
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.finish(error)
            _current.reset(token)

    execute.__doc__ = original.__doc__
    return execute


def _wrap_aexecute(original: Any, inst: _Instrumentation) -> Any:
    async def aexecute(
        self: ResiliencePolicy,
        fn: Callable[..., Any],
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        call = inst.begin(self, fn, kwargs)
        token = _current.set(call)
        call.enter()
        error: BaseException | None = None

        async def attempt(*a: Any, **k: Any) -> Any:
            try:
                return await fn(*a, **k)
            except BaseException:
                call.attempt_failed()
                raise

        attempt.__wrapped__ = fn  # type: ignore[attr-defined]

        try:
            return await original(self, attempt, args, kwargs, **options)
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.finish(error)
            _current.reset(token)

    aexecute.__doc__ = original.__doc__
    return aexecute


def _wrap_stream(original: Any, inst: _Instrumentation) -> Any:
    def execute_stream(
        self: ResiliencePolicy,
        fn: Callable[..., Any],
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Iterator[Any]:
        inner = original(self, fn, args, kwargs, **options)
        call: _CallSpan | None = None
        error: BaseException | None = None
        try:
            while True:
                if call is None:
                    call = inst.begin(self, fn, kwargs)
                token = _current.set(call)
                call.enter()  # current only while the policy produces the next item
                try:
                    item = next(inner)
                except StopIteration:
                    return
                finally:
                    call.leave()
                    _current.reset(token)
                yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            if call is not None:
                token = _current.set(call)
                try:
                    inner.close()  # a stream closed early: the policy releases what it holds
                finally:
                    call.finish(error)
                    _current.reset(token)

    execute_stream.__doc__ = original.__doc__
    return execute_stream


def _wrap_astream(original: Any, inst: _Instrumentation) -> Any:
    async def aexecute_stream(
        self: ResiliencePolicy,
        fn: Callable[..., Any],
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncIterator[Any]:
        inner = original(self, fn, args, kwargs, **options)
        call: _CallSpan | None = None
        error: BaseException | None = None
        try:
            while True:
                if call is None:
                    call = inst.begin(self, fn, kwargs)
                token = _current.set(call)
                call.enter()
                try:
                    item = await inner.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    call.leave()
                    _current.reset(token)
                yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            if call is not None:
                token = _current.set(call)
                try:
                    await inner.aclose()
                finally:
                    call.finish(error)
                    _current.reset(token)

    aexecute_stream.__doc__ = original.__doc__
    return aexecute_stream


_WRAPPERS = (
    ("execute", _wrap_execute),
    ("aexecute", _wrap_aexecute),
    ("execute_stream", _wrap_stream),
    ("aexecute_stream", _wrap_astream),
)
