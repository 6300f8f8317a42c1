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

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from pydantic import ConfigDict

from ..degraded import note_degraded
from ..errors import UpstreamUnavailableError, add_note
from ..policy import ResiliencePolicy
from ..typed_answers import (
    count_parse_failure,
    generic_arity,
    mark_counted,
    parse_failure_in,
    unavailable,
)

__all__ = [
    "TypedOutput",
    "count_parse_failure",
    "expected_type",
    "generic_arity",
    "mark_counted",
    "parse_failure_in",
    "unavailable",
]

logger = logging.getLogger("rag_resilience")

_RETRY: Any = object()


def expected_type(kwargs: dict[str, Any]) -> str | None:
    """What a chat call asks for beyond text: "structured output", "tool call" or None."""
    fmt = kwargs.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return "structured output"
    if (kwargs.get("tools") or kwargs.get("functions")) and kwargs.get("tool_choice") != "none":
        return "tool call"
    return None


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
            if self.expected == "tool call" and isinstance(value, str):
                from langchain_core.messages import AIMessage

                value = AIMessage(content=value)  # a final answer: the agent loop ends
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
