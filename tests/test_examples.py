"""Every script in examples/ runs as a user would run it (a subprocess, no API key, against
the bundled chaos server) and prints what it promises.

All scripts start at once in a module fixture (they mostly import and wait), then each test
checks one script's output. A new example is picked up by the glob; give it an entry in
EXPECTED to check more than its exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 120

ARGS: dict[str, list[str]] = {"fastapi_app.py": ["--selftest"]}
EXPECTED: dict[str, list[str]] = {
    "langchain_class_swap.py": [
        "healthy upstream",
        "upstream requests: 3",
        "full outage",
        "known question",
        "I'm sorry, I can't answer that right now",
        "done",
    ],
    "langchain_callback_handler.py": ["fail fast (0 requests)", "closed->open", "done"],
    "llama_index_settings.py": [
        "source=live",
        "source=cache",
        "source=generic_fallback",
        "== stats ==",
    ],
    "openai_client.py": [
        "'What is exponential backoff?': source=live, attempts=3",
        "upstream requests: 3",
        "'What is a circuit breaker?': source=cache",
        "'A brand new question': source=generic_fallback",
        "circuit: open",
        "after the circuit opened: 0",
        "circuit: closed",
        "done",
    ],
    "fastapi_app.py": [
        "How long do I have to ask for a refund?': live",
        "When is support open?': live",
        "How long do I have to ask for a refund?': cache (",
        "Do you ship to Norway?': generic_fallback",
        "GET /stats: chain calls=4",
        "selftest ok",
    ],
}


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@pytest.fixture(scope="module")
def runs() -> dict[str, Ran]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["PYTHONUNBUFFERED"] = "1"
    started = time.perf_counter()
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *ARGS.get(name, [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=EXAMPLES.parent,
        )
        for name in SCRIPTS
    }
    results: dict[str, Ran] = {}
    for name, proc in procs.items():
        left = max(1.0, TIMEOUT_S - (time.perf_counter() - started))
        try:
            out, err = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n[test] killed after {TIMEOUT_S} s"
        results[name] = Ran(proc.returncode, out, err, time.perf_counter() - started)
    return results


def test_examples_exist() -> None:
    assert "openai_client.py" in SCRIPTS
    assert "fastapi_app.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_and_prints_what_it_promises(script: str, runs: dict[str, Ran]) -> None:
    ran = runs[script]
    assert ran.returncode == 0, f"{script} exited {ran.returncode}\n{ran.stdout}\n{ran.stderr}"
    assert "Traceback" not in ran.stderr, ran.stderr
    assert ran.stdout.strip(), f"{script} printed nothing"
    missing = [s for s in EXPECTED.get(script, []) if s not in ran.stdout]
    assert not missing, f"{script}: missing {missing} in output:\n{ran.stdout}"
