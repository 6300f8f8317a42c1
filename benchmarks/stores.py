"""What does shared state cost? A protected call through a breaker on each store.

Usage: python benchmarks/stores.py [--quick] [--repeat 5] [--target-s 0.1] [--json PATH]

Cases (all wrapping the same no-op upstream, success path, circuit closed):
- `CircuitBreaker.call` with local state (no store), then with `store=` MemoryStore,
  SQLiteStore (a temp file, WAL) and RedisStore (REDIS_URL, default
  redis://127.0.0.1:6379/0, unique key prefix, deleted afterwards);
- the async twin (`acall`) on memory and Redis (redis.asyncio client);
- RedisStore pointed at a dead port (degraded: served from local state), to show that a
  dead Redis does not add `op_timeout` to every call;
- the full `ResiliencePolicy.preset("balanced", store=...)` with ``key=`` (limit lease,
  breaker, cache write), memory vs SQLite vs Redis.

Redis round trips per call are counted by wrapping the clients (every command is one
round trip: the store sends no pipelines), over a separate counting pass. A bare GET on
the same client is timed alongside as the floor one round trip costs here (on a loaded
2-core machine Redis competes with the benchmark for CPU, so the mean is well above the
median PING, which is printed too).

Target (issue 8): a Redis-backed breaker needs at most one Redis round trip per
protected call on the success path. Results go to benchmarks/results/stores.json.

Cost at scale (issue 17), on a private redis-server whose own command counters are read:
a closed healthy shared breaker with the store's local view (`view_ttl`, default 0.1 s)
against the same breaker without it (`view_ttl=None`, one GET per call), in 1 and 4
processes calling as fast as they can: µs per call and Redis operations per 1,000 calls.
Target: at most one Redis operation per process per 100 ms. Then trip propagation: one
process trips the circuit, four others keep calling; how long until each is rejected.
Target: within 250 ms on every replica.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import (
    RESULTS_DIR,
    Runner,
    async_runner,
    machine_info,
    markdown_table,
    measure,
    sync_runner,
    write_json,
)
from _redis import PrivateRedis

from rag_resilience.breaker import CircuitBreaker
from rag_resilience.errors import CircuitOpenError
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.stores import MemoryStore, SQLiteStore, Store
from rag_resilience.stores.redis import RedisStore

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
TARGET_REDIS_ROUND_TRIPS = 1
LOCAL = "breaker, local state"


def noop() -> int:
    return 1


async def anoop() -> int:
    return 1


def counting_clients(url: str) -> tuple[Any, Any]:
    """Sync and async redis clients that count the commands they send."""
    import redis
    import redis.asyncio

    class Counting(redis.Redis):  # type: ignore[type-arg]
        sent = 0

        def execute_command(self, *args: Any, **options: Any) -> Any:
            type(self).sent += 1
            return super().execute_command(*args, **options)

    class ACounting(redis.asyncio.Redis):  # type: ignore[type-arg]
        sent = 0

        async def execute_command(self, *args: Any, **options: Any) -> Any:
            type(self).sent += 1
            return await super().execute_command(*args, **options)

    opts = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
    return Counting.from_url(url, **opts), ACounting.from_url(url, **opts)


def redis_available() -> str | None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        client.ping()
        return None
    except (redis.exceptions.RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def ping_us(client: Any, n: int = 2000) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build(tmp: Path, with_redis: bool) -> tuple[dict[str, Any], list[tuple[str, str, str, str]]]:
    """Namespace for the statements and the cases: (group, name, store kind, stmt)."""
    run_id = uuid.uuid4().hex[:10]
    prefix = f"rr-bench-{run_id}"
    stores: dict[str, Store] = {
        "memory": MemoryStore(),
        "sqlite": SQLiteStore(tmp / "bench.sqlite3"),
    }
    ns: dict[str, Any] = {"noop": noop, "anoop": anoop, "prefix": prefix, "stores": stores}
    ns["b_local"] = CircuitBreaker(5, 60.0, name=f"bench-{run_id}")
    cases: list[tuple[str, str, str, str]] = [
        ("sync", "bare call", "-", "noop()"),
        ("sync", LOCAL, "-", "b_local.call(noop)"),
    ]
    kinds = ["memory", "sqlite"]
    if with_redis:
        client, aclient = counting_clients(REDIS_URL)
        ns["client"], ns["aclient"] = client, aclient
        stores["redis"] = RedisStore(client=client, async_client=aclient, prefix=prefix)
        kinds.append("redis")
        logging.getLogger("rag_resilience").setLevel(logging.ERROR)  # the one outage warning
        dead = RedisStore(f"redis://127.0.0.1:{dead_port()}/0", retry_interval=1.0)
        stores["redis-down"] = dead
        kinds.append("redis-down")
    for kind in kinds:
        store = stores[kind]
        var = "b_" + kind.replace("-", "_")
        ns[var] = CircuitBreaker(5, 60.0, name=f"bench-{run_id}-b", store=store)
        cases.append(("sync", f"breaker, {kind} store", kind, f"{var}.call(noop)"))
    if with_redis:
        # The floor: one bare GET on the same client, timed the same way.
        cases.append(("sync", "raw redis GET (floor)", "redis", "client.get(prefix)"))
    cases.append(("async", "bare call", "-", "await anoop()"))
    cases.append(("async", LOCAL, "-", "await b_local.acall(anoop)"))
    for kind in [k for k in kinds if k in ("memory", "redis")]:
        cases.append(("async", f"breaker, {kind} store", kind, f"await b_{kind}.acall(anoop)"))
    if with_redis:
        cases.append(("async", "raw redis GET (floor)", "redis", "await aclient.get(prefix)"))
    for kind in [k for k in kinds if k != "redis-down"]:
        ns[f"p_{kind}"] = ResiliencePolicy.preset(
            "balanced", name=f"bench-{run_id}-p", store=stores[kind]
        )
        cases.append(
            (
                "policy",
                f"policy (balanced, key), {kind} store",
                kind,
                f"p_{kind}.call(noop, key='q')",
            )
        )
    return ns, cases


# -- cost at scale: several processes, one shared breaker ---------------------------------
TARGET_OPS_PER_PROCESS_PER_100MS = 1.0
TARGET_TRIP_SEEN_S = 0.25


def _scale_worker(
    url: str, name: str, view_ttl: float | None, start_at: float, duration: float, out: Any
) -> None:
    store = RedisStore(url, prefix="scale", view_ttl=view_ttl)
    breaker = CircuitBreaker(5, 60.0, name=name, store=store)
    breaker.call(noop)
    while time.time() < start_at:
        time.sleep(0.0005)
    ops_before = store.counters["remote_ops"]
    calls, t0 = 0, time.perf_counter()
    end = t0 + duration
    while time.perf_counter() < end:
        for _ in range(100):
            breaker.call(noop)
        calls += 100
    out.put((calls, time.perf_counter() - t0, store.counters["remote_ops"] - ops_before))
    store.close()


def _trip_reader(url: str, name: str, out: Any) -> None:
    logging.getLogger("rag_resilience").setLevel(logging.ERROR)  # the rejections
    breaker = CircuitBreaker(1, 60.0, name=name, store=RedisStore(url, prefix="trip"))
    breaker.call(noop)
    out.put("ready")
    while True:
        try:
            breaker.call(noop)
        except CircuitOpenError:
            out.put(time.time())
            return
        time.sleep(0.0002)  # a replica with steady traffic


def scale(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    duration = 0.3 if quick else 2.0
    rows: list[dict[str, Any]] = []
    with PrivateRedis() as server:
        admin = server.client()
        for view_ttl in (0.1, None):
            for procs in (1, 4):
                name = f"scale-{uuid.uuid4().hex[:8]}"
                out = ctx.Queue()
                start_at = time.time() + (2.0 if procs > 1 else 1.0)
                workers = [
                    ctx.Process(
                        target=_scale_worker,
                        args=(server.url, name, view_ttl, start_at, duration, out),
                    )
                    for _ in range(procs)
                ]
                for w in workers:
                    w.start()
                while time.time() < start_at - 0.05:
                    time.sleep(0.01)
                before = server.commands(admin)
                results = [out.get(timeout=60) for _ in workers]
                after = server.commands(admin)
                for w in workers:
                    w.join(10)
                calls = sum(r[0] for r in results)
                ops = after - before  # what Redis executed, warm-up included
                per_process = max(r[2] / (r[1] / 0.1) for r in results)
                rows.append(
                    {
                        "view_ttl_s": view_ttl,
                        "processes": procs,
                        "calls": calls,
                        "us_per_call": round(
                            statistics.mean(r[1] / r[0] * 1e6 for r in results), 2
                        ),
                        "redis_ops": ops,
                        "redis_ops_per_1000_calls": round(ops / calls * 1000, 3),
                        "redis_ops_per_process_per_100ms": round(per_process, 3),
                    }
                )
        seen: list[float] = []
        for _ in range(1 if quick else 3):
            name = f"trip-{uuid.uuid4().hex[:8]}"
            out = ctx.Queue()
            readers = [
                ctx.Process(target=_trip_reader, args=(server.url, name, out)) for _ in range(4)
            ]
            for r in readers:
                r.start()
            for _ in readers:
                assert out.get(timeout=60) == "ready"
            time.sleep(0.3)
            tripper = CircuitBreaker(
                1, 60.0, name=name, store=RedisStore(server.url, prefix="trip")
            )
            tripper.force_open()
            tripped_at = time.time()
            seen += [out.get(timeout=30) - tripped_at for _ in readers]
            for r in readers:
                r.join(10)
        admin.close()
    with_view = [r for r in rows if r["view_ttl_s"] is not None]
    targets = {
        "ops_per_process_per_100ms": {
            "worst": max(r["redis_ops_per_process_per_100ms"] for r in with_view),
            "target": TARGET_OPS_PER_PROCESS_PER_100MS,
        },
        "trip_seen_by_every_replica_s": {
            "worst": round(max(seen), 4),
            "target": TARGET_TRIP_SEEN_S,
        },
    }
    for t in targets.values():
        t["ok"] = t["worst"] <= t["target"]
    return rows, targets


def count_round_trips(
    ns: dict[str, Any], loop: asyncio.AbstractEventLoop, stmt: str, group: str, n: int = 200
) -> float:
    client, aclient = ns["client"], ns["aclient"]
    run = async_runner(stmt, ns, loop) if group == "async" else sync_runner(stmt, ns)
    before = type(client).sent + type(aclient).sent
    run(n)
    return (type(client).sent + type(aclient).sent - before) / n


def cleanup(ns: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
    client = ns.get("client")
    if client is not None:
        keys = list(client.scan_iter(match=f"{ns['prefix']}:*", count=1000))
        if keys:
            client.delete(*keys)
        loop.run_until_complete(ns["aclient"].aclose())
        client.close()
    for store in ns["stores"].values():
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--target-s", type=float, default=0.1)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "stores.json")
    args = parser.parse_args(argv)
    repeat, target_s = (2, 0.02) if args.quick else (args.repeat, args.target_s)

    redis_error = redis_available()
    if redis_error:
        print(
            f"Redis at {REDIS_URL} unreachable ({redis_error}): Redis cases skipped",
            file=sys.stderr,
        )
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        ns, cases = build(Path(tmp), with_redis=redis_error is None)
        try:
            # sanity: every case really runs its call on the success path
            for group, _, _, stmt in cases:
                runner = async_runner(stmt, ns, loop) if group == "async" else sync_runner(stmt, ns)
                runner(3)
            for kind, store in ns["stores"].items():
                if kind.startswith("redis"):
                    expect_degraded = kind == "redis-down"
                    assert store.degraded is expect_degraded, (kind, store.counters)

            runners: dict[tuple[str, str], Runner] = {}
            for group, name, _, stmt in cases:
                runners[(group, name)] = (
                    async_runner(stmt, ns, loop) if group == "async" else sync_runner(stmt, ns)
                )
            timings = measure(runners, repeat=repeat, target_s=target_s)  # type: ignore[arg-type]
            rtt = ping_us(ns["client"], 200 if args.quick else 2000) if "client" in ns else None
            round_trips = {
                (group, name): count_round_trips(ns, loop, stmt, group)
                for group, name, kind, stmt in cases
                if kind == "redis"
            }
        finally:
            cleanup(ns, loop)
    loop.close()

    rows: list[dict[str, Any]] = []
    for group, name, kind, _ in cases:
        t = timings[(group, name)]
        base_name = LOCAL if group != "policy" else "policy (balanced, key), memory store"
        base_group = group if group != "policy" else "policy"
        base = timings[(base_group, base_name)].median_us
        rows.append(
            {
                "group": group,
                "name": name,
                "store": kind,
                "us_per_call": round(t.median_us, 2),
                "added_vs_baseline_us": round(t.median_us - base, 2),
                "baseline": base_name,
                "redis_round_trips_per_call": round(round_trips[(group, name)], 3)
                if (group, name) in round_trips
                else (0 if kind != "redis-down" else None),
                "spread_us": round(t.spread_us, 2),
                "calls_per_repeat": t.number,
                "repeats": len(t.per_call),
            }
        )
    headers = ["group", "case", "µs/call", "added µs vs baseline", "Redis round trips/call"]
    table = markdown_table(
        headers,
        [
            [
                r["group"],
                r["name"],
                f"{r['us_per_call']:.2f}",
                f"{r['added_vs_baseline_us']:+.2f}",
                "-" if r["redis_round_trips_per_call"] is None else r["redis_round_trips_per_call"],
            ]
            for r in rows
        ],
    )
    print(table)
    targets: dict[str, Any] = {}
    for group in ("sync", "async"):
        key = (group, "breaker, redis store")
        if key in round_trips:
            targets[f"redis_breaker_round_trips_{group}"] = {
                "round_trips": round_trips[key],
                "target": TARGET_REDIS_ROUND_TRIPS,
                "ok": round_trips[key] <= TARGET_REDIS_ROUND_TRIPS,
            }
    if rtt is not None:
        print(f"\nRedis PING round trip (median): {rtt:.1f} µs")
    for name, target in targets.items():
        print(
            f"target {name}: {target['round_trips']:.2f} <= {target['target']}: "
            f"{'ok' if target['ok'] else 'MISSED'}"
        )
    scale_rows, scale_targets = scale(args.quick)
    print("\nCost at scale: one closed shared breaker, calls as fast as possible")
    print(
        markdown_table(
            [
                "local view",
                "processes",
                "µs/call",
                "Redis ops / 1,000 calls",
                "ops / process / 100 ms",
            ],
            [
                [
                    "off" if r["view_ttl_s"] is None else f"{r['view_ttl_s']} s",
                    r["processes"],
                    f"{r['us_per_call']:.2f}",
                    r["redis_ops_per_1000_calls"],
                    r["redis_ops_per_process_per_100ms"],
                ]
                for r in scale_rows
            ],
        )
    )
    for name, target in scale_targets.items():
        print(
            f"target {name}: {target['worst']} <= {target['target']}: "
            f"{'ok' if target['ok'] else 'MISSED'}"
        )
    targets.update(scale_targets)
    payload = {
        "benchmark": "stores",
        "machine": machine_info(),
        "redis_url": REDIS_URL if redis_error is None else None,
        "redis_skipped": redis_error,
        "redis_ping_us": None if rtt is None else round(rtt, 2),
        "repeat": repeat,
        "target_s": target_s,
        "rows": rows,
        "scale": scale_rows,
        "targets": targets,
    }
    path = write_json("stores", payload, args.json)
    print(f"\nwrote {path}")
    return 0 if all(t["ok"] for t in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
