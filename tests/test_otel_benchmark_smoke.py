"""The tracing overhead benchmark still runs and writes well-formed results (no timing
assertions: the numbers are for humans, compared side by side in one run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_otel_overhead_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "otel.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "otel_overhead.py"),
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT / "benchmarks",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    names = {(r["group"], r["name"]) for r in result["rows"]}
    assert ("sync", "policy traced, SDK tracer") in names
    assert ("async", "policy traced, API no-op tracer") in names
    assert set(result["targets"]) == {
        "traced_policy_adds_le_20us_over_its_spans_sync",
        "traced_policy_adds_le_20us_over_its_spans_async",
        "tracing_adds_le_20us_with_noop_tracer_sync",
        "tracing_adds_le_20us_with_noop_tracer_async",
    }
