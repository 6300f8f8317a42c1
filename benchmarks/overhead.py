"""What does resilience cost when nothing fails? Per-call overhead on the success path.

Usage: python benchmarks/overhead.py [--quick] [--repeat 7] [--target-s 0.1] [--json PATH]

Every case wraps the same no-op function and runs side by side in this one process:
the bare call, each of our components alone, the full `ResiliencePolicy` (concurrency
limit + retry loop + circuit breaker + last-known-good cache write, preset "balanced",
``key="q"``), and the anchors people compare us with: tenacity's ``@retry``
(stop_after_attempt(4), wait_exponential_jitter), tenacity around a pybreaker
CircuitBreaker, and stamina (``stamina.retry(on=Exception, attempts=4)``, testing mode off,
i.e. what production runs). Then the async twins of each.

Each case is a timeit-style inline loop, calibrated to about `--target-s` seconds per run,
repeated `--repeat` times round-robin across cases, timed in process CPU time by default
(`--clock wall` for perf_counter); the table shows the median per-call
time, the time added over the bare call, the ratio to the bare call and to tenacity (same
sync/async group). Machines are noisy: compare ratios across machines, and absolute µs
only within one run. Results go to benchmarks/results/overhead.json.

Targets (issue 3): the full policy adds at most 5 µs per call and less than tenacity's
@retry alone; the breaker alone adds under 1 µs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pybreaker
import stamina
import tenacity
from _common import (
    CLOCKS,
    RESULTS_DIR,
    Runner,
    Timing,
    async_runner,
    machine_info,
    markdown_table,
    measure,
    sync_runner,
    write_json,
)

from rag_resilience.breaker import CircuitBreaker
from rag_resilience.limits import ConcurrencyLimit
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.retry import RetryStrategy

BARE = "bare call"
TENACITY = "tenacity @retry"
POLICY = "ResiliencePolicy.call (balanced, key)"
BREAKER = "CircuitBreaker.call"
TARGET_POLICY_ADDED_US = 5.0
TARGET_BREAKER_ADDED_US = 1.0
TENACITY_REFERENCE_US = 14.0  # tenacity @retry's added cost where the 5 µs target was set

# (group, name, statement). Statements are inlined into the timing loop.
CASES: list[tuple[str, str, str]] = [
    ("sync", BARE, "noop()"),
    ("sync", "RetryStrategy.execute", "retry.execute(noop)"),
    ("sync", BREAKER, "breaker.call(noop)"),
    ("sync", "ConcurrencyLimit.slot", "with limit.slot():\n    noop()"),
    ("sync", "ResiliencePolicy.call (balanced, no key)", "policy.call(noop)"),
    ("sync", POLICY, "policy.call(noop, key='q')"),
    (
        "sync",
        "ResiliencePolicy.call (balanced, key, rate_limit=False)",
        "unpaced.call(noop, key='q')",
    ),
    ("sync", TENACITY, "tenacity_noop()"),
    ("sync", "tenacity @retry + pybreaker", "tenacity_pybreaker_noop()"),
    ("sync", "stamina.retry", "stamina_noop()"),
    ("async", BARE, "await anoop()"),
    ("async", "RetryStrategy.aexecute", "await retry.aexecute(anoop)"),
    ("async", BREAKER.replace(".call", ".acall"), "await breaker.acall(anoop)"),
    ("async", "ConcurrencyLimit.aslot", "async with limit.aslot():\n    await anoop()"),
    ("async", "ResiliencePolicy.acall (balanced, no key)", "await policy.acall(anoop)"),
    ("async", POLICY.replace(".call", ".acall"), "await policy.acall(anoop, key='q')"),
    (
        "async",
        "ResiliencePolicy.acall (balanced, key, rate_limit=False)",
        "await unpaced.acall(anoop, key='q')",
    ),
    ("async", TENACITY, "await tenacity_anoop()"),
    ("async", "tenacity @retry + pybreaker.calling()", "await tenacity_pybreaker_anoop()"),
    ("async", "stamina.retry", "await stamina_anoop()"),
]


def noop() -> int:
    return 1


async def anoop() -> int:
    return 1


def build_namespace() -> dict[str, Any]:
    """The objects under test, configured like the balanced preset where it applies."""
    # Our components, each alone (default listeners: the global logging listener).
    retry = RetryStrategy(max_retries=3, initial_delay=1.0, max_delay=30.0)
    breaker = CircuitBreaker(failure_threshold=5, recovery_timeout=60.0, name="bench")
    limit = ConcurrencyLimit(64, max_waiting=1000, name="bench")
    policy = ResiliencePolicy.preset("balanced")  # paces (rate limits) by default
    unpaced = ResiliencePolicy.preset("balanced", rate_limit=False)

    stop, wait = tenacity.stop_after_attempt(4), tenacity.wait_exponential_jitter()
    pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    apb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)

    @tenacity.retry(stop=stop, wait=wait)
    def tenacity_noop() -> int:
        return 1

    @tenacity.retry(stop=stop, wait=wait)
    @pb
    def tenacity_pybreaker_noop() -> int:
        return 1

    @stamina.retry(on=Exception, attempts=4)
    def stamina_noop() -> int:
        return 1

    @tenacity.retry(stop=stop, wait=wait)
    async def tenacity_anoop() -> int:
        return 1

    # pybreaker's own async support needs tornado; `calling()` is its documented
    # framework-free way to guard a block, here around an await.
    @tenacity.retry(stop=stop, wait=wait)
    async def tenacity_pybreaker_anoop() -> int:
        with apb.calling():
            return await anoop()

    @stamina.retry(on=Exception, attempts=4)
    async def stamina_anoop() -> int:
        return 1

    return {
        "noop": noop,
        "anoop": anoop,
        "retry": retry,
        "breaker": breaker,
        "limit": limit,
        "policy": policy,
        "unpaced": unpaced,
        "tenacity_noop": tenacity_noop,
        "tenacity_pybreaker_noop": tenacity_pybreaker_noop,
        "stamina_noop": stamina_noop,
        "tenacity_anoop": tenacity_anoop,
        "tenacity_pybreaker_anoop": tenacity_pybreaker_anoop,
        "stamina_anoop": stamina_anoop,
    }


def sanity_check(ns: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
    """Each case must really run its wrapper on the success path (no silent no-ops)."""
    policy = ns["policy"]
    assert policy.call(noop, key="q") == 1
    assert loop.run_until_complete(policy.acall(anoop, key="q")) == 1
    assert policy.fallbacks.get_last_known_good("q") is not None, "cache write did not happen"
    assert ns["tenacity_noop"]() == 1 and ns["stamina_noop"]() == 1
    assert ns["tenacity_pybreaker_noop"]() == 1
    assert loop.run_until_complete(ns["tenacity_pybreaker_anoop"]()) == 1
    assert loop.run_until_complete(ns["stamina_anoop"]()) == 1
    assert ns["breaker"].call(noop) == 1
    policy.reset_stats()


def build_rows(timings: dict[tuple[str, str], Timing]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for (group, name), timing in timings.items():
        bare = timings[(group, BARE)].median_us
        tenacity_us = timings[(group, TENACITY)].median_us
        us = timing.median_us
        rows.append(
            {
                "group": group,
                "name": name,
                "us_per_call": round(us, 4),
                "added_us": round(us - bare, 4),
                "ratio_vs_bare": round(us / bare, 2),
                "vs_tenacity": round(us / tenacity_us, 3),
                "min_us": round(timing.min_us, 4),
                "spread_us": round(timing.spread_us, 4),
                "calls_per_repeat": timing.number,
                "repeats": len(timing.per_call),
            }
        )
    return rows


def check_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets per group, with the numbers they were decided on."""
    by = {(r["group"], r["name"]): r for r in rows}
    out: dict[str, Any] = {}
    for group in ("sync", "async"):
        suffix = "" if group == "sync" else "_async"
        policy_name = POLICY if group == "sync" else POLICY.replace(".call", ".acall")
        breaker_name = BREAKER if group == "sync" else BREAKER.replace(".call", ".acall")
        policy, breaker = by[(group, policy_name)], by[(group, breaker_name)]
        tenacity_row = by[(group, TENACITY)]
        out[f"policy_added_le_5us{suffix}"] = {
            "added_us": policy["added_us"],
            "ok": policy["added_us"] <= TARGET_POLICY_ADDED_US,
        }
        # The issue set 5 µs on a machine where tenacity's @retry added about 14 µs. This
        # shared box runs anywhere from 1x to 2x slower from one minute to the next, which
        # moves every absolute figure; the ratio to tenacity, measured in the same run,
        # does not move with it. Scaled to the reference machine:
        # (The reference is tenacity's sync figure, so only the sync group is scaled.)
        if group == "sync":
            scaled = policy["added_us"] * TENACITY_REFERENCE_US / tenacity_row["added_us"]
            out["policy_added_le_5us_at_tenacity_14us"] = {
                "scaled_added_us": round(scaled, 3),
                "vs_tenacity": round(policy["added_us"] / tenacity_row["added_us"], 4),
                "ok": scaled <= TARGET_POLICY_ADDED_US,
            }
        out[f"policy_below_tenacity{suffix}"] = {
            "policy_added_us": policy["added_us"],
            "tenacity_added_us": tenacity_row["added_us"],
            "ok": policy["added_us"] < tenacity_row["added_us"],
        }
        out[f"breaker_added_lt_1us{suffix}"] = {
            "added_us": breaker["added_us"],
            "ok": breaker["added_us"] < TARGET_BREAKER_ADDED_US,
        }
    return out


def render(rows: list[dict[str, Any]], targets: dict[str, Any], info: dict[str, Any]) -> str:
    lines = [
        f"Python {info['python']} ({info['implementation']}), {info['cpu']}, "
        f"{info['cpus']} CPU(s), {info['platform']}",
        "",
    ]
    table_rows = [
        (
            r["group"],
            r["name"],
            f"{r['us_per_call']:.3f}",
            f"{r['added_us']:+.3f}",
            f"{r['ratio_vs_bare']:.1f}x",
            f"{r['vs_tenacity']:.2f}",
            f"{r['spread_us']:.3f}",
        )
        for r in rows
    ]
    lines.append(
        markdown_table(
            [
                "group",
                "case",
                "µs/call (median)",
                "added µs",
                "vs bare",
                "vs tenacity",
                "spread µs",
            ],
            table_rows,
        )
    )
    lines.append("")
    for key, verdict in targets.items():
        detail = ", ".join(f"{k}={v}" for k, v in verdict.items() if k != "ok")
        lines.append(f"target {key}: {'MET' if verdict['ok'] else 'MISSED'} ({detail})")
    return "\n".join(lines)


def run(*, repeat: int, target_s: float, quick: bool, clock: str = "cpu") -> dict[str, Any]:
    # The default logging listener stays subscribed (it is what users get), but a
    # benchmark must not be slowed by a handler someone configured to print.
    logging.getLogger("rag_resilience").setLevel(logging.WARNING)
    ns = build_namespace()
    timer = CLOCKS[clock]
    loop = asyncio.new_event_loop()
    try:
        sanity_check(ns, loop)
        runners: dict[tuple[str, str], Runner] = {}
        for group, name, stmt in CASES:
            runners[(group, name)] = (
                sync_runner(stmt, ns, clock=timer)
                if group == "sync"
                else async_runner(stmt, ns, loop, clock=timer)
            )
        keyed = {f"{g}:{n}": r for (g, n), r in runners.items()}
        numbers = {k: 200 for k in keyed} if quick else None
        started = time.perf_counter()
        measured = measure(keyed, repeat=repeat, target_s=target_s, numbers=numbers)
        elapsed = time.perf_counter() - started
    finally:
        loop.close()
    timings = {key: measured[f"{key[0]}:{key[1]}"] for key in runners}
    rows = build_rows(timings)
    return {
        "benchmark": "overhead",
        "description": "per-call cost of the success path around a no-op function",
        "machine": machine_info(),
        "settings": {
            "repeat": repeat,
            "target_s_per_repeat": target_s,
            "quick": quick,
            "statistic": "median of repeats",
            "clock": "process CPU time" if clock == "cpu" else "wall (perf_counter)",
            "wall_s": round(elapsed, 2),
        },
        "versions": {
            "tenacity": _version("tenacity"),
            "pybreaker": _version("pybreaker"),
            "stamina": _version("stamina"),
            "rag_resilience": _version("rag-resilience"),
        },
        "rows": rows,
        "targets": check_targets(rows),
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run (200 calls x 3 repeats) for smoke tests; numbers meaningless",
    )
    parser.add_argument("--repeat", type=int, default=None, help="repeats per case (default 7)")
    parser.add_argument(
        "--target-s", type=float, default=0.1, help="seconds per repeat of one case (default 0.1)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS_DIR / "overhead.json",
        help="where to write the JSON results",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this process's CPU time (default, robust to busy neighbours); wall: perf_counter",
    )
    args = parser.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 7)
    if repeat < 1:
        parser.error("--repeat must be >= 1")
    result = run(repeat=repeat, target_s=args.target_s, quick=args.quick, clock=args.clock)
    print(render(result["rows"], result["targets"], result["machine"]))
    path = write_json("overhead", result, args.json)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
