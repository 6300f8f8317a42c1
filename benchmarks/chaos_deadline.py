"""The chaos benchmark's "deadline_chain" scenario (issue 18): a RAG chain answers within its
deadline + 0.5 s when every request stalls, sync and async, from a crowd.

The chains are benchmarks/deadline.py's: ``with_resilience`` (deadline D) around a retriever
over ``ResilientEmbeddings`` and a ``ResilientLLM``, each with its own deadline D; beside it,
the same wrappers without propagation (each layer on its own D: the inner deadlines add up)
and no wrappers (each model's request timeout D, ``with_fallbacks`` to a canned answer).
Every question is asked once while the server is healthy (each layer has a last-known-good
answer), then every request stalls and a crowd asks again: threads calling ``invoke`` and
asyncio tasks calling ``ainvoke`` at the same time. Reported: the slowest answer of each,
against D + 0.5 s (real seconds; D is 10 s of scaled time).
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import deadline as dl
from _common import markdown_table

SCENARIO = "deadline_chain"
SLACK_S = 0.5  # the bound: the whole chain answers within deadline + 0.5 s
QUESTIONS = [
    "How long do refunds take?",
    "What is a circuit breaker?",
    "Why add jitter to retries?",
    "What is a retry budget?",
]
CHAINS: dict[str, Callable[[str, float], Any]] = {
    "no wrappers: request timeout D per model + with_fallbacks": dl.per_layer_timeouts,
    "our wrappers, each layer its own deadline (no propagation)": dl.ours_without_propagation,
    "ours: one deadline (with_resilience over wrapped models)": dl.ours,
}
OURS = "ours: one deadline (with_resilience over wrapped models)"


def deadline_of(scale: float) -> float:
    return 10.0 * scale


def title(scale: float, quick: bool) -> str:
    n = _crowd(quick)
    return (
        f"every request stalls; a RAG chain with deadline D = {deadline_of(scale):g} s "
        f"(= 10 s real-world) over wrapped embeddings and LLM (each also D); {n} threads "
        f"(invoke) and {n} asyncio tasks (ainvoke) at once; target: every answer within "
        f"D + {SLACK_S:g} s"
    )


def _crowd(quick: bool) -> int:
    return 2 if quick else 4


def _idle(server: Any, limit_s: float = 10.0) -> None:
    """Wait until the server holds no request (stalled ones are released first)."""
    end = time.monotonic() + limit_s
    while server.stats().get("in_flight", 0) and time.monotonic() < end:
        time.sleep(0.05)


def _crowd_run(chain: Any, n: int) -> dict[str, Any]:
    """n threads and n tasks ask at once; seconds to each answer, and what failed."""
    sync_s: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def ask(q: str) -> None:
        t0 = time.perf_counter()
        try:
            answer = chain.invoke(q)
            ok = isinstance(answer, str) and bool(answer)
        except Exception as exc:  # an error is a result
            ok, answer = False, f"{type(exc).__name__}: {exc}"
        with lock:
            sync_s.append(time.perf_counter() - t0)
            if not ok:
                errors.append(str(answer)[:120])

    async def aask(q: str) -> float:
        t0 = time.perf_counter()
        try:
            answer = await chain.ainvoke(q)
            if not (isinstance(answer, str) and answer):
                errors.append(repr(answer)[:120])
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:120])
        return time.perf_counter() - t0

    async def tasks() -> list[float]:
        return await asyncio.gather(*(aask(QUESTIONS[i % len(QUESTIONS)]) for i in range(n)))

    threads = [
        threading.Thread(target=ask, args=(QUESTIONS[i % len(QUESTIONS)],)) for i in range(n)
    ]
    for t in threads:
        t.start()
    async_s = asyncio.run(tasks())
    for t in threads:
        t.join()
    return {"sync_s": sync_s, "async_s": list(async_s), "errors": errors}


def run(server: Any, scale: float, quick: bool) -> dict[str, dict[str, Any]]:
    """One row per chain: the crowd's slowest sync and async answers against D + 0.5 s."""
    try:
        import langchain_openai  # noqa: F401
    except ImportError:
        return {name: {"skipped": "langchain-openai not installed"} for name in CHAINS}
    d = deadline_of(scale)
    rows: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, build in CHAINS.items():
            server.set_faults(replace=True)
            chain = build(server.base_url, d)
            for q in QUESTIONS:
                chain.invoke(q)  # warm: every layer has an answer of each question
            server.set_faults(replace=True, stall=True)
            got = _crowd_run(chain, _crowd(quick))
            server.set_faults(replace=True)  # release the stalled requests
            _idle(server)
            worst_sync, worst_async = max(got["sync_s"]), max(got["async_s"])
            rows[name] = {
                "deadline_s": d,
                "calls": len(got["sync_s"]) + len(got["async_s"]),
                "errors": len(got["errors"]),
                "error_samples": got["errors"][:3],
                "max_sync_s": round(worst_sync, 3),
                "max_async_s": round(worst_async, 3),
                "within_bound": max(worst_sync, worst_async) <= d + SLACK_S and not got["errors"],
            }
    return rows


def markdown(rows: dict[str, dict[str, Any]]) -> list[str]:
    table = []
    for name, r in rows.items():
        if "skipped" in r:
            table.append([name, f"skipped: {r['skipped']}", "", "", "", ""])
            continue
        d = r["deadline_s"]
        table.append(
            [
                name,
                f"{r['errors']}/{r['calls']}",
                f"{r['max_sync_s']:.2f} ({r['max_sync_s'] / d:.2f}x D)",
                f"{r['max_async_s']:.2f} ({r['max_async_s'] / d:.2f}x D)",
                f"{d + SLACK_S:g}",
                "yes" if r["within_bound"] else "**no**",
            ]
        )
    headers = ["chain", "errors", "max sync s", "max async s", "bound s", "within"]
    return [markdown_table(headers, table), ""]


def targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    r = rows.get(OURS)
    if not r or "skipped" in r:
        return []
    return [
        {
            "target": f"deadline_chain: sync and async answers within D + {SLACK_S:g} s",
            "contender": OURS,
            "ok": bool(r["within_bound"]),
            "value": f"max sync {r['max_sync_s']:.2f} s, max async {r['max_async_s']:.2f} s, "
            f"D {r['deadline_s']:g} s, {r['errors']} errors",
            "why": "" if r["within_bound"] else "an answer came later than D + 0.5 s or failed",
        }
    ]
