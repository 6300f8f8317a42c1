"""Record `rag-resilience watch` during the demo's outage scenario as an SVG (docs/).

Usage: python scripts/watch_screenshot.py [--out docs/watch-outage.svg]

Runs the outage scenario (embedded chaos server: the API answers 500 from the second
question on) on the wrapped LangChain and LlamaIndex apps at once, samples its policies as `watch` does through a stats
endpoint, and saves the frame where the most circuits are open (then the most degraded
traffic) with rich's ``Console(record=True).save_svg``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from rag_resilience.demo import _app_factory
from rag_resilience.demo.scenarios import ScenarioRun
from rag_resilience.stats_endpoint import StatsReport
from rag_resilience.watch import build_rows, render

ROOT = Path(__file__).resolve().parent.parent


def _score(rows: list[dict[str, Any]]) -> tuple[int, int]:
    opened = sum(1 for r in rows if r.get("state") == "open")
    degraded = sum(int((r.get("degraded_rate_1m") or 0) * (r.get("calls_1m") or 0)) for r in rows)
    return opened, degraded


async def record(frameworks: list[str]) -> tuple[list[dict[str, Any]], float]:
    report = StatsReport(replica="demo")
    runs = []
    for framework in frameworks:
        run = ScenarioRun("outage", framework, _app_factory(framework, "sk-demo"), seed=8)
        await asyncio.to_thread(run.build)
        for role, policy in run.apps[0].policies().items():
            report.add(policy, name=f"{framework}/outage/{role}")
        await run.prime()
        runs.append(run)
    best: tuple[tuple[int, int], list[dict[str, Any]], float] | None = None
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal best
        while not done.is_set():
            snapshot = report.snapshot()
            reading = {"time": snapshot["time"], "breakers": {}, "limits": {}}
            reading["samples"] = snapshot["policies"]
            rows = build_rows(reading)
            if best is None or _score(rows) >= best[0]:
                best = (_score(rows), rows, snapshot["time"])
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(run.run(lambda n: None) for run in runs))
    finally:
        done.set()
        await sampler
    assert best is not None
    return best[1], best[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "watch-outage.svg")
    parser.add_argument("--framework", choices=("langchain", "llama-index", "both"), default="both")
    args = parser.parse_args(argv)
    logging.getLogger("rag_resilience").setLevel(logging.CRITICAL)  # the picture says it
    frameworks = ["langchain", "llama-index"] if args.framework == "both" else [args.framework]
    rows, now = asyncio.run(record(frameworks))
    console = Console(record=True, width=175, file=io.StringIO())
    console.print(render(rows, "http://127.0.0.1:PORT/stats (make demo, outage)", now, 175))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(str(args.out), title="rag-resilience watch")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
