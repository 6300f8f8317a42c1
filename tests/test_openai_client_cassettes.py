"""ResilientOpenAIClient / AsyncResilientOpenAIClient replaying the recorded openai cassettes.

The cassettes (cassettes/openai_*) were recorded by `rag_resilience.chaos.record` with the
bare SDK (``openai.OpenAI(max_retries=0)``) against the chaos server, one call per recorded
outcome. Here our client sends the same requests, with sockets disabled and record mode
"none", and its retry loop must consume exactly the recorded script within ONE call:
a 5xx/429 sequence is recovered, quota and 400 are attempted once, and the outage plays
all four recorded 503s.

The balanced preset makes 1 + 3 = 4 attempts, exactly the four 503s the outage cassettes
hold, so no max_retries override is needed; its breaker threshold (5) stays above them.
`ResiliencePolicy.preset` has ``generic_fallback=False`` by default, and so has
``ResilientOpenAIClient(policy="balanced")``: by default quota and outage errors are
raised; the generic completion is served only when the policy enables it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pytest_socket import disable_socket, enable_socket

from rag_resilience import AsyncResilientOpenAIClient, ResiliencePolicy, ResilientOpenAIClient
from rag_resilience.breaker import CircuitState
from rag_resilience.chaos import cassettes
from rag_resilience.chaos.record import QUESTION, SCENARIOS, TEXTS
from rag_resilience.errors import is_handled
from rag_resilience.fallback import DEFAULT_GENERIC_ANSWER
from rag_resilience.testing import FakeClock, fake_clock

BASE = cassettes.CASSETTE_BASE_URL
MESSAGES = [{"role": "user", "content": QUESTION}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}
EMBED = {"model": "text-embedding-3-small", "input": TEXTS}
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


def policy(**kw: Any) -> ResiliencePolicy:
    """A fresh balanced policy: own breaker, cache and limit (unique name per test)."""
    return ResiliencePolicy.preset("balanced", name=f"oai-cassette-{next(_ids)}", **kw)


def client(pol: ResiliencePolicy | None = None) -> ResilientOpenAIClient:
    return ResilientOpenAIClient(api_key="sk-test", base_url=BASE, policy=pol or policy())


def aclient(pol: ResiliencePolicy | None = None) -> AsyncResilientOpenAIClient:
    return AsyncResilientOpenAIClient(api_key="sk-test", base_url=BASE, policy=pol or policy())


def recorded(name: str) -> int:
    """Interactions on disk in cassette `name` (the recorder's script says the same)."""
    data = yaml.safe_load(cassettes.cassette_path(name).read_text())
    count = len(data["interactions"])
    assert count == len(SCENARIOS[name.split("/")[1]].expected)
    return count


def live(attempts: int) -> dict[str, Any]:
    return {"source": "live", "attempts": attempts, "age_s": None, "degraded": False}


def assert_backoff(sleeps: list[float], name: str) -> None:
    """Retry-After when the server sent it, otherwise balanced's full-jitter exponential
    backoff (initial 1 s: retry n waits in [0, 2**(n-1)])."""
    assert len(sleeps) == RECOVERING[name] - 1
    if name == "429_retry_after_then_success":
        assert sleeps == [pytest.approx(RATE_LIMIT_RETRY_AFTER)]
    else:
        for n, delay in enumerate(sleeps, start=1):
            assert 0.0 <= delay <= 1.0 * 2 ** (n - 1)


def degraded(meta: dict[str, Any], source: str, attempts: int) -> None:
    assert (meta["source"], meta["attempts"], meta["degraded"]) == (source, attempts, True)


# -- chat ----------------------------------------------------------------------------------
def test_chat_success_is_one_live_attempt(clock: FakeClock) -> None:
    with cassettes.use_cassette("openai_chat/success") as cassette:
        result = client().chat.completions.create(**CHAT)
        assert cassette.all_played
    assert isinstance(result, ChatCompletion)
    assert QUESTION in (result.choices[0].message.content or "")
    assert result.resilience == live(1)  # type: ignore[attr-defined]
    assert cassette.play_count == recorded("openai_chat/success") == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("name", sorted(RECOVERING))
def test_chat_recovers_within_one_call(clock: FakeClock, name: str) -> None:
    oai = client()
    with cassettes.use_cassette(f"openai_chat/{name}") as cassette:
        result = oai.chat.completions.create(**CHAT)
        assert cassette.all_played
    assert QUESTION in (result.choices[0].message.content or "")
    assert cassette.play_count == RECOVERING[name] == recorded(f"openai_chat/{name}")
    assert result.resilience == live(RECOVERING[name])  # type: ignore[attr-defined]
    assert_backoff(clock.sleeps, name)
    stats = oai.stats()
    assert (stats["calls"], stats["attempts"], stats["retries"]) == (
        1,
        RECOVERING[name],
        RECOVERING[name] - 1,
    )


def test_chat_stream_success(clock: FakeClock) -> None:
    with cassettes.use_cassette("openai_chat/stream_success") as cassette:
        stream = client().chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert cassette.all_played
    assert len(chunks) > 2 and all(isinstance(c, ChatCompletionChunk) for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert QUESTION in text
    assert chunks[-1].usage is not None  # include_usage: the final usage chunk came through
    assert stream.resilience == live(1)
    assert cassette.play_count == 1 and clock.sleeps == []


def test_chat_quota_is_raised_by_default_after_one_attempt(clock: FakeClock) -> None:
    oai = client()
    assert oai.policy.generic_fallback is False  # the preset's default
    with (
        cassettes.use_cassette("openai_chat/429_insufficient_quota") as cassette,
        pytest.raises(openai.RateLimitError) as info,
    ):
        oai.chat.completions.create(**CHAT)
    assert info.value.code == "insufficient_quota"
    assert cassette.play_count == 1 and clock.sleeps == []
    assert is_handled(info.value)  # an outer policy will not retry it again


def test_chat_quota_is_served_generic_when_enabled(clock: FakeClock) -> None:
    """An exhausted quota is the upstream failing us: it may be masked (DESIGN.md §4)."""
    with cassettes.use_cassette("openai_chat/429_insufficient_quota") as cassette:
        result = client(policy(generic_fallback=True)).chat.completions.create(**CHAT)
    assert cassette.play_count == 1 and clock.sleeps == []
    assert isinstance(result, ChatCompletion)
    assert result.choices[0].message.content == DEFAULT_GENERIC_ANSWER
    assert result.model == "gpt-4o-mini"
    degraded(result.resilience, "generic_fallback", 1)  # type: ignore[attr-defined]
    assert "insufficient_quota" in result.resilience["error"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("generic", [False, True])
def test_chat_context_length_exceeded_raises_once_even_with_generic(
    clock: FakeClock, generic: bool
) -> None:
    oai = client(policy(generic_fallback=generic))
    with (
        cassettes.use_cassette("openai_chat/400_context_length_exceeded") as cassette,
        pytest.raises(openai.BadRequestError) as info,
    ):
        oai.chat.completions.create(**CHAT)
    assert info.value.code == "context_length_exceeded"
    assert cassette.play_count == 1 and clock.sleeps == []
    assert oai.policy.breaker is not None
    assert oai.policy.breaker.get_state() is CircuitState.CLOSED
    assert oai.stats()["breaker_transitions"] == {}


def test_chat_outage_raises_by_default_after_four_attempts(clock: FakeClock) -> None:
    oai = client()
    with (
        cassettes.use_cassette("openai_chat/outage") as cassette,
        pytest.raises(openai.InternalServerError) as info,
    ):
        oai.chat.completions.create(**CHAT)
    assert info.value.status_code == 503
    assert cassette.play_count == 4 and cassette.all_played  # 1 + 3 retries == 4 recorded 503s
    assert clock.sleeps == [pytest.approx(OUTAGE_RETRY_AFTER)] * 3  # the recorded Retry-After
    stats = oai.stats()
    assert (stats["calls"], stats["failures"], stats["attempts"], stats["retries"]) == (1, 1, 4, 3)
    assert oai.policy.breaker is not None
    assert oai.policy.breaker.get_state() is CircuitState.CLOSED  # 4 failures < threshold 5


def test_chat_outage_is_served_generic_when_enabled(clock: FakeClock) -> None:
    with cassettes.use_cassette("openai_chat/outage") as cassette:
        result = client(policy(generic_fallback=True)).chat.completions.create(**CHAT)
    assert cassette.play_count == 4 and len(clock.sleeps) == 3
    assert result.choices[0].message.content == DEFAULT_GENERIC_ANSWER
    degraded(result.resilience, "generic_fallback", 4)  # type: ignore[attr-defined]


def test_chat_outage_serves_the_last_answer_with_its_age(clock: FakeClock) -> None:
    oai = client()
    with cassettes.use_cassette("openai_chat/success"):
        fresh = oai.chat.completions.create(**CHAT)
    clock.advance(100.0)
    with cassettes.use_cassette("openai_chat/outage") as cassette:
        stale = oai.chat.completions.create(**CHAT)
    assert cassette.play_count == 4
    assert stale.choices[0].message.content == fresh.choices[0].message.content
    degraded(stale.resilience, "cache", 4)  # type: ignore[attr-defined]
    assert stale.resilience["age_s"] == pytest.approx(100.0 + 3 * OUTAGE_RETRY_AFTER)  # type: ignore[attr-defined]


def test_chat_outage_opens_the_breaker_then_no_upstream_calls_then_recovers(
    clock: FakeClock,
) -> None:
    """The outage cassette replayed as often as asked: the breaker's threshold (5 failed
    calls of 4 attempts, the presets' count="calls") ends it."""
    oai = client()
    breaker = oai.policy.breaker
    assert breaker is not None and breaker.failure_threshold == 5 * 4
    with cassettes.use_cassette("openai_chat/success"):
        oai.chat.completions.create(**CHAT)
    outage = cassettes.use_cassette("openai_chat/outage", allow_playback_repeats=True)
    with outage as cassette:
        failed = []
        for n in range(1, 5):  # 4 failed calls, 4 attempts each: still closed
            failed.append(oai.chat.completions.create(**CHAT))
            assert cassette.play_count == 4 * n and breaker.get_state() is CircuitState.CLOSED
        failed.append(oai.chat.completions.create(**CHAT))  # the 5th failed call opens it
        assert cassette.play_count == 20 and breaker.get_state() is CircuitState.OPEN
        served_open = oai.chat.completions.create(**CHAT)  # open: no upstream request at all
        assert cassette.play_count == 20
        # An unknown request while open: nothing cached, no generic answer. It waits for
        # the next probe (within its deadline) instead of failing at once, is the probe,
        # and the API is still down: the upstream's own error, the circuit reopens. The
        # probe is due 4 s after the trip, not 2 s: the failed calls spanned 30 s, and the
        # presets time open periods from when the failures began, crediting one period.
        with pytest.raises(openai.InternalServerError):
            oai.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "new"}]
            )
        assert cassette.play_count == 21 and breaker.get_state() is CircuitState.OPEN
    metas = [r.resilience for r in (*failed, served_open)]  # type: ignore[attr-defined]
    assert [(m["source"], m["attempts"]) for m in metas] == [("cache", 4)] * 5 + [("cache", 0)]
    assert clock.sleeps == [pytest.approx(OUTAGE_RETRY_AFTER)] * 15 + [pytest.approx(4.0)]
    clock.advance(breaker.retry_after())
    with cassettes.use_cassette("openai_chat/success") as cassette:
        healed = oai.chat.completions.create(**CHAT)
    assert cassette.play_count == 1 and breaker.get_state() is CircuitState.CLOSED
    assert healed.resilience == live(1)  # type: ignore[attr-defined]


def test_sdk_sends_a_stream_request_in_create_and_raises_there() -> None:
    """The reference behaviour for the test below: the bare SDK's create(stream=True)
    sends the request and raises HTTP errors before returning a Stream."""
    raw = openai.OpenAI(api_key="sk-test", base_url=BASE, max_retries=0)
    with (
        cassettes.use_cassette("openai_chat/400_context_length_exceeded") as cassette,
        pytest.raises(openai.BadRequestError),
    ):
        raw.chat.completions.create(**CHAT, stream=True)
    assert cassette.play_count == 1


def test_stream_create_raises_where_the_sdk_does(clock: FakeClock) -> None:
    oai = client()
    with cassettes.use_cassette("openai_chat/400_context_length_exceeded") as cassette:
        # Like the SDK: create() sends the request and raises the HTTP error itself.
        with pytest.raises(openai.BadRequestError):
            oai.chat.completions.create(**CHAT, stream=True)
        assert cassette.play_count == 1


def test_chat_stream_outage_is_served_generic_when_enabled(clock: FakeClock) -> None:
    # Cassettes match on method + path, so a streaming request plays the outage script too.
    with cassettes.use_cassette("openai_chat/outage") as cassette:
        stream = client(policy(generic_fallback=True)).chat.completions.create(**CHAT, stream=True)
        chunks = list(stream)
    assert cassette.play_count == 4 and len(clock.sleeps) == 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_GENERIC_ANSWER
    assert stream.resilience is not None
    degraded(stream.resilience, "generic_fallback", 4)


async def test_async_chat_recovers_and_streams(clock: FakeClock) -> None:
    oai = aclient()
    with cassettes.use_cassette("openai_chat/503x3_then_success") as cassette:
        result = await oai.chat.completions.create(**CHAT)
        assert cassette.all_played
    assert result.resilience == live(4) and cassette.play_count == 4
    assert_backoff(clock.sleeps, "503x3_then_success")
    with cassettes.use_cassette("openai_chat/stream_success") as cassette:
        stream = await oai.chat.completions.create(**CHAT, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert QUESTION in text and stream.resilience == live(1) and cassette.play_count == 1


async def test_async_chat_outage_raises_after_four_attempts(clock: FakeClock) -> None:
    with (
        cassettes.use_cassette("openai_chat/outage") as cassette,
        pytest.raises(openai.InternalServerError),
    ):
        await aclient().chat.completions.create(**CHAT)
    assert cassette.play_count == 4
    assert clock.sleeps == [pytest.approx(OUTAGE_RETRY_AFTER)] * 3


# -- embeddings ----------------------------------------------------------------------------
def test_embeddings_success_is_one_live_attempt(clock: FakeClock) -> None:
    with cassettes.use_cassette("openai_embeddings/success") as cassette:
        result = client().embeddings.create(**EMBED)
        assert cassette.all_played
    assert isinstance(result, CreateEmbeddingResponse)
    assert [len(d.embedding) for d in result.data] == [16, 16]  # recorded dimension
    assert result.resilience == live(1)  # type: ignore[attr-defined]
    assert cassette.play_count == recorded("openai_embeddings/success") == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("name", sorted(RECOVERING))
def test_embeddings_recover_within_one_call(clock: FakeClock, name: str) -> None:
    with cassettes.use_cassette(f"openai_embeddings/{name}") as cassette:
        result = client().embeddings.create(**EMBED)
        assert cassette.all_played
    assert len(result.data) == len(TEXTS)
    assert cassette.play_count == RECOVERING[name] == recorded(f"openai_embeddings/{name}")
    assert result.resilience == live(RECOVERING[name])  # type: ignore[attr-defined]
    assert_backoff(clock.sleeps, name)


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("429_insufficient_quota", openai.RateLimitError),
        ("400_context_length_exceeded", openai.BadRequestError),
    ],
)
def test_embeddings_quota_and_bad_request_raise_after_one_attempt(
    clock: FakeClock, name: str, error: type[openai.APIStatusError], generic: bool
) -> None:
    """Embeddings never get a generic answer (a text is not a vector), whatever the policy."""
    with (
        cassettes.use_cassette(f"openai_embeddings/{name}") as cassette,
        pytest.raises(error) as info,
    ):
        client(policy(generic_fallback=generic)).embeddings.create(**EMBED)
    assert info.value.code == name.split("_", 1)[1]
    assert cassette.play_count == 1 and clock.sleeps == []


@pytest.mark.parametrize("generic", [False, True])
def test_embeddings_outage_without_cache_raises_after_four_attempts(
    clock: FakeClock, generic: bool
) -> None:
    with (
        cassettes.use_cassette("openai_embeddings/outage") as cassette,
        pytest.raises(openai.InternalServerError) as info,
    ):
        client(policy(generic_fallback=generic)).embeddings.create(**EMBED)
    assert info.value.status_code == 503
    assert cassette.play_count == 4  # balanced: 1 + 3 retries == the four recorded 503s
    assert clock.sleeps == [pytest.approx(OUTAGE_RETRY_AFTER)] * 3


def test_embeddings_outage_serves_the_cached_response_with_its_age(clock: FakeClock) -> None:
    oai = client()
    with cassettes.use_cassette("openai_embeddings/success"):
        fresh = oai.embeddings.create(**EMBED)
    clock.advance(50.0)
    with cassettes.use_cassette("openai_embeddings/outage") as cassette:
        stale = oai.embeddings.create(**EMBED)
    assert cassette.play_count == 4
    assert [d.embedding for d in stale.data] == [d.embedding for d in fresh.data]
    degraded(stale.resilience, "cache", 4)  # type: ignore[attr-defined]
    assert stale.resilience["age_s"] == pytest.approx(50.0 + 3 * OUTAGE_RETRY_AFTER)  # type: ignore[attr-defined]


async def test_async_embeddings_recover(clock: FakeClock) -> None:
    with cassettes.use_cassette("openai_embeddings/429_retry_after_then_success") as cassette:
        result = await aclient().embeddings.create(**EMBED)
    assert len(result.data) == 2 and cassette.play_count == 2
    assert result.resilience == live(2)
    assert clock.sleeps == [pytest.approx(RATE_LIMIT_RETRY_AFTER)]


def test_every_openai_cassette_is_replayed_here() -> None:
    covered = {f"openai_chat/{n}" for n in SCENARIOS} | {
        f"openai_embeddings/{n}" for n in SCENARIOS if not SCENARIOS[n].stream
    }
    assert covered == {n for n in cassettes.list_cassettes() if n.startswith("openai_")}
