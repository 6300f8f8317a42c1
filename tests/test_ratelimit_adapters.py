"""Pacing through the framework adapters over real HTTP: LangChain ChatOpenAI with our
`PacingRateLimiter`, `ResilientLLM` and `ResilientEmbeddings` (LangChain), `ResilientLLM`
(LlamaIndex), each a crowd of threads and asyncio tasks against the chaos server's
per-key buckets, one injected clock for client and server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import ChaosServer
from rag_resilience.langchain import PacingRateLimiter, ResilientEmbeddings
from rag_resilience.langchain import ResilientLLM as LCResilientLLM
from rag_resilience.ratelimit import RateLimiter
from rag_resilience.testing import FakeClock

THREADS, TASKS, EACH = 4, 4, 4
CALLERS = THREADS + TASKS


def run_crowd(
    sync_call: Callable[[], Any], async_call: Callable[[], Awaitable[Any]]
) -> tuple[list[Any], list[BaseException]]:
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(EACH):
            try:
                value = sync_call()
            except Exception as exc:
                with lock:
                    errors.append(exc)
            else:
                with lock:
                    results.append(value)

    async def tasks() -> None:
        async def one() -> None:
            for _ in range(EACH):
                try:
                    value = await async_call()
                except Exception as exc:
                    with lock:
                        errors.append(exc)
                else:
                    with lock:
                        results.append(value)

        await asyncio.gather(*(one() for _ in range(TASKS)))

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    threads.append(threading.Thread(target=asyncio.run, args=(tasks(),)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def server_for(factory: Callable[..., ChaosServer], clock: FakeClock, **kw: Any) -> ChaosServer:
    return factory(clock=clock, **{"rate_limit_rps": 40.0, "rate_limit_burst": 5, **kw})


def test_chat_openai_with_our_langchain_rate_limiter(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    """Plain ChatOpenAI (no wrapper) paced by PacingRateLimiter told a safe rate: no 429
    at all, and it learns the server's limit from the responses as it goes.

    On a fake clock, sleepers do not overlap: each advances time by its whole wait, so
    callers whose slots have passed send together. At most one request per caller is
    late that way, hence a server burst of CALLERS + 1 (real time: see the benchmark)."""
    clock = FakeClock()
    server = server_for(chaos_server_factory, clock, rate_limit_burst=CALLERS + 1)
    pacing = PacingRateLimiter(RateLimiter(requests_per_second=30.0, clock=clock))
    llm = pacing.attach(
        ChatOpenAI(
            model="gpt-4o-mini",
            base_url=server.base_url,
            api_key="sk-lc",
            max_retries=0,
            rate_limiter=pacing,
        )
    )
    results, errors = run_crowd(lambda: llm.invoke("hi"), lambda: llm.ainvoke("hi"))
    assert server.wait_idle()
    assert errors == [] and len(results) == CALLERS * EACH
    assert server.stats()["statuses"] == {200: CALLERS * EACH}
    stats = pacing.stats()
    up = stats["upstreams"][pacing.upstream]
    assert up["requests_source"] == "configured" and up["requests_per_s"] == 30.0
    assert stats["paced"] > 0 and "sk-lc" not in pacing.upstream
    assert pacing.acquire(blocking=False) in (True, False)  # never blocks


def test_langchain_resilient_llm_learns_and_paces(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    clock = FakeClock()
    server = server_for(chaos_server_factory, clock)
    policy = ResiliencePolicy.preset("balanced", clock=clock)
    llm = LCResilientLLM(
        ChatOpenAI(model="gpt-4o-mini", base_url=server.base_url, api_key="sk-r", max_retries=0),
        policy=policy,
    )
    results, errors = run_crowd(lambda: llm.invoke("hi"), lambda: llm.ainvoke("hi"))
    assert server.wait_idle()
    assert errors == []
    assert not any(r.response_metadata["resilience"]["degraded"] for r in results)
    assert server.stats()["successes"] == CALLERS * EACH
    assert server.stats()["statuses"].get(429, 0) <= CALLERS
    ((key, up),) = policy.stats()["rate_limit"]["upstreams"].items()
    assert "|gpt-4o-mini|" in key and up["requests_source"] == "headers"


def test_resilient_embeddings_are_paced(chaos_server_factory: Callable[..., ChaosServer]) -> None:
    clock = FakeClock()
    server = server_for(chaos_server_factory, clock)
    policy = ResiliencePolicy.preset("balanced", clock=clock)
    emb = ResilientEmbeddings(
        OpenAIEmbeddings(
            base_url=server.base_url,
            api_key="sk-e",
            max_retries=0,
            check_embedding_ctx_length=False,
        ),
        policy=policy,
    )
    results, errors = run_crowd(
        lambda: emb.embed_documents(["a", "b"]), lambda: emb.aembed_documents(["a", "b"])
    )
    assert server.wait_idle()
    assert errors == [] and len(results) == CALLERS * EACH
    assert server.stats()["statuses"].get(429, 0) <= CALLERS
    assert policy.stats()["degraded"] == 0
    up = next(iter(policy.stats()["rate_limit"]["upstreams"].values()))
    assert up["requests_source"] == "headers"


def test_llama_index_resilient_llm_is_paced(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    pytest.importorskip("llama_index.llms.openai")
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.llms.openai import OpenAI

    from rag_resilience.llama_index import ResilientLLM as LIResilientLLM

    clock = FakeClock()
    server = server_for(chaos_server_factory, clock)
    policy = ResiliencePolicy.preset("balanced", clock=clock)
    llm = LIResilientLLM(
        OpenAI(model="gpt-4o-mini", api_base=server.base_url, api_key="sk-li", max_retries=0),
        policy=policy,
    )
    msgs = [ChatMessage(role="user", content="hi")]
    results, errors = run_crowd(lambda: llm.chat(msgs), lambda: llm.achat(msgs))
    assert server.wait_idle()
    assert errors == [] and len(results) == CALLERS * EACH
    assert policy.stats()["degraded"] == 0
    assert server.stats()["statuses"].get(429, 0) <= CALLERS
    ((key, up),) = policy.stats()["rate_limit"]["upstreams"].items()
    assert "|gpt-4o-mini|" in key and up["requests_source"] == "headers"
