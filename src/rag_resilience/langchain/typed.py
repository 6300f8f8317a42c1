"""Typed answers in LangChain: structured output and tool calls keep their type.

A plain-text generic answer is a valid answer only to a plain-text request. For a request
with `tools` or a `response_format` (what `bind_tools` and `with_structured_output` send)
`ResilientLLM` serves a cached answer of the same call or a fallback model's answer, and
otherwise raises `UpstreamUnavailableError` from the upstream error.

`TypedOutput` wraps the pipeline `with_structured_output`/`bind_tools` return:
- a parse or validation failure of a 200 is the model's answer: counted in the policy's
  stats (`parse_failures`), raised as LangChain raises it, retried only when asked
  (`parse_retries=N`);
- `UpstreamUnavailableError` becomes the user's typed generic answer when they gave one
  (`generic_fallback=callable(input, error)`, returning the pipeline's type).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from pydantic import ConfigDict

from ..classify import is_parse_failure
from ..degraded import note_degraded
from ..errors import (
    CircuitOpenError,
    QueueFullError,
    UpstreamUnavailableError,
    add_note,
    attempts_of,
)
from ..policy import ResiliencePolicy

__all__ = ["TypedOutput", "expected_type", "generic_arity", "parse_failure_in", "unavailable"]

logger = logging.getLogger("rag_resilience")

_COUNTED = "__rag_resilience_parse_counted__"
_RETRY: Any = object()


def expected_type(kwargs: dict[str, Any]) -> str | None:
    """What a chat call asks for beyond text: "structured output", "tool call" or None."""
    fmt = kwargs.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return "structured output"
    if (kwargs.get("tools") or kwargs.get("functions")) and kwargs.get("tool_choice") != "none":
        return "tool call"
    return None


def unavailable(
    exc: BaseException, policy: ResiliencePolicy, expected: str
) -> UpstreamUnavailableError | None:
    """The error to raise ``from exc`` when an upstream failure left nothing of the
    `expected` type to serve; None when `exc` is not an upstream failure (the caller's own
    error or a parse failure is raised as it is)."""
    if isinstance(exc, UpstreamUnavailableError):
        return None
    verdict = policy.classify(exc)
    if not verdict.fallback_ok or verdict.reason == "parse_failure":
        return None
    attempts = attempts_of(exc)
    if attempts is None and isinstance(exc, (CircuitOpenError, QueueFullError)):
        attempts = 0
    breaker = policy.breaker
    return UpstreamUnavailableError(
        expected,
        attempts=attempts,
        breaker_state=breaker.get_state().value if breaker is not None else None,
        policy=policy.name,
        hint="generic_fallback=callable(input, error) can supply one of the right type",
    )


def mark_counted(exc: BaseException) -> None:
    """The policy already counted this parse failure (it happened inside an attempt)."""
    with contextlib.suppress(Exception):  # exceptions that refuse attributes
        setattr(exc, _COUNTED, True)


def count_parse_failure(policy: ResiliencePolicy, exc: BaseException) -> None:
    if getattr(exc, _COUNTED, False):
        return
    mark_counted(exc)
    note = getattr(policy.collector, "note_parse_failure", None)
    if callable(note):
        note()


def generic_arity(fn: Callable[..., Any]) -> int:
    """1 for ``fn(error)``, 2 for ``fn(input, error)``."""
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return 1
    return 2 if len(params) >= 2 else 1


def parse_failure_in(exc: BaseException) -> bool:
    seen = 0
    link: BaseException | None = exc
    while link is not None and seen < 8:
        if is_parse_failure(link):
            return True
        link, seen = link.__cause__, seen + 1
    return False


class TypedOutput(RunnableSerializable[Any, Any]):
    """A structured-output or tool-calling pipeline with parse retries and a typed generic.

    Transparent: it opens no run of its own; the pipeline runs with the caller's config.
    """

    bound: Runnable[Any, Any]
    policy: Any
    parse_retries: int = 0
    generic: Any = None
    expected: str = "structured output"

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @property
    def InputType(self) -> Any:
        return self.bound.InputType

    @property
    def OutputType(self) -> Any:
        return self.bound.OutputType

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return self.bound.get_name(suffix, name=name)

    # -- one failure: retry, serve the typed generic, or raise ----------------------------
    def _on_error(self, exc: Exception, input: Any, tries: int) -> Any:
        policy: ResiliencePolicy = self.policy
        if parse_failure_in(exc):
            count_parse_failure(policy, exc)
            if tries < self.parse_retries:
                logger.info(
                    "[%s] the model's answer did not parse (%s); parse retry %d of %d",
                    policy.name,
                    type(exc).__name__,
                    tries + 1,
                    self.parse_retries,
                )
                return _RETRY
            if self.parse_retries:
                add_note(exc, f"rag_resilience[{policy.name}]: {tries + 1} answer(s) did not parse")
            raise exc
        if isinstance(exc, UpstreamUnavailableError) and exc.expected != self.expected:
            # function_calling sends tools: the model step saw a "tool call" request
            renamed = UpstreamUnavailableError(
                self.expected,
                attempts=exc.attempts,
                breaker_state=exc.breaker_state,
                policy=exc.policy,
                hint=exc.hint,
            )
            renamed.__cause__ = exc.__cause__
            renamed.__traceback__ = exc.__traceback__
            exc = renamed
        if isinstance(exc, UpstreamUnavailableError) and self.generic is not None:
            cause = exc.__cause__ if isinstance(exc.__cause__, BaseException) else exc
            value = self.generic(input, cause)
            meta = {
                "source": "generic_fallback",
                "degraded": True,
                "age_s": None,
                "attempts": exc.attempts or 0,
            }
            note_degraded(meta)
            logger.warning(
                "[%s] served the typed generic_fallback (%s) after %s",
                policy.name,
                type(value).__name__,
                type(cause).__name__,
            )
            return _mark(value, meta)
        raise exc

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        tries = 0
        while True:
            try:
                return self.bound.invoke(input, config, **kwargs)
            except Exception as exc:
                out = self._on_error(exc, input, tries)
                if out is _RETRY:
                    tries += 1
                    continue
                return out

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        tries = 0
        while True:
            try:
                return await self.bound.ainvoke(input, config, **kwargs)
            except Exception as exc:
                out = self._on_error(exc, input, tries)
                if out is _RETRY:
                    tries += 1
                    continue
                return out

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        tries = 0
        while True:
            emitted = False
            try:
                for item in self.bound.stream(input, config, **kwargs):
                    emitted = True
                    yield item
                return
            except Exception as exc:
                if emitted:  # the caller has part of this answer: no second one
                    raise
                out = self._on_error(exc, input, tries)
                if out is _RETRY:
                    tries += 1
                    continue
                yield out
                return

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        tries = 0
        while True:
            emitted = False
            try:
                async for item in self.bound.astream(input, config, **kwargs):
                    emitted = True
                    yield item
                return
            except Exception as exc:
                if emitted:
                    raise
                out = self._on_error(exc, input, tries)
                if out is _RETRY:
                    tries += 1
                    continue
                yield out
                return


def _mark(value: Any, meta: dict[str, Any]) -> Any:
    """Degraded metadata where the value has room for it (messages; dicts of include_raw)."""
    from langchain_core.messages import BaseMessage

    if isinstance(value, BaseMessage):
        return value.model_copy(
            update={"response_metadata": {**value.response_metadata, "resilience": meta}}
        )
    return value
