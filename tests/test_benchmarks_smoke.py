"""The overhead benchmark still runs and writes well-formed results (no timing assertions:
timings on a shared CI machine say nothing; the benchmark is for humans)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "overhead.py"

EXPECTED = {
    ("sync", "bare call"),
    ("sync", "RetryStrategy.execute"),
    ("sync", "CircuitBreaker.call"),
    ("sync", "ConcurrencyLimit.slot"),
    ("sync", "ResiliencePolicy.call (balanced, key)"),
    ("sync", "tenacity @retry"),
    ("sync", "tenacity @retry + pybreaker"),
    ("sync", "stamina.retry"),
    ("async", "bare call"),
    ("async", "RetryStrategy.aexecute"),
    ("async", "CircuitBreaker.acall"),
    ("async", "ConcurrencyLimit.aslot"),
    ("async", "ResiliencePolicy.acall (balanced, key)"),
    ("async", "tenacity @retry"),
    ("async", "stamina.retry"),
}


def test_overhead_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| group" in proc.stdout and "ResiliencePolicy.call" in proc.stdout

    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["benchmark"] == "overhead"
    assert data["settings"]["quick"] is True
    assert data["machine"]["python"] == sys.version.split()[0]
    assert data["machine"]["cpu"]

    rows = {(r["group"], r["name"]): r for r in data["rows"]}
    assert set(rows) >= EXPECTED
    for (group, _name), row in rows.items():
        assert row["us_per_call"] > 0
        assert row["repeats"] == 3
        bare = rows[(group, "bare call")]["us_per_call"]
        tenacity = rows[(group, "tenacity @retry")]["us_per_call"]
        assert (
            abs(row["ratio_vs_bare"] - row["us_per_call"] / bare)
            <= 0.01 * row["ratio_vs_bare"] + 0.01
        )
        assert (
            abs(row["vs_tenacity"] - row["us_per_call"] / tenacity)
            <= 0.01 * row["vs_tenacity"] + 0.001
        )
        assert abs(row["added_us"] - (row["us_per_call"] - bare)) < 1e-3
    assert rows[("sync", "bare call")]["ratio_vs_bare"] == 1.0

    targets = data["targets"]
    for name in ("policy_added_le_5us", "policy_below_tenacity", "breaker_added_lt_1us"):
        assert isinstance(targets[name]["ok"], bool)
        assert isinstance(targets[name + "_async"]["ok"], bool)


def test_langchain_overhead_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "langchain_overhead.json"
    script = ROOT / "benchmarks" / "langchain_overhead.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--repeat", "2", "--number", "5", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "scaled to the issue's machine" in proc.stdout
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["repeat"] == 2 and data["number"] == 5
    assert set(data["embeddings"]) == {
        "bare embed_query",
        "ResilientEmbeddings.embed_query",
        "embed_query .with_retry()",
        "tenacity+pybreaker embed_query",
    }
    assert {"bare invoke", "ResilientLLM.invoke", ".with_retry().invoke"} <= set(data["chat"])
    assert isinstance(data["embed_query_added_us_at_reference_invoke_105us"], float)
    assert all(isinstance(ok, bool) for ok in data["targets"].values())


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is an optional tool")
def test_instruction_counts_run(tmp_path: Path) -> None:
    """The callgrind benchmark still runs and writes its JSON (its cheapest case: the loop
    alone, one valgrind run of a bare interpreter; the real cases take minutes)."""
    out = tmp_path / "instructions.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "instructions.py"),
            "--json",
            str(out),
            "loop",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["benchmark"] == "instructions"
    assert data["instructions_per_call"] == {} and data["ratios"] == {}
    assert 0 < data["loop_instructions_per_call"] < 10_000  # a lambda call, not the start-up


def test_ingest_benchmark_small_run_writes_json(tmp_path: Path) -> None:
    """Ours and the LangChain baseline on 300 chunks (inside the bucket's burst: a second)."""
    out = tmp_path / "ingest.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "ingest.py"),
            "--chunks",
            "300",
            "--seconds",
            "1",
            "--only",
            "LangChain OpenAIEmbeddings",
            "LangChain), sync",
            "--no-outage",
            "--no-kill",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "ingest.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [r["name"] for r in data["rows"]] == [
        "LangChain OpenAIEmbeddings defaults",
        "ours: ResilientEmbeddings (LangChain), sync",
    ]
    assert all(r["chunks_lost"] == 0 for r in data["rows"])
    assert data["settings"]["chunks"] == 300 and data["kill_and_resume"] is None


def test_recovery_benchmark_smoke_writes_every_part(tmp_path: Path) -> None:
    """benchmarks/recovery.py --smoke: every part runs, shrunk (counting on 200 simulated
    calls, a batch of 50 over HTTP, a crowd of 50, a 0.3 s outage, failover) and writes its
    JSON and markdown. No numbers checked beyond their shape: the benchmark is for humans."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "recovery.py"),
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "recovery.json").read_text(encoding="utf-8"))
    assert data["settings"] == {"quick": True, "smoke": True}
    assert len(data["counting"]) == 4 and all(0 <= r["live_50"] <= 1 for r in data["counting"])
    assert [r["batch_live"] + r["batch_generic"] for r in data["recovery"]] == [50, 50]
    assert data["recovery"][0]["crowd"] == 50
    assert [r["contender"] for r in data["wait_dont_fail"]] == ["openai-sdk", "ours-openai"]
    assert [r["failover"] for r in data["failover"]] == ["after_retries", "immediate"]
    assert "# Recovery benchmark" in (tmp_path / "recovery.md").read_text(encoding="utf-8")
