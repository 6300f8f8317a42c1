"""`rag-resilience demo` end to end, in-process, on quick settings: the JSON it writes must
show what the README promises. The full run (`--scenario all`) takes about a minute and is
not run here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from rag_resilience.demo import main
from rag_resilience.demo.scenarios import KNOWN_QUESTION, SPIKE_REQUESTS


def _run(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "demo.json"
    code = main([*args, "--quick", "--json", str(out)])
    assert code == 0
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.fixture(scope="module")
def calm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """LlamaIndex through transient failures and a complete outage (both at once)."""
    return _run(
        tmp_path_factory.mktemp("calm"),
        "--framework",
        "llama-index",
        "--scenario",
        "transient,outage",
    )


@pytest.fixture(scope="module")
def spike(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """LangChain through 150 concurrent requests against an upstream serving 10 at a time."""
    return _run(tmp_path_factory.mktemp("spike"), "--framework", "langchain", "--scenario", "spike")


def _scenario(data: dict[str, Any], name: str) -> dict[str, Any]:
    found = [r for r in data["results"] if r["name"] == name]
    assert len(found) == 1, [r["name"] for r in data["results"]]
    result: dict[str, Any] = found[0]
    return result


def test_json_describes_the_run(calm: dict[str, Any]) -> None:
    assert calm["frameworks"] == ["llama-index"]
    assert calm["scenarios"] == ["transient", "outage"]
    assert calm["settings"]["recovery_timeout"] <= 5  # scaled down for real time
    assert calm["user_timeout_s"] == 2.5
    for result in calm["results"]:
        for side in ("wrapped", "unwrapped"):
            assert result[side]["requests"] == len(result[side]["rows"]) == 5


def test_transient_wrapped_has_no_user_facing_errors(calm: dict[str, Any]) -> None:
    result = _scenario(calm, "transient")
    wrapped, plain = result["wrapped"], result["unwrapped"]
    assert wrapped["errors"] == 0 and wrapped["error_rate"] == 0
    assert wrapped["live"] >= 3  # retries turned most failures into live answers
    retried = [r for r in wrapped["rows"] if r["attempts"] > 2]
    assert retried, "with 60% failures some question must have been retried"
    # every upstream request of the wrapped app is one of its policies' attempts
    assert wrapped["upstream_calls"] == sum(r["attempts"] for r in wrapped["rows"])
    assert plain["errors"] >= 1  # the unwrapped app shows errors to its users


def test_outage_serves_cache_then_generic_with_no_upstream_calls_once_open(
    calm: dict[str, Any],
) -> None:
    result = _scenario(calm, "outage")
    wrapped, plain = result["wrapped"], result["unwrapped"]
    rows = wrapped["rows"]
    assert wrapped["errors"] == 0
    warm, known = rows[0], rows[3]
    assert warm["question"] == known["question"] == KNOWN_QUESTION
    assert warm["source"] == "live" and warm["breaker"] == "closed"
    # the circuit opened during the outage ...
    opened = next(i for i, r in enumerate(rows) if r["breaker"] == "open")
    assert opened <= 2
    # ... and from then on no question reached the upstream
    assert all(r["upstream_calls"] == 0 for r in rows[opened + 1 :])
    assert known["source"] == "cache" and known["degraded"] is True
    assert known["age_s"] is not None and known["age_s"] > 0
    assert known["answer"] == warm["answer"]
    new = rows[4]
    assert new["source"] == "generic_fallback" and new["degraded"] is True
    assert "can't answer" in new["answer"]
    # without the library every question after the outage began is an error
    assert [r["failed"] for r in plain["rows"]] == [False, True, True, True, True]
    assert plain["rows"][0]["source"] == "live"


def test_spike_bounded_queue_and_backpressure(spike: dict[str, Any]) -> None:
    result = _scenario(spike, "spike")
    wrapped, plain = result["wrapped"], result["unwrapped"]
    assert wrapped["requests"] == plain["requests"] == SPIKE_REQUESTS
    extra = wrapped["extra"]
    # nobody crashed: every request got an answer or a busy message, no exception
    assert "error" not in wrapped["sources"]
    assert "error" not in plain["sources"] or plain["errors"] < SPIKE_REQUESTS
    # the limit queued some requests and turned the overflow away at once
    assert extra["peak_waiting"] > 0
    assert extra["rejected_by_limit"] == wrapped["sources"].get("rejected", 0) > 0
    assert extra["peak_in_flight"] <= extra["limit_max_concurrency"]
    # the upstream never saw more than the limit, so it refused nothing
    assert extra["upstream_max_in_flight"] <= extra["limit_max_concurrency"]
    assert extra["upstream_rejected_busy"] == 0
    # without the limit the upstream was overloaded and refused requests
    assert plain["extra"]["upstream_rejected_busy"] > 0


def test_library_logs_are_counted(calm: dict[str, Any]) -> None:
    logs = calm["logs"]
    assert logs.get("rag_resilience.warnings.retry", 0) > 0
    assert logs.get("rag_resilience.warnings.fallback", 0) > 0


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--scenario", "nope"]) == 2
    assert "--scenario must be" in capsys.readouterr().err


def test_real_without_key_exits_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["--real"]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err


def test_a_framework_that_is_not_installed_is_skipped_and_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `[langchain]`-only install: the default run (both) runs LangChain and says that
    LlamaIndex was skipped, instead of failing with ModuleNotFoundError (issue 18)."""
    monkeypatch.setitem(sys.modules, "llama_index.llms.openai", None)  # import fails
    data = _run(tmp_path, "--scenario", "normal")
    out = capsys.readouterr().out
    assert data["frameworks"] == ["langchain"]
    assert "llama-index" in data["skipped"] and "rag-resilience[llama-index]" in out
    assert "Skipped llama-index" in out
    assert [r["framework"] for r in data["results"]] == ["langchain"]

    monkeypatch.setitem(sys.modules, "langchain_openai", None)  # nothing left to run
    assert main(["--scenario", "normal", "--quick"]) == 2
    assert "not installed" in capsys.readouterr().err


def test_readme_demo_table_is_generated_from_json_runs(tmp_path: Path) -> None:
    """scripts/demo_table.py turns `--json` runs into the README's table of ranges."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("demo_table", root / "scripts" / "demo_table.py")
    assert spec is not None and spec.loader is not None
    demo_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_table)

    def run(seed: int, errors: int) -> dict[str, Any]:
        side = {"requests": 20, "errors": 0, "degraded": 3, "upstream_calls": 30}
        plain = {"requests": 20, "errors": errors, "degraded": 0, "upstream_calls": 60}
        result = {"framework": "langchain", "wrapped": side, "unwrapped": plain}
        return {"seed": seed, "scenarios": ["normal"], "results": [result]}

    text = demo_table.table([run(1, 2), run(2, 7)])
    assert "| LangChain | with rag-resilience | 0% | 3 | 1.50 |" in text
    assert "| LangChain | without | 10%–35% | 0 | 3.00 |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{demo_table.START}\nold\n{demo_table.END}\nb\n")
    demo_table.write(readme, text)
    assert "old" not in readme.read_text() and text in readme.read_text()
    assert demo_table.START in (root / "README.md").read_text()  # the README has the markers
