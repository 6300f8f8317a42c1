"""The shared record of degraded answers served inside one outer call."""

from __future__ import annotations

import ast
import asyncio
import contextvars
import threading
from pathlib import Path
from typing import Any

import pytest

import rag_resilience.degraded as degraded_module
from rag_resilience.degraded import (
    DegradedScope,
    enter_scope,
    exit_scope,
    note_degraded,
    track_degraded,
)
from rag_resilience.policy import Served


def _current() -> DegradedScope | None:
    return degraded_module._scope.get()


def test_note_outside_any_scope_is_a_no_op() -> None:
    assert _current() is None
    note_degraded({"source": "cache"})
    assert _current() is None


def test_scope_collects_notes_in_order() -> None:
    with track_degraded() as scope:
        assert not scope.degraded and len(scope) == 0
        note_degraded({"source": "cache", "n": 1})
        note_degraded({"source": "generic_fallback", "n": 2})
    assert scope.degraded and len(scope) == 2
    assert [m["n"] for m in scope] == [1, 2]
    assert scope.served == scope.snapshot()
    assert scope.snapshot() is not scope.served
    assert _current() is None


def test_nesting_restores_the_outer_scope() -> None:
    with track_degraded() as outer:
        note_degraded({"where": "outer-before"})
        with track_degraded() as inner:
            assert _current() is inner
            note_degraded({"where": "inner"})
        assert _current() is outer
        note_degraded({"where": "outer-after"})
    assert [m["where"] for m in inner] == ["inner"]
    assert [m["where"] for m in outer] == ["outer-before", "outer-after"]
    assert _current() is None


def test_enter_and_exit_scope_nest_like_track_degraded() -> None:
    outer, t1 = enter_scope()
    inner, t2 = enter_scope()
    note_degraded({"n": 1})
    exit_scope(t2)
    note_degraded({"n": 2})
    exit_scope(t1)
    note_degraded({"n": 3})
    assert inner.served == [{"n": 1}] and outer.served == [{"n": 2}]
    assert _current() is None


def test_scope_is_restored_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), track_degraded():
        note_degraded({"n": 1})
        raise RuntimeError("boom")
    assert _current() is None


def test_reset_from_another_context_does_not_raise() -> None:
    # e.g. an async generator opened the scope and is finalised in another context.
    scope, token = enter_scope()
    contextvars.copy_context().run(exit_scope, token)  # would be ValueError unsuppressed
    assert _current() is scope  # nothing was reset here
    exit_scope(token)
    assert _current() is None


async def test_scopes_are_per_asyncio_task() -> None:
    a_in, b_in, a_noted = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def a() -> DegradedScope:
        with track_degraded() as scope:
            a_in.set()
            await b_in.wait()  # both scopes open at once
            note_degraded({"task": "a"})
            a_noted.set()
        return scope

    async def b() -> DegradedScope:
        with track_degraded() as scope:
            b_in.set()
            await a_in.wait()
            await a_noted.wait()
            note_degraded({"task": "b"})
        return scope

    sa, sb = await asyncio.gather(a(), b())
    assert sa.served == [{"task": "a"}] and sb.served == [{"task": "b"}]
    assert _current() is None


async def test_child_tasks_note_into_the_scope_they_were_started_in() -> None:
    async def inner(n: int) -> None:
        note_degraded({"n": n})

    with track_degraded() as scope:
        await asyncio.gather(*(inner(n) for n in range(3)))
    assert sorted(m["n"] for m in scope) == [0, 1, 2]


def test_threads_see_the_scope_only_through_a_copied_context() -> None:
    with track_degraded() as scope:
        plain = threading.Thread(target=note_degraded, args=({"how": "plain"},))
        plain.start()
        plain.join()
        ctx = contextvars.copy_context()
        copied = threading.Thread(target=ctx.run, args=(note_degraded, {"how": "copied"}))
        copied.start()
        copied.join()
    assert scope.served == [{"how": "copied"}]


def test_add_is_thread_safe() -> None:
    threads, per_thread = 8, 500
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            note_degraded({"t": i, "j": j})

    with track_degraded() as scope:
        workers = [
            threading.Thread(target=contextvars.copy_context().run, args=(work, i))
            for i in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert len(scope) == threads * per_thread
    assert {(m["t"], m["j"]) for m in scope} == {
        (i, j) for i in range(threads) for j in range(per_thread)
    }


def test_llama_index_record_degraded_notes_into_the_shared_scope() -> None:
    pytest.importorskip("llama_index.core")
    from rag_resilience.llama_index._common import record_degraded

    live: Served[Any] = Served("ok")
    stale: Served[Any] = Served("old", source="cache", age_s=2.0, degraded=True)
    scope, token = enter_scope()  # as LangChain's with_resilience opens it
    try:
        record_degraded("llm", live)
        record_degraded("llm", stale)
    finally:
        exit_scope(token)
    assert scope.served == [{**stale.metadata(), "component": "llm"}]


def test_core_module_imports_no_adapter() -> None:
    tree = ast.parse(Path(degraded_module.__file__).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    banned = ("langchain", "llama_index", "openai")
    assert not [n for n in names if any(b in n for b in banned)], names
