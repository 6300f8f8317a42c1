"""Feed a `RateLimiter` from the wire: httpx response hooks on the HTTP clients inside an
OpenAI SDK client (and the LangChain / LlamaIndex models that hold one), and the pacer
key of a model.

Every response the SDK receives (successes, 429s, other errors) passes its headers to
`RateLimiter.observe`; JSON answers also pass the ``usage.total_tokens`` they report, so
the token bucket is corrected with what was really spent; a streamed (SSE) answer's body
is scanned as it passes for the `usage` of its last chunk, or, when it sends none, for its
text (counted by the estimator when the stream ends). The response hook finds its
pacer through the reservation the policy made for this call (a context variable), so one
hook serves every model and key. Duck-typed: nothing here imports openai, LangChain or
LlamaIndex (httpx only when a stream is first watched).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from .ratelimit import RateLimiter, Reservation, current_reservation, upstream_key
from .ratelimit_tokens import count_text_tokens, estimate_request_tokens

__all__ = ["instrument", "model_upstream"]

_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d{1,12})')
_ATTRS = ("root_client", "root_async_client", "client", "async_client", "_client", "_aclient")
_FACTORIES = ("_get_client", "_get_aclient")  # LlamaIndex builds its SDK clients lazily
_MARK = "__rag_resilience_ratelimit_hook__"


def _usage_tokens(response: Any) -> int | None:
    """``usage.total_tokens`` of a read JSON body (searched from the end: usage comes
    last, and an embeddings body is large), else None."""
    content = response.content
    at = content.rfind(b'"total_tokens"')
    if at < 0:
        return None
    match = _TOTAL_TOKENS.match(content, at)
    return int(match.group(1)) if match else None


def _wants_body(limiter: RateLimiter, response: Any) -> bool:
    reservation = current_reservation()
    if reservation is None or reservation.pacer.limiter is not limiter:
        return False
    if reservation.pacer.tokens is None or response.status_code != 200:
        return False
    ctype = response.headers.get("content-type", "")
    return "json" in ctype


class _UsageScanner:
    """Finds ``"total_tokens": N`` in a streamed (SSE) body as it passes and corrects the
    reservation's token bucket with it at once (a stream's `usage` comes in its last
    chunk, with ``stream_options={"include_usage": True}``; SDKs may close the stream
    right after it, without reading to the end).

    Without that option no usage comes: the streamed text is kept, and when the stream
    ends (or is closed) the bucket is corrected with the request's prompt estimate plus
    the streamed text counted by the same estimator, instead of keeping ``max_tokens``."""

    def __init__(self, reservation: Reservation, request_body: bytes = b"") -> None:
        self.reservation = reservation
        self.request_body = request_body
        self.tail = b""
        self.settled = False
        self.pending = b""  # SSE bytes after the last complete line
        self.texts: list[str] = []

    def feed(self, chunk: bytes) -> None:
        if self.settled:
            return
        self._collect(chunk)
        data = self.tail + chunk
        at = data.rfind(b'"total_tokens"')
        if at >= 0:
            match = _TOTAL_TOKENS.match(data, at)
            if match and match.end() < len(data):  # the number is complete
                self.settled = True
                self.reservation.pacer.settle(self.reservation.tokens, int(match.group(1)))
                return
            if len(data) - at < 64:  # cut in the middle: keep it for the next chunk
                self.tail = data[at:]
                return
        self.tail = data[-32:]

    def _collect(self, chunk: bytes) -> None:
        """Keep the generated text of each complete ``data:`` line of the stream."""
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > _MAX_PENDING:
            self.pending = b""  # not an SSE stream we understand
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    _delta_texts(json.loads(line[5:]), self.texts)

    def done(self) -> None:
        """The stream ended or was closed: settle with its usage, or its text."""
        self.feed(b"\n")  # a body that ends right after the number, or a last line
        if self.settled:
            return
        self.settled = True
        used = _prompt_tokens(self.request_body) + count_text_tokens("".join(self.texts))
        self.reservation.pacer.settle(self.reservation.tokens, used)


_MAX_PENDING = 1 << 20


def _delta_texts(event: Any, out: list[str]) -> None:
    """The generated text in one chat-completion chunk (content, refusal, tool calls)."""
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        parts = [delta.get("content"), delta.get("refusal")]
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            parts += (function.get("name"), function.get("arguments"))
        out += (part for part in parts if isinstance(part, str))


def _prompt_tokens(body: bytes) -> int:
    """The request's estimate without its ``max_tokens`` (what a stream's prompt cost)."""
    try:
        payload = json.loads(body)
    except (ValueError, TypeError):
        return 0
    if not isinstance(payload, dict):
        return 0
    skip = ("max_tokens", "max_completion_tokens")
    return estimate_request_tokens({k: v for k, v in payload.items() if k not in skip})


@functools.cache
def _stream_wrappers() -> tuple[type, type]:
    """Byte-stream wrappers httpx accepts as a response's `stream` (it checks the base
    class); built on first use so that merely importing this module loads no httpx."""
    import httpx

    class SyncUsageStream(httpx.SyncByteStream):
        def __init__(self, inner: Any, scanner: _UsageScanner) -> None:
            self.inner = inner
            self.scanner = scanner

        def __iter__(self) -> Iterator[bytes]:
            for chunk in self.inner:
                with contextlib.suppress(Exception):
                    self.scanner.feed(chunk)
                yield chunk
            with contextlib.suppress(Exception):
                self.scanner.done()

        def close(self) -> None:
            with contextlib.suppress(Exception):
                self.scanner.done()
            self.inner.close()

    class AsyncUsageStream(httpx.AsyncByteStream):
        def __init__(self, inner: Any, scanner: _UsageScanner) -> None:
            self.inner = inner
            self.scanner = scanner

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self.inner:
                with contextlib.suppress(Exception):
                    self.scanner.feed(chunk)
                yield chunk
            with contextlib.suppress(Exception):
                self.scanner.done()

        async def aclose(self) -> None:
            with contextlib.suppress(Exception):
                self.scanner.done()
            await self.inner.aclose()

    return SyncUsageStream, AsyncUsageStream


def _watch_stream(limiter: RateLimiter, response: Any, is_async: bool) -> None:
    """Wrap a streamed answer's body so its `usage` corrects the token bucket."""
    reservation = current_reservation()
    if reservation is None or reservation.pacer.limiter is not limiter:
        return
    if reservation.pacer.tokens is None or response.status_code != 200:
        return
    if "event-stream" not in response.headers.get("content-type", ""):
        return
    body = b""
    with contextlib.suppress(Exception):
        content = response.request.content
        body = content if isinstance(content, bytes) else b""
    wrapper = _stream_wrappers()[1 if is_async else 0]
    response.stream = wrapper(response.stream, _UsageScanner(reservation, body))


def sync_hook(limiter: RateLimiter) -> Callable[[Any], None]:
    def hook(response: Any) -> None:
        usage = None
        try:
            _watch_stream(limiter, response, False)
            if _wants_body(limiter, response):
                response.read()
                usage = _usage_tokens(response)
        except Exception:
            usage = None
        limiter.observe(response.headers, status=response.status_code, usage_tokens=usage)

    setattr(hook, _MARK, limiter)
    return hook


def async_hook(limiter: RateLimiter) -> Callable[[Any], Awaitable[None]]:
    async def hook(response: Any) -> None:
        usage = None
        try:
            _watch_stream(limiter, response, True)
            if _wants_body(limiter, response):
                await response.aread()
                usage = _usage_tokens(response)
        except Exception:
            usage = None
        limiter.observe(response.headers, status=response.status_code, usage_tokens=usage)

    setattr(hook, _MARK, limiter)
    return hook


def _http_clients(obj: Any, depth: int, seen: set[int], out: list[Any]) -> None:
    if obj is None or depth < 0 or id(obj) in seen:
        return
    seen.add(id(obj))
    hooks = getattr(obj, "event_hooks", None)
    if isinstance(hooks, dict) and "response" in hooks:
        out.append(obj)
        return
    for name in _FACTORIES:
        factory = getattr(obj, name, None)
        if callable(factory) and getattr(obj, "reuse_client", True):
            with contextlib.suppress(Exception):
                _http_clients(factory(), depth - 1, seen, out)
    for name in _ATTRS:
        try:
            child = getattr(obj, name, None)
        except Exception:
            continue
        if child is not None and not isinstance(child, (str, bytes, int, float)):
            _http_clients(child, depth - 1, seen, out)


def instrument(target: Any, limiter: RateLimiter) -> int:
    """Install response hooks on the httpx clients inside `target` (an OpenAI SDK client,
    a LangChain ChatOpenAI / OpenAIEmbeddings, a LlamaIndex OpenAI, ...); returns how
    many clients now feed `limiter`. Idempotent; never raises."""
    clients: list[Any] = []
    try:
        _http_clients(target, 4, set(), clients)
    except Exception:
        return 0
    count = 0
    for client in clients:
        try:
            hooks = client.event_hooks
            responses = list(hooks.get("response", []))
            if any(getattr(h, _MARK, None) is limiter for h in responses):
                count += 1
                continue
            is_async = inspect.iscoroutinefunction(getattr(client, "send", None))
            responses.append(async_hook(limiter) if is_async else sync_hook(limiter))
            client.event_hooks = {**hooks, "response": responses}
            count += 1
        except Exception:
            continue
    return count


def _first(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        try:
            value = getattr(obj, name, None)
        except Exception:
            continue
        if value:
            return value
    return None


def model_upstream(model: Any, model_name: Any = None) -> str:
    """The pacer key of a model or SDK client: its base URL, model name and a hash of its
    API key, read from the attribute names OpenAI, LangChain and LlamaIndex use."""
    base = _first(model, ("openai_api_base", "api_base", "base_url", "azure_endpoint"))
    key = _first(model, ("openai_api_key", "api_key"))
    for inner_name in ("root_client", "client", "_client"):
        inner = _first(model, (inner_name,))
        if inner is None or (base and key):
            break
        base = base or _first(inner, ("base_url",))
        key = key or _first(inner, ("api_key",))
    name = model_name or _first(model, ("model_name", "model", "deployment_name"))
    return upstream_key(base or type(model).__name__, name if isinstance(name, str) else "", key)
