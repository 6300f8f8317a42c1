"""SQLiteStore specifics beyond the shared contract: WAL, persistence, locking, cleanup."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from rag_resilience.stores import SQLiteStore


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        SQLiteStore(tmp_path / "s.db", timeout=0)


def test_bad_path_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        SQLiteStore(tmp_path / "no-such-dir" / "s.db")


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


def test_write_gives_up_after_timeout(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, timeout=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        start = time.perf_counter()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.set("k", 1)
        assert time.perf_counter() - start < 3.0  # not sqlite's default 5 s busy wait
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
