"""ResilientLLM / ResilientEmbeddings replaying the recorded LangChain cassettes.

The cassettes (cassettes/langchain_*) were recorded by `rag_resilience.chaos.record` with
ChatOpenAI / OpenAIEmbeddings built with ``max_retries=0`` against the chaos server: every
HTTP exchange is one interaction. Here the same inner models sit inside our wrappers, with
sockets disabled and record mode "none", so the wrapper's retry loop must consume exactly
the recorded script: a 5xx/429 sequence is recovered within ONE wrapper call, quota and 400
are attempted once, and the outage plays all four recorded 503s.

The balanced preset makes 1 + 3 = 4 attempts, which is exactly what the outage cassettes
hold (four 503s), so no max_retries override is needed. Its breaker threshold (5) is above
four failures, so the circuit stays closed through one outage call.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml
from pytest_socket import disable_socket, enable_socket

pytest.importorskip("langchain_openai")
from langchain_core.exceptions import ContextOverflowError, ModelRateLimitError
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import SecretStr

from rag_resilience import ResiliencePolicy
from rag_resilience.breaker import CircuitState
from rag_resilience.chaos import cassettes
from rag_resilience.chaos.record import QUESTION, SCENARIOS, TEXTS
from rag_resilience.fallback import DEFAULT_GENERIC_ANSWER
from rag_resilience.langchain import (
    ResilienceCallbackHandler,
    ResilientEmbeddings,
    ResilientLLM,
)
from rag_resilience.testing import FakeClock, fake_clock

BASE = cassettes.CASSETTE_BASE_URL

# ChatOpenAI probes kernel TCP keepalive options on a throwaway socket when it is built;
# under pytest-socket that probe is refused and langchain-openai falls back by design
# (langchain_openai/chat_models/_client_utils.py::_filter_supported), which pytest-socket
# reports as this warning. Any real connection attempt still fails the call itself.
pytestmark = pytest.mark.filterwarnings("ignore:A test tried to use socket.socket:UserWarning")
_ids = itertools.count()

# Recovering scenarios -> upstream requests the one call makes (= interactions recorded).
RECOVERING = {
    "500_then_success": 2,
    "503x3_then_success": 4,
    "429_retry_after_then_success": 2,
}
OUTAGE_RETRY_AFTER = 2.0  # the outage cassettes' retry-after / retry-after-ms (2 / 2000)
RATE_LIMIT_RETRY_AFTER = 1.0  # the 429 cassettes' retry-after / retry-after-ms (1 / 1000)


@pytest.fixture(autouse=True)
def no_network() -> Iterator[None]:
    disable_socket(allow_unix_socket=True)  # asyncio still needs its unix socketpair
    try:
        yield
    finally:
        enable_socket()


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


def policy(**overrides: Any) -> ResiliencePolicy:
    """A fresh balanced policy: own breaker, cache and limit (unique name per test)."""
    return ResiliencePolicy.preset("balanced", name=f"lc-cassette-{next(_ids)}", **overrides)


def chat(pol: ResiliencePolicy | None = None, **kw: Any) -> ResilientLLM:
    # Built as record.py's _lc_chat built the recording client.
    inner = ChatOpenAI(
        model="gpt-4o-mini", base_url=BASE, api_key=SecretStr("sk-test"), max_retries=0, timeout=30
    )
    return ResilientLLM(inner, policy=pol or policy(), **kw)


def embeddings(pol: ResiliencePolicy | None = None) -> ResilientEmbeddings:
    # check_embedding_ctx_length=False as in record.py: tiktoken would download its encoding.
    inner = OpenAIEmbeddings(
        model="text-embedding-3-small",
        base_url=BASE,
        api_key=SecretStr("sk-test"),
        max_retries=0,
        check_embedding_ctx_length=False,
    )
    return ResilientEmbeddings(inner, policy=pol or policy())


def recorded(family: str, scenario: str) -> int:
    """Interactions on disk in the cassette (the recorder's script says the same)."""
    data = yaml.safe_load(cassettes.cassette_path(f"{family}/{scenario}").read_text())
    count = len(data["interactions"])
    assert count == len(SCENARIOS[scenario].expected)
    return count


def assert_backoff(sleeps: list[float], name: str) -> None:
    """Waits between the recorded attempts: Retry-After when the server sent it, otherwise
    balanced's full-jitter exponential backoff (initial 1 s: retry n waits in [0, 2**(n-1)])."""
    retries = RECOVERING[name] - 1
    assert len(sleeps) == retries
    if name == "429_retry_after_then_success":
        assert sleeps == [pytest.approx(RATE_LIMIT_RETRY_AFTER)]
    else:
        for n, delay in enumerate(sleeps, start=1):
            assert 0.0 <= delay <= 1.0 * 2 ** (n - 1)


def live(attempts: int) -> dict[str, Any]:
    return {"source": "live", "attempts": attempts, "age_s": None, "degraded": False}


# -- chat ---------------------------------------------------------------------------------
def test_chat_success_is_one_live_attempt(clock: FakeClock) -> None:
    with cassettes.use_cassette("langchain_chat/success") as cassette:
        message = chat().invoke(QUESTION)
        assert cassette.all_played
    assert isinstance(message, AIMessage) and QUESTION in str(message.content)
    assert message.response_metadata["resilience"] == live(1)
    assert cassette.play_count == recorded("langchain_chat", "success") == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("name", sorted(RECOVERING))
def test_chat_recovers_within_one_call(clock: FakeClock, name: str) -> None:
    llm = chat()
    with cassettes.use_cassette(f"langchain_chat/{name}") as cassette:
        message = llm.invoke(QUESTION)
        assert cassette.all_played
    assert QUESTION in str(message.content)
    assert cassette.play_count == RECOVERING[name] == recorded("langchain_chat", name)
    assert message.response_metadata["resilience"] == live(RECOVERING[name])
    assert_backoff(clock.sleeps, name)
    stats = llm.stats()
    assert (stats["calls"], stats["attempts"]) == (1, RECOVERING[name])


@pytest.mark.parametrize("name", ["500_then_success", "503x3_then_success"])
async def test_chat_ainvoke_recovers_within_one_call(clock: FakeClock, name: str) -> None:
    with cassettes.use_cassette(f"langchain_chat/{name}") as cassette:
        message = await chat().ainvoke(QUESTION)
        assert cassette.all_played
    assert QUESTION in str(message.content)
    assert message.response_metadata["resilience"] == live(RECOVERING[name])
    assert_backoff(clock.sleeps, name)


def test_chat_stream_success(clock: FakeClock) -> None:
    with cassettes.use_cassette("langchain_chat/stream_success") as cassette:
        chunks = list(chat().stream(QUESTION))
        assert cassette.all_played
    assert len(chunks) > 2 and all(isinstance(c, AIMessageChunk) for c in chunks)
    assert QUESTION in "".join(str(c.content) for c in chunks)
    # Metadata rides on the first chunk only (merging would concatenate it).
    assert chunks[0].response_metadata["resilience"] == live(1)
    assert all("resilience" not in c.response_metadata for c in chunks[1:])
    assert cassette.play_count == 1 and clock.sleeps == []


async def test_chat_astream_success(clock: FakeClock) -> None:
    with cassettes.use_cassette("langchain_chat/stream_success") as cassette:
        text = "".join([str(c.content) async for c in chat().astream(QUESTION)])
        assert cassette.all_played
    assert QUESTION in text and clock.sleeps == []


def test_chat_quota_is_served_generic_by_default_after_one_attempt(clock: FakeClock) -> None:
    """ResilientLLM's generic_fallback defaults to True, and an exhausted quota is an
    upstream failure that may be masked (DESIGN.md §4): one request, no retry, no sleep."""
    llm = chat()
    with cassettes.use_cassette("langchain_chat/429_insufficient_quota") as cassette:
        message = llm.invoke(QUESTION)
    assert cassette.play_count == 1 and clock.sleeps == []
    meta = message.response_metadata["resilience"]
    assert message.content == DEFAULT_GENERIC_ANSWER
    assert (meta["source"], meta["attempts"], meta["degraded"]) == ("generic_fallback", 1, True)
    assert meta["error"].startswith("OpenAIRateLimitError")
    assert "insufficient_quota" in meta["error"]


def test_chat_quota_without_generic_raises_after_one_attempt(clock: FakeClock) -> None:
    # langchain-openai raises OpenAIRateLimitError, whose is_retryable flag says True:
    # the body code (insufficient_quota) must win over it.
    with (
        cassettes.use_cassette("langchain_chat/429_insufficient_quota") as cassette,
        pytest.raises(openai.RateLimitError) as info,
    ):
        chat(generic_fallback=False).invoke(QUESTION)
    assert isinstance(info.value, ModelRateLimitError) and info.value.is_retryable
    assert info.value.code == "insufficient_quota"
    assert cassette.play_count == 1 and clock.sleeps == []


@pytest.mark.parametrize("generic", [True, False])
def test_chat_context_length_exceeded_raises_once_even_with_generic(
    clock: FakeClock, generic: bool
) -> None:
    llm = chat(generic_fallback=generic)
    with (
        cassettes.use_cassette("langchain_chat/400_context_length_exceeded") as cassette,
        pytest.raises(ContextOverflowError) as info,
    ):
        llm.invoke(QUESTION)
    assert isinstance(info.value, openai.BadRequestError)
    assert info.value.code == "context_length_exceeded"
    assert cassette.play_count == 1 and clock.sleeps == []
    # A bad request says nothing about upstream health: not a breaker failure.
    assert llm.resilience_policy.breaker is not None
    assert llm.resilience_policy.breaker.get_state() is CircuitState.CLOSED


def test_chat_outage_gives_the_generic_answer_after_every_recorded_attempt(
    clock: FakeClock,
) -> None:
    llm = chat()
    with cassettes.use_cassette("langchain_chat/outage") as cassette:
        message = llm.invoke(QUESTION)
        assert cassette.all_played
    assert cassette.play_count == 4  # balanced: 1 + 3 retries == the four recorded 503s
    assert clock.sleeps == [pytest.approx(OUTAGE_RETRY_AFTER)] * 3  # the recorded Retry-After
    meta = message.response_metadata["resilience"]
    assert message.content == DEFAULT_GENERIC_ANSWER
    assert (meta["source"], meta["attempts"], meta["degraded"]) == ("generic_fallback", 4, True)
    stats = llm.stats()
    assert stats["fallbacks_by_source"] == {"generic_fallback": 1}
    assert (stats["calls"], stats["attempts"], stats["retries"], stats["degraded"]) == (1, 4, 3, 1)
    assert llm.resilience_policy.breaker is not None
    assert llm.resilience_policy.breaker.get_state() is CircuitState.CLOSED  # 4 < threshold 5


def test_chat_outage_without_generic_raises_after_four_attempts(clock: FakeClock) -> None:
    with (
        cassettes.use_cassette("langchain_chat/outage") as cassette,
        pytest.raises(openai.InternalServerError) as info,
    ):
        chat(generic_fallback=False).invoke(QUESTION)
    assert info.value.status_code == 503
    assert cassette.play_count == 4 and len(clock.sleeps) == 3


def test_chat_outage_serves_the_last_answer_with_its_age(clock: FakeClock) -> None:
    llm = chat()
    with cassettes.use_cassette("langchain_chat/success"):
        fresh = llm.invoke(QUESTION)
    clock.advance(100.0)
    with cassettes.use_cassette("langchain_chat/outage") as cassette:
        stale = llm.invoke(QUESTION)
    assert cassette.play_count == 4
    meta = stale.response_metadata["resilience"]
    assert stale.content == fresh.content
    assert (meta["source"], meta["attempts"], meta["degraded"]) == ("cache", 4, True)
    assert meta["age_s"] == pytest.approx(100.0 + 3 * OUTAGE_RETRY_AFTER)


def test_chat_outage_opens_the_breaker_then_no_upstream_calls_then_recovers(
    clock: FakeClock,
) -> None:
    """Issue 5's lifecycle over the recorded 503: the outage cassette is replayed as often
    as asked (allow_playback_repeats), so the breaker's threshold, not the cassette, ends it."""
    llm = chat()
    breaker = llm.resilience_policy.breaker
    # The presets count failed calls: 5 calls x 4 attempts in a row open it.
    assert breaker is not None and breaker.failure_threshold == 5 * 4
    with cassettes.use_cassette("langchain_chat/success"):
        llm.invoke(QUESTION)
    outage = cassettes.use_cassette("langchain_chat/outage", allow_playback_repeats=True)
    with outage as cassette:
        failed = []
        for n in range(1, 5):  # 4 attempts each: 4 failures per call, still closed
            failed.append(llm.invoke(QUESTION))
            assert cassette.play_count == 4 * n and breaker.get_state() is CircuitState.CLOSED
        failed.append(llm.invoke(QUESTION))  # the 5th failed call opens it
        assert cassette.play_count == 20 and breaker.get_state() is CircuitState.OPEN
        served_open = llm.invoke(QUESTION)  # open: served without any upstream request
        assert cassette.play_count == 20
        new = llm.invoke("A question never answered before")
        assert cassette.play_count == 20
    sources = [m.response_metadata["resilience"] for m in (*failed, served_open)]
    assert [(m["source"], m["attempts"]) for m in sources] == [("cache", 4)] * 5 + [("cache", 0)]
    assert new.content == DEFAULT_GENERIC_ANSWER
    assert new.response_metadata["resilience"]["source"] == "generic_fallback"
    assert clock.sleeps == [pytest.approx(OUTAGE_RETRY_AFTER)] * 15  # none after it opened
    # After the open period one probe goes through; the recorded success closes the circuit.
    clock.advance(breaker.retry_after())
    with cassettes.use_cassette("langchain_chat/success") as cassette:
        healed = llm.invoke(QUESTION)
    assert cassette.play_count == 1 and breaker.get_state() is CircuitState.CLOSED
    assert healed.response_metadata["resilience"] == live(1)


def test_chat_stream_outage_gives_the_generic_answer(clock: FakeClock) -> None:
    # The outage cassette is matched on method + path, so a stream request plays it too.
    with cassettes.use_cassette("langchain_chat/outage") as cassette:
        chunks = list(chat().stream(QUESTION))
    assert cassette.play_count == 4 and len(clock.sleeps) == 3
    assert "".join(str(c.content) for c in chunks) == DEFAULT_GENERIC_ANSWER
    assert chunks[0].response_metadata["resilience"]["source"] == "generic_fallback"
    assert chunks[0].response_metadata["resilience"]["attempts"] == 4


# -- what a ResilienceCallbackHandler on the run sees --------------------------------------
def handler_view(handler: ResilienceCallbackHandler) -> tuple[Any, ...]:
    st = handler.stats()
    return st["calls"], st["retries"], st["degraded"], st["fallbacks_by_source"]


@pytest.mark.parametrize(
    ("name", "seen"),
    [
        ("503x3_then_success", (1, 3, 0, {})),
        ("outage", (1, 3, 1, {"generic_fallback": 1})),
        ("429_insufficient_quota", (1, 0, 1, {"generic_fallback": 1})),
    ],
)
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_handler_sees_retries_and_degraded_answers(
    clock: FakeClock, name: str, seen: tuple[Any, ...], mode: str
) -> None:
    handler = ResilienceCallbackHandler()
    llm, config = chat(), {"callbacks": [handler]}
    with cassettes.use_cassette(f"langchain_chat/{name}"):
        if mode == "invoke":
            llm.invoke(QUESTION, config=config)  # type: ignore[arg-type]
        else:
            await llm.ainvoke(QUESTION, config=config)  # type: ignore[arg-type]
    assert handler_view(handler) == seen


@pytest.mark.parametrize("mode", ["stream", "astream"])
async def test_handler_sees_a_degraded_streamed_answer(clock: FakeClock, mode: str) -> None:
    handler = ResilienceCallbackHandler()
    llm, config = chat(), {"callbacks": [handler]}
    with cassettes.use_cassette("langchain_chat/outage") as cassette:
        if mode == "stream":
            chunks = list(llm.stream(QUESTION, config=config))  # type: ignore[arg-type]
        else:
            chunks = [c async for c in llm.astream(QUESTION, config=config)]  # type: ignore[arg-type]
    # What does work: the upstream script, the chunk's metadata and the policy's stats.
    assert cassette.play_count == 4
    assert chunks[0].response_metadata["resilience"]["source"] == "generic_fallback"
    assert llm.stats()["fallbacks_by_source"] == {"generic_fallback": 1}
    # The bug: the handler on the run sees a plain call.
    assert handler_view(handler) == (1, 3, 1, {"generic_fallback": 1})


# -- embeddings ---------------------------------------------------------------------------
def test_embeddings_success_is_one_live_attempt(clock: FakeClock) -> None:
    emb = embeddings()
    with cassettes.use_cassette("langchain_embeddings/success") as cassette:
        vectors = emb.embed_documents(TEXTS)
        assert cassette.all_played
    assert len(vectors) == len(TEXTS) and all(len(v) == 16 for v in vectors)  # recorded dim
    assert vectors[0] != vectors[1]
    assert emb.last_result is not None and emb.last_result.metadata()["attempts"] == 1
    assert cassette.play_count == 1 and clock.sleeps == []


@pytest.mark.parametrize("name", sorted(RECOVERING))
def test_embeddings_recover_within_one_call(clock: FakeClock, name: str) -> None:
    emb = embeddings()
    with cassettes.use_cassette(f"langchain_embeddings/{name}") as cassette:
        vectors = emb.embed_documents(TEXTS)
        assert cassette.all_played
    assert len(vectors) == len(TEXTS) and all(len(v) == 16 for v in vectors)
    assert cassette.play_count == RECOVERING[name] == recorded("langchain_embeddings", name)
    assert emb.last_result is not None
    meta = emb.last_result.metadata()
    assert (meta["source"], meta["attempts"], meta["degraded"]) == ("live", RECOVERING[name], False)
    assert_backoff(clock.sleeps, name)


async def test_embeddings_aembed_recovers_within_one_call(clock: FakeClock) -> None:
    with cassettes.use_cassette("langchain_embeddings/503x3_then_success") as cassette:
        vectors = await embeddings().aembed_documents(TEXTS)
        assert cassette.all_played
    assert len(vectors) == len(TEXTS) and cassette.play_count == 4
    assert_backoff(clock.sleeps, "503x3_then_success")


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("429_insufficient_quota", openai.RateLimitError),
        ("400_context_length_exceeded", openai.BadRequestError),
    ],
)
def test_embeddings_quota_and_bad_request_raise_after_one_attempt(
    clock: FakeClock, name: str, error: type[Exception]
) -> None:
    """Embeddings never get a generic answer (a string is not a vector) and nothing is
    cached, so both raise; neither is retried."""
    with (
        cassettes.use_cassette(f"langchain_embeddings/{name}") as cassette,
        pytest.raises(error) as info,
    ):
        embeddings().embed_documents(TEXTS)
    assert info.value.code == name.split("_", 1)[1]  # type: ignore[attr-defined]
    assert cassette.play_count == 1 and clock.sleeps == []


def test_embeddings_outage_without_cache_raises_after_four_attempts(clock: FakeClock) -> None:
    emb = embeddings()
    with (
        cassettes.use_cassette("langchain_embeddings/outage") as cassette,
        pytest.raises(openai.InternalServerError) as info,
    ):
        emb.embed_documents(TEXTS)
    assert info.value.status_code == 503
    assert cassette.play_count == 4  # balanced: 1 + 3 retries == the four recorded 503s
    assert clock.sleeps == [pytest.approx(OUTAGE_RETRY_AFTER)] * 3
    notes = getattr(info.value, "__notes__", [])
    assert any("2 of 2 texts" in n for n in notes)  # says why nothing was served
    assert emb.stats()["attempts"] == 4


def test_embeddings_outage_serves_cached_vectors_with_their_age(clock: FakeClock) -> None:
    emb = embeddings()
    with cassettes.use_cassette("langchain_embeddings/success"):
        fresh = emb.embed_documents(TEXTS)
    clock.advance(50.0)
    with cassettes.use_cassette("langchain_embeddings/outage") as cassette:
        stale = emb.embed_documents(TEXTS)
    assert cassette.play_count == 4
    assert stale == [pytest.approx(v, rel=1e-6) for v in fresh]  # float32 in the cache
    assert emb.last_result is not None
    meta = emb.last_result.metadata()
    assert (meta["source"], meta["attempts"], meta["degraded"]) == ("cache", 4, True)
    assert meta["age_s"] == pytest.approx(50.0 + 3 * OUTAGE_RETRY_AFTER)


def test_every_langchain_cassette_is_replayed_here() -> None:
    covered = {f"langchain_chat/{n}" for n in SCENARIOS} | {
        f"langchain_embeddings/{n}" for n in SCENARIOS if not SCENARIOS[n].stream
    }
    assert covered == {n for n in cassettes.list_cassettes() if n.startswith("langchain_")}
