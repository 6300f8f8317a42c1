"""`rag-resilience watch` against a real Redis written by two processes, and against an
app's stats endpoint; its JSON lines are compared with the stores' own state."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rag_resilience import CircuitBreaker, ResiliencePolicy
from rag_resilience.cli import main as cli_main
from rag_resilience.stats_endpoint import StatsPublisher, StatsReport, serve_stats
from rag_resilience.watch import build_rows, main, render, sparkline

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent

# One replica of a service: a shared circuit "svc" (and, for replica b, a healthy "ok"),
# breaker and limit on the same Redis prefix; every call is served (generic answer).
REPLICA = textwrap.dedent(
    """
    import sys, time
    from rag_resilience import CircuitBreaker, CircuitState, ResiliencePolicy
    from rag_resilience.stores.redis import RedisStore
    from rag_resilience.stats_endpoint import StatsPublisher, StatsReport

    url, prefix, role = sys.argv[1:4]
    store = RedisStore(url, prefix=prefix)

    class APIError(Exception):
        status_code = 503

    def down():
        raise APIError("HTTP 503")

    def policy(name):
        return ResiliencePolicy.preset(
            "balanced", name=name, store=store, generic_fallback=True,
            max_retries=0, min_recovery_timeout=600.0, recovery_timeout=600.0,
        )

    svc = policy("svc")
    policies = [svc]
    if role == "b":
        ok = policy("ok")
        policies.append(ok)
    report = StatsReport(*policies, replica=role)
    publisher = StatsPublisher(report, store, ttl_s=120.0)
    if role == "a":
        for _ in range(10):   # five failures open the shared circuit, five are refused
            svc.call(down)
    else:
        watcher = CircuitBreaker(name="svc", store=store)
        deadline = time.monotonic() + 60
        while watcher.get_state() is not CircuitState.OPEN:  # replica a trips it
            assert time.monotonic() < deadline, "replica a never opened the circuit"
            time.sleep(0.05)
        for _ in range(4):
            svc.call(down)    # refused at once: the circuit is open for every replica
        for _ in range(7):
            ok.call(lambda: "fine")
    publisher.publish()
    print("done", role)
    """
)


@pytest.fixture
def prefix() -> Iterator[str]:
    import redis

    name = f"rr-watch-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS_URL)
    yield name
    for key in client.scan_iter(f"{name}:*"):
        client.delete(key)


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    assert main(argv, sleep=lambda _: None) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_two_replicas_on_redis_json_lines_match_the_store(
    prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rag_resilience.stores.redis import RedisStore

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REPLICA, REDIS_URL, prefix, role],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for role in ("b", "a")
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    (line,) = run_json(["--redis", REDIS_URL, "--prefix", prefix, "--json", "--count", "1"], capsys)
    rows = {row["name"]: row for row in line["circuits"]}
    assert set(rows) == {"svc", "ok"}

    store = RedisStore(REDIS_URL, prefix=prefix)
    breaker = CircuitBreaker(name="svc", store=store, recovery_timeout=600.0)  # as the replicas
    svc = rows["svc"]
    assert svc["state"] == breaker.get_state().value == "open"
    assert svc["failures"] == breaker.failure_count
    assert abs(svc["next_probe_s"] - breaker.retry_after()) < 5  # Redis TIME vs this host
    assert 0 <= svc["open_for_s"] < 600
    assert svc["replicas"] == 2
    assert svc["calls_1m"] == 10 + 4
    assert svc["degraded_rate_1m"] == 1.0 and svc["error_rate_1m"] == 0.0
    assert svc["in_flight"] in (0, None) and svc["queue_depth"] == 0
    ok = rows["ok"]
    assert ok["state"] == CircuitBreaker(name="ok", store=store).get_state().value == "closed"
    assert ok["replicas"] == 1 and ok["calls_1m"] == 7 and ok["degraded_rate_1m"] == 0.0
    assert ok["spark"].strip() == "▁"  # one second with calls, none degraded
    assert "█" in svc["spark"]


def test_stats_endpoint_source_and_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    policy = ResiliencePolicy.preset("balanced", name="ep", generic_fallback=True, max_retries=0)
    report = StatsReport(policy, replica="r1")
    server = serve_stats(report)
    try:

        def boom() -> str:
            raise ConnectionError("refused")

        for _ in range(3):
            policy.call(lambda: "ok")
        policy.call(boom)
        url = f"http://127.0.0.1:{server.server_port}/stats"
        assert (
            cli_main(["watch", "--url", url, "--json", "--count", "2", "--interval", "0.01"]) == 0
        )
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    finally:
        server.shutdown()
    assert len(lines) == 2
    (row,) = lines[0]["circuits"]
    assert row["name"] == "ep" and row["state"] == "closed" and row["replicas"] == 1
    assert row["calls_1m"] == 4 and row["degraded_rate_1m"] == 0.25
    assert row["in_flight"] == 0 and row["queue_depth"] == 0


def test_a_source_that_is_down_is_reported_not_fatal(capsys: pytest.CaptureFixture[str]) -> None:
    (line,) = run_json(["--url", "http://127.0.0.1:9/stats", "--json", "--count", "1"], capsys)
    assert "error" in line and "circuits" not in line


def test_bad_settings_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "http://x", "--interval", "2"]) == 2
    assert "--interval must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="window_s"):
        StatsReport(window_s=0)
    with pytest.raises(ValueError, match="interval_s"):
        StatsPublisher(StatsReport(), store=None, interval_s=0)  # type: ignore[arg-type]


def test_render_and_sparkline() -> None:
    from rich.console import Console

    assert sparkline([0.0, 0.5, 1.0, None]) == "▁▅█ "
    reading = {
        "time": 1000.0,
        "breakers": {"svc": {"s": "open", "f": 5, "oa": 990.0, "ou": 1030.0}},
        "limits": {"svc": 3},
        "samples": [],
    }
    rows = build_rows(reading)
    assert rows[0]["open_for_s"] == 10.0 and rows[0]["next_probe_s"] == 30.0
    assert rows[0]["in_flight"] == 3
    console = Console(record=True, width=160)
    console.print(render(rows, "redis://test", 1000.0))
    text = console.export_text()
    assert "svc" in text and "open" in text and "30s" in text


def test_demo_says_where_to_watch_and_serves_its_policies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`make demo` prints the watch command; the endpoint it names serves the wrapped app's
    policies while the scenarios run (read here after the run, from the same report)."""
    import re

    from rag_resilience import demo

    seen: list[Any] = []
    original = demo._report

    def spy(report: Any, run: Any) -> None:
        original(report, run)
        seen.append(report)

    demo._report = spy  # type: ignore[assignment]
    try:
        code = demo.main(["--framework", "langchain", "--scenario", "normal", "--quick"])
    finally:
        demo._report = original  # type: ignore[assignment]
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"rag-resilience watch --url http://127\.0\.0\.1:\d+/stats", out)
    # after the scenario's results: its watch panel, one row per role of the wrapped app
    panel = out[out.index("rag-resilience watch · langchain/normal") :]
    assert re.search(r"\n llm +closed ", panel) and "calls" in panel
    names = {sample["name"] for sample in seen[0].samples()}
    assert names and all(name.startswith("langchain/normal/") for name in names)


def test_learned_rate_limits_merge_over_replicas_and_render() -> None:
    """Two replicas' `rate_limit` reports: totals add up, the freshest learned limits
    win, headroom is the lowest any replica sees, waiting callers add up."""
    from rich.console import Console

    key = "http://127.0.0.1:8000/v1|gpt-4o-mini|0123456789abcdef"

    def sample(replica: str, at: float, rps: float, room: float, waiting: int) -> dict[str, Any]:
        up = {
            "requests_per_s": rps,
            "requests_source": "headers",
            "requests_headroom": room,
            "tokens_per_s": 2900.0,
            "tokens_source": "headers",
            "tokens_headroom": 0.8,
            "waiting": waiting,
        }
        return {
            "name": "paced",
            "replica": replica,
            "time": at,
            "breaker": None,
            "limit": None,
            "series": [],
            "totals": {"interrupted": 1, "parse_failures": 2},
            "rate_limit": {
                "paced": 3,
                "paced_seconds": 0.5,
                "rejected": 1,
                "throttled_429": 0,
                "upstreams": {key: up},
            },
        }

    samples = [sample("r1", 999.0, 18.0, 0.25, 2), sample("r2", 1000.0, 19.6, 0.5, 1)]
    rows = build_rows({"time": 1000.0, "breakers": {}, "limits": {}, "samples": samples})
    (row,) = rows
    assert (row["interrupted"], row["parse_failures"]) == (2, 4)
    rate = row["rate_limit"]
    assert (rate["paced"], rate["paced_seconds"], rate["rejected"]) == (6, 1.0, 2)
    assert rate["upstreams"][key] == {
        "requests_per_s": 19.6,
        "requests_source": "headers",
        "requests_headroom": 0.25,
        "tokens_per_s": 2900.0,
        "tokens_source": "headers",
        "tokens_headroom": 0.8,
        "waiting": 3,
    }
    console = Console(record=True, width=220)
    console.print(render(rows, "http://x", 1000.0))
    assert "gpt-4o-mini 19.6 req/s 25% 2.9k tok/s 80% 3 wait" in console.export_text()


def test_watch_shows_what_pacing_learned_from_redis(
    chaos_server_factory: Any, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two replicas pace against the chaos server's rate limit (real HTTP, one injected
    clock) and publish to a real Redis; `watch --redis --json` shows each upstream's
    learned limits and headroom as the policies' own stats() report them."""
    from rag_resilience import AsyncResilientOpenAIClient, ResilientOpenAIClient
    from rag_resilience.stores.redis import RedisStore
    from rag_resilience.testing import FakeClock

    clock = FakeClock()
    server = chaos_server_factory(clock=clock, rate_limit_rps=20.0, rate_limit_burst=2)
    store = RedisStore(REDIS_URL, prefix=prefix)
    msg = [{"role": "user", "content": "hi"}]
    policies = []
    for replica in ("r1", "r2"):
        policy = ResiliencePolicy.preset("balanced", name="paced", clock=clock)
        policies.append(policy)
        sync = ResilientOpenAIClient(api_key="sk-w", base_url=server.base_url, policy=policy)
        report = StatsReport(policy, replica=replica)

        def worker(sync: Any = sync) -> None:
            for _ in range(4):
                sync.chat.completions.create(model="gpt-4o-mini", messages=msg)

        async def tasks(policy: Any = policy) -> None:
            aclient = AsyncResilientOpenAIClient(
                api_key="sk-w", base_url=server.base_url, policy=policy
            )

            async def one() -> None:
                for _ in range(4):
                    await aclient.chat.completions.create(model="gpt-4o-mini", messages=msg)

            await asyncio.gather(one(), one(), one())

        threads = [threading.Thread(target=worker) for _ in range(3)]
        threads.append(threading.Thread(target=asyncio.run, args=(tasks(),)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        StatsPublisher(report, store, ttl_s=120.0).publish()
    assert server.wait_idle()
    (line,) = run_json(["--redis", REDIS_URL, "--prefix", prefix, "--json", "--count", "1"], capsys)
    (row,) = [r for r in line["circuits"] if r["name"] == "paced"]
    assert row["replicas"] == 2 and row["calls_1m"] == 2 * (3 + 3) * 4
    stats = [p.stats()["rate_limit"] for p in policies]
    rate = row["rate_limit"]
    assert rate["paced"] == sum(s["paced"] for s in stats) > 0
    assert rate["throttled_429"] == sum(s["throttled_429"] for s in stats)
    (key,) = rate["upstreams"]
    assert "sk-w" not in json.dumps(line)
    up = rate["upstreams"][key]
    assert up["requests_source"] == "headers"
    assert up["requests_per_s"] == stats[1]["upstreams"][key]["requests_per_s"]  # freshest
    assert 0 < up["requests_per_s"] <= 20
    assert 0.0 <= up["requests_headroom"] <= 1.0
    assert up["waiting"] == 0
