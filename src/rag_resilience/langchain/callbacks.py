"""`ResilienceCallbackHandler`: metrics for every LLM run it sees, and a breaker guard for
components you did not wrap.

`stats()` has the snapshot shape of `policy.stats()` (README, "Reading stats()"): per user
call (calls = live + degraded + errors) apart from per component (attempts, retries,
rejections, breaker transitions). Where the numbers come from:

* our wrappers (ResilientLLM, ResilientEmbeddings, with_resilience) dispatch a LangChain
  custom event named ``"rag_resilience"`` after each call (an embeddings call only when it
  was retried or degraded), with how it was served (source, attempts, age, breaker state,
  and ``nested`` when it ran inside an outer wrapper's call): a nested call counts per
  component only, so a chain's user call is counted once. (Custom events also show up in
  ``astream_events``.)
* unwrapped chat model / LLM runs it is attached to (``on_*_start`` ->
  ``on_llm_end``/``on_llm_error``, matched by run id): a user call each, or a component
  when an outer wrapper's call encloses them; latency is timed for user calls;
* `watch(wrapper_or_policy)` additionally subscribes to a policy's own engine events
  for exact per-attempt numbers (they appear under ``stats()["engine"]``).

With a `breaker`, the handler guards unwrapped models: while the circuit is open it
raises CircuitOpenError from ``on_chat_model_start``/``on_llm_start`` (``raise_error``
is True so LangChain propagates it: no upstream call is made); failures and successes
are recorded from ``on_llm_error``/``on_llm_end``. Runs of our own wrappers are not
gated (they have their own breaker). With `fallbacks`, successful answers are recorded
keyed on the prompt: `last_known_good(prompt)` returns ``(text, age_s)`` for serving.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.outputs import LLMResult

from ..breaker import CircuitBreaker
from ..clock import get_clock
from ..degraded import in_outer_call
from ..errors import CircuitOpenError, QueueFullError
from ..events import StatsCollector, _percentile
from ..fallback import GracefulFallbacks
from ..knobs import ArgumentTypeError
from ..policy import ResiliencePolicy
from ._common import EVENT_NAME, chat_key

__all__ = ["ResilienceCallbackHandler"]

_WRAPPER_IDS = frozenset({"ResilientLLM", "ResilientRunnable"})
_REJECTION_REASONS = {
    CircuitOpenError.__name__: "circuit_open",
    QueueFullError.__name__: "queue_full",
}
# What a model run is to the handler's stats: one of our wrappers (it reports through its
# custom event), an unwrapped model the user called, or a component of a wrapper's call.
_WRAPPED, _USER, _COMPONENT = "wrapped", "user", "component"


def _prompt_key(messages_or_prompts: Sequence[Any]) -> str:
    msgs: list[BaseMessage] = [m for m in messages_or_prompts if isinstance(m, BaseMessage)]
    if msgs:
        return chat_key("handler", msgs, None, {})
    return chat_key("handler-text", [], None, {"prompts": [str(p) for p in messages_or_prompts]})


class ResilienceCallbackHandler(BaseCallbackHandler):
    """Stats for LLM runs, resilience events from our wrappers, optional breaker guard."""

    run_inline = True  # keep breaker bookkeeping ordered with the run, also in async chains

    def __init__(
        self,
        breaker: CircuitBreaker | None = None,
        fallbacks: GracefulFallbacks | None = None,
        *,
        latency_window: int = 4096,
    ) -> None:
        if latency_window < 1:
            raise ValueError(f"latency_window must be >= 1, got {latency_window}")
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise ArgumentTypeError(
                "ResilienceCallbackHandler: breaker must be a rag_resilience CircuitBreaker "
                f"or None, got {type(breaker).__name__} (to watch a wrapper's policy, use "
                "handler.watch(wrapper))"
            )
        if fallbacks is not None and not isinstance(fallbacks, GracefulFallbacks):
            raise ArgumentTypeError(
                "ResilienceCallbackHandler: fallbacks must be a GracefulFallbacks or None, "
                f"got {type(fallbacks).__name__}"
            )
        self.breaker = breaker
        self.fallbacks = fallbacks
        # Only a guard must propagate its CircuitOpenError; metrics never break a call.
        self.raise_error = breaker is not None
        self._lock = threading.Lock()
        self._runs: dict[UUID, tuple[float, int | None, str | None, str, bool]] = {}
        # start of each chain run outside a wrapper's call: a user call's latency
        self._chain_starts: dict[UUID, float] = {}
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._engine = StatsCollector(latency_window)
        self._states: dict[str, str] = {}
        if breaker is not None:
            breaker.events.add(self._engine)
        self.reset()

    def reset(self) -> None:
        """Zero every counter (the breaker and the fallback cache are left alone)."""
        with self._lock:
            # per user call (an outermost wrapper's call, or an unwrapped model's run that
            # no wrapper encloses): calls == live + degraded + errors
            self.calls = 0
            self.live = 0
            self.degraded = 0
            self.errors = 0
            self.errors_by_class: Counter[str] = Counter()
            self.fallbacks_by_source: Counter[str] = Counter()
            # per component: every wrapper and model run, nested ones included
            self.attempts = 0
            self.retries = 0
            self.attempt_errors_by_class: Counter[str] = Counter()
            self.rejections = 0
            self.rejections_by_reason: Counter[str] = Counter()
            self.transitions: Counter[str] = Counter()
            self.resilience_events = 0
            self._reported_runs: set[UUID] = set()
            self._latencies.clear()
        self._engine.reset()

    # -- subscriptions ---------------------------------------------------------------------
    def watch(self, target: Any) -> None:
        """Subscribe to the engine events of a wrapper's policy (or of a policy)."""
        policy = (
            target
            if isinstance(target, ResiliencePolicy)
            else (getattr(target, "resilience_policy", None) or getattr(target, "policy", None))
        )
        if not isinstance(policy, ResiliencePolicy):
            raise ValueError(
                "watch() takes a ResiliencePolicy or a rag_resilience wrapper, "
                f"got {type(target).__name__}"
            )
        policy.add_listener(self._engine)

    # -- run bookkeeping -----------------------------------------------------------------
    def _now(self) -> float:
        return get_clock(self.breaker.clock if self.breaker is not None else None).monotonic()

    def _start(
        self, serialized: dict[str, Any] | None, run_id: UUID, prompt: Sequence[Any]
    ) -> None:
        wrapped = bool(serialized) and bool(
            _WRAPPER_IDS.intersection((serialized or {}).get("id") or ())
        )
        # Callbacks run inline, in the caller's context: an enclosing wrapper is visible.
        nested = in_outer_call()
        role = _WRAPPED if wrapped else (_COMPONENT if nested else _USER)
        ticket: int | None = None
        if self.breaker is not None and not wrapped:
            try:
                ticket = self.breaker.before_call()
            except CircuitOpenError as exc:
                with self._lock:
                    self.rejections += 1
                    self.rejections_by_reason["circuit_open"] += 1
                    if role is _USER:
                        self.calls += 1
                        self.errors += 1
                        self.errors_by_class[type(exc).__name__] += 1
                raise
        key = _prompt_key(prompt) if self.fallbacks is not None else None
        with self._lock:
            self._runs[run_id] = (self._now(), ticket, key, role, not nested)

    def _finish(self, run_id: UUID) -> tuple[int | None, str | None, str | None]:
        now = self._now()
        with self._lock:
            started = self._runs.pop(run_id, None)
            if started is None:
                return None, None, None
            if started[4]:  # the latency of user calls, not of their components
                self._latencies.append(max(0.0, now - started[0]))
            return started[1], started[2], started[3]

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        self._start(serialized, run_id, messages[0] if messages else [])

    def on_llm_start(
        self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any
    ) -> None:
        self._start(serialized, run_id, prompts)

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        # LangChain 1.x passes no `serialized` here: time every run that starts outside a
        # wrapper's call (the outermost with_resilience among them); the wrapper's event
        # takes its start, chain_end drops the others
        if not in_outer_call():
            now = self._now()
            with self._lock:
                self._chain_starts[run_id] = now

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self._chain_starts:
            with self._lock:
                self._chain_starts.pop(run_id, None)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.on_chain_end(None, run_id=run_id)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        ticket, key, role = self._finish(run_id)
        with self._lock:
            if role is not _WRAPPED:  # our wrappers report through their custom event
                self.attempts += 1
                if role is _USER:
                    self.calls += 1
                    self.live += 1
            reported = run_id in self._reported_runs
            self._reported_runs.discard(run_id)
        if role is _WRAPPED and not reported:
            # BaseChatModel.stream() calls _stream without its run manager, so our wrapper
            # could not send its custom event: read the metadata it put on the answer.
            meta = _resilience_of(response)
            if meta is not None:
                data = dict(meta)
                error = data.get("error")
                if isinstance(error, str) and ":" in error:
                    data["error_class"] = error.split(":", 1)[0]
                data.setdefault("nested", in_outer_call())
                self.on_custom_event(EVENT_NAME, data, run_id=run_id)
        if self.breaker is not None and ticket is not None:
            self.breaker.on_success(ticket)  # a clean ticket still breaks a failure run
        if self.fallbacks is not None and key is not None:
            text = _text_of(response)
            if text is not None:
                self.fallbacks.update_cache(key, text)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        ticket, _, role = self._finish(run_id)
        with self._lock:
            if role is not None and role is not _WRAPPED:
                name = type(error).__name__
                self.attempts += 1
                self.attempt_errors_by_class[name] += 1
                if role is _USER:
                    self.calls += 1
                    self.errors += 1
                    self.errors_by_class[name] += 1
        if self.breaker is not None and ticket is not None:
            self.breaker.on_failure(error, ticket)

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if name != EVENT_NAME or not isinstance(data, dict):
            return
        source = data.get("source")
        degraded = bool(data.get("degraded"))
        error_class = data.get("error_class")
        rejected_by = _REJECTION_REASONS.get(str(error_class))
        if source == "rejected":
            rejected_by = "queue_full"
        user_call = data.get("nested") is not True
        with self._lock:
            self._reported_runs.add(run_id)
            self.resilience_events += 1
            attempts = data.get("attempts")
            if isinstance(attempts, int):
                self.attempts += attempts
                retries = data.get("retries")
                self.retries += retries if isinstance(retries, int) else max(0, attempts - 1)
            if error_class and rejected_by is None and (degraded or source == "error"):
                self.attempt_errors_by_class[str(error_class)] += 1  # the last attempt's
            if rejected_by is not None and (degraded or source == "error"):
                self.rejections += 1
                self.rejections_by_reason[rejected_by] += 1
            if user_call:
                self.calls += 1
                started = self._chain_starts.pop(run_id, None)
                if started is not None:  # a wrapped model's call is timed by its run
                    self._latencies.append(max(0.0, self._now() - started))
                if source == "error":
                    self.errors += 1
                    self.errors_by_class[str(error_class)] += 1
                elif degraded:
                    self.degraded += 1
                    self.fallbacks_by_source[str(source)] += 1
                else:
                    self.live += 1
            state = data.get("breaker_state")
            policy = str(data.get("policy"))
            if isinstance(state, str):
                old = self._states.get(policy, "closed")
                if old != state:
                    self.transitions[f"{old}->{state}"] += 1
                self._states[policy] = state

    # -- serving --------------------------------------------------------------------------
    def last_known_good(self, prompt: Sequence[Any] | str) -> tuple[str, float] | None:
        """The last recorded answer for this prompt (messages or strings) and its age."""
        if self.fallbacks is None:
            return None
        if isinstance(prompt, str):  # a chat model turns a string into one human message
            found = self.fallbacks.get_last_known_good(_prompt_key([HumanMessage(prompt)]))
            return found or self.fallbacks.get_last_known_good(_prompt_key([prompt]))
        return self.fallbacks.get_last_known_good(_prompt_key(prompt))

    # -- stats ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The snapshot `policy.stats()` returns (README, "Reading stats()"): per user call
        (calls, live, degraded by source, errors by class, latency) and per component
        (attempts, retries, attempt errors, rejections, breaker transitions), plus
        ``engine`` (the exact engine numbers of watched policies), ``breaker`` (the
        guard's) and ``resilience_events``. Gauges the handler has no part for are None."""
        engine = self._engine.stats()
        with self._lock:
            lat = sorted(self._latencies)
            calls = self.calls
            by_source = dict(self.fallbacks_by_source)
            snapshot: dict[str, Any] = {
                "calls": calls,
                "live": self.live,
                "degraded": self.degraded,
                "errors": self.errors,
                "degraded_by_source": by_source,
                "errors_by_class": dict(self.errors_by_class),
                "error_rate": (self.errors / calls) if calls else 0.0,
                "degraded_rate": (self.degraded / calls) if calls else 0.0,
                "attempts": self.attempts,
                "retries": self.retries,
                "retries_by_reason": dict(engine["retries_by_reason"]),  # from watched policies
                "attempt_errors_by_class": dict(self.attempt_errors_by_class),
                "rejections": self.rejections,
                "rejections_by_reason": dict(self.rejections_by_reason),
                "successes": self.live,
                "failures": self.errors,
                "fallbacks_by_source": dict(by_source),
                "retry_reasons": dict(engine["retries_by_reason"]),
                "breaker_transitions": dict(self.transitions),
                "breaker_states": dict(self._states),
                "breaker_state": self.breaker.get_state().value if self.breaker else None,
                "in_flight": None,
                "queue_depth": None,
                "cache_entries": len(self.fallbacks) if self.fallbacks is not None else None,
                "resilience_events": self.resilience_events,
                "latency_s": {
                    "p50": _percentile(lat, 0.50),
                    "p95": _percentile(lat, 0.95),
                    "p99": _percentile(lat, 0.99),
                    "max": lat[-1] if lat else None,
                    "count": len(lat),
                },
            }
        snapshot["engine"] = engine
        for k, v in engine["breaker_transitions"].items():
            snapshot["breaker_transitions"][k] = max(snapshot["breaker_transitions"].get(k, 0), v)
        if self.breaker is not None:
            snapshot["breaker"] = self.breaker.stats()
            snapshot["rejections"] = max(snapshot["rejections"], engine["rejections"])
        return snapshot


def _resilience_of(response: LLMResult) -> dict[str, Any] | None:
    for generations in response.generations:
        for generation in generations:
            message = getattr(generation, "message", None)
            meta = getattr(message, "response_metadata", None)
            if isinstance(meta, dict) and isinstance(meta.get("resilience"), dict):
                found: dict[str, Any] = meta["resilience"]
                return found
    return None


def _text_of(response: LLMResult) -> str | None:
    for gens in response.generations:
        for gen in gens:
            return gen.text
    return None
