"""The README runs verbatim (issue 18, part 3): every ```python block of README.md is run as
it is written, each as its own script in a fresh interpreter, against a chaos server.

Marker convention, for everyone who edits the README: a ```python block that cannot run
here (it needs a real OPENAI_API_KEY, a service we do not start, ...) gets this HTML comment
on the line right before its opening fence (GitHub does not render it)::

    <!-- readme-test: skip: needs a real OPENAI_API_KEY -->

Every other ```python block must be complete: its imports, its data, nothing elided with
``...``. It runs with OPENAI_BASE_URL and OPENAI_API_BASE (LlamaIndex's name) pointing at
the chaos server, OPENAI_API_KEY=sk-test, a temporary working directory and no network
beyond loopback. Blocks in other languages (bash, text) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from rag_resilience.chaos import ChaosServer

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\s*:?\s*(?P<why>.*?)\s*-->")
TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # why, when marked


def python_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```") and fence[3:].strip().split(" ")[0] == "python":
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            before = lines[start - 1] if start > 0 else ""
            mark = SKIP_MARK.search(before)
            blocks.append(
                Block(start + 1, "\n".join(body) + "\n", mark.group("why") if mark else None)
            )
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks_and_the_parser_sees_marks() -> None:
    assert len(BLOCKS) >= 5
    sample = "text\n<!-- readme-test: skip: needs a key -->\n```python\nx = 1\n```\n"
    assert python_blocks(sample) == [Block(3, "x = 1\n", "needs a key")]


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[int, subprocess.CompletedProcess[str]]]:
    """Run every runnable block at once (each in its own interpreter) against one server."""
    with ChaosServer(seed=18) as server:
        env = {
            **os.environ,
            "OPENAI_BASE_URL": server.base_url,
            "OPENAI_API_BASE": server.base_url,
            "OPENAI_API_KEY": "sk-test",
            "PYTHONWARNINGS": "ignore",
        }
        env.pop("OPENAI_ORG_ID", None)

        def run(block: Block) -> tuple[int, subprocess.CompletedProcess[str]]:
            workdir = tmp_path_factory.mktemp(f"readme-{block.line}")
            done = subprocess.run(
                [sys.executable, "-c", block.code],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
            return block.line, done

        runnable = [b for b in BLOCKS if b.skip is None]
        with ThreadPoolExecutor(max_workers=4) as pool:
            yield dict(pool.map(run, runnable))


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_runs(
    block: Block, results: dict[int, subprocess.CompletedProcess[str]]
) -> None:
    if block.skip is not None:
        pytest.skip(f"marked in the README: {block.skip}")
    done = results[block.line]
    assert done.returncode == 0, (
        f"README.md line {block.line} failed:\n{block.code}\n--- stderr ---\n{done.stderr[-3000:]}"
    )
