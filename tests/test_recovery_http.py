"""Issue 15 over real HTTP: the real ChatOpenAI (max_retries=0) behind ResilientLLM against
the chaos server. A batch right after recovery is answered live (probe-wait + slow start),
and a dead primary fails over to a healthy fallback model at once, never on a 400.

Upstream request counts come from the server once it is idle; waits are on the fake clock.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_openai import ChatOpenAI

from rag_resilience.breaker import CircuitState
from rag_resilience.chaos import ChaosServer
from rag_resilience.langchain import ResilientLLM
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def server() -> Iterator[ChaosServer]:
    with ChaosServer(seed=15) as srv:
        yield srv


@pytest.fixture
def chaos(server: ChaosServer) -> ChaosServer:
    server.reset()
    server.clear_faults()
    return server


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as clk:
        yield clk


def chat(server: ChaosServer) -> ChatOpenAI:
    return ChatOpenAI(
        model="gpt-4o-mini", max_retries=0, base_url=server.base_url, api_key="sk-test"
    )


def requests(server: ChaosServer) -> int:
    assert server.wait_idle()
    return int(server.stats()["endpoints"]["chat"]["requests"])


def open_then_recover(
    llm: ResilientLLM, pol: ResiliencePolicy, chaos: ChaosServer, clock: FakeClock
) -> int:
    """An outage opens the circuit; the upstream comes back; the open period passes."""
    chaos.set_faults(outage=True)
    while pol.breaker is not None and pol.breaker.get_state() is not CircuitState.OPEN:
        llm.invoke("during the outage")
    chaos.set_faults(outage=False)
    assert pol.breaker is not None
    clock.advance(pol.breaker.retry_after() + 0.01)
    return requests(chaos)


QUESTIONS = [f"question {i}" for i in range(50)]


@pytest.mark.timeout(60)
def test_a_batch_right_after_recovery_is_answered_live(
    chaos: ChaosServer, clock: FakeClock
) -> None:
    """Before: 1 live answer and 49 generic ones (the half-open breaker rejected all but
    its probe), 1 upstream request."""
    pol = ResiliencePolicy.preset("balanced", name="rec-batch", generic_fallback=True)
    llm = ResilientLLM(chat(chaos), policy=pol)
    before = open_then_recover(llm, pol, chaos, clock)
    answers = llm.batch(QUESTIONS, config={"max_concurrency": 10})
    live = sum(a.response_metadata["resilience"]["source"] == "live" for a in answers)
    assert live >= 48
    assert requests(chaos) - before <= 55
    assert pol.breaker is not None and pol.breaker.get_state() is CircuitState.CLOSED


@pytest.mark.timeout(60)
async def test_an_async_batch_right_after_recovery_is_answered_live(
    chaos: ChaosServer, clock: FakeClock
) -> None:
    pol = ResiliencePolicy.preset("balanced", name="rec-abatch", generic_fallback=True)
    llm = ResilientLLM(chat(chaos), policy=pol)
    before = open_then_recover(llm, pol, chaos, clock)
    answers = await llm.abatch(QUESTIONS, config={"max_concurrency": 10})
    live = sum(a.response_metadata["resilience"]["source"] == "live" for a in answers)
    assert live >= 48
    assert requests(chaos) - before <= 55


def backup() -> FakeListChatModel:
    return FakeListChatModel(responses=["from the backup"] * 100)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("failover", "per_call", "slept"), [("immediate", 1, False), ("after_retries", 4, True)]
)
def test_a_dead_primary_fails_over_at_once(
    chaos: ChaosServer, clock: FakeClock, failover: str, per_call: int, slept: bool
) -> None:
    """Before (after_retries): every call spent 4 attempts and their backoff on the dead
    primary before the healthy backup was tried."""
    pol = ResiliencePolicy.preset("balanced", name=f"fo-{failover}", failover=failover)
    llm = ResilientLLM(chat(chaos), policy=pol, fallback_models=[backup()])
    chaos.set_faults(outage=True)
    answer = llm.invoke("q")
    assert answer.content == "from the backup"
    assert answer.response_metadata["resilience"]["source"] == "fallback"
    assert requests(chaos) == per_call
    assert bool(clock.sleeps) is slept


@pytest.mark.timeout(60)
def test_failover_sends_calls_back_to_the_primary_after_its_probe(
    chaos: ChaosServer, clock: FakeClock
) -> None:
    pol = ResiliencePolicy.preset("balanced", name="fo-back", failover="immediate")
    llm = ResilientLLM(chat(chaos), policy=pol, fallback_models=[backup()])
    chaos.set_faults(outage=True)
    assert pol.breaker is not None  # failed calls of one attempt each: threshold 5 x 4 = 20
    for _ in range(pol.breaker.failure_threshold + 3):  # one request each until open, then none
        assert llm.invoke("q").content == "from the backup"
    assert pol.breaker.get_state() is CircuitState.OPEN
    assert requests(chaos) == pol.breaker.failure_threshold
    chaos.set_faults(outage=False)
    clock.advance(pol.breaker.retry_after() + 0.01)
    answer = llm.invoke("q")  # the probe: the primary answers again
    assert answer.response_metadata["resilience"]["source"] == "live"
    assert pol.breaker.get_state() is CircuitState.CLOSED


@pytest.mark.timeout(60)
def test_the_callers_own_error_is_never_failed_over(chaos: ChaosServer, clock: FakeClock) -> None:
    """A 400 goes back to the caller (LiteLLM's router sends it to the backup model)."""
    pol = ResiliencePolicy.preset("balanced", name="fo-400", failover="immediate")
    spare = backup()
    llm = ResilientLLM(chat(chaos), policy=pol, fallback_models=[spare])
    chaos.set_faults(fail_next=1, fail_next_status=400)
    with pytest.raises(openai.BadRequestError):
        llm.invoke("q")
    assert requests(chaos) == 1 and spare.i == 0  # the backup never saw it


def test_failover_setting_is_checked() -> None:
    with pytest.raises(
        ValueError, match=r"failover must be one of \['after_retries', 'immediate'\]"
    ):
        ResiliencePolicy(failover="sometimes")
    assert ResiliencePolicy.preset("balanced").failover == "immediate"


@pytest.mark.timeout(90)
def test_calls_retrying_when_the_circuit_opens_wait_for_the_next_probe(
    chaos: ChaosServer, clock: FakeClock
) -> None:
    """ResilientOpenAIClient defaults (no fallback model, no cache key, generic answers off)
    over real HTTP: a crowd of threads and asyncio tasks retries through an outage that ends
    as the circuit opens. Before: the calls whose failed attempt met the open circuit raised
    the upstream's 503 at once (nothing to degrade to), while new callers waited for the
    next probe within their deadline. Now they wait too: every call is answered live."""
    import asyncio
    import threading

    from rag_resilience.openai_client import AsyncResilientOpenAIClient, ResilientOpenAIClient

    # the clients' defaults (balanced), tripping after one call's worth of failed attempts
    # (4): no call can spend all its retries before the circuit opens, so none may raise
    policy = ResiliencePolicy.resolve(None, name="retrying-open", failure_threshold=1)
    breaker = policy.breaker
    assert breaker is not None and policy.fallbacks is not None
    kw = {"api_key": "sk-test", "base_url": chaos.base_url, "policy": policy}
    sync_client, async_client = ResilientOpenAIClient(**kw), AsyncResilientOpenAIClient(**kw)
    msg = [{"role": "user", "content": "q"}]

    def recover(old: CircuitState, new: CircuitState) -> None:
        if new is CircuitState.OPEN:
            chaos.clear_faults()  # the upstream is back as the circuit opens

    breaker.add_state_listener(recover)
    chaos.set_faults(outage=True)
    results: list[object] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            out: object = sync_client.chat.completions.create(model="gpt-4o-mini", messages=msg)
        except Exception as exc:
            out = exc
        with lock:
            results.append(out)

    async def many() -> None:
        got = await asyncio.gather(
            *(
                async_client.chat.completions.create(model="gpt-4o-mini", messages=msg)
                for _ in range(8)
            ),
            return_exceptions=True,
        )
        with lock:
            results.extend(got)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(8)]
    threads.append(threading.Thread(target=lambda: asyncio.run(many()), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 16
    raised = [r for r in results if isinstance(r, BaseException)]
    assert raised == [], [getattr(r, "__notes__", None) for r in raised]
    assert all(r.resilience["source"] == "live" for r in results)  # type: ignore[attr-defined]
    assert breaker.get_state() is CircuitState.CLOSED
    assert requests(chaos) >= breaker.failure_threshold  # it did open on the outage
