"""One outage signal per upstream (issue 15): the LangChain chat and embeddings wrappers of
one host open, probe and close together on an outage, while one endpoint failing alone
opens only its own circuit. Real ChatOpenAI / OpenAIEmbeddings against the chaos server;
request counts from the server once idle; time on the fake clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from rag_resilience.breaker import CircuitBreaker, CircuitState
from rag_resilience.chaos import ChaosServer
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
    server: ChaosServer, tag: str
) -> tuple[ResilientLLM, ResilientEmbeddings, CircuitBreaker, CircuitBreaker]:
    chat_pol = ResiliencePolicy.preset(
        "balanced", name=f"{tag}-chat", max_retries=0, failure_threshold=2
    )
    emb_pol = ResiliencePolicy.preset(
        "balanced", name=f"{tag}-emb", max_retries=0, failure_threshold=2
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
