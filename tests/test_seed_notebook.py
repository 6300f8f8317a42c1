"""The seed notebook's demos, run unchanged against our package (only the import line
changes), with every `# Expected:` claim asserted. A fake clock stands in for time so
the notebook's sleeps and backoffs cost nothing."""

from __future__ import annotations

import contextlib
import io
import random
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rag_resilience import QueueWorker
from rag_resilience.testing import FakeClock, fake_clock

# The project keeps a copy of its seed notebook; ../shared/seed is the original.
SEED = Path(__file__).resolve().parent / "data" / "m2_4_error_handling_notebook.txt"
ORIGINAL_IMPORT = "from src.m2_4_error_handling import ("
OUR_IMPORT = "from rag_resilience import ("


def _seed_path() -> Path:
    for candidate in (SEED, Path(__file__).resolve().parents[2] / "shared" / "seed" / SEED.name):
        if candidate.exists():
            return candidate
    pytest.fail(f"seed notebook not found at {SEED}")


def load_cells() -> dict[str, str]:
    """Cells in the notebook's logical order, named by section and demo.

    The text export lists section 1 forwards, then for each later section its
    "SAVED_SECTION" cell followed by that section's cells in reverse order.
    """
    text = _seed_path().read_text(encoding="utf-8")
    raw = [c for c in text.split("In [None]:")[1:]]
    cells = []
    for chunk in raw:
        # A cell ends where the next markdown block starts (a line starting with '#'
        # followed by a space and a capital, or '**'), keep code only.
        lines = chunk.strip("\n").split("\n")
        code: list[str] = []
        for line in lines:
            if re.match(r"^(## |### |\*\*|- |✅|❌|\d+\. \*\*)", line):
                break
            code.append(line)
        cells.append("\n".join(code).strip())
    first: list[str] = []
    blocks: list[list[str]] = []
    for cell in cells:
        if "SAVED_SECTION:" in cell and "SAVED_SECTION:1" not in cell:
            blocks.append([cell])
        elif blocks:
            blocks[-1].append(cell)
        else:
            first.append(cell)
    # Later sections are listed last-first, each with its cells reversed.
    ordered = first + [cell for block in reversed(blocks) for cell in reversed(block)]
    named: dict[str, str] = {}
    for index, cell in enumerate(ordered):
        first = next((ln for ln in cell.splitlines() if ln.startswith("# ")), "")
        named[first.strip("# ").strip() or f"cell {index}"] = cell
    return named


class _FakeTime(types.ModuleType):
    """The notebook's `time`: sleeping advances the fake clock; the main thread's sleep
    also lets background QueueWorkers finish what is queued (as real time would)."""

    def __init__(self, clock: FakeClock, ns: dict[str, Any]) -> None:
        super().__init__("time")
        self._clock = clock
        self._ns = ns

    def sleep(self, seconds: float) -> None:
        import threading

        self._clock.sleep(seconds)
        if threading.current_thread() is threading.main_thread():
            for value in list(self._ns.values()):
                if isinstance(value, QueueWorker) and value.is_running:
                    assert value.wait_idle(timeout=10.0)

    def time(self) -> float:
        return self._clock.time()

    def monotonic(self) -> float:
        return self._clock.monotonic()


@pytest.fixture(scope="module")
def notebook() -> Iterator[Any]:
    cells = load_cells()
    ns: dict[str, Any] = {"__name__": "seed_notebook"}
    outputs: dict[str, str] = {}
    clock = FakeClock()
    random.seed(7)
    with fake_clock(clock):
        for name, code in cells.items():
            if ORIGINAL_IMPORT in code:
                code = code.replace(ORIGINAL_IMPORT, OUR_IMPORT)
            buf = io.StringIO()
            before = len(clock.sleeps)
            with contextlib.redirect_stdout(buf):
                exec(compile(code, f"<seed:{name}>", "exec"), ns)
            if "time" in ns and not isinstance(ns["time"], _FakeTime):
                ns["time"] = _FakeTime(clock, ns)
            outputs[name] = buf.getvalue()
            outputs[name + ":sleeps"] = repr(clock.sleeps[before:])
        for value in ns.values():
            if isinstance(value, QueueWorker) and value.is_running:
                value.stop()
        # Tests poke at the notebook's objects afterwards: keep its clock installed.
        yield types.SimpleNamespace(ns=ns, out=outputs, clock=clock, cells=cells)


def out(nb: Any, prefix: str) -> str:
    matches = [k for k in nb.out if k.startswith(prefix) and not k.endswith(":sleeps")]
    assert matches, f"no cell starting with {prefix!r}; cells: {list(nb.out)}"
    return nb.out[matches[0]]


def test_the_import_line_is_the_only_change(notebook: Any) -> None:
    imports = [c for c in notebook.cells.values() if ORIGINAL_IMPORT in c]
    assert len(imports) == 1
    assert "Resilience patterns loaded" in out(notebook, "Add src to path")


def test_every_demo_cell_ran(notebook: Any) -> None:
    assert len(notebook.cells) == 28
    assert "ALL SECTIONS COMPLETE" in "".join(notebook.out.values())


def test_retry_with_exponential_backoff(notebook: Any) -> None:
    text = out(notebook, "Demo 1: Basic retry")
    assert "Final result: Success: demo-001" in text or "All retries exhausted" in text
    sleeps = eval(
        notebook.out[
            next(
                k
                for k in notebook.out
                if k.startswith("Demo 1: Basic retry") and k.endswith(":sleeps")
            )
        ]
    )
    assert len(sleeps) <= 3  # 1-4 attempts
    for n, delay in enumerate(sleeps):
        assert 0 <= delay <= 0.5 * 2**n  # full jitter under the exponential cap


def test_retry_decorator(notebook: Any) -> None:
    text = out(notebook, "Demo 2: Retry decorator")
    assert "✓ Embedding[1536] for: What is machine learning?" in text or "✗ Failed" in text


def test_error_classification(notebook: Any) -> None:
    text = out(notebook, "Demo 3: Retryable vs Non-retryable")
    assert "✓ Recovered!" in text  # 500 retried
    assert "✗ Immediately failed (no retries): Not Found - Non-retryable" in text


def test_circuit_breaker_lifecycle(notebook: Any) -> None:
    text = out(notebook, "Demo 1: Circuit breaker lifecycle")
    assert "Initial state: closed" in text
    assert "Attempt 2: Failed - State: closed" in text
    assert "Attempt 3: Failed - State: open" in text
    assert "Attempt 4: Failed - State: open" in text  # rejected without calling
    assert "✗ Circuit is now: OPEN" in text
    assert "✗ Rejected: circuit" in text
    assert "✓ Service OK" in text and "Circuit state: closed" in text  # HALF_OPEN -> CLOSED


def test_circuit_protected_client(notebook: Any) -> None:
    text = out(notebook, "Demo 2: Circuit breaker protecting")
    assert text.count("✓ Embedding") == 3
    assert "Call 2 failed (state: closed)" in text
    assert "Call 3 failed (state: open)" in text
    assert "Call 5 failed (state: open)" in text
    assert "State: OPEN" in text


def test_fallbacks(notebook: Any) -> None:
    text = out(notebook, "Demo 1: Fallback with cached")
    assert "📦 From cache: [AI-generated answer about: What is machine learning?]" in text
    assert "⚠️  Fallback: " in text and "From cache" not in text.split("⚠️  Fallback")[1]


def test_last_known_good_age(notebook: Any) -> None:
    text = out(notebook, "Demo 2: Last-known-good")
    assert "Age: 2.0 seconds old" in text
    assert "No cache available" in text


def test_breaker_plus_fallback(notebook: Any) -> None:
    text = out(notebook, "Demo 3: Circuit breaker + fallback")
    assert "✓ Fresh answer: What is AI?" in text
    assert "(CB: open): Fresh answer: What is AI?" in text
    assert text.count("Fresh answer: What is AI?") == 5  # every outage attempt served the cache


def test_queue_backpressure(notebook: Any) -> None:
    text = out(notebook, "Demo 1: Request queue")
    assert "✓ Accepted: 10" in text and "✗ Rejected: 5" in text
    assert "Queue size: 10/10" in text


def test_queue_worker(notebook: Any) -> None:
    text = out(notebook, "Demo 2: Queue worker")
    assert "Items processed: 5" in text and "Queue size: 0" in text


def test_traffic_spike(notebook: Any) -> None:
    text = out(notebook, "Demo 3: Simulating traffic spike")
    assert "✓ 50 queued for processing" in text and "⚠️  50 rejected" in text


def test_production_rag_normal(notebook: Any) -> None:
    text = out(notebook, "Scenario 1")
    assert text.count("Source: live_api, Degraded: False") == 3


def test_production_rag_transient(notebook: Any) -> None:
    text = out(notebook, "Scenario 2")
    assert "Source: live_api, Degraded: False" in text


def test_production_rag_outage(notebook: Any) -> None:
    text = out(notebook, "Scenario 3")
    assert "Circuit breaker state: OPEN" in text
    assert "Source: cache" in text and "[Cached:" in text
    assert "Source: generic_fallback" in text
    rag = notebook.ns["rag"]
    # Once open, answers come without waiting: the two fallback queries slept nothing.
    before = len(notebook.clock.sleeps)
    assert rag.query("What is deep learning?")["source"] == "cache"
    assert len(notebook.clock.sleeps) == before


def test_production_rag_spike(notebook: Any) -> None:
    text = out(notebook, "Scenario 4")
    accepted = int(re.search(r"Accepted: (\d+)", text).group(1))  # type: ignore[union-attr]
    rejected = int(re.search(r"Rejected: (\d+)", text).group(1))  # type: ignore[union-attr]
    assert accepted + rejected == 150 and accepted >= 100


def test_reference_cells(notebook: Any) -> None:
    assert "Balanced (Recommended Default)" in out(notebook, "Production Configuration")
    assert "Circuit Breaker" in out(notebook, "Decision Card")
    assert "5. Retrying Non-Retryable Errors" in out(notebook, "Common Failures")
