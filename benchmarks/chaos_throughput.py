"""Measure the chaos server's throughput with keep-alive httpx clients.

Usage: python benchmarks/chaos_throughput.py [--seconds 3] [--clients 4] [--mode process|thread]

The server runs as it does in tests and benchmarks: `ChaosServer` in a daemon thread of this
process. Each client (a separate process by default, so the clients' own CPU cost does not
share the server's GIL; `--mode thread` puts them in this process) owns one `httpx.Client`,
i.e. one keep-alive connection, and sends small requests back to back. The figure is
completed 200 responses per second over the run. Client and server share the machine, so on
2 cores it is a lower bound for the server alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import threading
import time
from typing import Any

import httpx

from rag_resilience.chaos import ChaosServer

BODIES: dict[str, tuple[str, dict[str, Any] | None]] = {
    "embeddings": (
        "/embeddings",
        {
            "input": "what is a circuit breaker?",
            "model": "text-embedding-3-small",
            "dimensions": 64,
        },
    ),
    "chat": (
        "/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    ),
    "models": ("/models", None),
}


def _client(base_url: str, endpoint: str, start_at: float, stop_at: float, out: Any) -> None:
    path, body = BODIES[endpoint]
    ok = errors = 0
    with httpx.Client(base_url=base_url, headers={"authorization": "Bearer sk-bench"}) as client:
        client.get("/models")  # open the keep-alive connection before the clock starts
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < stop_at:
            r = client.get(path) if body is None else client.post(path, json=body)
            if r.status_code == 200:
                ok += 1
            else:
                errors += 1
    out.put((ok, errors))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(seconds: float, clients: int, endpoint: str, mode: str, embedding_dim: int) -> float:
    with ChaosServer(seed=0, embedding_dim=embedding_dim) as server:
        start_at = time.time() + (1.5 if mode == "process" else 0.2)
        stop_at = start_at + seconds
        if mode == "process":
            ctx = mp.get_context("spawn")
            queue: Any = ctx.Queue()
            workers: list[Any] = [
                ctx.Process(
                    target=_client, args=(server.base_url, endpoint, start_at, stop_at, queue)
                )
                for _ in range(clients)
            ]
        else:
            import queue as queue_mod

            queue = queue_mod.Queue()
            workers = [
                threading.Thread(
                    target=_client, args=(server.base_url, endpoint, start_at, stop_at, queue)
                )
                for _ in range(clients)
            ]
        for w in workers:
            w.start()
        cpu0 = _cpu()
        results = [queue.get(timeout=seconds + 30) for _ in workers]
        cpu = _cpu() - cpu0
        for w in workers:
            w.join()
        stats = server.stats()
    ok = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    rate = ok / seconds
    print(
        f"{endpoint:<10} {ok:>6} OK in {seconds:.1f}s, {clients} keep-alive {mode} clients: "
        f"{rate:,.0f} req/s (errors {errors}; server counted {stats['requests']} incl. warm-up)"
    )
    if mode == "process":
        per_req = cpu / max(1, stats["requests"])
        print(
            f"{'':<10} server CPU {per_req * 1e6:,.0f} us/request "
            f"=> ~{1 / per_req:,.0f} req/s per core for the server alone"
        )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description="chaos server throughput")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--mode", choices=["process", "thread"], default="process")
    parser.add_argument("--endpoint", choices=[*BODIES, "all"], default="all")
    parser.add_argument("--embedding-dim", type=int, default=1536)
    args = parser.parse_args()
    endpoints = list(BODIES) if args.endpoint == "all" else [args.endpoint]
    for endpoint in endpoints:
        run(args.seconds, args.clients, endpoint, args.mode, args.embedding_dim)


if __name__ == "__main__":
    main()
