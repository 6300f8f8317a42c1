"""Recovery benchmark (issue 15): what the breaker counts, and what a crowd gets right
after an outage.

Part 1, counting (simulated on a fake clock, 50 calls/s, seeded): live answers under 20% and
50% random 503s with 4 attempts per call, and how fast a full outage opens the circuit,
for several counting designs side by side: the first release's preset (5 consecutive
failed attempts, retry budget 20%), consecutive attempts scaled to the seed's threshold in
calls, and a failure rate over a window (resilience4j / Polly style).

Part 2, recovery over real HTTP (the real ChatOpenAI through ResilientLLM against the chaos
server): after an outage opened the circuit and the open period passed, a batch of 50 with
max_concurrency=10 on the recovered API: live answers and upstream requests, with probe-wait
and slow start on (ours) and off (the first release's half-open: one probe, the rest
rejected), and a crowd of 500 callers waiting on the probe: the most requests in flight
against the ramp's bound.

Usage: python benchmarks/recovery.py [--quick | --smoke] [--out DIR]
Writes DIR/recovery.md and DIR/recovery.json (default benchmarks/results). --smoke: every
part, shrunk to a few seconds (tests/test_benchmarks_smoke.py); its numbers mean little.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import machine_info, markdown_table  # noqa: E402

from rag_resilience import ResiliencePolicy  # noqa: E402
from rag_resilience.testing import FakeClock  # noqa: E402

DEFAULT_OUT = HERE / "results"


class Http503(Exception):
    status_code = 503


# ------------------------------------------------------------------------- part 1: counting
COUNTING: dict[str, dict[str, Any]] = {
    "first release: 5 consecutive attempts, budget 20%": {
        "failure_threshold": 5,
        "retry_budget_ratio": 0.2,
    },
    "5 consecutive attempts, budget 100%": {"failure_threshold": 5, "retry_budget_ratio": 1.0},
    "rate >= 90% of attempts (min 20), budget 100%": {
        "mode": "rate",
        "failure_rate_threshold": 0.9,
        "minimum_calls": 20,
        "retry_budget_ratio": 1.0,
    },
    'preset count="calls": 5 calls x 4 attempts = 20 in a row, budget 100%': {
        "count": "calls",
    },
}


def _policy(clock: FakeClock, cfg: dict[str, Any]) -> ResiliencePolicy:
    from rag_resilience.backoff import RetryBudget
    from rag_resilience.breaker import CircuitBreaker

    overrides: dict[str, Any] = (
        {"count": "calls"}
        if cfg.get("count") == "calls"
        else {
            "count": "attempts",  # these rows count attempts (the preset default is "calls")
            "retry_budget": RetryBudget(cfg.get("retry_budget_ratio", 0.2), clock=clock),
            "failure_threshold": cfg.get("failure_threshold", 5),
        }
    )
    policy = ResiliencePolicy.preset(
        "balanced", name="count", clock=clock, generic_fallback=True, **overrides
    )
    if cfg.get("mode") == "rate":
        b = policy.breaker
        assert b is not None
        policy.breaker = CircuitBreaker(
            b.failure_threshold,
            b.recovery_timeout,
            mode="rate",
            failure_rate_threshold=cfg["failure_rate_threshold"],
            minimum_calls=cfg["minimum_calls"],
            window_seconds=10.0,
            min_recovery_timeout=b.min_recovery_timeout,
            name="count-rate",
            clock=clock,
        )
    return policy


def simulate(cfg: dict[str, Any], error_rate: float, calls: int, seed: int) -> dict[str, Any]:
    clock = FakeClock()
    rng = random.Random(seed)
    policy = _policy(clock, cfg)
    sent = [0]

    def upstream() -> str:
        sent[0] += 1
        if rng.random() < error_rate:
            raise Http503("503 overloaded")
        return "ok"

    live = 0
    for _ in range(calls):
        clock.advance(0.02)  # 50 calls/s
        live += policy.run(upstream).source == "live"
    return {"live_frac": live / calls, "requests_per_call": round(sent[0] / calls, 3)}


def outage_opens(cfg: dict[str, Any]) -> dict[str, Any]:
    """A full outage, one caller at a time (the slowest case for every design; with many
    callers attempts interleave and a count opens sooner, see chaos.py's outage): failed
    attempts and calls until the circuit opens (None: not within 1,000 calls)."""
    clock = FakeClock()
    policy = _policy(clock, cfg)
    breaker = policy.breaker
    assert breaker is not None
    sent = [0]

    def down() -> str:
        sent[0] += 1
        raise Http503("503")

    for n in range(1, 1_001):
        clock.advance(0.02)
        policy.run(down)
        if breaker.get_state().value == "open":
            return {"attempts_to_open": sent[0], "calls_to_open": n}
    return {"attempts_to_open": None, "calls_to_open": None}


def part_counting(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    calls = 200 if smoke else 2_000 if quick else 20_000
    rows = []
    for name, cfg in COUNTING.items():
        row: dict[str, Any] = {"design": name}
        for rate in (0.2, 0.5):
            r = simulate(cfg, rate, calls, seed=int(rate * 100))
            row[f"live_{int(rate * 100)}"] = round(r["live_frac"], 4)
            row[f"requests_per_call_{int(rate * 100)}"] = r["requests_per_call"]
        row.update(outage_opens(cfg))
        row["hot_path_cost"] = "one window update per success" if cfg.get("mode") else "none"
        rows.append(row)
    return rows


# ------------------------------------------------------------------ part 2: recovery (HTTP)
def part_recovery(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    from langchain_openai import ChatOpenAI

    from rag_resilience.chaos import ChaosServer
    from rag_resilience.langchain import ResilientLLM
    from rag_resilience.testing import fake_clock

    rows = []
    configs = {
        "ours (probe-wait + slow start)": {},
        "first release (half-open rejects; no ramp)": {"probe_wait": 0, "slow_start": False},
    }
    with ChaosServer(seed=15) as server, fake_clock() as clock:
        for name, overrides in configs.items():
            server.reset()
            server.clear_faults()
            policy = ResiliencePolicy.preset(
                "balanced", name=f"rec-{len(rows)}", generic_fallback=True, **overrides
            )
            llm = ResilientLLM(
                ChatOpenAI(
                    model="gpt-4o-mini", max_retries=0, base_url=server.base_url, api_key="sk-x"
                ),
                policy=policy,
                upstream="",
            )
            breaker = policy.breaker
            assert breaker is not None
            server.set_faults(outage=True)
            while breaker.get_state().value != "open":
                llm.invoke("during the outage")
            server.set_faults(outage=False)
            clock.advance(breaker.retry_after() + 0.01)
            server.wait_idle()
            server.set_faults(latency=0.05)  # an answer takes 50 ms (a real one: seconds)
            before = server.stats()["endpoints"]["chat"]["requests"]
            answers = llm.batch([f"q{i}" for i in range(50)], config={"max_concurrency": 10})
            server.wait_idle()
            requests = server.stats()["endpoints"]["chat"]["requests"] - before
            live = sum(a.response_metadata["resilience"]["source"] == "live" for a in answers)
            rows.append(
                {
                    "contender": name,
                    "batch_live": live,
                    "batch_generic": 50 - live,
                    "batch_upstream_requests": requests,
                }
            )
    rows[0].update(crowd_of_500(quick, smoke))
    return rows


def crowd_of_500(quick: bool, smoke: bool = False) -> dict[str, Any]:
    """500 threads wait on a probe; the upstream is a counter of calls in flight (real
    threads, no HTTP, 1 ms per call): the most in flight against the ramp's bound."""
    import time

    from rag_resilience.breaker import CircuitBreaker
    from rag_resilience.limits import ConcurrencyLimit
    from rag_resilience.slowstart import SlowStart

    n = 50 if smoke else 200 if quick else 500
    clock = FakeClock()
    ramp = SlowStart(64, initial=1)
    breaker = CircuitBreaker(5, 60.0, clock=clock, name="crowd", slow_start=ramp)
    limit = ConcurrencyLimit(64, max_waiting=1000, name="crowd")
    policy = ResiliencePolicy(breaker=breaker, limit=limit, clock=clock, name="crowd")
    breaker.force_open()
    clock.advance(60.0)
    lock = threading.Lock()
    state = {"now": 0, "done": 0, "over": 0, "peak": 0}
    gate = threading.Event()

    def upstream() -> str:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            if ramp.active and state["now"] > ramp.initial + state["done"]:
                state["over"] += 1
        time.sleep(0.001)
        with lock:
            state["now"] -= 1
            state["done"] += 1
        return "ok"

    def probe() -> str:
        gate.wait(10)
        return upstream()

    first = threading.Thread(target=lambda: policy.run(probe))
    first.start()
    while breaker.stats()["probes_in_flight"] == 0:
        time.sleep(0.001)
    threads = [threading.Thread(target=lambda: policy.run(upstream)) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in [first, *threads]:
        t.join(30)
    return {
        "crowd": n,
        "crowd_peak_in_flight": state["peak"],
        "crowd_over_ramp": state["over"],
        "crowd_limit": 64,
        "crowd_ramp_peak": ramp.peak_in_flight,
    }


# ------------------------------------------------------- part 3: nothing to degrade to
def part_wait(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    """A 2 s outage, one call per 50 ms tick in its own thread, the raw openai SDK (its
    defaults) against ResilientOpenAIClient (its defaults: no fallback model, no cache
    key, generic answers off), real time: calls that raised, and raised after recovery."""
    import time

    import openai

    from rag_resilience.chaos import ChaosServer
    from rag_resilience.openai_client import ResilientOpenAIClient

    pre, down, post = (0.1, 0.3, 0.2) if smoke else (0.5, 2.0, 2.5)
    ticks = int((pre + down + post) / 0.05)
    rows = []
    with ChaosServer(seed=4) as server:
        for who in ("openai-sdk", "ours-openai"):
            server.reset()
            server.clear_faults()
            client: Any
            if who == "openai-sdk":
                client = openai.OpenAI(api_key="sk-x", base_url=server.base_url)
            else:
                client = ResilientOpenAIClient(api_key="sk-x", base_url=server.base_url)
            results: list[tuple[float, bool]] = []
            lock = threading.Lock()
            t0 = time.monotonic()

            def one(
                i: int,
                client: Any = client,
                t0: float = t0,
                results: list[tuple[float, bool]] = results,
                lock: threading.Lock = lock,
            ) -> None:
                start = time.monotonic() - t0
                try:
                    client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i % 7}"}]
                    )
                    raised = False
                except Exception:
                    raised = True
                with lock:
                    results.append((start, raised))

            threads = []
            for i in range(ticks):
                at = t0 + i * 0.05
                if i == int(pre / 0.05):
                    server.set_faults(outage=True)
                if i == int((pre + down) / 0.05):
                    server.set_faults(outage=False)
                time.sleep(max(0.0, at - time.monotonic()))
                thread = threading.Thread(target=one, args=(i,))
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join(120)
            back = pre + down
            rows.append(
                {
                    "contender": who,
                    "calls": len(results),
                    "raised": sum(r for _, r in results),
                    "raised_after_back": sum(r for s, r in results if s >= back),
                }
            )
    return rows


# ------------------------------------------------------------------ part 4: failover
def part_failover(quick: bool) -> list[dict[str, Any]]:
    """A dead primary (every request 503) and a healthy fallback model, 50 calls through
    ResilientLLM: calls raised, the longest a call spent on the primary (its backoff, on the
    fake clock, plus its requests), requests sent to the dead primary."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_openai import ChatOpenAI

    from rag_resilience.chaos import ChaosServer
    from rag_resilience.langchain import ResilientLLM
    from rag_resilience.testing import fake_clock

    rows = []
    with ChaosServer(seed=5) as server:
        for mode in ("after_retries", "immediate"):
            server.reset()
            server.set_faults(outage=True)
            with fake_clock() as clock:
                policy = ResiliencePolicy.preset("balanced", name=f"fo-{mode}", failover=mode)
                llm = ResilientLLM(
                    ChatOpenAI(
                        model="gpt-4o-mini", max_retries=0, base_url=server.base_url, api_key="x"
                    ),
                    policy=policy,
                    fallback_models=[FakeListChatModel(responses=["backup"] * 100)],
                    upstream="",
                )
                raised, longest = 0, 0.0
                for i in range(50):
                    slept = clock.total_slept
                    try:
                        llm.invoke(f"q{i}")
                    except Exception:
                        raised += 1
                    longest = max(longest, clock.total_slept - slept)
                    clock.advance(0.02)
            server.wait_idle()
            rows.append(
                {
                    "failover": mode,
                    "raised": raised,
                    "longest_wait_on_primary_s": round(longest, 2),
                    "primary_requests": server.stats()["endpoints"]["chat"]["requests"],
                }
            )
    return rows


# ----------------------------------------------------------------------------------- report
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for the tests")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.getLogger("rag_resilience").setLevel(logging.CRITICAL)
    quick, smoke = args.quick or args.smoke, args.smoke
    counting = part_counting(quick, smoke)
    recovery = part_recovery(quick, smoke)
    waiting = part_wait(quick, smoke)
    failover = part_failover(quick)
    report = {
        "settings": {"quick": quick, "smoke": smoke},
        "failover": failover,
        "machine": machine_info(),
        "counting": counting,
        "recovery": recovery,
        "wait_dont_fail": waiting,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Recovery benchmark",
        "",
        "## What the breaker counts (50 calls/s, 4 attempts per call, fake clock)",
        "",
        markdown_table(
            [
                "design",
                "live @20% 503",
                "live @50% 503",
                "requests/call @50%",
                "outage: attempts to open",
                "outage: calls to open",
                "hot-path cost",
            ],
            [
                [
                    r["design"],
                    f"{r['live_20']:.2%}",
                    f"{r['live_50']:.2%}",
                    r["requests_per_call_50"],
                    r["attempts_to_open"],
                    r["calls_to_open"],
                    r["hot_path_cost"],
                ]
                for r in counting
            ],
        ),
        "",
        "## A batch of 50 (max_concurrency=10) right after recovery, real HTTP",
        "",
        markdown_table(
            ["contender", "live", "generic", "upstream requests"],
            [
                [r["contender"], r["batch_live"], r["batch_generic"], r["batch_upstream_requests"]]
                for r in recovery
            ],
        ),
        "",
        f"Crowd of {recovery[0]['crowd']} callers waiting on the probe (limit 64, ramp from 1): "
        f"peak {recovery[0]['crowd_peak_in_flight']} in flight, "
        f"{recovery[0]['crowd_over_ramp']} admissions over the ramp.",
        "",
        f"## Nothing to degrade to: a {0.3 if smoke else 2:g} s outage, one call per 50 ms "
        "tick, real time",
        "",
        markdown_table(
            ["contender", "calls", "raised", "raised after the API was back"],
            [[r["contender"], r["calls"], r["raised"], r["raised_after_back"]] for r in waiting],
        ),
        "",
        "## A dead primary and a healthy fallback model: 50 calls (backoff on the fake clock)",
        "",
        markdown_table(
            ["failover", "raised", "longest backoff on the primary (s)", "requests to primary"],
            [
                [r["failover"], r["raised"], r["longest_wait_on_primary_s"], r["primary_requests"]]
                for r in failover
            ],
        ),
        "",
    ]
    text = "\n".join(lines)
    (args.out / "recovery.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
