"""Helpers shared by the LlamaIndex wrappers: policies, warnings, timeouts, JSON, and the
record of degraded answers that lets an engine know its LLM answered from cache."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any

from ..adapters import (
    NestedRetriesWarning,
    accepts_request_timeout,
    inner_max_retries,
    mark_sdk_read_error,
    marked_async,
    request_timeout,
    timed_call,
)
from ..degraded import note_degraded
from ..policy import ResiliencePolicy, Served
from .instrumentation import BRIDGE

logger = logging.getLogger("rag_resilience")

GenericSpec = bool | str | Callable[[BaseException], Any]

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def warn_once(marker: tuple[str, str], message: str, category: type[Warning] = UserWarning) -> bool:
    """Warn (and log) once per marker per process; True if this call warned."""
    with _warned_lock:
        if marker in _warned:
            return False
        _warned.add(marker)
    warnings.warn(message, category, stacklevel=4)
    logger.warning(message)
    return True


def reset_warnings() -> None:
    """Forget which warnings were given (tests)."""
    with _warned_lock:
        _warned.clear()


def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def has_tenacity_layer(inner: Any) -> bool:
    """LlamaIndex's OpenAI LLM/embeddings wrap every SDK call (which retries by itself) in a
    tenacity loop of `max_retries` attempts: two retry layers."""
    module = type(inner).__module__
    return module.startswith(
        ("llama_index.llms.openai", "llama_index.embeddings.openai")
    ) or hasattr(inner, "_create_retry_decorator")


def inner_attempts_per_call(inner: Any) -> int:
    """Worst-case upstream requests the wrapped model makes for one of our attempts.

    llama-index-llms-openai 0.8 / llama-index-embeddings-openai 0.7: tenacity
    ``stop_after_attempt(max_retries)`` (n attempts, at least 1) around an SDK client built
    with ``max_retries=n`` (n + 1 requests): n * (n + 1) requests, 12 for the LLM's default
    n=3 and 110 for the embeddings' default n=10 (tenacity also stops after 60 s).
    """
    n = inner_max_retries(inner)
    if n <= 0:
        return 1
    if has_tenacity_layer(inner):
        return n * (n + 1)
    return n + 1


def warn_nested(inner: Any, policy: ResiliencePolicy, what: str) -> None:
    """Warn once per wrapped class when it retries by itself (attempts multiply)."""
    n = inner_max_retries(inner)
    if n <= 0:
        return
    ours = policy.retry.max_retries + 1 if policy.retry is not None else 1
    per_call = inner_attempts_per_call(inner)
    layers = (
        f"{n} tenacity attempts x {n + 1} SDK requests"
        if has_tenacity_layer(inner)
        else f"{n + 1} SDK requests"
    )
    cls = type(inner).__name__
    message = (
        f"{cls} has max_retries={n}: each of rag-resilience's {ours} attempts can make "
        f"{per_call} upstream requests ({layers}), so one {what} can make up to "
        f"{ours * per_call} requests. Build it with {cls}(..., max_retries=0) and let "
        "rag-resilience retry (it honours Retry-After and trips the circuit breaker)."
    )
    warn_once((_class_path(inner), "nested_retries"), message, NestedRetriesWarning)


def resolve_policy(
    policy: ResiliencePolicy | str | None, *, name: str, generic_fallback: GenericSpec = False
) -> ResiliencePolicy:
    """A policy from a policy/preset name/None, with our instrumentation bridge attached."""
    resolved = ResiliencePolicy.resolve(policy, name=name, generic_fallback=generic_fallback)
    resolved.add_listener(BRIDGE)
    return resolved


def timed_copy(inner: Any, attempt_timeout: float | None, what: str) -> Any:
    """For sync calls: a copy of `inner` whose own `timeout` is at most the policy's
    per-attempt timeout (a sync call cannot be cancelled from outside). Warns once when
    the model has no timeout setting. Returns `inner` itself when nothing needs changing."""
    if attempt_timeout is None:
        return inner
    fields = getattr(type(inner), "model_fields", {})
    if "timeout" not in fields:
        warn_once(
            (_class_path(inner), "no_timeout"),
            f"{type(inner).__name__} has no `timeout` setting: rag-resilience cannot enforce its "
            f"per-attempt timeout ({attempt_timeout:g}s) on sync {what} calls (async calls are "
            "cancelled). Configure a timeout on the model or its HTTP client.",
        )
        return inner
    current = getattr(inner, "timeout", None)
    if isinstance(current, (int, float)) and 0 < current <= attempt_timeout:
        return inner
    try:
        copy = inner.model_copy(update={"timeout": float(attempt_timeout)})
    except Exception as exc:  # pragma: no cover - exotic models
        logger.warning(
            "rag_resilience: could not copy %s to set its timeout: %r", type(inner).__name__, exc
        )
        return inner
    # An SDK client built before the copy still carries the old timeout.
    for attr in ("_client", "_aclient"):
        client = getattr(copy, attr, None)
        if client is not None and hasattr(client, "with_options"):
            with contextlib.suppress(Exception):
                setattr(copy, attr, client.with_options(timeout=float(attempt_timeout)))
    return copy


SYNC_METHODS = ("chat", "complete", "stream_chat", "stream_complete")


def sync_calls(sync_llm: Any, attempt_timeout: float | None) -> dict[str, Callable[..., Any]]:
    """The sync entry points of `sync_llm` (its `timed_copy`) by name. A model that passes
    `timeout=` to the SDK (LlamaIndex's OpenAI) gets min(attempt timeout, what the call's
    deadline leaves) as each request's timeout: nothing else can cut a sync call."""
    timed = accepts_request_timeout(sync_llm)
    calls = {}
    for method in SYNC_METHODS:
        fn = getattr(sync_llm, method)
        calls[method] = timed_call(fn, attempt_timeout) if timed else fn
    return calls


ASYNC_METHODS = ("achat", "acomplete")


def async_calls(llm: Any) -> dict[str, Callable[..., Any]]:
    """The async entry points of `llm` by name; for a model on the openai SDK (LlamaIndex's
    OpenAI) a 200 the SDK could not read is marked an upstream fault, as in `sync_calls`.
    (Streams are not wrapped: their errors come while iterating.)"""
    marked = accepts_request_timeout(llm)
    return {m: marked_async(getattr(llm, m)) if marked else getattr(llm, m) for m in ASYNC_METHODS}


EMBEDDING_METHODS = ("_get_query_embedding", "_get_text_embedding", "_get_text_embeddings")
ASYNC_EMBEDDING_METHODS = ("_aget_query_embedding", "_aget_text_embedding", "_aget_text_embeddings")


def _reads_openai(model: Any) -> bool:
    return type(model).__module__.startswith("llama_index.embeddings.openai.")


def async_embedding_calls(model: Any) -> dict[str, Callable[..., Any]]:
    """The async hooks of an embedding model by name, marked as in `async_calls`."""
    marked = _reads_openai(model)
    return {
        m: marked_async(getattr(model, m)) if marked else getattr(model, m)
        for m in ASYNC_EMBEDDING_METHODS
    }


def sync_embedding_calls(
    sync_model: Any, attempt_timeout: float | None
) -> dict[str, Callable[..., Any]]:
    """The sync hooks of an embedding model (its `timed_copy`) by name. LlamaIndex's
    OpenAIEmbedding takes no per-call keywords but sends its `additional_kwargs` with each
    request: a per-call copy carrying ``timeout=`` min(attempt timeout, what the deadline
    leaves) cuts a stalled request there (the copy shares the model's SDK client)."""
    calls: dict[str, Callable[..., Any]] = {}
    timed = _reads_openai(sync_model)
    for method in EMBEDDING_METHODS:
        fn = getattr(sync_model, method)
        calls[method] = _timed_embedding(sync_model, method, attempt_timeout) if timed else fn
    return calls


def _timed_embedding(model: Any, method: str, attempt_timeout: float | None) -> Any:
    def call(arg: Any) -> Any:
        timeout = request_timeout(attempt_timeout)
        target = model
        if timeout is not None:
            if getattr(model, "reuse_client", False):
                model._get_client()  # built once on the model, so every copy shares it
            extra = {**(model.additional_kwargs or {}), "timeout": timeout}
            target = model.model_copy(update={"additional_kwargs": extra})
        try:
            return getattr(target, method)(arg)
        except (ValueError, AttributeError) as exc:
            mark_sdk_read_error(exc)  # a 200 the SDK could not read: an upstream fault
            raise

    call.__wrapped__ = getattr(model, method)  # type: ignore[attr-defined]  # (telemetry)
    return call


def generic_text(spec: GenericSpec, error: BaseException, policy: ResiliencePolicy) -> Any:
    """The generic answer for `spec`: a callable's result, a string, or the default message."""
    return policy.generic_answer(error, spec if callable(spec) or isinstance(spec, str) else True)


def jsonable(value: Any, _depth: int = 0) -> Any:
    """A JSON-safe copy of `value` (pydantic models dumped, unknown objects as repr)."""
    if _depth > 20:
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, _depth + 1) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            return jsonable(dump(mode="json"), _depth + 1)
        except Exception:
            with contextlib.suppress(Exception):
                return jsonable(dump(), _depth + 1)
    return repr(value)


# -- degraded answers seen while an engine runs -------------------------------------------
def record_degraded(component: str, served: Served[Any]) -> None:
    """Tell an enclosing resilient engine (or chain) that `component` answered degraded."""
    if served.degraded:
        note_degraded({**served.metadata(), "component": component})


# -- models inside a wrapped engine that retry by themselves --------------------------------
def _inside(node: Any) -> list[Any]:
    """The attributes of a LlamaIndex object worth looking into (pydantic fields, private
    attributes and plain attributes), without calling properties."""
    values: list[Any] = []
    for source in (
        getattr(node, "__dict__", None),
        getattr(node, "__pydantic_private__", None),
    ):
        if isinstance(source, dict):
            values.extend(source.values())
    out: list[Any] = []
    for value in values:
        if isinstance(value, (list, tuple)):
            out.extend(value)
        elif isinstance(value, dict):
            out.extend(value.values())
        else:
            out.append(value)
    return [v for v in out if type(v).__module__.startswith(("llama_index", "rag_resilience"))]


def warn_self_retrying(root: Any, policy: ResiliencePolicy, owner: str, limit: int = 400) -> None:
    """Warn once per model class, with numbers, when an LLM or embedding model inside the
    wrapped engine retries by itself (our own wrappers are skipped: they warn themselves)."""
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.llms.llm import LLM

    ours = policy.retry.max_retries + 1 if policy.retry is not None else 1
    seen: set[int] = set()
    stack = [root]
    while stack and len(seen) < limit:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node is not root and type(node).__module__.startswith("rag_resilience."):
            continue
        if isinstance(node, (LLM, BaseEmbedding)):
            per_call = inner_attempts_per_call(node)
            if per_call > 1:
                cls = type(node).__name__
                warn_once(
                    (_class_path(node), f"inside:{owner}"),
                    f"{cls} inside the engine wrapped by {owner} retries by itself "
                    f"(max_retries={inner_max_retries(node)}): each of the {ours} attempts of "
                    f"the engine can make {per_call} requests to it, up to {ours * per_call} "
                    f"per question during an outage. Build it with {cls}(..., max_retries=0) "
                    "or wrap it in a Resilient wrapper.",
                    NestedRetriesWarning,
                )
            continue
        stack.extend(_inside(node))
