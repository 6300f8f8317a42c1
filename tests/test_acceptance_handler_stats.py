"""Acceptance: the LangChain handler's attempts and retries when a call fails for good.

Found in the tutorial app at 60% 503s: the handler reported 25 retries against 34 made (the
server's count). A ResilientEmbeddings or ResilientLLM call that raised after its retries
sent its event without its attempts, so the handler counted none of them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from rag_resilience.chaos import ChaosServer
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

THREADS = 3
TASKS = 3
ATTEMPTS = 3  # max_retries=2


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as clk:
        yield clk


@pytest.fixture
def server(chaos_server_factory: Any) -> ChaosServer:
    """A server of its own: langchain-openai caches its async HTTP client per base URL, and
    connections opened under this test's event loop must not reach another test's loop."""
    own: ChaosServer = chaos_server_factory(seed=3)
    return own


def policy(name: str) -> ResiliencePolicy:
    # the breaker must not open during the crowd: every call makes all its attempts
    return ResiliencePolicy.preset(
        "balanced", name=name, max_retries=ATTEMPTS - 1, retry_budget=None, failure_threshold=1000
    )


def crowd(sync_call: Callable[[int], Any], async_call: Callable[[int], Awaitable[Any]]) -> int:
    """Threads and asyncio tasks together; returns how many calls raised."""
    raised: list[BaseException] = []
    lock = threading.Lock()

    def thread(i: int) -> None:
        try:
            sync_call(i)
        except Exception as exc:
            with lock:
                raised.append(exc)

    async def task(i: int) -> None:
        try:
            await async_call(i)
        except Exception as exc:
            with lock:
                raised.append(exc)

    async def tasks() -> None:
        await asyncio.gather(*(task(THREADS + i) for i in range(TASKS)))

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    return len(raised)


def requests(server: ChaosServer, endpoint: str) -> int:
    assert server.wait_idle()
    return int(server.stats()["endpoints"][endpoint]["requests"])


def check_failed(stats: dict[str, Any], made: int) -> None:
    calls = THREADS + TASKS
    assert made == calls * ATTEMPTS
    assert stats["attempts"] == made, stats
    assert stats["retries"] == made - calls, stats


def test_failed_embeddings_calls_count_their_attempts(
    server: ChaosServer, clock: FakeClock
) -> None:
    from langchain_core.runnables import RunnableLambda
    from langchain_openai import OpenAIEmbeddings

    from rag_resilience.langchain import ResilienceCallbackHandler, ResilientEmbeddings

    emb = ResilientEmbeddings(
        OpenAIEmbeddings(
            model="text-embedding-3-small",
            max_retries=0,
            base_url=server.base_url,
            api_key="sk-test",
            check_embedding_ctx_length=False,
        ),
        policy=policy("accept-lc-emb-fail"),
    )
    handler = ResilienceCallbackHandler()
    cfg: Any = {"callbacks": [handler]}

    async def aembed(q: str) -> list[float]:
        return await emb.aembed_query(q)

    run = RunnableLambda(emb.embed_query, afunc=aembed)
    server.set_faults(outage=True, status=503)
    raised = crowd(
        lambda i: run.invoke(f"q{i}", config=cfg), lambda i: run.ainvoke(f"q{i}", config=cfg)
    )
    assert raised == THREADS + TASKS
    made = requests(server, "embeddings")
    check_failed(emb.policy.stats(), made)
    check_failed(handler.stats(), made)


def test_failed_chat_calls_count_their_attempts(server: ChaosServer, clock: FakeClock) -> None:
    from langchain_openai import ChatOpenAI

    from rag_resilience.langchain import ResilienceCallbackHandler, ResilientLLM

    llm = ResilientLLM(
        ChatOpenAI(model="m", max_retries=0, base_url=server.base_url, api_key="sk-test"),
        policy=policy("accept-lc-llm-fail"),
        generic_fallback=False,
    )
    handler = ResilienceCallbackHandler()
    cfg: Any = {"callbacks": [handler]}
    server.set_faults(outage=True, status=503)
    raised = crowd(
        lambda i: llm.invoke(f"q{i}", config=cfg), lambda i: llm.ainvoke(f"q{i}", config=cfg)
    )
    assert raised == THREADS + TASKS
    made = requests(server, "chat")
    check_failed(llm.resilience_policy.stats(), made)
    stats = handler.stats()
    check_failed(stats, made)
    assert stats["errors"] == THREADS + TASKS
