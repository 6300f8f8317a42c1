"""Helpers shared by the framework adapters (LangChain, LlamaIndex, OpenAI client).

Framework-free: they inspect wrapped objects duck-typed, never import a framework.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

__all__ = ["NestedRetriesWarning", "inner_max_retries", "model_identity", "warn_nested_retries"]

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
