"""One contract, every store: MemoryStore, SQLiteStore and RedisStore, sync and async.

Each test talks to the store through `Ops`, whose methods call either the sync method
or its async twin (``a<name>``; stores without a twin fall back to the sync method), so
the same assertions cover both paths.

Redis runs against a real server (REDIS_URL, default redis://127.0.0.1:6379/0) under a
unique key prefix per test, deleted afterwards. Unreachable Redis: skipped locally, a
failure under CI.

Documented difference: MemoryStore keeps values as given (any object, tuples stay
tuples); SQLite and Redis store JSON, so non-JSON values raise TypeError/ValueError and
tuples come back as lists.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rag_resilience.stores import MemoryStore, Store
from rag_resilience.stores.redis import RedisStore
from rag_resilience.stores.sqlite import SQLiteStore

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> None:
    """Skip (locally) or fail (under CI) when no Redis answers at REDIS_URL."""
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


def purge_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A factory for stores of the parametrised kind that share one backend per test."""
    kind: str = request.param
    made: list[Store] = []
    prefix = f"rr-test-{uuid.uuid4().hex[:12]}"
    memory = MemoryStore()
    if kind == "redis":
        require_redis()

    def make() -> Store:
        store: Store
        if kind == "memory":
            store = memory
        elif kind == "sqlite":
            store = SQLiteStore(tmp_path / "store.sqlite3")
        else:
            store = RedisStore(REDIS_URL, prefix=prefix, op_timeout=5.0)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()  # closes this event loop's async client too
        if isinstance(store, RedisStore):  # really tested Redis, not the local fallback
            assert store.counters["faults"] == 0, store.last_error
    if kind == "redis":
        purge_prefix(prefix)


class Ops:
    """Calls the store's sync methods, or their async twins when `use_async`."""

    def __init__(self, store: Store, use_async: bool) -> None:
        self.store = store
        self.use_async = use_async

    def __getattr__(self, name: str) -> Any:
        twin = getattr(self.store, "a" + name, None) if self.use_async else None
        method = getattr(self.store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if twin is not None:
                return await twin(*args, **kwargs)
            return method(*args, **kwargs)

        return call


KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("redis", id="redis", marks=pytest.mark.enable_socket),
]
MODES = [pytest.param(False, id="sync"), pytest.param(True, id="async")]

contract = pytest.mark.parametrize("make_store", KINDS, indirect=True)
modes = pytest.mark.parametrize("use_async", MODES)


@pytest.fixture
async def ops(make_store: Any, use_async: bool) -> AsyncIterator[Ops]:
    yield Ops(make_store(), use_async)


def kind_of(store: Store) -> str:
    return type(store).__name__


# -- key/value -----------------------------------------------------------------------


@contract
@modes
async def test_get_set_delete_roundtrip(ops: Ops) -> None:
    assert await ops.get("missing") is None
    values: list[Any] = [
        {"state": "open", "failures": 3, "opened_at": 1_700_000_000.123456},
        [1, 2.5, "x", True, None],
        "ünïcødé ✓",
        0,
        -7,
        1e-9,
        False,
    ]
    for i, value in enumerate(values):
        await ops.set(f"k{i}", value)
    for i, value in enumerate(values):
        got = await ops.get(f"k{i}")
        assert got == value and type(got) is type(value)
    await ops.set("k0", {"state": "closed"})
    assert await ops.get("k0") == {"state": "closed"}
    await ops.delete("k0")
    await ops.delete("k0")  # absent: no error
    assert await ops.get("k0") is None
    assert await ops.get("k1") == [1, 2.5, "x", True, None]


@contract
@modes
async def test_kv_ttl_expires(ops: Ops) -> None:
    await ops.set("short", "v", ttl=0.03)
    await ops.set("long", "v", ttl=30)
    await ops.set("forever", "v")
    assert await ops.get("short") == "v"
    time.sleep(0.06)  # kv TTLs are real time (they must hold across processes)
    assert await ops.get("short") is None
    assert await ops.get("long") == "v"
    assert await ops.get("forever") == "v"
    # update with ttl sets the expiry as well
    assert await ops.update("counter", lambda v: ((v or 0) + 1, "done"), ttl=0.03) == "done"
    assert await ops.get("counter") == 1
    time.sleep(0.06)
    assert await ops.get("counter") is None


@contract
@modes
async def test_update_returns_result_and_none_deletes(ops: Ops) -> None:
    seen: list[Any] = []

    def bump(current: Any) -> tuple[Any, str]:
        seen.append(current)
        state = dict(current or {"failures": 0})
        state["failures"] += 1
        return state, f"now {state['failures']}"

    assert await ops.update("breaker:x", bump) == "now 1"
    assert await ops.update("breaker:x", bump) == "now 2"
    assert await ops.get("breaker:x") == {"failures": 2}
    assert seen[0] is None and seen[-1] == {"failures": 1}
    # unchanged value: result returned, value kept
    assert await ops.update("breaker:x", lambda v: (v, v["failures"])) == 2
    assert await ops.get("breaker:x") == {"failures": 2}
    # None deletes
    assert await ops.update("breaker:x", lambda v: (None, "reset")) == "reset"
    assert await ops.get("breaker:x") is None
    # deleting an absent key is fine and fn sees None
    assert await ops.update("absent", lambda v: (None, v)) is None


@contract
@modes
async def test_update_fn_error_propagates_and_changes_nothing(ops: Ops) -> None:
    await ops.set("k", {"n": 1})
    calls: list[Any] = []

    # ConnectionError is an OSError: a Redis store must not mistake it for its own fault
    for error in (KeyError("from fn"), ConnectionError("the caller's, not Redis's")):

        def boom(current: Any, error: Exception = error) -> tuple[Any, None]:
            calls.append(current)
            raise error

        with pytest.raises(type(error)) as caught:
            await ops.update("k", boom)
        assert caught.value is error
    assert calls == [{"n": 1}, {"n": 1}]  # fn ran once each, never retried locally
    assert await ops.get("k") == {"n": 1}
    assert not getattr(ops.store, "degraded", False)


def _increment(current: Any) -> tuple[int, int]:
    new = (current or 0) + 1
    return new, new


@contract
@modes
async def test_update_is_atomic_under_concurrency(make_store: Any, use_async: bool) -> None:
    """16 writers (threads, or asyncio tasks) incrementing one key: the final count is
    exact, and every writer saw a distinct result (no two increments read one value)."""
    # async: all 16 tasks read, then race to write, so conflicts are O(tasks^2) per round
    workers, per_worker = 16, (10 if use_async else 25)
    results: list[int] = []
    lock = threading.Lock()
    if use_async:
        store = make_store()
        ops = Ops(store, True)

        async def task() -> None:
            for _ in range(per_worker):
                r = await ops.update("count", _increment)
                with lock:
                    results.append(r)

        await asyncio.gather(*(task() for _ in range(workers)))
    else:
        # Redis and SQLite: half the threads use a second store object (another
        # connection), as a second process would.
        stores = [make_store(), make_store()]
        store = stores[0]
        start = threading.Barrier(workers)

        def worker(i: int) -> None:
            mine = stores[i % 2]
            start.wait()
            for _ in range(per_worker):
                r = mine.update("count", _increment)
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    total = workers * per_worker
    assert store.get("count") == total
    assert sorted(results) == list(range(1, total + 1))


# -- bounded cache -------------------------------------------------------------------


@contract
@modes
async def test_cache_roundtrip_keeps_stored_at(ops: Ops) -> None:
    assert await ops.cache_get("ns", "q", 1000.0) is None
    answer = {"text": "Paris", "tokens": [1, 2, 3]}
    await ops.cache_set("ns", "q", answer, stored_at=990.25, ttl=None, max_entries=None)
    assert await ops.cache_get("ns", "q", 1_000_000.0) == (answer, 990.25)
    # overwrite replaces value and timestamp
    await ops.cache_set("ns", "q", "Lyon", stored_at=995.5, ttl=None, max_entries=None)
    assert await ops.cache_get("ns", "q", 1000.0) == ("Lyon", 995.5)
    # namespaces are separate
    assert await ops.cache_get("other", "q", 1000.0) is None
    assert await ops.cache_len("ns", 1000.0) == 1
    assert await ops.cache_len("other", 1000.0) == 0


@contract
@modes
async def test_cache_ttl_uses_callers_now(ops: Ops) -> None:
    await ops.cache_set("ns", "a", "A", stored_at=1000.0, ttl=10.0, max_entries=None)
    await ops.cache_set("ns", "b", "B", stored_at=1000.0, ttl=100.0, max_entries=None)
    await ops.cache_set("ns", "c", "C", stored_at=1000.0, ttl=None, max_entries=None)
    assert await ops.cache_len("ns", 1005.0) == 3
    assert await ops.cache_get("ns", "a", 1009.999) == ("A", 1000.0)
    assert await ops.cache_len("ns", 1010.0) == 2  # expired at stored_at + ttl exactly
    assert await ops.cache_get("ns", "a", 1010.0) is None
    assert await ops.cache_get("ns", "a", 1005.0) is None  # an expired read removed it
    assert await ops.cache_get("ns", "b", 1099.0) == ("B", 1000.0)
    assert await ops.cache_len("ns", 1100.0) == 1
    assert await ops.cache_get("ns", "c", 1e12) == ("C", 1000.0)


@contract
@modes
async def test_cache_lru_bound_and_recency_refresh(ops: Ops) -> None:
    now = 1000.0
    for key in ("a", "b", "c"):
        await ops.cache_set("ns", key, key.upper(), stored_at=now, ttl=None, max_entries=3)
    assert await ops.cache_len("ns", now) == 3
    assert await ops.cache_get("ns", "a", now) == ("A", now)  # a is now most recent
    await ops.cache_set("ns", "d", "D", stored_at=now, ttl=None, max_entries=3)
    # b was least recently used
    assert await ops.cache_get("ns", "b", now) is None
    assert await ops.cache_len("ns", now) == 3
    # re-setting an existing key refreshes it too and does not evict
    await ops.cache_set("ns", "c", "C2", stored_at=now, ttl=None, max_entries=3)
    assert await ops.cache_len("ns", now) == 3
    await ops.cache_set("ns", "e", "E", stored_at=now, ttl=None, max_entries=3)
    assert await ops.cache_get("ns", "a", now) is None
    for key, value in (("c", "C2"), ("d", "D"), ("e", "E")):
        assert await ops.cache_get("ns", key, now) == (value, now)
    # a smaller bound prunes down to it, oldest first
    await ops.cache_set("ns", "f", "F", stored_at=now, ttl=None, max_entries=2)
    assert await ops.cache_len("ns", now) == 2
    assert await ops.cache_get("ns", "e", now) == ("E", now)
    assert await ops.cache_get("ns", "f", now) == ("F", now)
    assert await ops.cache_get("ns", "c", now) is None


@contract
@modes
async def test_cache_delete_and_clear(ops: Ops) -> None:
    for key in ("a", "b"):
        await ops.cache_set("ns", key, key, stored_at=1.0, ttl=None, max_entries=None)
        await ops.cache_set("keep", key, key, stored_at=1.0, ttl=None, max_entries=None)
    await ops.cache_delete("ns", "a")
    await ops.cache_delete("ns", "a")  # absent: no error
    assert await ops.cache_get("ns", "a", 2.0) is None
    assert await ops.cache_len("ns", 2.0) == 1
    await ops.cache_clear("ns")
    assert await ops.cache_len("ns", 2.0) == 0
    assert await ops.cache_get("ns", "b", 2.0) is None
    assert await ops.cache_len("keep", 2.0) == 2
    # a cleared namespace works again, with a fresh LRU order
    await ops.cache_set("ns", "z", "Z", stored_at=3.0, ttl=None, max_entries=1)
    assert await ops.cache_get("ns", "z", 3.0) == ("Z", 3.0)


# -- leases --------------------------------------------------------------------------


@contract
@modes
async def test_leases_limit_renew_release_expire(ops: Ops) -> None:
    now = 1000.0
    assert await ops.lease_acquire("lim", "t1", 2, 10.0, now) is True
    assert await ops.lease_acquire("lim", "t2", 2, 10.0, now) is True
    assert await ops.lease_acquire("lim", "t3", 2, 10.0, now) is False  # limit respected
    assert await ops.lease_count("lim", now) == 2
    # renewing a held token takes no extra permit and extends its expiry
    assert await ops.lease_acquire("lim", "t1", 2, 10.0, now + 8) is True
    assert await ops.lease_count("lim", now + 8) == 2
    # at now+10 t2 expired (expiry is exclusive), t1 (renewed to now+18) still held
    assert await ops.lease_count("lim", now + 10) == 1
    assert await ops.lease_acquire("lim", "t3", 2, 10.0, now + 10) is True
    assert await ops.lease_acquire("lim", "t4", 2, 10.0, now + 10) is False
    # release frees a permit at once; releasing twice or an unknown token is fine
    await ops.lease_release("lim", "t1")
    await ops.lease_release("lim", "t1")
    await ops.lease_release("lim", "nobody")
    assert await ops.lease_count("lim", now + 10) == 1
    assert await ops.lease_acquire("lim", "t4", 2, 10.0, now + 10) is True
    # other keys are independent
    assert await ops.lease_acquire("other", "t1", 1, 10.0, now) is True
    assert await ops.lease_count("other", now) == 1
    # every lease expired: all permits free again
    assert await ops.lease_count("lim", now + 100) == 0
    for token in ("a", "b"):
        assert await ops.lease_acquire("lim", token, 2, 1.0, now + 100) is True
    assert await ops.lease_acquire("lim", "c", 2, 1.0, now + 100) is False


@contract
@modes
async def test_leases_concurrent_acquire_never_exceeds_limit(
    make_store: Any, use_async: bool
) -> None:
    store = make_store()
    ops = Ops(store, use_async)
    granted = await asyncio.gather(
        *(ops.lease_acquire("lim", f"t{i}", 5, 30.0, 1000.0) for i in range(20))
    )
    assert sum(granted) == 5
    assert store.lease_count("lim", 1000.0) == 5


# -- JSON only -----------------------------------------------------------------------


@contract
@modes
async def test_values_must_be_json(ops: Ops) -> None:
    """SQLite/Redis refuse non-JSON values before writing; memory keeps any object."""
    marker = object()
    if kind_of(ops.store) == "MemoryStore":
        await ops.set("obj", marker)
        assert await ops.get("obj") is marker
        await ops.set("tup", (1, 2))
        assert await ops.get("tup") == (1, 2)
        return
    for bad in (marker, {1, 2}, b"bytes"):
        with pytest.raises((TypeError, ValueError)):
            await ops.set("obj", bad)
        with pytest.raises((TypeError, ValueError)):
            await ops.cache_set("ns", "obj", bad, stored_at=1.0, ttl=None, max_entries=None)
        with pytest.raises((TypeError, ValueError)):
            await ops.update("obj", lambda v, bad=bad: (bad, None))
    assert await ops.get("obj") is None
    assert await ops.cache_len("ns", 1.0) == 0
    await ops.set("tup", (1, 2))
    assert await ops.get("tup") == [1, 2]  # JSON has no tuples


@contract
async def test_shared_flag_and_close(make_store: Any) -> None:
    store = make_store()
    assert store.shared is (kind_of(store) != "MemoryStore")
    store.close()
    store.close()  # idempotent
    await store.aclose()


def test_memory_cache_reads_take_no_lock_and_stay_consistent_under_writers() -> None:
    """MemoryStore reads the cache without its lock (every embedding checks it). Under
    writers that overwrite, evict (LRU bound), expire and clear, a read returns either
    nothing or a value that was written for that key, with its own stored_at: never an
    error, never another key's value, and it never deletes an entry rewritten meanwhile."""
    store = MemoryStore()
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            key = f"k{i % 40}"
            i += 1
            # the value names its key and its stored_at: readers check both
            store.cache_set(
                "ns", key, (key, float(i)), stored_at=float(i), ttl=50.0, max_entries=16
            )
            if i % 97 == 0:
                store.cache_delete("ns", key)
            if i % 1009 == 0 and w == 0:
                store.cache_clear("ns")

    def reader() -> None:
        try:
            for n in range(20_000):  # writers keep writing until every reader is done
                key = f"k{n % 40}"
                # some reads at a `now` past the ttl: the expiry path runs concurrently too
                now = float(n % 200)
                found = store.cache_get("ns", key, now)
                if found is not None:
                    seen.append(1)
                    (value_key, value_at), stored_at = found
                    assert value_key == key and value_at == stored_at
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in writers + readers:
        t.start()
    for t in readers:
        t.join(30)
    stop.set()
    for t in writers:
        t.join(5)
    assert not errors, errors
    assert seen  # reads did find entries while they were being rewritten and evicted

    # an expired entry read at the same time as its rewrite: the rewrite survives
    store.cache_set("ns", "x", "old", stored_at=0.0, ttl=1.0, max_entries=None)
    entries = store._caches["ns"]
    expired = entries["x"]
    store.cache_set("ns", "x", "new", stored_at=10.0, ttl=1.0, max_entries=None)
    store._expire(entries, "x", expired)  # the reader saw the old entry expire
    assert store.cache_get("ns", "x", 10.5) == ("new", 10.0)
