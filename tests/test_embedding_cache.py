"""The per-text vector cache does not re-write a vector it already keeps fresh.

An embedding model maps a text to the same vector every time; encoding and writing it
again on every call is wasted work. These tests pin down when a write happens, and that
serving from cache during an outage is unchanged by the skipped writes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding, Embeddings

from rag_resilience import ResiliencePolicy
from rag_resilience.langchain import ResilientEmbeddings
from rag_resilience.stores.sqlite import SQLiteStore
from rag_resilience.testing import FakeClock, fake_clock


class Switchable(Embeddings):
    """DeterministicFakeEmbedding that can be switched off (an outage)."""

    def __init__(self) -> None:
        self.inner = DeterministicFakeEmbedding(size=8)
        self.down = False
        self.calls = 0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        if self.down:
            raise ConnectionError("embeddings API unreachable")
        return self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with fake_clock() as fake:
        yield fake


def wrap(model: Embeddings, **kw: object) -> ResilientEmbeddings:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no timeout setting on the fake: warned once
        return ResilientEmbeddings(model, ResiliencePolicy.preset("balanced", **kw))  # type: ignore[arg-type]


def writes(embeddings: ResilientEmbeddings) -> int:
    assert embeddings.engine.cache is not None
    return embeddings.engine.cache.writes


def test_a_kept_vector_is_not_rewritten_until_half_its_ttl(clock: FakeClock) -> None:
    model = Switchable()
    emb = wrap(model, cache_ttl=100.0)
    first = emb.embed_query("what is RAG?")
    for _ in range(5):
        assert emb.embed_query("what is RAG?") == first
    assert writes(emb) == 1 and model.calls == 6  # every call is live; one write

    emb.embed_documents(["what is RAG?", "a new text"])
    assert writes(emb) == 2  # only the new text

    clock.advance(49.0)
    emb.embed_query("what is RAG?")
    assert writes(emb) == 2
    clock.advance(2.0)  # past half the TTL: refreshed, so it never lapses while in use
    emb.embed_query("what is RAG?")
    assert writes(emb) == 3
    clock.advance(60.0)  # 60 s after the refresh, 111 s after the first write
    model.down = True
    served = emb.embed_query("what is RAG?")
    assert served == pytest.approx(first, rel=1e-6)  # float32 in the cache
    assert emb.last_result is not None and emb.last_result.degraded
    age = emb.last_result.metadata()["age_s"]
    assert 60.0 <= age < 70.0  # the refreshed vector (plus the retries' backoff)


def test_an_expired_vector_is_written_again(clock: FakeClock) -> None:
    model = Switchable()
    emb = wrap(model, cache_ttl=10.0)
    emb.embed_query("q")
    clock.advance(11.0)  # expired: the check finds nothing
    emb.embed_query("q")
    assert writes(emb) == 2


def test_without_a_ttl_vectors_are_refreshed_hourly(clock: FakeClock) -> None:
    emb = wrap(Switchable(), cache_ttl=None)
    emb.embed_query("q")
    clock.advance(3599.0)
    emb.embed_query("q")
    assert writes(emb) == 1
    clock.advance(2.0)
    emb.embed_query("q")
    assert writes(emb) == 2


def test_a_shared_store_is_written_every_time(clock: FakeClock, tmp_path: Path) -> None:
    """Checking a shared store first would cost a round trip of its own."""
    store = SQLiteStore(tmp_path / "state.db")
    emb = wrap(Switchable(), store=store)
    for _ in range(3):
        emb.embed_query("q")
    assert writes(emb) == 3


class AsyncSwitchable(Switchable):
    async def aembed_query(self, text: str) -> list[float]:
        return self.embed_query(text)


async def test_async_query_is_served_from_the_kept_vector_in_an_outage(clock: FakeClock) -> None:
    model = AsyncSwitchable()
    emb = wrap(model)
    live = await emb.aembed_query("what is RAG?")
    assert await emb.aembed_query("what is RAG?") == live and writes(emb) == 1
    model.down = True
    clock.advance(5.0)
    assert await emb.aembed_query("what is RAG?") == pytest.approx(live, rel=1e-6)
    assert emb.last_result is not None and emb.last_result.sources == {"cache": 1}
    with pytest.raises(ConnectionError) as info:
        await emb.aembed_query("never embedded")  # vectors are never invented
    assert any("no cached vector" in note for note in info.value.__notes__)
