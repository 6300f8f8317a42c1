"""Typed outputs through the LlamaIndex wrappers, with LlamaIndex's real OpenAI LLM over
real HTTP against the chaos server (tool calls and JSON answers like a model's). Waits
come from the fake clock; request counts from the idle server."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from typing import Any

import openai
import pytest

pytest.importorskip("llama_index.llms.openai")

from llama_index.core.agent.workflow import AgentStream, FunctionAgent
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.program import FunctionCallingProgram
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI
from pydantic import BaseModel, field_validator

from rag_resilience import ResiliencePolicy, UpstreamUnavailableError
from rag_resilience.adapters import NestedRetriesWarning
from rag_resilience.chaos import ChaosServer
from rag_resilience.llama_index import (
    ResilientEmbedding,
    ResilientLLM,
    ResilientQueryEngine,
    _common,
    typed,
)
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROMPT = PromptTemplate("Tell me about {q}")


class City(BaseModel):
    name: str
    population: int


class Capitalised(BaseModel):
    """The server answers the quoted lower-case name: a 200 the validator rejects."""

    name: str

    @field_validator("name")
    @classmethod
    def _capital(cls, value: str) -> str:
        if not value[:1].isupper():
            raise ValueError("name must start with a capital letter")
        return value


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


ADD = FunctionTool.from_defaults(fn=add)


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    _common.reset_warnings()
    typed.reset_warnings()
    yield
    _common.reset_warnings()
    typed.reset_warnings()


def openai_llm(server: ChaosServer, **kw: Any) -> OpenAI:
    kw.setdefault("max_retries", 0)
    return OpenAI(model="gpt-4o-mini", api_base=server.base_url, api_key="sk-test", **kw)


def policy(name: str, **overrides: Any) -> ResiliencePolicy:
    return ResiliencePolicy.preset("balanced", name=name, **overrides)


def chat_requests(server: ChaosServer) -> int:
    assert server.wait_idle()
    return int(server.stats()["endpoints"]["chat"]["requests"])


# -- a parse failure on a 200 is the model's answer ------------------------------------------
async def test_parse_failures_are_raised_not_retried_not_breaker_failures(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    bare = openai_llm(chaos_server)
    with pytest.raises(Exception) as bare_error:
        bare.structured_predict(Capitalised, PROMPT, q="'lyon'")
    bare_program = FunctionCallingProgram.from_defaults(
        output_cls=Capitalised, prompt=PROMPT, llm=bare
    )
    with pytest.raises(Exception) as bare_program_error:
        bare_program(q="'lyon'")
    chaos_server.reset()
    llm = ResilientLLM(openai_llm(chaos_server), policy("li-parse", failure_threshold=3))
    program = FunctionCallingProgram.from_defaults(output_cls=Capitalised, prompt=PROMPT, llm=llm)

    calls = [
        asyncio.to_thread(llm.structured_predict, Capitalised, PROMPT, q=f"'lyon' {i}")
        for i in range(3)
    ]
    calls += [llm.astructured_predict(Capitalised, PROMPT, q=f"'lyon' {i}") for i in range(3)]
    calls += [asyncio.to_thread(program, q="'lyon' p"), program.acall(q="'lyon' ap")]
    results = await asyncio.gather(*calls, return_exceptions=True)
    # raised as the bare model raises them (never a generic answer in their place)
    assert [type(r) for r in results] == [type(bare_error.value)] * 6 + [
        type(bare_program_error.value)
    ] * 2, results
    assert chat_requests(chaos_server) == 8  # one request each
    stats = llm.stats()
    assert stats["breaker_state"] == "closed" and stats["retries"] == 0
    assert stats["parse_failures"] == 6  # the structured_predict calls (programs parse alone)
    assert stats["degraded"] == 0


async def test_parse_retries_is_opt_in(chaos_server: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy("li-parse-retries"), parse_retries=2)
    with pytest.raises(Exception, match="capital letter"):
        llm.structured_predict(Capitalised, PROMPT, q="'lyon'")
    with pytest.raises(Exception, match="capital letter"):
        await llm.astructured_predict(Capitalised, PROMPT, q="'lyon'")
    assert chat_requests(chaos_server) == 6
    assert llm.stats()["parse_failures"] == 6
    with pytest.raises(ValueError, match="parse_retries"):
        ResilientLLM(openai_llm(chaos_server), parse_retries=-1)


# -- degradation keeps the type --------------------------------------------------------------
async def test_structured_and_tool_calls_in_an_outage_are_cached_or_a_clear_error(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy("li-outage", failure_threshold=50))
    structured = llm.as_structured_llm(City)
    known = [ChatMessage(role=MessageRole.USER, content="About 'Lyon', 513000 people")]
    live_city = llm.structured_predict(City, PROMPT, q="'Lyon' 513000")
    live_raw = structured.chat(known).raw
    live_call = llm.predict_and_call([ADD], "add 2 and 3")
    assert live_city == City(name="Lyon", population=513000) and live_raw == live_city
    chaos_server.set_faults(outage=True)
    # a known call: its cached answer, of its type
    assert llm.structured_predict(City, PROMPT, q="'Lyon' 513000") == live_city
    assert (await llm.astructured_predict(City, PROMPT, q="'Lyon' 513000")) == live_city
    assert structured.chat(known).raw == live_city
    assert str(await llm.apredict_and_call([ADD], "add 2 and 3")) == str(live_call) == "5"
    # a new call: the clear error, the 503 as its cause (not "Expected at least one tool call")
    new_calls: list[Any] = [
        lambda: llm.structured_predict(City, PROMPT, q="'Paris'"),
        lambda: structured.chat([ChatMessage(role=MessageRole.USER, content="About 'Rome'")]),
        lambda: llm.predict_and_call([ADD], "add 4 and 5"),
    ]
    for call in new_calls:
        with pytest.raises(UpstreamUnavailableError) as caught:
            call()
        assert isinstance(caught.value.__cause__, openai.APIStatusError)
        assert caught.value.attempts == 4 and caught.value.breaker_state == "closed"
    with pytest.raises(UpstreamUnavailableError, match="structured output"):
        await llm.astructured_predict(City, PROMPT, q="'Oslo'")
    with pytest.raises(UpstreamUnavailableError, match="tool call"):
        await llm.apredict_and_call([ADD], "add 6 and 7")
    # plain text still gets the generic text
    text = llm.chat([ChatMessage(role=MessageRole.USER, content="hello")])
    assert text.additional_kwargs["resilience"]["source"] == "generic_fallback"


async def test_typed_generic_fallback_gets_the_request(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    def generic(request: Any, error: BaseException) -> Any:
        if isinstance(request, dict) and request.get("output_cls") is City:
            return City(name="unknown", population=0)
        return "generic text for " + type(error).__name__

    llm = ResilientLLM(
        openai_llm(chaos_server), policy("li-generic", max_retries=0), generic_fallback=generic
    )
    chaos_server.set_faults(outage=True)
    assert llm.structured_predict(City, PROMPT, q="'Paris'") == City(name="unknown", population=0)
    assert (await llm.astructured_predict(City, PROMPT, q="'Rome'")).name == "unknown"
    answer = llm.chat([ChatMessage(role=MessageRole.USER, content="hi")])
    assert answer.message.content == "generic text for InternalServerError"


# -- agents finish, streaming and not; streams are not retried after a token ---------------
@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_with_a_tool_runs_to_completion(
    chaos_server: ChaosServer, streaming: bool
) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy(f"li-agent-{streaming}"))
    agent = FunctionAgent(tools=[add], llm=llm, streaming=streaming)
    handler = agent.run("add 2 and 3")
    deltas = [e.delta async for e in handler.stream_events() if isinstance(e, AgentStream)]
    result = await handler
    assert [(c.tool_name, c.tool_kwargs) for c in result.tool_calls] == [("add", {"a": 2, "b": 3})]
    assert "the tool returned 5" in str(result)
    assert bool(deltas) is streaming
    assert chat_requests(chaos_server) == 2  # the tool call, then the answer


async def test_a_stream_cut_after_tokens_is_not_retried(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    import llama_index.core.instrumentation as instrument
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatInProgressEvent

    class Tokens(BaseEventHandler):
        def handle(self, event: Any, **kwargs: Any) -> None:
            if isinstance(event, LLMChatInProgressEvent):
                seen.append(event.response.delta or "")

    seen: list[str] = []
    handler = Tokens()
    root = instrument.get_dispatcher()
    root.add_event_handler(handler)
    llm = ResilientLLM(openai_llm(chaos_server), policy("li-cut", failure_threshold=50))
    chaos_server.set_faults(stream_break_after=3)  # role chunk + 2 tokens, then cut
    messages = [ChatMessage(role=MessageRole.USER, content="hi")]
    deltas: list[str] = []
    try:
        with pytest.raises(Exception):  # noqa: B017 - the transport's own error, as bare
            for chunk in llm.stream_chat(messages):
                deltas.append(chunk.delta or "")
    finally:
        root.event_handlers.remove(handler)
    assert "".join(deltas) == "Answer to"
    assert "".join(seen) == "Answer to"  # the events saw each token once
    adeltas: list[str] = []
    with pytest.raises(Exception):  # noqa: B017
        async for chunk in await llm.astream_chat(messages):
            adeltas.append(chunk.delta or "")
    assert "".join(adeltas) == "Answer to"
    assert chat_requests(chaos_server) == 2  # once each: the caller had tokens


# -- a true drop-in --------------------------------------------------------------------------
def test_drop_in_attributes_knobs_and_rewrapping(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    embed = OpenAIEmbedding(
        model="text-embedding-3-small",
        dimensions=256,
        api_base=chaos_server.base_url,
        api_key="sk-test",
        max_retries=0,
    )
    wrapped_embed = ResilientEmbedding(embed, max_retries=1)
    assert wrapped_embed.dimensions == 256
    assert wrapped_embed.policy.retry.max_retries == 1
    llm = ResilientLLM(openai_llm(chaos_server, temperature=0.2), max_retries=1)
    assert (llm.model, llm.temperature) == ("gpt-4o-mini", 0.2)
    chaos_server.set_faults(outage=True)
    llm.chat([ChatMessage(role=MessageRole.USER, content="hi")])
    assert chat_requests(chaos_server) == 2  # max_retries=1 honoured
    with pytest.raises(TypeError, match=r"max_retires.*accepted"):
        ResilientLLM(openai_llm(chaos_server), max_retires=1)
    with pytest.raises(TypeError, match="failure_threshold must be an int"):
        ResilientEmbedding(embed, failure_threshold=2.5)
    with pytest.warns(typed.RewrappedWarning):
        again = ResilientLLM(llm, policy("li-rewrapped", max_retries=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", typed.RewrappedWarning)
        ResilientLLM(llm, policy("li-rewrapped-2"))
    assert again.llm is llm.llm
    chaos_server.reset()
    chaos_server.set_faults(outage=True)
    again.chat([ChatMessage(role=MessageRole.USER, content="hi")])
    assert chat_requests(chaos_server) == 1  # one policy: not 1 x 2 attempts


def test_engines_warn_once_with_numbers_when_an_inner_model_retries(
    chaos_server: ChaosServer,
) -> None:
    from llama_index.core import Document, VectorStoreIndex

    embed = OpenAIEmbedding(
        model="text-embedding-3-small", api_base=chaos_server.base_url, api_key="sk-test"
    )
    index = VectorStoreIndex.from_documents([Document(text="RAG retrieves.")], embed_model=embed)
    engine = index.as_query_engine(llm=openai_llm(chaos_server, max_retries=3))
    with pytest.warns(NestedRetriesWarning, match=r"OpenAI inside the engine.*up to 48"):
        ResilientQueryEngine(engine, policy("li-engine"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NestedRetriesWarning)
        ResilientQueryEngine(engine, policy("li-engine-2"))


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_in_an_outage_gets_the_clear_error(
    chaos_server: ChaosServer, clock: FakeClock, streaming: bool
) -> None:
    llm = ResilientLLM(openai_llm(chaos_server), policy(f"li-agent-down-{streaming}"))
    agent = FunctionAgent(tools=[add], llm=llm, streaming=streaming)
    chaos_server.set_faults(outage=True)
    with pytest.raises(UpstreamUnavailableError, match="tool call") as caught:
        await agent.run("add 2 and 3")
    assert isinstance(caught.value.__cause__, openai.APIStatusError)
