"""Instructions per call, counted by valgrind's callgrind: a figure the machine's load cannot move.

Usage: python benchmarks/instructions.py [--json PATH] [case ...]   (about 5 min in all:
the LangChain imports run under valgrind too, uncounted but slow)

This shared machine runs anywhere from 1x to 2x slower from one minute to the next, so
timed benchmarks here are read as ratios within one run. Instruction counts move by under
1% between runs (string hashing is randomised per process): each case runs `number` calls inside `itertools.starmap`, and callgrind
counts only what executes inside `starmap_next` (`--toggle-collect`), i.e. the calls and
nothing of the interpreter start-up, the imports or the setup. The count includes the
loop's own cost, reported as the "loop" case and subtracted from the others.

Instructions are not time (cache misses, branch mispredictions and the allocator differ),
but for pure-Python overhead the ratios track CPU time closely. Needs `valgrind` on PATH;
without it the script says so and exits 0 (it is a complement to the timed benchmarks,
not a replacement).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "instructions.json"
QUESTION = "What is the capital of France?"

# case -> (calls, setup building `fn`). Setup runs in the child; only `fn()` is counted.
CASES: dict[str, tuple[int, str]] = {
    "loop": (2000, "fn = lambda: None"),
    "ResiliencePolicy.call (balanced)": (
        2000,
        "from rag_resilience.policy import ResiliencePolicy\n"
        "p = ResiliencePolicy.preset('balanced'); noop = lambda: 1\n"
        "fn = lambda: p.call(noop)",
    ),
    "ResiliencePolicy.call (balanced, key)": (
        2000,
        "from rag_resilience.policy import ResiliencePolicy\n"
        "p = ResiliencePolicy.preset('balanced'); noop = lambda: 1\n"
        "fn = lambda: p.call(noop, key='q')",
    ),
    "tenacity @retry": (
        2000,
        "import tenacity\n"
        "fn = tenacity.retry(stop=tenacity.stop_after_attempt(4),"
        " wait=tenacity.wait_exponential_jitter())(lambda: 1)",
    ),
    "bare FakeListChatModel.invoke": (
        300,
        "from langchain_core.language_models.fake_chat_models import FakeListChatModel\n"
        "m = FakeListChatModel(responses=['Paris.'])\n"
        f"fn = lambda: m.invoke({QUESTION!r})",
    ),
    "ResilientLLM.invoke": (
        300,
        "from langchain_core.language_models.fake_chat_models import FakeListChatModel\n"
        "from rag_resilience.langchain import ResilientLLM\n"
        "m = ResilientLLM(FakeListChatModel(responses=['Paris.']))\n"
        f"fn = lambda: m.invoke({QUESTION!r})",
    ),
    "bare DeterministicFakeEmbedding.embed_query": (
        1000,
        "from langchain_core.embeddings import DeterministicFakeEmbedding\n"
        "m = DeterministicFakeEmbedding(size=256)\n"
        f"fn = lambda: m.embed_query({QUESTION!r})",
    ),
    "ResilientEmbeddings.embed_query": (
        1000,
        "from langchain_core.embeddings import DeterministicFakeEmbedding\n"
        "from rag_resilience.langchain import ResilientEmbeddings\n"
        "m = ResilientEmbeddings(DeterministicFakeEmbedding(size=256))\n"
        f"fn = lambda: m.embed_query({QUESTION!r})",
    ),
}
# What each case is compared with: (case, baseline).
PAIRS = [
    ("ResiliencePolicy.call (balanced, key)", "tenacity @retry"),
    ("ResiliencePolicy.call (balanced)", "tenacity @retry"),
    ("ResilientLLM.invoke", "bare FakeListChatModel.invoke"),
    ("ResilientEmbeddings.embed_query", "bare DeterministicFakeEmbedding.embed_query"),
]

CHILD = """
import collections, itertools, logging, sys, warnings
warnings.simplefilter("ignore")
logging.getLogger("rag_resilience").setLevel(logging.ERROR)
{setup}
for _ in range(300):
    fn()
collections.deque(itertools.starmap(fn, itertools.repeat((), {number})), maxlen=0)
"""


def count(setup: str, number: int) -> int:
    """Instructions executed by `number` calls of the case (inside starmap_next)."""
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--collect-atstart=no",
            "--toggle-collect=starmap_next",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            CHILD.format(setup=setup, number=number),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"refs:\s*([\d,]+)", proc.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{proc.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: no instruction counts (see the timed benchmarks)")
        return 0
    names = args.cases or list(CASES)
    if "loop" not in names:
        names.insert(0, "loop")
    per_call: dict[str, float] = {}
    for name in names:
        number, setup = CASES[name]
        per_call[name] = count(setup, number) / number
        print(f"{name:<48}{per_call[name]:>12,.0f} instructions/call", flush=True)
    loop = per_call["loop"]
    net = {k: v - loop for k, v in per_call.items() if k != "loop"}
    ratios: dict[str, Any] = {}
    print()
    for case, base in PAIRS:
        if case in net and base in net:
            added = net[case] - net[base] if "bare" in base else net[case]
            ratio = net[case] / net[base]
            ratios[case] = {"baseline": base, "ratio": round(ratio, 4), "added": round(added)}
            shown = f"{(ratio - 1) * 100:+.1f}%" if "bare" in base else f"{ratio:.2f}x"
            print(f"{case:<48} vs {base}: {shown}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "benchmark": "instructions",
                "tool": "valgrind callgrind, counted inside itertools.starmap_next",
                "python": sys.version.split()[0],
                "instructions_per_call": {k: round(v) for k, v in net.items()},
                "loop_instructions_per_call": round(loop),
                "ratios": ratios,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
