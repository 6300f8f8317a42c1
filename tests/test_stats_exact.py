"""Stats you can trust (issue 18, part 2): for each adapter, a crowd of threads and asyncio
tasks through one wrapper, while the chaos server fails the next few requests; the
wrapper's and the handler's attempts and retries must equal the server's own request
count (read once the server is idle), and every user call is counted once.
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
FAILS = 4  # below the breaker's threshold (5): every failed request is retried


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as clk:
        yield clk


def policy(name: str) -> ResiliencePolicy:
    return ResiliencePolicy.preset("balanced", name=name, max_retries=5, retry_budget=None)


def crowd(sync_call: Callable[[int], Any], async_call: Callable[[int], Awaitable[Any]]) -> None:
    errors: list[BaseException] = []

    def thread(i: int) -> None:
        try:
            sync_call(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    async def tasks() -> None:
        await asyncio.gather(*(async_call(THREADS + i) for i in range(TASKS)))

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    assert not errors


def requests(server: ChaosServer, endpoint: str) -> int:
    assert server.wait_idle()  # counters move after the answer is written
    return int(server.stats()["endpoints"][endpoint]["requests"])


def check(stats: dict[str, Any], made: int, *, engine: bool = True) -> None:
    """`engine`: the numbers come from policy events (which see each failed attempt's
    error), not from the LangChain handler's one custom event per call."""
    calls = THREADS + TASKS
    assert made == calls + FAILS
    assert stats["attempts"] == made, stats
    assert stats["retries"] == FAILS, stats
    assert stats["calls"] == calls and stats["live"] == calls, stats
    assert stats["calls"] == stats["live"] + stats["degraded"] + stats["errors"]
    assert stats["errors_by_class"] == {}
    if engine:
        assert sum(stats["attempt_errors_by_class"].values()) == FAILS


def test_openai_clients(chaos_server: ChaosServer, clock: FakeClock) -> None:
    from rag_resilience import AsyncResilientOpenAIClient, ResilientOpenAIClient

    shared = policy("exact-openai")
    sync = ResilientOpenAIClient(api_key="sk-test", base_url=chaos_server.base_url, policy=shared)
    aclient = AsyncResilientOpenAIClient(
        api_key="sk-test", base_url=chaos_server.base_url, policy=shared
    )
    msg = [{"role": "user", "content": "hello"}]
    chaos_server.set_faults(fail_next=FAILS, fail_next_status=500)
    crowd(
        lambda i: sync.chat.completions.create(model="m", messages=msg),
        lambda i: aclient.chat.completions.create(model="m", messages=msg),
    )
    stats = shared.stats()
    check(stats, requests(chaos_server, "chat"))
    assert stats["retries_by_reason"] == {"http_500": FAILS}


def test_langchain_llm_and_handler(chaos_server: ChaosServer, clock: FakeClock) -> None:
    from langchain_openai import ChatOpenAI

    from rag_resilience.langchain import ResilienceCallbackHandler, ResilientLLM

    llm = ResilientLLM(
        ChatOpenAI(model="m", max_retries=0, base_url=chaos_server.base_url, api_key="sk-test"),
        policy=policy("exact-lc-llm"),
    )
    handler = ResilienceCallbackHandler()
    cfg: Any = {"callbacks": [handler]}
    chaos_server.set_faults(fail_next=FAILS, fail_next_status=500)
    crowd(lambda i: llm.invoke(f"q{i}", config=cfg), lambda i: llm.ainvoke(f"q{i}", config=cfg))
    made = requests(chaos_server, "chat")
    check(llm.resilience_policy.stats(), made)
    check(handler.stats(), made, engine=False)


def test_langchain_embeddings_and_handler(chaos_server: ChaosServer, clock: FakeClock) -> None:
    from langchain_core.runnables import RunnableLambda
    from langchain_openai import OpenAIEmbeddings

    from rag_resilience.langchain import ResilienceCallbackHandler, ResilientEmbeddings

    emb = ResilientEmbeddings(
        OpenAIEmbeddings(
            model="text-embedding-3-small",
            max_retries=0,
            base_url=chaos_server.base_url,
            api_key="sk-test",
            check_embedding_ctx_length=False,
        ),
        policy=policy("exact-lc-emb"),
    )
    handler = ResilienceCallbackHandler()
    cfg: Any = {"callbacks": [handler]}

    async def aembed(q: str) -> list[float]:
        return await emb.aembed_query(q)

    # embeddings have no run of their own: a user's runnable around them carries the handler
    run = RunnableLambda(emb.embed_query, afunc=aembed)
    chaos_server.set_faults(fail_next=FAILS, fail_next_status=500)
    crowd(lambda i: run.invoke(f"q{i}", config=cfg), lambda i: run.ainvoke(f"q{i}", config=cfg))
    made = requests(chaos_server, "embeddings")
    check(emb.policy.stats(), made)
    h = handler.stats()
    # the handler hears of a call when it was retried or degraded: the retries are exact
    assert h["retries"] == FAILS and h["errors"] == 0 and h["degraded"] == 0


def test_llama_index_llm_and_handler(chaos_server: ChaosServer, clock: FakeClock) -> None:
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai import OpenAI

    from rag_resilience.llama_index import ResilienceEventHandler, ResilientLLM

    llm = ResilientLLM(
        OpenAI(api_base=chaos_server.base_url, api_key="sk-test", max_retries=0),
        policy=policy("exact-li-llm"),
    )
    handler = ResilienceEventHandler(names={"exact-li-llm"})
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        msgs = [ChatMessage(role="user", content="hello")]
        chaos_server.set_faults(fail_next=FAILS, fail_next_status=500)
        crowd(lambda i: llm.chat(msgs), lambda i: llm.achat(msgs))
    finally:
        root.event_handlers.remove(handler)
        handler.close()
    made = requests(chaos_server, "chat")
    check(llm.policy.stats(), made)
    check(handler.stats(), made)


def test_llama_index_embedding(chaos_server: ChaosServer, clock: FakeClock) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    from rag_resilience.llama_index import ResilientEmbedding

    emb = ResilientEmbedding(
        OpenAIEmbedding(api_base=chaos_server.base_url, api_key="sk-test", max_retries=0),
        policy=policy("exact-li-emb"),
    )
    chaos_server.set_faults(fail_next=FAILS, fail_next_status=500)
    crowd(
        lambda i: emb.get_query_embedding(f"q{i}"),
        lambda i: emb.aget_query_embedding(f"q{i}"),
    )
    check(emb.policy.stats(), requests(chaos_server, "embeddings"))


def test_chain_outage_counts_each_user_call_once(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    """The issue's tutorial run: a with_resilience chain over wrapped embeddings and LLM
    answered 6 questions from cache and the handler said degraded 14 (once per component),
    while the chain's own stats counted them live."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    from rag_resilience.langchain import (
        ResilienceCallbackHandler,
        ResilientEmbeddings,
        ResilientLLM,
        with_resilience,
    )

    emb = ResilientEmbeddings(
        OpenAIEmbeddings(
            model="text-embedding-3-small",
            max_retries=0,
            base_url=chaos_server.base_url,
            api_key="sk-test",
            check_embedding_ctx_length=False,
        ),
        policy=policy("once-emb"),
    )
    llm = ResilientLLM(
        ChatOpenAI(model="m", max_retries=0, base_url=chaos_server.base_url, api_key="sk-test"),
        policy=policy("once-llm"),
    )
    prompt = ChatPromptTemplate.from_messages([("human", "{context} {question}")])

    def context(q: str) -> dict[str, str]:
        return {"context": str(len(emb.embed_query(q))), "question": q}

    async def acontext(q: str) -> dict[str, str]:
        return {"context": str(len(await emb.aembed_query(q))), "question": q}

    chain_policy = ResiliencePolicy.preset("balanced", name="once-chain", max_retries=0)
    chain = with_resilience(
        RunnableLambda(context, afunc=acontext) | prompt | llm | StrOutputParser(),
        policy=chain_policy,
    )
    handler = ResilienceCallbackHandler()
    cfg: Any = {"callbacks": [handler]}
    questions = [f"question {i}?" for i in range(THREADS + TASKS)]
    known = {q: chain.invoke(q) for q in questions}
    handler.reset()
    chain_policy.reset_stats()

    chaos_server.set_faults(outage=True)
    answers: dict[str, Any] = {}

    def ask(i: int) -> None:
        answers[questions[i]] = chain.invoke(questions[i], config=cfg)

    async def aask(i: int) -> None:
        answers[questions[i]] = await chain.ainvoke(questions[i], config=cfg)

    crowd(ask, aask)
    assert answers == known  # every layer served its last-known-good answer
    calls = THREADS + TASKS
    h = handler.stats()
    assert (h["calls"], h["degraded"], h["live"], h["errors"]) == (calls, calls, 0, 0), h
    assert sum(h["degraded_by_source"].values()) == calls
    chain_stats = chain_policy.stats()
    assert (chain_stats["calls"], chain_stats["degraded"], chain_stats["live"]) == (calls, calls, 0)
    # the embeddings failed first, so the chain answered on their cached vectors
    assert chain_stats["degraded_by_source"] == {"cache": calls}


def test_every_wrapper_and_handler_has_the_documented_keys() -> None:
    """One snapshot shape: the README's keys in policy.stats() and both handlers'."""
    from rag_resilience.langchain import ResilienceCallbackHandler
    from rag_resilience.llama_index import ResilienceCallbackHandler as LlamaCallbackHandler
    from rag_resilience.llama_index import ResilienceEventHandler

    documented = {
        "calls", "live", "degraded", "errors", "degraded_by_source", "errors_by_class",
        "error_rate", "degraded_rate", "attempts", "retries", "retries_by_reason",
        "attempt_errors_by_class", "rejections", "rejections_by_reason", "breaker_transitions",
        "latency_s", "successes", "failures", "fallbacks_by_source", "retry_reasons",
    }  # fmt: skip
    gauges = {"breaker_state", "in_flight", "queue_depth", "cache_entries"}
    policy_keys = set(ResiliencePolicy.preset("balanced", name="keys").stats())
    assert documented | gauges <= policy_keys
    assert documented | gauges <= set(ResilienceCallbackHandler().stats())
    event_handler = ResilienceEventHandler()
    try:
        assert documented <= set(event_handler.stats())
    finally:
        event_handler.close()
    assert documented <= set(LlamaCallbackHandler().stats())
