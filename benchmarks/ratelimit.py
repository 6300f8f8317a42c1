"""Rate limits (issue 16): who gets answered, and how fast, when the server says "slow down".

Usage: python benchmarks/ratelimit.py [--quick] [--calls 200] [--threads 8] [--rps 40]
       [--only NAME,...] [--processes 4] [--json PATH]

One chaos server on loopback enforces a per-API-key token bucket of `--rps` requests per
second (burst 5), answering 429 with ``retry-after-ms`` and ``x-ratelimit-*`` headers on
every response, as OpenAI does. Each contender gets its own API key (its own bucket) and
`--threads` threads making `--calls` chat calls in total, offered as fast as they can go
(far above the limit), side by side in this one process, one after the other:

* the openai SDK with its defaults (max_retries=2, honours retry-after-ms);
* LangChain ChatOpenAI with its defaults; ChatOpenAI with LangChain's InMemoryRateLimiter
  *told* the exact limit; LlamaIndex OpenAI with its defaults;
* tenacity (4 attempts, random exponential backoff 0.1-2 s) around openai(max_retries=0);
* LiteLLM Router (num_retries=3), without and with the rpm told (when litellm imports);
* ours, *not told* the limit: ResilientOpenAIClient and LangChain ResilientLLM over
  ChatOpenAI(max_retries=0), "balanced" preset (pacing on by default).

Then a token-limited run (long prompts; the server's tokens-per-minute bucket binds, not
its request bucket), and, with `--processes N`, N processes of ours sharing one limit,
each learning it from the headers on its own (no shared store).

Columns: calls answered live, served degraded, errors; 429s over all requests; 429s over
the requests sent after the first second (the pacer learns the limit from the first
answers); goodput = live answers (tokens, for the token run) per second over the whole
run divided by the server's limit, and over the time after the first second. In
parentheses when the contender had errors or degraded answers (not comparable).
Targets for ours: goodput after the first second >= 0.95, 429s <= 1 % after the first
second, 0 errors, 0 degraded.
Results: benchmarks/results/ratelimit.json and ratelimit.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, machine_info, markdown_table, write_json

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import ChaosServer
from rag_resilience.chaos.server import FaultEvent

MODEL = "gpt-4o-mini"
SHORT = [{"role": "user", "content": "What is a circuit breaker?"}]
LONG = [{"role": "user", "content": "Explain rate limits and token buckets in depth. " * 30}]
BURST = 5

Call = Callable[[], str]  # one user call: "live" or "degraded"; raises on error


def _openai(server: ChaosServer, key: str, **kw: Any) -> Any:
    import openai

    return openai.OpenAI(api_key=key, base_url=server.base_url, **kw)


def contender_calls(name: str, server: ChaosServer, key: str, rps: float, messages: Any) -> Call:
    """Build contender `name` once; returns the function one user call runs."""
    if name == "openai-sdk":
        client = _openai(server, key)

        def call() -> str:
            client.chat.completions.create(model=MODEL, messages=messages)
            return "live"

        return call
    if name in ("langchain", "langchain+InMemoryRateLimiter(told)"):
        from langchain_core.rate_limiters import InMemoryRateLimiter
        from langchain_openai import ChatOpenAI

        limiter = None
        if name != "langchain":
            limiter = InMemoryRateLimiter(
                requests_per_second=rps, check_every_n_seconds=0.005, max_bucket_size=1
            )
        llm = ChatOpenAI(model=MODEL, base_url=server.base_url, api_key=key, rate_limiter=limiter)
        text = messages[0]["content"]

        def call() -> str:
            llm.invoke(text)
            return "live"

        return call
    if name == "llamaindex":
        from llama_index.core.base.llms.types import ChatMessage
        from llama_index.llms.openai import OpenAI

        li = OpenAI(model=MODEL, api_base=server.base_url, api_key=key)
        msgs = [ChatMessage(role="user", content=messages[0]["content"])]

        def call() -> str:
            li.chat(msgs)
            return "live"

        return call
    if name == "tenacity":
        import tenacity

        client = _openai(server, key, max_retries=0)

        @tenacity.retry(
            stop=tenacity.stop_after_attempt(4),
            wait=tenacity.wait_random_exponential(multiplier=0.1, max=2.0),
            reraise=True,
        )
        def call() -> str:
            client.chat.completions.create(model=MODEL, messages=messages)
            return "live"

        return call
    if name.startswith("litellm"):
        from litellm import Router

        params: dict[str, Any] = {
            "model": f"openai/{MODEL}",
            "api_base": server.base_url,
            "api_key": key,
        }
        if "rpm" in name:
            params["rpm"] = int(rps * 60)
        router = Router(model_list=[{"model_name": MODEL, "litellm_params": params}], num_retries=3)

        def call() -> str:
            router.completion(model=MODEL, messages=messages)
            return "live"

        return call
    if name == "ours-openai":
        from rag_resilience.openai_client import ResilientOpenAIClient

        ours = ResilientOpenAIClient(api_key=key, base_url=server.base_url, policy="balanced")

        def call() -> str:
            result = ours.chat.completions.create(model=MODEL, messages=messages)
            return "degraded" if result.resilience["degraded"] else "live"

        return call
    if name == "ours-langchain":
        from langchain_openai import ChatOpenAI

        from rag_resilience.langchain import ResilientLLM

        wrapped = ResilientLLM(
            ChatOpenAI(model=MODEL, base_url=server.base_url, api_key=key, max_retries=0),
            policy=ResiliencePolicy.preset("balanced", name="bench-langchain"),
        )
        text = messages[0]["content"]

        def call() -> str:
            msg = wrapped.invoke(text)
            return "degraded" if msg.response_metadata["resilience"]["degraded"] else "live"

        return call
    raise ValueError(f"unknown contender {name!r}")


CONTENDERS = [
    "openai-sdk",
    "langchain",
    "langchain+InMemoryRateLimiter(told)",
    "llamaindex",
    "tenacity",
    "litellm-router",
    "litellm-router+rpm",
    "ours-openai",
    "ours-langchain",
]
OURS = ("ours-openai", "ours-langchain")


def _litellm_available() -> bool:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    try:
        import litellm  # noqa: F401
    except Exception:
        return False
    return True


class _Faults:
    """429 times, from the server's fault callback (thread-safe appends)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, event: FaultEvent) -> None:
        if event.status == 429:
            self.times.append(time.monotonic())


def run_one(
    server: ChaosServer,
    faults: _Faults,
    name: str,
    *,
    calls: int,
    threads: int,
    rps: float,
    messages: Any,
    unit_tokens: int | None = None,
    limit_per_s: float,
) -> dict[str, Any]:
    """`calls` user calls on `threads` threads through contender `name`."""
    key = f"sk-bench-{name}-{time.monotonic_ns()}"
    call = contender_calls(name, server, key, rps, messages)
    server.reset()
    server.wait_idle()
    faults.times.clear()
    outcomes: dict[str, int] = {"live": 0, "degraded": 0, "errors": 0}
    done_at: list[float] = []  # when each live answer arrived
    errors: dict[str, int] = {}
    lock = threading.Lock()
    todo = iter(range(calls))
    first_second: list[int] = []

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            try:
                how = call()
            except Exception as exc:
                with lock:
                    outcomes["errors"] += 1
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            with lock:
                outcomes[how] += 1
                if how == "live":
                    done_at.append(time.monotonic())

    def mark_first_second() -> None:
        first_second.append(server.stats()["requests"])

    timer = threading.Timer(1.0, mark_first_second)
    started = time.monotonic()
    timer.start()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - started
    timer.cancel()
    server.wait_idle()
    stats = server.stats()
    requests = stats["requests"]
    throttled = stats["statuses"].get(429, 0)
    late_requests = requests - (first_second[0] if first_second else requests)
    late_429 = sum(1 for t in faults.times if t > started + 1.0)
    answered = outcomes["live"] + outcomes["degraded"]
    per_s = outcomes["live"] * (unit_tokens or 1) / elapsed
    # steady state: the answers after the first second, over the time after it
    late = sum(1 for t in done_at if t > started + 1.0)
    steady = late * (unit_tokens or 1) / (elapsed - 1.0) if elapsed > 1.5 else per_s
    return {
        "contender": name,
        "calls": calls,
        "live": outcomes["live"],
        "degraded": outcomes["degraded"],
        "errors": outcomes["errors"],
        "error_types": errors,
        "requests": requests,
        "429s": throttled,
        "429_rate": throttled / requests if requests else 0.0,
        "late_requests": late_requests,
        "late_429s": late_429,
        "late_429_rate": late_429 / late_requests if late_requests > 0 else 0.0,
        "elapsed_s": round(elapsed, 3),
        "answered": answered,
        "goodput": per_s / limit_per_s,
        "steady_goodput": steady / limit_per_s,
        # when each live answer came (s from the start): the goodput-over-time plot
        "answer_times": [round(t - started, 4) for t in sorted(done_at)],
    }


def plot(report: dict[str, Any], path: Path, bin_s: float = 0.5) -> None:
    """Goodput over time per contender (live answers per second / the limit, in `bin_s`
    bins) of the one-process request-limit run: matplotlib, from the JSON report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rps = float(report["settings"]["rps"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for row in report["requests"]:
        times = row.get("answer_times") or []
        if not times:
            continue
        bins = int(max(times) / bin_s) + 1
        counts = [0] * bins
        for t in times:
            counts[int(t / bin_s)] += 1
        xs = [(i + 1) * bin_s for i in range(bins)]
        ours = row["contender"] in OURS
        ax.step(
            xs,
            [c / bin_s / rps for c in counts],
            where="post",
            label=row["contender"],
            linewidth=2.2 if ours else 1.0,
        )
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("goodput (live answers/s / limit)")
    ax.set_title(f"Request limit {rps:g}/s, {report['settings']['threads']} threads")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(r: dict[str, Any]) -> list[Any]:
    clean = r["errors"] == 0 and r["degraded"] == 0
    return [
        r["contender"],
        r["live"],
        r["degraded"],
        r["errors"],
        f"{r['429_rate']:.0%} ({r['429s']}/{r['requests']})",
        f"{r['late_429_rate']:.1%}",
        f"{r['goodput']:.2f}" if clean else f"({r['goodput']:.2f})",
        f"{r['steady_goodput']:.2f}" if clean else f"({r['steady_goodput']:.2f})",
        f"{r['elapsed_s']:.1f}",
    ]


HEADERS = [
    "contender",
    "live",
    "degraded",
    "errors",
    "429s / requests",
    "429s after 1st s",
    "goodput",
    "after 1st s",
    "wall s",
]


def _targets(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    out = {}
    for r in rows:
        if r["contender"] not in OURS and not r["contender"].startswith("ours"):
            continue
        out[f"{label}:{r['contender']}"] = {
            "steady_goodput_ge_0.95": r["steady_goodput"] >= 0.95,
            "late_429_le_1pct": r["late_429_rate"] <= 0.01,
            "no_errors": r["errors"] == 0,
            "no_degraded": r["degraded"] == 0,
        }
    return out


# ------------------------------------------------------------------ several processes
def _process_main(
    base_url: str, key: str, calls: int, threads: int, out: Any, redis: str | None, prefix: str
) -> None:
    logging.disable(logging.WARNING)
    from rag_resilience.openai_client import ResilientOpenAIClient
    from rag_resilience.stores.redis import RedisStore

    store = RedisStore(redis, prefix=prefix) if redis else None
    policy = ResiliencePolicy.preset("balanced", name="bench-procs", store=store)
    ours = ResilientOpenAIClient(api_key=key, base_url=base_url, policy=policy)
    counts: dict[str, Any] = {"live": 0, "degraded": 0, "errors": 0, "done_at": []}
    lock = threading.Lock()
    todo = iter(range(calls))

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            try:
                r = ours.chat.completions.create(model=MODEL, messages=SHORT)
                how = "degraded" if r.resilience["degraded"] else "live"
            except Exception:
                how = "errors"
            with lock:
                counts[how] += 1
                if how == "live":  # CLOCK_MONOTONIC: comparable across processes
                    counts["done_at"].append(time.monotonic())

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(counts)


def run_processes(
    server: ChaosServer,
    faults: _Faults,
    n: int,
    *,
    calls: int,
    threads: int,
    rps: float,
    redis: str | None,
) -> dict[str, Any]:
    key = f"sk-bench-procs-{time.monotonic_ns()}"
    server.reset()
    server.wait_idle()
    faults.times.clear()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_process_main,
            args=(server.base_url, key, calls // n, threads // n or 1, queue, redis, key),
        )
        for _ in range(n)
    ]
    first_second: list[int] = []
    for p in procs:
        p.start()
    # the clock starts when the processes are up: count from the first request
    while server.stats()["requests"] == 0 and any(p.is_alive() for p in procs):
        time.sleep(0.001)
    started = time.monotonic()
    timer = threading.Timer(1.0, lambda: first_second.append(server.stats()["requests"]))
    timer.start()
    totals = {"live": 0, "degraded": 0, "errors": 0}
    done_at: list[float] = []
    for _ in procs:
        got = queue.get()
        done_at += got.pop("done_at")
        for k, v in got.items():
            totals[k] += v
    elapsed = time.monotonic() - started
    for p in procs:
        p.join()
    timer.cancel()
    server.wait_idle()
    stats = server.stats()
    requests = stats["requests"]
    throttled = stats["statuses"].get(429, 0)
    late_requests = requests - (first_second[0] if first_second else requests)
    late_429 = sum(1 for t in faults.times if t > started + 1.0)
    return {
        "contender": f"ours-openai x{n} processes, "
        + ("buckets shared in Redis" if redis else "no shared store"),
        "calls": calls,
        **totals,
        "error_types": {},
        "requests": requests,
        "429s": throttled,
        "429_rate": throttled / requests if requests else 0.0,
        "late_requests": late_requests,
        "late_429s": late_429,
        "late_429_rate": late_429 / late_requests if late_requests > 0 else 0.0,
        "elapsed_s": round(elapsed, 3),
        "answered": totals["live"] + totals["degraded"],
        "goodput": totals["live"] / elapsed / rps,
        "steady_goodput": sum(1 for t in done_at if t > started + 1.0) / (elapsed - 1.0) / rps
        if elapsed > 1.5
        else totals["live"] / elapsed / rps,
    }


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 calls, 2 contenders")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rps", type=float, default=40.0)
    parser.add_argument("--tpm", type=float, default=60 * 8000.0)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip")
    parser.add_argument("--only", default="", help="comma-separated contender names")
    parser.add_argument("--redis-only", action="store_true", help="skip the unshared run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--plot", type=Path, default=None, help="draw goodput over time (png) from --json data"
    )
    args = parser.parse_args(argv)
    if args.plot is not None:
        plot(json.loads((args.json or RESULTS_DIR / "ratelimit.json").read_text()), args.plot)
        return
    logging.disable(logging.WARNING)  # the contenders' retry warnings are not the point

    names = [n for n in CONTENDERS if not args.only or n in args.only.split(",")]
    if args.quick:
        args.calls, names, args.processes = 60, [n for n in names if n in OURS][:1], 0
    if not _litellm_available():
        names = [n for n in names if not n.startswith("litellm")]
    faults = _Faults()
    report: dict[str, Any] = {"machine": machine_info(), "settings": vars(args) | {"json": None}}
    with ChaosServer(
        seed=1, rate_limit_rps=args.rps, rate_limit_burst=BURST, on_fault=faults
    ) as server:
        rows = [
            run_one(
                server, faults, name, calls=args.calls, threads=args.threads, rps=args.rps,
                messages=SHORT, limit_per_s=args.rps,
            )
            for name in names
        ]  # fmt: skip
        report["requests"] = rows
        print(f"\nRequest limit {args.rps:g}/s (burst {BURST}), {args.calls} calls on "
              f"{args.threads} threads, one process:\n")  # fmt: skip
        print(markdown_table(HEADERS, [_row(r) for r in rows]))
        if args.processes > 1:
            report["processes"] = [
                run_processes(
                    server, faults, args.processes, calls=args.calls, threads=args.threads,
                    rps=args.rps, redis=redis,
                )
                for redis in (None, args.redis or None)
                if redis is not None or not args.redis_only
            ]  # fmt: skip
            print(f"\n{args.processes} processes, one API key, one server limit:\n")
            print(markdown_table(HEADERS, [_row(r) for r in report["processes"]]))
    # tokens: long prompts against a tokens-per-minute bucket (requests unlimited)
    from rag_resilience.chaos.ratelimits import request_cost

    unit = request_cost("chat", json.dumps({"model": MODEL, "messages": LONG}).encode())
    tok_names = [n for n in names if n in ("openai-sdk", "langchain", *OURS)]
    with ChaosServer(
        seed=2, rate_limit_tpm=args.tpm, rate_limit_token_burst=int(args.tpm / 60), on_fault=faults
    ) as server:
        tok_rows = [
            run_one(
                server, faults, name, calls=args.calls, threads=args.threads, rps=args.rps,
                messages=LONG, unit_tokens=unit, limit_per_s=args.tpm / 60,
            )
            for name in tok_names
        ]  # fmt: skip
    report["tokens"] = tok_rows
    print(f"\nToken limit {args.tpm / 60:g} tokens/s, {unit} tokens per call:\n")
    print(markdown_table(HEADERS, [_row(r) for r in tok_rows]))
    targets = _targets(rows, "requests") | _targets(tok_rows, "tokens")
    if "processes" in report:
        shared = [r for r in report["processes"] if "Redis" in r["contender"]]
        targets |= _targets(shared, "processes")
    report["targets"] = targets
    print()
    for label, checks in targets.items():
        verdict = "MET" if all(checks.values()) else "MISSED"
        print(f"target {label}: {verdict} {checks}")
    path = write_json("ratelimit", report, args.json)
    if args.json is None:
        md = RESULTS_DIR / "ratelimit.md"
        md.write_text(
            "# Rate limits\n\n## Request limit, one process\n\n"
            + markdown_table(HEADERS, [_row(r) for r in rows])
            + (
                "\n\n## Several processes\n\n"
                + markdown_table(HEADERS, [_row(r) for r in report["processes"]])
                if "processes" in report
                else ""
            )
            + "\n\n## Token limit\n\n"
            + markdown_table(HEADERS, [_row(r) for r in tok_rows])
            + "\n",
            encoding="utf-8",
        )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
