"""Traces with the OpenTelemetry SDK's in-memory exporter: the real openai SDK over real HTTP
to the chaos server, spans nested under the caller's span, a crowd of threads and tasks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rag_resilience import (
    AsyncResilientOpenAIClient,
    CircuitState,
    ResiliencePolicy,
    ResilientOpenAIClient,
)
from rag_resilience.chaos import ChaosServer
from rag_resilience.otel_traces import (
    ATTEMPT_SPAN,
    genai_attributes,
    instrument,
    is_instrumented,
    uninstrument,
)
from rag_resilience.testing import FakeClock, fake_clock

MSG = [{"role": "user", "content": "What is a circuit breaker?"}]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as c:
        yield c


@pytest.fixture
def spans() -> Iterator[tuple[InMemorySpanExporter, Any]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(tracer_provider=provider)
    try:
        yield exporter, provider.get_tracer("test")
    finally:
        uninstrument()


def make(server: ChaosServer, name: str, **kw: Any) -> ResilientOpenAIClient:
    policy = ResiliencePolicy.preset("balanced", name=name, **kw)
    return ResilientOpenAIClient(api_key="sk-test", base_url=server.base_url, policy=policy)


def children(all_spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    kids = [s for s in all_spans if s.parent is not None and s.parent.span_id == _id(parent)]
    return sorted(kids, key=lambda s: s.start_time or 0)


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def calls_of(all_spans: list[ReadableSpan], policy: str) -> list[ReadableSpan]:
    return [s for s in all_spans if s.attributes.get("rag_resilience.policy") == policy]


def test_retried_call_is_a_call_span_with_one_child_per_attempt(
    chaos_server: ChaosServer, clock: FakeClock, spans: Any
) -> None:
    exporter, tracer = spans
    client = make(chaos_server, "tr-retry")
    chaos_server.set_faults(fail_next=2, fail_next_status=503)
    with tracer.start_as_current_span("user request") as parent:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    got = list(exporter.get_finished_spans())
    (call,) = calls_of(got, "tr-retry")
    assert call.parent is not None and call.parent.span_id == parent.get_span_context().span_id
    assert call.name == "chat gpt-4o-mini"
    attrs = call.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["rag_resilience.outcome"] == "success"
    assert attrs["rag_resilience.source"] == "live"
    assert attrs["rag_resilience.attempts"] == 3
    assert attrs["rag_resilience.degraded"] is False
    attempts = children(got, call)
    assert [a.name for a in attempts] == [ATTEMPT_SPAN] * 3
    assert [a.attributes["rag_resilience.attempt"] for a in attempts] == [1, 2, 3]
    assert [a.attributes.get("http.request.resend_count") for a in attempts] == [None, 1, 2]
    assert [a.attributes["rag_resilience.outcome"] for a in attempts] == [
        "retry",
        "retry",
        "success",
    ]
    for failed, slept in zip(attempts[:2], clock.sleeps, strict=True):
        assert failed.attributes["rag_resilience.retry.reason"] == "http_503"
        assert failed.attributes["rag_resilience.retry.delay_s"] == slept
        assert failed.attributes["error.type"] == "InternalServerError"
        assert failed.status.status_code is trace.StatusCode.ERROR
        assert failed.attributes["rag_resilience.breaker.state"] == "closed"
    assert attempts[2].status.status_code is trace.StatusCode.UNSET


def test_open_circuit_and_cached_answer(
    chaos_server: ChaosServer, clock: FakeClock, spans: Any
) -> None:
    exporter, _ = spans
    client = make(chaos_server, "tr-open", generic_fallback=True)
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # remembered
    chaos_server.set_faults(outage=True)
    clock.advance(30)
    for _ in range(5):  # 5 failed calls (x 4 attempts) open the circuit
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert client.policy.breaker.get_state() is CircuitState.OPEN
    exporter.clear()
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    got = list(exporter.get_finished_spans())
    (call,) = calls_of(got, "tr-open")
    attrs = call.attributes
    assert attrs["rag_resilience.outcome"] == "fallback"
    assert attrs["rag_resilience.source"] == "cache"
    assert attrs["rag_resilience.degraded"] is True
    assert attrs["rag_resilience.cache.age_s"] >= 30
    assert attrs["rag_resilience.rejected.reason"] == "circuit_open"
    assert attrs["rag_resilience.breaker.state"] == "open"
    assert attrs["rag_resilience.attempts"] == 0
    assert attrs["rag_resilience.error.type"] == "CircuitOpenError"
    (attempt,) = children(got, call)  # admitted to the breaker, refused: no upstream call
    assert attempt.attributes["rag_resilience.outcome"] == "rejected"
    assert attempt.attributes["rag_resilience.rejected.reason"] == "circuit_open"


def test_the_call_that_opens_the_circuit_records_the_transition(
    chaos_server: ChaosServer, clock: FakeClock, spans: Any
) -> None:
    exporter, _ = spans
    # One failed call of two attempts opens it (the presets count failed calls).
    client = make(
        chaos_server, "tr-trip", generic_fallback=True, failure_threshold=1, max_retries=1
    )
    chaos_server.set_faults(outage=True)
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    got = list(exporter.get_finished_spans())
    (call,) = calls_of(got, "tr-trip")
    assert call.attributes["rag_resilience.source"] == "generic_fallback"
    assert call.attributes["rag_resilience.degraded.reason"] == "http_503"
    assert call.attributes["rag_resilience.breaker.state"] == "open"
    attempts = children(got, call)
    assert [a.attributes["rag_resilience.outcome"] for a in attempts] == ["retry", "failure"]
    (change,) = [e for a in attempts for e in a.events if "state_change" in e.name]
    assert dict(change.attributes or {}) == {"from": "closed", "to": "open"}


def test_a_caller_error_fails_the_call_span(
    chaos_server: ChaosServer, clock: FakeClock, spans: Any
) -> None:
    exporter, _ = spans
    client = make(chaos_server, "tr-400", generic_fallback=True)
    chaos_server.set_faults(fail_next=1, fail_next_status=400)
    with pytest.raises(Exception) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    (call,) = calls_of(list(exporter.get_finished_spans()), "tr-400")
    assert call.attributes["rag_resilience.outcome"] == "failure"
    assert call.attributes["error.type"] == type(raised.value).__qualname__
    assert call.status.status_code is trace.StatusCode.ERROR


def test_crowd_of_threads_and_tasks_gets_one_tree_per_call(
    chaos_server: ChaosServer, clock: FakeClock, spans: Any
) -> None:
    """Many callers at once (threads and asyncio tasks): every call span has exactly its own
    attempts as children, each under its caller's own parent span."""
    exporter, tracer = spans
    sync_client = make(chaos_server, "tr-crowd", generic_fallback=True, failure_threshold=1000)
    async_client = AsyncResilientOpenAIClient(
        api_key="sk-test", base_url=chaos_server.base_url, policy=sync_client.policy
    )
    chaos_server.set_faults(error_rate=0.3, status=503)
    parents: dict[int, int] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        with tracer.start_as_current_span(f"caller {i}") as parent:
            sync_client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            with lock:
                parents[parent.get_span_context().span_id] = i

    async def aone(i: int) -> None:
        with tracer.start_as_current_span(f"caller {i}") as parent:
            await async_client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            with lock:
                parents[parent.get_span_context().span_id] = i

    async def tasks() -> None:
        await asyncio.gather(*(aone(100 + i) for i in range(16)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    assert chaos_server.wait_idle()
    got = list(exporter.get_finished_spans())
    calls = calls_of(got, "tr-crowd")
    assert len(calls) == 32
    assert sorted(c.parent.span_id for c in calls if c.parent) == sorted(parents)
    attempt_spans = [s for s in got if s.name == ATTEMPT_SPAN]
    total = 0
    for call in calls:
        attempts = children(got, call)
        assert [a.attributes["rag_resilience.attempt"] for a in attempts] == list(
            range(1, len(attempts) + 1)
        )
        assert len(attempts) == call.attributes["rag_resilience.attempts"]
        total += len(attempts)
    assert total == len(attempt_spans)  # no attempt span outside its call
    assert total == int(chaos_server.stats()["requests"])


async def test_cancelled_call_ends_its_spans_and_restores_the_context(
    chaos_server: ChaosServer, spans: Any
) -> None:
    exporter, tracer = spans
    policy = ResiliencePolicy.preset("balanced", name="tr-cancel")
    started = asyncio.Event()

    async def hang() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    with tracer.start_as_current_span("outer") as outer:
        task = asyncio.ensure_future(policy.acall(hang))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert trace.get_current_span() is outer
    (call,) = calls_of(list(exporter.get_finished_spans()), "tr-cancel")
    assert call.attributes["rag_resilience.outcome"] == "cancelled"
    assert call.attributes["error.type"] == "CancelledError"
    (attempt,) = children(list(exporter.get_finished_spans()), call)
    assert attempt.attributes["rag_resilience.outcome"] == "cancelled"


def test_stream_spans_are_current_only_inside_the_policy(spans: Any) -> None:
    exporter, tracer = spans
    policy = ResiliencePolicy.preset("balanced", name="tr-stream")
    seen: list[Any] = []

    def produce() -> Iterator[str]:
        seen.append(trace.get_current_span())
        yield "a"
        seen.append(trace.get_current_span())
        yield "b"
        yield "c"

    with tracer.start_as_current_span("outer") as outer:
        stream = policy.stream(produce)
        assert next(stream) == "a"
        assert trace.get_current_span() is outer  # the consumer holds the item: not ours
        assert next(stream) == "b"
        stream.close()  # closed early
        assert trace.get_current_span() is outer
    got = list(exporter.get_finished_spans())
    (call,) = calls_of(got, "tr-stream")
    (attempt,) = children(got, call)
    assert [s.get_span_context().span_id for s in seen] == [_id(attempt)] * 2
    assert call.attributes["rag_resilience.outcome"] == "closed"
    assert call.status.status_code is trace.StatusCode.UNSET


def test_unknown_event_kinds_become_span_events_and_waits(spans: Any) -> None:
    """A kind added later (e.g. pacing) shows up on the span without code here knowing it."""
    exporter, _ = spans
    policy = ResiliencePolicy.preset("balanced", name="tr-kinds")

    class Paced:
        value = "paced"

    def fn() -> str:
        policy.events.publish(Paced(), "tr-kinds", delay=0.25, reason="tokens")  # type: ignore[arg-type]
        return "ok"

    assert policy.call(fn) == "ok"
    (call,) = calls_of(list(exporter.get_finished_spans()), "tr-kinds")
    assert call.attributes["rag_resilience.paced.wait_s"] == 0.25
    (attempt,) = children(list(exporter.get_finished_spans()), call)
    (event,) = attempt.events
    assert event.name == "rag_resilience.paced" and event.attributes["reason"] == "tokens"


def test_uninstrument_restores_the_policy() -> None:
    original = ResiliencePolicy.execute
    instrument()
    assert is_instrumented() and ResiliencePolicy.execute is not original
    instrument()  # idempotent
    uninstrument()
    assert not is_instrumented() and ResiliencePolicy.execute is original


def test_genai_attributes_of_plain_functions_are_empty() -> None:
    def fn() -> None:
        return None

    assert genai_attributes(fn) == {}
    assert genai_attributes(fn, {"model": "m"}) == {"gen_ai.request.model": "m"}


def test_langchain_and_llama_index_models_name_their_spans(
    chaos_server: ChaosServer, clock: FakeClock, spans: Any
) -> None:
    """The real LangChain and LlamaIndex OpenAI classes: the call span says what it is, and
    sits under the caller's span (a chain's, an instrumentation's)."""
    from langchain_openai import ChatOpenAI
    from llama_index.llms.openai import OpenAI

    from rag_resilience.langchain import ResilientLLM as LangChainLLM
    from rag_resilience.llama_index import ResilientLLM as LlamaLLM

    exporter, tracer = spans
    lc = LangChainLLM(
        ChatOpenAI(
            model="gpt-4o-mini", max_retries=0, base_url=chaos_server.base_url, api_key="sk-test"
        ),
        policy=ResiliencePolicy.preset("balanced", name="tr-lc"),
    )
    li = LlamaLLM(
        OpenAI(model="gpt-4o-mini", max_retries=0, api_base=chaos_server.base_url, api_key="sk"),
        policy=ResiliencePolicy.preset("balanced", name="tr-li"),
    )
    chaos_server.set_faults(fail_next=1, fail_next_status=500)
    with tracer.start_as_current_span("chain") as parent:
        lc.invoke("hello")
        li.complete("hello")
    got = list(exporter.get_finished_spans())
    for policy, op, attempts in (("tr-lc", "chat", 2), ("tr-li", "text_completion", 1)):
        (call,) = calls_of(got, policy)
        assert call.name == f"{op} gpt-4o-mini"
        assert call.attributes["gen_ai.provider.name"] == "openai"
        assert call.parent is not None
        assert call.parent.span_id == parent.get_span_context().span_id
        assert len(children(got, call)) == attempts


async def test_async_stream_retried_before_its_first_item(
    chaos_server: ChaosServer, clock: FakeClock, spans: Any
) -> None:
    """The real async SDK streaming over SSE: a 503 before the first chunk is an attempt
    span of its own; the live attempt's span lasts until the stream ends."""
    exporter, tracer = spans
    client = AsyncResilientOpenAIClient(
        api_key="sk-test",
        base_url=chaos_server.base_url,
        policy=ResiliencePolicy.preset("balanced", name="tr-astream"),
    )
    chaos_server.set_faults(fail_next=1, fail_next_status=503)
    with tracer.start_as_current_span("outer") as outer:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MSG, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert trace.get_current_span() is outer
    assert chunks
    got = list(exporter.get_finished_spans())
    (call,) = calls_of(got, "tr-astream")
    assert call.attributes["rag_resilience.outcome"] == "success"
    assert call.attributes["rag_resilience.attempts"] == 2
    attempts = children(got, call)
    assert [a.attributes["rag_resilience.outcome"] for a in attempts] == ["retry", "success"]


def test_a_policy_inside_another_nests_under_its_attempt(spans: Any) -> None:
    """`with_resilience` around a chain of wrapped models: the inner call's span is a child
    of the outer call's attempt, and the events of each go to their own spans."""
    exporter, _ = spans
    outer = ResiliencePolicy.preset("balanced", name="tr-outer")
    inner = ResiliencePolicy.preset("balanced", name="tr-inner", max_retries=1)
    state = {"n": 0}

    class APIError(Exception):
        status_code = 503

    def flaky() -> str:
        state["n"] += 1
        if state["n"] == 1:
            raise APIError("503")
        return "ok"

    with fake_clock():
        assert outer.call(lambda: inner.call(flaky)) == "ok"
    got = list(exporter.get_finished_spans())
    (outer_call,) = calls_of(got, "tr-outer")
    (inner_call,) = calls_of(got, "tr-inner")
    (outer_attempt,) = children(got, outer_call)
    assert inner_call.parent is not None and inner_call.parent.span_id == _id(outer_attempt)
    assert outer_call.attributes["rag_resilience.attempts"] == 1
    assert inner_call.attributes["rag_resilience.attempts"] == 2
    assert len(children(got, inner_call)) == 2


def test_a_fallback_runs_under_the_call_not_under_the_failed_attempt(spans: Any) -> None:
    """A fallback model under its own policy: its span is the primary call's child, beside
    the attempts, not inside the attempt that failed."""
    exporter, _ = spans
    backup = ResiliencePolicy.preset("balanced", name="tr-backup")

    class APIError(Exception):
        status_code = 503

    def down() -> str:
        raise APIError("503")

    primary = ResiliencePolicy.preset(
        "balanced", name="tr-primary", max_retries=1, failover="after_retries"
    )  # the presets fail over at once (failover="immediate"): here, after one retry
    primary.fallback_fns = [lambda: backup.call(lambda: "from the backup")]
    with fake_clock():
        assert primary.call(down) == "from the backup"
    got = list(exporter.get_finished_spans())
    (call,) = calls_of(got, "tr-primary")
    (fallback,) = calls_of(got, "tr-backup")
    assert fallback.parent is not None and fallback.parent.span_id == _id(call)
    attempts = [s for s in children(got, call) if s.name == ATTEMPT_SPAN]
    assert [a.attributes["rag_resilience.outcome"] for a in attempts] == ["retry", "failure"]
    assert call.attributes["rag_resilience.source"] == "fallback"


def test_http_client_spans_nest_under_the_attempt_that_sent_them(
    chaos_server: ChaosServer, clock: FakeClock, spans: Any
) -> None:
    """OpenTelemetry's own httpx instrumentation under the openai SDK: each attempt's span has
    exactly the HTTP request it sent as its child (503, then 200)."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    exporter, _ = spans
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        client = make(chaos_server, "tr-httpx")  # built after instrumenting: traced transport
        chaos_server.set_faults(fail_next=1, fail_next_status=503)
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    finally:
        instrumentor.uninstrument()
    got = list(exporter.get_finished_spans())
    (call,) = calls_of(got, "tr-httpx")
    statuses = []
    for attempt in children(got, call):
        (http,) = children(got, attempt)
        assert http.name.startswith("POST")
        statuses.append(
            http.attributes.get(
                "http.response.status_code", http.attributes.get("http.status_code")
            )
        )
    assert statuses == [503, 200]


def test_embeddings_calls_are_named_by_the_genai_conventions(
    chaos_server: ChaosServer, clock: FakeClock, spans: Any
) -> None:
    exporter, _ = spans
    client = make(chaos_server, "tr-embed")
    client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    (call,) = calls_of(list(exporter.get_finished_spans()), "tr-embed")
    assert call.name == "embeddings text-embedding-3-small"
    assert call.attributes["gen_ai.operation.name"] == "embeddings"
    assert call.attributes["gen_ai.provider.name"] == "openai"
