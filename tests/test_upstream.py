"""One outage signal per upstream (issue 15): the LangChain chat and embeddings wrappers of
one host open, probe and close together on an outage, while one endpoint failing alone
opens only its own circuit. Real ChatOpenAI / OpenAIEmbeddings against the chaos server;
request counts from the server once idle; time on the fake clock."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from rag_resilience.breaker import CircuitBreaker, CircuitState
from rag_resilience.chaos import ChaosServer
from rag_resilience.errors import CircuitOpenError
from rag_resilience.langchain import ResilientEmbeddings, ResilientLLM
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.testing import FakeClock, fake_clock
from rag_resilience.upstream import join_upstream, upstream_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OPEN, CLOSED = CircuitState.OPEN, CircuitState.CLOSED


@pytest.fixture(scope="module")
def server() -> Iterator[ChaosServer]:
    with ChaosServer(seed=3) as srv:
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


def requests(server: ChaosServer, endpoint: str) -> int:
    assert server.wait_idle()
    return int(server.stats()["endpoints"][endpoint]["requests"])


def wrappers(
    server: ChaosServer, tag: str, threshold: int = 2
) -> tuple[ResilientLLM, ResilientEmbeddings, CircuitBreaker, CircuitBreaker]:
    chat_pol = ResiliencePolicy.preset(
        "balanced", name=f"{tag}-chat", max_retries=0, failure_threshold=threshold
    )
    emb_pol = ResiliencePolicy.preset(
        "balanced", name=f"{tag}-emb", max_retries=0, failure_threshold=threshold
    )
    common = {"base_url": server.base_url, "api_key": "sk-test", "max_retries": 0}
    llm = ResilientLLM(ChatOpenAI(model="gpt-4o-mini", **common), policy=chat_pol)
    emb = ResilientEmbeddings(
        OpenAIEmbeddings(
            model="text-embedding-3-small", check_embedding_ctx_length=False, **common
        ),
        policy=emb_pol,
    )
    assert chat_pol.breaker is not None and emb_pol.breaker is not None
    return llm, emb, chat_pol.breaker, emb_pol.breaker


def test_default_upstream_is_the_base_url_host(chaos: ChaosServer) -> None:
    _, _, chat_cb, emb_cb = wrappers(chaos, "up-host")
    host = chaos.base_url.split("//")[1].split("/")[0]
    assert chat_cb.upstream is emb_cb.upstream and chat_cb.upstream.name == host
    assert upstream_of(ChatOpenAI(model="m", api_key="sk-test")) == "api.openai.com"
    assert join_upstream(None, "x") is None and join_upstream(CircuitBreaker(), "") is None


@pytest.mark.timeout(60)
def test_an_outage_opens_probes_and_closes_both_wrappers_together(
    chaos: ChaosServer, clock: FakeClock
) -> None:
    """Before: each wrapper tripped on its own failures and sent its own probes to the dead
    host (90.7% of calls with zero upstream requests once open, against 95.7% with one
    breaker)."""
    llm, emb, chat_cb, emb_cb = wrappers(chaos, "up-out")
    emb.embed_query("known")  # a cached vector, served while open
    chaos.set_faults(outage=True)
    with pytest.raises(Exception):  # noqa: B017 - the upstream's 503, no cache: re-raised
        emb.embed_query("new text")  # embeddings: one failure counted
    for _ in range(2):
        llm.invoke("q")  # chat trips (generic answers)
    assert chat_cb.get_state() is OPEN
    assert emb_cb.get_state() is OPEN  # it was failing too: opened with chat
    before = requests(chaos, "embeddings")
    assert emb.embed_query("known")  # from its cache, no request
    assert requests(chaos, "embeddings") == before
    # probes together: chat probes, fails; embeddings waits past chat's next probe
    clock.advance(chat_cb.retry_after() + 0.0001)
    assert emb_cb.get_state() is OPEN
    llm.invoke("q")
    assert chat_cb.get_state() is OPEN and emb_cb.retry_after() > chat_cb.retry_after()
    assert requests(chaos, "embeddings") == before
    # closes together: chat's probe succeeds; embeddings' next call is its probe, live
    chaos.set_faults(outage=False)
    clock.advance(chat_cb.retry_after() + 0.0001)
    assert llm.invoke("q").response_metadata["resilience"]["source"] == "live"
    assert emb_cb.retry_after() == 0.0
    emb.embed_query("another new text")
    assert requests(chaos, "embeddings") == before + 1
    assert chat_cb.get_state() is CLOSED and emb_cb.get_state() is CLOSED


@pytest.mark.timeout(60)
def test_one_endpoint_failing_alone_opens_only_its_circuit(
    chaos: ChaosServer, clock: FakeClock
) -> None:
    llm, emb, chat_cb, emb_cb = wrappers(chaos, "up-alone")
    chaos.set_faults(outage=True, endpoints=("chat",))  # chat overloaded, embeddings fine
    emb.embed_query("fine")
    for _ in range(2):
        llm.invoke("q")
    assert chat_cb.get_state() is OPEN and emb_cb.get_state() is CLOSED
    before = requests(chaos, "embeddings")
    emb.embed_documents(["still", "working"])
    assert requests(chaos, "embeddings") == before + 1 and emb_cb.get_state() is CLOSED


def crowd(
    sync_fns: list[Callable[[], Any]], async_fns: list[Callable[[], Awaitable[Any]]]
) -> list[Any]:
    """Run each sync fn in its own thread and the async fns as tasks on one loop (in its
    own thread), all at once; every outcome (result or exception)."""
    out: list[Any] = []
    lock = threading.Lock()

    def one(fn: Callable[[], Any]) -> None:
        try:
            result = fn()
        except Exception as exc:
            result = exc
        with lock:
            out.append(result)

    async def tasks() -> None:
        got = await asyncio.gather(*(fn() for fn in async_fns), return_exceptions=True)
        with lock:
            out.extend(got)

    threads = [threading.Thread(target=one, args=(fn,), daemon=True) for fn in sync_fns]
    threads.append(threading.Thread(target=lambda: asyncio.run(tasks()), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == len(sync_fns) + len(async_fns)
    return out


@pytest.mark.timeout(60)
def test_failures_of_both_wrappers_add_up_to_one_outage_signal(
    chaos: ChaosServer, clock: FakeClock
) -> None:
    """Before: each breaker counted only its own failures, so with chat 3/4 of the traffic
    the host tripped later than under one breaker (chaos benchmark outage: opened ~45 ms
    later than ResilientOpenAIClient, 94.4-94.9% zero-upstream calls once open). Here a
    crowd fails 2 chat and 2 embedding calls at once against a threshold of 4: neither
    breaker alone reached it."""
    llm, emb, chat_cb, emb_cb = wrappers(chaos, "up-pool", threshold=4)
    emb.embed_query("known")  # cached: served while open
    chaos.set_faults(outage=True)
    outcomes = crowd(
        [lambda: llm.invoke("q"), lambda: emb.embed_query("new a")],
        [lambda: llm.ainvoke("q"), lambda: emb.aembed_query("new b")],
    )
    assert sum(isinstance(o, Exception) for o in outcomes) == 2  # embeddings: nothing cached
    assert chat_cb.get_state() is OPEN and emb_cb.get_state() is OPEN
    before = requests(chaos, "chat") + requests(chaos, "embeddings")
    outcomes = crowd(
        [lambda: llm.invoke("q"), lambda: emb.embed_query("known")] * 3,
        [lambda: llm.ainvoke("q"), lambda: emb.aembed_query("known")] * 3,
    )
    assert not any(isinstance(o, Exception) for o in outcomes)  # generic / cached answers
    assert requests(chaos, "chat") + requests(chaos, "embeddings") == before


def test_failures_of_a_wrapper_built_before_do_not_count(chaos: ChaosServer) -> None:
    """A wrapper of an earlier outage (or one built per request and dropped) says nothing
    about this one: only siblings' failures since it joined count."""
    old = CircuitBreaker(failure_threshold=3, name="up-stale-old")
    join_upstream(old, "up-stale")
    for _ in range(2):
        old.on_failure(RuntimeError("down"))
    new = CircuitBreaker(failure_threshold=3, name="up-stale-new")
    join_upstream(new, "up-stale")
    new.on_failure(RuntimeError("down"))
    assert new.get_state() is CLOSED  # 1 of its own; the old one's 2 came before it joined
    old.on_failure(RuntimeError("down"))  # old trips on its own 3; new has failures: follows
    assert old.get_state() is OPEN and new.get_state() is OPEN


def held_pair(clock: FakeClock, tag: str) -> tuple[CircuitBreaker, CircuitBreaker]:
    """Two breakers of one upstream, both open and due for a probe; `a` is probing."""
    kw: dict[str, Any] = {"failure_threshold": 2, "recovery_timeout": 5.0, "probe_wait": 30.0}
    a = CircuitBreaker(name=f"{tag}-a", **kw)
    b = CircuitBreaker(name=f"{tag}-b", **kw)
    join_upstream(a, tag)
    join_upstream(b, tag)
    b.on_failure(RuntimeError("down"))
    a.on_failure(RuntimeError("down"))
    a.on_failure(RuntimeError("down"))  # a trips (on its own or pooled); b failing: follows
    assert a.get_state() is OPEN and b.get_state() is OPEN
    clock.advance(10.0)
    return a, b


def wait_until(predicate: Callable[[], bool]) -> None:
    """Spin until `predicate` holds: only for thread hand-offs (never a timed assertion)."""
    limit = time.monotonic() + 20.0
    while not predicate():
        assert time.monotonic() < limit, "condition not reached"
        time.sleep(0.001)


def admitted_and_reported(cb: CircuitBreaker) -> tuple[Callable[[], Any], Callable[[], Any]]:
    def sync() -> int:
        ticket = cb.admit()
        cb.on_success(ticket)
        return ticket

    async def run() -> int:
        ticket = await cb.aadmit()
        await cb.aon_success(ticket)
        return ticket

    return sync, run


@pytest.mark.timeout(60)
@pytest.mark.parametrize("verdict", ["success", "failure"])
def test_a_sibling_due_for_a_probe_waits_for_the_probe_in_flight(
    clock: FakeClock, verdict: str
) -> None:
    """Before: `b`'s period ended too, so while `a`'s probe was in flight `b` sent its own
    (chaos benchmark outage: two probes 3 ms apart to the dead host). Now `b`'s crowd
    waits for `a`'s verdict: live after a success, rejected at once after a failure."""
    a, b = held_pair(clock, f"up-held-{verdict}")
    probe = a.admit()
    assert a.get_state() is CircuitState.HALF_OPEN
    sync, run = admitted_and_reported(b)
    results: list[Any] = []
    runner = threading.Thread(
        target=lambda: results.extend(crowd([sync] * 6, [run] * 10)), daemon=True
    )
    runner.start()
    wait_until(lambda: b.waited == 16)  # every caller of b is waiting
    assert not b.probing()  # none of them probed
    if verdict == "success":
        a.on_success(probe)
    else:
        a.on_failure(RuntimeError("still down"), probe)
    runner.join(30)
    assert len(results) == 16
    if verdict == "success":
        assert not any(isinstance(r, Exception) for r in results)
        assert a.get_state() is CLOSED and b.get_state() is CLOSED
    else:
        assert all(isinstance(r, CircuitOpenError) for r in results)
        assert b.get_state() is OPEN and b.retry_after() >= a.retry_after()
