"""Helpers shared by the framework adapters (LangChain, LlamaIndex, OpenAI client).

Framework-free: they inspect wrapped objects duck-typed, never import a framework.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from .deadline import bound as _bound
from .errors import MalformedResponseError, mark_malformed_response

__all__ = [
    "NestedRetriesWarning",
    "accepts_request_timeout",
    "check_answer",
    "inner_max_retries",
    "mark_sdk_read_error",
    "marked_async",
    "model_identity",
    "request_timeout",
    "timed_call",
    "warn_nested_retries",
]

logger = logging.getLogger("rag_resilience")

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


class NestedRetriesWarning(UserWarning):
    """The wrapped client retries on its own: attempts multiply."""


def inner_max_retries(inner: Any) -> int:
    """The wrapped object's own retry count (ChatOpenAI, OpenAIEmbeddings, openai clients,
    LlamaIndex OpenAI...), looking one level into `.client`/`._client`; 0 if none."""
    candidates = (
        inner,
        getattr(inner, "root_client", None),  # ChatOpenAI(max_retries=None): the SDK's 2
        getattr(inner, "root_async_client", None),
        getattr(inner, "client", None),
        getattr(inner, "_client", None),
    )
    for obj in candidates:
        value = getattr(obj, "max_retries", None) if obj is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def warn_nested_retries(
    inner: Any,
    *,
    our_attempts: int,
    fix: str,
    extra_layers: int = 1,
    inner_attempts: int | None = None,
) -> int:
    """Warn once per wrapped class when it retries by itself; returns its max_retries.

    The worst case is `our_attempts` times the requests one inner call can make:
    `inner_attempts` when the caller knows it (LlamaIndex's OpenAI: tenacity's n
    attempts of the SDK's n + 1 requests), else `(max_retries + 1) ** extra_layers`.
    """
    retries = inner_max_retries(inner)
    if retries <= 0:
        return retries
    per_call = inner_attempts if inner_attempts is not None else (retries + 1) ** extra_layers
    worst = our_attempts * per_call
    cls = type(inner)
    marker = (f"{cls.__module__}.{cls.__qualname__}", fix)
    with _warned_lock:
        if marker in _warned:
            return retries
        _warned.add(marker)
    message = (
        f"{cls.__name__} has max_retries={retries}: wrapped by rag-resilience ({our_attempts} "
        f"attempts), one user call can make up to {worst} upstream requests. {fix}"
    )
    warnings.warn(message, NestedRetriesWarning, stacklevel=3)
    logger.warning(message)
    return retries


# -- per-request timeouts: how a sync call stops at the call's deadline ---------------------
#: Modules whose models pass a `timeout=` keyword of a call through to the openai SDK's
#: per-request `timeout` (langchain-openai's chat models and embeddings, LlamaIndex's
#: OpenAI LLM): a stalled sync request is cut there, as nothing else can cut it.
_REQUEST_TIMEOUT_MODULES = ("langchain_openai.", "llama_index.llms.openai.", "openai.")


def accepts_request_timeout(inner: Any) -> bool:
    """Does `inner` (a model or an SDK resource) take a per-request `timeout=` keyword?"""
    return type(inner).__module__.startswith(_REQUEST_TIMEOUT_MODULES)


def request_timeout(attempt_timeout: float | None, given: Any = None) -> Any:
    """The per-request timeout of a sync attempt: `attempt_timeout`, shortened to what the
    call's deadline leaves (`deadline.bound`), and to the caller's own numeric `given`.
    A non-numeric `given` (an `httpx.Timeout`) is the caller's and is kept."""
    if given is not None and not isinstance(given, (int, float)):
        return given
    timeout = _bound(attempt_timeout)
    if given is not None and (timeout is None or given < timeout):
        return given
    return timeout


def timed_call(fn: Callable[..., Any], attempt_timeout: float | None) -> Callable[..., Any]:
    """An SDK-backed sync call: `fn` called with ``timeout=request_timeout(...)`` read at
    each attempt (so a retry gets what is left of the deadline, not what was left when
    the call began). A `json.JSONDecodeError` out of it is the SDK reading a truncated 200
    body: it is marked an upstream fault (retried, breaker-counted) and re-raised."""

    def call(*args: Any, **kwargs: Any) -> Any:
        timeout = request_timeout(attempt_timeout, kwargs.get("timeout"))
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            return fn(*args, **kwargs)
        except (ValueError, AttributeError) as exc:
            mark_sdk_read_error(exc)
            raise

    call.__wrapped__ = fn  # type: ignore[attr-defined]  # what it calls (telemetry reads it)
    return call


def marked_async(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """An SDK-backed async call whose errors reading a 200 answer are marked upstream
    faults (`mark_sdk_read_error`) and re-raised: the async twin of `timed_call`'s marking
    (async attempts are cut by cancellation, so no per-request timeout is added)."""

    async def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (ValueError, AttributeError) as exc:
            mark_sdk_read_error(exc)
            raise

    call.__wrapped__ = fn  # type: ignore[attr-defined]  # what it calls (telemetry reads it)
    return call


def mark_sdk_read_error(exc: BaseException) -> None:
    """Mark `exc`, raised by an SDK-backed model's call, as an upstream fault when it is the
    SDK failing to read a 200 answer: a truncated JSON body (`json.JSONDecodeError`), or a
    text/plain body the SDK handed back as a `str` that the framework then read as the
    API's answer (``'str' object has no attribute 'choices'``, langchain-openai's
    "Unexpected response type"). Any other error is left as it is."""
    if isinstance(exc, json.JSONDecodeError):
        mark_malformed_response(exc)
        return
    text = str(exc)
    if (isinstance(exc, AttributeError) and text.startswith("'str' object has no attribute")) or (
        isinstance(exc, ValueError) and text.startswith("Unexpected response type")
    ):
        mark_malformed_response(exc)


def check_answer(value: Any, expected: type | tuple[type, ...], what: str) -> Any:
    """`value` if it is an `expected` answer; else the upstream sent a 200 that is not the
    API's answer (the openai SDK hands a text/plain body back as a bare `str`): raise
    `MalformedResponseError`, an upstream fault, rather than serve it as a live answer."""
    if isinstance(value, expected):
        return value
    excerpt = str(value)[:200]
    raise MalformedResponseError(
        f"{what}: the upstream answered 200 with a {type(value).__name__} instead of the "
        f"API's answer: {excerpt!r}",
        body=excerpt,
    )


def reset_warnings() -> None:
    """Forget which classes were warned about (tests)."""
    with _warned_lock:
        _warned.clear()


def model_identity(inner: Any) -> str:
    """A stable identity for cache keys: class plus model name, never an object id."""
    cls = type(inner)
    name = None
    for attr in ("model_name", "model", "deployment_name", "azure_deployment"):
        value = getattr(inner, attr, None)
        if isinstance(value, str) and value:
            name = value
            break
    base = f"{cls.__module__}.{cls.__qualname__}"
    return f"{base}:{name}" if name else base
