"""RedisStore specifics: key layout, round trips, clients, and fault tolerance.

Talks to a real Redis (REDIS_URL, default redis://127.0.0.1:6379/0) under a unique key
prefix per test; skipped locally and failed under CI when none answers. The outage
tests need no shared server: they use a closed port, a socket that never answers, or
their own `redis-server` process they kill and restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis_server import RedisServer, free_port, own_redis
from rag_resilience.breaker import CircuitBreaker
from rag_resilience.stores.redis import RedisStore

pytestmark = pytest.mark.enable_socket

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        reason = f"no Redis at {REDIS_URL} ({exc}); set REDIS_URL or start redis-server"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    finally:
        client.close()


@pytest.fixture
def raw() -> Iterator[Any]:
    """A plain client on the test Redis."""
    import redis

    require_redis()
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def prefix(raw: Any) -> Iterator[str]:
    """A unique key prefix, purged afterwards."""
    p = f"rr-test-{uuid.uuid4().hex[:12]}"
    yield p
    keys = list(raw.scan_iter(match=f"{p}:*", count=1000))
    if keys:
        raw.delete(*keys)


def counting_client(url: str) -> Any:
    """A redis.Redis that records the name of every command it sends."""
    import redis

    class Counting(redis.Redis):  # type: ignore[type-arg]
        commands: list[str]

        def execute_command(self, *args: Any, **options: Any) -> Any:
            self.commands.append(str(args[0]).upper())
            return super().execute_command(*args, **options)

    client = Counting.from_url(url)
    client.commands = []
    return client


# -- construction --------------------------------------------------------------------


def test_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"pip install rag-resilience\[redis\]"):
        RedisStore("redis://127.0.0.1:6379/0")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({}, "url"),
        ({"url": "redis://x", "op_timeout": 0}, "op_timeout"),
        ({"url": "redis://x", "retry_interval": -1}, "retry_interval"),
        ({"url": "redis://x", "prefix": ""}, "prefix"),
    ],
)
def test_invalid_configuration(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(ValueError, match=param):
        RedisStore(**kwargs)


# -- layout and round trips ----------------------------------------------------------


def test_keys_are_namespaced_and_values_are_json(raw: Any, prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, op_timeout=5.0)
    store.set("breaker:chat", {"s": "open"})
    store.cache_set("answers", "q1", {"text": "hi"}, stored_at=10.0, ttl=30.0, max_entries=5)
    store.lease_acquire("limit:chat", "tok", 2, 5.0, time.time())
    keys = sorted(k.decode() for k in raw.scan_iter(match=f"{prefix}:*"))
    assert keys == [
        f"{prefix}:cache:{{answers}}:e:q1",
        f"{prefix}:cache:{{answers}}:lru",
        f"{prefix}:cache:{{answers}}:seq",
        f"{prefix}:kv:breaker:chat",
        f"{prefix}:lease:{{limit:chat}}",
    ]
    assert json.loads(raw.get(f"{prefix}:kv:breaker:chat")) == {"s": "open"}
    entry = raw.hgetall(f"{prefix}:cache:{{answers}}:e:q1")
    assert json.loads(entry[b"v"]) == {"text": "hi"}
    assert float(entry[b"t"]) == 10.0 and float(entry[b"e"]) == 40.0
    # cache entries carry a native TTL too; lease keys expire once every holder is gone
    assert 29_000 < raw.pttl(f"{prefix}:cache:{{answers}}:e:q1") <= 30_000
    assert 60_000 < raw.pttl(f"{prefix}:lease:{{limit:chat}}") <= 65_000
    # kv TTL is native
    store.set("short", 1, ttl=5.0)
    assert 4_000 < raw.pttl(f"{prefix}:kv:short") <= 5_000
    store.close()


def test_round_trips_per_operation(prefix: str) -> None:
    """update costs one GET when nothing changes and GET + one script when it does;
    cache and lease operations are one script each."""
    client = counting_client(REDIS_URL)
    store = RedisStore(client=client, prefix=prefix)
    store.set("k", {"n": 1})
    client.commands.clear()
    assert store.update("k", lambda v: (v, "same")) == "same"
    assert client.commands == ["GET"]
    client.commands.clear()
    assert store.update("k", lambda v: ({"n": v["n"] + 1}, "bumped")) == "bumped"
    assert client.commands == ["GET", "EVALSHA"]
    assert store.get("k") == {"n": 2}
    for op in (
        lambda: store.cache_set("ns", "a", 1, stored_at=1.0, ttl=None, max_entries=3),
        lambda: store.cache_get("ns", "a", 1.0),
        lambda: store.lease_acquire("l", "t", 1, 5.0, 1.0),
    ):
        client.commands.clear()
        op()
        assert client.commands == ["EVALSHA"]
    store.close()
    client.close()


def test_shared_breaker_success_path_is_one_round_trip(prefix: str) -> None:
    """Without the local view (view_ttl=None): one GET per protected call."""
    client = counting_client(REDIS_URL)
    store = RedisStore(client=client, prefix=prefix, view_ttl=None)
    breaker = CircuitBreaker(3, 30.0, name="chat", store=store)
    for _ in range(5):
        client.commands.clear()
        assert breaker.call(lambda: "ok") == "ok"
        assert client.commands == ["GET"]
    client.close()


def test_closed_shared_breaker_reads_redis_once_per_view_ttl(prefix: str) -> None:
    """With the local view, a closed healthy breaker costs one GET per view_ttl per
    process (a long view_ttl here: one GET for 200 calls), and its own trip is seen at
    once (writes go through the view)."""
    client = counting_client(REDIS_URL)
    store = RedisStore(client=client, prefix=prefix, view_ttl=60.0)
    breaker = CircuitBreaker(1, 30.0, name="chat", store=store)
    for _ in range(200):
        assert breaker.call(lambda: "ok") == "ok"
    assert client.commands == ["GET"]
    with pytest.raises(ConnectionError):
        breaker.call(_down)
    assert breaker.get_state().value == "open"
    client.close()


def _down() -> None:
    raise ConnectionError("upstream down")


def test_update_conflicts_retry_with_fresh_value(raw: Any, prefix: str) -> None:
    """Another writer changes the key between our read and our write: fn runs again
    on the new value and nothing is lost."""
    store = RedisStore(REDIS_URL, prefix=prefix, op_timeout=5.0)
    store.set("n", 0)
    calls: list[Any] = []

    def fn(current: Any) -> tuple[int, int]:
        calls.append(current)
        if len(calls) == 1:
            raw.set(f"{prefix}:kv:n", "41")  # the concurrent writer
        return current + 1, current + 1

    assert store.update("n", fn) == 42
    assert calls == [0, 41]
    assert store.get("n") == 42
    store.close()


def test_scripts_reload_after_script_flush(raw: Any, prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix, op_timeout=5.0)
    store.cache_set("ns", "a", "A", stored_at=1.0, ttl=None, max_entries=None)
    raw.script_flush()
    assert store.cache_get("ns", "a", 2.0) == ("A", 1.0)
    assert not store.degraded and store.counters["faults"] == 0
    store.close()


def test_client_with_decoded_responses(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    store = RedisStore(client=client, prefix=prefix)
    store.set("k", [1, "two"])
    assert store.get("k") == [1, "two"]
    assert store.update("k", lambda v: ([*v, 3], len(v))) == 2
    store.cache_set("ns", "a", {"x": 1}, stored_at=3.5, ttl=None, max_entries=1)
    assert store.cache_get("ns", "a", 4.0) == ({"x": 1}, 3.5)
    store.close()  # a client passed in stays open: it belongs to the caller
    assert client.ping()
    client.close()


def test_async_client_per_event_loop(prefix: str) -> None:
    """One store used from several event loops (e.g. asyncio.run per request batch)."""
    store = RedisStore(REDIS_URL, prefix=prefix, op_timeout=5.0)

    async def bump() -> int:
        try:
            result: int = await store.aupdate("n", lambda v: ((v or 0) + 1, (v or 0) + 1))
            return result
        finally:
            await store.aclose()

    assert [asyncio.run(bump()) for _ in range(3)] == [1, 2, 3]
    assert store.get("n") == 3
    assert store.counters["faults"] == 0
    store.close()


async def test_async_twins_use_the_sync_client_when_no_async_client(prefix: str) -> None:
    client = counting_client(REDIS_URL)
    store = RedisStore(client=client, prefix=prefix)
    await store.aset("k", 1)
    assert await store.aupdate("k", lambda v: (v + 1, v + 1)) == 2
    assert await store.aget("k") == 2
    assert "EVALSHA" in client.commands
    client.close()


async def test_async_client_only(prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Async ops share state through the given client; sync ops cannot reach Redis
    without a sync client, so they run locally and say so once."""
    import redis.asyncio

    caplog.set_level(logging.INFO, logger="rag_resilience")
    aclient = redis.asyncio.Redis.from_url(REDIS_URL)
    store = RedisStore(async_client=aclient, prefix=prefix)
    await store.aset("k", {"shared": True})
    assert json.loads(await aclient.get(f"{prefix}:kv:k")) == {"shared": True}
    store.set("local", 1)
    store.set("local", 2)
    assert store.get("local") == 2
    assert await store.aget("local") is None  # never reached Redis
    assert not store.degraded
    assert len(_warnings(caplog)) == 1 and "no sync client" in _warnings(caplog)[0]
    await store.aclose()
    await aclient.aclose()


# -- faults --------------------------------------------------------------------------


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "rag_resilience" and r.levelno == logging.WARNING
    ]


def test_unreachable_redis_serves_locally_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="rag_resilience")
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", retry_interval=0.02)
    start = time.perf_counter()
    store.set("k", {"v": 1})
    assert store.get("k") == {"v": 1}
    assert store.update("n", lambda v: ((v or 0) + 1, "ok")) == "ok"
    store.cache_set("ns", "a", "A", stored_at=1.0, ttl=None, max_entries=2)
    assert store.cache_get("ns", "a", 2.0) == ("A", 1.0)
    assert store.lease_acquire("l", "t", 1, 5.0, 1.0)
    assert not store.lease_acquire("l", "u", 1, 5.0, 1.0)
    time.sleep(0.03)  # past retry_interval: the next op starts a background probe
    assert store.get("n") == 1
    assert time.perf_counter() - start < 1.0
    assert store.degraded
    deadline = time.monotonic() + 10.0
    while store.counters["probes"] < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    counters = store.counters
    # the probe is a PING in the background, never a user operation
    assert counters["outages"] == 1 and counters["faults"] == 1 and counters["probes"] >= 1
    assert counters["remote_ops"] == 0 and counters["local_ops"] == 8
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "local in-process state" in warnings[0]
    store.close()


async def test_async_unreachable_redis_serves_locally(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rag_resilience")
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    await store.aset("k", 1)
    assert await store.aupdate("k", lambda v: (v + 1, v + 1)) == 2
    assert await store.acache_get("ns", "missing", 1.0) is None
    assert await store.alease_acquire("l", "t", 1, 5.0, 1.0)
    assert store.degraded and len(_warnings(caplog)) == 1
    await store.aclose()


def test_hung_redis_costs_one_op_timeout_then_is_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server that accepts connections but never answers: the first op gives up after
    op_timeout, the following ones skip Redis for retry_interval and take microseconds."""
    caplog.set_level(logging.INFO, logger="rag_resilience")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)  # the kernel completes handshakes; nothing ever replies
        port = server.getsockname()[1]
        store = RedisStore(f"redis://127.0.0.1:{port}/0", op_timeout=0.05, retry_interval=5.0)
        start = time.perf_counter()
        store.set("k", 1)
        first = time.perf_counter() - start
        assert 0.04 <= first < 2.0  # op_timeout, far from hanging (generous under load)
        start = time.perf_counter()
        for _ in range(50):
            assert store.update("k", lambda v: (v + 1, None)) is None
        assert time.perf_counter() - start < 2.0  # vs 50 x op_timeout = 2.5 s if not skipped
        assert store.get("k") == 51
        # the first timeout is checked by a PING on a connection of its own (a burst is
        # not an outage); meanwhile operations skip Redis, then the outage is declared
        deadline = time.monotonic() + 5.0
        while not store.degraded:
            assert time.monotonic() < deadline, "the stall check never concluded"
            time.sleep(0.01)
        assert store.counters["faults"] == 1
        assert len(_warnings(caplog)) == 1
        store.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from own_redis(tmp_path)


def test_redis_killed_and_restarted_mid_run(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas share state; Redis dies: every user call keeps working on local
    state within op_timeout and each replica warns once; Redis returns: shared state
    resumes and each replica logs 'redis back'."""
    caplog.set_level(logging.INFO, logger="rag_resilience")
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    a = RedisStore(url, op_timeout=0.1, retry_interval=0.05)
    b = RedisStore(url, op_timeout=0.1, retry_interval=0.05)
    breaker_a = CircuitBreaker(3, 30.0, name="chat", store=a)
    breaker_b = CircuitBreaker(3, 30.0, name="chat", store=b)

    def user_call(breaker: CircuitBreaker) -> str:
        return breaker.call(lambda: "answer")

    # shared while Redis is up: a replica's write is visible to the other
    a.set("config", {"v": 1})
    assert b.get("config") == {"v": 1}
    assert user_call(breaker_a) == user_call(breaker_b) == "answer"

    redis_server.kill()
    latencies: list[float] = []
    for i in range(40):
        for store, breaker in ((a, breaker_a), (b, breaker_b)):
            start = time.perf_counter()
            assert user_call(breaker) == "answer"
            store.update("hits", lambda v: ((v or 0) + 1, None))
            store.cache_set("ns", f"q{i}", i, stored_at=float(i), ttl=None, max_entries=10)
            latencies.append(time.perf_counter() - start)
        if i % 10 == 0:
            time.sleep(0.06)  # let retry_interval pass: probes hit the dead Redis
    assert max(latencies) < 2.0  # each op gives up within op_timeout (0.1 s), never hangs
    assert a.degraded and b.degraded
    assert a.get("hits") == 40 and b.get("hits") == 40  # local state, per replica
    assert a.counters["outages"] == b.counters["outages"] == 1
    assert len(_warnings(caplog)) == 2  # one per replica per outage

    redis_server.start()  # same port, empty dataset
    deadline = time.monotonic() + 5.0
    while a.degraded or b.degraded:  # each store's background probe, one per retry_interval
        a.get("probe"), b.get("probe")
        assert time.monotonic() < deadline, "no probe saw Redis back"
        time.sleep(0.01)
    a.set("config", {"v": 2})
    while b.get("config") != {"v": 2}:  # b probes once per retry_interval
        assert time.monotonic() < deadline, "shared state did not resume"
        time.sleep(0.01)
    assert not a.degraded and not b.degraded
    assert a.update("hits", lambda v: ((v or 0) + 1, None)) is None
    assert b.get("hits") == 1  # fresh shared counter in Redis, not b's local 40
    assert a.counters["recoveries"] == b.counters["recoveries"] == 1
    back = [r.getMessage() for r in caplog.records if "redis back" in r.getMessage()]
    assert len(back) == 2
    assert user_call(breaker_a) == "answer"
    a.close()
    b.close()
