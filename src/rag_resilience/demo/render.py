"""Plain-text output of the demo: a progress bar on stderr, tables and a summary on stdout.

No dependency beyond the standard library: the demo must run on a fresh install.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

from .scenarios import Row, ScenarioResult, SideResult

__all__ = ["LogTally", "ProgressBar", "render_header", "render_scenario", "render_summary"]

FRAMEWORK_TITLES = {"langchain": "LangChain", "llama-index": "LlamaIndex"}
SCENARIO_NUMBERS = {"normal": 1, "transient": 2, "outage": 3, "spike": 4}


class ProgressBar:
    """``[#####.....] 52%  210/400  12.3 s  langchain/transient`` on stderr, redrawn in place
    on a terminal; on a pipe, one line per 10% so logs stay short."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(1, total)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self.label = ""
        self.started = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1
        self._lock = threading.Lock()

    def advance(self, n: int = 1, label: str | None = None) -> None:
        with self._lock:
            self.done = min(self.total, self.done + n)
            if label is not None:
                self.label = label
            self._draw()

    def _line(self) -> str:
        frac = self.done / self.total
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.started
        return (
            f"[{bar}] {frac * 100:3.0f}%  {self.done}/{self.total}  {elapsed:5.1f} s  {self.label}"
        )

    def _draw(self) -> None:
        if self._tty:
            self.stream.write("\r" + self._line().ljust(100)[:100])
            self.stream.flush()
            return
        decile = int(self.done * 10 / self.total)
        if decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._tty:
                self.stream.write("\r" + " " * 100 + "\r")
                self.stream.flush()


class LogTally(logging.Handler):
    """Counts the log records the library and the SDKs emit during the demo, so the tables
    stay readable and the summary can still say how much was logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        kind = _kind(record)
        with self._lock2:
            self.counts[kind] += 1

    def summary(self) -> dict[str, int]:
        with self._lock2:
            return dict(self.counts)


def _kind(record: logging.LogRecord) -> str:
    name = record.name
    try:
        msg = record.getMessage()
    except Exception:  # a malformed record must not break the demo
        msg = str(record.msg)
    if name.startswith("rag_resilience"):
        level = "errors" if record.levelno >= logging.ERROR else "warnings"
        if "retrying in" in msg:
            return f"rag_resilience.{level}.retry"
        if "circuit" in msg and "->" in msg:
            return f"rag_resilience.{level}.circuit"
        if "served degraded" in msg:
            return f"rag_resilience.{level}.fallback"
        if "rejected" in msg:
            return f"rag_resilience.{level}.rejected"
        return f"rag_resilience.{level}.other"
    if name.startswith("openai") and "Retrying request" in msg:
        return "openai.sdk_retry"
    if name.startswith("llama_index") and msg.startswith("Retrying"):
        return "llama_index.tenacity_retry"
    return f"{name.split('.')[0]}.{record.levelname.lower()}"


def _cut(text: str, width: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


_COLUMNS = (
    ("#", 2, ">"),
    ("question", 34, "<"),
    ("answer", 46, "<"),
    ("source", 16, "<"),
    ("degraded", 8, "<"),
    ("attempts", 8, ">"),
    ("upstream", 8, ">"),
    ("ms", 6, ">"),
    ("circuit", 7, "<"),
)


def _table(rows: Iterable[list[str]], columns: tuple[tuple[str, int, str], ...]) -> list[str]:
    def fmt(cells: list[str]) -> str:
        parts = [f"{_cut(c, w):{a}{w}}" for c, (_, w, a) in zip(cells, columns, strict=False)]
        return "  " + "  ".join(parts).rstrip()

    lines = [fmt([c[0] for c in columns]), "  " + "  ".join("-" * c[1] for c in columns)]
    lines += [fmt(r) for r in rows]
    return lines


def _source(row: Row) -> str:
    if row.source == "cache" and row.age_s is not None:
        return f"cache ({row.age_s:.1f}s old)"
    return row.source


def _side_lines(side: SideResult, spike: bool) -> list[str]:
    if spike:
        cols = (
            ("requests", 18, "<"),
            ("answer", 52, "<"),
            ("source", 16, "<"),
            ("degraded", 8, "<"),
            ("latency", 26, "<"),
        )
        rows = [
            [r.question, r.answer, r.source, "yes" if r.degraded else "no", r.note]
            for r in side.rows
        ]
        return _table(rows, cols)
    rows = []
    for i, r in enumerate(side.rows, 1):
        question = f"({r.note}) {r.question}" if r.note else r.question
        rows.append(
            [
                str(i),
                question,
                r.answer,
                _source(r),
                "yes" if r.degraded else "no",
                str(r.attempts) if r.attempts >= 0 else "-",
                str(r.upstream_calls) if r.upstream_calls >= 0 else "-",
                f"{r.latency_ms:.0f}",
                (r.breaker or "-").upper() if r.breaker == "open" else (r.breaker or "-"),
            ]
        )
    return _table(rows, _COLUMNS)


def _verdict(side: SideResult, counted: bool = True) -> str:
    answered = side.requests - side.errors
    parts = [f"{answered}/{side.requests} answered ({side.live} live, {side.degraded} degraded)"]
    parts.append(
        f"{side.errors} user-facing error{'s' if side.errors != 1 else ''} "
        f"({side.error_rate * 100:.0f}%)"
    )
    if counted:
        parts.append(
            f"{side.upstream_calls} upstream calls ({side.upstream_per_request:.1f} per request)"
        )
    return "  -> " + "; ".join(parts)


def render_scenario(result: ScenarioResult, counted: bool = True) -> str:
    spike = result.name == "spike"
    number = SCENARIO_NUMBERS.get(result.name, 0)
    title = f" {FRAMEWORK_TITLES.get(result.framework, result.framework)} | Scenario {number}: {result.title} "
    out = ["", f"{title:=^100}"]
    for side, label in (
        (result.wrapped, "WITH rag-resilience"),
        (result.plain, "WITHOUT (the same app, framework defaults)"),
    ):
        out.append(label)
        out += _side_lines(side, spike)
        out.append(_verdict(side, counted))
        extra = side.extra
        if spike and extra:
            out.append(
                f"     upstream: {side.upstream_calls} calls, {extra.get('upstream_rejected_busy', 0)}"
                f" refused with 503 (over capacity), at most {extra.get('upstream_max_in_flight', 0)}"
                " in flight"
            )
            if "limit_max_concurrency" in extra:
                out.append(
                    f"     limit: {extra['limit_max_concurrency']} in flight + queue of "
                    f"{extra['limit_max_waiting']}: peak {extra['peak_in_flight']} in flight, "
                    f"peak queue {extra['peak_waiting']}, {extra['rejected_by_limit']} turned "
                    "away at once with a busy message"
                )
    out += _notes(result)
    return "\n".join(out)


def _notes(result: ScenarioResult) -> list[str]:
    w, p = result.wrapped, result.plain
    if result.name == "normal":
        if w.errors or p.errors:  # e.g. a missing optional dependency: never claim success
            return [
                f"  Errors in normal operation ({w.errors} with, {p.errors} without the library):"
                " the app itself fails;",
                "  run `rag-resilience demo -v` to see why.",
            ]
        if w.upstream_calls == p.upstream_calls and w.requests and not w.rows[0].upstream_calls < 0:
            return ["  Both apps answer live; the wrapper adds no upstream calls."]
        return ["  Both apps answer live."]
    if result.name == "transient":
        return [
            "  Retries with short jittered backoff turn most failures into live answers; what",
            "  still fails is served from cache or as a generic answer, never as an error.",
        ]
    if result.name == "outage":
        opened = [r for r in w.rows if r.breaker == "open"]
        after = sum(max(0, r.upstream_calls) for r in opened[1:])
        return [
            "  The circuit opens after 10 failures in a row; from then on questions cost "
            f"{after} upstream calls",
            "  in total: a known question gets its last good answer with its age, a new one",
            "  the generic message. Without the library every question is an error after the",
            f"  SDK's retries ({p.upstream_calls} upstream calls).",
        ]
    if result.name == "spike":
        refused = p.extra.get("upstream_rejected_busy", 0)
        return [
            f"  With the library the upstream never saw more than {w.extra.get('upstream_max_in_flight', 0)}"
            f" requests at once ({w.extra.get('upstream_rejected_busy', 0)} refused); the overflow got",
            f"  a busy message at once. Without it {p.live} got a live answer and {p.errors} failed, after the",
            f"  SDK's retries hit the overloaded upstream {p.upstream_calls} times ({refused} refused with 503).",
        ]
    return []


def render_header(info: dict[str, Any]) -> str:
    s = info["settings"]
    lines = [
        "rag-resilience demo: the same RAG app with and without the library",
        f"  frameworks: {', '.join(info['frameworks'])}   scenarios: {', '.join(info['scenarios'])}"
        f"   seed: {info['seed']}",
    ]
    if info.get("real"):
        lines.append("  upstream: the real OpenAI API (upstream calls are not counted)")
    else:
        lines.append(
            "  upstream: the embedded chaos server (OpenAI-compatible, 127.0.0.1; one per app and "
            'scenario), api key "sk-demo"'
        )
    lines += [
        "  WITH:    ResilientEmbeddings/ResilientEmbedding + ResilientLLM (max_retries=0 inside), the",
        "           whole chain under with_resilience / ResilientQueryEngine.",
        f"           Demo policy: {s['max_retries']} retries, jittered backoff {s['initial_delay']} s "
        f"doubling up to {s['max_delay']} s, circuit opens after",
        f"           {s['failure_threshold']} failures in a row and probes again after "
        f"{s['recovery_timeout']:g} s, attempt timeout {s['attempt_timeout']:g} s, deadline "
        f"{s['deadline']:g} s, app limit",
        f"           {s['max_concurrency']} in flight + {s['max_waiting']} waiting. Waits are scaled "
        "down for a real-time demo (the presets",
        "           wait 0.5-2 s before the first retry and 30-120 s before probing an open circuit).",
        "  WITHOUT: the same chain with the frameworks' defaults (openai SDK: 2 retries, 0.5-8 s",
        "           backoff; LlamaIndex wraps it in tenacity: 3 tries for the LLM, 10 for embeddings).",
        f"  A user gives up after {info['user_timeout_s']:g} s ({info['spike_timeout_s']:g} s in the "
        "spike): the demo cancels the call and counts an error.",
        "  Columns: attempts = tries by the library's policies (one blocked by an open circuit counts,",
        "  but makes no upstream call); upstream = requests the chaos server received; ms = latency.",
    ]
    return "\n".join(lines)


def render_summary(
    results: list[ScenarioResult], logs: dict[str, int], warned: int, counted: bool = True
) -> str:
    out = ["", f"{' Summary ':=^100}"]
    header = (
        f"  {'framework':<11} {'scenario':<10} {'':<8} {'requests':>8} {'errors':>14} "
        f"{'degraded':>9} {'upstream':>9} {'per request':>12}"
    )
    out += [header, "  " + "-" * (len(header) - 2)]
    totals: dict[tuple[str, bool], list[int]] = {}
    for r in results:
        for side, label in ((r.wrapped, "with"), (r.plain, "without")):
            out.append(
                f"  {r.framework:<11} {r.name:<10} {label:<8} {side.requests:>8} "
                f"{side.errors:>5} ({side.error_rate * 100:4.0f}%) {side.degraded:>9} "
                f"{side.upstream_calls if counted else '-':>9} "
                f"{f'{side.upstream_per_request:.2f}' if counted else '-':>12}"
            )
            t = totals.setdefault((r.framework, side.wrapped), [0, 0, 0, 0])
            t[0] += side.requests
            t[1] += side.errors
            t[2] += side.degraded
            t[3] += side.upstream_calls
    out.append("")
    for (framework, wrapped), (req, err, deg, up) in totals.items():
        rate = err / req * 100 if req else 0.0
        per = up / req if req else 0.0
        who = "with rag-resilience" if wrapped else "without           "
        load = f", upstream load {per:.2f} requests per user request" if counted else ""
        out.append(
            f"  {framework:<11} {who}: user-facing error rate {rate:5.1f}% ({err}/{req}), "
            f"{deg} degraded answers{load}"
        )
    rr = {
        k.rsplit(".", 1)[-1]: v for k, v in logs.items() if k.startswith("rag_resilience.warnings")
    }
    errors = sum(v for k, v in logs.items() if k.startswith("rag_resilience.errors"))
    total = sum(rr.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(rr.items()))
    out += [
        "",
        f"  Logs: rag-resilience logged {total} warnings ({detail or 'none'}) and {errors} errors;"
        " the SDKs logged",
        f"  {logs.get('openai.sdk_retry', 0)} openai retries and "
        f"{logs.get('llama_index.tenacity_retry', 0)} LlamaIndex tenacity retries; "
        f"{warned} Python warnings. Hidden to keep the tables",
        "  readable: run `rag-resilience demo -v` to see every line.",
    ]
    return "\n".join(out)
