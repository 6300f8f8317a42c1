"""Issue 15, recovery time: the presets' probe schedule counts from the first failure of the
run that opened the circuit (`open_from="first_failure"`), not from the failure that reached
the threshold. Real HTTP (the chaos server) through `ResilientOpenAIClient` and
`AsyncResilientOpenAIClient` sharing one policy, a crowd of threads and asyncio tasks per
wave; time is the fake clock's, so the schedule is exact.

Before: a crowd that needed three waves to reach the threshold opened 2 s into the outage
and probed at 4 s, 8 s, 16 s (the doubling periods timed from the trip): two probes on the
dead upstream and the first live answer 6 s after it came back at 10 s. Now the schedule is
the one of a circuit opened at 0 s (2 s, 6 s, 14 s) with the probe time the failing crowd had
already passed (2 s) skipped: one probe during the outage, the first live answer 4 s after.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from rag_resilience.breaker import CircuitBreaker
from rag_resilience.chaos import ChaosServer
from rag_resilience.openai_client import AsyncResilientOpenAIClient, ResilientOpenAIClient
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.testing import FakeClock, fake_clock

CROWD = 2  # threads and as many tasks per wave
OUTAGE_S = 10.0


@pytest.fixture
def chaos() -> Iterator[ChaosServer]:
    with ChaosServer(seed=151) as srv:
        yield srv


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as clk:
        yield clk


def chat_requests(server: ChaosServer) -> int:
    assert server.wait_idle()
    return int(server.stats()["endpoints"]["chat"]["requests"])


def wave(sync: ResilientOpenAIClient, aio: AsyncResilientOpenAIClient) -> list[str]:
    """CROWD threads and CROWD tasks call at once; the sources of their answers."""
    sources: list[str] = []
    lock = threading.Lock()
    messages = [{"role": "user", "content": "q"}]

    def in_thread() -> None:
        r = sync.chat.completions.create(model="gpt-4o-mini", messages=messages)
        with lock:
            sources.append(r.resilience["source"])

    async def in_tasks() -> None:
        async def one() -> None:
            r = await aio.chat.completions.create(model="gpt-4o-mini", messages=messages)
            with lock:
                sources.append(r.resilience["source"])

        await asyncio.gather(*(one() for _ in range(CROWD)))

    threads = [threading.Thread(target=in_thread) for _ in range(CROWD)]
    for t in threads:
        t.start()
    asyncio.run(in_tasks())
    for t in threads:
        t.join(30)
    assert len(sources) == 2 * CROWD
    return sources


def run_outage(chaos: ChaosServer, clock: FakeClock) -> dict[str, Any]:
    """Waves every second of fake time; the upstream is down for the first OUTAGE_S."""
    pol = ResiliencePolicy.preset(
        "balanced",
        name="rec-schedule",
        generic_fallback=True,  # a refused call is answered at once (no sleeping on the clock)
        max_retries=0,  # one attempt per call: the crowd decides when the count is reached
        failure_threshold=10,  # 2.5 waves of failures: the circuit opens in the third
    )
    sync = ResilientOpenAIClient(api_key="sk-x", base_url=chaos.base_url, policy=pol)
    aio = AsyncResilientOpenAIClient(api_key="sk-x", base_url=chaos.base_url, policy=pol)
    breaker = pol.breaker
    assert isinstance(breaker, CircuitBreaker)
    start = clock.monotonic()
    chaos.set_faults(outage=True)
    opened_at = first_live = None
    probes_during_outage = 0
    for _ in range(30):
        now = clock.monotonic() - start
        if now >= OUTAGE_S:
            chaos.set_faults(outage=False)
        before = chat_requests(chaos)
        sources = wave(sync, aio)
        sent = chat_requests(chaos) - before
        if opened_at is None and breaker.get_state().value == "open":
            opened_at = now
        elif opened_at is not None and now < OUTAGE_S:
            probes_during_outage += sent
        if "live" in sources and now >= OUTAGE_S:
            first_live = now
            break
        clock.advance(1.0)
    return {
        "opened_at": opened_at,
        "probes_during_outage": probes_during_outage,
        "recovery_s": None if first_live is None else first_live - OUTAGE_S,
    }


@pytest.mark.timeout(120)
def test_probes_are_timed_from_the_first_failure_of_the_crowd(
    chaos: ChaosServer, clock: FakeClock
) -> None:
    result = run_outage(chaos, clock)
    assert result["opened_at"] == 2.0, result  # the crowd needed three waves
    assert result["probes_during_outage"] == 1, result  # before: 2 (at 4 s and 8 s)
    assert result["recovery_s"] == 4.0, result  # before: 6.0 (probe at 16 s)


def test_the_seed_breaker_still_opens_for_its_period_from_the_trip(clock: FakeClock) -> None:
    """`open_from="trip"` (the default of a bare CircuitBreaker): as before."""
    cb = CircuitBreaker(3, 5.0, clock=clock)
    for _ in range(3):
        with pytest.raises(ConnectionError):
            cb.call(_down)
        clock.advance(2.0)
    assert cb.retry_after() == pytest.approx(5.0 - 2.0)  # opened at the third failure


@pytest.mark.parametrize(
    ("spread", "retry_after", "open_count"),
    [
        (0.5, 2.0 - 1.0, 1),  # first probe 2 s after the first failure
        (1.5, 4.0, 2),  # 2 s passed while failing: as if opened at 1 s, probe at 7 s
        (10.0, 4.0, 2),  # at most one period credited: as if opened at 18 s, probe at 24 s
    ],
)
def test_the_schedule_skips_probe_times_the_failing_run_passed(
    clock: FakeClock, spread: float, retry_after: float, open_count: int
) -> None:
    cb = CircuitBreaker(3, 60.0, min_recovery_timeout=2.0, open_from="first_failure", clock=clock)
    for i in range(3):
        if i:
            clock.advance(spread)
        with pytest.raises(ConnectionError):
            cb.call(_down)
    assert cb.get_state().value == "open"
    assert cb.retry_after() == pytest.approx(retry_after)
    assert cb.stats()["open_count"] == open_count


def test_a_failed_probe_times_the_next_period_from_its_send(clock: FakeClock) -> None:
    """A probe that took 1.5 s to fail: the next one is due 4 s after it was sent."""
    cb = CircuitBreaker(1, 60.0, min_recovery_timeout=2.0, open_from="first_failure", clock=clock)
    with pytest.raises(ConnectionError):
        cb.call(_down)
    clock.advance(2.0)

    def slow_down() -> None:
        clock.advance(1.5)
        raise ConnectionError("still down")

    with pytest.raises(ConnectionError):
        cb.call(slow_down)
    assert cb.retry_after() == pytest.approx(4.0 - 1.5)


def test_open_from_is_validated() -> None:
    with pytest.raises(ValueError, match="open_from"):
        CircuitBreaker(open_from="later")


def _down() -> None:
    raise ConnectionError("down")


def test_siblings_share_one_doubling_schedule(clock: FakeClock) -> None:
    """Two wrappers of one host: whichever probes, a failed probe doubles the host's period.
    Before: the follower kept its own count, so the host's third period was 4 s or 8 s
    depending on which wrapper's caller came first (benchmarks/chaos.py outage through
    LangChain: first live answer 0.27 s or 0.70 s after recovery, run to run)."""
    from rag_resilience.upstream import join_upstream

    chat, embed = (
        CircuitBreaker(2, 60.0, min_recovery_timeout=2.0, clock=clock, name=f"sched-{n}")
        for n in ("chat", "embed")
    )
    for b in (chat, embed):
        join_upstream(b, "schedule-test-host")
    with pytest.raises(ConnectionError):
        embed.call(_down)
    with pytest.raises(ConnectionError):
        chat.call(_down)  # 2 failures on the host: both open
    assert {chat.get_state().value, embed.get_state().value} == {"open"}
    clock.advance(2.01)
    with pytest.raises(ConnectionError):
        chat.call(_down)  # chat's probe fails: 4 s for the host
    clock.advance(4.01)
    with pytest.raises(ConnectionError):
        embed.call(_down)  # this time embed's caller comes first and probes
    assert embed.retry_after() == pytest.approx(8.0)  # before: 4.0
    assert chat.retry_after() >= 8.0
