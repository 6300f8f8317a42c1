"""What makes a LangChain wrapper a drop-in for the model it wraps.

- the inner model's attributes stay readable on the wrapper (`inner_attribute`);
- the inner model's callbacks, tags, metadata, verbosity and cache keep working
  (`adopt_run_settings`: the wrapper takes the ones it was not given itself; the inner
  model's rate limiter is applied per attempt by the wrapper's call path);
- constructor keywords are checked: unknown ones and wrong types fail at construction;
- wrapping a wrapper warns once (the outer one unwraps: one policy, not two multiplied).
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

logger = logging.getLogger("rag_resilience")

__all__ = [
    "RewrappedWarning",
    "adopt_run_settings",
    "check_model",
    "field_names",
    "inner_attribute",
    "warn_rewrapped",
]

_warned: set[str] = set()
_lock = threading.Lock()


class RewrappedWarning(UserWarning):
    """A resilient wrapper was wrapped again: the outer one uses the inner model directly."""


def field_names(cls: type) -> set[str]:
    """The constructor keywords of a pydantic model class: field names and aliases."""
    names: set[str] = set()
    for name, info in (getattr(cls, "model_fields", None) or {}).items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return names


def check_model(owner: str, name: str, value: Any, base: type) -> None:
    """TypeError at construction when `value` is not a `base` instance."""
    if not isinstance(value, base):
        from ..knobs import ArgumentTypeError

        raise ArgumentTypeError(
            f"{owner}: {name} must be a {base.__module__}.{base.__qualname__} instance, got "
            f"{type(value).__module__}.{type(value).__qualname__}"
        )


def warn_rewrapped(inner: Any, kind: str) -> None:
    """Warn once per process and kind when a wrapper is wrapped again."""
    with _lock:
        if kind in _warned:
            return
        _warned.add(kind)
    message = (
        f"{kind} wraps a {type(inner).__name__} that is already resilient: the outer one "
        "wraps its inner model directly, so attempts are not multiplied (the inner "
        "wrapper's policy is not used)"
    )
    warnings.warn(message, RewrappedWarning, stacklevel=5)
    logger.warning(message)


def reset_warnings() -> None:
    with _lock:
        _warned.clear()


def adopt_run_settings(wrapper: Any, inner: Any) -> None:
    """The wrapper takes the inner model's callbacks, tags, metadata, verbose and cache
    where it was not given its own: LangChain runs the wrapper, not the inner model, so
    settings left on the inner model would otherwise be dropped."""
    given = wrapper.model_fields_set
    for name in ("callbacks", "verbose", "cache"):
        value = getattr(inner, name, None)
        if name in given or value is None or (name == "verbose" and value is False):
            continue
        object.__setattr__(wrapper, name, value)
    inner_tags = getattr(inner, "tags", None)
    if inner_tags:
        own = list(wrapper.tags or [])
        object.__setattr__(wrapper, "tags", [*own, *(t for t in inner_tags if t not in own)])
    inner_meta = getattr(inner, "metadata", None)
    if inner_meta:
        object.__setattr__(wrapper, "metadata", {**inner_meta, **(wrapper.metadata or {})})


def inner_attribute(inner: Any, name: str) -> Any:
    """`inner.<name>`, also for a field's alias (`ChatOpenAI.model` is `model_name`)."""
    try:
        return getattr(inner, name)
    except AttributeError:
        for field, info in (getattr(type(inner), "model_fields", None) or {}).items():
            if info.alias == name:
                return getattr(inner, field)
        raise


# -- models inside a wrapped chain that retry by themselves ---------------------------------
_CHILDREN = (
    "steps",
    "steps__",
    "bound",
    "first",
    "middle",
    "last",
    "runnable",
    "runnables",
    "default",
    "branches",
    "retriever",
    "vectorstore",
    "embeddings",
    "embedding",
    "_embedding_function",
    "llm",
    "mapper",
)


def _children(node: Any) -> list[Any]:
    out: list[Any] = []
    for attr in _CHILDREN:
        try:
            value = node.__dict__.get(attr) if hasattr(node, "__dict__") else None
            if value is None and attr in ("first", "last", "middle", "steps"):
                value = getattr(node, attr, None)
        except Exception:  # a property that fails: nothing to see there
            continue
        if value is None:
            continue
        if isinstance(value, dict):
            out.extend(value.values())
        elif isinstance(value, (list, tuple)):
            for item in value:
                out.extend(item if isinstance(item, tuple) else (item,))
        else:
            out.append(value)
    return out


def self_retrying(root: Any, limit: int = 256) -> list[tuple[Any, int]]:
    """The models inside a chain that retry by themselves, with their max_retries.

    Our own wrappers are skipped (they warn for their inner model themselves)."""
    from ._common import effective_max_retries

    found: list[tuple[Any, int]] = []
    seen: set[int] = set()
    stack = [root]
    while stack and len(seen) < limit:
        node = stack.pop()
        if id(node) in seen or isinstance(node, (str, bytes, int, float)):
            continue
        seen.add(id(node))
        if getattr(type(node), "__module__", "").startswith("rag_resilience.") and node is not root:
            continue
        if _is_model(node):
            retries = effective_max_retries(node)
            if retries > 0:
                found.append((node, retries))
            continue
        stack.extend(_children(node))
    return found


def _is_model(node: Any) -> bool:
    from langchain_core.embeddings import Embeddings
    from langchain_core.language_models import BaseLanguageModel

    return isinstance(node, (BaseLanguageModel, Embeddings))


def warn_self_retrying(root: Any, policy: Any, owner: str) -> None:
    """Warn once per model class when a model inside the wrapped chain retries by itself:
    each attempt of the chain then makes up to max_retries + 1 requests to it."""
    ours = policy.retry.max_retries + 1 if policy.retry is not None else 1
    for model, retries in self_retrying(root):
        cls = type(model)
        marker = f"chain:{owner}:{cls.__module__}.{cls.__qualname__}"
        with _lock:
            if marker in _warned:
                continue
            _warned.add(marker)
        from ..adapters import NestedRetriesWarning

        message = (
            f"{cls.__name__} inside the chain wrapped by {owner} retries by itself "
            f"(max_retries={retries}): each of the {ours} attempts of the chain can make "
            f"{retries + 1} requests to it, up to {ours * (retries + 1)} per call during an "
            f"outage. Build it with max_retries=0, e.g. {cls.__name__}(..., max_retries=0), "
            "or wrap it in a Resilient wrapper."
        )
        warnings.warn(message, NestedRetriesWarning, stacklevel=4)
        logger.warning(message)
