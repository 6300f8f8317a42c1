"""A 200 whose body is not the API's answer (issue 18, part 2): a truncated JSON body or a
text/plain page is an upstream fault (retried, counted by the breaker, may be served from
the cache), never a caller error and never a bare `str` served as a live answer."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from rag_resilience import AsyncResilientOpenAIClient, ResiliencePolicy, ResilientOpenAIClient
from rag_resilience.chaos import ChaosServer
from rag_resilience.classify import classify_error as default_classifier
from rag_resilience.errors import MalformedResponseError
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MSG = [{"role": "user", "content": "What is a circuit breaker?"}]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as clk:
        yield clk


def policy(name: str, **kw: Any) -> ResiliencePolicy:
    return ResiliencePolicy.preset("balanced", name=name, retry_budget=None, **kw)


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_openai_clients_retry_a_broken_200_for_threads_and_tasks(
    chaos_server: ChaosServer, clock: FakeClock, kind: str
) -> None:
    shared = policy(f"bad-body-{kind}", max_retries=5)
    sync = ResilientOpenAIClient(api_key="sk-test", base_url=chaos_server.base_url, policy=shared)
    aclient = AsyncResilientOpenAIClient(
        api_key="sk-test", base_url=chaos_server.base_url, policy=shared
    )
    chaos_server.set_faults(bad_body_next=4, bad_body=kind)
    got: list[Any] = []

    def ask() -> None:
        got.append(sync.chat.completions.create(model="m", messages=MSG))

    async def tasks() -> None:
        got.extend(
            await asyncio.gather(
                *(aclient.chat.completions.create(model="m", messages=MSG) for _ in range(3))
            )
        )

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    assert len(got) == 6 and all(isinstance(r, ChatCompletion) for r in got)
    assert all(r.resilience["source"] == "live" for r in got)
    stats = shared.stats()
    assert stats["retries_by_reason"] == {"malformed_response": 4}
    assert chaos_server.wait_idle()
    assert chaos_server.stats()["requests"] == 10 == stats["attempts"]


def test_a_broken_200_counts_for_the_breaker_and_is_served_from_cache(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    client = ResilientOpenAIClient(
        api_key="sk-test",
        base_url=chaos_server.base_url,
        policy=policy("bad-body-cache", max_retries=1, failure_threshold=1),
    )
    live = client.chat.completions.create(model="m", messages=MSG)
    chaos_server.set_faults(bad_body_next=100, bad_body="text")
    served = client.chat.completions.create(model="m", messages=MSG)
    assert isinstance(served, ChatCompletion)
    assert served.resilience["source"] == "cache" and served.resilience["degraded"]
    assert "MalformedResponseError" in served.resilience["error"]
    assert served.choices[0].message.content == live.choices[0].message.content
    assert client.policy.stats()["breaker_state"] == "open"  # one failed call of two broken answers opened it


def test_without_a_cache_the_user_gets_the_sdk_error_marked_as_upstream(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    client = ResilientOpenAIClient(
        api_key="sk-test", base_url=chaos_server.base_url, policy=policy("bad-body-raw")
    )
    chaos_server.set_faults(bad_body_next=100, bad_body="truncated")
    with pytest.raises(json.JSONDecodeError):  # the SDK's own error, not replaced
        client.embeddings.create(model="m", input=["never seen"])
    stats = client.policy.stats()
    assert stats["attempts"] == 4  # retried like any upstream fault
    assert stats["retries_by_reason"] == {"malformed_response": 3}
    assert stats["errors_by_class"] == {"JSONDecodeError": 1}
    # the same exception raised by the caller's own parsing stays a programming error
    try:
        json.loads("{not json")
    except json.JSONDecodeError as own:
        assert not default_classifier(own).retryable


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_langchain_chat_model_retries_a_broken_200(
    chaos_server: ChaosServer, clock: FakeClock, kind: str
) -> None:
    from langchain_openai import ChatOpenAI

    from rag_resilience.langchain import ResilientLLM

    llm = ResilientLLM(
        ChatOpenAI(model="m", max_retries=0, base_url=chaos_server.base_url, api_key="sk-test"),
        policy=policy(f"bad-body-lc-{kind}"),
    )
    chaos_server.set_faults(bad_body_next=1, bad_body=kind)
    answer = llm.invoke("What is a circuit breaker?")
    assert answer.response_metadata["resilience"]["attempts"] == 2
    assert isinstance(answer.content, str) and "circuit breaker" in answer.content.lower()
    assert llm.resilience_policy.stats()["retries_by_reason"] == {"malformed_response": 1}


def test_malformed_response_error_is_an_upstream_fault() -> None:
    verdict = default_classifier(MalformedResponseError("200 text/plain", body="oops"))
    assert (verdict.retryable, verdict.is_failure, verdict.fallback_ok) == (True, True, True)


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_sync_framework_models_retry_a_broken_200(
    chaos_server: ChaosServer, clock: FakeClock, kind: str
) -> None:
    """LangChain's OpenAIEmbeddings and LlamaIndex's OpenAI/OpenAIEmbedding read a text
    answer as ``'str' object has no attribute ...``: an upstream fault there too."""
    from langchain_openai import OpenAIEmbeddings
    from llama_index.core.llms import ChatMessage
    from llama_index.embeddings.openai import OpenAIEmbedding
    from llama_index.llms.openai import OpenAI

    from rag_resilience.langchain import ResilientEmbeddings
    from rag_resilience.llama_index import ResilientEmbedding
    from rag_resilience.llama_index import ResilientLLM as LlamaLLM

    url = chaos_server.base_url
    lc_emb = ResilientEmbeddings(
        OpenAIEmbeddings(
            base_url=url, api_key="sk-test", max_retries=0, check_embedding_ctx_length=False
        ),
        policy=policy(f"bad-lc-emb-{kind}"),
    )
    li_llm = LlamaLLM(
        OpenAI(api_base=url, api_key="sk-test", max_retries=0), policy=policy(f"bad-li-{kind}")
    )
    li_emb = ResilientEmbedding(
        OpenAIEmbedding(api_base=url, api_key="sk-test", max_retries=0),
        policy=policy(f"bad-li-emb-{kind}"),
    )
    calls = [
        (lambda: lc_emb.embed_query("refunds"), lc_emb.policy),
        (lambda: li_llm.chat([ChatMessage(role="user", content="hi")]), li_llm.policy),
        (lambda: li_emb.get_query_embedding("refunds"), li_emb.policy),
    ]
    for call, used in calls:
        chaos_server.set_faults(bad_body_next=1, bad_body=kind)
        assert call()
        stats = used.stats()
        assert stats["retries_by_reason"] == {"malformed_response": 1}, used.name
        assert (stats["live"], stats["attempts"]) == (1, 2)
