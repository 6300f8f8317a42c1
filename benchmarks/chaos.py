"""Chaos benchmark: user-facing errors, degraded answers, upstream load and waits of the
clients people use today versus ours, against the chaos server over real HTTP.

Usage:
    python benchmarks/chaos.py [--quick] [--scenario outage,quota] [--contender ours-openai]
                               [--out DIR] [--time-scale 0.1] [--no-plots]
    rag-resilience bench [same options]

The chaos server runs in a child process (so the clients' CPU does not share its GIL);
faults are switched through its control endpoints. Each (scenario, contender) pair gets a
fresh contender, a warm-up pass over the prompt pool without faults (which also fills the
last-known-good caches: a real app has seen its popular questions before), then the
server's counters are reset, the scenario's faults are set and the same request sequence
is driven through the contender from threads.

Time is compressed by --time-scale (default 0.1: a real-world 10 s outage lasts 1 s) and
every library's delays are scaled by the same factor (see chaos_contenders.py).
Writes benchmarks/results/chaos.md, chaos.json and chaos_<scenario>.png.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import chaos_contenders as cc  # noqa: E402
import chaos_deadline as cd  # noqa: E402
from _common import machine_info, markdown_table  # noqa: E402

DEFAULT_OUT = HERE / "results"
PROMPTS = [
    f"{q}?"
    for q in (
        "What is a circuit breaker",
        "How does exponential backoff work",
        "Why add jitter to retries",
        "What does HTTP 429 mean",
        "What is a retry budget",
        "How do I cache LLM answers",
        "What is retrieval augmented generation",
        "How do embeddings work",
        "What is a vector database",
        "How to chunk documents for RAG",
        "What is the context window",
        "How to evaluate a RAG pipeline",
        "What is backpressure",
        "What is a bulkhead",
        "What does Retry-After mean",
        "What is a half-open circuit",
        "How to handle quota errors",
        "What is graceful degradation",
        "What is a dead letter queue",
        "Why are timeouts important",
        "What is tail latency",
        "How to avoid thundering herds",
        "What is idempotency",
        "What is load shedding",
    )
]


# -------------------------------------------------------------------------- chaos server
_CHILD = (
    "import sys\n"
    "from rag_resilience.chaos import ChaosServer\n"
    "s = ChaosServer(seed=int(sys.argv[1]), embedding_dim=64).start()\n"
    "print(s.port, flush=True)\n"
    "sys.stdin.read()\n"
    "s.stop()\n"
)


class RemoteChaos:
    """The chaos server in a child process, driven through /_chaos/ control endpoints."""

    def __init__(self, seed: int) -> None:
        import httpx

        env = dict(os.environ)
        src = HERE.parent / "src"
        if src.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.proc.kill()
            raise RuntimeError(f"chaos server did not start (got {line!r})")
        self.url = f"http://127.0.0.1:{line}"
        self.base_url = f"{self.url}/v1"
        self._http = httpx.Client(base_url=self.url, timeout=10.0)

    def set_faults(self, replace: bool = False, **faults: Any) -> None:
        method = "PUT" if replace else "PATCH"
        r = self._http.request(method, "/_chaos/faults", json=faults)
        r.raise_for_status()

    def reset(self) -> None:
        self._http.post("/_chaos/reset").raise_for_status()

    def stats(self) -> dict[str, Any]:
        r = self._http.get("/_chaos/stats")
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def close(self) -> None:
        self._http.close()
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()


# ------------------------------------------------------------------------------ scenarios
@dataclass
class Scenario:
    """One fault pattern and the traffic driven through it.

    `arrivals`: offsets (s) at which user calls arrive (open loop, `workers` threads),
    or None for a closed loop of `calls` calls from `workers` threads. `phases`:
    (offset s, fault changes) applied during the run (the outage switches)."""

    name: str
    title: str
    faults: dict[str, Any]
    calls: int
    workers: int
    arrivals: list[float] | None = None
    phases: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    timeout: float | None = None  # per-request timeout given to every contender


def scenarios(quick: bool, s: float) -> dict[str, Scenario]:
    """The eight scenarios; `quick` shrinks counts and phases to a smoke test."""
    q = quick

    def open_loop(rate: float, duration: float) -> list[float]:
        n = int(rate * duration)
        return [i / rate for i in range(n)]

    # rate limited: bursts of 16 every 0.2 s (80 req/s) against 100 req/s with a bucket of 10
    bursts = 4 if q else 24
    rl_arrivals = [b * 0.2 + k * 0.0005 for b in range(bursts) for k in range(16)]
    # quick: the outage must outlast the 20 failed attempts that open the presets' circuit
    # even on a loaded box (0.3 s did not, once, under CPU hogs)
    pre, down, post = (0.3, 0.8, 0.6) if q else (1.0, 10.0 * s, 2.5)
    out_arrivals = open_loop(50.0, pre + down + post)
    spike_n = 60 if q else 200
    return {
        "transient": Scenario(
            "transient",
            "5% of requests fail with 500/503 at random",
            {"error_rate": 0.025, "status": 500, "error_rates": {"503": 0.025}},
            calls=200 if q else 2000,
            workers=8,
        ),
        "rate_limited": Scenario(
            "rate_limited",
            "server limit 100 req/s (bucket 10); bursts of 16 calls every 0.2 s "
            "(80 req/s offered: fits the limit over the run); 429 + Retry-After",
            {"rate_limit_rps": 100.0, "rate_limit_burst": 10},
            calls=len(rl_arrivals),
            workers=64,
            arrivals=rl_arrivals,
        ),
        "outage": Scenario(
            "outage",
            f"steady 50 calls/s; every request 503 for {down:g} s (= {down / s:g} s "
            "real-world), then the API recovers",
            {},
            calls=len(out_arrivals),
            workers=128,
            arrivals=out_arrivals,
            phases=[(pre, {"outage": True}), (pre + down, {"outage": False})],
        ),
        "quota": Scenario(
            "quota",
            "every request: 429 insufficient_quota",
            {"outage": True, "outage_status": "insufficient_quota"},
            calls=16 if q else 60,
            workers=8,
        ),
        "spike": Scenario(
            "spike",
            f"{spike_n} calls at once; the server serves 20 at a time (50 ms each), "
            f"rejects the rest with 503 + Retry-After {1.0 * s:g} s",
            {"max_concurrency": 20, "latency": 0.05, "retry_after": 1.0 * s},
            calls=spike_n,
            workers=spike_n,
            arrivals=[0.0] * spike_n,
        ),
        "stall": Scenario(
            "stall",
            f"1 request in 50 never answered; every contender gets a {30 * s:g} s request "
            f"timeout (our attempt_timeout); our deadline is {60 * s:g} s",
            {"stall_rate": 0.02},
            calls=100 if q else 400,
            workers=16,
            timeout=30.0 * s,
        ),
        "bad_request": Scenario(
            "bad_request",
            "every request: 400 context_length_exceeded",
            {"outage": True, "outage_status": 400},
            calls=12 if q else 40,
            workers=4,
        ),
        cd.SCENARIO: Scenario(  # run by chaos_deadline.py with chains, not the contenders
            cd.SCENARIO, cd.title(s, q), {"stall": True}, calls=0, workers=0
        ),
    }


# --------------------------------------------------------------------------------- driver
@dataclass(slots=True)
class CallRec:
    index: int
    op: str
    due: float
    start: float = 0.0
    end: float = 0.0
    outcome: str = "pending"  # live | fallback | cache | generic_fallback | rejected | error
    error: str = ""
    upstream: int = 0


def _op(i: int) -> tuple[str, str]:
    """Call i: every 4th is a query embedding, the rest chat completions; prompts repeat."""
    prompt = PROMPTS[(i * 7) % len(PROMPTS)]
    return ("embed" if i % 4 == 3 else "chat"), prompt


def _invoke(contender: cc.Contender, op: str, prompt: str) -> str:
    return contender.embed(prompt) if op == "embed" else contender.chat(prompt)


def warm_up(contender: cc.Contender) -> str | None:
    """One live pass over the prompt pool (fills our caches, opens keep-alive connections)."""
    cc.set_current_call(None)
    try:
        for prompt in PROMPTS:
            contender.chat(prompt)
            contender.embed(prompt)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def drive(
    contender: cc.Contender,
    scenario: Scenario,
    server: RemoteChaos,
    t0: float,
    max_wait: float,
) -> tuple[list[CallRec], dict[str, float]]:
    """Run the scenario's calls from worker threads; returns the calls and phase times."""
    arrivals = scenario.arrivals or [0.0] * scenario.calls
    calls = [CallRec(i, _op(i)[0], arrivals[i]) for i in range(scenario.calls)]
    lock = threading.Lock()
    cursor = [0]
    marks: dict[str, float] = {}

    def worker() -> None:
        while True:
            with lock:
                i = cursor[0]
                if i >= len(calls):
                    return
                cursor[0] += 1
            rec = calls[i]
            wait = t0 + rec.due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            op, prompt = _op(i)
            cc.set_current_call(i)
            rec.start = time.perf_counter() - t0
            try:
                rec.outcome = _invoke(contender, op, prompt)
            except Exception as exc:
                rec.outcome = "error"
                rec.error = type(exc).__name__
            rec.end = time.perf_counter() - t0
            cc.set_current_call(None)

    def controller() -> None:
        for offset, change in scenario.phases:
            wait = t0 + offset - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            server.set_faults(**change)
            key = "on" if any(change.values()) else "off"
            marks[key] = time.perf_counter() - t0

    threads = [
        threading.Thread(target=worker, daemon=True, name=f"user-{k}")
        for k in range(min(scenario.workers, len(calls)))
    ]
    ctl = threading.Thread(target=controller, daemon=True)
    ctl.start()
    for t in threads:
        t.start()
    deadline = time.perf_counter() + max_wait
    for t in [ctl, *threads]:
        t.join(max(0.0, deadline - time.perf_counter()))
    for rec in calls:
        if rec.outcome == "pending":  # still blocked after max_wait: a hung user
            rec.outcome, rec.error = "error", "StillWaiting"
            rec.end = time.perf_counter() - t0
    return calls, marks


# ------------------------------------------------------------------------------- analysis
def pct(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100.0 * len(ordered)) - 1))
    return ordered[k]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 2)


LIVE = ("live", "fallback")  # answered by the API (primary or fallback model)
DEGRADED = ("cache", "generic_fallback", "rejected")


def analyse(
    scenario: Scenario,
    calls: list[CallRec],
    ups: list[cc.Upstream],
    t0: float,
    marks: dict[str, float],
    server_stats: dict[str, Any],
    opened_at: list[tuple[str, float]],
    scale: float,
) -> dict[str, Any]:
    n = len(calls)
    per_call: dict[int, list[cc.Upstream]] = {}
    for u in ups:
        if u.call is not None:
            per_call.setdefault(u.call, []).append(u)
    for rec in calls:
        rec.upstream = len(per_call.get(rec.index, []))
    lat = [c.end - c.start for c in calls]
    errors = [c for c in calls if c.outcome == "error"]
    sources: dict[str, int] = {}
    for c in calls:
        sources[c.outcome] = sources.get(c.outcome, 0) + 1
    server_requests = int(server_stats.get("requests", 0))
    m: dict[str, Any] = {
        "calls": n,
        "errors": len(errors),
        "error_rate": len(errors) / n if n else 0.0,
        "error_types": _count(c.error for c in errors),
        "degraded": sum(sources.get(k, 0) for k in DEGRADED),
        "fallback_model": sources.get("fallback", 0),
        "sources": sources,
        "upstream_requests": len(ups),
        "server_requests": server_requests,
        "amplification": server_requests / n if n else 0.0,
        "max_upstream_per_call": max((c.upstream for c in calls), default=0),
        "p50_ms": _ms(pct(lat, 50)),
        "p99_ms": _ms(pct(lat, 99)),
        "max_ms": _ms(max(lat) if lat else None),
        "duration_s": round(max((c.end for c in calls), default=0.0), 3),
        "server_statuses": server_stats.get("statuses", {}),
        "circuit_opens": len(opened_at),
    }
    deadline = 60.0 * scale
    m["over_deadline"] = sum(1 for x in lat if x > deadline + 0.05)
    extra: dict[str, Any] = {}
    if scenario.name == "rate_limited":
        extra.update(_retry_after_checks(per_call))
        span = max(scenario.arrivals or [0.0]) or 1.0
        extra["offered_rps"] = round(n / (span + 0.2), 1)
        extra["limit_rps"] = scenario.faults["rate_limit_rps"]
    if scenario.name == "outage" and "on" in marks and "off" in marks:
        extra.update(_outage(calls, ups, t0, marks, opened_at, scale))
    if scenario.name in ("quota", "bad_request"):
        extra["calls_over_one_upstream"] = sum(1 for c in calls if c.upstream > 1)
        extra["calls_with_one_upstream"] = sum(1 for c in calls if c.upstream == 1)
        extra["calls_with_zero_upstream"] = sum(1 for c in calls if c.upstream == 0)
    if scenario.name == "stall":
        extra["stalled_requests"] = int(server_stats.get("faults", {}).get("stall", 0))
        extra["deadline_s"] = deadline
    m["extra"] = extra
    m["timeline"] = _timeline(calls, ups, t0, scenario)
    return m


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _retry_after_checks(per_call: dict[int, list[cc.Upstream]]) -> dict[str, Any]:
    """Within each user call: was a request sent before the previous 429's Retry-After?"""
    violations = 0
    waits = 0
    early_by: list[float] = []
    for reqs in per_call.values():
        reqs = sorted(reqs, key=lambda u: u.t_send)
        for prev, nxt in itertools.pairwise(reqs):
            if prev.status == 429 and prev.retry_after is not None:
                waits += 1
                gap = nxt.t_send - prev.t_done
                if gap + 0.001 < prev.retry_after:
                    violations += 1
                    early_by.append(prev.retry_after - gap)
    return {
        "retry_after_followups": waits,
        "retry_after_violations": violations,
        "retry_after_max_early_ms": _ms(max(early_by)) if early_by else 0.0,
    }


def _outage(
    calls: list[CallRec],
    ups: list[cc.Upstream],
    t0: float,
    marks: dict[str, float],
    opened_at: list[tuple[str, float]],
    scale: float,
) -> dict[str, Any]:
    on, off = marks["on"], marks["off"]
    during = [c for c in calls if on <= c.start < off]
    waits = [c.end - c.start for c in during]
    sent = sum(1 for u in ups if on <= u.t_send - t0 < off)
    ex: dict[str, Any] = {
        "outage_s": round(off - on, 3),
        "calls_during": len(during),
        "wait_p50_ms": _ms(pct(waits, 50)),
        "wait_p99_ms": _ms(pct(waits, 99)),
        "wait_max_ms": _ms(max(waits) if waits else None),
        "errors_during": sum(1 for c in during if c.outcome == "error"),
        "degraded_during": sum(1 for c in during if c.outcome in DEGRADED),
        "upstream_during": sent,
        "load_ratio": round(sent / len(during), 3) if during else None,
    }
    # once the circuit is open (per operation: one breaker may guard chat and embeddings)
    first_open: dict[str, float] = {}
    for op, t in opened_at:
        rel = t - t0
        if on <= rel < off and op not in first_open:
            first_open[op] = rel
    if first_open:

        def open_for(op: str) -> float | None:
            times = [first_open[k] for k in (op, "*") if k in first_open]
            return min(times) if times else None

        ex["circuit_open_after_ms"] = _ms(min(first_open.values()) - on)
        after = [c for c in during if (o := open_for(c.op)) is not None and c.start >= o]
        fast = [c for c in after if c.upstream == 0]
        ex["calls_after_open"] = len(after)
        ex["zero_upstream_frac"] = round(len(fast) / len(after), 4) if after else None
        ex["after_open_p99_ms"] = _ms(pct([c.end - c.start for c in after], 99))
        ex["zero_upstream_p99_ms"] = _ms(pct([c.end - c.start for c in fast], 99))
    else:
        ex["circuit_open_after_ms"] = None
    live_after = [c.end for c in calls if c.outcome in LIVE and c.end > off]
    ex["recovery_s"] = round(min(live_after) - off, 3) if live_after else None
    before = [c.end - c.start for c in calls if c.end < on and c.outcome in LIVE]
    ex["probe_allowance_s"] = round(max(0.01, pct(before, 99) or 0.0), 4)
    ex["recovery_bound_s"] = round(60.0 * scale + ex["probe_allowance_s"], 3)
    return ex


def _timeline(
    calls: list[CallRec], ups: list[cc.Upstream], t0: float, scenario: Scenario
) -> dict[str, Any]:
    end = max([c.end for c in calls] + [0.1])
    width = max(0.05, round(end / 60.0, 2))
    bins = math.ceil(end / width) + 1
    done = [0] * bins
    errs = [0] * bins
    sent = [0] * bins
    offered = [0] * bins
    for c in calls:
        b = min(bins - 1, int(c.end / width))
        done[b] += 1
        errs[b] += c.outcome == "error"
        offered[min(bins - 1, int(c.due / width))] += 1
    for u in ups:
        b = int((u.t_send - t0) / width)
        if 0 <= b < bins:
            sent[b] += 1
    return {"bin_s": width, "completed": done, "errors": errs, "upstream": sent, "offered": offered}


# -------------------------------------------------------------------------------- targets
def evaluate_targets(results: dict[str, dict[str, Any]], scale: float) -> list[dict[str, Any]]:
    """The issue's targets, checked for each of our contenders that ran."""
    out: list[dict[str, Any]] = []

    def add(target: str, who: str, ok: bool, value: str, why: str = "") -> None:
        out.append({"target": target, "contender": who, "ok": bool(ok), "value": value, "why": why})

    out += cd.targets(results.get(cd.SCENARIO, {}))
    for who in cc.OURS:
        r = results.get("transient", {}).get(who)
        if r and "error_rate" in r:
            ok = r["error_rate"] <= 0.0001 and r["amplification"] <= 1.06
            add(
                "transient: errors <= 0.01%, amplification <= 1.06",
                who,
                ok,
                f"{r['errors']}/{r['calls']} errors ({100 * r['error_rate']:.3f}%), "
                f"amplification {r['amplification']:.3f}",
                "" if ok else _why_transient(r),
            )
        r = results.get("outage", {}).get(who)
        if r and "extra" in r:
            ex = r["extra"]
            frac, p99 = ex.get("zero_upstream_frac"), ex.get("zero_upstream_p99_ms")
            ok = frac is not None and frac >= 0.95 and p99 is not None and p99 <= 5.0
            add(
                "outage: once open, >= 95% of calls make 0 upstream requests and answer in "
                "<= 5 ms (p99)",
                who,
                ok,
                f"{_fmt(frac, pct_=True)} zero-upstream, p99 {p99} ms "
                f"(circuit open {ex.get('circuit_open_after_ms')} ms into the outage)",
                "" if ok else "the circuit never opened" if frac is None else _why_outage(ex),
            )
            ratio = ex.get("load_ratio")
            ok = ratio is not None and ratio <= 1.2
            add(
                "outage: upstream load <= 1.2x offered",
                who,
                ok,
                f"{ex.get('upstream_during')} requests for {ex.get('calls_during')} calls "
                f"({ratio}x)",
            )
            rec, bound = ex.get("recovery_s"), ex.get("recovery_bound_s")
            ok = rec is not None and rec <= bound
            add(
                "recovery: first live answer within recovery_timeout + one probe",
                who,
                ok,
                f"{rec} s after the API returned (bound {bound} s = recovery_timeout "
                f"{60 * scale:g} s + probe {ex.get('probe_allowance_s')} s)",
            )
        r = results.get("rate_limited", {}).get(who)
        if r and "extra" in r:
            ex = r["extra"]
            ok = r["errors"] == 0 and ex["retry_after_violations"] == 0
            add(
                "rate limited: zero user errors, no request before Retry-After",
                who,
                ok,
                f"{r['errors']} errors, {r['degraded']} degraded, "
                f"{ex['retry_after_violations']}/{ex['retry_after_followups']} early retries",
                _why_errors(r)
                if not ok
                else f"but {r['degraded']} answers were served stale from the cache: the "
                f"circuit opened {r['circuit_opens']} time(s) on bursts of 429s"
                if r["degraded"]
                else "",
            )
        r = results.get("quota", {}).get(who)
        if r and "extra" in r:
            ok = r["max_upstream_per_call"] <= 1
            add(
                "quota: one upstream request per call at most (no retries)",
                who,
                ok,
                f"max {r['max_upstream_per_call']} per call, mean {r['amplification']:.2f} "
                f"({r['extra']['calls_with_zero_upstream']} calls stopped by the open circuit)",
            )
        r = results.get("bad_request", {}).get(who)
        if r and "extra" in r:
            ok = (
                r["extra"]["calls_with_one_upstream"] == r["calls"]
                and r["errors"] == r["calls"]
                and r["degraded"] == 0
            )
            add(
                "bad request: the error after exactly one request, never masked",
                who,
                ok,
                f"{r['extra']['calls_with_one_upstream']}/{r['calls']} calls with exactly one "
                f"request, {r['errors']} errors raised, {r['degraded']} degraded",
            )
        r = results.get("stall", {}).get(who)
        if r and "max_ms" in r:
            ok = r["over_deadline"] == 0
            add(
                "stall: nobody waits longer than the deadline",
                who,
                ok,
                f"max wait {r['max_ms']} ms (deadline {60 * scale * 1000:g} ms), "
                f"{r['errors']} errors",
            )
    return out


def _why_transient(r: dict[str, Any]) -> str:
    statuses = r.get("server_statuses", {})
    failed = sum(v for k, v in statuses.items() if k != "200")
    total = sum(statuses.values()) or 1
    p = failed / total
    floor = 1.0 / (1.0 - p) if p < 1 else float("inf")
    why = _why_errors(r) if r["errors"] else ""
    if r["amplification"] > 1.06:
        why += (
            f"{'; ' if why else ''}the server failed {100 * p:.2f}% of requests in this run; "
            f"recovering every call needs at least 1/(1-p) = {floor:.4f} requests per call"
        )
    return why


def _why_outage(ex: dict[str, Any]) -> str:
    after, frac = ex.get("calls_after_open") or 0, ex.get("zero_upstream_frac") or 0.0
    p99 = ex.get("zero_upstream_p99_ms") or 0.0
    why = []
    if frac < 0.95:
        probes = round(after * (1.0 - frac))
        why.append(
            f"{probes} of {after} calls after the circuit opened made upstream requests: the "
            "half-open probes, one per recovery period per upstream (2 s, then 4 s real-world; "
            "the chat and embeddings wrappers of one host share them); the probe count does "
            "not grow with traffic, so the share depends on the offered rate and on how soon "
            "the circuit opened"
        )
    if p99 > 5.0:
        why.append(
            f"p99 {p99} ms of calls that made no upstream request: in-process time (the "
            "framework's call machinery and ours) under CPU contention on the shared machine"
        )
    return "; ".join(why)


def _why_errors(r: dict[str, Any]) -> str:
    types = ", ".join(f"{k} x{v}" for k, v in r.get("error_types", {}).items())
    return f"user-facing errors: {types}" if types else ""


def _fmt(v: float | None, pct_: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct_ else f"{v:g}"


# --------------------------------------------------------------------------------- output
COLUMNS = ["contender", "err %", "degraded", "amplif.", "max up/call", "p50 ms", "p99 ms", "max ms"]


def _row(name: str, r: dict[str, Any]) -> list[Any]:
    if "skipped" in r:
        return [name, f"skipped: {r['skipped']}", "", "", "", "", "", ""]
    deg = str(r["degraded"])
    if r.get("fallback_model"):
        deg += f" (+{r['fallback_model']} fallback model)"
    return [
        name,
        f"{100 * r['error_rate']:.2f}",
        deg,
        f"{r['amplification']:.2f}",
        r["max_upstream_per_call"],
        _na(r["p50_ms"]),
        _na(r["p99_ms"]),
        _na(r["max_ms"]),
    ]


def _na(v: Any) -> str:
    return "n/a" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _extra_cols(scenario: str) -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    if scenario == "outage":
        return [
            (
                "wait p50/p99 during outage ms",
                lambda e: f"{_na(e.get('wait_p50_ms'))} / {_na(e.get('wait_p99_ms'))}",
            ),
            ("load during outage", lambda e: f"{_na(e.get('load_ratio'))}x"),
            ("0-upstream after open", lambda e: _fmt(e.get("zero_upstream_frac"), pct_=True)),
            ("recovery s", lambda e: _na(e.get("recovery_s"))),
        ]
    if scenario == "rate_limited":
        return [
            (
                "early retries",
                lambda e: f"{e['retry_after_violations']}/{e['retry_after_followups']}",
            )
        ]
    if scenario == "stall":
        return [("stalled", lambda e: e.get("stalled_requests"))]
    if scenario in ("quota", "bad_request"):
        return [("calls >1 request", lambda e: e.get("calls_over_one_upstream"))]
    return []


def write_markdown(report: dict[str, Any], path: Path) -> str:
    s = report["settings"]
    lines = [
        "# Chaos benchmark",
        "",
        f"Generated by `python benchmarks/chaos.py{' --quick' if s['quick'] else ''}` in "
        f"{report['runtime_s']:.0f} s on {report['machine']['cpu']} "
        f"({report['machine']['cpus']} CPUs), Python {report['machine']['python']}.",
        "",
        f"Time scale {s['time_scale']:g}: one real-world second lasts {s['time_scale']:g} s. "
        "Scaled alike for every contender: "
        + "; ".join(f"{k}: {v}" for k, v in s["scaled"].items())
        + f"; LangChain with_retry jitter initial {s['time_scale']:g} s, max "
        f"{60 * s['time_scale']:g} s; tenacity-pybreaker waits and reset_timeout; our balanced "
        f"preset: {', '.join(f'{k}={v:g}' for k, v in s['our_overrides'].items())}. "
        "Not scaled: our retry budget (20% + 5/s over 10 s), the server's own Retry-After "
        "on rate limits.",
        "",
        "Columns: **err %** user-facing errors; **degraded** answers served from our "
        "last-known-good cache or a generic answer; **amplif.** upstream requests "
        "(server count) per user call; **max up/call** most upstream requests one user "
        "call caused; latencies per user call. Every 4th call is a query embedding, the "
        "rest chat completions, over a pool of 24 repeating prompts.",
        "",
        "## Contenders",
        "",
    ]
    for name, desc in cc.CONTENDERS.items():
        if name in report["contenders"]:
            lines.append(f"- **{name}**: {desc}")
    lines += ["", "## Results", ""]
    for scen_name, scen in report["scenarios"].items():
        lines += [f"### {scen_name}", "", scen["title"], ""]
        if scen_name == cd.SCENARIO:
            lines += cd.markdown(report["results"][scen_name])
            continue
        extra = _extra_cols(scen_name)
        headers = COLUMNS + [h for h, _ in extra]
        rows = []
        for who, r in report["results"][scen_name].items():
            row = _row(who, r)
            if "skipped" not in r:
                row += [fn(r["extra"]) for _, fn in extra]
            else:
                row += [""] * len(extra)
            rows.append(row)
        lines += [markdown_table(headers, rows), ""]
        if (Path(path).parent / f"chaos_{scen_name}.png").exists():
            lines += [f"![{scen_name}](chaos_{scen_name}.png)", ""]
    lines += ["## Targets", ""]
    rows = [
        [t["target"], t["contender"], "met" if t["ok"] else "**missed**", t["value"], t["why"]]
        for t in report["targets"]
    ]
    lines += [markdown_table(["target", "contender", "", "measured", "why"], rows), ""]
    lines += ["## Timeouts with each library's defaults", ""]
    for name, text in report.get("default_timeouts", {}).items():
        lines.append(f"- **{name}**: {text}")
    lines.append("")
    text = "\n".join(lines)
    path.write_text(text, encoding="utf-8")
    return text


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return []
    written = []
    for scen_name, per in report["results"].items():
        runs = {k: v for k, v in per.items() if "timeline" in v}
        if not runs:
            continue
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        offered_drawn = False
        for who, r in runs.items():
            tl = r["timeline"]
            w = tl["bin_s"]
            xs = [i * w for i in range(len(tl["completed"]))]
            rate = [
                100.0 * e / d if d else float("nan")
                for e, d in zip(tl["errors"], tl["completed"], strict=True)
            ]
            style = "-" if who.startswith("ours") else "--"
            lw = 2.2 if who.startswith("ours") else 1.3
            ax1.plot(xs, rate, style, lw=lw, label=who)
            ax2.plot(xs, [x / w for x in tl["upstream"]], style, lw=lw, label=who)
            if not offered_drawn:
                ax2.plot(
                    xs, [x / w for x in tl["offered"]], ":", color="black", lw=1, label="offered"
                )
                offered_drawn = True
            ex = r.get("extra", {})
        marks = report["scenarios"][scen_name].get("phases_at")
        if marks:
            for ax in (ax1, ax2):
                ax.axvspan(marks[0], marks[1], color="red", alpha=0.08)
        ax1.set_ylabel("user-facing errors (%)")
        ax2.set_ylabel("upstream requests / s")
        ax2.set_xlabel("seconds (scaled time)")
        ax1.set_title(f"{scen_name}: {report['scenarios'][scen_name]['title'][:90]}", fontsize=9)
        ax2.legend(fontsize=7, ncol=3)
        ax1.grid(alpha=0.3)
        ax2.grid(alpha=0.3)
        del ex
        fig.tight_layout()
        target = out / f"chaos_{scen_name}.png"
        fig.savefig(target, dpi=90)
        plt.close(fig)
        written.append(str(target))
    return written


# ----------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chaos.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny counts: a smoke test, not a measurement"
    )
    p.add_argument("--scenario", action="append", default=[], help="comma list (repeatable)")
    p.add_argument("--contender", action="append", default=[], help="comma list (repeatable)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument("--time-scale", type=float, default=0.1, help="default 0.1")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--max-wait", type=float, default=90.0, help="seconds before a run is cut")
    return p


def _split(values: list[str], allowed: Sequence[str], what: str) -> list[str]:
    chosen = [v.strip() for item in values for v in item.split(",") if v.strip()]
    for v in chosen:
        if v not in allowed:
            raise SystemExit(f"unknown {what} {v!r}; choose from: {', '.join(allowed)}")
    return [a for a in allowed if a in chosen] if chosen else list(allowed)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Decisions are in the results; per-retry log lines from every library would drown them.
    for logger in ("rag_resilience", "llama_index", "langchain", "openai", "httpx"):
        logging.getLogger(logger).setLevel(logging.CRITICAL)
    scale = args.time_scale
    if not 0.001 <= scale <= 1.0:
        raise SystemExit(f"--time-scale must be between 0.001 and 1.0, got {scale}")
    all_scen = scenarios(args.quick, scale)
    scen_names = _split(args.scenario, list(all_scen), "scenario")
    who_names = _split(args.contender, list(cc.CONTENDERS), "contender")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scaled = cc.scale_library_delays(scale)
    results: dict[str, dict[str, Any]] = {s: {} for s in scen_names}
    default_timeouts: dict[str, str] = {}
    server = RemoteChaos(args.seed)
    scen_info: dict[str, Any] = {}
    try:
        for who in who_names:
            why = cc.available(who)
            if why is not None:
                for s in scen_names:
                    results[s][who] = {"skipped": why}
                print(f"skip {who}: {why}", flush=True)
                continue
            c = cc.build(who, server.base_url, cc.Recorder(), scale=scale, timeout=None)
            default_timeouts[who] = c.timeouts
            c.close()
        for scen_name in scen_names:
            scen = all_scen[scen_name]
            scen_info[scen_name] = {
                "title": scen.title,
                "faults": scen.faults,
                "calls": scen.calls,
                "workers": scen.workers,
                "timeout": scen.timeout,
            }
            if scen_name == cd.SCENARIO:
                results[scen_name] = cd.run(server, scale, args.quick)
                print(f"{scen_name}: {json.dumps(results[scen_name])}", flush=True)
                continue
            for who in who_names:
                if "skipped" in results[scen_name].get(who, {}):
                    continue
                r = run_one(scen, who, server, scale, args.max_wait)
                results[scen_name][who] = r
                if "phases_at" in r:
                    scen_info[scen_name]["phases_at"] = r.pop("phases_at")
                print(_progress(scen_name, who, r), flush=True)
    finally:
        server.close()
    runtime = time.perf_counter() - started
    report: dict[str, Any] = {
        "benchmark": "chaos",
        "settings": {
            "quick": args.quick,
            "time_scale": scale,
            "seed": args.seed,
            "scaled": scaled or {"openai SDK backoff": "scaled", "LlamaIndex tenacity": "scaled"},
            "our_overrides": cc.our_overrides(scale),
            "scenarios": scen_names,
            "contenders": who_names,
        },
        "machine": machine_info(),
        "runtime_s": round(runtime, 1),
        "contenders": {w: cc.CONTENDERS[w] for w in who_names},
        "default_timeouts": default_timeouts,
        "scenarios": scen_info,
        "results": results,
        "targets": evaluate_targets(results, scale),
    }
    if not args.no_plots:
        report["plots"] = [Path(p).name for p in write_plots(report, out)]
    (out / "chaos.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    text = write_markdown(report, out / "chaos.md")
    print()
    print(text)
    print(f"\nwrote {out / 'chaos.md'}, {out / 'chaos.json'} in {runtime:.1f} s")
    return 0


def _progress(scen: str, who: str, r: dict[str, Any]) -> str:
    if "error" in r and "calls" not in r:
        return f"{scen:<13} {who:<20} FAILED: {r['error']}"
    return (
        f"{scen:<13} {who:<20} err {100 * r['error_rate']:6.2f}%  degraded {r['degraded']:4d}  "
        f"amp {r['amplification']:5.2f}  p50 {_na(r['p50_ms']):>8} ms  p99 {_na(r['p99_ms']):>8} ms  "
        f"({r['duration_s']:.1f} s)"
    )


def run_one(
    scen: Scenario, who: str, server: RemoteChaos, scale: float, max_wait: float
) -> dict[str, Any]:
    """One contender through one scenario: fresh contender, warm-up, reset, faults, drive."""
    recorder = cc.Recorder()
    contender = cc.build(who, server.base_url, recorder, scale=scale, timeout=scen.timeout)
    try:
        server.reset()
        problem = warm_up(contender)
        if problem is not None:
            return {"skipped": f"warm-up failed: {problem}"}
        recorder.clear()
        contender.opened_at.clear()
        server.reset()
        server.set_faults(replace=True, **scen.faults)
        t0 = time.perf_counter()
        calls, marks = drive(contender, scen, server, t0, max_wait)
        stats = server.stats()
        server.set_faults(replace=True)  # release stalled requests
        result = analyse(
            scen, calls, list(recorder.records), t0, marks, stats, contender.opened_at, scale
        )
        if "on" in marks and "off" in marks:
            result["phases_at"] = [round(marks["on"], 3), round(marks["off"], 3)]
        return result
    except Exception as exc:  # a contender crashing is a result, not the end of the run
        return {"skipped": f"crashed: {type(exc).__name__}: {exc}"}
    finally:
        contender.close()


if __name__ == "__main__":
    sys.exit(main())
