"""Shared state across real processes: one circuit, one limit, one cache for every replica.

Workers are separate Python processes (subprocess running a small script written to
tmp_path), so nothing is shared but the store. Redis tests use a real server
(REDIS_URL, default redis://127.0.0.1:6379/0) under a unique key prefix; skipped
locally and failed under CI when none answers.

The breaker test never waits for a real recovery: the workers read time from a shared
clock (a Redis key the test advances), and the test steps every phase through Redis
keys, so process start-up jitter and machine load cannot change the outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.stores import SQLiteStore
from rag_resilience.stores.redis import RedisStore

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

WORKER = r'''
import json, os, sys, threading, time
from rag_resilience.breaker import CircuitBreaker
from rag_resilience.errors import CircuitOpenError
from rag_resilience.limits import ConcurrencyLimit


def wait_key(raw, key, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not raw.exists(key):
        if time.monotonic() > deadline:
            raise TimeoutError(key)
        time.sleep(0.002)


class SharedClock:
    """Wall time read from a Redis key, so the test moves every process's clock."""

    def __init__(self, raw, key):
        self.raw, self.key = raw, key

    def time(self):
        return float(self.raw.get(self.key))

    monotonic = time

    def sleep(self, seconds):
        time.sleep(seconds)

    async def asleep(self, seconds):
        import asyncio
        await asyncio.sleep(seconds)


def breaker(url, prefix, wid):
    import redis
    from rag_resilience.stores.redis import RedisStore

    raw = redis.Redis.from_url(url)
    k = lambda name: f"{prefix}:test:{name}"
    cb = CircuitBreaker(
        failure_threshold=4, recovery_timeout=30.0, name="chat",
        store=RedisStore(url, prefix=prefix, op_timeout=2.0),
        clock=SharedClock(raw, k("clock")), half_open_max_calls=2,
    )
    upstream = {}
    outcome = {}

    def attempt(phase, fn):
        def counted():
            upstream[phase] = upstream.get(phase, 0) + 1
            return fn()
        try:
            outcome[phase] = cb.call(counted)
        except CircuitOpenError:
            outcome[phase] = "rejected"
        except ConnectionError:
            outcome[phase] = "failed"

    def down():
        raise ConnectionError("upstream down")

    def held_probe():
        raw.incr(k("probing"))
        wait_key(raw, k("go:release"))
        return "ok"

    raw.incr(k("ready"))
    for phase, fn in (("1", down), ("2", lambda: "ok"), ("3", held_probe), ("4", lambda: "ok")):
        wait_key(raw, k(f"go:{phase}"))
        attempt(phase, fn)
        raw.incr(k(f"done:{phase}"))
    print(json.dumps({"worker": wid, "upstream": upstream, "outcome": outcome}))


def limit(url, prefix, threads, calls):
    import redis
    from rag_resilience.stores.redis import RedisStore

    raw = redis.Redis.from_url(url)
    k = lambda name: f"{prefix}:test:{name}"
    lim = ConcurrencyLimit(8, max_waiting=threads, wait_timeout=30.0, name="llm",
                           store=RedisStore(url, prefix=prefix, op_timeout=2.0), lease_s=5.0)
    seen, done, errors = [], [], []

    def run():
        try:
            for _ in range(calls):
                with lim.slot():
                    seen.append(raw.incr(k("in_flight")))
                    time.sleep(0.004)
                    raw.decr(k("in_flight"))
                done.append(1)
        except Exception as exc:
            errors.append(repr(exc))

    raw.incr(k("ready"))
    wait_key(raw, k("go"))
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    print(json.dumps({"max_seen": max(seen), "calls": len(done), "errors": errors,
                      "local_fallbacks": lim._store.counters["local_ops"]}))


def hold(url, prefix, permits, lease_s):
    from rag_resilience.stores.redis import RedisStore

    lim = ConcurrencyLimit(8, name="llm", store=RedisStore(url, prefix=prefix, op_timeout=2.0),
                           lease_s=float(lease_s))
    for _ in range(permits):
        lim.acquire()
    print("held", flush=True)
    time.sleep(600)


def sqlite_answer(path):
    from rag_resilience.fallback import GracefulFallbacks
    from rag_resilience.policy import ResiliencePolicy
    from rag_resilience.stores import SQLiteStore

    policy = ResiliencePolicy(fallbacks=GracefulFallbacks(name="rag", store=SQLiteStore(path)))
    before = time.time()
    served = policy.run(lambda q: "Paris", "capital of France?", key="capital of France?")
    print(json.dumps({"source": served.source, "stored_after": before, "stored_before": time.time()}))


def sqlite_outage(path):
    from rag_resilience.fallback import GracefulFallbacks
    from rag_resilience.policy import ResiliencePolicy
    from rag_resilience.stores import SQLiteStore

    policy = ResiliencePolicy(fallbacks=GracefulFallbacks(name="rag", store=SQLiteStore(path)))
    calls = []

    def down(q):
        calls.append(q)
        raise ConnectionError("upstream down")

    before = time.time()
    served = policy.run(down, "capital of France?", key="capital of France?")
    print(json.dumps({"value": served.value, "source": served.source, "age_s": served.age_s,
                      "degraded": served.degraded, "read_after": before,
                      "read_before": time.time(), "upstream": len(calls)}))


def sqlite_count(path, n):
    from rag_resilience.stores import SQLiteStore

    store = SQLiteStore(path)
    store.update("ready", lambda v: ((v or 0) + 1, None))
    deadline = time.monotonic() + 30
    while store.get("ready") < 2:  # start together so the writes interleave
        assert time.monotonic() < deadline
        time.sleep(0.001)
    results = []
    for i in range(n):
        results.append(store.update("count", lambda v: ((v or 0) + 1, (v or 0) + 1)))
        store.cache_set("ns", f"{os.getpid()}-{i}", i,
                        stored_at=float(i), ttl=None, max_entries=50)
    print(json.dumps(results))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    conv = [int(a) if a.isdigit() else a for a in args]
    {"breaker": breaker, "limit": limit, "hold": hold, "sqlite_answer": sqlite_answer,
     "sqlite_outage": sqlite_outage, "sqlite_count": sqlite_count}[cmd](*conv)
'''


@pytest.fixture
def worker_script(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def spawn(script: Path, *args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result_of(proc: subprocess.Popen[str], timeout: float = 60.0) -> Any:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


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
def redis_env() -> Iterator[tuple[Any, str]]:
    """(raw client, unique prefix); every key under the prefix is deleted afterwards."""
    import redis

    require_redis()
    raw = redis.Redis.from_url(REDIS_URL)
    prefix = f"rr-test-{uuid.uuid4().hex[:12]}"
    yield raw, prefix
    keys = list(raw.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        raw.delete(*keys)
    raw.close()


def wait_count(raw: Any, key: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while int(raw.get(key) or 0) < n:
        assert time.monotonic() < deadline, f"{key} never reached {n}"
        time.sleep(0.002)


@pytest.mark.enable_socket
def test_four_processes_share_one_breaker(worker_script: Path, redis_env: tuple[Any, str]) -> None:
    raw, prefix = redis_env

    def k(name: str) -> str:
        return f"{prefix}:test:{name}"

    raw.set(k("clock"), repr(1_700_000_000.0))
    procs = [spawn(worker_script, "breaker", REDIS_URL, prefix, i) for i in range(4)]
    try:
        wait_count(raw, k("ready"), 4)
        # 1: each process fails once; no process reached the threshold (4) by itself
        raw.set(k("go:1"), 1)
        wait_count(raw, k("done:1"), 4)
        # 2: every process rejects its next call without touching its upstream
        raw.set(k("go:2"), 1)
        wait_count(raw, k("done:2"), 4)
        # 3: recovery_timeout passes on the shared clock; all four try at once while the
        #    admitted probes are held in flight: exactly half_open_max_calls=2 get through
        raw.incrbyfloat(k("clock"), 31.0)
        raw.set(k("go:3"), 1)
        deadline = time.monotonic() + 30
        while int(raw.get(k("probing")) or 0) + int(raw.get(k("done:3")) or 0) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        raw.set(k("go:release"), 1)
        wait_count(raw, k("done:3"), 4)
        # 4: the probes succeeded, the shared circuit closed: everyone calls again
        raw.set(k("go:4"), 1)
        results = [result_of(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def upstream(phase: str) -> list[int]:
        return [r["upstream"].get(phase, 0) for r in results]

    assert upstream("1") == [1, 1, 1, 1]
    assert [r["outcome"]["1"] for r in results] == ["failed"] * 4
    assert upstream("2") == [0, 0, 0, 0]
    assert [r["outcome"]["2"] for r in results] == ["rejected"] * 4
    assert sum(upstream("3")) == 2
    assert sorted(r["outcome"]["3"] for r in results) == ["ok", "ok", "rejected", "rejected"]
    assert upstream("4") == [1, 1, 1, 1]
    assert [r["outcome"]["4"] for r in results] == ["ok"] * 4


@pytest.mark.enable_socket
def test_distributed_limit_holds_across_processes(
    worker_script: Path, redis_env: tuple[Any, str]
) -> None:
    raw, prefix = redis_env
    procs = [spawn(worker_script, "limit", REDIS_URL, prefix, 8, 6) for _ in range(4)]
    try:
        wait_count(raw, f"{prefix}:test:ready", 4)
        raw.set(f"{prefix}:test:go", 1)
        results = [result_of(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [r["errors"] for r in results] == [[]] * 4
    assert sum(r["calls"] for r in results) == 4 * 8 * 6
    assert [r["local_fallbacks"] for r in results] == [0] * 4  # Redis answered every op
    peak = max(r["max_seen"] for r in results)
    assert 2 <= peak <= 8  # limited, and genuinely concurrent
    assert int(raw.get(f"{prefix}:test:in_flight")) == 0
    store = RedisStore(REDIS_URL, prefix=prefix, op_timeout=5.0)
    assert store.lease_count("rag_resilience:llm:limit", time.time()) == 0
    store.close()


@pytest.mark.enable_socket
def test_killed_process_permits_free_by_lease_expiry(
    worker_script: Path, redis_env: tuple[Any, str]
) -> None:
    _, prefix = redis_env
    lease_s = 0.5
    store = RedisStore(REDIS_URL, prefix=prefix, op_timeout=5.0)
    key = "rag_resilience:llm:limit"
    proc = spawn(worker_script, "hold", REDIS_URL, prefix, 3, lease_s)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        mine = ConcurrencyLimit(8, name="llm", store=store, lease_s=lease_s)
        got = [mine.try_acquire() for _ in range(6)]
        assert got == [True] * 5 + [False]  # the other process holds 3 of 8
        for _ in range(5):
            mine.release()
        time.sleep(lease_s * 1.5)  # longer than a lease: the holder keeps renewing
        assert store.lease_count(key, time.time()) == 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(5.0)
        killed = time.monotonic()
        while store.lease_count(key, time.time()) > 0:
            assert time.monotonic() - killed < lease_s + 0.5, "leases did not expire"
            time.sleep(0.01)
        freed_after = time.monotonic() - killed
        assert freed_after <= lease_s + 0.5
        assert [mine.try_acquire() for _ in range(9)] == [True] * 8 + [False]
        for _ in range(8):
            mine.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        store.close()


def test_sqlite_cache_survives_restart_with_true_age(worker_script: Path, tmp_path: Path) -> None:
    db = tmp_path / "rag.sqlite3"
    first = result_of(spawn(worker_script, "sqlite_answer", db))
    assert first["source"] == "live"
    time.sleep(0.2)
    # a new process, started during an outage, answers from the file with the real age
    second = result_of(spawn(worker_script, "sqlite_outage", db))
    assert second["value"] == "Paris"
    assert second["source"] == "cache" and second["degraded"] is True
    assert second["upstream"] == 1
    # age = read time - stored time, both bracketed by the processes' own clocks
    assert second["read_after"] - first["stored_before"] <= second["age_s"]
    assert second["age_s"] <= second["read_before"] - first["stored_after"]
    assert second["age_s"] >= 0.2


def test_sqlite_two_processes_stay_consistent(worker_script: Path, tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite3"
    SQLiteStore(db).close()  # create the schema once, as a deployment would
    n = 150
    procs = [spawn(worker_script, "sqlite_count", db, n) for _ in range(2)]
    results = [result_of(p) for p in procs]
    store = SQLiteStore(db)
    assert store.get("count") == 2 * n
    assert sorted(results[0] + results[1]) == list(range(1, 2 * n + 1))  # no lost update
    assert all(r == sorted(r) for r in results)  # each process saw the count only grow
    assert store.cache_len("ns", 0.0) == 50  # LRU bound held across both writers
    store.close()
