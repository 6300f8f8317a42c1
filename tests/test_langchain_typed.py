"""Typed outputs through the LangChain wrappers, with the real ChatOpenAI over real HTTP
against the chaos server (which answers tools with tool calls and response_format with
JSON). Waits come from the fake clock; request counts from the idle server.

Each test names the defect of issue 14 it pins down; each fails on the code before it."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, field_validator

from rag_resilience import CircuitBreaker, ResiliencePolicy, RetryStrategy, UpstreamUnavailableError
from rag_resilience.adapters import NestedRetriesWarning
from rag_resilience.chaos import ChaosServer
from rag_resilience.langchain import (
    ResilienceCallbackHandler,
    ResilientLLM,
    _common,
    dropin,
    with_resilience,
)
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class City(BaseModel):
    name: str
    population: int


class Capitalised(BaseModel):
    """A schema the model's answer fits but the app's validator rejects (a 200 that does
    not validate): the chaos server answers the quoted, lower-case name."""

    name: str

    @field_validator("name")
    @classmethod
    def _capital(cls, value: str) -> str:
        if not value[:1].isupper():
            raise ValueError("name must start with a capital letter")
        return value


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as clk:
        yield clk


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    _common.reset_warnings()
    dropin.reset_warnings()
    yield
    _common.reset_warnings()
    dropin.reset_warnings()


def chat(server: ChaosServer, **kw: Any) -> ChatOpenAI:
    """langchain-openai shares one async HTTP client per base URL across event loops; the
    tests run several loops (asyncio.run), so each model gets its own, without keep-alive."""
    kw.setdefault("max_retries", 0)
    kw.setdefault(
        "http_async_client", httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))
    )
    return ChatOpenAI(model="gpt-4o-mini", base_url=server.base_url, api_key="sk-test", **kw)


def policy(name: str, **overrides: Any) -> ResiliencePolicy:
    return ResiliencePolicy.preset("balanced", name=name, **overrides)


def chat_requests(server: ChaosServer) -> int:
    assert server.wait_idle()
    return int(server.stats()["endpoints"]["chat"]["requests"])


def crowd(call: Any, acall: Any, n: int = 6) -> list[Any]:
    """`n` threads and `n` asyncio tasks at once; each result or exception."""
    out: list[Any] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            value: Any = call(i)
        except Exception as exc:
            value = exc
        with lock:
            out.append(value)

    async def tasks() -> list[Any]:
        return await asyncio.gather(*(acall(n + i) for i in range(n)), return_exceptions=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    out.extend(asyncio.run(tasks()))
    for t in threads:
        t.join()
    return out


# -- item 1: a parse failure on a 200 is the model's answer ----------------------------------
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_parse_failure_is_not_retried_not_a_breaker_failure_and_not_masked(
    chaos_server: ChaosServer, clock: FakeClock, method: str
) -> None:
    bare = chat(chaos_server).with_structured_output(Capitalised, method=method)
    with pytest.raises(Exception) as bare_error:
        bare.invoke("Name 'lyon'")
    chaos_server.reset()

    llm = ResilientLLM(chat(chaos_server), policy=policy(f"parse-{method}", failure_threshold=3))
    structured = llm.with_structured_output(Capitalised, method=method)
    results = crowd(
        lambda i: structured.invoke(f"Name 'lyon' #{i}"),
        lambda i: structured.ainvoke(f"Name 'lyon' #{i}"),
    )
    # raised exactly as the bare pipeline raises it; never a generic answer in its place
    assert all(type(r) is type(bare_error.value) for r in results), results
    assert chat_requests(chaos_server) == 12  # one request each: not retried
    stats = llm.stats()
    assert stats["breaker_state"] == "closed"  # 12 failures, threshold 3: not breaker failures
    assert stats["parse_failures"] == 12
    assert stats["retries"] == 0 and stats["degraded"] == 0


def test_include_raw_and_json_mode_parse_failures_are_raised_as_langchain_raises_them(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(chat(chaos_server), policy=policy("parse-raw"))
    raw = llm.with_structured_output(Capitalised, method="function_calling", include_raw=True)
    out = raw.invoke("Name 'lyon'")
    assert out["parsed"] is None and out["parsing_error"] is not None  # LangChain's contract
    assert out["raw"].response_metadata["resilience"]["source"] == "live"
    # json_mode: the server's JSON has the keys the prompt names, of the wrong type here
    mode = llm.with_structured_output(City, method="json_mode")
    with pytest.raises(Exception, match="validation error") as caught:
        asyncio.run(mode.ainvoke("A JSON with 'name' and 'population' keys"))
    assert type(caught.value).__name__ == "OutputParserException"
    assert chat_requests(chaos_server) == 2
    assert llm.stats()["parse_failures"] == 1


def test_parse_retries_is_opt_in_and_counted(chaos_server: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(chat(chaos_server), policy=policy("parse-retries"), parse_retries=2)
    for method in ("json_schema", "function_calling"):
        structured = llm.with_structured_output(Capitalised, method=method)
        with pytest.raises(Exception, match="capital letter"):
            structured.invoke("Name 'lyon'")
        with pytest.raises(Exception, match="capital letter"):
            asyncio.run(structured.ainvoke("Name 'lyon'"))
    assert chat_requests(chaos_server) == 12  # 1 + 2 retries, four times
    assert llm.stats()["parse_failures"] == 12
    with pytest.raises(ValueError, match="parse_retries"):
        ResilientLLM(chat(chaos_server), parse_retries=-1)


# -- item 2: degradation keeps the type ------------------------------------------------------
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("include_raw", [False, True])
def test_structured_output_in_an_outage_is_cached_or_a_clear_error(
    chaos_server: ChaosServer, clock: FakeClock, method: str, include_raw: bool
) -> None:
    llm = ResilientLLM(chat(chaos_server), policy=policy(f"so-{method}-{include_raw}"))
    structured = llm.with_structured_output(City, method=method, include_raw=include_raw)

    def parsed(out: Any) -> Any:
        return out["parsed"] if include_raw else out

    question = "About 'Lyon', 513000 people"
    live = parsed(structured.invoke(question))
    assert live == City(name="Lyon", population=513000)
    chaos_server.set_faults(outage=True)
    assert parsed(structured.invoke(question)) == live  # the cached answer of the same call
    assert parsed(asyncio.run(structured.ainvoke(question))) == live
    if include_raw:
        assert structured.invoke(question)["raw"].response_metadata["resilience"]["source"] == (
            "cache"
        )
    for attempt in (
        lambda: structured.invoke("About 'Paris'"),
        lambda: asyncio.run(structured.ainvoke("About 'Paris'")),
    ):
        with pytest.raises(UpstreamUnavailableError) as caught:
            attempt()
        error = caught.value
        assert isinstance(error.__cause__, (openai.APIStatusError, ConnectionError))
        assert error.attempts is not None and error.breaker_state in ("closed", "open")
        assert "structured output" in str(error)


def test_typed_generic_fallback_gets_the_input_and_the_error(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    seen: list[Any] = []

    def generic(input: Any, error: BaseException) -> Any:
        seen.append((input, type(error).__name__))
        if isinstance(input, list):  # a plain chat call: the messages
            return "typed generic text"
        return City(name="unknown", population=0)

    llm = ResilientLLM(
        chat(chaos_server), policy=policy("so-generic", max_retries=0), generic_fallback=generic
    )
    chaos_server.set_faults(outage=True)
    structured = llm.with_structured_output(City)
    assert structured.invoke("About 'Paris'") == City(name="unknown", population=0)
    assert asyncio.run(structured.ainvoke("About 'Rome'")) == City(name="unknown", population=0)
    text = llm.invoke("hello")
    assert text.content == "typed generic text"
    assert text.response_metadata["resilience"]["source"] == "generic_fallback"
    assert [s[0] for s in seen[:2]] == ["About 'Paris'", "About 'Rome'"]


def test_tool_calls_in_an_outage_are_cached_or_a_clear_error(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(chat(chaos_server), policy=policy("tools-outage"))
    with_tools = llm.bind_tools([add])
    live = with_tools.invoke("add 2 and 3")
    assert live.tool_calls[0]["args"] == {"a": 2, "b": 3}
    chaos_server.set_faults(outage=True)
    cached = asyncio.run(with_tools.ainvoke("add 2 and 3"))
    assert cached.tool_calls[0]["args"] == {"a": 2, "b": 3}
    assert cached.response_metadata["resilience"]["source"] == "cache"
    with pytest.raises(UpstreamUnavailableError, match="tool call") as caught:
        with_tools.invoke("add 4 and 5")
    assert caught.value.__cause__ is not None
    # the same messages without tools are a text request: the generic text is fine there
    assert llm.invoke("add 4 and 5").response_metadata["resilience"]["degraded"] is True
    # an agent that must keep answering: a typed generic, a final text answer marked degraded
    agentic = ResilientLLM(
        chat(chaos_server),
        policy=policy("tools-generic", max_retries=0),
        generic_fallback=lambda input, error: "I cannot use my tools right now.",
    ).bind_tools([add])
    final = asyncio.run(agentic.ainvoke("add 6 and 7"))
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.content == "I cannot use my tools right now."
    assert final.response_metadata["resilience"]["source"] == "generic_fallback"


# -- item 3: streaming callbacks see each token once ----------------------------------------
class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


class ATokens(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def test_streaming_model_emits_each_token_once(chaos_server: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(chat(chaos_server, streaming=True), policy=policy("tokens-once"))
    handler = Tokens()
    answer = llm.invoke("hi", config={"callbacks": [handler]})
    assert "".join(handler.tokens) == answer.content
    ahandler = ATokens()
    aanswer = asyncio.run(llm.ainvoke("hi", config={"callbacks": [ahandler]}))
    assert "".join(ahandler.tokens) == aanswer.content


def test_tokens_of_a_cut_stream_are_not_followed_by_a_retry(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(
        chat(chaos_server, streaming=True), policy=policy("tokens-cut", failure_threshold=20)
    )
    chaos_server.set_faults(stream_break_after=3)  # role chunk + 2 tokens, then cut
    handler = Tokens()
    answer = llm.invoke("hi", config={"callbacks": [handler]})
    assert "".join(handler.tokens) == "Answer to"  # one attempt's tokens, once
    assert answer.response_metadata["resilience"]["degraded"] is True
    assert chat_requests(chaos_server) == 1  # not retried once tokens reached the handler
    ahandler = ATokens()
    asyncio.run(llm.ainvoke("hi", config={"callbacks": [ahandler]}))
    assert "".join(ahandler.tokens) == "Answer to"
    assert chat_requests(chaos_server) == 2
    # without a handler nobody saw a token: the cut stream is retried as before
    chaos_server.reset()
    chaos_server.set_faults(stream_break_after=3)
    llm.invoke("hi again")
    assert chat_requests(chaos_server) == 4


# -- item 4: a true drop-in ------------------------------------------------------------------
def test_inner_attributes_are_readable(chaos_server: ChaosServer) -> None:
    inner = chat(chaos_server, temperature=0.3)
    llm = ResilientLLM(inner)
    assert (llm.model_name, llm.model, llm.temperature) == ("gpt-4o-mini", "gpt-4o-mini", 0.3)
    assert llm._identifying_params == inner._identifying_params
    assert llm._get_ls_params()["ls_model_name"] == "gpt-4o-mini"
    with pytest.raises(AttributeError):
        _ = llm.no_such_attribute


def test_policy_knobs_are_keywords_and_unknown_ones_fail(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(chat(chaos_server), max_retries=1, failure_threshold=3, max_concurrency=4)
    assert llm.resilience_policy.retry.max_retries == 1
    assert llm.resilience_policy.breaker is not None
    assert llm.resilience_policy.breaker.failure_threshold == 3 * 2  # 3 failed calls x (1 retry + 1)
    chaos_server.set_faults(outage=True)
    llm.invoke("hi")
    assert chat_requests(chaos_server) == 2  # max_retries=1 honoured, not the preset's 3
    with pytest.raises(TypeError, match=r"max_retires.*accepted:.*max_retries"):
        ResilientLLM(chat(chaos_server), max_retires=1)
    with pytest.raises(TypeError, match="max_retries must be an int"):
        ResilientLLM(chat(chaos_server), max_retries="3")
    with pytest.raises(TypeError, match="llm must be a"):
        ResilientLLM("gpt-4o-mini")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="override a preset"):
        ResilientLLM(chat(chaos_server), policy=policy("given"), max_retries=1)
    with pytest.raises(TypeError, match="breaker must be a rag_resilience CircuitBreaker"):
        ResilienceCallbackHandler(breaker="x")  # type: ignore[arg-type]
    ResilienceCallbackHandler(breaker=CircuitBreaker(name="ok"))


def test_inner_callbacks_tags_metadata_and_cache_keep_working(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    from langchain_core.caches import InMemoryCache

    class Starts(BaseCallbackHandler):
        def __init__(self) -> None:
            self.seen: list[tuple[list[str], dict[str, Any]]] = []

        def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
            self.seen.append((kwargs.get("tags") or [], kwargs.get("metadata") or {}))

    handler = Starts()
    inner = chat(
        chaos_server, callbacks=[handler], tags=["inner-tag"], metadata={"team": "rag"}
    ).model_copy(update={"cache": InMemoryCache()})
    llm = ResilientLLM(inner, policy=policy("run-settings"))
    llm.invoke("hi")
    asyncio.run(llm.ainvoke("hi"))  # answered by the inner model's cache
    assert len(handler.seen) == 2
    assert all("inner-tag" in tags and meta.get("team") == "rag" for tags, meta in handler.seen)
    assert chat_requests(chaos_server) == 1


def test_wrapping_a_wrapper_warns_once_and_does_not_multiply_attempts(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    inner = ResilientLLM(chat(chaos_server), policy=policy("inner-wrapper"))
    with pytest.warns(dropin.RewrappedWarning):
        outer = ResilientLLM(inner, policy=policy("outer-wrapper", max_retries=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", dropin.RewrappedWarning)
        ResilientLLM(inner, policy=policy("outer-again"))  # once
    chaos_server.set_faults(outage=True)
    outer.invoke("hi")
    assert chat_requests(chaos_server) == 2  # the outer policy's 2 attempts, not 2 x 4


# -- with_resilience over chains -------------------------------------------------------------
def retrieval_chain(llm: Any) -> Any:
    """create_retrieval_chain's shape: {"input", "context", "answer"}."""
    prompt = ChatPromptTemplate.from_messages([("user", "Context: {context}\nQuestion: {input}")])
    docs = RunnableLambda(lambda x: ["doc about " + x["input"]])
    return RunnablePassthrough.assign(context=docs).assign(answer=prompt | llm | StrOutputParser())


def test_dict_chain_keeps_its_keys_in_an_outage(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = chat(chaos_server)
    named = with_resilience(retrieval_chain(llm), policy("dict-named"), answer_key="answer")
    unnamed = with_resilience(retrieval_chain(llm), policy("dict-unnamed"))
    known = {"input": "What is RAG?"}
    live = named.invoke(known)
    assert set(live) == {"input", "context", "answer"}
    unnamed.invoke(known)
    chaos_server.set_faults(outage=True)
    cached = named.invoke(known)
    assert cached["answer"] == live["answer"] and cached["resilience"]["source"] == "cache"
    new = asyncio.run(named.ainvoke({"input": "What is new?"}))
    assert new["input"] == "What is new?" and new["context"] == []
    assert isinstance(new["answer"], str) and new["resilience"]["source"] == "generic_fallback"
    assert unnamed.invoke(known)["answer"] == live["answer"]
    with pytest.raises(UpstreamUnavailableError, match="answer_key") as caught:
        unnamed.invoke({"input": "What is new?"})
    assert caught.value.__cause__ is not None
    with pytest.raises(UpstreamUnavailableError):
        asyncio.run(unnamed.ainvoke({"input": "What is new?"}))


def test_outer_cached_answer_beats_an_inner_generic_answer(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    parts = ResiliencePolicy(
        RetryStrategy(max_retries=1, initial_delay=0.01, retry_budget=None),
        CircuitBreaker(failure_threshold=50, recovery_timeout=30, name="parts"),
        name="parts-no-cache",
    )
    prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
    chain = with_resilience(
        prompt | ResilientLLM(chat(chaos_server), policy=parts) | StrOutputParser(),
        policy("outer-chain"),
    )
    live = chain.invoke({"q": "What is RAG?"})
    chaos_server.set_faults(outage=True)
    assert chain.invoke({"q": "What is RAG?"}) == live
    assert asyncio.run(chain.ainvoke({"q": "What is RAG?"})) == live
    assert "".join(chain.stream({"q": "What is RAG?"})) == live  # streamed too

    async def astreamed() -> str:
        return "".join([part async for part in chain.astream({"q": "What is RAG?"})])

    assert asyncio.run(astreamed()) == live
    other = chain.invoke({"q": "Something new"})
    assert other != live and isinstance(other, str)  # the generic text, for a new question


def test_with_resilience_warns_once_with_numbers_when_an_inner_model_retries(
    chaos_server: ChaosServer,
) -> None:
    prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
    retrying = chat(chaos_server, max_retries=2)
    with pytest.warns(NestedRetriesWarning, match=r"max_retries=2.*up to 12 per call"):
        with_resilience(prompt | retrying | StrOutputParser(), policy("nested-chain"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NestedRetriesWarning)
        with_resilience(prompt | retrying, policy("nested-chain"))
        with_resilience(prompt | chat(chaos_server), policy("quiet-chain"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        with_resilience(prompt | retrying, policy="balanced", answer_keys="x")


def test_generic_text_for_plain_text_is_unchanged(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(chat(chaos_server), policy=policy("plain-text"))
    chaos_server.set_faults(outage=True)
    answer = llm.invoke("hello there")
    assert isinstance(answer, AIMessage) and answer.response_metadata["resilience"]["degraded"]


def test_embeddings_drop_in(chaos_server: ChaosServer, clock: FakeClock) -> None:
    from langchain_openai import OpenAIEmbeddings

    from rag_resilience.langchain import ResilientEmbeddings

    inner = OpenAIEmbeddings(
        model="text-embedding-3-small",
        dimensions=64,
        base_url=chaos_server.base_url,
        api_key="sk-test",
        max_retries=0,
        check_embedding_ctx_length=False,
    )
    wrapped = ResilientEmbeddings(inner, max_retries=1)
    assert (wrapped.model, wrapped.dimensions) == ("text-embedding-3-small", 64)
    assert len(wrapped.embed_query("hello")) == 64
    chaos_server.set_faults(outage=True)
    with pytest.raises(openai.APIStatusError):
        wrapped.embed_query("never seen")
    assert chaos_server.wait_idle()
    assert chaos_server.stats()["endpoints"]["embeddings"]["requests"] == 3  # 1 + 2 attempts
    with pytest.raises(TypeError, match="accepted"):
        ResilientEmbeddings(inner, batchsize=3)
    with pytest.warns(dropin.RewrappedWarning):
        assert ResilientEmbeddings(wrapped).embeddings is inner


def test_a_crowd_in_an_outage_gets_its_type_or_the_clear_error(
    chaos_server: ChaosServer, clock: FakeClock
) -> None:
    llm = ResilientLLM(chat(chaos_server), policy=policy("so-crowd", failure_threshold=3))
    structured = llm.with_structured_output(City, method="function_calling")
    known = "About 'Lyon', 513000 people"
    live = structured.invoke(known)
    chaos_server.set_faults(outage=True)

    def question(i: int) -> str:
        return known if i % 2 == 0 else f"About 'Paris' {i}"

    results = crowd(
        lambda i: structured.invoke(question(i)), lambda i: structured.ainvoke(question(i))
    )
    assert len(results) == 12
    for result in results:  # never None, never a str where a City is expected
        assert result == live or isinstance(result, UpstreamUnavailableError), result
        if isinstance(result, UpstreamUnavailableError):
            assert result.__cause__ is not None
    assert sum(r == live for r in results) == 6
    assert llm.stats()["breaker_state"] == "open"
