"""The demo's `watch` panel: what `rag-resilience watch` showed for each scenario.

The demo serves its wrapped apps' policies on a stats endpoint (for a live `watch` in
another terminal) and samples them once a second itself, so each policy's per-second
series covers the run. After the scenarios, `panels` renders the same table `watch`
draws, one per scenario (its policies by role: llm, embeddings, ...): state, calls, error
and degraded rates, the sparkline of the last minute, in flight, learned rate limits.
Needs rich (the ``[watch]`` extra); without it there are no panels, only the endpoint.
"""

from __future__ import annotations

import io
import shutil
import sys
import threading
import time
from typing import Any

__all__ = ["Sampler", "panels"]


class Sampler:
    """Samples a `StatsReport` every `interval_s` from a daemon thread (its series are
    built from the differences between samples) until `stop`."""

    def __init__(self, report: Any, interval_s: float = 1.0) -> None:
        self.report = report
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rag-resilience-demo-watch")
        self._thread.daemon = True

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.report.samples()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def panels(
    report: Any, width: int | None = None, color: bool | None = None
) -> dict[tuple[str, str], str]:
    """``{(framework, scenario): the rendered watch table}`` for the policies reported
    as ``framework/scenario/role`` (empty without rich)."""
    try:
        from rich.console import Console
    except ImportError:
        return {}
    from ..watch import build_rows, render

    now = time.time()
    reading = {"time": now, "breakers": {}, "limits": {}, "samples": report.samples()}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in build_rows(reading):
        parts = str(row["name"]).split("/", 2)
        if len(parts) != 3:
            continue
        framework, scenario, role = parts
        groups.setdefault((framework, scenario), []).append({**row, "name": role})
    color = sys.stdout.isatty() if color is None else color
    if width is None:  # the terminal's, within reason (the sparkline gets what is left)
        width = max(100, min(140, shutil.get_terminal_size((120, 24)).columns))
    out: dict[tuple[str, str], str] = {}
    for (framework, scenario), rows in groups.items():
        buffer = io.StringIO()
        console = Console(
            file=buffer, width=width, force_terminal=color, no_color=not color, highlight=False
        )
        console.print(render(rows, f"{framework}/{scenario}", now, width))
        out[(framework, scenario)] = buffer.getvalue().rstrip("\n")
    return out
