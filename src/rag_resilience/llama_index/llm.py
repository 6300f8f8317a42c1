"""`ResilientLLM`: any LlamaIndex LLM behind a policy, with fallback LLMs, a last-known-good
answer cache and a generic answer.

The wrapper calls the wrapped model's public methods, so the LLM events and callbacks
LlamaIndex emits are the wrapped model's own, once per upstream attempt: where nothing
fails, a wrapped model emits exactly the events of the bare one. Degraded answers say
so: ``response.additional_kwargs["resilience"] = {"source", "age_s", "attempts",
"degraded"}`` (also in ``response.raw["resilience"]`` when `raw` is empty or a dict), and
a `ResilienceFallbackEvent` is dispatched.

Tool calling and structured prediction are forwarded to the wrapped model when it is a
`FunctionCallingLLM` (`_prepare_chat_with_tools`, `get_tool_calls_from_response`, ...).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from functools import partial
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection

from ..adapters import model_identity
from ..knobs import check_unknown, pop_knobs
from ..knobs import resolve_policy as resolve_knobs
from ..policy import Codec, ResiliencePolicy, Served
from ..ratelimit import PaceRequest
from ..ratelimit_instrument import instrument, model_upstream
from ..ratelimit_tokens import estimate_request_tokens
from ..typed_answers import generic_arity, unavailable
from ..upstream import join_upstream, upstream_of
from . import typed as lt
from ._common import (
    GenericSpec,
    async_calls,
    generic_text,
    jsonable,
    record_degraded,
    resolve_policy,
    sync_calls,
    timed_copy,
    warn_nested,
)
from .callbacks import CallbackForwarder
from .instrumentation import BRIDGE

__all__ = ["ResilientLLM"]

_COPIED_FIELDS = (
    "system_prompt",
    "messages_to_prompt",
    "completion_to_prompt",
    "output_parser",
    "pydantic_program_mode",
    "query_wrapper_prompt",
)
# Inner settings that change the output, part of the cache key besides the model name.
_OUTPUT_FIELDS = (
    "temperature",
    "max_tokens",
    "top_p",
    "seed",
    "additional_kwargs",
    "reasoning_effort",
    "modalities",
)


# -- codecs: responses <-> JSON (cache values must be JSON for shared stores) ---------------
def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: jsonable(v) for k, v in kwargs.items() if k != "resilience"}


def _encode_chat(response: ChatResponse) -> dict[str, Any]:
    return {
        "message": jsonable(response.message),
        "additional_kwargs": _clean_kwargs(response.additional_kwargs),
    }


def _decode_chat(data: Any) -> ChatResponse:
    message = ChatMessage.model_validate(data["message"])
    return ChatResponse(
        message=message, additional_kwargs=dict(data.get("additional_kwargs") or {})
    )


def _encode_chat_stream(items: list[ChatResponse]) -> dict[str, Any]:
    last = items[-1]
    text = "".join(item.delta or "" for item in items)
    if len(text) > len(last.message.content or ""):
        last = last.model_copy(update={"message": last.message.model_copy()})
        last.message.content = text
    return _encode_chat(last)


def _decode_chat_stream(data: Any) -> list[ChatResponse]:
    response = _decode_chat(data)
    response.delta = response.message.content or ""
    return [response]


def _encode_completion(response: CompletionResponse) -> dict[str, Any]:
    return {"text": response.text, "additional_kwargs": _clean_kwargs(response.additional_kwargs)}


def _decode_completion(data: Any) -> CompletionResponse:
    return CompletionResponse(
        text=data["text"], additional_kwargs=dict(data.get("additional_kwargs") or {})
    )


def _encode_completion_stream(items: list[CompletionResponse]) -> dict[str, Any]:
    last = items[-1]
    text = "".join(item.delta or "" for item in items)
    return {
        "text": text if len(text) > len(last.text) else last.text,
        "additional_kwargs": _clean_kwargs(last.additional_kwargs),
    }


def _decode_completion_stream(data: Any) -> list[CompletionResponse]:
    response = _decode_completion(data)
    response.delta = response.text
    return [response]


CHAT_CODEC = Codec(_encode_chat, _decode_chat)
CHAT_STREAM_CODEC = Codec(_encode_chat_stream, _decode_chat_stream)
COMPLETION_CODEC = Codec(_encode_completion, _decode_completion)
COMPLETION_STREAM_CODEC = Codec(_encode_completion_stream, _decode_completion_stream)


def _annotate(response: Any, served: Served[Any]) -> None:
    """Mark a degraded response: additional_kwargs and raw carry the resilience metadata."""
    meta = served.metadata()
    extra = getattr(response, "additional_kwargs", None)
    if isinstance(extra, dict):
        extra["resilience"] = meta
    raw = getattr(response, "raw", None)
    if raw is None:
        response.raw = {"resilience": meta}
    elif isinstance(raw, dict):
        raw["resilience"] = meta


def _prime(iterator: Iterator[Any]) -> Iterator[Any]:
    """Start a fallback stream now, so a failing fallback fails inside the fallback chain."""
    first = next(iterator)

    def chained() -> Iterator[Any]:
        yield first
        yield from iterator

    return chained()


async def _aprime(iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
    first = await iterator.__anext__()

    async def chained() -> AsyncIterator[Any]:
        yield first
        async for item in iterator:
            yield item

    return chained()


class _Fallback:
    """A fallback LLM with its own breaker (`policy.derive`) and sync-timeout copy."""

    __slots__ = ("async_calls", "llm", "policy", "sync_calls", "sync_llm")

    def __init__(self, llm: LLM, policy: ResiliencePolicy) -> None:
        self.llm = llm
        self.policy = policy
        self.sync_llm = timed_copy(llm, policy.attempt_timeout, "LLM")
        self.sync_calls = sync_calls(self.sync_llm, policy.attempt_timeout)
        self.async_calls = async_calls(llm)

    @property
    def breaker(self) -> Any:
        """Its circuit: failover (failover.py) skips a fallback whose circuit is open."""
        return self.policy.breaker


# How a fallback LLM runs `method` for the primary's fallback chain: under its own policy
# (own breaker), never with a generic answer; streams start before they are handed over.
def _fallback_call(fb: _Fallback, method: str, *args: Any, **kwargs: Any) -> Any:
    return fb.policy.execute(fb.sync_calls[method], args, kwargs, generic=False).value


async def _fallback_acall(fb: _Fallback, method: str, *args: Any, **kwargs: Any) -> Any:
    fn = fb.async_calls.get(method) or getattr(fb.llm, method)
    return (await fb.policy.aexecute(fn, args, kwargs, generic=False)).value


def _fallback_stream(fb: _Fallback, method: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
    fn = fb.sync_calls[method]
    return _prime(fb.policy.execute_stream(fn, args, kwargs, generic=False))


async def _fallback_astream(
    fb: _Fallback, method: str, *args: Any, **kwargs: Any
) -> AsyncIterator[Any]:
    fn = getattr(fb.llm, method)
    return await _aprime(fb.policy.aexecute_stream(fn, args, kwargs, generic=False))


# Each LlamaIndex entry point: its cache-key kind (a chat and its stream share answers),
# its codec, and how its fallbacks run.
_METHODS: dict[str, tuple[str, Codec, Callable[..., Any]]] = {
    "chat": ("chat", CHAT_CODEC, _fallback_call),
    "achat": ("chat", CHAT_CODEC, _fallback_acall),
    "stream_chat": ("chat", CHAT_STREAM_CODEC, _fallback_stream),
    "astream_chat": ("chat", CHAT_STREAM_CODEC, _fallback_astream),
    "complete": ("complete", COMPLETION_CODEC, _fallback_call),
    "acomplete": ("complete", COMPLETION_CODEC, _fallback_acall),
    "stream_complete": ("complete", COMPLETION_STREAM_CODEC, _fallback_stream),
    "astream_complete": ("complete", COMPLETION_STREAM_CODEC, _fallback_astream),
}


class ResilientLLM(FunctionCallingLLM):
    """Retry, circuit breaking, fallback LLMs, cached and generic answers for any LlamaIndex LLM.

    >>> Settings.llm = ResilientLLM(OpenAI(model="gpt-4o-mini", max_retries=0))

    `policy`: a `ResiliencePolicy`, a preset name ("balanced" by default) or None.
    `fallback_llms` are tried in order when the primary gives up or its circuit is open,
    each with its own breaker. `generic_fallback`: True (the default message), a string,
    a callable ``error -> str``, or False (re-raise when nothing else can be served).
    The caller's own errors (400, 401, 403, 404, 422) are never masked.
    """

    _inner: LLM = PrivateAttr()
    _sync_inner: LLM = PrivateAttr()
    _sync: dict[str, Callable[..., Any]] = PrivateAttr(default_factory=dict)
    _async: dict[str, Callable[..., Any]] = PrivateAttr(default_factory=dict)
    _policy: ResiliencePolicy = PrivateAttr()
    _fallbacks: list[_Fallback] = PrivateAttr(default_factory=list)
    _generic: GenericSpec = PrivateAttr(default=True)
    _params: dict[str, Any] = PrivateAttr(default_factory=dict)
    _identity: str = PrivateAttr(default="")
    _parse_retries: int = PrivateAttr(default=0)
    _upstream: str | None = PrivateAttr(default=None)

    def __init__(
        self,
        llm: LLM | None = None,
        policy: ResiliencePolicy | str | None = None,
        *,
        fallback_llms: Sequence[LLM] = (),
        generic_fallback: GenericSpec = True,
        name: str | None = None,
        callback_manager: CallbackManager | None = None,
        warn_nested_retries: bool = True,
        parse_retries: int = 0,
        upstream: str | None = None,
        **kwargs: Any,
    ) -> None:
        knobs = pop_knobs("ResilientLLM", kwargs)
        check_unknown("ResilientLLM", kwargs, type(self).model_fields)
        if isinstance(llm, ResilientLLM):  # wrapping a wrapper: one policy, not two multiplied
            lt.warn_rewrapped(llm, "ResilientLLM")
            llm = llm.llm
        if not isinstance(llm, LLM):
            raise ValueError(f"llm must be a llama_index LLM, got {type(llm).__name__}")
        if (
            not isinstance(parse_retries, int)
            or isinstance(parse_retries, bool)
            or parse_retries < 0
        ):
            raise ValueError(f"parse_retries must be an int >= 0, got {parse_retries!r}")
        for fb in fallback_llms:
            if not isinstance(fb, LLM):
                raise ValueError(
                    f"fallback_llms must contain llama_index LLMs, got {type(fb).__name__}"
                )
        if not (isinstance(generic_fallback, (bool, str)) or callable(generic_fallback)):
            raise ValueError(
                "generic_fallback must be a bool, a string or a callable error -> str, "
                f"got {type(generic_fallback).__name__}"
            )
        for field in _COPIED_FIELDS:
            if field not in kwargs and field in type(llm).model_fields:
                kwargs[field] = getattr(llm, field)
        super().__init__(callback_manager=callback_manager or llm.callback_manager, **kwargs)
        model = getattr(llm, "model", None) or llm.metadata.model_name
        if knobs:  # max_retries=1 ... override the preset
            policy = resolve_knobs(
                "ResilientLLM", policy, knobs, name=name or f"llama_index.llm:{model}"
            )
        resolved = resolve_policy(policy, name=name or f"llama_index.llm:{model}")
        resolved.add_listener(CallbackForwarder(self))
        self._parse_retries = parse_retries
        self._inner = llm
        self._policy = resolved
        join_upstream(resolved.breaker, upstream_of(llm) if upstream is None else upstream)
        self._sync_inner = timed_copy(llm, resolved.attempt_timeout, "LLM")
        self._sync = sync_calls(self._sync_inner, resolved.attempt_timeout)
        self._async = async_calls(llm)
        self._generic = generic_fallback
        self._identity = model_identity(llm)
        if resolved.rate_limiter is not None:  # pace to the limits its responses report
            instrument(self._sync_inner, resolved.rate_limiter)
            instrument(llm, resolved.rate_limiter)
            self._upstream = model_upstream(llm)
        self._params = {
            f: jsonable(getattr(llm, f)) for f in _OUTPUT_FIELDS if f in type(llm).model_fields
        }
        fallbacks = []
        for index, fb in enumerate(fallback_llms):
            fb_model = getattr(fb, "model", None) or fb.metadata.model_name
            derived = resolved.derive(f"{resolved.name}:fallback{index}:{fb_model}")
            derived.add_listener(CallbackForwarder(self))
            derived.add_listener(BRIDGE)
            fallbacks.append(_Fallback(fb, derived))
            if warn_nested_retries:
                warn_nested(fb, derived, "LLM call")
        self._fallbacks = fallbacks
        if warn_nested_retries:
            warn_nested(llm, resolved, "LLM call")

    @classmethod
    def class_name(cls) -> str:
        return "ResilientLLM"

    # -- introspection -------------------------------------------------------------------
    @property
    def llm(self) -> LLM:
        """The wrapped model."""
        return self._inner

    @property
    def policy(self) -> ResiliencePolicy:
        return self._policy

    @property
    def fallback_llms(self) -> list[LLM]:
        return [fb.llm for fb in self._fallbacks]

    def fallback_policy(self, index: int) -> ResiliencePolicy:
        """The derived policy (own breaker) of fallback LLM number `index`."""
        return self._fallbacks[index].policy

    def stats(self) -> dict[str, Any]:
        return self._policy.stats()

    @property
    def metadata(self) -> LLMMetadata:
        meta = self._inner.metadata
        if meta.is_function_calling_model and not isinstance(self._inner, FunctionCallingLLM):
            meta = meta.model_copy(update={"is_function_calling_model": False})
        return meta

    # -- plumbing ------------------------------------------------------------------------
    def _sync_callbacks(self) -> None:
        """Settings may replace our callback manager: the wrapped model follows it."""
        manager = self.callback_manager
        for target in (self._inner, self._sync_inner):
            if target.callback_manager is not manager:
                target.callback_manager = manager

    def _key(self, kind: str, payload: Any, kwargs: dict[str, Any]) -> list[Any]:
        return [
            "llama_index.llm",
            self._identity,
            kind,
            jsonable(payload),
            jsonable(kwargs),
            self._params,
        ]

    def _finish(self, served: Served[Any]) -> Any:
        if served.degraded:
            _annotate(served.value, served)
            record_degraded(self._policy.name, served)
        return served.value

    def _by_input(self) -> Callable[..., Any] | None:
        """The user's typed generic ``generic_fallback(input, error)``, if that is what it is."""
        spec = self._generic
        if callable(spec) and not isinstance(spec, (bool, str)) and generic_arity(spec) == 2:
            return spec
        return None

    def _text(self, error: BaseException, payload: Any = None) -> Any:
        by_input = self._by_input()
        if by_input is not None:
            return by_input(payload, error)
        return str(generic_text(self._generic, error, self._policy))

    def _generic_chat(self, payload: Any = None) -> Callable[[BaseException], Any] | bool:
        if self._generic is False:
            return False

        def make(error: BaseException) -> Any:
            text = self._text(error, payload)
            if text is None or isinstance(text, ChatResponse):
                return text
            return ChatResponse(
                message=ChatMessage(role=MessageRole.ASSISTANT, content=str(text)), delta=text
            )

        return make

    def _generic_completion(self, payload: Any = None) -> Callable[[BaseException], Any] | bool:
        if self._generic is False:
            return False

        def make(error: BaseException) -> Any:
            text = self._text(error, payload)
            if text is None or isinstance(text, CompletionResponse):
                return text
            return CompletionResponse(text=str(text), delta=str(text))

        return make

    def _generic_stream(self, make: Callable[[BaseException], Any] | bool) -> Any:
        if make is False or make is True:
            return make

        def items(error: BaseException) -> list[Any] | None:
            value = make(error)
            return None if value is None else [value]

        return items

    def _annotated(
        self, stream: Iterator[Any], state: dict[str, Served[None]], expected: str | None = None
    ) -> Generator[Any, None, None]:
        recorded = False
        try:
            for item in stream:
                served = state.get("served")
                if served is not None and served.degraded:
                    _annotate(item, served)
                    if not recorded:
                        record_degraded(self._policy.name, served)
                        recorded = True
                yield item
        except Exception as exc:
            self._raise_typed(exc, expected if "served" not in state else None)
            raise

    async def _aannotated(
        self,
        stream: AsyncIterator[Any],
        state: dict[str, Served[None]],
        expected: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        recorded = False
        try:
            async for item in stream:
                served = state.get("served")
                if served is not None and served.degraded:
                    _annotate(item, served)
                    if not recorded:
                        record_degraded(self._policy.name, served)
                        recorded = True
                yield item
        except Exception as exc:
            self._raise_typed(exc, expected if "served" not in state else None)
            raise

    def _raise_typed(self, exc: Exception, expected: str | None) -> None:
        """A typed request (tools, response_format) that failed upstream with nothing of
        its type to serve: UpstreamUnavailableError from the upstream error."""
        if expected is None:
            return
        typed = unavailable(exc, self._policy, expected)
        if typed is not None:
            raise typed from exc

    # -- how a call goes through the policy ------------------------------------------------
    def _request(self, method: str, payload: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`execute`'s keyword arguments for a call of `method` ("chat", "astream_complete",
        ...) on `payload` (the messages or the prompt)."""
        kind, codec, run_fallback = _METHODS[method]
        if lt.expected_type(kwargs) is not None:
            generic: Any = False  # a text answer is not a tool call or structured output
        elif kind == "chat":
            generic = self._generic_chat(payload)
        else:
            generic = self._generic_completion(payload)
        upstream = self._upstream
        return {
            "key": self._key(kind, payload, kwargs),
            "codec": codec,
            "fallbacks": [partial(run_fallback, fb, method) for fb in self._fallbacks],
            "generic": self._generic_stream(generic) if "stream" in method else generic,
            "pace": None
            if upstream is None
            else PaceRequest(
                upstream,
                estimate_request_tokens(
                    {"max_tokens": getattr(self._inner, "max_tokens", None), **kwargs},
                    payload if isinstance(payload, (list, tuple)) else [payload],
                ),
            ),
        }

    # -- sync --------------------------------------------------------------------------------
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self._sync_callbacks()
        try:
            served = self._policy.execute(
                self._sync["chat"],
                (messages,),
                kwargs,
                **self._request("chat", messages, kwargs),
            )
        except Exception as exc:
            self._raise_typed(exc, lt.expected_type(kwargs))
            raise
        result: ChatResponse = self._finish(served)
        return result

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._sync_callbacks()
        call_kwargs = {"formatted": formatted, **kwargs}
        request = self._request("complete", prompt, call_kwargs)
        served = self._policy.execute(self._sync["complete"], (prompt,), call_kwargs, **request)
        result: CompletionResponse = self._finish(served)
        return result

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        self._sync_callbacks()
        state: dict[str, Served[None]] = {}
        stream = self._policy.execute_stream(
            self._sync["stream_chat"],
            (messages,),
            kwargs,
            on_served=lambda served: state.__setitem__("served", served),
            **self._request("stream_chat", messages, kwargs),
        )
        return self._annotated(stream, state, lt.expected_type(kwargs))

    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        self._sync_callbacks()
        call_kwargs = {"formatted": formatted, **kwargs}
        state: dict[str, Served[None]] = {}
        stream = self._policy.execute_stream(
            self._sync["stream_complete"],
            (prompt,),
            call_kwargs,
            on_served=lambda served: state.__setitem__("served", served),
            **self._request("stream_complete", prompt, call_kwargs),
        )
        return self._annotated(stream, state)

    # -- async -------------------------------------------------------------------------------
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self._sync_callbacks()
        try:
            served = await self._policy.aexecute(
                self._async["achat"],
                (messages,),
                kwargs,
                **self._request("achat", messages, kwargs),
            )
        except Exception as exc:
            self._raise_typed(exc, lt.expected_type(kwargs))
            raise
        result: ChatResponse = self._finish(served)
        return result

    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        self._sync_callbacks()
        call_kwargs = {"formatted": formatted, **kwargs}
        request = self._request("acomplete", prompt, call_kwargs)
        served = await self._policy.aexecute(
            self._async["acomplete"], (prompt,), call_kwargs, **request
        )
        result: CompletionResponse = self._finish(served)
        return result

    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        self._sync_callbacks()
        state: dict[str, Served[None]] = {}
        fn: Any = self._inner.astream_chat  # a coroutine of an async generator
        stream: AsyncIterator[ChatResponse] = self._policy.aexecute_stream(
            fn,
            (messages,),
            kwargs,
            on_served=lambda served: state.__setitem__("served", served),
            **self._request("astream_chat", messages, kwargs),
        )
        return self._aannotated(stream, state, lt.expected_type(kwargs))

    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        self._sync_callbacks()
        call_kwargs = {"formatted": formatted, **kwargs}
        state: dict[str, Served[None]] = {}
        fn: Any = self._inner.astream_complete
        stream: AsyncIterator[CompletionResponse] = self._policy.aexecute_stream(
            fn,
            (prompt,),
            call_kwargs,
            on_served=lambda served: state.__setitem__("served", served),
            **self._request("astream_complete", prompt, call_kwargs),
        )
        return self._aannotated(stream, state)

    # -- tool calling, forwarded to a function-calling inner model -----------------------
    def _function_calling_inner(self) -> FunctionCallingLLM:
        inner = self._inner
        if not isinstance(inner, FunctionCallingLLM):
            raise NotImplementedError(
                f"{type(inner).__name__} is not a FunctionCallingLLM: tool calling is not supported"
            )
        return inner

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        result: dict[str, Any] = self._function_calling_inner()._prepare_chat_with_tools_compat(
            tools,
            user_msg=user_msg,
            chat_history=chat_history,
            verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls,
            tool_required=tool_required,
            **kwargs,
        )
        return result

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[Any],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        inner = self._inner
        if not isinstance(inner, FunctionCallingLLM):
            return response
        result: ChatResponse = inner._validate_chat_with_tools_response(
            response, tools, allow_parallel_tool_calls=allow_parallel_tool_calls, **kwargs
        )
        return result

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        result: list[ToolSelection] = self._function_calling_inner().get_tool_calls_from_response(
            response, error_on_no_tool_call=error_on_no_tool_call, **kwargs
        )
        return result

    # -- typed entry points: parse failures are the model's answer ---------------------------
    def _typed_failure(self, exc: Exception, tries: int, expected: str, request: Any) -> Any:
        """Retry a parse failure (`parse_retries`), serve the typed generic for an upstream
        failure, or raise; returns lt.RETRY to go again."""
        return lt.on_typed_failure(
            exc,
            policy=self._policy,
            tries=tries,
            parse_retries=self._parse_retries,
            expected=expected,
            generic=self._by_input(),
            request=request,
        )

    def _structured_impl(self, name: str) -> Callable[..., Any]:
        """The inner model's own structured prediction (LlamaIndex's OpenAI asks for a
        json_schema response_format, then validates), run on this wrapper so its chat calls
        go through the policy; the base class's (a function-calling program) otherwise."""
        impl = getattr(type(self._inner), name, None)
        if impl is None or impl in (getattr(LLM, name), getattr(FunctionCallingLLM, name)):
            return partial(getattr(super(), name))
        return partial(impl, self)

    def structured_predict(
        self, output_cls: Any, prompt: Any, llm_kwargs: dict[str, Any] | None = None, **args: Any
    ) -> Any:
        request = {"output_cls": output_cls, **args}
        tries = 0
        while True:
            try:
                return self._structured_impl("structured_predict")(
                    output_cls, prompt, llm_kwargs, **args
                )
            except Exception as exc:
                out = self._typed_failure(exc, tries, "structured output", request)
                if out is lt.RETRY:
                    tries += 1
                    continue
                return out

    async def astructured_predict(
        self, output_cls: Any, prompt: Any, llm_kwargs: dict[str, Any] | None = None, **args: Any
    ) -> Any:
        request = {"output_cls": output_cls, **args}
        tries = 0
        while True:
            try:
                return await self._structured_impl("astructured_predict")(
                    output_cls, prompt, llm_kwargs, **args
                )
            except Exception as exc:
                out = self._typed_failure(exc, tries, "structured output", request)
                if out is lt.RETRY:
                    tries += 1
                    continue
                return out

    def predict_and_call(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        error_on_no_tool_call: bool = True,
        error_on_tool_error: bool = False,
        **kwargs: Any,
    ) -> Any:
        tries = 0
        while True:
            try:
                return super().predict_and_call(
                    tools,
                    user_msg=user_msg,
                    chat_history=chat_history,
                    verbose=verbose,
                    allow_parallel_tool_calls=allow_parallel_tool_calls,
                    error_on_no_tool_call=error_on_no_tool_call,
                    error_on_tool_error=error_on_tool_error,
                    **kwargs,
                )
            except Exception as exc:
                out = self._typed_failure(exc, tries, "tool call", user_msg)
                if out is lt.RETRY:
                    tries += 1
                    continue
                return out

    async def apredict_and_call(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        error_on_no_tool_call: bool = True,
        error_on_tool_error: bool = False,
        **kwargs: Any,
    ) -> Any:
        tries = 0
        while True:
            try:
                return await super().apredict_and_call(
                    tools,
                    user_msg=user_msg,
                    chat_history=chat_history,
                    verbose=verbose,
                    allow_parallel_tool_calls=allow_parallel_tool_calls,
                    error_on_no_tool_call=error_on_no_tool_call,
                    error_on_tool_error=error_on_tool_error,
                    **kwargs,
                )
            except Exception as exc:
                out = self._typed_failure(exc, tries, "tool call", user_msg)
                if out is lt.RETRY:
                    tries += 1
                    continue
                return out

    # -- the inner model's attributes stay readable ------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            private = self.__pydantic_private__ or {}
            inner = private.get("_inner") if isinstance(private, dict) else None
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)
