"""Whole-chain resilience: `with_resilience(chain)` / `ResilientRunnable`.

In RAG the query embedding fails before the LLM is reached, so during an outage a new
question never gets to ResilientLLM's fallback. Wrapping the whole chain adds a
last-known-good cache keyed on the chain input: a known question gets its last answer
(with age), a new one the generic message, as in the seed's ProductionRAG.

An output that inner wrappers produced degraded (a cached or generic LLM answer inside
a chain that "succeeded") is reported as degraded and never stored as last-known-good;
when an inner wrapper answered with its generic text and this wrapper holds a real answer
for the input, the real (cached) answer is served instead.

The degraded answer keeps the chain's output type: a cached output, the user's
``generic_fallback(input, error)``, the generic text for a text (or message) output, and
for a dict output the same keys with the generic text under ``answer_key``. Anything else
raises `UpstreamUnavailableError` from the upstream error.
"""

from __future__ import annotations

import types
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, Field, PrivateAttr

from ..degraded import DegradedScope, enter_scope, exit_scope
from ..fallback import stable_key
from ..knobs import check_given_policy, check_unknown, pop_knobs, resolve_policy
from ..policy import CacheHooks, Codec, ResiliencePolicy, Served
from ..policy_core import _NO_KEY
from . import _common as c
from . import dropin
from .typed import generic_arity, unavailable

__all__ = ["ResilientRunnable", "with_resilience"]


class ResilientRunnable(RunnableSerializable[Any, Any]):
    """Any Runnable under a policy, with a last-known-good cache keyed on its input."""

    bound: Runnable[Any, Any]
    policy: Any = None
    generic_fallback: bool | str | Callable[..., Any] | None = True
    cache_answers: bool = True
    answer_key: str | None = None
    """For a chain returning a dict: the key that holds the answer text. A new input
    during an outage then gets the same keys, the generic text under this one."""
    policy_overrides: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _policy: ResiliencePolicy = PrivateAttr()
    _generic: Any = PrivateAttr(default=True)
    _prefix: str = PrivateAttr(default="")
    # Output types are often unannotated (Any): remember whether live outputs were
    # messages so the generic answer has the same shape.
    _msg_out: list[bool] = PrivateAttr(default_factory=lambda: [False])
    # ... and the shape of the last live output: "text", "message", "dict" or "other",
    # with a dict's keys and the kind of each value (to build a generic dict)
    _shape: list[Any] = PrivateAttr(default_factory=lambda: [None, None])

    def __init__(self, bound: Runnable[Any, Any] | None = None, /, **data: Any) -> None:
        if bound is not None:
            data["bound"] = bound
        owner = type(self).__name__
        knobs = pop_knobs(owner, data)
        check_given_policy(owner, data.get("policy"), knobs)
        if knobs:
            data["policy_overrides"] = {**data.get("policy_overrides", {}), **knobs}
        check_unknown(owner, data, dropin.field_names(type(self)))
        if "bound" in data and not isinstance(data["bound"], Runnable):
            raise TypeError(
                f"{owner}: expected a LangChain Runnable to wrap, got {type(data['bound']).__name__}"
            )
        super().__init__(**data)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if self.policy is not None and not isinstance(self.policy, (str, ResiliencePolicy)):
            raise ValueError(
                "policy must be a ResiliencePolicy, a preset name or None, got "
                f"{type(self.policy).__name__}"
            )
        given = isinstance(self.policy, ResiliencePolicy)
        generic = self.generic_fallback
        if generic is None and not given:
            generic = True
        name = self.name or self.bound.get_name()
        self._policy = resolve_policy(
            type(self).__name__,
            self.policy,
            self.policy_overrides,
            name=f"langchain-chain:{name}",
            generic_fallback=(
                False
                if generic is None or (callable(generic) and not isinstance(generic, str))
                else generic
            ),
        )
        self._generic = generic
        self._prefix = f"{self._policy.name}:{name}"
        self._shape[0] = _shape_of_type(self.bound.OutputType)
        dropin.warn_self_retrying(self.bound, self._policy, type(self).__name__)

    @property
    def InputType(self) -> Any:
        return self.bound.InputType

    @property
    def OutputType(self) -> Any:
        return self.bound.OutputType

    @property
    def resilience_policy(self) -> ResiliencePolicy:
        return self._policy

    def stats(self) -> dict[str, Any]:
        return self._policy.stats()

    # -- helpers -------------------------------------------------------------------------
    def _generic_value(
        self, input: Any, mismatch: list[str]
    ) -> Callable[[BaseException], Any] | bool:
        """The generic answer for `input`, of the chain's output type; when the type has no
        generic form, it returns None (nothing to serve) and notes what was expected in
        `mismatch`, so the call raises UpstreamUnavailableError."""
        setting = self._generic
        policy = self._policy
        if setting is None:
            gen = policy.generic_fallback
            if gen is False or gen is None:
                return False
            setting_any: Any = gen
        elif setting is False:
            return False
        else:
            setting_any = setting
        typed = _is_message_type(self.bound.OutputType)
        seen = self._msg_out
        shape, template = self._shape
        answer_key = self.answer_key
        by_input = callable(setting_any) and generic_arity(setting_any) == 2

        def make(error: BaseException) -> Any:
            if by_input:
                return setting_any(input, error)
            if shape == "other":
                mismatch.append("output of this chain (not text)")
                return None
            if shape == "dict" and answer_key is None:
                mismatch.append("dict output of this chain (name its answer_key for a generic)")
                return None
            wants_message = typed or seen[0]
            if callable(setting_any):
                value = setting_any(error)
            else:
                value = c.generic_text(setting_any, error, policy)
            if shape == "dict" and isinstance(value, str):
                assert answer_key is not None
                return _generic_dict(template, input, answer_key, value)
            if wants_message and isinstance(value, str):
                return AIMessage(content=value)
            return value

        return make

    def _raise_typed(self, exc: Exception, mismatch: list[str]) -> None:
        if not mismatch:
            return
        typed = unavailable(exc, self._policy, mismatch[0])
        if typed is not None:
            raise typed from exc

    def _prefer_cached(self, served: Served[Any], scope: DegradedScope, key: str) -> Served[Any]:
        """An inner wrapper's generic answer must not beat a real answer held here."""
        if served.degraded or not scope.degraded or not self._cache_on():
            return served
        if not any(m.get("source") in _GENERIC_SOURCES for m in scope.snapshot()):
            return served
        fallbacks = self._policy.fallbacks
        assert fallbacks is not None
        found = fallbacks.get_last_known_good(key)
        return served if found is None else _from_cache(served, found)

    async def _aprefer_cached(
        self, served: Served[Any], scope: DegradedScope, key: str
    ) -> Served[Any]:
        if served.degraded or not scope.degraded or not self._cache_on():
            return served
        if not any(m.get("source") in _GENERIC_SOURCES for m in scope.snapshot()):
            return served
        fallbacks = self._policy.fallbacks
        assert fallbacks is not None
        found = await fallbacks.aget_last_known_good(key)
        return served if found is None else _from_cache(served, found)

    def _key(self, value: Any) -> str:
        return c.input_key(self._prefix, value)

    def _hooks(self, key: str, scope: DegradedScope) -> CacheHooks:
        fallbacks = self._policy.fallbacks
        assert fallbacks is not None

        def store(value: Any) -> None:
            if not scope.degraded:
                fallbacks.update_cache(key, c.encode_output(value))

        def lookup() -> tuple[Any, float] | None:
            found = fallbacks.get_last_known_good(key)
            return None if found is None else (c.decode_output(found[0]), found[1])

        return CacheHooks(store, lookup)

    def _ahooks(self, key: str, scope: DegradedScope) -> CacheHooks:
        fallbacks = self._policy.fallbacks
        assert fallbacks is not None

        async def store(value: Any) -> None:
            if not scope.degraded:
                await fallbacks.aupdate_cache(key, c.encode_output(value))

        async def lookup() -> tuple[Any, float] | None:
            found = await fallbacks.aget_last_known_good(key)
            return None if found is None else (c.decode_output(found[0]), found[1])

        return CacheHooks(store, lookup)

    def _meta(self, served: Served[Any], scope: DegradedScope) -> dict[str, Any]:
        meta = served.metadata()
        if not served.degraded and scope.degraded:
            inner = scope.served[-1]
            ages = [m["age_s"] for m in scope.served if m.get("age_s") is not None]
            meta.update(
                source=inner.get("source", "cache"),
                degraded=True,
                age_s=max(ages) if ages else None,
                via="inner",
            )
            # built on a degraded inner answer: a degraded call, not a live one
            self._policy.count_inner_degraded(str(meta["source"]))
        return meta

    def _finish(self, output: Any, meta: dict[str, Any], run_manager: Any) -> Any:
        if not meta["degraded"]:
            self._msg_out[0] = isinstance(output, BaseMessage)
            self._remember_shape(output)
        if meta["degraded"]:
            output = _annotate(output, meta)
        if run_manager is not None:
            data = c.event_data("chain", self._policy, None)
            data.update(meta)
            c.dispatch(run_manager, data)
        return output

    def _remember_shape(self, output: Any) -> None:
        if isinstance(output, dict):
            self._shape[:] = ["dict", {str(k): type(v) for k, v in output.items()}]
        elif isinstance(output, BaseMessage):
            self._shape[:] = ["message", None]
        elif isinstance(output, str):
            self._shape[:] = ["text", None]
        elif output is not None:
            self._shape[:] = ["other", None]

    # -- invoke ----------------------------------------------------------------------------
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(
            lambda x, run_manager, config: self._invoke(x, run_manager, config, **kwargs),
            input,
            config,
        )

    def _invoke(self, input: Any, run_manager: Any, config: RunnableConfig, **kwargs: Any) -> Any:
        child = config  # LangChain already bound the child callbacks
        scope, token = enter_scope(self._policy)
        mismatch: list[str] = []
        key = self._key(input)
        try:
            served = self._policy.execute(
                lambda x: self.bound.invoke(x, child, **kwargs),
                (input,),
                cache=self._hooks(key, scope) if self._cache_on() else None,
                generic=self._generic_value(input, mismatch),
            )
        except Exception as exc:
            c.dispatch(run_manager, c.event_data("chain", self._policy, None, exc))
            self._raise_typed(exc, mismatch)
            raise
        finally:
            exit_scope(token)
        served = self._prefer_cached(served, scope, key)
        return self._finish(served.value, self._meta(served, scope), run_manager)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(
            lambda x, run_manager, config: self._ainvoke(x, run_manager, config, **kwargs),
            input,
            config,
        )

    async def _ainvoke(
        self, input: Any, run_manager: Any, config: RunnableConfig, **kwargs: Any
    ) -> Any:
        child = config  # LangChain already bound the child callbacks
        scope, token = enter_scope(self._policy)
        mismatch: list[str] = []
        key = self._key(input)
        try:
            served = await self._policy.aexecute(
                lambda x: self.bound.ainvoke(x, child, **kwargs),
                (input,),
                cache=self._ahooks(key, scope) if self._cache_on() else None,
                generic=self._generic_value(input, mismatch),
            )
        except Exception as exc:
            await c.adispatch(run_manager, c.event_data("chain", self._policy, None, exc))
            self._raise_typed(exc, mismatch)
            raise
        finally:
            exit_scope(token)
        served = await self._aprefer_cached(served, scope, key)
        data = c.event_data("chain", self._policy, None)
        meta = self._meta(served, scope)
        data.update(meta)
        await c.adispatch(run_manager, data)
        return self._finish(served.value, meta, None)

    def _cache_on(self) -> bool:
        return self.cache_answers and self._policy.fallbacks is not None

    # -- streams: retried until the first chunk, cached as the combined output -------------
    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        yield from self._transform_stream_with_config(
            iter([input]),
            lambda inputs, run_manager, config: self._stream(
                next(inputs), run_manager, config, **kwargs
            ),
            config,
        )

    def _stream(
        self, input: Any, run_manager: Any, config: RunnableConfig, **kwargs: Any
    ) -> Iterator[Any]:
        child = config  # LangChain already bound the child callbacks
        scope, token = enter_scope(self._policy)
        box: list[Served[None]] = []
        key = self._key(input)
        prev = self._peek(key)
        mismatch: list[str] = []
        stream = self._policy.execute_stream(
            lambda x: self.bound.stream(x, child, **kwargs),
            (input,),
            key=key if self._cache_on() else _NO_KEY,
            codec=_STREAM_CODEC,
            generic=_as_items(self._generic_value(input, mismatch)),
            on_served=box.append,
        )
        try:
            first = True
            for item in stream:
                if first:
                    first = False
                    cached = self._cached_instead(scope, prev, box)
                    if cached is not None:  # an inner generic answer: ours is real
                        close = getattr(stream, "close", None)
                        if close is not None:
                            close()
                        yield from cached
                        break
                yield item
        except Exception as exc:
            c.dispatch(run_manager, c.event_data("chain", self._policy, None, exc))
            self._raise_typed(exc, mismatch)
            raise
        finally:
            exit_scope(token)
        if scope.degraded and box and not box[0].degraded:
            self._restore(key, prev)
        if box:
            data = c.event_data("chain", self._policy, None)
            data.update(self._meta(box[0], scope))
            c.dispatch(run_manager, data)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        async def one() -> AsyncIterator[Any]:
            yield input

        async for item in self._atransform_stream_with_config(
            one(),
            lambda inputs, run_manager, config: self._astream(
                inputs, run_manager, config, **kwargs
            ),
            config,
        ):
            yield item

    async def _astream(
        self, inputs: AsyncIterator[Any], run_manager: Any, config: RunnableConfig, **kwargs: Any
    ) -> AsyncIterator[Any]:
        input = None
        async for value in inputs:
            input = value
        child = config  # LangChain already bound the child callbacks
        scope, token = enter_scope(self._policy)
        box: list[Served[None]] = []
        key = self._key(input)
        prev = self._peek(key)
        mismatch: list[str] = []
        stream = self._policy.aexecute_stream(
            lambda x: self.bound.astream(x, child, **kwargs),
            (input,),
            key=key if self._cache_on() else _NO_KEY,
            codec=_STREAM_CODEC,
            generic=_as_items(self._generic_value(input, mismatch)),
            on_served=box.append,
        )
        try:
            first = True
            async for item in stream:
                if first:
                    first = False
                    cached = self._cached_instead(scope, prev, box)
                    if cached is not None:  # an inner generic answer: ours is real
                        aclose = getattr(stream, "aclose", None)
                        if aclose is not None:
                            await aclose()
                        for value in cached:
                            yield value
                        break
                yield item
        except Exception as exc:
            await c.adispatch(run_manager, c.event_data("chain", self._policy, None, exc))
            self._raise_typed(exc, mismatch)
            raise
        finally:
            exit_scope(token)
        if scope.degraded and box and not box[0].degraded:
            self._restore(key, prev)
        if box:
            data = c.event_data("chain", self._policy, None)
            data.update(self._meta(box[0], scope))
            await c.adispatch(run_manager, data)

    def _cached_instead(
        self, scope: DegradedScope, prev: tuple[Any, float] | None, box: list[Served[None]]
    ) -> list[Any] | None:
        """A stream whose first item came from an inner wrapper's generic answer, while
        this wrapper holds a real answer for the input: that answer (decoded), and `box`
        says it was served from the cache."""
        if prev is None or not scope.degraded or (box and box[0].degraded):
            return None
        if not any(m.get("source") in _GENERIC_SOURCES for m in scope.snapshot()):
            return None
        fallbacks = self._policy.fallbacks
        if fallbacks is None:
            return None
        from ..clock import get_clock

        age = max(0.0, get_clock(fallbacks.clock).time() - prev[1])
        attempts = box[0].attempts if box else 1
        box[:] = [Served(None, "cache", attempts, round(age, 3), True)]
        items: list[Any] = _STREAM_CODEC.decode(prev[0])
        return items

    def _peek(self, key: str) -> tuple[Any, float] | None:
        """The raw cache entry (value, stored_at), to restore it if a stream turns out degraded:
        `execute_stream` has no `cache=` hooks to skip storing it (see the report)."""
        fallbacks = self._policy.fallbacks
        if fallbacks is None or not self._cache_on():
            return None
        from ..clock import get_clock

        now = get_clock(fallbacks.clock).time()
        found = fallbacks.store.cache_get(fallbacks.namespace, stable_key(key), now)
        return found

    def _restore(self, key: str, prev: tuple[Any, float] | None) -> None:
        fallbacks = self._policy.fallbacks
        if fallbacks is None:
            return
        if prev is None:
            fallbacks.invalidate(key)
            return
        fallbacks.store.cache_set(
            fallbacks.namespace,
            stable_key(key),
            prev[0],
            stored_at=prev[1],
            ttl=fallbacks.ttl,
            max_entries=fallbacks.max_entries,
        )


_GENERIC_SOURCES = frozenset({"generic_fallback", "rejected"})


def _from_cache(served: Served[Any], found: tuple[Any, float]) -> Served[Any]:
    value, age = found
    return Served(c.decode_output(value), "cache", served.attempts, age, True)


def _as_items(generic: Callable[[BaseException], Any] | bool) -> Any:
    """A stream's generic: the one generic value as a list of items (None: nothing)."""
    if not callable(generic):
        return False

    def items(error: BaseException) -> list[Any] | None:
        value = generic(error)
        return None if value is None else [value]

    return items


_EMPTY: dict[type, Any] = {list: list, dict: dict, str: str, tuple: tuple}


def _generic_dict(
    template: dict[str, type] | None, input: Any, answer_key: str, text: str
) -> dict[str, Any]:
    """The keys of the chain's last live dict: the generic text under `answer_key`, the
    input's values under the input's keys, empty values of the same kind elsewhere."""
    given = input if isinstance(input, dict) else {}
    keys = list(template) if template else [*given, answer_key]
    if answer_key not in keys:
        keys.append(answer_key)
    out: dict[str, Any] = {}
    for k in keys:
        if k == answer_key:
            out[k] = text
        elif k in given:
            out[k] = given[k]
        else:
            kind = template.get(k) if template else None
            factory = _EMPTY.get(kind) if kind is not None else None
            out[k] = factory() if factory is not None else None
    return out


def _shape_of_type(tp: Any) -> str | None:
    """The output shape a Runnable's OutputType promises, when it says: None if unknown."""
    if _is_message_type(tp):
        return "message"
    if tp is str:
        return "text"
    origin = typing.get_origin(tp) or tp
    if origin is dict or (isinstance(tp, type) and typing.is_typeddict(tp)):
        return "dict"
    try:
        from pydantic import BaseModel

        if isinstance(tp, type) and issubclass(tp, BaseModel) and not _is_message_type(tp):
            return "other"
    except TypeError:  # pragma: no cover
        pass
    return None


def _combine(items: list[Any]) -> Any:
    if not items:
        return None
    out = items[0]
    try:
        for item in items[1:]:
            out = out + item
    except TypeError:
        return items[-1]
    return out


_STREAM_CODEC = Codec(
    lambda items: c.encode_output(_combine(items)), lambda data: [c.decode_output(data)]
)


def _is_message_type(tp: Any) -> bool:
    """True for a message class, or a union of them (a chat model's OutputType is an
    ``Annotated[Union[Annotated[AIMessage, Tag], ...], Discriminator]``)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _is_message_type(typing.get_args(tp)[0])
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(_is_message_type(a) for a in args)
    try:
        return isinstance(tp, type) and issubclass(tp, BaseMessage)
    except TypeError:
        return False


def _annotate(output: Any, meta: dict[str, Any]) -> Any:
    if isinstance(output, BaseMessage):
        return output.model_copy(
            update={"response_metadata": {**output.response_metadata, "resilience": meta}}
        )
    if isinstance(output, dict):
        return {**output, "resilience": meta}
    return output


def with_resilience(
    runnable: Runnable[Any, Any],
    policy: ResiliencePolicy | str | None = None,
    *,
    generic_fallback: bool | str | Callable[..., Any] | None = True,
    cache_answers: bool = True,
    name: str | None = None,
    answer_key: str | None = None,
    **knobs: Any,
) -> ResilientRunnable:
    """Wrap any Runnable (e.g. a whole ``retriever | prompt | llm | parser`` chain).

    `answer_key`: for a chain returning a dict (``create_retrieval_chain``), the key of the
    answer text; a new input during an outage then gets the same keys with the generic
    text there (without it: UpstreamUnavailableError). `generic_fallback` may be a
    callable ``(input, error)`` returning an output of the chain's type. Policy knobs
    (``max_retries=1``...) override the preset.
    """
    return ResilientRunnable(
        runnable,
        policy=policy,
        generic_fallback=generic_fallback,
        cache_answers=cache_answers,
        name=name,
        answer_key=answer_key,
        **knobs,
    )
