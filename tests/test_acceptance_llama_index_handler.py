"""Acceptance: a LlamaIndex ResilienceEventHandler attached after the app is built.

Found in the LlamaIndex starter app: the handler was created after the index and the
ResilientQueryEngine (the natural order), and ``handler.stats()`` counted 2 calls for 8
made (the 6 engine queries that answered live on their first attempt were missing). The
policies read the bridge's ``routine`` wish once, when it subscribed, while no handler
existed, so they never dispatched their success events.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from rag_resilience.chaos import ChaosServer
from rag_resilience.llama_index import (
    ResilienceEventHandler,
    ResilientEmbedding,
    ResilientLLM,
    ResilientQueryEngine,
)
from rag_resilience.testing import FakeClock, fake_clock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DOCS = [Document(text="A circuit breaker stops calling a failing service for a while.")]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


def test_handler_created_after_the_engine_counts_every_call(
    chaos_server_factory: Any, clock: FakeClock
) -> None:
    server: ChaosServer = chaos_server_factory(seed=2, embedding_dim=16)
    base = {"api_base": server.base_url, "api_key": "sk-test", "max_retries": 0}
    llm = ResilientLLM(OpenAI(model="gpt-4o-mini", **base), name="acc-late-llm")
    emb = ResilientEmbedding(OpenAIEmbedding(**base), name="acc-late-emb")
    index = VectorStoreIndex.from_documents(DOCS, embed_model=emb)
    engine = ResilientQueryEngine(index.as_query_engine(llm=llm), name="acc-late-qe")
    engine.query("warm up")  # built and used before anyone collects stats

    handler = ResilienceEventHandler(names={"acc-late-qe", "acc-late-emb"})
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        errors: list[BaseException] = []

        def thread(i: int) -> None:
            try:
                engine.query(f"thread {i}")
            except BaseException as exc:  # reported below
                errors.append(exc)

        async def tasks() -> None:
            await asyncio.gather(*(engine.aquery(f"task {i}") for i in range(3)))

        threads = [threading.Thread(target=thread, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        asyncio.run(tasks())
        for t in threads:
            t.join()
        assert not errors
    finally:
        root.event_handlers.remove(handler)
        handler.close()
    stats = handler.stats()
    assert stats["calls"] == 6 and stats["live"] == 6, stats
    assert server.wait_idle()
    embedded = server.stats()["endpoints"]["embeddings"]["requests"]
    assert embedded == 1 + 1 + 6  # the documents, the warm-up query, the crowd
    assert stats["attempts"] == 6 + 6  # the engine's 6 and their 6 query embeddings
