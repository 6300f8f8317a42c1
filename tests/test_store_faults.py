"""Shared state under faults (issue 17): bad values, stalls, cancellations, bursts.

Every test runs its own redis-server on a free port (tests/_redis_server.py), so it may
write garbage, `DEBUG SLEEP`, flush or kill it without touching anyone else's Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis_server import RedisServer, own_redis
from rag_resilience import breaker as breaker_mod
from rag_resilience.breaker import CircuitBreaker
from rag_resilience.stores.redis import RedisStore

pytestmark = pytest.mark.enable_socket

KEY = "p:kv:rag_resilience:chat:breaker"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from own_redis(tmp_path)


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "rag_resilience" and r.levelno >= logging.WARNING
    ]


def _boom() -> str:
    raise ConnectionError("upstream down")


async def _answer() -> str:
    return "answer"


# -- item 4: a bad value is absent, logged once, overwritten; never an error -----------


@pytest.mark.parametrize(
    "garbage",
    [b"\x80garbage{", b'{"s":"open","f":"x"}', b'"closed"', b'{"s":"sideways"}', b"[1,2"],
    ids=["not-utf8", "bad-field", "not-an-object", "unknown-state", "truncated"],
)
def test_bad_breaker_value_is_read_as_absent_and_overwritten(
    redis_server: RedisServer,
    raw: Any,
    garbage: bytes,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(breaker_mod, "_bad_record_logged", False, raising=False)
    caplog.set_level(logging.INFO, logger="rag_resilience")
    store = RedisStore(redis_server.url, prefix="p")
    breaker = CircuitBreaker(3, 30.0, name="chat", store=store)
    raw.set(KEY, garbage)
    for _ in range(5):  # a healthy upstream: every call goes through
        assert breaker.call(lambda: "answer") == "answer"
    assert asyncio.run(breaker.acall(_answer)) == "answer"
    assert breaker.get_state().value == "closed"
    assert not store.degraded and store.counters["faults"] == 0
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "unreadable" in warnings[0], warnings
    # the next write replaces the bad value with a valid record
    with pytest.raises(ConnectionError):
        breaker.call(_boom)
    assert json.loads(raw.get(KEY))["f"] == 1
    assert breaker.failure_count == 1
    store.close()


def test_wrong_type_key_is_replaced_not_an_outage(
    redis_server: RedisServer, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A list where the breaker's string should be: before, WRONGTYPE flipped the whole
    store to local state for retry_interval, over and over."""
    caplog.set_level(logging.INFO, logger="rag_resilience")
    store = RedisStore(redis_server.url, prefix="p", retry_interval=1.0)
    breaker = CircuitBreaker(3, 30.0, name="chat", store=store)
    raw.rpush(KEY, "x")
    raw.rpush("p:lease:{rag_resilience:llm:limit}", "x")
    raw.set("p:cache:{ns}:lru", "x")
    assert breaker.call(lambda: "answer") == "answer"
    with pytest.raises(ConnectionError):
        breaker.call(_boom)
    assert json.loads(raw.get(KEY))["f"] == 1
    assert store.lease_acquire("rag_resilience:llm:limit", "t", 1, 5.0, 1.0)
    assert raw.zcard("p:lease:{rag_resilience:llm:limit}") == 1
    store.cache_set("ns", "k", "v", stored_at=1.0, ttl=None, max_entries=5)
    assert store.cache_get("ns", "k", 2.0) == ("v", 1.0)
    assert not store.degraded
    counters = store.counters
    assert counters["faults"] == 0 and counters["outages"] == 0
    assert counters["bad_values"] >= 3 and counters["remote_ops"] >= 5
    store.close()


def test_unreadable_cache_entry_is_a_miss(redis_server: RedisServer, raw: Any) -> None:
    store = RedisStore(redis_server.url, prefix="p")
    store.cache_set("ns", "k", "v", stored_at=1.0, ttl=None, max_entries=5)
    raw.hset("p:cache:{ns}:e:k", mapping={"v": b"\x80{", "t": "1.0"})
    assert store.cache_get("ns", "k", 2.0) is None
    store.cache_set("ns", "k", "v2", stored_at=3.0, ttl=None, max_entries=5)
    assert store.cache_get("ns", "k", 4.0) == ("v2", 3.0)
    assert not store.degraded and store.counters["bad_values"] == 1
    store.close()
