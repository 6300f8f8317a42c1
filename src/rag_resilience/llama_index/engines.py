"""Whole-pipeline resilience: `ResilientQueryEngine` and `ResilientChatEngine`.

In RAG the query embedding fails before the LLM is reached, so an answer cache behind
the LLM alone cannot help a user during an outage. These wrappers put the whole engine
behind a policy with a last-known-good answer cache keyed on the question: a known
question gets its last answer with its age, a new one the generic message, and
``response.metadata["resilience"]`` says how it was served. Nothing raises for an
upstream outage; the caller's own errors (bad key, bad request) still do.

When the wrapped models are themselves Resilient*, an inner degraded answer is noticed
(a context variable records it): an LLM answer from its cache is returned as "cache" and
never stored as a fresh answer; an inner generic answer makes the engine prefer its own
cached answer for the question.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.core.base.response.schema import RESPONSE_TYPE, Response
from llama_index.core.callbacks import CallbackManager
from llama_index.core.chat_engine.types import (
    AGENT_CHAT_RESPONSE_TYPE,
    AgentChatResponse,
    BaseChatEngine,
    StreamingAgentChatResponse,
)
from llama_index.core.prompts.mixin import PromptMixinType
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.storage.docstore.utils import doc_to_json, json_to_doc

from ..degraded import DegradedScope, track_degraded
from ..errors import ResilienceError, mark_handled
from ..knobs import check_unknown, pop_knobs
from ..knobs import resolve_policy as resolve_knobs
from ..policy import CacheHooks, ResiliencePolicy, Served
from ._common import GenericSpec, generic_text, jsonable, resolve_policy, warn_self_retrying

__all__ = ["ResilientChatEngine", "ResilientQueryEngine"]

_BAD_INNER_SOURCES = frozenset({"generic_fallback", "rejected"})


class InnerDegradedError(ResilienceError):
    """A wrapped component answered with a generic message: try the engine's own cache first."""

    def __init__(self, response: Any, seen: list[dict[str, Any]]) -> None:
        self.response = response
        self.seen = seen
        sources = sorted({str(s.get("source")) for s in seen})
        super().__init__(f"a wrapped component served a degraded answer ({', '.join(sources)})")
        mark_handled(self)  # the inner policy already retried: never retry the whole engine


def _checked(response: Any, scope: DegradedScope) -> tuple[Any, list[dict[str, Any]]]:
    """The inner response, with what inner wrappers served degraded while it was made. A
    generic (or rejected) inner answer raises, so the engine tries its own cache first."""
    seen = scope.snapshot()
    if any(s.get("source") in _BAD_INNER_SOURCES for s in seen):
        raise InnerDegradedError(response, seen)
    return response, seen


def _encode_nodes(nodes: list[NodeWithScore]) -> list[dict[str, Any]]:
    out = []
    for item in nodes:
        node = item.node
        if getattr(node, "embedding", None) is not None:
            node = node.model_copy(update={"embedding": None})
        out.append({"node": jsonable(doc_to_json(node)), "score": item.score})
    return out


def _decode_nodes(data: Any) -> list[NodeWithScore]:
    return [NodeWithScore(node=json_to_doc(d["node"]), score=d.get("score")) for d in data or ()]


def _user_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    return {k: jsonable(v) for k, v in (metadata or {}).items() if k != "resilience"}


def _served_meta(served: Served[Any], seen: list[dict[str, Any]]) -> dict[str, Any]:
    """How the answer was served; a live engine answer built on an inner cached answer is
    reported as "cache" with the oldest inner age."""
    meta = served.metadata()
    if not served.degraded and seen:
        ages = [s["age_s"] for s in seen if s.get("age_s") is not None]
        meta.update(
            source=str(seen[0].get("source", "cache")),
            degraded=True,
            age_s=max(ages) if ages else None,
        )
    if seen:
        meta["components"] = seen
    return meta


def _with_knobs(
    owner: str, policy: ResiliencePolicy | str | None, knobs: dict[str, Any], name: str
) -> ResiliencePolicy | str | None:
    """Policy knobs as keywords (``max_retries=1``...) override the preset, as on the
    model wrappers; an unknown keyword raises TypeError naming the accepted ones."""
    if not knobs:
        return policy
    given = dict(knobs)
    checked = pop_knobs(owner, given)
    check_unknown(owner, given, ("policy", "generic_fallback", "name"))
    resolved: ResiliencePolicy = resolve_knobs(owner, policy, checked, name=name)
    return resolved


class _AnswerCache:
    """The engine's last-known-good answers in the policy's GracefulFallbacks (JSON values)."""

    def __init__(self, policy: ResiliencePolicy, namespace: str) -> None:
        self.policy = policy
        self.namespace = namespace

    def key(self, question: str) -> list[str]:
        return [self.namespace, question]

    def hooks(self, question: str, encode: Any, decode: Any) -> CacheHooks | None:
        cache = self.policy.fallbacks
        if cache is None:
            return None
        key = self.key(question)

        def store(value: Any) -> None:
            response, seen = value
            data = encode(response)
            if not seen and data is not None:  # never refresh the cache with a degraded answer
                cache.update_cache(key, data)

        def lookup() -> tuple[Any, float] | None:
            found = cache.get_last_known_good(key)
            return None if found is None else (decode(found[0]), found[1])

        return CacheHooks(store, lookup)


def _question(query: QueryBundle | str) -> str:
    return query.query_str if isinstance(query, QueryBundle) else str(query)


class ResilientQueryEngine(BaseQueryEngine):
    """A query engine behind a policy with a last-known-good answer per question.

    >>> engine = ResilientQueryEngine(index.as_query_engine(), policy="balanced")
    >>> engine.query("What is X?").metadata["resilience"]
    {'source': 'live', 'attempts': 1, 'age_s': None, 'degraded': False}
    """

    def __init__(
        self,
        query_engine: BaseQueryEngine,
        policy: ResiliencePolicy | str | None = None,
        *,
        generic_fallback: GenericSpec = True,
        name: str | None = None,
        callback_manager: CallbackManager | None = None,
        **knobs: Any,
    ) -> None:
        policy = _with_knobs(
            "ResilientQueryEngine", policy, knobs, name or "llama_index.query_engine"
        )
        if not hasattr(query_engine, "query"):
            raise ValueError(
                f"query_engine must be a llama_index query engine, got {type(query_engine).__name__}"
            )
        if not (isinstance(generic_fallback, (bool, str)) or callable(generic_fallback)):
            raise ValueError("generic_fallback must be a bool, a string or a callable error -> str")
        self._inner = query_engine
        self._policy = resolve_policy(policy, name=name or "llama_index.query_engine")
        warn_self_retrying(query_engine, self._policy, "ResilientQueryEngine")
        self._generic = generic_fallback
        self._cache = _AnswerCache(self._policy, f"llama_index.query:{self._policy.name}")
        super().__init__(
            callback_manager=callback_manager or getattr(query_engine, "callback_manager", None)
        )

    @property
    def query_engine(self) -> BaseQueryEngine:
        return self._inner

    @property
    def policy(self) -> ResiliencePolicy:
        return self._policy

    def stats(self) -> dict[str, Any]:
        return self._policy.stats()

    def _get_prompt_modules(self) -> PromptMixinType:
        return {"query_engine": self._inner}

    # -- codec ---------------------------------------------------------------------------
    @staticmethod
    def _encode(response: Any) -> dict[str, Any] | None:
        if not isinstance(response, Response):  # streaming responses are not cached
            return None
        return {
            "response": response.response,
            "source_nodes": _encode_nodes(response.source_nodes),
            "metadata": _user_metadata(response.metadata),
        }

    @staticmethod
    def _decode(data: Any) -> Response:
        return Response(
            response=data.get("response"),
            source_nodes=_decode_nodes(data.get("source_nodes")),
            metadata=dict(data.get("metadata") or {}),
        )

    def _generic_response(self) -> Any:
        if self._generic is False:
            return False

        def make(error: BaseException) -> Any:
            if isinstance(error, InnerDegradedError):
                return error.response
            return Response(
                response=str(generic_text(self._generic, error, self._policy)),
                source_nodes=[],
                metadata={},
            )

        return make

    # -- runs ----------------------------------------------------------------------------
    def _run(self, query_bundle: QueryBundle) -> tuple[Any, list[dict[str, Any]]]:
        with track_degraded(self._policy) as scope:
            inner = self._inner
            response = (
                inner._query(query_bundle)
                if isinstance(inner, BaseQueryEngine)
                else inner.query(query_bundle)
            )
        return _checked(response, scope)

    async def _arun(self, query_bundle: QueryBundle) -> tuple[Any, list[dict[str, Any]]]:
        with track_degraded(self._policy) as scope:
            inner = self._inner
            response = await (
                inner._aquery(query_bundle)
                if isinstance(inner, BaseQueryEngine)
                else inner.aquery(query_bundle)
            )
        return _checked(response, scope)

    def _finish(self, served: Served[Any]) -> RESPONSE_TYPE:
        value = served.value
        seen: list[dict[str, Any]] = []
        if isinstance(value, tuple):
            value, seen = value
        elif isinstance(served.error, InnerDegradedError):
            seen = served.error.seen
        if getattr(value, "metadata", None) is None:
            value.metadata = {}
        value.metadata["resilience"] = _served_meta(served, seen)
        return value  # type: ignore[no-any-return]

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        served = self._policy.execute(
            self._run,
            (query_bundle,),
            cache=self._cache.hooks(query_bundle.query_str, self._encode, self._decode),
            generic=self._generic_response(),
        )
        return self._finish(served)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        served = await self._policy.aexecute(
            self._arun,
            (query_bundle,),
            cache=self._cache.hooks(query_bundle.query_str, self._encode, self._decode),
            generic=self._generic_response(),
        )
        return self._finish(served)

    def __getattr__(self, name: str) -> Any:
        # Everything else (retriever, synthesizer, ...) is the wrapped engine's.
        if name.startswith("__") or "_inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_inner"], name)


def _degraded_stream_response(response: AgentChatResponse) -> StreamingAgentChatResponse:
    """A finished stream carrying a degraded answer (nothing written to memory)."""
    text = response.response

    def gen() -> Generator[ChatResponse, None, None]:
        yield ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=text
        )

    async def agen() -> AsyncGenerator[ChatResponse, None]:
        yield ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=text
        )

    stream = StreamingAgentChatResponse(
        response=text,
        sources=list(response.sources),
        chat_stream=gen(),
        achat_stream=agen(),
        source_nodes=list(response.source_nodes),
        is_writing_to_memory=False,
    )
    stream.metadata = response.metadata  # type: ignore[attr-defined]
    return stream


class ResilientChatEngine(BaseChatEngine):
    """A chat engine behind a policy with a last-known-good answer per message.

    The cache is keyed on the user's message (not the history): during an outage a
    question asked before gets its last answer, with its age. Degraded answers are not
    written to the engine's memory. `stream_chat` protects the part of the call made
    before streaming starts (condensing, retrieval); the stream itself is protected by a
    `ResilientLLM`.
    """

    def __init__(
        self,
        chat_engine: BaseChatEngine,
        policy: ResiliencePolicy | str | None = None,
        *,
        generic_fallback: GenericSpec = True,
        name: str | None = None,
        **knobs: Any,
    ) -> None:
        policy = _with_knobs(
            "ResilientChatEngine", policy, knobs, name or "llama_index.chat_engine"
        )
        if not hasattr(chat_engine, "chat"):
            raise ValueError(
                f"chat_engine must be a llama_index chat engine, got {type(chat_engine).__name__}"
            )
        if not (isinstance(generic_fallback, (bool, str)) or callable(generic_fallback)):
            raise ValueError("generic_fallback must be a bool, a string or a callable error -> str")
        self._inner = chat_engine
        self._policy = resolve_policy(policy, name=name or "llama_index.chat_engine")
        warn_self_retrying(chat_engine, self._policy, "ResilientChatEngine")
        self._generic = generic_fallback
        self._cache = _AnswerCache(self._policy, f"llama_index.chat:{self._policy.name}")

    @property
    def chat_engine(self) -> BaseChatEngine:
        return self._inner

    @property
    def policy(self) -> ResiliencePolicy:
        return self._policy

    def stats(self) -> dict[str, Any]:
        return self._policy.stats()

    @property
    def chat_history(self) -> list[ChatMessage]:
        return self._inner.chat_history

    def reset(self) -> None:
        self._inner.reset()

    # -- codec ---------------------------------------------------------------------------
    @staticmethod
    def _encode(response: Any) -> dict[str, Any] | None:
        if isinstance(response, StreamingAgentChatResponse):
            return None
        return {
            "response": response.response,
            "source_nodes": _encode_nodes(response.source_nodes),
            "metadata": _user_metadata(response.metadata),
        }

    @staticmethod
    def _decode(data: Any) -> AgentChatResponse:
        return AgentChatResponse(
            response=data.get("response") or "",
            source_nodes=_decode_nodes(data.get("source_nodes")),
            metadata=dict(data.get("metadata") or {}),
        )

    def _generic_response(self) -> Any:
        if self._generic is False:
            return False

        def make(error: BaseException) -> Any:
            if isinstance(error, InnerDegradedError):
                return error.response
            return AgentChatResponse(
                response=str(generic_text(self._generic, error, self._policy)), metadata={}
            )

        return make

    def _hooks(self, message: str) -> CacheHooks | None:
        return self._cache.hooks(message, self._encode, self._decode)

    def _finish(self, served: Served[Any], streaming: bool = False) -> Any:
        value = served.value
        seen: list[dict[str, Any]] = []
        if isinstance(value, tuple):
            value, seen = value
        elif isinstance(served.error, InnerDegradedError):
            seen = served.error.seen
        meta = _served_meta(served, seen)
        if streaming and isinstance(value, AgentChatResponse):
            value.metadata = {**(value.metadata or {}), "resilience": meta}
            return _degraded_stream_response(value)
        if isinstance(value, AgentChatResponse):
            value.metadata = {**(value.metadata or {}), "resilience": meta}
        else:
            current = getattr(value, "metadata", None)
            value.metadata = {**(current or {}), "resilience": meta}
        return value

    # -- sync ----------------------------------------------------------------------------
    def chat(
        self, message: str, chat_history: list[ChatMessage] | None = None
    ) -> AGENT_CHAT_RESPONSE_TYPE:
        def run() -> tuple[Any, list[dict[str, Any]]]:
            with track_degraded(self._policy) as scope:
                response = self._inner.chat(message, chat_history)
            return _checked(response, scope)

        served = self._policy.execute(
            run, cache=self._hooks(message), generic=self._generic_response()
        )
        result: AGENT_CHAT_RESPONSE_TYPE = self._finish(served)
        return result

    def stream_chat(
        self, message: str, chat_history: list[ChatMessage] | None = None
    ) -> StreamingAgentChatResponse:
        def run() -> tuple[Any, list[dict[str, Any]]]:
            with track_degraded(self._policy) as scope:
                response = self._inner.stream_chat(message, chat_history)
            return _checked(response, scope)

        served = self._policy.execute(
            run, cache=self._hooks(message), generic=self._generic_response()
        )
        result: StreamingAgentChatResponse = self._finish(served, streaming=True)
        return result

    # -- async ---------------------------------------------------------------------------
    async def achat(
        self, message: str, chat_history: list[ChatMessage] | None = None
    ) -> AGENT_CHAT_RESPONSE_TYPE:
        async def run() -> tuple[Any, list[dict[str, Any]]]:
            with track_degraded(self._policy) as scope:
                response = await self._inner.achat(message, chat_history)
            return _checked(response, scope)

        served = await self._policy.aexecute(
            run, cache=self._hooks(message), generic=self._generic_response()
        )
        result: AGENT_CHAT_RESPONSE_TYPE = self._finish(served)
        return result

    async def astream_chat(
        self, message: str, chat_history: list[ChatMessage] | None = None
    ) -> StreamingAgentChatResponse:
        async def run() -> tuple[Any, list[dict[str, Any]]]:
            with track_degraded(self._policy) as scope:
                response = await self._inner.astream_chat(message, chat_history)
            return _checked(response, scope)

        served = await self._policy.aexecute(
            run, cache=self._hooks(message), generic=self._generic_response()
        )
        result: StreamingAgentChatResponse = self._finish(served, streaming=True)
        return result

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_inner"], name)
