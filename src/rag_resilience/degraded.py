"""Which inner wrappers served a degraded answer during one outer call.

A resilient wrapper around a chain, query engine or agent caches its output as
last-known-good and reports whether it was live. If an inner resilient LLM or embeddings
wrapper answered from cache or with a generic fallback, the outer output is built on a
degraded answer even though the outer call itself succeeded: it must then neither be
stored as last-known-good nor reported as live. The outer wrapper opens a scope for the
call; inner wrappers note each degraded answer into whichever scope is current.

One ContextVar serves every adapter, so a LangChain wrapper degrading inside a LlamaIndex
engine (or the other way round) is seen too.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

__all__ = [
    "DegradedScope",
    "enter_scope",
    "exit_scope",
    "in_outer_call",
    "nested",
    "note_degraded",
    "track_degraded",
]


class DegradedScope:
    """The metadata of each degraded answer served inside one outer call.

    Thread-safe: a sync call run in a worker thread with a copied context (as LangChain
    does) adds to the same scope as the caller.
    """

    __slots__ = ("_lock", "owner", "served")

    def __init__(self, owner: Any = None) -> None:
        self.served: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        #: The policy of the outer wrapper that opened the scope (its own calls run inside
        #: it, and are not nested).
        self.owner = owner

    def add(self, meta: dict[str, Any]) -> None:
        with self._lock:
            self.served.append(meta)

    def snapshot(self) -> list[dict[str, Any]]:
        """A copy of what was served so far, safe to keep after the scope closes."""
        with self._lock:
            return list(self.served)

    @property
    def degraded(self) -> bool:
        """True once any inner wrapper served a degraded answer in this scope."""
        return bool(self.served)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        return len(self.served)

    def __repr__(self) -> str:
        return f"DegradedScope(served={self.served!r})"


_scope: contextvars.ContextVar[DegradedScope | None] = contextvars.ContextVar(
    "rag_resilience_degraded_scope", default=None
)


def enter_scope(
    owner: Any = None,
) -> tuple[DegradedScope, contextvars.Token[DegradedScope | None]]:
    """Open a fresh scope for the current context; pass the token to `exit_scope`.
    `owner`: the outer wrapper's policy (see `nested`)."""
    scope = DegradedScope(owner)
    return scope, _scope.set(scope)


def in_outer_call() -> bool:
    """Is an outer resilient wrapper's call (chain, engine, agent) running here?"""
    return _scope.get() is not None


def nested(policy: Any) -> bool:
    """Is a call of `policy` running inside an outer resilient wrapper's call (a chain,
    engine or agent wrapper)? Then it is one component of that user call: aggregated
    stats count the user call once, from the outer wrapper."""
    scope = _scope.get()
    return scope is not None and scope.owner is not policy


def exit_scope(token: contextvars.Token[DegradedScope | None]) -> None:
    """Restore the scope that was current before the matching `enter_scope`."""
    # ValueError: reset from another context (a generator finalised elsewhere).
    with contextlib.suppress(ValueError):
        _scope.reset(token)


@contextlib.contextmanager
def track_degraded(owner: Any = None) -> Iterator[DegradedScope]:
    """Collect the degraded answers noted inside the block.

    Nested blocks each get their own scope; the outer one is restored on exit and does
    not see what was noted in the inner one. Threads started without a copy of the
    context are not tracked.
    """
    scope, token = enter_scope(owner)
    try:
        yield scope
    finally:
        exit_scope(token)


def note_degraded(meta: dict[str, Any]) -> None:
    """Tell the enclosing outer call, if any, that a degraded answer was served."""
    scope = _scope.get()
    if scope is not None:
        scope.add(meta)
