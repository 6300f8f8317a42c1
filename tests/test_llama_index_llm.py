"""ResilientLLM over the chaos server with LlamaIndex's real OpenAI LLM (max_retries=0)."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from typing import Any

import openai
import pytest

pytest.importorskip("llama_index.llms.openai")

import llama_index.core.instrumentation as instrument
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole, ToolCallBlock
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai import OpenAI

from rag_resilience import ResiliencePolicy
from rag_resilience.adapters import NestedRetriesWarning
from rag_resilience.chaos import ChaosServer
from rag_resilience.errors import CircuitOpenError
from rag_resilience.fallback import DEFAULT_GENERIC_ANSWER
from rag_resilience.llama_index import (
    ResilienceCallbackHandler,
    ResilienceEventHandler,
    ResilienceFallbackEvent,
    ResilienceRetryEvent,
    ResilientLLM,
)
from rag_resilience.llama_index._common import reset_warnings
from rag_resilience.llama_index.llm import CHAT_CODEC
from rag_resilience.testing import FakeClock, fake_clock

Q = [ChatMessage(role=MessageRole.USER, content="What is a circuit breaker?")]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


def openai_llm(server: ChaosServer, **kw: Any) -> OpenAI:
    kw.setdefault("model", "gpt-4o-mini")
    kw.setdefault("max_retries", 0)
    return OpenAI(api_base=server.base_url, api_key="sk-test", **kw)


def policy(**overrides: Any) -> ResiliencePolicy:
    return ResiliencePolicy.preset("balanced", name="test-llm", **overrides)


def chat_requests(server: ChaosServer) -> int:
    assert server.wait_idle()  # counters move after the answer is written: read them idle
    return int(server.stats()["endpoints"]["chat"]["requests"])


class Capture(BaseEventHandler):
    events: list[BaseEvent] = Field(default_factory=list)

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)


@pytest.fixture
def captured() -> Iterator[Capture]:
    root = instrument.get_dispatcher()
    handler = Capture(events=[])
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


def test_live_answers_metadata_and_events_match_the_bare_model(
    chaos_server: ChaosServer, clock: FakeClock, captured: Capture
) -> None:
    bare = openai_llm(chaos_server)
    wrapped = ResilientLLM(openai_llm(chaos_server), policy=policy())
    assert wrapped.metadata == bare.metadata
    assert wrapped.metadata.is_function_calling_model and wrapped.metadata.is_chat_model

    def run(llm: Any) -> tuple[list[str], list[str]]:
        captured.events.clear()
        answers = [
            llm.chat(Q).message.content,
            llm.complete("Say hi").text,
            "".join(r.delta or "" for r in llm.stream_chat(Q)),
            llm.predict(__import__("llama_index.core").core.PromptTemplate("Echo {x}"), x="y"),
        ]
        return answers, [type(e).__name__ for e in captured.events]

    bare_answers, bare_events = run(bare)
    wrapped_answers, wrapped_events = run(wrapped)
    assert wrapped_answers == bare_answers
    assert wrapped_events == bare_events
    assert "LLMChatStartEvent" in bare_events
    live = wrapped.chat(Q)
    assert "resilience" not in live.additional_kwargs
    assert set(live.additional_kwargs) == set(bare.chat(Q).additional_kwargs)


def test_5xx_is_retried_with_exact_request_count(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy=policy())
    chaos_server.set_faults(fail_next=2, fail_next_status=500)
    response = llm.chat(Q)
    assert "circuit breaker" in (response.message.content or "")
    assert "resilience" not in response.additional_kwargs
    assert chat_requests(chaos_server) == 3
    assert len(clock.sleeps) == 2
    stats = llm.stats()
    assert (
        stats["retries"] == 2
        and stats["successes"] == 1
        and stats["retry_reasons"] == {"http_500": 2}
    )


def test_retry_after_is_honoured(chaos_server: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy=policy())
    chaos_server.set_faults(fail_next=1, fail_next_status="rate_limit", retry_after=7.0)
    response = llm.chat(Q)
    assert "resilience" not in response.additional_kwargs
    assert chat_requests(chaos_server) == 2
    assert clock.sleeps == [pytest.approx(7.0)]


def test_insufficient_quota_is_tried_once(chaos_server: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy=policy(), generic_fallback=False)
    chaos_server.set_faults(fail_next=1, fail_next_status="insufficient_quota")
    with pytest.raises(openai.RateLimitError) as info:
        llm.chat(Q)
    assert info.value.code == "insufficient_quota"
    assert chat_requests(chaos_server) == 1 and clock.sleeps == []
    # With a generic answer enabled, exhausted quota is an upstream failure: degraded, once.
    llm2 = ResilientLLM(openai_llm(chaos_server), policy=policy())
    chaos_server.set_faults(fail_next=1, fail_next_status="insufficient_quota")
    response = llm2.chat(Q)
    assert response.additional_kwargs["resilience"]["source"] == "generic_fallback"
    assert chat_requests(chaos_server) == 2


@pytest.mark.parametrize("kind", ["context_length_exceeded", "invalid_api_key"])
def test_callers_own_errors_propagate_untouched(
    chaos_server: ChaosServer, clock: FakeClock, kind: str
) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy=policy())  # generic fallback on
    chaos_server.set_faults(fail_next=1, fail_next_status=kind)
    with pytest.raises(openai.APIStatusError) as info:
        llm.chat(Q)
    assert info.value.code == kind
    assert chat_requests(chaos_server) == 1
    assert llm.policy.breaker is not None and llm.policy.breaker.failure_count == 0


def test_breaker_opens_then_fails_fast_then_recovers(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy=policy(max_retries=0, failure_threshold=3))
    chaos_server.set_faults(outage=True)
    answers = [llm.chat([ChatMessage(role="user", content=f"q{i}")]) for i in range(6)]
    assert chat_requests(chaos_server) == 3  # calls 4..6 never reached the server
    assert all(a.message.content == DEFAULT_GENERIC_ANSWER for a in answers)
    assert answers[-1].additional_kwargs["resilience"]["error"].startswith("CircuitOpenError")
    assert llm.stats()["breaker_state"] == "open"
    chaos_server.set_faults(outage=False)
    clock.advance(300)  # past the recovery timeout: a probe is let through
    live = llm.chat(Q)
    assert "resilience" not in live.additional_kwargs
    assert llm.stats()["breaker_state"] == "closed"


def test_cache_with_age_generic_for_new_questions_and_recovery(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy=policy(max_retries=1))
    live = llm.chat(Q)
    clock.advance(42.0)
    chaos_server.set_faults(outage=True)
    cached = llm.chat(Q)
    meta = cached.additional_kwargs["resilience"]
    assert cached.message.content == live.message.content
    assert meta["source"] == "cache" and meta["degraded"] is True and meta["attempts"] == 2
    assert meta["age_s"] == pytest.approx(42.0 + clock.sleeps[0], abs=0.01)
    assert cached.raw["resilience"] == meta
    new = llm.chat([ChatMessage(role="user", content="never asked before")])
    assert new.message.content == DEFAULT_GENERIC_ANSWER
    assert new.additional_kwargs["resilience"]["source"] == "generic_fallback"
    completion = llm.complete("never completed")
    assert completion.text == DEFAULT_GENERIC_ANSWER
    assert completion.additional_kwargs["resilience"]["source"] == "generic_fallback"
    chaos_server.set_faults(outage=False)
    clock.advance(300)  # the breaker opened during the outage: wait out its recovery
    assert "resilience" not in llm.chat(Q).additional_kwargs


def test_fallback_llm_with_its_own_breaker(
    chaos_server: ChaosServer, chaos_server_factory: Any, clock: FakeClock
) -> None:
    down = chaos_server_factory(seed=2, outage=True)
    llm = ResilientLLM(
        openai_llm(down),
        policy=policy(max_retries=1),
        fallback_llms=[openai_llm(chaos_server, model="gpt-4o")],
    )
    response = llm.chat(Q)
    meta = response.additional_kwargs["resilience"]
    assert meta["source"] == "fallback" and meta["fallback_index"] == 0
    assert "circuit breaker" in (response.message.content or "")
    # failover="immediate" (the presets): one failed attempt, then the healthy fallback
    assert down.stats()["requests"] == 1 and chat_requests(chaos_server) == 1
    fb_policy = llm.fallback_policy(0)
    assert fb_policy.breaker is not llm.policy.breaker
    assert fb_policy.stats()["successes"] == 1
    streamed = list(llm.stream_chat(Q))
    assert streamed[-1].additional_kwargs["resilience"]["source"] == "fallback"
    assert "circuit breaker" in "".join(r.delta or "" for r in streamed)


async def test_fallback_llm_serves_every_entry_point(
    chaos_server: ChaosServer, chaos_server_factory: Any, clock: FakeClock
) -> None:
    """complete/stream_complete and the async four: each runs the fallback model's own
    method of the same name, under the fallback's policy."""
    down = chaos_server_factory(seed=3, outage=True)
    llm = ResilientLLM(
        openai_llm(down),
        policy=policy(max_retries=0),
        fallback_llms=[openai_llm(chaos_server, model="gpt-4o")],
    )

    def served_by_fallback(response: Any) -> bool:
        return bool(response.additional_kwargs["resilience"]["source"] == "fallback")

    completion = llm.complete("Say hi")
    assert served_by_fallback(completion) and completion.text
    streamed = list(llm.stream_complete("Say hi"))
    assert served_by_fallback(streamed[-1])
    assert "".join(c.delta or "" for c in streamed) == completion.text
    assert served_by_fallback(await llm.achat(Q))
    assert served_by_fallback(await llm.acomplete("Say hi"))
    achunks = [c async for c in await llm.astream_chat(Q)]
    assert served_by_fallback(achunks[-1]) and "".join(c.delta or "" for c in achunks)
    cchunks = [c async for c in await llm.astream_complete("Say hi")]
    assert served_by_fallback(cchunks[-1])
    assert "".join(c.delta or "" for c in cchunks) == completion.text
    assert llm.fallback_policy(0).stats()["successes"] == 6
    # each fallback call used the fallback model's endpoint of the same kind; the last
    # streamed request is counted once the server has finished writing it
    assert chaos_server.wait_idle()
    assert chaos_server.stats()["endpoints"]["chat"]["successes"] == 6


def test_stream_retries_only_before_the_first_delta(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy=policy())
    chaos_server.set_faults(fail_next=2)
    chunks = list(llm.stream_chat(Q))
    assert "circuit breaker" in "".join(c.delta or "" for c in chunks)
    assert chat_requests(chaos_server) == 3
    chaos_server.reset()
    chaos_server.set_faults(stream_break_after=3)
    got: list[str] = []
    with pytest.raises(Exception):  # noqa: B017 - whatever the transport raises mid-stream
        for chunk in llm.stream_chat(Q):
            got.append(chunk.delta or "")
    assert got, "some deltas arrived before the cut"
    assert chat_requests(chaos_server) == 1  # no retry after the first delta


def test_degraded_stream_is_annotated(chaos_server: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy=policy(max_retries=0))
    text = "".join(c.delta or "" for c in llm.stream_chat(Q))
    chaos_server.set_faults(outage=True)
    chunks = list(llm.stream_chat(Q))
    assert "".join(c.delta or "" for c in chunks) == text  # served from the cache, whole
    assert chunks[0].additional_kwargs["resilience"]["source"] == "cache"
    # chat() and stream_chat() share the cache: a streamed answer serves chat() too
    assert llm.chat(Q).message.content == text


async def test_async_paths(chaos_server: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy=policy())
    chaos_server.set_faults(fail_next=2)
    response = await llm.achat(Q)
    assert (
        "circuit breaker" in (response.message.content or "") and chat_requests(chaos_server) == 3
    )
    chaos_server.set_faults(fail_next=1)
    text = "".join([c.delta or "" async for c in await llm.astream_chat(Q)])
    assert text == response.message.content and chat_requests(chaos_server) == 5
    completion = await llm.acomplete("Say hi")
    chaos_server.set_faults(outage=True)
    cached = await llm.acomplete("Say hi")
    assert cached.text == completion.text
    assert cached.additional_kwargs["resilience"]["source"] == "cache"
    chunks = [c async for c in await llm.astream_complete("Say hi")]
    assert "".join(c.delta or "" for c in chunks) == completion.text


async def test_async_attempt_timeout_cancels(chaos_server: ChaosServer) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy=policy(max_retries=0, attempt_timeout=0.05))
    chaos_server.set_faults(stall=True)  # never answers in time; the reset releases it
    started = time.monotonic()
    response = await llm.achat(Q)
    assert time.monotonic() - started < 5.0  # cancelled: the stall lasts until the reset
    assert response.additional_kwargs["resilience"]["source"] == "generic_fallback"


def test_sync_timeout_is_set_on_a_copy(chaos_server: ChaosServer) -> None:
    inner = openai_llm(chaos_server, timeout=60.0)
    llm = ResilientLLM(inner, policy=policy(max_retries=0, attempt_timeout=0.2))
    assert inner.timeout == 60.0 and llm._sync_inner.timeout == pytest.approx(0.2)
    chaos_server.set_faults(stall=True)  # never answers in time; the reset releases it
    started = time.monotonic()
    response = llm.chat(Q)
    assert time.monotonic() - started < 10.0  # cut at 0.2 s, not the model's 60 s
    assert response.additional_kwargs["resilience"]["source"] == "generic_fallback"


def test_nested_retries_warn_once_with_the_worst_case(chaos_server: ChaosServer) -> None:
    reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ResilientLLM(openai_llm(chaos_server, max_retries=3), policy=policy())
        ResilientLLM(openai_llm(chaos_server, max_retries=3), policy=policy())
    nested = [w for w in caught if issubclass(w.category, NestedRetriesWarning)]
    assert len(nested) == 1
    text = str(nested[0].message)
    # balanced: 4 attempts x (3 tenacity attempts x 4 SDK requests) = 48
    assert "up to 48 requests" in text and "max_retries=0" in text


def test_tool_calling_is_forwarded(chaos_server: ChaosServer) -> None:
    inner = openai_llm(chaos_server)
    llm = ResilientLLM(inner, policy=policy())

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    tool = FunctionTool.from_defaults(fn=add)
    ours = llm._prepare_chat_with_tools([tool], user_msg="1+2?")
    theirs = inner._prepare_chat_with_tools([tool], user_msg="1+2?")
    assert ours == theirs and ours["tools"][0]["function"]["name"] == "add"
    response = ChatResponse(
        message=ChatMessage(
            role="assistant",
            blocks=[
                ToolCallBlock(
                    tool_call_id="call_1", tool_name="add", tool_kwargs='{"a": 1, "b": 2}'
                )
            ],
        )
    )
    # the tool call survives the cache codec (JSON) unchanged
    restored = CHAT_CODEC.decode(json.loads(json.dumps(CHAT_CODEC.encode(response))))
    calls = llm.get_tool_calls_from_response(restored)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("add", {"a": 1, "b": 2})]
    # chat_with_tools goes through the policy and reaches the server with the tool spec
    answer = llm.chat_with_tools([tool], user_msg="add 1 and 2")
    called = llm.get_tool_calls_from_response(answer)  # the server answers like a model
    assert [(c.tool_name, c.tool_kwargs) for c in called] == [("add", {"a": 1, "b": 2})]
    assert chat_requests(chaos_server) == 1


def test_event_handler_and_callback_handler_collect_stats(
    chaos_server: ChaosServer, clock: FakeClock, captured: Capture
) -> None:
    handler = ResilienceEventHandler(names=["test-llm"])
    root = instrument.get_dispatcher()
    root.add_event_handler(handler)
    legacy = ResilienceCallbackHandler()
    try:
        llm = ResilientLLM(openai_llm(chaos_server), policy=policy(max_retries=2))
        llm.callback_manager.add_handler(legacy)
        llm.chat(Q)
        chaos_server.set_faults(outage=True)
        llm.chat(Q)
        ours, theirs, legacy_stats = handler.stats(), llm.stats(), legacy.stats()
        for key in ("calls", "successes", "degraded", "attempts", "retries", "fallbacks_by_source"):
            assert ours[key] == theirs[key] == legacy_stats[key], key
        assert ours["fallbacks_by_source"] == {"cache": 1} and ours["retries"] == 2
        assert legacy_stats["components"]["llm"] == {"calls": 4, "errors": 3}
        kinds = [type(e) for e in captured.events]
        assert kinds.count(ResilienceRetryEvent) == 2 and kinds.count(ResilienceFallbackEvent) == 1
        fallback = next(e for e in captured.events if isinstance(e, ResilienceFallbackEvent))
        assert fallback.served_from == "cache" and fallback.error_type == "InternalServerError"
    finally:
        root.event_handlers.remove(handler)
        handler.close()


def test_callback_handler_guards_an_unwrapped_llm(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    from llama_index.core.callbacks import CallbackManager

    from rag_resilience import CircuitBreaker

    guard = ResilienceCallbackHandler(
        breaker=CircuitBreaker(failure_threshold=2, recovery_timeout=60, name="guard")
    )
    bare = openai_llm(chaos_server, callback_manager=CallbackManager([guard]))
    chaos_server.set_faults(outage=True)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            bare.chat(Q)
    with pytest.raises(CircuitOpenError):
        bare.chat(Q)
    assert chat_requests(chaos_server) == 2
    assert guard.stats()["guard_state"] == "open"
