"""Shared helpers for the benchmark scripts: timing, tables, machine info, JSON results.

Timing follows `timeit`: the statement is compiled inline into a loop (no extra call
layer per iteration), the garbage collector is off while a loop runs, and each case is
run `repeat` times; we report the median of the repeats, not the best one, because on a
noisy shared machine the median is the figure a caller actually sees. Cases run
round-robin (`measure`), so a neighbour hogging the cores does not land on one case
only; CPU-bound benchmarks can time with process CPU time (`CLOCKS["cpu"]`). Async statements are
compiled into an ``async def`` loop and awaited on one event loop.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import textwrap
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CLOCKS",
    "RESULTS_DIR",
    "Clock",
    "Runner",
    "Timing",
    "async_runner",
    "calibrate",
    "machine_info",
    "markdown_table",
    "measure",
    "sync_runner",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: `run(number) -> total seconds` for `number` executions of one benchmark case.
Runner = Callable[[int], float]
#: A timer returning seconds. Runners default to wall time (`perf_counter`), which is
#: right whenever the case waits on I/O. For pure-CPU cases, "cpu" (this process's CPU
#: time) is steadier on a shared machine: time spent descheduled while a neighbour runs
#: is not a cost of the code under test, and it is most of the noise in wall time.
Clock = Callable[[], float]

CLOCKS: dict[str, Clock] = {"cpu": time.process_time, "wall": time.perf_counter}


class Timing:
    """Per-call seconds of each repeat; `median_us` is what tables and JSON report."""

    __slots__ = ("number", "per_call")

    def __init__(self, per_call: Sequence[float], number: int) -> None:
        self.per_call = list(per_call)
        self.number = number

    @property
    def median_us(self) -> float:
        return statistics.median(self.per_call) * 1e6

    @property
    def min_us(self) -> float:
        return min(self.per_call) * 1e6

    @property
    def spread_us(self) -> float:
        """Max minus min over the repeats: how noisy this case was."""
        return (max(self.per_call) - min(self.per_call)) * 1e6


def sync_runner(
    stmt: str, namespace: dict[str, Any], setup: str = "pass", clock: Clock = time.perf_counter
) -> Runner:
    """A function `run(n) -> seconds` for `n` inline executions of `stmt` (timeit-style)."""
    timer = timeit.Timer(stmt, setup=setup, timer=clock, globals=namespace)
    return timer.timeit


_ASYNC_TEMPLATE = """
async def __bench_loop(__n, __clock=__clock, __repeat=__repeat):
    __t0 = __clock()
    for __i in __repeat(None, __n):
{body}
    return __clock() - __t0
"""


def async_runner(
    stmt: str,
    namespace: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
    clock: Clock = time.perf_counter,
) -> Runner:
    """Like `sync_runner` for a statement that awaits; it runs on `loop`, gc off."""
    ns = dict(namespace)
    ns["__clock"] = clock
    ns["__repeat"] = itertools.repeat
    src = _ASYNC_TEMPLATE.format(body=textwrap.indent(textwrap.dedent(stmt).strip(), " " * 8))
    exec(compile(src, "<bench-async>", "exec"), ns)
    bench = ns["__bench_loop"]

    def run(number: int) -> float:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            elapsed: float = loop.run_until_complete(bench(number))
        finally:
            if was_enabled:
                gc.enable()
        return elapsed

    return run


def calibrate(run: Runner, target_s: float = 0.1) -> int:
    """A loop count whose run takes about `target_s` (like `timeit`'s autorange)."""
    number = 10
    while True:
        elapsed = run(number)
        if elapsed >= target_s / 5 or number >= 10_000_000:
            return max(10, int(number * target_s / max(elapsed, 1e-9)))
        number *= 5


def measure(
    runners: dict[str, Runner],
    *,
    repeat: int,
    target_s: float = 0.1,
    numbers: dict[str, int] | None = None,
) -> dict[str, Timing]:
    """Time every runner `repeat` times, round-robin, so drift on a noisy machine hits
    every case alike instead of whichever happened to run during a slow spell."""
    if numbers is None:
        numbers = {}
        for name, run in runners.items():
            run(10)  # warm-up: caches, lazy imports, first-call paths
            numbers[name] = calibrate(run, target_s)
    totals: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeat):
        for name, run in runners.items():
            totals[name].append(run(numbers[name]) / numbers[name])
    return {name: Timing(totals[name], numbers[name]) for name in runners}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Python and CPU, so numbers from different machines are never compared blindly."""
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table, columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def write_json(name: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    """Write `payload` to benchmarks/results/<name>.json (or `path`); returns the path."""
    target = path or RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return target
