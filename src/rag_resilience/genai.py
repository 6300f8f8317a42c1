"""What a wrapped callable is, in the OpenTelemetry GenAI conventions' terms.

`genai_attributes(fn, kwargs)` reads ``gen_ai.operation.name`` (chat | embeddings |
text_completion), ``gen_ai.provider.name`` and ``gen_ai.request.model`` off the callable a
policy runs: an OpenAI SDK resource method (``client.chat.completions.create``, the model in
its kwargs), a LangChain or LlamaIndex model's method, or our adapters' wrappers of them.
How to read a kind of callable is decided once per (type, function); the model is read per
call. Plain functions give what their kwargs say (``model=``), else nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["genai_attributes"]


def _model_path(owner: Any) -> tuple[tuple[str, ...] | None, Any]:
    """Where the model name lives on `owner` (looking one level into a wrapper's model),
    and the object that holds it."""
    for first in (None, "model", "llm"):
        holder = owner if first is None else getattr(owner, first, None)
        if holder is None:
            continue
        for attr in ("model_name", "model"):
            value = getattr(holder, attr, None)
            if isinstance(value, str) and value:
                return ((attr,) if first is None else (first, attr)), holder
    return None, owner


def _provider_of(module: str) -> str | None:
    for provider in ("azure", "openai", "anthropic", "mistral", "cohere", "groq", "ollama"):
        if provider in module:
            return "azure.ai.openai" if provider == "azure" else provider
    return None


# (owner type, function) -> (operation, provider, where the model name is): decided once
_KINDS: dict[tuple[type, Any], tuple[str | None, str | None, tuple[str, ...] | None]] = {}


def _kind_of(owner: Any, method: str) -> tuple[str | None, str | None, tuple[str, ...] | None]:
    path, holder = _model_path(owner)
    module = type(holder).__module__
    words = f"{method} {type(owner).__name__} {module}".lower()
    if "embed" in words:
        operation: str | None = "embeddings"
    elif ".chat." in f".{module}." or "chat" in words:
        operation = "chat"
    elif "complet" in words:
        operation = "text_completion"
    elif path is not None:
        operation = "chat"  # a model object's generate/invoke
    else:
        operation = None
    return operation, _provider_of(module), path


def genai_attributes(
    fn: Callable[..., Any], kwargs: dict[str, Any] | None = None
) -> dict[str, str]:
    """The GenAI attributes (`gen_ai.operation.name`, `gen_ai.provider.name`,
    `gen_ai.request.model`) that can be read off a wrapped callable and its kwargs."""
    model = kwargs.get("model") if kwargs else None
    owner = getattr(fn, "__self__", None)
    while owner is None and hasattr(fn, "__wrapped__"):  # our per-request-timeout wrappers
        fn = fn.__wrapped__
        owner = getattr(fn, "__self__", None)
    out: dict[str, str] = {}
    if owner is not None:
        key = (type(owner), getattr(fn, "__func__", None))
        kind = _KINDS.get(key)
        if kind is None:
            kind = _KINDS[key] = _kind_of(owner, getattr(fn, "__name__", "") or "")
        operation, provider, path = kind
        if operation is not None:
            out["gen_ai.operation.name"] = operation
        if provider is not None:
            out["gen_ai.provider.name"] = provider
        if not isinstance(model, str) and path is not None:
            holder = owner
            for attr in path:
                holder = getattr(holder, attr, None)
            model = holder
    if isinstance(model, str):
        out["gen_ai.request.model"] = model
    return out
