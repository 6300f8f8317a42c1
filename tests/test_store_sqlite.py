"""SQLiteStore specifics beyond the shared contract: WAL, persistence, locking, cleanup."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from rag_resilience.stores import SQLiteStore


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        SQLiteStore(tmp_path / "s.db", timeout=0)


def test_missing_directory_serves_locally_and_names_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: sqlite3.OperationalError at construction. Now calls go on (issue 17)."""
    caplog.set_level(logging.WARNING, logger="rag_resilience")
    path = tmp_path / "no-such-dir" / "s.db"
    store = SQLiteStore(path, retry_interval=0.0)
    store.set("k", 1)
    assert store.get("k") == 1
    assert store.update("k", lambda v: (v + 1, "ok")) == "ok"
    assert store.degraded and store.counters["outages"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "rag_resilience"]
    assert len(warnings) == 1 and str(path) in warnings[0]
    path.parent.mkdir()  # the directory appears: the next probe uses the file
    store.set("k", 5)
    assert not store.degraded and SQLiteStore(path).get("k") == 5


def test_uses_wal_and_json_text(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    store.set("k", {"a": [1, 2]})
    store.cache_set("ns", "q", {"answer": "x"}, stored_at=5.0, ttl=None, max_entries=None)
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT value FROM kv WHERE key='k'").fetchone()[0] == '{"a":[1,2]}'
        assert raw.execute("SELECT value FROM cache").fetchone()[0] == '{"answer":"x"}'
    finally:
        raw.close()
        store.close()


def test_state_survives_reopen_with_original_stored_at(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = SQLiteStore(path)
    first.set("breaker", {"s": "open", "ou": 1234.5})
    first.cache_set("answers", "q1", "Paris", stored_at=1000.0, ttl=3600.0, max_entries=10)
    assert first.lease_acquire("lim", "tok", 1, 60.0, 1000.0)
    first.close()
    first.close()

    second = SQLiteStore(path)
    try:
        assert second.get("breaker") == {"s": "open", "ou": 1234.5}
        value, stored_at = second.cache_get("answers", "q1", 1900.0) or (None, None)
        assert (value, stored_at) == ("Paris", 1000.0)  # true age: 900 s
        assert second.lease_count("lim", 1001.0) == 1
        assert not second.lease_acquire("lim", "other", 1, 60.0, 1001.0)
    finally:
        second.close()


def test_use_after_close_reopens(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    store.set("k", 1)
    store.close()
    assert store.get("k") == 1
    store.close()


def test_lru_order_is_shared_between_connections(tmp_path: Path) -> None:
    """Recency is kept in the file, so a read through one connection protects the
    entry from eviction by another connection's write."""
    a, b = SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")
    try:
        a.cache_set("ns", "old", 1, stored_at=1.0, ttl=None, max_entries=2)
        a.cache_set("ns", "new", 2, stored_at=2.0, ttl=None, max_entries=2)
        assert b.cache_get("ns", "old", 3.0) == (1, 1.0)
        a.cache_set("ns", "third", 3, stored_at=3.0, ttl=None, max_entries=2)
        assert b.cache_get("ns", "new", 3.0) is None
        assert b.cache_get("ns", "old", 3.0) == (1, 1.0)
        assert a.cache_len("ns", 3.0) == 2
    finally:
        a.close()
        b.close()


def test_expired_kv_rows_are_swept_on_write(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    try:
        for i in range(5):
            store.set(f"gone{i}", i, ttl=0.01)
        time.sleep(0.03)
        store.set("keep", 1)
        raw = sqlite3.connect(path)
        try:
            assert [r[0] for r in raw.execute("SELECT key FROM kv")] == ["keep"]
        finally:
            raw.close()
    finally:
        store.close()


def test_write_waits_for_another_connections_transaction(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE: a writer waits for the lock (up to `timeout`), then proceeds."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, timeout=2.0)
    store.set("n", 0)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE kv SET value='100' WHERE key='n'")
    done = threading.Event()
    result: list[int] = []

    def increment() -> None:
        result.append(store.update("n", lambda v: (v + 1, v + 1)))
        done.set()

    t = threading.Thread(target=increment)
    t.start()
    time.sleep(0.05)
    assert not done.is_set()  # blocked by the other transaction
    other.execute("COMMIT")
    t.join(2.0)
    assert result == [101]  # it read the committed value, not a stale one
    other.close()
    store.close()


def test_write_gives_up_after_timeout_and_serves_locally(tmp_path: Path) -> None:
    """A write lock held by another process costs one `timeout`, then that operation is
    served locally (busy, not an outage): before, it raised after `timeout`."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, timeout=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        start = time.perf_counter()
        assert store.update("k", lambda v: ((v or 0) + 1, "ok")) == "ok"
        assert time.perf_counter() - start < 3.0  # not sqlite's default 5 s busy wait
        assert store.counters["busy"] == 1 and not store.degraded
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.set("k", 1)  # the failed transaction left nothing behind
    assert store.get("k") == 1
    store.close()


def test_store_is_lazy_exported() -> None:
    import rag_resilience.stores as stores

    assert stores.SQLiteStore is SQLiteStore
    assert SQLiteStore.shared is True


def _corrupt(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists():
            p.write_bytes(b"\x00garbage, not a database\xff" * 512)


def test_file_corrupted_mid_run_calls_go_on_and_errors_name_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: every call raised sqlite3.DatabaseError from before_call, even calls with
    no cache key to a healthy upstream."""
    from rag_resilience.breaker import CircuitBreaker
    from rag_resilience.fallback import GracefulFallbacks
    from rag_resilience.policy import ResiliencePolicy

    caplog.set_level(logging.WARNING, logger="rag_resilience")
    path = tmp_path / "state.db"
    store = SQLiteStore(path, retry_interval=0.0)
    policy = ResiliencePolicy(
        breaker=CircuitBreaker(3, 30.0, name="chat", store=store),
        fallbacks=GracefulFallbacks(name="rag", store=store),
    )
    assert policy.run(lambda: "answer").value == "answer"
    assert policy.run(lambda q: "Paris", "capital?", key="capital?").value == "Paris"
    store.close()  # drop the open connection's cache: the next op reads the bad file
    _corrupt(path)
    for _ in range(3):
        assert policy.run(lambda: "answer").value == "answer"
        assert policy.run(lambda q: "Rome", "capital?", key="capital?").value == "Rome"
    assert store.degraded and store.counters["outages"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "rag_resilience"]
    assert warnings and all(str(path) in w for w in warnings)
    assert "DatabaseError" in warnings[0]


def test_unreadable_values_in_the_file_are_absent(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    store.set("k", {"a": 1})
    store.cache_set("ns", "q", "A", stored_at=1.0, ttl=None, max_entries=5)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("UPDATE kv SET value = 'not json{' WHERE key = 'k'")
    other.execute("UPDATE cache SET value = '{bad' WHERE key = 'q'")
    other.close()
    assert store.get("k") is None
    assert store.cache_get("ns", "q", 2.0) is None
    assert store.update("k", lambda v: ({"a": 2}, v)) is None  # overwritten
    assert store.get("k") == {"a": 2}
    assert store.counters["bad_values"] == 3 and not store.degraded


def test_read_only_database_calls_go_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A read-only file (emulated with query_only: chmod does not stop root) fails every
    write: the calls go on from local state, the warning names the file."""
    from rag_resilience.breaker import CircuitBreaker

    caplog.set_level(logging.WARNING, logger="rag_resilience")
    path = tmp_path / "ro.db"
    store = SQLiteStore(path, retry_interval=60.0)
    breaker = CircuitBreaker(2, 30.0, name="chat", store=store)
    with store._lock:
        store._connection().execute("PRAGMA query_only=ON")
    for _ in range(3):
        with pytest.raises(ConnectionError):
            breaker.call(_fail)
    assert breaker.get_state().value == "open"  # counted locally
    assert store.degraded
    warnings = [r.getMessage() for r in caplog.records if "sqlite store" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0] and "readonly" in warnings[0]


def _fail() -> None:
    raise ConnectionError("upstream down")


def test_distributed_waiters_on_sqlite_are_served_in_arrival_order(tmp_path: Path) -> None:
    """Limit 1 shared through one file by two stores (two "processes"): threads waiting
    on either are granted in the order they queued. Before, SQLite had no waiter queue
    (lease_wait was lease_acquire): whichever poll came first after a release won."""
    import asyncio

    from rag_resilience.limits import ConcurrencyLimit

    path = tmp_path / "s.db"
    a = ConcurrencyLimit(1, max_waiting=10, wait_timeout=30.0, name="llm", store=SQLiteStore(path))
    b = ConcurrencyLimit(1, max_waiting=10, wait_timeout=30.0, name="llm", store=SQLiteStore(path))
    probe = sqlite3.connect(path)
    order: list[int] = []
    a.acquire()  # the holder

    def queued() -> int:
        return int(probe.execute("SELECT COUNT(*) FROM lease_waiters").fetchone()[0])

    def waiter(limit: ConcurrencyLimit, i: int) -> None:
        limit.acquire()
        order.append(i)
        limit.release()

    async def task_waiter(i: int) -> None:
        await b.aacquire()
        order.append(i)
        await b.arelease()

    async def scenario() -> None:
        threads: list[threading.Thread] = []
        tasks: list[asyncio.Task[None]] = []
        for i in range(6):
            if i % 3 == 2:
                tasks.append(asyncio.create_task(task_waiter(i)))
            else:
                threads.append(threading.Thread(target=waiter, args=((a, b)[i % 2], i)))
                threads[-1].start()
            deadline = time.monotonic() + 30.0
            while queued() != i + 1:
                assert time.monotonic() < deadline, f"waiter {i} never queued"
                await asyncio.sleep(0.005)
        a.release()
        await asyncio.gather(*tasks)
        await asyncio.to_thread(lambda: [t.join() for t in threads])

    asyncio.run(scenario())
    assert order == list(range(6))
    assert queued() == 0
    probe.close()
