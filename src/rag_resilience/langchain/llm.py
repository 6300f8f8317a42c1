"""`ResilientLLM`: any LangChain chat model behind retry, breaker, fallbacks and a limit.

It is a `BaseChatModel`, so it drops into a chain where the wrapped model was. It calls
the inner model's `_generate`/`_agenerate`/`_stream`/`_astream` directly inside its own
run (no second nested run per call), handing down its run manager, so tokens and
events of the inner model still reach the caller's callback handlers.

Degradation order (DESIGN.md §4): fallback models (each with its own breaker) ->
last-known-good answer for the same (model, messages, output-changing parameters),
with its age -> the generic message -> the original error. Every answer carries
``response_metadata["resilience"] = {"source", "age_s", "attempts", "degraded"}``.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableSequence
from pydantic import ConfigDict, Field, PrivateAttr

from ..adapters import (
    accepts_request_timeout,
    mark_sdk_read_error,
    model_identity,
    request_timeout,
)
from ..degraded import note_degraded
from ..errors import add_note, mark_handled
from ..knobs import check_given_policy, check_unknown, pop_knobs, resolve_policy
from ..policy import ResiliencePolicy, Served
from ..policy_core import _NO_KEY
from ..ratelimit import PaceRequest
from ..ratelimit_instrument import instrument, model_upstream
from ..ratelimit_tokens import estimate_request_tokens
from ..upstream import join_upstream, upstream_of
from . import _common as c
from . import dropin
from .typed import (
    TypedOutput,
    expected_type,
    generic_arity,
    mark_counted,
    parse_failure_in,
    unavailable,
)

__all__ = ["ResilientChatModel", "ResilientLLM"]


def _accepts_run_manager(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return "run_manager" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def _emitted_then_failed(exc: BaseException, chunks: list[Any], run_manager: Any) -> None:
    """A stream failed after its tokens reached the callbacks: they cannot be taken back,
    so this call is not retried (a retry would show the handlers a second answer). Marked
    handled: the policy degrades (fallback model, cache, generic) or raises at once."""
    if chunks and run_manager is not None and run_manager.handlers:
        add_note(
            exc,
            f"rag_resilience: the stream failed after {len(chunks)} chunk(s) reached the "
            "callbacks; not retried",
        )
        mark_handled(exc)


class _Target:
    """One model to call (the primary or a fallback), prepared once: timeout copy and
    which of the inner hooks it implements."""

    __slots__ = (
        "agen_rm",
        "astream",
        "gen_rm",
        "identity",
        "model",
        "policy",
        "stream",
        "streaming_attr",
        "streaming_extra",
        "timed",
    )

    def __init__(self, model: BaseChatModel, policy: ResiliencePolicy) -> None:
        self.model = model
        self.policy = policy
        self.identity = model_identity(model)
        cls = type(model)
        self.gen_rm = _accepts_run_manager(model._generate)
        self.agen_rm = _accepts_run_manager(model._agenerate)
        self.stream = cls._stream is not BaseChatModel._stream
        self.astream = cls._astream is not BaseChatModel._astream or self.stream
        # Where a `streaming` setting can live, decided once: reading a name the model
        # does not have goes through pydantic's __getattr__ and an AttributeError (~2 µs
        # per call). A field, class attribute or property is read as before; a model that
        # allows extra fields may carry it as an extra; anything else has none.
        self.streaming_attr = "streaming" in (getattr(cls, "model_fields", None) or {}) or (
            hasattr(cls, "streaming")
        )
        self.streaming_extra = (getattr(cls, "model_config", None) or {}).get("extra") == "allow"
        # A sync attempt cannot be cancelled: models that pass `timeout=` to the SDK get
        # min(attempt timeout, what the call's deadline leaves) per request.
        self.timed = accepts_request_timeout(model)

    def _timed(self, kwargs: dict[str, Any]) -> None:
        timeout = request_timeout(self.policy.attempt_timeout, kwargs.get("timeout"))
        if timeout is not None:
            kwargs["timeout"] = timeout

    # -- raw calls (one attempt each) ------------------------------------------------------
    def generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        **kwargs: Any,
    ) -> ChatResult:
        model = self.model
        if model.rate_limiter is not None:
            model.rate_limiter.acquire(blocking=True)
        if self.timed:
            self._timed(kwargs)
        if self._streams(False, run_manager, kwargs):
            # What BaseChatModel._generate_with_cache does for a streaming model
            # (ChatOpenAI(streaming=True)'s _generate expects it): stream, emit tokens.
            # The inner `_stream` gets no run manager (as in LangChain's own path): the
            # tokens reach the callbacks once, from here.
            chunks: list[ChatGenerationChunk] = []
            try:
                for chunk in model._stream(messages, stop=stop, **kwargs):
                    if run_manager is not None:
                        run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
                    chunks.append(chunk)
            except Exception as exc:
                _emitted_then_failed(exc, chunks, run_manager)
                raise
            return generate_from_stream(iter(chunks))
        try:
            if self.gen_rm:
                return model._generate(messages, stop=stop, run_manager=run_manager, **kwargs)
            return model._generate(messages, stop=stop, **kwargs)
        except (ValueError, AttributeError) as exc:
            if self.timed:
                mark_sdk_read_error(exc)
            raise

    def _streams(self, async_api: bool, run_manager: Any, kwargs: dict[str, Any]) -> bool:
        if not (self.astream if async_api else self.stream):
            return False
        model = self.model
        if not (
            kwargs.get("stream")
            or (run_manager is not None and run_manager.handlers)
            or self._streaming_setting(model)
        ):
            return False  # cheap pre-check: the usual non-streaming invoke
        return bool(model._should_stream(async_api=async_api, run_manager=run_manager, **kwargs))

    def _streaming_setting(self, model: BaseChatModel) -> Any:
        """`getattr(model, "streaming", False)` without the exception when there is none."""
        if self.streaming_attr or "streaming" in model.__dict__:
            return getattr(model, "streaming", False)
        if self.streaming_extra:
            extra = model.__pydantic_extra__
            return extra.get("streaming", False) if extra else False
        return False

    async def agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: AsyncCallbackManagerForLLMRun | None,
        **kwargs: Any,
    ) -> ChatResult:
        model = self.model
        if model.rate_limiter is not None:
            await model.rate_limiter.aacquire(blocking=True)
        if self._streams(True, run_manager, kwargs):
            chunks: list[ChatGenerationChunk] = []
            try:
                async for chunk in model._astream(messages, stop=stop, **kwargs):
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
                    chunks.append(chunk)
            except Exception as exc:
                _emitted_then_failed(exc, chunks, run_manager)
                raise
            return generate_from_stream(iter(chunks))
        try:
            if self.agen_rm:
                return await model._agenerate(
                    messages, stop=stop, run_manager=run_manager, **kwargs
                )
            return await model._agenerate(messages, stop=stop, **kwargs)
        except (ValueError, AttributeError) as exc:
            if self.timed:
                mark_sdk_read_error(exc)
            raise

    def stream_chunks(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if not self.stream:  # the model cannot stream: one chunk from its answer
            return iter(_chunks_of(self.generate(messages, stop, run_manager, **kwargs)))
        model = self.model
        if model.rate_limiter is not None:
            model.rate_limiter.acquire(blocking=True)
        if self.timed:
            self._timed(kwargs)
        return iter(model._stream(messages, stop=stop, run_manager=run_manager, **kwargs))

    async def astream_chunks(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: AsyncCallbackManagerForLLMRun | None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if not self.astream:
            result = await self.agenerate(messages, stop, run_manager, **kwargs)
            for chunk in _chunks_of(result):
                yield chunk
            return
        model = self.model
        if model.rate_limiter is not None:
            await model.rate_limiter.aacquire(blocking=True)
        async for chunk in model._astream(messages, stop=stop, run_manager=run_manager, **kwargs):
            yield chunk

    # -- a fallback model under its own policy (own breaker) --------------------------------
    def tagged(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` carrying this model's breaker: failover skips a fallback whose circuit is open."""
        fn.breaker = self.policy.breaker  # type: ignore[attr-defined]
        return fn

    def as_fallback(self) -> Callable[..., ChatResult]:
        def call(
            messages: list[BaseMessage], stop: list[str] | None, run_manager: Any, **kwargs: Any
        ) -> ChatResult:
            return self.policy.execute(
                self.generate, (messages, stop, run_manager), kwargs, generic=False
            ).value

        return call

    def as_afallback(self) -> Callable[..., Any]:
        async def call(
            messages: list[BaseMessage], stop: list[str] | None, run_manager: Any, **kwargs: Any
        ) -> ChatResult:
            served = await self.policy.aexecute(
                self.agenerate, (messages, stop, run_manager), kwargs, generic=False
            )
            return served.value

        return call

    def as_stream_fallback(self) -> Callable[..., Any]:
        def call(
            messages: list[BaseMessage], stop: list[str] | None, run_manager: Any, **kwargs: Any
        ) -> list[ChatGenerationChunk]:
            # A fallback's stream is collected before it is served: the primary already
            # failed, and a second model failing mid-stream must not reach the caller.
            return list(
                self.policy.execute_stream(
                    self.stream_chunks, (messages, stop, run_manager), kwargs, generic=False
                )
            )

        return call

    def as_astream_fallback(self) -> Callable[..., Any]:
        async def call(
            messages: list[BaseMessage], stop: list[str] | None, run_manager: Any, **kwargs: Any
        ) -> list[ChatGenerationChunk]:
            return [
                chunk
                async for chunk in self.policy.aexecute_stream(
                    self.astream_chunks, (messages, stop, run_manager), kwargs, generic=False
                )
            ]

        return call


class _Runtime:
    __slots__ = (
        "by_input",
        "fb_astream",
        "fb_async",
        "fb_stream",
        "fb_sync",
        "gen_chunks",
        "gen_result",
        "keyed",
        "max_tokens",
        "policy",
        "primary",
        "upstream",
    )

    def __init__(self, policy: ResiliencePolicy, primary: _Target, keyed: bool) -> None:
        self.policy = policy
        self.primary = primary
        self.keyed = keyed
        self.upstream: str | None = None  # the pacer key, when the policy paces
        self.max_tokens: int | None = None
        self.gen_result: Any = False
        self.gen_chunks: Any = False
        self.fb_sync: list[Any] = []
        self.fb_async: list[Any] = []
        self.fb_stream: list[Any] = []
        self.fb_astream: list[Any] = []
        # the user's generic_fallback(input, error): built per call with the messages
        self.by_input: Callable[..., Any] | None = None


def _chunks_of(result: ChatResult) -> list[ChatGenerationChunk]:
    out = []
    for gen in result.generations:
        msg = gen.message
        chunk = AIMessageChunk(
            content=msg.content,
            additional_kwargs=msg.additional_kwargs,
            response_metadata=msg.response_metadata,
            id=msg.id,
            tool_call_chunks=[
                {
                    "name": tc["name"],
                    "args": _json(tc["args"]),
                    "id": tc.get("id"),
                    "index": i,
                    "type": "tool_call_chunk",
                }
                for i, tc in enumerate(getattr(msg, "tool_calls", None) or [])
            ],
            usage_metadata=getattr(msg, "usage_metadata", None),
        )
        out.append(ChatGenerationChunk(message=chunk, generation_info=gen.generation_info))
    return out


def _generic_for(rt: _Runtime, messages: list[BaseMessage], kind: str | None, chunks: bool) -> Any:
    """The generic answer for this call: none for a typed request (`kind`), the user's
    generic_fallback(input, error) bound to these messages, else the prepared one."""
    if kind is not None:
        return False
    by_input = rt.by_input
    if by_input is None:
        return rt.gen_chunks if chunks else rt.gen_result

    def make(error: BaseException) -> Any:
        value = by_input(messages, error)
        if value is None:
            return None
        if isinstance(value, str):
            value = AIMessage(content=value)
        if not isinstance(value, BaseMessage):
            raise TypeError(
                "generic_fallback(input, error) must return a str or an AIMessage for a chat "
                f"model call, got {type(value).__name__}"
            )
        if chunks:
            return _chunks_of(ChatResult(generations=[ChatGeneration(message=value)]))
        return ChatResult(generations=[ChatGeneration(message=value)])

    return make


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


class ResilientLLM(BaseChatModel):
    """A chat model that retries, breaks the circuit, falls back and degrades gracefully.

    >>> llm = ResilientLLM(ChatOpenAI(model="gpt-4o-mini", max_retries=0),
    ...                    fallback_models=[other_model], policy="conservative")

    `policy`: a `ResiliencePolicy` or a preset name ("balanced" by default). Share one
    policy object between wrappers to share its breaker, cache, limit and stats.
    `generic_fallback`: True (the default message; the default), a string, or False
    (re-raise when nothing else can be served). None: the policy object's own setting.
    """

    llm: BaseChatModel
    policy: Any = None
    fallback_models: list[BaseChatModel] = Field(default_factory=list)
    generic_fallback: bool | str | Callable[..., Any] | None = True
    cache_answers: bool = True
    """Remember live answers as last-known-good (served, with their age, on failure)."""
    parse_retries: int = 0
    """Structured output: ask again this many times when the model's answer does not
    parse (default 0: a parse failure is the model's answer, raised as it is)."""
    policy_overrides: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    """Policy knobs given as keyword arguments (``max_retries=1``...), applied to the preset."""
    upstream: str | None = None
    """Share outage signals with wrappers of the same upstream (default: the model's base
    URL host; "" for none). See `rag_resilience.upstream`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _policy: ResiliencePolicy = PrivateAttr()
    _generic: Any = PrivateAttr(default=None)
    _fallbacks: list[_Target] = PrivateAttr(default_factory=list)
    # Everything the hot path needs, in one object: pydantic private attributes are
    # looked up through __getattr__, so each one read per call costs ~1 µs.
    _rt: _Runtime = PrivateAttr()

    def __init__(self, llm: BaseChatModel | None = None, /, **data: Any) -> None:
        if llm is not None:
            if "llm" in data:
                raise TypeError("ResilientLLM got `llm` both positionally and by keyword")
            data["llm"] = llm
        if "llm" in data:  # (a subclass may build `llm` from other keywords in a validator)
            knobs = pop_knobs(type(self).__name__, data)
            check_given_policy(type(self).__name__, data.get("policy"), knobs)
            if knobs:
                data["policy_overrides"] = {**data.get("policy_overrides", {}), **knobs}
            check_unknown(type(self).__name__, data, dropin.field_names(type(self)))
            dropin.check_model(type(self).__name__, "llm", data["llm"], BaseChatModel)
            for index, model in enumerate(data.get("fallback_models") or ()):
                dropin.check_model(
                    type(self).__name__, f"fallback_models[{index}]", model, BaseChatModel
                )
        super().__init__(**data)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        inner = self.llm
        if isinstance(inner, ResilientLLM):
            # wrapping a wrapper: one policy, not attempts times attempts
            dropin.warn_rewrapped(inner, "ResilientLLM")
            inner = inner.llm
            self.llm = inner
        identity = model_identity(inner)
        given = isinstance(self.policy, ResiliencePolicy)
        generic = self.generic_fallback
        if generic is None and not given:
            generic = True
        if self.policy is not None and not isinstance(self.policy, (str, ResiliencePolicy)):
            raise ValueError(
                "policy must be a ResiliencePolicy, a preset name or None, got "
                f"{type(self.policy).__name__}"
            )
        if not isinstance(self.parse_retries, int) or self.parse_retries < 0:
            raise ValueError(f"parse_retries must be an int >= 0, got {self.parse_retries!r}")
        by_input = generic if callable(generic) and generic_arity(generic) == 2 else None
        policy = resolve_policy(
            type(self).__name__,
            self.policy,
            self.policy_overrides,
            name=f"langchain:{identity}",
            generic_fallback=(False if generic is None or by_input is not None else generic),
        )
        dropin.adopt_run_settings(self, inner)
        self._policy = policy
        self._generic = generic
        join_upstream(
            policy.breaker, upstream_of(inner) if self.upstream is None else self.upstream
        )
        c.warn_nested(inner, policy, "chat")
        c.warn_deadline_uncut(inner, policy)
        primary = _Target(c.with_timeout(inner, policy.attempt_timeout), policy)
        self._fallbacks = []
        for index, model in enumerate(self.fallback_models):
            c.warn_nested(model, policy, "chat")
            name = f"{policy.name}:fallback{index}:{model_identity(model)}"
            self._fallbacks.append(
                _Target(c.with_timeout(model, policy.attempt_timeout), policy.derive(name))
            )
        rt = _Runtime(policy, primary, self.cache_answers and policy.fallbacks is not None)
        if policy.rate_limiter is not None:  # pace to the limits its responses report
            instrument(primary.model, policy.rate_limiter)
            rt.upstream = model_upstream(inner)
            rt.max_tokens = getattr(inner, "max_tokens", None)
        rt.gen_result = self._generic_result()
        rt.gen_chunks = self._generic_chunks()
        rt.fb_sync = [t.tagged(t.as_fallback()) for t in self._fallbacks]
        rt.fb_async = [t.tagged(t.as_afallback()) for t in self._fallbacks]
        rt.fb_stream = [t.tagged(t.as_stream_fallback()) for t in self._fallbacks]
        rt.fb_astream = [t.tagged(t.as_astream_fallback()) for t in self._fallbacks]
        if by_input is not None:
            rt.by_input = by_input
        self._rt = rt
        if "output_version" not in self.model_fields_set:
            self.output_version = inner.output_version

    # -- what the model is ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper does not have are the inner model's (``model_name``,
        ``temperature``...): the wrapper stands where the model stood."""
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            inner = self.__dict__.get("llm")
            if inner is None or name.startswith("__"):
                raise
            return dropin.inner_attribute(inner, name)

    @property
    def _llm_type(self) -> str:
        return self.llm._llm_type

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return dict(self.llm._identifying_params)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        return self.llm._get_ls_params(stop=stop, **kwargs)

    @property
    def resilience_policy(self) -> ResiliencePolicy:
        """The resolved policy (breaker, cache, limit, stats)."""
        return self._policy

    def stats(self) -> dict[str, Any]:
        """The policy's stats, plus each fallback model's breaker state."""
        snapshot = self._policy.stats()
        if self._fallbacks:
            snapshot["fallback_models"] = [
                {"name": t.policy.name, **t.policy.stats()} for t in self._fallbacks
            ]
        return snapshot

    # -- plumbing ---------------------------------------------------------------------------
    @staticmethod
    def _key(
        rt: _Runtime, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Any:
        if not rt.keyed:
            return _NO_KEY
        return c.chat_key(rt.primary.identity, messages, stop, kwargs)

    @staticmethod
    def _pace(rt: _Runtime, messages: list[BaseMessage], kwargs: dict[str, Any]) -> Any:
        if rt.upstream is None:
            return None
        payload = {"max_tokens": rt.max_tokens, **kwargs}
        return PaceRequest(rt.upstream, estimate_request_tokens(payload, messages))

    def _generic_result(self) -> Callable[[BaseException], ChatResult] | bool:
        setting = self._generic
        if setting is None:
            return self._policy_generic(
                lambda text: ChatResult(
                    generations=[ChatGeneration(message=AIMessage(content=text))]
                )
            )
        if setting is False or self._rt_by_input():
            return False
        policy = self._policy

        def make(error: BaseException) -> ChatResult:
            text = c.generic_text(setting, error, policy)
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

        return make

    def _generic_chunks(self) -> Callable[[BaseException], list[ChatGenerationChunk]] | bool:
        setting = self._generic
        if setting is None:
            return self._policy_generic(
                lambda text: [ChatGenerationChunk(message=AIMessageChunk(content=text))]
            )
        if setting is False or self._rt_by_input():
            return False
        policy = self._policy

        def make(error: BaseException) -> list[ChatGenerationChunk]:
            text = c.generic_text(setting, error, policy)
            return [ChatGenerationChunk(message=AIMessageChunk(content=text))]

        return make

    def _rt_by_input(self) -> bool:
        setting = self._generic
        return callable(setting) and generic_arity(setting) == 2

    def _policy_generic(self, wrap: Callable[[str], Any]) -> Callable[[BaseException], Any] | bool:
        """The policy's own `generic_fallback`, wrapped into LangChain objects."""
        gen = self._policy.generic_fallback
        if gen is False or gen is None:
            return False
        policy = self._policy

        def make(error: BaseException) -> Any:
            value = gen(error) if callable(gen) else c.generic_text(gen, error, policy)
            return value if not isinstance(value, str) else wrap(value)

        return make

    def _annotate(self, result: ChatResult, served: Served[Any]) -> ChatResult:
        meta = served.metadata()
        for gen in result.generations:
            msg = gen.message
            msg.response_metadata = {**msg.response_metadata, "resilience": meta}
        if served.degraded:
            note_degraded(meta)
        return result

    # -- the four hooks -----------------------------------------------------------------------
    # A request for tools or a response_format (`kind`) is never answered with generic
    # text: a cached answer of the same call or a fallback model's, else
    # UpstreamUnavailableError from the upstream error.
    def _failed(self, exc: Exception, kind: str | None) -> Exception:
        """The exception to raise for a failed call (parse failures counted once)."""
        if parse_failure_in(exc):
            mark_counted(exc)
            return exc
        if kind is not None:
            typed = unavailable(exc, self._rt.policy, kind)
            if typed is not None:
                typed.__cause__ = exc
                return typed
        return exc

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        rt: _Runtime = self.__pydantic_private__["_rt"]  # type: ignore[index]
        policy = rt.policy
        kind = expected_type(kwargs) if kwargs else None
        try:
            served = policy.execute(
                rt.primary.generate,
                (messages, stop, run_manager),
                kwargs,
                key=self._key(rt, messages, stop, kwargs),
                codec=c.CHAT_RESULT_CODEC,
                fallbacks=rt.fb_sync,
                generic=_generic_for(rt, messages, kind, False),
                pace=self._pace(rt, messages, kwargs),
            )
        except Exception as exc:
            c.dispatch(run_manager, c.event_data("chat_model", policy, None, exc))
            raised = self._failed(exc, kind)
            if raised is exc:
                raise
            raise raised from exc
        if run_manager is not None and run_manager.handlers:
            c.dispatch(run_manager, c.event_data("chat_model", policy, served))
        return self._annotate(served.value, served)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        rt: _Runtime = self.__pydantic_private__["_rt"]  # type: ignore[index]
        policy = rt.policy
        kind = expected_type(kwargs) if kwargs else None
        try:
            served = await policy.aexecute(
                rt.primary.agenerate,
                (messages, stop, run_manager),
                kwargs,
                key=self._key(rt, messages, stop, kwargs),
                codec=c.CHAT_RESULT_CODEC,
                fallbacks=rt.fb_async,
                generic=_generic_for(rt, messages, kind, False),
                pace=self._pace(rt, messages, kwargs),
            )
        except Exception as exc:
            await c.adispatch(run_manager, c.event_data("chat_model", policy, None, exc))
            raised = self._failed(exc, kind)
            if raised is exc:
                raise
            raise raised from exc
        if run_manager is not None and run_manager.handlers:
            await c.adispatch(run_manager, c.event_data("chat_model", policy, served))
        return self._annotate(served.value, served)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        rt: _Runtime = self.__pydantic_private__["_rt"]  # type: ignore[index]
        policy = rt.policy
        kind = expected_type(kwargs) if kwargs else None
        box: list[Served[None]] = []
        stream = policy.execute_stream(
            rt.primary.stream_chunks,
            (messages, stop, run_manager),
            kwargs,
            key=self._key(rt, messages, stop, kwargs),
            codec=c.CHUNKS_CODEC,
            fallbacks=rt.fb_stream,
            generic=_generic_for(rt, messages, kind, True),
            on_served=box.append,
            pace=self._pace(rt, messages, kwargs),
        )
        first = True
        try:
            for chunk in stream:
                if first:
                    first = False
                    chunk = self._mark_chunk(chunk, box, run_manager)
                yield chunk
        except Exception as exc:
            c.dispatch(
                run_manager, c.event_data("chat_model", policy, None, exc, streamed=not first)
            )
            raised = self._failed(exc, kind if first else None)
            if raised is exc:
                raise
            raise raised from exc

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        rt: _Runtime = self.__pydantic_private__["_rt"]  # type: ignore[index]
        policy = rt.policy
        kind = expected_type(kwargs) if kwargs else None
        box: list[Served[None]] = []
        stream = policy.aexecute_stream(
            rt.primary.astream_chunks,
            (messages, stop, run_manager),
            kwargs,
            key=self._key(rt, messages, stop, kwargs),
            codec=c.CHUNKS_CODEC,
            fallbacks=rt.fb_astream,
            generic=_generic_for(rt, messages, kind, True),
            on_served=box.append,
            pace=self._pace(rt, messages, kwargs),
        )
        first = True
        try:
            async for chunk in stream:
                if first:
                    first = False
                    chunk = self._mark_chunk(chunk, box, None)
                    if box:
                        await c.adispatch(run_manager, c.event_data("chat_model", policy, box[0]))
                yield chunk
        except Exception as exc:
            await c.adispatch(
                run_manager, c.event_data("chat_model", policy, None, exc, streamed=not first)
            )
            raised = self._failed(exc, kind if first else None)
            if raised is exc:
                raise
            raise raised from exc

    def _mark_chunk(
        self,
        chunk: ChatGenerationChunk,
        box: list[Served[None]],
        run_manager: CallbackManagerForLLMRun | None,
    ) -> ChatGenerationChunk:
        """Metadata goes on the first chunk only: chunk merging would concatenate it."""
        if not box:
            return chunk
        served = box[0]
        meta = served.metadata()
        msg = chunk.message
        chunk = ChatGenerationChunk(
            message=msg.model_copy(
                update={"response_metadata": {**msg.response_metadata, "resilience": meta}}
            ),
            generation_info=chunk.generation_info,
        )
        if served.degraded:
            note_degraded(meta)
        if run_manager is not None:
            c.dispatch(run_manager, c.event_data("chat_model", self._policy, served))
        return chunk

    # -- tools and structured output ------------------------------------------------------------
    def _rebind(self, bound: Runnable[Any, Any]) -> Runnable[Any, Any] | None:
        """`inner.bind(...)` -> the same binding on this wrapper; None if not that shape."""
        if isinstance(bound, RunnableBinding) and bound.bound is self.llm:
            binding = self.bind(**bound.kwargs)
            return binding.with_config(bound.config) if bound.config else binding
        return None

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """The inner model formats the tools; the call goes through this wrapper."""
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        bound = self.llm.bind_tools(tools, **kwargs)
        rebound = self._rebind(bound)
        if rebound is None:
            from .runnable import with_resilience

            rebound = with_resilience(bound, policy=self._policy, generic_fallback=False)
        if not self._rt_by_input():  # the binding itself, as the inner model returns it
            return rebound
        return self._typed(rebound, "tool call", 0)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        parse_retries: int | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """The inner model's structured-output pipeline, its model step replaced by this one.

        A parse or validation failure is the model's answer: raised as the inner model's
        pipeline raises it (retried `parse_retries` times if asked; default: this wrapper's
        `parse_retries`). In an outage: a cached answer of the same call, a fallback
        model's, the typed `generic_fallback(input, error)`, else UpstreamUnavailableError.
        """
        pipeline = self.llm.with_structured_output(schema, include_raw=include_raw, **kwargs)
        rebuilt = self._rebuild(pipeline)
        if rebuilt is None:
            from .runnable import with_resilience

            rebuilt = with_resilience(pipeline, policy=self._policy, generic_fallback=False)
        retries = self.parse_retries if parse_retries is None else parse_retries
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"parse_retries must be an int >= 0, got {retries!r}")
        return self._typed(rebuilt, "structured output", retries)

    def _typed(self, runnable: Runnable[Any, Any], expected: str, retries: int) -> TypedOutput:
        generic = self._generic if self._rt_by_input() else None
        return TypedOutput(
            bound=runnable,
            policy=self._policy,
            parse_retries=retries,
            generic=generic,
            expected=expected,
        )

    def _rebuild(self, runnable: Runnable[Any, Any]) -> Runnable[Any, Any] | None:
        rebound = self._rebind(runnable)
        if rebound is not None:
            return rebound
        if isinstance(runnable, RunnableSequence):
            first = self._rebuild(runnable.first)
            if first is not None:
                return RunnableSequence(first, *runnable.middle, runnable.last, name=runnable.name)
        steps = getattr(runnable, "steps__", None)  # RunnableParallel (include_raw=True)
        if isinstance(steps, dict):
            new = {k: self._rebuild(v) for k, v in steps.items()}
            if any(v is not None for v in new.values()):
                from langchain_core.runnables import RunnableParallel

                merged: dict[str, Any] = {
                    k: (new[k] if new[k] is not None else v) for k, v in steps.items()
                }
                return RunnableParallel(merged)
        return None


ResilientChatModel = ResilientLLM
"""Alias: the same class."""


# LangChain inspects `_generate`/`_agenerate` on every call to see whether they take a
# run manager (`inspect.signature`, a few microseconds each time). A precomputed
# `__signature__` is what `inspect` returns first: same answer, without the work.
for _hook in (ResilientLLM._generate, ResilientLLM._agenerate):
    _hook.__signature__ = inspect.signature(_hook)  # type: ignore[union-attr]
del _hook
