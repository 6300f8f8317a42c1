"""Whole-chain resilience: `with_resilience(chain)` / `ResilientRunnable`.

In RAG the query embedding fails before the LLM is reached, so during an outage a new
question never gets to ResilientLLM's fallback. Wrapping the whole chain adds a
last-known-good cache keyed on the chain input: a known question gets its last answer
(with age), a new one the generic message, as in the seed's ProductionRAG.

An output that inner wrappers produced degraded (a cached or generic LLM answer inside
a chain that "succeeded") is reported as degraded and never stored as last-known-good.
"""

from __future__ import annotations

import types
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, PrivateAttr

from ..degraded import DegradedScope, enter_scope, exit_scope
from ..fallback import stable_key
from ..policy import _NO_KEY, CacheHooks, Codec, ResiliencePolicy, Served
from . import _common as c

__all__ = ["ResilientRunnable", "with_resilience"]


class ResilientRunnable(RunnableSerializable[Any, Any]):
    """Any Runnable under a policy, with a last-known-good cache keyed on its input."""

    bound: Runnable[Any, Any]
    policy: Any = None
    generic_fallback: bool | str | None = True
    cache_answers: bool = True

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _policy: ResiliencePolicy = PrivateAttr()
    _generic: bool | str | None = PrivateAttr(default=True)
    _prefix: str = PrivateAttr(default="")
    # Output types are often unannotated (Any): remember whether live outputs were
    # messages so the generic answer has the same shape.
    _msg_out: list[bool] = PrivateAttr(default_factory=lambda: [False])

    def __init__(self, bound: Runnable[Any, Any] | None = None, /, **data: Any) -> None:
        if bound is not None:
            data["bound"] = bound
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
        self._policy = ResiliencePolicy.resolve(
            self.policy,
            name=f"langchain-chain:{name}",
            generic_fallback=generic if generic is not None else False,
        )
        self._generic = generic
        self._prefix = f"{self._policy.name}:{name}"

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
    def _generic_value(self) -> Callable[[BaseException], Any] | bool:
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

        def make(error: BaseException) -> Any:
            wants_message = typed or seen[0]
            if callable(setting_any):
                value = setting_any(error)
            else:
                value = c.generic_text(setting_any, error, policy)
            if wants_message and isinstance(value, str):
                return AIMessage(content=value)
            return value

        return make

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
        if meta["degraded"]:
            output = _annotate(output, meta)
        if run_manager is not None:
            data = c.event_data("chain", self._policy, None)
            data.update(meta)
            c.dispatch(run_manager, data)
        return output

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
        try:
            served = self._policy.execute(
                lambda x: self.bound.invoke(x, child, **kwargs),
                (input,),
                cache=self._hooks(self._key(input), scope) if self._cache_on() else None,
                generic=self._generic_value(),
            )
        except Exception as exc:
            c.dispatch(run_manager, c.event_data("chain", self._policy, None, exc))
            raise
        finally:
            exit_scope(token)
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
        try:
            served = await self._policy.aexecute(
                lambda x: self.bound.ainvoke(x, child, **kwargs),
                (input,),
                cache=self._ahooks(self._key(input), scope) if self._cache_on() else None,
                generic=self._generic_value(),
            )
        except Exception as exc:
            await c.adispatch(run_manager, c.event_data("chain", self._policy, None, exc))
            raise
        finally:
            exit_scope(token)
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
        generic = self._generic_value()
        try:
            yield from self._policy.execute_stream(
                lambda x: self.bound.stream(x, child, **kwargs),
                (input,),
                key=key if self._cache_on() else _NO_KEY,
                codec=_STREAM_CODEC,
                generic=(lambda e: [generic(e)]) if callable(generic) else False,
                on_served=box.append,
            )
        except Exception as exc:
            c.dispatch(run_manager, c.event_data("chain", self._policy, None, exc))
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
        generic = self._generic_value()
        try:
            async for item in self._policy.aexecute_stream(
                lambda x: self.bound.astream(x, child, **kwargs),
                (input,),
                key=key if self._cache_on() else _NO_KEY,
                codec=_STREAM_CODEC,
                generic=(lambda e: [generic(e)]) if callable(generic) else False,
                on_served=box.append,
            ):
                yield item
        except Exception as exc:
            await c.adispatch(run_manager, c.event_data("chain", self._policy, None, exc))
            raise
        finally:
            exit_scope(token)
        if scope.degraded and box and not box[0].degraded:
            self._restore(key, prev)
        if box:
            data = c.event_data("chain", self._policy, None)
            data.update(self._meta(box[0], scope))
            await c.adispatch(run_manager, data)

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
    generic_fallback: bool | str | None = True,
    cache_answers: bool = True,
    name: str | None = None,
) -> ResilientRunnable:
    """Wrap any Runnable (e.g. a whole ``retriever | prompt | llm | parser`` chain)."""
    return ResilientRunnable(
        runnable,
        policy=policy,
        generic_fallback=generic_fallback,
        cache_answers=cache_answers,
        name=name,
    )
