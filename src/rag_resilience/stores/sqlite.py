"""SQLite store: embedded and persistent, shared by the processes of one host.

Why SQLite: a single worker that restarts during an outage should still serve its
last-known-good answers, and several workers on one machine should share one circuit,
without running a server. The stdlib `sqlite3` module is enough.

* WAL journal, so readers never block the writer and a crash never corrupts the file.
* Every read-modify-write (`update`, `cache_get` which refreshes recency, `cache_set`,
  leases) runs in ``BEGIN IMMEDIATE``: the write lock is taken before reading, so two
  processes can never interleave a read and a write. Inside one process a lock
  serialises threads, which is cheaper than letting SQLite's busy handler spin.
* Values are JSON text; non-JSON values raise TypeError/ValueError before anything is
  written. Never pickle.
* Cache times (`stored_at`, `now`) are the caller's wall-clock seconds, so an entry read
  after a restart reports its true age. Key/value TTLs use `time.time()` for the same
  reason (monotonic clocks do not survive a process).
* LRU recency is a per-namespace sequence number, so it is exact even when callers
  pass equal or fake timestamps.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .. import _validate as _v
from .base import JSON, Store, UpdateFn
from .failover import Failover

__all__ = ["SQLiteStore"]

R = TypeVar("R")
T = TypeVar("T")

_SCHEMA_VERSION = 3
_WAITER_GONE_S = 1.0  # a lease_wait caller silent this long has left the queue
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS kv_expiry ON kv(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS cache (
    namespace   TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    stored_at   REAL NOT NULL,
    expires_at  REAL,
    last_access INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX IF NOT EXISTS cache_lru ON cache(namespace, last_access);
CREATE INDEX IF NOT EXISTS cache_expiry ON cache(namespace, expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS cache_ns (
    namespace TEXT PRIMARY KEY,
    entries   INTEGER NOT NULL,
    seq       INTEGER NOT NULL
);
INSERT OR IGNORE INTO cache_ns (namespace, entries, seq)
    SELECT namespace, COUNT(*), MAX(last_access) FROM cache GROUP BY namespace;
CREATE TABLE IF NOT EXISTS leases (
    key        TEXT NOT NULL,
    token      TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key, token)
);
CREATE TABLE IF NOT EXISTS lease_waiters (
    ticket INTEGER PRIMARY KEY AUTOINCREMENT,
    key    TEXT NOT NULL,
    token  TEXT NOT NULL,
    seen   REAL NOT NULL,
    UNIQUE (key, token)
);
"""


def dumps(value: Any) -> str:
    """JSON text for `value`; TypeError/ValueError if it is not JSON-serialisable."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class SQLiteStore(Store):
    """A `Store` in one SQLite file. Thread-safe; safe for several processes on one host.

    `timeout` is how long an operation waits for another process's write transaction
    (seconds); past it that one operation is served from process-local state (counted in
    ``counters["busy"]``), so a held lock never slows a call by more than `timeout`.
    A file that cannot be used (missing directory, corrupted, read-only) never fails a
    call either: a warning naming the file, then local in-process state, re-trying the
    file every `retry_interval` seconds (see `stores.failover`). Unreadable values are
    read as absent. Not for network filesystems: SQLite's locking needs a local disk.
    """

    shared = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 0.25,
        retry_interval: float = 1.0,
    ) -> None:
        _v.positive("timeout", timeout)
        _v.at_least("retry_interval", retry_interval, 0)
        self.path = os.fspath(path)
        self.timeout = float(timeout)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._health = Failover("sqlite", self, float(retry_interval))
        self._local = self._health.local
        try:
            with self._lock:
                self._connection()  # create the schema; a bad path warns and serves locally
        except sqlite3.Error as exc:
            self._failed(exc)

    @property
    def degraded(self) -> bool:
        """True while the file is unusable and operations use local state."""
        return self._health.degraded

    @property
    def counters(self) -> dict[str, int]:
        """Snapshot: remote_ops (file), local_ops, faults, outages, recoveries, busy,
        bad_values."""
        return self._health.snapshot()

    @property
    def last_error(self) -> BaseException | None:
        return self._health.last_error

    def _failed(self, exc: sqlite3.Error) -> None:
        text = str(exc)
        if "locked" in text or "busy" in text:
            self._health.on_busy(exc)
            return
        self._health.on_fault(exc)
        with self._lock:  # reopen on the next probe: the file may have been replaced
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def _guard(self, op: Callable[[], T], local: Callable[[], T]) -> T:
        """Run `op` on the file, or `local` if the file is down, busy or failing."""
        if not self._health.try_remote():
            return local()
        try:
            result = op()
        except sqlite3.Error as exc:
            self._failed(exc)
            return local()
        self._health.on_success()
        if self._health.pending:
            for key, token in self._health.take_pending():
                self.lease_release(key, token)
        return result

    def _loads(self, key: str, text: Any) -> Any:
        try:
            return json.loads(text)
        except (ValueError, TypeError) as exc:
            self._health.bad_value(key, exc)
            return None

    # -- the Store API: each operation on the file, or on local state (see _guard)
    def get(self, key: str) -> JSON | None:
        return self._guard(lambda: self._file_get(key), lambda: self._local.get(key))

    def set(self, key: str, value: JSON, ttl: float | None = None) -> None:
        text = dumps(value)  # a non-JSON value is the caller's error, on every path
        self._local.set(key, value, ttl)
        self._guard(lambda: self._file_set(key, text, ttl), lambda: None)

    def delete(self, key: str) -> None:
        self._local.delete(key)
        self._guard(lambda: self._file_delete(key), lambda: None)

    def update(self, key: str, fn: UpdateFn[R], ttl: float | None = None) -> R:
        return self._guard(
            lambda: self._file_update(key, fn, ttl), lambda: self._local.update(key, fn, ttl)
        )

    def cache_get(self, namespace: str, key: str, now: float) -> tuple[JSON, float] | None:
        return self._guard(
            lambda: self._file_cache_get(namespace, key, now),
            lambda: self._local.cache_get(namespace, key, now),
        )

    def cache_set(
        self,
        namespace: str,
        key: str,
        value: JSON,
        *,
        stored_at: float,
        ttl: float | None,
        max_entries: int | None,
    ) -> None:
        text = dumps(value)
        self._guard(
            lambda: self._file_cache_set(namespace, key, text, stored_at, ttl, max_entries),
            lambda: self._local.cache_set(
                namespace, key, value, stored_at=stored_at, ttl=ttl, max_entries=max_entries
            ),
        )

    def cache_delete(self, namespace: str, key: str) -> None:
        self._local.cache_delete(namespace, key)
        self._guard(lambda: self._file_cache_delete(namespace, key), lambda: None)

    def cache_clear(self, namespace: str) -> None:
        self._local.cache_clear(namespace)
        self._guard(lambda: self._file_cache_clear(namespace), lambda: None)

    def cache_len(self, namespace: str, now: float) -> int:
        return self._guard(
            lambda: self._file_cache_len(namespace, now),
            lambda: self._local.cache_len(namespace, now),
        )

    def lease_acquire(self, key: str, token: str, limit: int, lease_s: float, now: float) -> bool:
        return self._guard(
            lambda: self._file_lease_acquire(key, token, limit, lease_s, now),
            lambda: self._local.lease_acquire(key, token, limit, lease_s, now),
        )

    def lease_wait(self, key: str, token: str, limit: int, lease_s: float, now: float) -> bool:
        """First come, first served across processes, as RedisStore: a queue in the file."""
        return self._guard(
            lambda: self._file_lease_acquire(key, token, limit, lease_s, now, wait=True),
            lambda: self._local.lease_wait(key, token, limit, lease_s, now),
        )

    def lease_release(self, key: str, token: str) -> None:
        self._local.lease_release(key, token)  # it may have been granted locally
        self._guard(
            lambda: self._file_lease_release(key, token),
            lambda: self._health.defer_release(key, token),
        )

    def lease_count(self, key: str, now: float) -> int:
        return self._guard(
            lambda: self._file_lease_count(key, now),
            lambda: self._local.lease_count(key, now),
        )

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # -- connection ------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        # Called with self._lock held. A connection inherited through fork() must not be
        # used by the child, so reopen when the pid changes.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._retry_busy(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < _SCHEMA_VERSION:
                self._retry_busy(lambda: self._create_schema(conn))
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _retry_busy(self, op: Any) -> None:
        # Switching to WAL needs a moment of exclusive access; processes opening the same
        # new file at once can see "database is locked" even with a busy timeout.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                op()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._connection()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: the write lock is held from the first read."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # -- key/value -------------------------------------------------------------------
    def _kv_read(self, conn: sqlite3.Connection, key: str, now: float) -> Any:
        row = conn.execute(
            "SELECT value FROM kv WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)",
            (key, now),
        ).fetchone()
        value = None if row is None else self._loads(key, row[0])
        if value is None:  # mirrored: an op that must fall back starts from the last seen
            self._local.delete(key)
        else:
            self._local.set(key, value)
        return value

    @staticmethod
    def _kv_write(
        conn: sqlite3.Connection, key: str, text: str | None, ttl: float | None, now: float
    ) -> None:
        if text is None:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
        else:
            conn.execute(
                "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                (key, text, None if ttl is None else now + ttl),
            )
        # Expired rows are invisible to reads; sweep them on writes so the file stays small.
        conn.execute("DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))

    def _file_get(self, key: str) -> JSON | None:
        with self._read() as conn:
            return self._kv_read(conn, key, time.time())

    def _file_set(self, key: str, text: str, ttl: float | None = None) -> None:
        with self._write() as conn:
            self._kv_write(conn, key, text, ttl, time.time())

    def _file_delete(self, key: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))

    def _file_update(self, key: str, fn: UpdateFn[R], ttl: float | None = None) -> R:
        with self._write() as conn:
            now = time.time()
            new, result = fn(self._kv_read(conn, key, now))
            self._kv_write(conn, key, None if new is None else dumps(new), ttl, now)
            if new is None:
                self._local.delete(key)
            else:
                self._local.set(key, new)
            return result

    # -- bounded cache ---------------------------------------------------------------
    # `cache_ns` keeps each namespace's entry count and LRU sequence, so a write never
    # scans the namespace (COUNT(*) over 10k entries costs milliseconds).
    @staticmethod
    def _bump(conn: sqlite3.Connection, namespace: str, added: int) -> tuple[int, int]:
        """Advance the namespace's LRU sequence, adjust its count; (seq, entries)."""
        conn.execute(
            "INSERT OR IGNORE INTO cache_ns (namespace, entries, seq) VALUES (?, 0, 0)",
            (namespace,),
        )
        conn.execute(
            "UPDATE cache_ns SET seq = seq + 1, entries = entries + ? WHERE namespace = ?",
            (added, namespace),
        )
        seq, entries = conn.execute(
            "SELECT seq, entries FROM cache_ns WHERE namespace = ?", (namespace,)
        ).fetchone()
        return int(seq), int(entries)

    @staticmethod
    def _removed(conn: sqlite3.Connection, namespace: str, count: int) -> None:
        if count:
            conn.execute(
                "UPDATE cache_ns SET entries = entries - ? WHERE namespace = ?", (count, namespace)
            )

    def _file_cache_get(self, namespace: str, key: str, now: float) -> tuple[JSON, float] | None:
        with self._write() as conn:
            row = conn.execute(
                "SELECT value, stored_at, expires_at FROM cache WHERE namespace = ? AND key = ?",
                (namespace, key),
            ).fetchone()
            if row is None:
                return None
            text, stored_at, expires_at = row
            if expires_at is not None and now >= expires_at:
                conn.execute("DELETE FROM cache WHERE namespace = ? AND key = ?", (namespace, key))
                self._removed(conn, namespace, 1)
                return None
            seq, _ = self._bump(conn, namespace, 0)
            conn.execute(
                "UPDATE cache SET last_access = ? WHERE namespace = ? AND key = ?",
                (seq, namespace, key),
            )
            value = self._loads(f"{namespace}/{key}", text)
            return None if value is None else (value, float(stored_at))

    def _file_cache_set(
        self,
        namespace: str,
        key: str,
        text: str,
        stored_at: float,
        ttl: float | None,
        max_entries: int | None,
    ) -> None:
        with self._write() as conn:
            existed = conn.execute(
                "SELECT 1 FROM cache WHERE namespace = ? AND key = ?", (namespace, key)
            ).fetchone()
            seq, entries = self._bump(conn, namespace, 0 if existed else 1)
            conn.execute(
                "INSERT INTO cache (namespace, key, value, stored_at, expires_at, last_access)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (namespace, key) DO UPDATE SET"
                " value = excluded.value, stored_at = excluded.stored_at,"
                " expires_at = excluded.expires_at, last_access = excluded.last_access",
                (namespace, key, text, stored_at, None if ttl is None else stored_at + ttl, seq),
            )
            if max_entries is not None and entries > max(0, max_entries):
                cur = conn.execute(
                    "DELETE FROM cache WHERE rowid IN (SELECT rowid FROM cache"
                    " WHERE namespace = ? ORDER BY last_access LIMIT ?)",
                    (namespace, entries - max(0, max_entries)),
                )
                self._removed(conn, namespace, cur.rowcount)

    def _file_cache_delete(self, namespace: str, key: str) -> None:
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM cache WHERE namespace = ? AND key = ?", (namespace, key)
            )
            self._removed(conn, namespace, cur.rowcount)

    def _file_cache_clear(self, namespace: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM cache WHERE namespace = ?", (namespace,))
            conn.execute("DELETE FROM cache_ns WHERE namespace = ?", (namespace,))

    def _file_cache_len(self, namespace: str, now: float) -> int:
        with self._read() as conn:
            row = conn.execute(
                "SELECT entries FROM cache_ns WHERE namespace = ?", (namespace,)
            ).fetchone()
            if row is None:
                return 0
            (expired,) = conn.execute(
                "SELECT COUNT(*) FROM cache WHERE namespace = ?"
                " AND expires_at IS NOT NULL AND expires_at <= ?",
                (namespace, now),
            ).fetchone()
            return int(row[0]) - int(expired)

    # -- leases ----------------------------------------------------------------------
    def _file_lease_acquire(
        self, key: str, token: str, limit: int, lease_s: float, now: float, wait: bool = False
    ) -> bool:
        """Free permits go to the oldest waiters first (tickets in `lease_waiters`); a
        newcomer takes one only if more are free than wait. `wait` queues `token`."""
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE key = ? AND expires_at <= ?", (key, now))

            def grant() -> bool:
                conn.execute(
                    "INSERT OR REPLACE INTO leases (key, token, expires_at) VALUES (?, ?, ?)",
                    (key, token, now + lease_s),
                )
                conn.execute("DELETE FROM lease_waiters WHERE key = ? AND token = ?", (key, token))
                return True

            held = conn.execute(
                "SELECT 1 FROM leases WHERE key = ? AND token = ?", (key, token)
            ).fetchone()
            if held is not None:
                return grant()
            (count,) = conn.execute("SELECT COUNT(*) FROM leases WHERE key = ?", (key,)).fetchone()
            free = limit - int(count)
            conn.execute(
                "DELETE FROM lease_waiters WHERE key = ? AND seen < ?",
                (key, now - _WAITER_GONE_S),
            )
            row = conn.execute(
                "SELECT ticket FROM lease_waiters WHERE key = ? AND token = ?", (key, token)
            ).fetchone()
            if row is None:
                (waiting,) = conn.execute(
                    "SELECT COUNT(*) FROM lease_waiters WHERE key = ?", (key,)
                ).fetchone()
                if free > int(waiting):
                    return grant()
                if not wait:
                    return False
                ticket = conn.execute(
                    "INSERT INTO lease_waiters (key, token, seen) VALUES (?, ?, ?)",
                    (key, token, now),
                ).lastrowid
            else:
                ticket = row[0]
                conn.execute("UPDATE lease_waiters SET seen = ? WHERE ticket = ?", (now, ticket))
            (rank,) = conn.execute(
                "SELECT COUNT(*) FROM lease_waiters WHERE key = ? AND ticket < ?", (key, ticket)
            ).fetchone()
            return grant() if int(rank) < free else False

    def _file_lease_release(self, key: str, token: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE key = ? AND token = ?", (key, token))
            conn.execute("DELETE FROM lease_waiters WHERE key = ? AND token = ?", (key, token))

    def _file_lease_count(self, key: str, now: float) -> int:
        with self._read() as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM leases WHERE key = ? AND expires_at > ?", (key, now)
            ).fetchone()
            return int(count)
