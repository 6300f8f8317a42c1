"""Pacing over real HTTP: the openai SDK (through ResilientOpenAIClient) against the chaos
server's per-key request and token buckets, a crowd of threads and asyncio tasks, one
injected clock shared by client and server (nobody really waits)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Any

import openai
import pytest

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import ChaosServer
from rag_resilience.errors import RateLimitedError
from rag_resilience.openai_client import AsyncResilientOpenAIClient, ResilientOpenAIClient
from rag_resilience.testing import FakeClock

MSG = [{"role": "user", "content": "What is a circuit breaker?"}]
THREADS, TASKS, EACH = 6, 6, 5
CALLERS = THREADS + TASKS
# Paced crowds stay within a few 429s per caller (mostly before the first answers taught
# the limit); the same crowd unpaced gets 5-7 per caller.
PACED_429S = 3 * CALLERS


class CrowdClock(FakeClock):
    """A fake clock on which a crowd's sleeps overlap, as they do in real time.

    `FakeClock.sleep` advances time by the whole wait at once, so the waits of N callers
    add up; callers woken meanwhile then send together, at one instant. Six asyncio tasks
    each sleeping one slot apart reached the server's bucket of 5 in one instant, the
    sixth got 429, and the same task (the one woken last) could lose four times in a row
    and be served degraded (issue 16's flake: 2 runs in ~52 under CPU load). Here a
    sleeper waits for its wake time, and time moves to the earliest pending wake only
    when every one of the `participants` is asleep or gone (`leave`): a request is sent,
    and counted by the server, at the instant its caller woke."""

    def __init__(self, participants: int) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._active = participants
        self._wakes: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def _enqueue(self, seconds: float, wake: Callable[[], None]) -> None:
        with self._cond:
            self.sleeps.append(seconds)
            at = self.monotonic() + max(0.0, seconds)
            heapq.heappush(self._wakes, (at, next(self._order), wake))
            self._advance()

    def _advance(self) -> None:
        """Under `_cond`: when everyone sleeps, move to the earliest wake and wake all
        sleepers due then."""
        if not self._wakes or len(self._wakes) < self._active:
            return
        at = self._wakes[0][0]
        self.advance(max(0.0, at - self.monotonic()))
        while self._wakes and self._wakes[0][0] <= at:
            heapq.heappop(self._wakes)[2]()

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._advance()

    def sleep(self, seconds: float) -> None:
        woken = threading.Event()
        self._enqueue(seconds, woken.set)
        woken.wait()

    async def asleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: woken.done() or woken.set_result(None))

        self._enqueue(seconds, wake)
        await woken


def crowd(
    server: ChaosServer,
    clock: FakeClock,
    *,
    preset_kwargs: dict[str, Any] | None = None,
    api_key: str = "sk-crowd",
    messages: list[dict[str, str]] = MSG,
) -> tuple[list[dict[str, Any]], list[BaseException], dict[str, Any]]:
    """THREADS threads and TASKS asyncio tasks, EACH chat calls each, through one policy."""
    policy = ResiliencePolicy.preset("balanced", clock=clock, **(preset_kwargs or {}))
    sync = ResilientOpenAIClient(api_key=api_key, base_url=server.base_url, policy=policy)
    metas: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def record(result: Any) -> None:
        with lock:
            metas.append(result.resilience)

    leave = clock.leave if isinstance(clock, CrowdClock) else lambda: None

    def worker() -> None:
        try:
            for _ in range(EACH):
                try:
                    record(sync.chat.completions.create(model="gpt-4o-mini", messages=messages))
                except Exception as exc:
                    with lock:
                        errors.append(exc)
        finally:
            leave()

    async def tasks() -> None:
        aclient = AsyncResilientOpenAIClient(
            api_key=api_key, base_url=server.base_url, policy=policy
        )

        async def one() -> None:
            try:
                for _ in range(EACH):
                    try:
                        record(
                            await aclient.chat.completions.create(
                                model="gpt-4o-mini", messages=messages
                            )
                        )
                    except Exception as exc:
                        with lock:
                            errors.append(exc)
            finally:
                leave()

        await asyncio.gather(*(one() for _ in range(TASKS)))

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    threads.append(threading.Thread(target=asyncio.run, args=(tasks(),)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.wait_idle()
    return metas, errors, policy.stats()


def limited_server(factory: Callable[..., ChaosServer], clock: FakeClock, **kw: Any) -> ChaosServer:
    settings: dict[str, Any] = {"rate_limit_rps": 40.0, "rate_limit_burst": 5, **kw}
    return factory(clock=clock, **settings)


def test_a_crowd_over_the_limit_is_answered_live_by_pacing(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    clock = CrowdClock(CALLERS)
    server = limited_server(chaos_server_factory, clock)
    metas, errors, stats = crowd(server, clock)
    total = (THREADS + TASKS) * EACH
    assert errors == []
    assert len(metas) == total and not any(m["degraded"] for m in metas)
    served = server.stats()
    assert served["successes"] == total
    # 429s mostly before the first answers taught the pacer the limit; after that every
    # call waited its turn instead
    assert served["statuses"].get(429, 0) <= PACED_429S
    rate = stats["rate_limit"]
    up = next(iter(rate["upstreams"].values()))
    assert up["requests_source"] == "headers"
    # the middle of the bounds the answers prove, times `safety`: close to the limit; a
    # small overshoot is absorbed by the sync with the server's remaining count
    assert 0.75 * 40 <= up["requests_per_s"] <= 1.05 * 40
    assert rate["paced"] > 0 and rate["throttled_429"] == served["statuses"].get(429, 0)
    assert "sk-crowd" not in repr(rate)


def test_without_pacing_the_same_crowd_is_degraded(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    """The behaviour before pacing (rate_limit=False): retries after the same Retry-After
    collide, calls run out of attempts and are served degraded or fail."""
    clock = CrowdClock(CALLERS)
    server = limited_server(chaos_server_factory, clock)
    crowd(server, clock, preset_kwargs={"rate_limit": False})
    assert server.stats()["statuses"].get(429, 0) > PACED_429S


@pytest.mark.parametrize("headers", ["openai", "anthropic"])
def test_token_limit_paces_long_prompts(
    chaos_server_factory: Callable[..., ChaosServer], headers: str
) -> None:
    """Requests cost ~260 tokens each: an absolute (Anthropic) token reset moves by a
    request's cost, not by one, between two requests (read as one it paced at ~12 tokens/s)."""
    clock = CrowdClock(CALLERS)
    long = [{"role": "user", "content": "tell me about rate limits " * 40}]  # ~260 tokens
    server = chaos_server_factory(
        clock=clock,
        rate_limit_tpm=60 * 3000.0,
        rate_limit_token_burst=3000,
        rate_limit_headers=headers,
    )  # ~10 such requests per second; requests unlimited
    metas, errors, stats = crowd(server, clock, messages=long)
    assert errors == [] and not any(m["degraded"] for m in metas)
    assert server.stats()["statuses"].get(429, 0) <= PACED_429S
    up = next(iter(stats["rate_limit"]["upstreams"].values()))
    assert up["tokens_source"] == "headers"
    assert 0.75 * 3000 <= up["tokens_per_s"] <= 1.05 * 3000


@pytest.mark.parametrize("clock_offset", [0.0, 2.0, -2.0])
def test_anthropic_format_headers_are_learned_too(
    chaos_server_factory: Callable[..., ChaosServer], clock_offset: float
) -> None:
    """Also from a server whose clock is 2 s ahead of ours or behind it: its RFC 3339
    resets are all off by as much, their differences are not (issue 16: 0.2 s ahead
    collapsed the rate to ~4/s)."""
    clock = CrowdClock(CALLERS)
    server = limited_server(
        chaos_server_factory, clock, rate_limit_headers="anthropic", clock_offset=clock_offset
    )
    metas, errors, stats = crowd(server, clock)
    assert errors == [] and not any(m["degraded"] for m in metas)
    assert server.stats()["statuses"].get(429, 0) <= PACED_429S
    up = next(iter(stats["rate_limit"]["upstreams"].values()))
    # Read against our clock an RFC 3339 reset is off by the answer's age and the clocks'
    # offset; the rate is read from differences of resets, which neither changes (it
    # collapsed to < 1/s on late answers, then ~4/s on a clock 0.2 s ahead: issue 16)
    assert up["requests_source"] == "headers"
    assert 0.75 * 40 <= up["requests_per_s"] <= 1.1 * 40


def test_azure_format_remaining_counts_only_are_paced_without_a_collapse(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    """Azure OpenAI reports what is left but no limit and no reset: no rate can be read
    from it, AIMD finds one from the 429s and the remaining counts hold the crowd back."""
    clock = CrowdClock(CALLERS)
    server = limited_server(chaos_server_factory, clock, rate_limit_headers="azure")
    metas, errors, stats = crowd(server, clock)
    assert errors == [] and not any(m["degraded"] for m in metas)
    assert server.stats()["statuses"].get(429, 0) <= PACED_429S
    up = next(iter(stats["rate_limit"]["upstreams"].values()))
    assert up["requests_source"] == "aimd"
    # AIMD settles below the limit; it must not collapse (a collapse is < 1/s)
    assert 0.1 * 40 <= up["requests_per_s"] <= 1.1 * 40


def test_without_headers_aimd_finds_the_rate(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    clock = CrowdClock(CALLERS)
    server = limited_server(chaos_server_factory, clock, rate_limit_headers="none")
    metas, errors, stats = crowd(server, clock)
    assert errors == [] and not any(m["degraded"] for m in metas)
    up = next(iter(stats["rate_limit"]["upstreams"].values()))
    assert up["requests_source"] == "aimd"


def test_keys_are_paced_apart(chaos_server_factory: Callable[..., ChaosServer]) -> None:
    """Two API keys have two server buckets and two pacers."""
    clock = FakeClock()
    server = limited_server(chaos_server_factory, clock, rate_limit_burst=1)
    policy = ResiliencePolicy.preset("balanced", clock=clock)
    a = ResilientOpenAIClient(api_key="sk-a", base_url=server.base_url, policy=policy)
    b = ResilientOpenAIClient(api_key="sk-b", base_url=server.base_url, policy=policy)
    for client in (a, b):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert clock.sleeps == []  # one request per key: each key's bucket had room
    assert len(policy.stats()["rate_limit"]["upstreams"]) == 2
    assert server.wait_idle()
    assert server.stats()["statuses"] == {200: 2}


def test_a_call_whose_turn_is_after_its_deadline_is_served_from_cache_at_once(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    clock = FakeClock()
    server = chaos_server_factory(clock=clock, rate_limit_rps=0.5, rate_limit_burst=1)
    policy = ResiliencePolicy.preset("balanced", clock=clock, deadline=1.0)
    client = ResilientOpenAIClient(api_key="sk-d", base_url=server.base_url, policy=policy)
    first = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    again = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert first.resilience["source"] == "live"  # type: ignore[attr-defined]
    meta = again.resilience  # type: ignore[attr-defined]
    assert (meta["source"], meta["degraded"], meta["attempts"]) == ("cache", True, 0)
    assert "RateLimitedError" in meta["error"]
    assert clock.sleeps == []  # rejected at once: no waiting, no retries
    assert server.wait_idle()
    assert server.stats()["requests"] == 1  # the second call never reached the server
    # and with nothing to serve, the caller gets the typed error
    with pytest.raises(RateLimitedError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "new"}]
        )


def test_429_is_retried_after_exactly_retry_after_ms_and_is_no_breaker_failure(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    clock = FakeClock()
    server = chaos_server_factory(clock=clock, rate_limit_rps=4.0, rate_limit_burst=1)
    policy = ResiliencePolicy.preset("balanced", clock=clock, failure_threshold=1)
    plain = openai.OpenAI(api_key="sk-r", base_url=server.base_url, max_retries=0)
    plain.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
    # the bucket is empty; our client has never seen this server: it learns from the 429
    client = ResilientOpenAIClient(api_key="sk-r", base_url=server.base_url, policy=policy)
    result = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert result.resilience == {  # type: ignore[attr-defined]
        "source": "live",
        "attempts": 2,
        "age_s": None,
        "degraded": False,
    }
    assert clock.sleeps == [pytest.approx(0.25)]  # retry-after-ms, and no extra pacing wait
    assert policy.breaker is not None and policy.breaker.get_state().value == "closed"


def test_the_recorded_429_cassette_teaches_the_pacer() -> None:
    """The committed cassette of a 429 from the server's request bucket carries what the
    pacer learns from: x-ratelimit-* on both answers, retry-after-ms on the 429."""
    import yaml

    from rag_resilience.chaos.cassettes import cassette_path
    from rag_resilience.ratelimit import PaceRequest, RateLimiter

    data = yaml.safe_load(cassette_path("openai_chat/429_rate_limit_headers").read_text())
    responses = [i["response"] for i in data["interactions"]]
    assert [r["status"]["code"] for r in responses] == [200, 429]
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    up = "cassette|gpt-4o-mini|-"
    limiter.reserve(PaceRequest(up))
    for r in responses:
        headers = {k.lower(): v[0] for k, v in r["headers"].items()}
        limiter.observe(headers, status=r["status"]["code"], upstream=up)
    learned = limiter.stats()["upstreams"][up]
    assert learned["requests_source"] == "headers"
    assert 0.45 <= learned["requests_per_s"] <= 0.52  # the bucket refills every 2 s
    retry_after = float(responses[1]["headers"]["retry-after-ms"][0]) / 1000
    # no sooner than the 429 said; no later than one learned interval after the 200
    wait = limiter.reserve(PaceRequest(up))[0]
    assert retry_after <= wait <= 1 / learned["requests_per_s"] + 1e-3
