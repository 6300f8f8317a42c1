"""A broken 200 on the async paths of the framework adapters (issue 18, part 2): LlamaIndex's
OpenAI / OpenAIEmbedding and LangChain's OpenAIEmbeddings read a truncated body as
`json.JSONDecodeError` and a text/plain page as ``'str' object has no attribute ...``.
Async calls were not marked as upstream faults (the sync ones were): they failed at once
as caller errors. Real SDK classes over real HTTP against the chaos server.

LangChain's async ChatOpenAI looked retried as "connection": langchain-openai shares one
httpx.AsyncClient per (base_url, timeout) across the process (langchain-ai/langchain#35783),
so after an earlier test's ``asyncio.run`` its pooled connections belong to a closed loop;
the server answered (broken body and all) and the client lost the answer with
``RuntimeError: Event loop is closed``. That is now its own verdict, "stale_connection"
(retried, not a breaker failure: the last test here); the malformed test gives ChatOpenAI
a client of its own so it sees the broken bodies it is about."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import ChaosServer
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CALLERS = 3  # threads on the sync path and tasks on the async path, at once
BROKEN = 3


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as clk:
        yield clk


def policy(name: str) -> ResiliencePolicy:
    return ResiliencePolicy.preset("balanced", name=name, retry_budget=None, max_retries=5)


def llama_llm(url: str, name: str) -> tuple[Callable[[], Any], Callable[[], Any], Any]:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai import OpenAI

    from rag_resilience.llama_index import ResilientLLM

    llm = ResilientLLM(OpenAI(api_base=url, api_key="sk-test", max_retries=0), policy=policy(name))
    messages = [ChatMessage(role="user", content="What is a circuit breaker?")]

    asked = iter(range(1000))

    async def ask() -> Any:  # the chat and completion entry points, in turn
        if next(asked) % 2:
            return await llm.acomplete("Hi")
        return await llm.achat(messages)

    return lambda: llm.chat(messages), ask, llm.policy


def llama_embedding(url: str, name: str) -> tuple[Callable[[], Any], Callable[[], Any], Any]:
    from llama_index.embeddings.openai import OpenAIEmbedding

    from rag_resilience.llama_index import ResilientEmbedding

    emb = ResilientEmbedding(
        OpenAIEmbedding(api_base=url, api_key="sk-test", max_retries=0), policy=policy(name)
    )
    asked = iter(range(1000))

    async def ask() -> Any:
        i = next(asked)
        if i % 3 == 0:
            return await emb.aget_query_embedding(f"query {i}")
        if i % 3 == 1:
            return await emb.aget_text_embedding(f"text {i}")
        return await emb.aget_text_embedding_batch([f"doc {i}"])

    return lambda: emb.get_query_embedding("refunds"), ask, emb.policy


def langchain_embeddings(url: str, name: str) -> tuple[Callable[[], Any], Callable[[], Any], Any]:
    from langchain_openai import OpenAIEmbeddings

    from rag_resilience.langchain import ResilientEmbeddings

    emb = ResilientEmbeddings(
        OpenAIEmbeddings(
            base_url=url, api_key="sk-test", max_retries=0, check_embedding_ctx_length=False
        ),
        policy=policy(name),
    )
    asked = iter(range(1000))

    async def ask() -> Any:
        i = next(asked)
        if i % 2:
            return await emb.aembed_query(f"query {i}")
        return await emb.aembed_documents([f"doc {i}"])

    return lambda: emb.embed_query("refunds"), ask, emb.policy


def langchain_llm(url: str, name: str) -> tuple[Callable[[], Any], Callable[[], Any], Any]:
    import httpx
    from langchain_openai import ChatOpenAI

    from rag_resilience.langchain import ResilientLLM

    llm = ResilientLLM(
        ChatOpenAI(
            model="m",
            max_retries=0,
            base_url=url,
            api_key="sk-test",
            http_async_client=httpx.AsyncClient(),  # not the process-wide one (see the top)
        ),
        policy=policy(name),
    )
    asked = iter(range(1000))

    async def ask() -> Any:  # invoke and batch, in turn
        if next(asked) % 2:
            return (await llm.abatch(["What is a circuit breaker?"]))[0]
        return await llm.ainvoke("What is a circuit breaker?")

    return lambda: llm.invoke("What is a circuit breaker?"), ask, llm.resilience_policy


@pytest.mark.parametrize("kind", ["truncated", "text"])
@pytest.mark.parametrize("make", [llama_llm, llama_embedding, langchain_embeddings, langchain_llm])
def test_async_paths_retry_a_broken_200_like_the_sync_ones(
    chaos_server: ChaosServer, clock: FakeClock, kind: str, make: Any
) -> None:
    sync_call, async_call, used = make(chaos_server.base_url, f"bad-async-{make.__name__}-{kind}")
    answers: list[Any] = []
    lock = threading.Lock()

    async def tasks() -> None:
        got = await asyncio.gather(*(async_call() for _ in range(CALLERS)))
        with lock:
            answers.extend(got)

    def thread() -> None:
        answer = sync_call()
        with lock:
            answers.append(answer)

    async def scenario() -> dict[str, Any]:  # one loop: the SDK's async client is bound to it
        # 1. the async path alone: every broken answer goes to a task
        chaos_server.set_faults(bad_body_next=BROKEN, bad_body=kind)
        await tasks()
        alone = used.stats()
        # 2. threads and tasks together, the broken answers going to either
        chaos_server.set_faults(bad_body_next=BROKEN, bad_body=kind)
        threads = [threading.Thread(target=thread) for _ in range(CALLERS)]
        for t in threads:
            t.start()
        await tasks()
        for t in threads:
            await asyncio.to_thread(t.join)
        return alone

    alone = asyncio.run(scenario())
    assert alone["retries_by_reason"] == {"malformed_response": BROKEN}
    assert (alone["live"], alone["errors"]) == (CALLERS, 0)
    assert set(alone["attempt_errors_by_class"]) <= {
        "JSONDecodeError",
        "ValueError",
        "AttributeError",
    }
    assert len(answers) == 3 * CALLERS and all(answers)
    stats = used.stats()
    # every broken answer was retried as an upstream fault; every caller served live
    assert stats["retries_by_reason"] == {"malformed_response": 2 * BROKEN}
    assert (stats["live"], stats["errors"]) == (3 * CALLERS, 0)
    assert chaos_server.wait_idle()
    assert chaos_server.stats()["requests"] == 3 * CALLERS + 2 * BROKEN == stats["attempts"]


def test_a_connection_of_a_closed_event_loop_is_not_an_upstream_failure(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    """Two ``asyncio.run`` rounds through ChatOpenAI's default (process-wide) async client:
    the second round's first attempts go out on connections of the first, closed loop and
    lose their answers. Retried as "stale_connection", at once (no backoff), and never
    counted by the breaker (one failure would open this one); attempts match what the
    server saw."""
    from langchain_openai import ChatOpenAI

    from rag_resilience.langchain import ResilientLLM

    url = chaos_server.base_url + "/"  # a cache key of its own in langchain-openai
    llm = ResilientLLM(
        ChatOpenAI(model="m", max_retries=0, base_url=url, api_key="sk-test"),
        policy=ResiliencePolicy.preset(
            "balanced", name="closed-loop", retry_budget=None, failure_threshold=1
        ),
    )

    async def crowd() -> list[Any]:
        return await asyncio.gather(*(llm.ainvoke(f"question {i}") for i in range(CALLERS)))

    first = asyncio.run(crowd())
    second = asyncio.run(crowd())  # a new loop; the pool still holds the first loop's sockets
    answers = first + second
    assert all(a.response_metadata["resilience"]["source"] == "live" for a in answers)
    stats = llm.resilience_policy.stats()
    assert set(stats["retries_by_reason"]) <= {"stale_connection"}
    assert stats["retries_by_reason"].get("stale_connection", 0) >= 1
    assert stats["breaker_state"] == "closed" and stats["errors"] == 0
    assert all(s == 0.0 for s in clock.sleeps)  # retried at once: nothing to wait out
    assert chaos_server.wait_idle()
    assert chaos_server.stats()["requests"] == stats["attempts"]
