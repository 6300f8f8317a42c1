"""benchmarks/faults.py charges each call the wall time it spent inside store operations:
once per operation, from sync and async calls, with a nested sync fallback not counted
twice (the "store ms" and "added by the store" columns rest on this)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis_server import RedisServer, own_redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import faults
finally:
    sys.path.pop(0)

pytestmark = pytest.mark.enable_socket


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from own_redis(tmp_path)


def _charged(run: Any) -> faults.Charge:
    charge = faults.Charge()
    token = faults._CALL.set(charge)
    try:
        run()
    finally:
        faults._CALL.reset(token)
    return charge


def test_sync_and_async_operations_are_timed_once_each(redis_server: RedisServer) -> None:
    store = faults.CountingStore(redis_server.url, prefix="t")
    try:
        sync = _charged(lambda: (store.set("k", 1), store.get("k")))
        both = _charged(lambda: asyncio.run(store.aset("k2", 2)))
        assert len(sync.op_s) == 2 and len(both.op_s) == 1
        for charge in (sync, both):
            assert charge.depth == 0 and charge.op_timeouts == charge.ops_degraded == 0
            assert 0 < charge.store_s == pytest.approx(sum(charge.op_s))
    finally:
        store.close()


def test_async_op_falling_back_to_sync_is_one_operation(redis_server: RedisServer) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    store = faults.CountingStore(client=client, prefix="t")  # no async client: _arun -> _run
    try:
        charge = _charged(lambda: asyncio.run(store.aset("k", 1)))
        assert len(charge.op_s) == 1 and charge.depth == 0 and charge.store_s > 0
    finally:
        store.close()
        client.close()
