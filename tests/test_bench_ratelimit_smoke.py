"""The rate-limit benchmark still runs end to end and writes well-formed results (no timing
assertions: goodput on a shared machine says nothing; what must hold is that every call is
accounted for and ours is never errored or degraded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "ratelimit.py"


def test_ratelimit_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "ratelimit.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--rps",
            "400",
            "--tpm",
            str(60 * 40000),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text(encoding="utf-8"))
    for table in ("requests", "tokens"):
        (row,) = data[table]
        assert row["contender"] == "ours-openai"
        assert row["live"] + row["degraded"] + row["errors"] == row["calls"] == 60
        assert row["errors"] == 0 and row["degraded"] == 0
        assert row["requests"] >= row["calls"] and 0 <= row["429_rate"] <= 1
    assert set(data["targets"]) == {"requests:ours-openai", "tokens:ours-openai"}
