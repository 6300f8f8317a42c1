"""Buckets shared through Redis: two limiters (two processes' worth) pacing one upstream
get one sequence of slots from the Redis server's clock; Redis down -> local pacing.
Slots far apart (100 s) so the real clock moving between calls does not matter; nobody
sleeps: the tests read the waits each reservation was granted."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from rag_resilience.errors import RateLimitedError
from rag_resilience.ratelimit import PaceRequest, RateLimiter
from rag_resilience.stores.redis import RedisStore

pytestmark = pytest.mark.enable_socket

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
UP = PaceRequest("http://upstream/v1|m|k", 0)


@pytest.fixture
def prefix() -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"no Redis at {REDIS_URL}: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    p = f"rr-rl-test-{uuid.uuid4().hex[:12]}"
    yield p
    keys = list(client.scan_iter(match=f"{p}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def limiter(prefix: str, url: str = REDIS_URL, **kw: Any) -> RateLimiter:
    return RateLimiter(
        requests_per_second=0.01, store=RedisStore(url, prefix=prefix), max_wait=None, **kw
    )


def test_two_processes_share_one_sequence_of_slots(prefix: str) -> None:
    a, b = limiter(prefix), limiter(prefix)
    waits = [lim.reserve(UP)[0] for lim in (a, b, a, b)]
    assert waits == pytest.approx([0.0, 100.0, 200.0, 300.0], abs=5.0)
    assert a.stats()["paced"] == 1 and b.stats()["paced"] == 2


def test_a_slot_past_the_deadline_is_refused_and_reserves_nothing(prefix: str) -> None:
    a, b = limiter(prefix), limiter(prefix)
    a.reserve(UP)
    assert b.reserve(UP, max_wait=150.0)[0] == pytest.approx(100.0, abs=5.0)
    with pytest.raises(RateLimitedError) as info:
        a.reserve(UP, max_wait=150.0)  # its slot would be at 200 s
    assert info.value.wait == pytest.approx(200.0, abs=5.0)
    assert b.reserve(UP)[0] == pytest.approx(200.0, abs=5.0)  # the refused slot is free


def test_a_retry_after_seen_by_one_process_holds_back_the_others(prefix: str) -> None:
    a, b = limiter(prefix, max_retry_after=1000.0), limiter(prefix)
    a.reserve(UP)
    a.observe({"retry-after-ms": "500000"}, status=429, upstream=UP.upstream)
    assert b.reserve(UP)[0] == pytest.approx(500.0, abs=5.0)


def test_redis_down_paces_locally(prefix: str) -> None:
    dead = limiter(prefix, url="redis://127.0.0.1:1/0")
    waits = [dead.reserve(UP)[0] for _ in range(3)]
    assert waits == pytest.approx([0.0, 100.0, 200.0], abs=5.0)  # the local bucket
    assert dead.store is not None and dead.store.degraded


def test_only_redis_shares(tmp_path: Any) -> None:
    from rag_resilience.stores.sqlite import SQLiteStore

    assert RateLimiter(store=SQLiteStore(str(tmp_path / "s.db"))).store is None


def test_a_process_that_learned_nothing_is_paced_by_what_the_others_learned(
    prefix: str,
) -> None:
    told = limiter(prefix)
    fresh = RateLimiter(store=RedisStore(REDIS_URL, prefix=prefix), max_wait=None)
    told.reserve(UP)
    assert fresh.reserve(UP)[0] == pytest.approx(100.0, abs=5.0)
    assert told.reserve(UP)[0] == pytest.approx(200.0, abs=5.0)
