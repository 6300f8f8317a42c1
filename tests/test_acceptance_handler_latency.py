"""Acceptance: the LangChain handler's latency of user calls made through `with_resilience`.

Found with the README's quickstart (``chain = with_resilience(rag)`` and
``ResilienceCallbackHandler``): ``handler.stats()["latency_s"]`` stayed at ``count: 0`` for
every chain call; only a wrapped model called on its own was timed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from rag_resilience.chaos import ChaosServer
from rag_resilience.langchain import ResilienceCallbackHandler, ResilientLLM, with_resilience
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


@pytest.fixture
def server(chaos_server_factory: Any) -> ChaosServer:
    """A server of its own: langchain-openai caches its async HTTP client per base URL, and
    connections opened under this test's event loop must not reach another test's loop."""
    own: ChaosServer = chaos_server_factory(seed=3)
    return own


def test_chain_user_calls_are_timed(server: ChaosServer, clock: FakeClock) -> None:
    llm = ResilientLLM(
        ChatOpenAI(model="m", max_retries=0, base_url=server.base_url, api_key="sk-test"),
        name="acc-lat-llm",
    )
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = with_resilience(prompt | llm | StrOutputParser(), name="acc-lat-chain")
    outer = with_resilience(chain, name="acc-lat-outer")  # nested: still one user call each
    handler = ResilienceCallbackHandler()
    cfg: Any = {"callbacks": [handler]}
    errors: list[BaseException] = []

    def thread(i: int) -> None:
        try:
            chain.invoke({"question": f"t{i}"}, config=cfg)
        except BaseException as exc:  # reported below
            errors.append(exc)

    async def tasks() -> None:
        await asyncio.gather(
            *(chain.ainvoke({"question": f"a{i}"}, config=cfg) for i in range(3)),
            outer.ainvoke({"question": "nested"}, config=cfg),
        )

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    outer.invoke({"question": "nested sync"}, config=cfg)
    assert not errors
    stats = handler.stats()
    assert stats["calls"] == 8 and stats["live"] == 8, stats
    assert stats["latency_s"]["count"] == 8, stats["latency_s"]
