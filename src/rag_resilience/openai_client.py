"""`ResilientOpenAIClient`: the OpenAI SDK behind a `ResiliencePolicy`.

    client = ResilientOpenAIClient(api_key=..., policy="balanced")
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])      # ChatCompletion
    client.chat.completions.create(..., stream=True)                          # chunks
    client.embeddings.create(model="text-embedding-3-small", input=[...])   # CreateEmbeddingResponse

Results are the SDK's own objects. Each carries a `resilience` attribute
(``{"source", "attempts", "age_s", "degraded"}``) so a degraded answer is never silent.
The inner client is built (or copied) with ``max_retries=0``: the SDK retries twice by
default, and wrapping it unchanged would multiply attempts (3 x 4 = 12 requests).
Everything else on the SDK client (files, models, responses, ...) is reachable through
attribute access, unprotected.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from .adapters import check_answer, request_timeout, timed_call, warn_nested_retries
from .errors import mark_malformed_response
from .fallback import stable_key
from .policy import Codec, ResiliencePolicy, Served
from .ratelimit import PaceRequest, upstream_key
from .ratelimit_instrument import instrument
from .ratelimit_tokens import estimate_request_tokens

try:
    import openai
    from openai.types import CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rag_resilience.openai_client needs the openai SDK: pip install 'rag-resilience[openai]'"
    ) from exc

__all__ = ["AsyncResilientOpenAIClient", "ResilientOpenAIClient"]

_END: Any = object()

# Request fields that do not change the answer: left out of cache keys.
_NOT_IN_KEY = frozenset(
    {
        "stream",
        "stream_options",
        "timeout",
        "extra_headers",
        "extra_query",
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    }
)
_FIX = "Build it with max_retries=0 (ResilientOpenAIClient does this when it builds the client)."


def _key(kind: str, kwargs: dict[str, Any]) -> str:
    return stable_key({"kind": kind, **{k: v for k, v in kwargs.items() if k not in _NOT_IN_KEY}})


def _annotate(obj: Any, served: Served[Any]) -> Any:
    with contextlib.suppress(Exception):  # objects that refuse attributes stay as they are
        obj.resilience = served.metadata()
    return obj


def _generic_completion(model: str, text: str) -> ChatCompletion:
    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-rag-resilience-fallback",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
        }
    )


def _generic_chunks(model: str, text: str) -> list[ChatCompletionChunk]:
    base = {
        "id": "chatcmpl-rag-resilience-fallback",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    return [
        ChatCompletionChunk.model_validate(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": text},
                        "finish_reason": None,
                    }
                ],
            }
        ),
        ChatCompletionChunk.model_validate(
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        ),
    ]


_COMPLETION = Codec(lambda r: r.model_dump(mode="json"), ChatCompletion.model_validate)
_CHUNKS = Codec(
    lambda chunks: [c.model_dump(mode="json") for c in chunks],
    lambda data: [ChatCompletionChunk.model_validate(c) for c in data],
)
_EMBEDDINGS = Codec(lambda r: r.model_dump(mode="json"), CreateEmbeddingResponse.model_validate)


def _sync_call(
    fn: Callable[..., Any], policy: ResiliencePolicy, expected: type, what: str
) -> Callable[..., Any]:
    """One sync SDK request: a sync request cannot be cancelled, so it gets what the
    deadline leaves as its per-request timeout (a passed-in client keeps its own, 600 s by
    default); a 200 that is not the API's answer is an upstream fault (`check_answer`)."""
    timed = timed_call(fn, policy.attempt_timeout)

    def call(**kwargs: Any) -> Any:
        return check_answer(timed(**kwargs), expected, what)

    call.__wrapped__ = timed  # type: ignore[attr-defined]  # what it calls (telemetry reads it)
    return call


def _async_call(
    fn: Callable[..., Awaitable[Any]], expected: type, what: str
) -> Callable[..., Awaitable[Any]]:
    """One async SDK request (the policy cancels it at its deadline); see `_sync_call`."""

    async def call(**kwargs: Any) -> Any:
        try:
            value = await fn(**kwargs)
        except json.JSONDecodeError as exc:  # the SDK read a truncated 200 body
            mark_malformed_response(exc)
            raise
        return check_answer(value, expected, what)

    call.__wrapped__ = fn  # type: ignore[attr-defined]  # what it calls (telemetry reads it)
    return call


def _prepare(client: Any, policy: ResiliencePolicy, our_attempts: int) -> Any:
    if getattr(client, "max_retries", 0):
        warn_nested_retries(
            client,
            our_attempts=our_attempts,
            fix=_FIX + " Copied with max_retries=0 for this wrapper.",
        )
        client = client.with_options(max_retries=0)
    return client


def _client_kwargs(policy: ResiliencePolicy, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    kwargs["max_retries"] = 0
    if "timeout" not in kwargs and policy.attempt_timeout is not None:
        kwargs["timeout"] = policy.attempt_timeout  # the SDK's own default read timeout is 600 s
    return kwargs


class _Completions:
    def __init__(self, owner: ResilientOpenAIClient) -> None:
        self._owner = owner

    def create(self, **kwargs: Any) -> Any:
        owner = self._owner
        policy, inner = owner.policy, owner.client
        model = str(kwargs.get("model", ""))
        if kwargs.get("stream"):
            return _SyncStream(policy, inner, kwargs, model)
        served = policy.execute(
            _sync_call(inner.chat.completions.create, policy, ChatCompletion, "chat"),
            (),
            kwargs,
            key=_key("chat", kwargs),
            codec=_COMPLETION,
            generic=_generic_for(policy, lambda text: _generic_completion(model, text)),
            pace=_pace(policy, inner, kwargs),
        )
        return _annotate(served.value, served)

    def parse(self, **kwargs: Any) -> Any:
        """Parsed structured output; a parse failure is the model's answer (not retried)."""
        from .openai_parse import parse

        return parse(self._owner.policy, self._owner.client, kwargs)


def _pace(policy: ResiliencePolicy, inner: Any, kwargs: dict[str, Any]) -> PaceRequest | None:
    """Where and how much a request spends of the upstream's rate limit (None: no limiter)."""
    if policy.rate_limiter is None:
        return None
    return PaceRequest(
        upstream_key(inner.base_url, kwargs.get("model"), inner.api_key),
        estimate_request_tokens(kwargs),
    )


def _generic_for(policy: ResiliencePolicy, build: Callable[[str], Any]) -> Any:
    """The policy's generic answer as SDK objects (`build` makes them from the text), or
    False when the policy has generic answers off."""
    if not policy.generic_fallback:
        return False

    def generic(error: BaseException) -> Any:
        text = policy.generic_answer(error)
        if text is None:
            raise error
        return build(str(text))

    return generic


class _SyncStream:
    """Iterable of ChatCompletionChunk; retried until the first chunk arrives."""

    def __init__(self, policy: ResiliencePolicy, inner: Any, kwargs: dict[str, Any], model: str):
        self.resilience: dict[str, Any] | None = None
        self._open: Any = None

        def open_stream(**kw: Any) -> Iterator[Any]:
            timeout = request_timeout(policy.attempt_timeout, kw.get("timeout"))
            if timeout is not None:
                kw["timeout"] = timeout
            stream = inner.chat.completions.create(**kw)
            self._open = stream
            try:
                yield from stream
            finally:
                stream.close()

        def served(info: Served[None]) -> None:
            self.resilience = info.metadata()

        self._iter = policy.execute_stream(
            open_stream,
            (),
            kwargs,
            key=_key("chat_stream", kwargs),
            codec=_CHUNKS,
            generic=_generic_for(policy, lambda text: _generic_chunks(model, text)),
            on_served=served,
            pace=_pace(policy, inner, kwargs),
        )
        # Like the SDK: create() sends the request (retrying until the first chunk) and
        # raises HTTP errors here, not on first iteration.
        self._first: Any = next(self._iter, _END)

    @property
    def response(self) -> Any:
        """The SDK stream's HTTP response (None when served from a fallback)."""
        return getattr(self._open, "response", None)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        first = self._first
        if first is not _END:
            self._first = _END
            return first
        return next(self._iter)

    def close(self) -> None:
        self._iter.close()  # type: ignore[attr-defined]

    def __enter__(self) -> _SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Embeddings:
    def __init__(self, owner: ResilientOpenAIClient) -> None:
        self._owner = owner

    def create(self, **kwargs: Any) -> Any:
        owner = self._owner
        served = owner.policy.execute(
            _sync_call(
                owner.client.embeddings.create,
                owner.policy,
                CreateEmbeddingResponse,
                "embeddings",
            ),
            (),
            kwargs,
            key=_key("embeddings", kwargs),
            codec=_EMBEDDINGS,
            generic=False,
            pace=_pace(owner.policy, owner.client, kwargs),
        )
        return _annotate(served.value, served)


class _Chat:
    def __init__(self, completions: Any) -> None:
        self.completions = completions


class _Beta:
    """`beta.chat.completions.parse` is the protected `chat.completions.parse`; the rest of
    `beta` is the SDK's own."""

    def __init__(self, chat: _Chat, sdk_beta: Any) -> None:
        self.chat = chat
        self._sdk = sdk_beta

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_sdk"], name)


class _ClientBase:
    """What the sync and async clients share: the policy, the inner SDK client built (or
    copied) with max_retries=0, the protected `chat.completions` and `embeddings` (of the
    subclass's sync or async kind), stats, and unprotected access to the rest of the SDK."""

    _sdk_class: Any = None
    _completions_class: Any = None
    _embeddings_class: Any = None

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        policy: ResiliencePolicy | str | None = "balanced",
        client: Any = None,
        **openai_kwargs: Any,
    ) -> None:
        self.policy = ResiliencePolicy.resolve(policy, name="openai")
        attempts = self.policy.retry.max_retries + 1
        if client is None:
            client = self._sdk_class(
                api_key=api_key, base_url=base_url, **_client_kwargs(self.policy, openai_kwargs)
            )
        self.client = _prepare(client, self.policy, attempts)
        if self.policy.rate_limiter is not None:  # learn the limits from every response
            instrument(self.client, self.policy.rate_limiter)
        self.chat = _Chat(self._completions_class(self))
        self.embeddings = self._embeddings_class(self)
        self.beta = _Beta(self.chat, getattr(self.client, "beta", None))

    def stats(self) -> dict[str, Any]:
        return self.policy.stats()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["client"], name)


class ResilientOpenAIClient(_ClientBase):
    """The sync OpenAI client with retry, breaker, fallback cache and concurrency limit."""

    _sdk_class = openai.OpenAI
    _completions_class = _Completions
    _embeddings_class = _Embeddings


class _AsyncCompletions:
    def __init__(self, owner: AsyncResilientOpenAIClient) -> None:
        self._owner = owner

    async def create(self, **kwargs: Any) -> Any:
        owner = self._owner
        policy, inner = owner.policy, owner.client
        model = str(kwargs.get("model", ""))
        if kwargs.get("stream"):
            return await _AsyncStream(policy, inner, kwargs, model)._prime()
        served = await policy.aexecute(
            _async_call(inner.chat.completions.create, ChatCompletion, "chat"),
            (),
            kwargs,
            key=_key("chat", kwargs),
            codec=_COMPLETION,
            generic=_generic_for(policy, lambda text: _generic_completion(model, text)),
            pace=_pace(policy, inner, kwargs),
        )
        return _annotate(served.value, served)

    async def parse(self, **kwargs: Any) -> Any:
        from .openai_parse import aparse

        return await aparse(self._owner.policy, self._owner.client, kwargs)


class _AsyncStream:
    """Async iterable of ChatCompletionChunk; retried until the first chunk arrives."""

    def __init__(self, policy: ResiliencePolicy, inner: Any, kwargs: dict[str, Any], model: str):
        self.resilience: dict[str, Any] | None = None

        async def open_stream(**kw: Any) -> AsyncIterator[Any]:
            stream = await inner.chat.completions.create(**kw)
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.close()

        def served(info: Served[None]) -> None:
            self.resilience = info.metadata()

        self._iter = policy.aexecute_stream(
            open_stream,
            (),
            kwargs,
            key=_key("chat_stream", kwargs),
            codec=_CHUNKS,
            generic=_generic_for(policy, lambda text: _generic_chunks(model, text)),
            on_served=served,
            pace=_pace(policy, inner, kwargs),
        )
        self._first: Any = _END

    async def _prime(self) -> _AsyncStream:
        """Send the request now (as the SDK's create() does) and keep the first chunk."""
        try:
            self._first = await self._iter.__anext__()
        except StopAsyncIteration:
            self._first = _END
        return self

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        first = self._first
        if first is not _END:
            self._first = _END
            return first
        return await self._iter.__anext__()

    async def close(self) -> None:
        await self._iter.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _AsyncEmbeddings:
    def __init__(self, owner: AsyncResilientOpenAIClient) -> None:
        self._owner = owner

    async def create(self, **kwargs: Any) -> Any:
        owner = self._owner
        served = await owner.policy.aexecute(
            _async_call(owner.client.embeddings.create, CreateEmbeddingResponse, "embeddings"),
            (),
            kwargs,
            key=_key("embeddings", kwargs),
            codec=_EMBEDDINGS,
            generic=False,
            pace=_pace(owner.policy, owner.client, kwargs),
        )
        return _annotate(served.value, served)


class AsyncResilientOpenAIClient(_ClientBase):
    """Async twin of ResilientOpenAIClient over `openai.AsyncOpenAI`."""

    _sdk_class = openai.AsyncOpenAI
    _completions_class = _AsyncCompletions
    _embeddings_class = _AsyncEmbeddings
