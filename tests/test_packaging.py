"""What a user installs: each extra carries what the code it enables needs at run time."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _extra(name: str) -> list[str]:
    # tomllib is 3.11+: read the one-line extra with a pattern
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(rf"^{re.escape(name)} = \[(.*)\]$", text, re.MULTILINE)
    assert found, f"no [{name}] extra in pyproject.toml"
    return re.findall(r'"([^"]+)"', found.group(1))


def _names(deps: list[str]) -> set[str]:
    return {
        d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        for d in deps
    }


def test_langchain_extra_installs_what_in_memory_vector_store_needs() -> None:
    """The README quickstart, `rag-resilience demo` and the examples search an
    InMemoryVectorStore, whose cosine similarity imports numpy: in a `[langchain]`-only
    install every question failed with ImportError (langchain-core does not depend on it)."""
    import inspect

    from langchain_core.vectorstores import utils

    assert "import numpy" in inspect.getsource(utils)
    assert "numpy" in _names(_extra("langchain"))


def test_demo_does_not_claim_live_answers_when_the_app_failed() -> None:
    """`rag-resilience demo` said "Both apps answer live" under a 100% error table."""
    from rag_resilience.demo.render import render_scenario
    from rag_resilience.demo.scenarios import Row, ScenarioResult, SideResult

    def side(wrapped: bool) -> SideResult:
        row = Row("q", "ERROR ImportError", "error", False, True, None, 1, 1, 5.0)
        return SideResult(wrapped, rows=[row], requests=1, errors=1, upstream_calls=1)

    text = render_scenario(ScenarioResult("normal", "Normal", "langchain", side(True), side(False)))
    assert "answer live" not in text
    assert "demo -v" in text
