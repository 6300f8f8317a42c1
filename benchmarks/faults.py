"""Shared state under faults: what a Redis fault costs the calls that go through it.

Usage: python benchmarks/faults.py [--quick] [--json PATH]

Each scenario runs on its own private redis-server (benchmarks/_redis.py) with a
`ResiliencePolicy` whose circuit breaker and concurrency limit (8 permits) share one
`RedisStore` (default op_timeout 0.05 s, retry_interval 1 s). 24 asyncio tasks and 3
threads call a healthy upstream (2 ms) in a loop; the fault strikes after a healthy
warm-up; calls go on until the store has recovered and a while after. Reported per fault:

- calls: calls made; lost: calls that never finished; failed: calls that raised (the
  upstream never fails, so every failure is the store's);
- worst latency of a call, and the worst added latency: worst minus the worst of the
  healthy warm-up under the same load (27 callers queue for 8 permits on a shared 2-core
  machine, so a healthy call already waits 100-500 ms: context only, mostly queueing noise);
- store ms, worst call: the most wall time one call spent inside store operations (remote
  or served locally), from the fault on; added by the store: that minus the p99 of the same
  per-call figure over the healthy calls of the warm-up's second half (first half: opening
  connections). Per call, not per op, so a call's healthy ops are not counted as added;
  the target is op_timeout + 10 ms;
- op timeouts, worst call: the most Redis op timeouts one call paid from the fault on, and
  ops sent while degraded: Redis operations user calls sent while the store was already
  marked degraded (a `RedisStore` subclass charges these and the time to the call; the
  counts do not move with the machine's load; target <= 1 and 0);
- peak in flight: the most calls inside the upstream at once (limit 8);
- leaked: permits still held 1 s after the last call ended (Redis leases, local leases,
  the limit's own count);
- recover: seconds from the end of the fault until the store used Redis again.

The 300-task burst runs on a healthy Redis with the circuit half-open
(half_open_max_calls=1) and a limit of 10: it reports the peak in flight and the number of
probes admitted. Results go to benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, machine_info, markdown_table, write_json
from _redis import PrivateRedis

from rag_resilience.breaker import CircuitBreaker
from rag_resilience.errors import CircuitOpenError
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.stores.redis import RedisStore

UPSTREAM_S = 0.002
LIMIT = 8
LEASE = "faults:lease:{rag_resilience:llm:limit}"
BREAKER = "faults:kv:rag_resilience:chat:breaker"


class Charge:
    """What the store cost one call (a `CountingStore` charges it through `_CALL`)."""

    __slots__ = (
        "depth",
        "ended",
        "in_thread",
        "op_s",
        "op_timeouts",
        "ops_degraded",
        "remote_s",
        "started",
        "store_s",
    )

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ended: float | None = None  # None: the call never finished (lost, cancelled)
        self.op_timeouts = 0  # Redis op timeouts it paid
        self.ops_degraded = 0  # Redis ops it sent while the store was marked degraded
        self.store_s = 0.0  # wall time inside store operations (remote or local)
        self.op_s: list[float] = []  # the same, per operation
        self.depth = 0  # store operations in progress (an async op may run a sync one)
        self.remote_s: list[float] = []  # each async Redis op, inside its wait_for bound
        self.in_thread = threading.current_thread() is not threading.main_thread()


_CALL: contextvars.ContextVar[Charge | None] = contextvars.ContextVar("call", default=None)


class CountingStore(RedisStore):
    """A RedisStore that charges each op timeout, each op sent while degraded, and the
    wall time spent inside each store operation to the call that paid it: counts are
    robust under CPU load; the time is what the store added to the call."""

    def _run(self, remote: Callable[[Any], Any], local: Any, *args: Any) -> Any:
        with _timed():
            return super()._run(self._watch(remote), local, *args)

    async def _arun(self, remote: Any, sync_remote: Any, local: Any, *args: Any) -> Any:
        degraded = self.degraded

        async def watched(c: Any) -> Any:
            _charge(degraded_op=degraded)
            t0 = time.perf_counter()
            try:
                return await remote(c)
            finally:
                call = _CALL.get()
                if call is not None:
                    call.remote_s.append(time.perf_counter() - t0)

        with _timed():
            return await super()._arun(watched, self._watch(sync_remote), local, *args)

    def _watch(self, remote: Callable[[Any], Any]) -> Callable[[Any], Any]:
        degraded = self.degraded

        def watched(c: Any) -> Any:
            _charge(degraded_op=degraded)
            return remote(c)

        return watched

    def _fault(self, exc: BaseException) -> bool:
        if isinstance(exc, (self._redis.exceptions.TimeoutError, asyncio.TimeoutError)):
            _charge(timeout=True)
        return super()._fault(exc)


def _charge(*, timeout: bool = False, degraded_op: bool = False) -> None:
    call = _CALL.get()
    if call is not None:
        call.op_timeouts += timeout
        call.ops_degraded += degraded_op


@contextlib.contextmanager
def _timed() -> Iterator[None]:
    """Charge the wall time of the outermost store operation to the current call."""
    call = _CALL.get()
    if call is None or call.depth:
        yield
        return
    call.depth += 1
    t0 = time.perf_counter()
    try:
        yield
    finally:
        spent = time.perf_counter() - t0
        call.store_s += spent
        call.op_s.append(spent)
        call.depth -= 1


class Workload:
    """Tasks and threads calling through one policy; counts everything server-side."""

    def __init__(self, url: str, *, tasks: int = 24, threads: int = 3, pool: int = 64) -> None:
        self.store = CountingStore(url, prefix="faults", max_connections=pool)
        self.charges: list[Charge] = []  # every call's, in the order they started
        self.limit = ConcurrencyLimit(
            LIMIT, max_waiting=1000, wait_timeout=10.0, name="llm", store=self.store
        )
        breaker = CircuitBreaker(5, 30.0, name="chat", store=self.store)
        self.policy = ResiliencePolicy(breaker=breaker, limit=self.limit, name="faults")
        self.n_tasks, self.n_threads = tasks, threads
        self.lock = threading.Lock()
        self.started = self.done = self.failed = self.cancelled = 0
        self.latencies: list[tuple[float, float]] = []  # (started at, seconds)
        self.inside = self.peak = 0
        self.errors: dict[str, int] = {}
        self.stop = threading.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.threads: list[threading.Thread] = []
        self.lags: list[tuple[float, float]] = []  # (woke at, seconds late) of a 5 ms tick
        self.ticker: asyncio.Task[None] | None = None

    def _enter(self) -> None:
        with self.lock:
            self.inside += 1
            self.peak = max(self.peak, self.inside)

    def _leave(self) -> None:
        with self.lock:
            self.inside -= 1

    async def upstream(self) -> str:
        self._enter()
        try:
            await asyncio.sleep(UPSTREAM_S)
        finally:
            self._leave()
        return "ok"

    def sync_upstream(self) -> str:
        self._enter()
        try:
            time.sleep(UPSTREAM_S)
        finally:
            self._leave()
        return "ok"

    def _record(self, t0: float, error: BaseException | None) -> None:
        with self.lock:
            self.latencies.append((t0, time.perf_counter() - t0))
            if error is None:
                self.done += 1
            else:
                self.failed += 1
                name = type(error).__name__
                self.errors[name] = self.errors.get(name, 0) + 1

    async def task_loop(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            with self.lock:
                self.started += 1
            charge = Charge()
            _CALL.set(charge)
            self.charges.append(charge)
            try:
                await self.policy.acall(self.upstream)
            except asyncio.CancelledError:
                with self.lock:
                    self.cancelled += 1
                raise
            except Exception as exc:
                self._record(t0, exc)
            else:
                self._record(t0, None)
            finally:
                charge.ended = time.perf_counter()

    def thread_loop(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            with self.lock:
                self.started += 1
            charge = Charge()
            _CALL.set(charge)
            self.charges.append(charge)
            try:
                self.policy.call(self.sync_upstream)
            except Exception as exc:
                self._record(t0, exc)
            else:
                self._record(t0, None)
            finally:
                charge.ended = time.perf_counter()

    async def tick(self) -> None:
        """How late the event loop wakes a 5 ms sleep: the share of an async store op's
        wall time that is the loaded machine's, not Redis's."""
        while not self.stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            woke = time.perf_counter()
            self.lags.append((woke, woke - t0 - 0.005))

    def start(self) -> None:
        self.ticker = asyncio.create_task(self.tick())
        self.tasks = [asyncio.create_task(self.task_loop()) for _ in range(self.n_tasks)]
        self.threads = [threading.Thread(target=self.thread_loop) for _ in range(self.n_threads)]
        for t in self.threads:
            t.start()

    async def finish(self) -> int:
        """Stop the callers; the number of calls that never finished (lost)."""
        self.stop.set()
        _, pending = await asyncio.wait(self.tasks, timeout=15.0) if self.tasks else ((), ())
        for t in self.threads:
            await asyncio.to_thread(t.join, 15.0)
        lost = len(pending) + sum(t.is_alive() for t in self.threads)
        if self.ticker is not None:
            await self.ticker
        for task in pending:
            task.cancel()
        return lost


async def _until(condition: Callable[[], bool], limit_s: float) -> float | None:
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if condition():
            return time.perf_counter() - start
        await asyncio.sleep(0.005)
    return None


# -- faults: each gets the server and the workload, returns when the fault is over ----------
async def stall(server: PrivateRedis, w: Workload, admin: Any) -> None:
    sock = server.stall(1.0)
    await asyncio.to_thread(sock.recv, 64)
    sock.close()


async def kill(server: PrivateRedis, w: Workload, admin: Any) -> None:
    server.kill()
    await asyncio.sleep(1.0)
    server.start()


async def restart(server: PrivateRedis, w: Workload, admin: Any) -> None:
    server.kill()
    server.start()


async def flush(server: PrivateRedis, w: Workload, admin: Any) -> None:
    admin.flushall()


async def garbage(server: PrivateRedis, w: Workload, admin: Any) -> None:
    admin.delete(LEASE)  # the lease set becomes a list (WRONGTYPE) once: the permits it
    admin.rpush(LEASE, "not a lease set")  # held are gone, as after a FLUSHALL
    for _ in range(20):  # the breaker's value is garbage again every 50 ms for a second
        admin.set(BREAKER, b"\x80garbage{")
        await asyncio.sleep(0.05)


async def nothing(server: PrivateRedis, w: Workload, admin: Any) -> None:
    await asyncio.sleep(1.0)  # the fault is the workload itself (pool of 4, 200 callers)


async def cancel_storm(server: PrivateRedis, w: Workload, admin: Any) -> None:
    rng = random.Random(17)
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        await asyncio.sleep(rng.random() * 0.004)
        victim = rng.randrange(len(w.tasks))
        w.tasks[victim].cancel()
        w.tasks[victim] = asyncio.create_task(w.task_loop())


SCENARIOS: list[tuple[str, Callable[..., Awaitable[None]], dict[str, Any]]] = [
    ("Redis stall 1 s (DEBUG SLEEP)", stall, {}),
    ("Redis killed, back after 1 s", kill, {}),
    ("Redis restarted", restart, {}),
    ("FLUSHALL", flush, {}),
    ("garbage values for 1 s", garbage, {}),
    ("pool exhaustion (pool 4, 200 tasks)", nothing, {"tasks": 200, "pool": 4}),
    ("cancellation storm (1 s)", cancel_storm, {}),
]


async def run_scenario(
    name: str, fault: Callable[..., Awaitable[None]], opts: dict[str, Any], warm_s: float
) -> dict[str, Any]:
    with PrivateRedis() as server:
        admin = server.client()
        w = Workload(server.url, **opts)
        w.start()
        settled = time.perf_counter() + warm_s / 2  # connections opened, scripts loaded
        await asyncio.sleep(warm_s)
        healthy = [s for _, s in w.latencies]
        base_worst = max(healthy) if healthy else UPSTREAM_S  # same load, no fault
        remote_before = w.store.counters["remote_ops"]
        struck = time.perf_counter()
        await fault(server, w, admin)
        ended = time.perf_counter()
        store = w.store
        recovered = await _until(
            lambda: not store.degraded and store.counters["remote_ops"] > remote_before, 10.0
        )
        await asyncio.sleep(warm_s)
        lost = await w.finish()
        await asyncio.sleep(1.0)  # "permits held 1 s after the fault ends" (and calls end)
        try:
            redis_leases = int(admin.zcard(LEASE)) if admin.type(LEASE) == b"zset" else 0
        except Exception:
            redis_leases = -1
        leaked = redis_leases + store.local.lease_count("rag_resilience:llm:limit", 0.0)
        leaked += w.limit.in_flight
        lat = sorted(s for _, s in w.latencies)
        worst = lat[-1] if lat else 0.0
        # charged: every call that was still running when the fault struck, or began later;
        # the baseline: calls that ran wholly in the settled half of the healthy warm-up
        charged = [c for c in w.charges if c.ended is None or c.ended >= struck]
        calm = [c for c in w.charges if c.started >= settled and c.ended and c.ended < struck]
        calm_p99 = _p99([c.store_s for c in calm])
        costly = max(charged, key=lambda c: c.store_s, default=None)
        store_worst = costly.store_s if costly else 0.0
        row = {
            "fault": name,
            "calls": w.started,
            "lost": lost,
            "failed": w.failed,
            "errors": w.errors,
            "cancelled_by_storm": w.cancelled,
            "worst_ms": round(worst * 1000, 1),
            "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1) if lat else None,
            "healthy_worst_ms": round(base_worst * 1000, 1),
            "worst_added_ms": round(max(0.0, worst - base_worst) * 1000, 1),
            "healthy_calls": len(calm),
            "healthy_store_p99_ms": round(calm_p99 * 1000, 1),
            "healthy_store_op_p99_ms": round(_p99([t for c in calm for t in c.op_s]) * 1000, 1),
            "store_worst_ms": round(store_worst * 1000, 1),
            "store_added_ms": round(max(0.0, store_worst - calm_p99) * 1000, 1),
            "healthy_loop_lag_worst_ms": _worst_lag(w, settled, struck),
            "loop_lag_worst_ms": _worst_lag(w, struck, ended + warm_s),
            "healthy_store_worst_ms": round(max((c.store_s for c in calm), default=0) * 1000, 1),
            "store_worst_call": None
            if costly is None
            else {
                "ops_ms": [round(t * 1000, 1) for t in costly.op_s],
                "op_timeouts": costly.op_timeouts,
                "in_thread": costly.in_thread,
                "async_remote_ms": [round(t * 1000, 1) for t in costly.remote_s],
                "started_after_fault_s": round(costly.started - struck, 3),
                "loop_lag_worst_ms": _worst_lag(w, costly.started, costly.ended or ended),
            },
            "op_timeout_ms": round(store.op_timeout * 1000, 1),
            "peak_in_flight": w.peak,
            "max_op_timeouts_per_call": max((c.op_timeouts for c in charged), default=0),
            "calls_paying_a_timeout": sum(1 for c in charged if c.op_timeouts),
            "ops_sent_while_degraded": sum(c.ops_degraded for c in charged),
            "leaked_permits": leaked,
            "recover_s": None if recovered is None else round(recovered, 3),
            "since_fault_end_s": round(time.perf_counter() - ended, 1),
            "store": store.counters,
        }
        await store.aclose()
        admin.close()
    return row


def _worst_lag(w: Workload, start: float, end: float) -> float:
    return round(max((lag for t, lag in w.lags if start <= t <= end), default=0.0) * 1000, 1)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


async def burst(n: int = 300, threads: int = 20) -> dict[str, Any]:
    """A burst on a healthy Redis with the circuit half-open: both bounds must hold."""
    with PrivateRedis() as server:
        admin = server.client()
        store = RedisStore(server.url, prefix="faults")
        breaker = CircuitBreaker(3, 30.0, name="chat", store=store, half_open_max_calls=1)
        limit = ConcurrencyLimit(10, max_waiting=1000, wait_timeout=30.0, name="llm", store=store)
        now = time.time()
        admin.set(BREAKER, json.dumps({"s": "open", "oa": now - 60, "ou": now - 1, "oc": 1}))
        lock = threading.Lock()
        state = {"in": 0, "peak": 0, "probes": 0, "rejected": 0}
        release = threading.Event()

        def probe() -> str:
            with lock:
                state["probes"] += 1
            release.wait(30.0)
            return "ok"

        async def aprobe() -> str:
            return await asyncio.to_thread(probe)

        def count(delta: int) -> None:
            with lock:
                state["in"] += delta
                state["peak"] = max(state["peak"], state["in"])

        async def task() -> None:
            async with limit.aslot():
                count(1)
                await asyncio.sleep(0.001)
                count(-1)
            try:
                await breaker.acall(aprobe)
            except CircuitOpenError:
                with lock:
                    state["rejected"] += 1

        def thread() -> None:
            with limit.slot():
                count(1)
                time.sleep(0.001)
                count(-1)
            try:
                breaker.call(probe)
            except CircuitOpenError:
                with lock:
                    state["rejected"] += 1

        started = time.perf_counter()
        ts = [threading.Thread(target=thread) for _ in range(threads)]
        for t in ts:
            t.start()
        tasks = [asyncio.create_task(task()) for _ in range(n)]
        await _until(lambda: state["rejected"] + state["probes"] >= n + threads, 60.0)
        elapsed = time.perf_counter() - started
        release.set()
        await asyncio.gather(*tasks)
        for t in ts:
            await asyncio.to_thread(t.join, 10.0)
        row = {
            "fault": f"burst: {n} tasks + {threads} threads, half-open, limit 10",
            "calls": n + threads,
            "peak_in_flight": state["peak"],
            "limit": 10,
            "half_open_admitted": state["probes"],
            "half_open_bound": 1,
            "seconds": round(elapsed, 3),
            "store": store.counters,
            "leases_left": int(admin.zcard(LEASE)),
        }
        await store.aclose()
        admin.close()
    return row


async def fairness(seconds: float) -> list[dict[str, Any]]:
    """How long callers wait for a permit: 16 tasks and 4 threads on two replicas (two
    stores) share a limit of 4 for `seconds`; each holds its permit 2 ms. Local mode (one
    process, no store) alongside. Fair waiting shows as a max close to the p99."""
    return [
        await _fair_once("distributed (Redis, 2 replicas)", seconds, shared=True),
        await _fair_once("local (no store)", seconds, shared=False),
    ]


async def _fair_once(mode: str, seconds: float, shared: bool) -> dict[str, Any]:
    waits: list[float] = []
    stop = threading.Event()

    async def task(limit: ConcurrencyLimit) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            async with limit.aslot():
                waits.append(time.perf_counter() - t0)
                await asyncio.sleep(0.002)

    def thread(limit: ConcurrencyLimit) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            with limit.slot():
                waits.append(time.perf_counter() - t0)
                time.sleep(0.002)

    with PrivateRedis() as server:
        stores = [RedisStore(server.url, prefix="fair") for _ in range(2)] if shared else []
        limits = [
            ConcurrencyLimit(4, max_waiting=100, wait_timeout=30.0, name="fair", store=store)
            for store in stores
        ] or [ConcurrencyLimit(4, max_waiting=100, wait_timeout=30.0, name="fair")] * 2
        ts = [threading.Thread(target=thread, args=(limits[i % 2],)) for i in range(4)]
        for t in ts:
            t.start()
        tasks = [asyncio.create_task(task(limits[i % 2])) for i in range(16)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
        for t in ts:
            await asyncio.to_thread(t.join, 10.0)
        for store in stores:
            await store.aclose()
    w = sorted(waits)
    return {
        "mode": mode,
        "acquisitions": len(w),
        "p50_ms": round(w[len(w) // 2] * 1000, 1),
        "p99_ms": round(w[int(len(w) * 0.99)] * 1000, 1),
        "max_ms": round(w[-1] * 1000, 1),
    }


async def main_async(
    quick: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    warm = 0.3 if quick else 0.5
    rows = [await run_scenario(name, fault, opts, warm) for name, fault, opts in SCENARIOS]
    burst_row = await burst(60 if quick else 300, 4 if quick else 20)
    return rows, burst_row, await fairness(0.5 if quick else 3.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases (smoke test)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "faults.json")
    args = parser.parse_args(argv)
    logging.getLogger("rag_resilience").setLevel(logging.ERROR)
    started = time.perf_counter()
    rows, burst_row, fair_rows = asyncio.run(main_async(args.quick))
    total = time.perf_counter() - started
    print(
        markdown_table(
            [
                "fault",
                "calls",
                "lost",
                "failed",
                "healthy worst ms",
                "worst ms",
                "worst added ms",
                "store ms, worst call",
                "healthy store p99 ms",
                "added by the store ms",
                "loop lag, healthy / fault ms",
                "op timeouts, worst call",
                "ops sent while degraded",
                "peak in flight (limit 8)",
                "permits leaked 1 s after",
                "recover s",
            ],
            [
                [
                    r["fault"],
                    r["calls"],
                    r["lost"],
                    r["failed"],
                    r["healthy_worst_ms"],
                    r["worst_ms"],
                    r["worst_added_ms"],
                    r["store_worst_ms"],
                    r["healthy_store_p99_ms"],
                    r["store_added_ms"],
                    f"{r['healthy_loop_lag_worst_ms']} / {r['loop_lag_worst_ms']}",
                    r["max_op_timeouts_per_call"],
                    r["ops_sent_while_degraded"],
                    r["peak_in_flight"],
                    r["leaked_permits"],
                    "-" if r["recover_s"] is None else r["recover_s"],
                ]
                for r in rows
            ],
        )
    )
    print(
        f"\n{burst_row['fault']}: peak in flight {burst_row['peak_in_flight']} "
        f"(limit {burst_row['limit']}), half-open admitted {burst_row['half_open_admitted']} "
        f"(bound {burst_row['half_open_bound']}), leases left {burst_row['leases_left']}"
    )
    print("\nWaiting for a permit (limit 4, 20 callers, 2 ms holds):")
    print(
        markdown_table(
            ["mode", "acquisitions", "p50 ms", "p99 ms", "max ms"],
            [
                [r["mode"], r["acquisitions"], r["p50_ms"], r["p99_ms"], r["max_ms"]]
                for r in fair_rows
            ],
        )
    )
    targets = {
        "no_call_lost_or_failed": all(r["lost"] == 0 and r["failed"] == 0 for r in rows),
        "no_permit_leaked": all(r["leaked_permits"] == 0 for r in rows),
        "burst_limit_held": burst_row["peak_in_flight"] <= burst_row["limit"],
        "burst_half_open_bound_held": burst_row["half_open_admitted"]
        <= burst_row["half_open_bound"],
        "store_added_ms_le_op_timeout_plus_10": all(
            r["store_added_ms"] <= r["op_timeout_ms"] + 10.0 for r in rows
        ),
        "at_most_one_op_timeout_per_call": max(r["max_op_timeouts_per_call"] for r in rows) <= 1,
        "no_op_sent_while_degraded": all(r["ops_sent_while_degraded"] == 0 for r in rows),
    }
    for name, ok in targets.items():
        print(f"target {name}: {'ok' if ok else 'MISSED'}")
    print(f"\nran in {total:.1f} s")
    payload = {
        "benchmark": "faults",
        "machine": machine_info(),
        "seconds": round(total, 1),
        "rows": rows,
        "burst": burst_row,
        "fairness": fair_rows,
        "targets": targets,
    }
    print(f"wrote {write_json('faults', payload, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
