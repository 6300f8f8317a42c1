"""Pacing of embeddings over real HTTP: LlamaIndex `ResilientEmbedding` learns the server's
limits from its responses and paces per upstream (not per policy name), and LangChain /
LlamaIndex embedding calls are charged their inputs' estimated tokens before they are
sent. Real SDK clients against the chaos server, one injected clock for both sides."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from langchain_openai import OpenAIEmbeddings

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import ChaosServer
from rag_resilience.errors import RateLimitedError
from rag_resilience.langchain import ResilientEmbeddings
from rag_resilience.ratelimit import RateLimiter
from rag_resilience.ratelimit_tokens import estimate_request_tokens
from rag_resilience.testing import FakeClock

THREADS, TASKS, EACH = 4, 4, 4
CALLERS = THREADS + TASKS

LONG = "resilience " * 30  # 330 characters: 83 tokens by chars/4, fewer by tiktoken


def run_crowd(
    sync_call: Callable[[], Any], async_call: Callable[[], Awaitable[Any]]
) -> tuple[list[Any], list[BaseException]]:
    """THREADS threads and TASKS asyncio tasks, EACH calls each."""
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def keep(call: Callable[[], Any]) -> None:
        try:
            value = call()
        except Exception as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(value)

    def worker() -> None:
        for _ in range(EACH):
            keep(sync_call)

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


def _li_embedding(server: ChaosServer, api_key: str, policy: ResiliencePolicy) -> Any:
    pytest.importorskip("llama_index.embeddings.openai")
    from llama_index.embeddings.openai import OpenAIEmbedding

    from rag_resilience.llama_index import ResilientEmbedding

    return ResilientEmbedding(
        OpenAIEmbedding(api_base=server.base_url, api_key=api_key, max_retries=0),
        policy=policy,
    )


def _lc_embeddings(server: ChaosServer, api_key: str, policy: ResiliencePolicy) -> Any:
    return ResilientEmbeddings(
        OpenAIEmbeddings(
            base_url=server.base_url,
            api_key=api_key,
            max_retries=0,
            check_embedding_ctx_length=False,
        ),
        policy=policy,
    )


def test_llama_index_embeddings_learn_the_limit_and_pace_per_upstream(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    clock = FakeClock()
    server = chaos_server_factory(clock=clock, rate_limit_rps=40.0, rate_limit_burst=5)
    policy = ResiliencePolicy.preset("balanced", clock=clock)
    emb = _li_embedding(server, "sk-li-emb", policy)
    results, errors = run_crowd(
        lambda: emb.get_text_embedding_batch(["a", "b"]),
        lambda: emb.aget_text_embedding_batch(["a", "b"]),
    )
    assert server.wait_idle()
    assert errors == [] and len(results) == CALLERS * EACH
    assert policy.stats()["degraded"] == 0
    assert server.stats()["statuses"].get(429, 0) <= CALLERS
    ((key, up),) = policy.stats()["rate_limit"]["upstreams"].items()
    # keyed by the model's upstream (base URL | model | key hash), learned from headers
    assert key.startswith(server.base_url.rstrip("/")) and "|text-embedding" in key
    assert "sk-li-emb" not in key
    assert up["requests_source"] == "headers"
    assert 0.75 * 40 <= up["requests_per_s"] <= 1.05 * 40


@pytest.mark.parametrize("framework", ["langchain", "llama_index"])
@pytest.mark.parametrize("batch", [False, True])
def test_embedding_calls_are_charged_their_inputs_tokens(
    chaos_server_factory: Callable[..., ChaosServer], framework: str, batch: bool
) -> None:
    """Told 100 tokens/s (burst 100), a call of 60-90 tokens leaves too few for a second
    one, which waits its turn (under a second) before it is sent. Charged 0 tokens (the old behaviour) it
    would not wait at all, and the server's token bucket would answer 429."""
    clock = FakeClock()
    server = chaos_server_factory(clock=clock, rate_limit_tpm=60 * 100.0)
    limiter = RateLimiter(tokens_per_minute=60 * 100.0, token_burst=100.0, clock=clock)
    policy = ResiliencePolicy.preset("balanced", clock=clock, rate_limit=limiter)
    make = _lc_embeddings if framework == "langchain" else _li_embedding
    emb = make(server, f"sk-tok-{framework}-{batch}", policy)
    texts = [LONG[:165], LONG[165:]]  # two inputs, the same tokens together
    if framework == "langchain":
        first = (lambda: emb.embed_documents(texts)) if batch else (lambda: emb.embed_query(LONG))
    else:
        first = (
            (lambda: emb.get_text_embedding_batch(texts))
            if batch
            else (lambda: emb.get_query_embedding(LONG))
        )
    first()
    assert clock.sleeps == []  # the bucket started full
    first()
    assert 50 <= estimate_request_tokens({"input": texts if batch else [LONG]}) <= 90
    assert len(clock.sleeps) == 1 and 0.0 < clock.sleeps[0] < 1.0  # charged up front
    assert server.wait_idle()
    assert server.stats()["statuses"] == {200: 2}
    stats = policy.stats()["rate_limit"]
    (up,) = stats["upstreams"].values()
    assert up["paced"] == 1 and up["throttled_429"] == 0


def _rejections(policy: ResiliencePolicy) -> list[Any]:
    seen: list[Any] = []
    policy.add_listener(
        lambda e: (
            seen.append(e) if e.kind.value == "rejected" and e.reason == "rate_limit_wait" else None
        )
    )
    return seen


def test_a_pace_out_before_a_retry_is_published(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    """The first attempt fails (503); the retry's turn at the told limit (one request per
    5 s) comes after the call's 3 s deadline: rejected at once, and published as for a
    first attempt (it was not, before)."""
    from rag_resilience.openai_client import ResilientOpenAIClient

    clock = FakeClock()
    server = chaos_server_factory(clock=clock, fail_next=1)
    limiter = RateLimiter(requests_per_second=0.2, clock=clock)
    policy = ResiliencePolicy.preset("balanced", clock=clock, rate_limit=limiter, deadline=3.0)
    seen = _rejections(policy)
    client = ResilientOpenAIClient(api_key="sk-retry-pace", base_url=server.base_url, policy=policy)
    with pytest.raises(RateLimitedError):  # nothing to serve: the typed error
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert server.wait_idle()
    assert server.stats()["requests"] == 1  # the retry was never sent
    assert len(seen) == 1 and "RateLimitedError" in repr(seen[0].error)


def test_a_pace_out_of_a_stream_is_published(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    from rag_resilience.openai_client import ResilientOpenAIClient

    clock = FakeClock()
    server = chaos_server_factory(clock=clock)
    limiter = RateLimiter(requests_per_second=0.2, clock=clock)
    policy = ResiliencePolicy.preset("balanced", clock=clock, rate_limit=limiter, deadline=3.0)
    seen = _rejections(policy)
    client = ResilientOpenAIClient(
        api_key="sk-stream-pace", base_url=server.base_url, policy=policy
    )
    msgs = [{"role": "user", "content": "hi"}]
    list(client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True))
    assert seen == []
    # the same question again: its turn is after the deadline; served from cache at once
    again = list(client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True))
    assert again and clock.sleeps == []
    assert server.wait_idle()
    assert server.stats()["requests"] == 1
    assert len(seen) == 1 and seen[0].kind.value == "rejected"


def test_a_pace_out_of_an_async_stream_is_published(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    from rag_resilience.openai_client import AsyncResilientOpenAIClient

    clock = FakeClock()
    server = chaos_server_factory(clock=clock)
    limiter = RateLimiter(requests_per_second=0.2, clock=clock)
    policy = ResiliencePolicy.preset("balanced", clock=clock, rate_limit=limiter, deadline=3.0)
    seen = _rejections(policy)
    msgs = [{"role": "user", "content": "hi"}]

    async def main() -> list[list[Any]]:
        client = AsyncResilientOpenAIClient(
            api_key="sk-astream-pace", base_url=server.base_url, policy=policy
        )
        out = []
        for _ in range(2):
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=msgs, stream=True
            )
            out.append([chunk async for chunk in stream])
        return out

    first, again = asyncio.run(main())
    assert first and again and clock.sleeps == []
    assert server.wait_idle()
    assert server.stats()["requests"] == 1
    assert len(seen) == 1


def _streaming(
    factory: Callable[..., ChaosServer], burst: float
) -> tuple[FakeClock, ChaosServer, RateLimiter, ResiliencePolicy, dict[str, Any]]:
    """A server, a limiter told 100 tokens/s with `burst`, a policy, and a streamed chat
    request charged its prompt + 200 max_tokens, all on one fake clock."""
    clock = FakeClock()
    server = factory(clock=clock)
    limiter = RateLimiter(tokens_per_minute=60 * 100.0, token_burst=burst, clock=clock)
    policy = ResiliencePolicy.preset("balanced", clock=clock, rate_limit=limiter)
    request: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 200,
        "stream": True,
    }
    return clock, server, limiter, policy, request


@pytest.mark.parametrize("use_async", [False, True])
def test_a_streams_usage_corrects_the_token_bucket(
    chaos_server_factory: Callable[..., ChaosServer], use_async: bool
) -> None:
    """A streamed answer charged its prompt + max_tokens up front is corrected with the
    `usage` of its last chunk, as a JSON answer is: the next call finds the tokens it did
    not use and goes at once. Uncorrected, it would wait for them."""
    from rag_resilience.openai_client import AsyncResilientOpenAIClient, ResilientOpenAIClient

    clock, server, _, policy, request = _streaming(chaos_server_factory, 300.0)
    request["stream_options"] = {"include_usage": True}
    if use_async:

        async def main() -> None:
            client = AsyncResilientOpenAIClient(
                api_key="sk-ausage", base_url=server.base_url, policy=policy
            )
            for _ in range(2):
                stream = await client.chat.completions.create(**request)
                assert [c async for c in stream]

        asyncio.run(main())
    else:
        client = ResilientOpenAIClient(api_key="sk-usage", base_url=server.base_url, policy=policy)
        for _ in range(2):
            assert list(client.chat.completions.create(**request))
    assert clock.sleeps == []  # 2 x ~205 charged > 300, but the first used far less
    assert server.wait_idle()
    assert server.stats()["statuses"] == {200: 2}


def test_pacers_sharing_a_limit_without_a_store_warn_once(
    chaos_server_factory: Callable[..., ChaosServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Two limiters (as two processes without Redis) pace the same key each to the full
    limit: the server answers many 429s they did not predict, and each says so once,
    suggesting a shared store. One limiter alone, as in the other tests, stays quiet."""
    import logging

    from rag_resilience.openai_client import ResilientOpenAIClient

    clock = FakeClock()
    server = chaos_server_factory(clock=clock, rate_limit_rps=20.0, rate_limit_burst=2)
    policies = [
        ResiliencePolicy.preset("balanced", clock=clock, name=f"replica{i}") for i in range(2)
    ]
    clients = [
        ResilientOpenAIClient(api_key="sk-shared-limit", base_url=server.base_url, policy=p)
        for p in policies
    ]
    msgs = [{"role": "user", "content": "hi"}]

    def worker(client: ResilientOpenAIClient) -> None:
        for _ in range(40):
            client.chat.completions.create(model="gpt-4o-mini", messages=msgs)

    with caplog.at_level(logging.WARNING, logger="rag_resilience"):
        threads = [threading.Thread(target=worker, args=(c,)) for c in clients for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert server.wait_idle()
    assert server.stats()["statuses"].get(429, 0) > 0
    warned = [r for r in caplog.records if "Share the buckets" in r.getMessage()]
    assert 1 <= len(warned) <= 2  # at most once per limiter
    assert "RedisStore" in warned[0].getMessage() and "sk-shared" not in warned[0].getMessage()


def test_a_stream_without_usage_is_corrected_from_its_text(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    """Streams without ``stream_options={"include_usage": True}`` send no usage: each is
    charged its prompt + max_tokens up front and corrected, when it ends, with its prompt
    estimate plus its streamed text counted by the same estimator. A crowd of threads and
    tasks (8 streams in flight) then never waits: uncorrected, 32 x ~205 tokens would
    overflow the 4,000-token burst and keep it waiting."""
    from rag_resilience.openai_client import AsyncResilientOpenAIClient, ResilientOpenAIClient
    from rag_resilience.ratelimit_tokens import count_text_tokens

    clock, server, limiter, policy, request = _streaming(chaos_server_factory, 4000.0)
    client = ResilientOpenAIClient(api_key="sk-text", base_url=server.base_url, policy=policy)
    aclients: list[AsyncResilientOpenAIClient] = []

    def text_of(chunks: list[Any]) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def sync_call() -> str:
        return text_of(list(client.chat.completions.create(**request)))

    async def async_call() -> str:
        if not aclients:
            aclients.append(
                AsyncResilientOpenAIClient(
                    api_key="sk-text", base_url=server.base_url, policy=policy
                )
            )
        stream = await aclients[0].chat.completions.create(**request)
        return text_of([c async for c in stream])

    texts, errors = run_crowd(sync_call, async_call)
    assert errors == [] and len(texts) == CALLERS * EACH and all(texts)
    assert clock.sleeps == []
    server.wait_idle()
    assert server.stats()["statuses"] == {200: CALLERS * EACH}
    charged = estimate_request_tokens(request)
    prompt = charged - 200
    used = sum(prompt + count_text_tokens(text) for text in texts)
    assert used < CALLERS * EACH * charged / 4
    # what the bucket holds now: its burst minus the corrected costs, exactly (the clock
    # never moved, so nothing refilled)
    up = next(iter(limiter.stats()["upstreams"].values()))
    assert up["tokens_available"] == pytest.approx(4000 - used, abs=0.01)
