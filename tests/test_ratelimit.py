"""The pacer's decisions on an injected clock: FIFO slots, deadline and queue bounds,
rates learned from headers, AIMD without them, token correction, config errors."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from datetime import datetime, timezone

import pytest

from rag_resilience import ResiliencePolicy, RetryStrategy
from rag_resilience.errors import QueueFullError, RateLimitedError, is_handled
from rag_resilience.ratelimit import PaceRequest, RateLimiter, upstream_key
from rag_resilience.ratelimit_tokens import count_text_tokens, estimate_request_tokens
from rag_resilience.testing import FakeClock

UP = "http://upstream/v1|gpt-4o-mini|-"


def req(tokens: int = 0) -> PaceRequest:
    return PaceRequest(UP, tokens)


def test_told_rate_grants_fifo_slots_one_interval_apart() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=10.0, clock=clock)
    waits = [limiter.reserve(req())[0] for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    stats = limiter.stats()
    assert (stats["calls"], stats["paced"]) == (5, 4)
    assert stats["paced_seconds"] == pytest.approx(1.0)


def test_a_slot_past_the_deadline_is_refused_at_once_and_reserves_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=2.0, clock=clock)
    assert limiter.reserve(req(), max_wait=1.0)[0] == 0.0
    assert limiter.reserve(req(), max_wait=1.0)[0] == pytest.approx(0.5)
    with pytest.raises(RateLimitedError) as info:
        limiter.reserve(req(), max_wait=0.9)  # its slot would be at 1.0 s
    err = info.value
    assert err.wait == pytest.approx(1.0) and err.max_wait == 0.9 and err.upstream == UP
    assert isinstance(err, QueueFullError) and is_handled(err)
    assert "deadline" in str(err) and "sk-" not in str(err)
    # the refused call took no slot: the next one gets the slot it would have had
    assert limiter.reserve(req(), max_wait=5.0)[0] == pytest.approx(1.0)
    assert limiter.stats()["rejected"] == 1


def test_the_wait_queue_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=1.0, max_queue=2, clock=clock)
    limiter.reserve(req())  # no wait: not queued
    limiter.reserve(req())
    limiter.reserve(req())
    with pytest.raises(RateLimitedError, match="max_queue=2"):
        limiter.reserve(req())
    limiter.pacer(UP).done_waiting()
    assert limiter.reserve(req())[0] == pytest.approx(3.0)


def test_rate_learned_from_headers_stays_within_the_servers_bounds() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    limiter.reserve(req())
    # a server bucket of 5 refilling at 40/s, reported after 5 requests at once
    for remaining, reset in ((4, "25ms"), (3, "50ms"), (2, "75ms"), (1, "100ms"), (0, "125ms")):
        limiter.observe(openai_headers(remaining, reset), upstream=UP)
    snap = limiter.stats()["upstreams"][UP]
    assert snap["requests_source"] == "headers"
    assert 0.75 * 40 <= snap["requests_per_s"] <= 40.0
    # the server said none is left: the next call waits one interval, the ones after it
    # one more each
    waits = [limiter.reserve(req())[0] for _ in range(3)]
    interval = 1.0 / snap["requests_per_s"]
    assert waits == pytest.approx([interval, 2 * interval, 3 * interval], rel=1e-3)


def openai_headers(remaining: int, reset: str) -> dict[str, str]:
    """OpenAI's headers for a 5-request bucket."""
    return {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": reset,
    }


def anthropic_headers(clock: FakeClock, remaining: int, reset: float) -> dict[str, str]:
    """Anthropic's headers for a 5-request bucket, stamped by the server now."""
    when = datetime.fromtimestamp(clock.time() + reset, tz=timezone.utc)
    return {
        "anthropic-ratelimit-requests-limit": "5",
        "anthropic-ratelimit-requests-remaining": str(remaining),
        "anthropic-ratelimit-requests-reset": when.isoformat(timespec="milliseconds"),
    }


def test_an_rfc3339_reset_of_a_late_sent_call_does_not_collapse_the_rate() -> None:
    """Issue 16 regression: a call granted its slot at t but sent 15 s later (others'
    sleeps moved the clock) is answered with a reset stamped when it was sent. Its age
    (now - slot) can only make the real reset longer than the parsed one: it must not
    turn into an upper bound of 1 request per 15 s that wipes what the pacer knew."""
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    # a server bucket of 5 refilling at 40/s, answers read as soon as they were stamped
    for remaining, reset in ((4, 0.025), (3, 0.05), (2, 0.075), (1, 0.1)):
        limiter.reserve(req())
        limiter.observe(anthropic_headers(clock, remaining, reset), upstream=UP)
    learned = limiter.stats()["upstreams"][UP]["requests_per_s"]
    assert 0.75 * 40 <= learned <= 1.1 * 40
    limiter.reserve(req())
    clock.advance(15.0)  # the call is sent (and stamped) 15 s after its slot
    limiter.observe(anthropic_headers(clock, 4, 0.025), upstream=UP)
    snap = limiter.stats()["upstreams"][UP]
    assert snap["requests_source"] == "headers"
    assert 0.75 * 40 <= snap["requests_per_s"] <= 1.1 * 40
    waits = [limiter.reserve(req())[0] for _ in range(8)]
    assert max(waits) < 8 / (0.75 * 40)  # paced at ~40/s, not one call per 15 s


def pace_against_a_bucket(
    limiter: RateLimiter,
    clock: FakeClock,
    report: Callable[[float, float], dict[str, str]],
    calls: int,
) -> list[float]:
    """`calls` calls paced by `limiter` against a server bucket of 5 refilled at 40/s,
    each answered at once with `report(level, now)`; the learned rate after each call.
    Fails on a call the server would refuse (a 429)."""
    level, last = 5.0, clock.monotonic()
    learned: list[float] = []
    for _ in range(calls):
        clock.advance(limiter.reserve(req())[0])
        now = clock.monotonic()
        level = min(5.0, level + (now - last) * 40.0) - 1.0
        last = now
        assert level >= 0.0, f"a 429 after {len(learned)} calls (learned {learned[-3:]})"
        limiter.observe(report(level, now), upstream=UP)
        learned.append(limiter.stats()["upstreams"][UP]["requests_per_s"])
    return learned


@pytest.mark.parametrize("ahead", [0.2, 0.05, 5.0, -0.2, -5.0])
def test_an_rfc3339_reset_from_a_server_clock_off_ours_keeps_the_rate(ahead: float) -> None:
    """A server clock `ahead` s ahead of ours (negative: behind) shifts every absolute
    reset alike: the rate is read from their differences, which the offset cancels. It
    collapsed to ~4/s at 0.2 s ahead (every reset read 0.2 s long) before."""
    clock = FakeClock()

    def report(level: float, now: float) -> dict[str, str]:
        server = FakeClock(start=now, wall_start=clock.time() + ahead)
        return anthropic_headers(server, int(level), (5.0 - level) / 40.0)

    learned = pace_against_a_bucket(RateLimiter(clock=clock), clock, report, 200)
    assert min(learned[50:]) >= 0.9 * 40 and max(r or 0.0 for r in learned) <= 1.05 * 40


def test_a_rate_learned_below_the_limit_climbs_to_it_while_the_bucket_stays_full() -> None:
    """Issue 16: a first burst bounded the rate at 30/s from below (a bucket of 5 proves
    at most 4/5 of its rate that way); paced at ~32/s the server's bucket stayed full,
    its answers proved no more, and the learned rate stuck there (the crowd test failed
    6 runs in 57 at 29.5/s). What the server granted now proves more: the pace climbs."""
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    limiter.reserve(req())
    for remaining, reset in ((4, "25ms"), (3, "50ms"), (2, "75ms"), (1, "100ms")):
        limiter.observe(openai_headers(remaining, reset), upstream=UP)
    clock.advance(1.0)  # the server's bucket is full again

    def report(level: float, now: float) -> dict[str, str]:
        return openai_headers(int(level), f"{(5.0 - level) / 40.0 * 1000:.0f}ms")

    learned = pace_against_a_bucket(limiter, clock, report, 200)
    assert learned[0] < 0.85 * 40  # where it started
    assert min(learned[50:]) >= 0.9 * 40 and max(r or 0.0 for r in learned) <= 1.05 * 40


def test_a_429_blocks_until_its_retry_after_then_spaces_the_crowd() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=10.0, clock=clock)
    limiter.reserve(req())
    limiter.observe({"retry-after-ms": "2000"}, status=429, upstream=UP)
    waits = [limiter.reserve(req())[0] for _ in range(3)]
    assert waits == pytest.approx([2.0, 2.1, 2.2])
    assert limiter.stats()["throttled_429"] == 1


def test_a_call_that_met_a_429_keeps_its_place_while_a_crowd_reserves() -> None:
    """Issue 16: the retry of a 429'd call is granted the first slot the Retry-After
    allows, at the 429; before, it queued again after sleeping through the Retry-After,
    behind every caller who reserved meanwhile (here 0.6 s late instead of on time)."""
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=10.0, clock=clock)
    throttled = contextvars.copy_context()  # the 429'd call's own thread/task context
    throttled.run(limiter.reserve, req())
    throttled.run(limiter.observe, {"retry-after-ms": "500"}, status=429, upstream=UP)
    slots = crowd_waits(limiter, 3, 3)
    clock.advance(0.5)  # the retry slept through exactly the Retry-After
    assert throttled.run(limiter.reserve, req())[0] == pytest.approx(0.0)
    # the crowd queues behind it, one interval apart
    assert sorted(slots) == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0, 1.1])


def test_aimd_cuts_on_429_without_headers_and_grows_back() -> None:
    clock = FakeClock()
    limiter = RateLimiter(aimd_decrease=0.5, aimd_increase=0.1, clock=clock)
    for _ in range(20):  # 20 calls in one second: no limit known, no waiting
        assert limiter.reserve(req())[0] == 0.0
        clock.advance(0.05)
    limiter.observe({}, status=429, upstream=UP)
    snap = limiter.stats()["upstreams"][UP]
    assert snap["requests_source"] == "aimd"
    cut = snap["requests_per_s"]
    assert 8.0 <= cut <= 12.0  # half of ~20/s
    limiter.observe({}, status=429, upstream=UP)  # the same burst: cut once
    assert limiter.stats()["upstreams"][UP]["requests_per_s"] == cut
    clock.advance(10.0)
    limiter.reserve(req())
    grown = limiter.stats()["upstreams"][UP]["requests_per_s"]
    assert grown == pytest.approx(cut * 2.0, rel=0.01)  # +10 % of the cut rate per second


def test_token_bucket_paces_by_tokens_and_is_corrected_by_usage() -> None:
    clock = FakeClock()
    limiter = RateLimiter(tokens_per_minute=60_000, token_burst=1000, clock=clock)  # 1000/s
    assert limiter.reserve(req(1000))[0] == 0.0
    assert limiter.reserve(req(500))[0] == pytest.approx(0.5)
    # the response says the second call spent 100 tokens, not 500: 0.4 s handed back
    limiter.observe({}, usage_tokens=100)
    assert limiter.reserve(req(1000))[0] == pytest.approx(1.1)


def test_config_errors_name_the_parameter() -> None:
    for kwargs, name in (
        ({"requests_per_second": 0}, "requests_per_second"),
        ({"requests_per_second": float("nan")}, "requests_per_second"),
        ({"tokens_per_minute": -1}, "tokens_per_minute"),
        ({"burst": 0}, "burst"),
        ({"max_queue": -1}, "max_queue"),
        ({"safety": 1.5}, "safety"),
        ({"aimd_decrease": 0}, "aimd_decrease"),
        ({"aimd_increase": 11}, "aimd_increase"),
        ({"max_wait": 0}, "max_wait"),
    ):
        with pytest.raises(ValueError, match=name):
            RateLimiter(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate_limit"):
        ResiliencePolicy.preset("balanced", rate_limit="yes")  # type: ignore[arg-type]


def test_upstream_key_hashes_the_api_key() -> None:
    key = upstream_key("http://h/v1/", "m", "sk-secret-123")
    assert "sk-secret" not in key and key.startswith("http://h/v1|m|")
    assert key != upstream_key("http://h/v1", "m", "sk-other")
    assert upstream_key("http://h/v1", "m", None).endswith("|-")


def test_token_estimate_counts_messages_tools_and_max_tokens() -> None:
    text = "x" * 400
    base = estimate_request_tokens({"messages": [{"role": "user", "content": text}]})
    assert base == count_text_tokens(text) + 4
    assert (
        estimate_request_tokens({"messages": [{"role": "user", "content": text}], "max_tokens": 50})
        == base + 50
    )
    assert estimate_request_tokens({"input": ["a" * 40, "b" * 40]}) == 2 * count_text_tokens(
        "a" * 40
    )
    assert estimate_request_tokens({"messages": object()}) >= 1  # never raises
    assert estimate_request_tokens(None) == 1


def test_presets_pace_and_rate_limit_false_turns_it_off() -> None:
    assert ResiliencePolicy.preset("balanced").rate_limiter is not None
    assert ResiliencePolicy.preset("balanced", rate_limit=False).rate_limiter is None
    own = RateLimiter()
    assert ResiliencePolicy.preset("aggressive", rate_limit=own).rate_limiter is own
    assert ResiliencePolicy().rate_limiter is None


def test_policy_serves_a_paced_out_call_degraded_at_once_without_calling() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=1.0, clock=clock)
    policy = ResiliencePolicy(
        RetryStrategy(max_retries=3, clock=clock),
        rate_limiter=limiter,
        deadline=0.5,
        generic_fallback="busy",
        clock=clock,
    )
    calls: list[int] = []
    assert policy.call(lambda: calls.append(1) or "live") == "live"
    served = policy.run(lambda: calls.append(2) or "live")  # next slot in 1 s > 0.5 s
    assert (served.value, served.source, served.attempts) == ("busy", "rejected", 0)
    assert isinstance(served.error, RateLimitedError)
    assert calls == [1] and clock.sleeps == []
    assert policy.stats()["fallbacks_by_source"] == {"rejected": 1}
    assert policy.stats()["rejections_by_reason"] == {"rate_limit_wait": 1}
    assert policy.stats()["rate_limit"]["rejected"] == 1


def crowd_waits(limiter: RateLimiter, threads: int, tasks: int) -> list[float]:
    """The waits `reserve` grants a crowd of `threads` threads and `tasks` asyncio tasks."""
    waits: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        wait, _ = limiter.reserve(req())
        with lock:
            waits.append(wait)

    async def run_tasks() -> None:
        async def one() -> None:
            take()
            await asyncio.sleep(0)

        await asyncio.gather(*(one() for _ in range(tasks)))

    crowd = [threading.Thread(target=take) for _ in range(threads)]
    crowd.append(threading.Thread(target=asyncio.run, args=(run_tasks(),)))
    for t in crowd:
        t.start()
    for t in crowd:
        t.join()
    return waits


def test_crowd_of_threads_and_tasks_gets_distinct_fifo_slots() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=100.0, clock=clock)
    waits = crowd_waits(limiter, 50, 50)
    # 100 callers, one slot each, 10 ms apart: no two share a slot, none is skipped
    assert sorted(round(w, 6) for w in waits) == [round(i * 0.01, 6) for i in range(100)]


def test_one_429_without_headers_costs_a_tenth_of_the_rate_not_more() -> None:
    """AIMD starts from what was being sent (not from the Retry-After), and regrows."""
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    for _ in range(20):  # 20 calls/s
        limiter.reserve(req())
        clock.advance(0.05)
    limiter.observe({"retry-after": "1"}, status=429, upstream=UP)
    rate = limiter.stats()["upstreams"][UP]["requests_per_s"]
    assert 17.0 <= rate <= 19.0
    waits = [limiter.reserve(req())[0] for _ in range(3)]
    assert waits[0] == pytest.approx(1.0)  # the Retry-After
    assert waits[2] - waits[1] < 1.0 / 15  # then about 18/s, not one per Retry-After
    clock.advance(5.0)
    limiter.reserve(req())
    assert limiter.stats()["upstreams"][UP]["requests_per_s"] >= 2 * rate  # grows back
