"""`rag-resilience demo`: one small RAG app, wrapped and unwrapped, through the seed's four
scenarios (normal, transient failures, complete outage, traffic spike) against the
embedded chaos server. No API key, no network beyond 127.0.0.1.

    rag-resilience demo [--framework langchain|llama-index|both] [--scenario NAME|all]
                        [--json PATH] [--seed N] [--real] [-v]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from .common import DEMO_SETTINGS, USER_TIMEOUT_S, RagApp
from .scenarios import (
    SCENARIOS,
    SPIKE_TIMEOUT_S,
    ScenarioResult,
    ScenarioRun,
    steps_count,
)
from .watch_panel import Sampler, panels

__all__ = ["main"]

FRAMEWORKS = ("langchain", "llama-index")
# What each framework's app imports, and the extra that installs it.
_REQUIRES = {
    "langchain": ("langchain_core", "langchain_openai"),
    "llama-index": ("llama_index.core", "llama_index.llms.openai", "llama_index.embeddings.openai"),
}


def _missing(framework: str) -> str | None:
    """The first module of `framework`'s app that cannot be imported, or None."""
    import importlib

    for module in _REQUIRES[framework]:
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


_LOGGERS = ("rag_resilience", "openai", "llama_index", "langchain", "langchain_core", "httpx")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rag-resilience demo",
        description="The same RAG app with and without rag-resilience, side by side, against "
        "the embedded fault-injecting chaos server.",
    )
    parser.add_argument(
        "--framework", choices=(*FRAMEWORKS, "both"), default="both", help="default: both"
    )
    parser.add_argument(
        "--scenario",
        default="all",
        help=f"one of {', '.join(SCENARIOS)}, a comma-separated list, or all (default)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write machine-readable results here")
    parser.add_argument(
        "--seed", type=int, default=8, help="chaos server and jitter seed (default 8)"
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="run the normal scenario against the real OpenAI API (needs OPENAI_API_KEY)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"users give up sooner (2.5 s instead of {USER_TIMEOUT_S:g} s; spike 5 s instead of "
        f"{SPIKE_TIMEOUT_S:g} s): a faster run for tests",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show every log line of the library and SDKs"
    )
    return parser


def _app_factory(framework: str, api_key: str) -> Callable[[str | None, bool], RagApp]:
    if framework == "langchain":
        from .app_langchain import LangChainApp

        return lambda url, wrapped: LangChainApp(url, wrapped=wrapped, api_key=api_key)
    from .app_llama_index import LlamaIndexApp

    return lambda url, wrapped: LlamaIndexApp(url, wrapped=wrapped, api_key=api_key)


@contextlib.contextmanager
def _quiet_logs(verbose: bool) -> Iterator[Any]:
    """Route the library's and the SDKs' log records to a counter (and, with -v, to stderr)."""
    from .render import LogTally

    tally = LogTally()
    saved = []
    echo = logging.StreamHandler(sys.stderr) if verbose else None
    if echo is not None:
        echo.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in _LOGGERS:
        log = logging.getLogger(name)
        saved.append((log, log.level, log.propagate))
        log.addHandler(tally)
        if echo is not None:
            log.addHandler(echo)
        log.propagate = False
        if name in ("openai", "llama_index", "rag_resilience"):
            log.setLevel(logging.INFO if not verbose else logging.DEBUG)
    try:
        yield tally
    finally:
        for log, level, propagate in saved:
            log.removeHandler(tally)
            if echo is not None:
                log.removeHandler(echo)
            log.setLevel(level)
            log.propagate = propagate


async def _run_all(
    frameworks: list[str],
    scenarios: list[str],
    factories: dict[str, Callable[[str | None, bool], RagApp]],
    seed: int,
    progress: Any,
    real: bool,
    timeouts: tuple[float, float],
    on_built: Callable[[ScenarioRun], None] = lambda run: None,
) -> list[ScenarioResult]:
    def prepare(framework: str, name: str) -> ScenarioRun:
        return ScenarioRun(
            name,
            framework,
            factories[framework],
            seed=seed,
            real=real,
            real_base_url=os.environ.get("OPENAI_BASE_URL") if real else None,
            user_timeout=timeouts[0],
            spike_timeout=timeouts[1],
        )

    async def one(run: ScenarioRun) -> ScenarioResult:
        result = await run.run(lambda n: progress.advance(n))
        progress.advance(0, f"{run.framework}/{run.name} done ({result.wall_s:.1f} s)")
        return result

    # Scenarios that mostly wait (backoff sleeps) run at the same time, built and primed
    # first one by one (first calls import lazily and set up HTTP clients: untimed); the
    # spike, which needs the CPU, runs alone, one framework after the other.
    calm = [prepare(f, s) for f in frameworks for s in scenarios if s != "spike"]
    try:
        for run in calm:
            progress.advance(0, f"{run.framework}/{run.name}: building the apps")
            await asyncio.to_thread(run.build)
            on_built(run)
            await run.prime()
    except BaseException:
        for run in calm:
            run.close()
        raise
    results = list(await asyncio.gather(*(one(run) for run in calm)))
    if "spike" in scenarios:
        for framework in frameworks:
            spike = prepare(framework, "spike")
            progress.advance(0, f"{framework}/spike: building the apps")
            await asyncio.to_thread(spike.build)
            on_built(spike)
            await spike.prime()
            progress.advance(0, f"{framework}/spike")
            results.append(await one(spike))
    order = {(f, s): i for i, (f, s) in enumerate((f, s) for f in frameworks for s in scenarios)}
    return sorted(results, key=lambda r: order[(r.framework, r.name)])


def _watchable() -> tuple[Any, Any]:
    """A stats endpoint for `rag-resilience watch`, and where to point it."""
    from ..stats_endpoint import StatsReport, serve_stats

    report = StatsReport(replica="demo")
    server = serve_stats(report)
    url = f"http://127.0.0.1:{server.server_port}/stats"
    print(f"  Watch the circuits live in another terminal: rag-resilience watch --url {url}\n")
    print("  (a watch panel of each scenario follows its results)\n")
    return report, server


def _report(report: Any, run: ScenarioRun) -> None:
    for role, policy in run.apps[0].policies().items():  # the wrapped app's
        report.add(policy, name=f"{run.framework}/{run.name}/{role}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rag-resilience demo`; returns the exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    frameworks = list(FRAMEWORKS) if args.framework == "both" else [args.framework]
    skipped: dict[str, str] = {}
    for framework in list(frameworks):
        module = _missing(framework)
        if module is not None:
            frameworks.remove(framework)
            skipped[framework] = (
                f"not installed ({module} is missing): pip install 'rag-resilience[{framework}]'"
            )
    if not frameworks:
        for framework, why in skipped.items():
            print(f"rag-resilience demo: {framework} {why}", file=sys.stderr)
        return 2
    if args.scenario == "all":
        scenarios = list(SCENARIOS)
    else:
        scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown or not scenarios:
            print(
                f"rag-resilience demo: --scenario must be {', '.join(SCENARIOS)}, a "
                f"comma-separated list of them, or all; got {args.scenario!r}",
                file=sys.stderr,
            )
            return 2
        scenarios = [s for s in SCENARIOS if s in scenarios]
    user_timeout, spike_timeout = (2.5, 5.0) if args.quick else (USER_TIMEOUT_S, SPIKE_TIMEOUT_S)
    api_key = "sk-demo"
    if args.real:
        api_key = os.environ.get("OPENAI_API_KEY", "")
        if not api_key:
            print(
                "rag-resilience demo --real needs OPENAI_API_KEY set (it calls the real OpenAI "
                "API, a few cents at most).\nWithout --real the demo runs against the embedded "
                "chaos server and needs no key.",
                file=sys.stderr,
            )
            return 2
        scenarios = ["normal"]

    from .render import ProgressBar, render_header, render_scenario, render_summary

    random.seed(args.seed)
    info = {
        "frameworks": frameworks,
        "scenarios": scenarios,
        "seed": args.seed,
        "real": args.real,
        "settings": DEMO_SETTINGS,
        "user_timeout_s": user_timeout,
        "spike_timeout_s": spike_timeout,
    }
    if skipped:
        info["skipped"] = skipped
    print(render_header(info), flush=True)
    for framework, why in skipped.items():
        print(f"  Skipped {framework}: {why}. Running {', '.join(frameworks)} only.", flush=True)
    report, stats_server = _watchable()
    sampler = Sampler(report).start()  # per-second series for the panels
    started = time.perf_counter()
    with _quiet_logs(args.verbose) as tally, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Unclosed sockets of clients the demo drops: noise, not something the library did.
        warnings.simplefilter("ignore", ResourceWarning)
        factories = {f: _app_factory(f, api_key) for f in frameworks}  # imports happen here
        total = sum(steps_count(s) for s in scenarios) * len(frameworks)
        progress = ProgressBar(total)
        progress.advance(0, "starting")
        try:
            results = asyncio.run(
                _run_all(
                    frameworks,
                    scenarios,
                    factories,
                    args.seed,
                    progress,
                    args.real,
                    (user_timeout, spike_timeout),
                    lambda run: _report(report, run),
                )
            )
        finally:
            progress.close()
            sampler.stop()
            stats_server.shutdown()
        logs = tally.summary()
    wall = time.perf_counter() - started
    counted = not args.real
    watch = panels(report)
    for result in results:
        print(render_scenario(result, counted))
        if (result.framework, result.name) in watch:
            print(watch[(result.framework, result.name)])
    print(render_summary(results, logs, len(caught), counted))
    print(f"\n  Finished in {wall:.1f} s.")
    if args.json:
        data = {
            **info,
            "wall_s": round(wall, 2),
            "results": [r.as_dict() for r in results],
            "logs": logs,
            "python_warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)
        print(f"  Results written to {args.json}")
    return 0
