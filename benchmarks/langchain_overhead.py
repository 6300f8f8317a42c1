"""Overhead of the LangChain wrappers over in-process fakes (no network).

ResilientLLM.invoke over FakeListChatModel vs the bare invoke, `.with_retry()`, and
tenacity + pybreaker around the bare invoke; ResilientEmbeddings.embed_query over
DeterministicFakeEmbedding vs the bare call. Every variant runs in the same process,
interleaved in rounds; each round times every variant back to back (process CPU time),
and overheads are the median over rounds of each round's difference to the bare call.
Pairing within a round cancels the minute-to-minute speed changes of a shared machine,
which move every absolute figure by up to 2x here.

The embeddings overhead is also reported scaled to the issue's machine, by a bare
FakeListChatModel.invoke timed in the same rounds (105 µs there).

Also timed: the wrapper's own work in `_generate` (the hook LangChain calls) against the
bare model's `_generate`, i.e. what the resilience itself costs per call. The invoke
figure is net of one saving: LangChain inspects the hook's signature on every call, and
ours carries a precomputed one.

    .venv/bin/python benchmarks/langchain_overhead.py [--repeat 31] [--number 500] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pybreaker
import tenacity
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableLambda

from rag_resilience.langchain import ResilientEmbeddings, ResilientLLM

RESULTS = Path(__file__).parent / "results" / "langchain_overhead.json"
# The targets were set on a machine where a bare FakeListChatModel.invoke took about
# 105 µs; this one runs 1x-2x that from minute to minute, so the embeddings figure is also
# given scaled by the bare invoke timed in the same rounds.
REFERENCE_INVOKE_US = 105.0
CALIBRATION = "bare FakeListChatModel.invoke (yardstick)"


def _per_call_us(fn: Callable[[], Any], number: int) -> float:
    start = time.process_time()
    for _ in range(number):
        fn()
    return (time.process_time() - start) / number * 1e6


def tenacity_pybreaker(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """`fn` as it is usually protected without us: tenacity's retry around a pybreaker."""
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    retry = tenacity.retry(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential(multiplier=1),
        reraise=True,
    )
    protected: Callable[[str], Any] = retry(breaker(lambda text: fn(text)))
    return protected


def measure(
    variants: dict[str, Callable[[], Any]], repeat: int, number: int
) -> dict[str, list[float]]:
    """Per-call µs of every variant in each round (rounds interleave the variants)."""
    for fn in variants.values():  # warm up
        _per_call_us(fn, max(50, number // 10))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeat):
        for name, fn in variants.items():  # back to back: drift hits every variant alike
            samples[name].append(_per_call_us(fn, number))
    return samples


def paired(samples: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Median per-call µs, and the median over rounds of each round's added µs and %."""
    out = {}
    for name, values in samples.items():
        added = [v - b for v, b in zip(values, samples[base], strict=True)]
        pct = [(v / b - 1) * 100 for v, b in zip(values, samples[base], strict=True)]
        out[name] = {
            "us": statistics.median(values),
            "added_us": statistics.median(added),
            "added_pct": statistics.median(pct),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=31, help="rounds")
    parser.add_argument("--number", type=int, default=500, help="calls per variant per round")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args()
    logging.getLogger("rag_resilience").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")

    responses = ["The capital of France is Paris."]
    bare = FakeListChatModel(responses=responses)
    resilient = ResilientLLM(FakeListChatModel(responses=responses))
    with_retry = FakeListChatModel(responses=responses).with_retry(stop_after_attempt=4)
    tenacity_call = tenacity_pybreaker(FakeListChatModel(responses=responses).invoke)
    q = "What is the capital of France?"
    messages = [HumanMessage(q)]
    chat = paired(
        measure(
            {
                "bare invoke": lambda: bare.invoke(q),
                "ResilientLLM.invoke": lambda: resilient.invoke(q),
                ".with_retry().invoke": lambda: with_retry.invoke(q),
                "tenacity+pybreaker": lambda: tenacity_call(q),
            },
            args.repeat,
            args.number,
        ),
        "bare invoke",
    )
    hook = paired(
        measure(
            {
                "bare _generate": lambda: bare._generate(messages),
                "ResilientLLM._generate": lambda: resilient._generate(messages),
            },
            args.repeat,
            args.number,
        ),
        "bare _generate",
    )

    emb = DeterministicFakeEmbedding(size=256)
    remb = ResilientEmbeddings(DeterministicFakeEmbedding(size=256))
    # what a LangChain user has without us: RunnableLambda(embed_query).with_retry(),
    # or tenacity + pybreaker around the call
    emb_retry = RunnableLambda(DeterministicFakeEmbedding(size=256).embed_query).with_retry(
        stop_after_attempt=4
    )
    tenacity_embed = tenacity_pybreaker(DeterministicFakeEmbedding(size=256).embed_query)
    embed_samples = measure(
        {
            "bare embed_query": lambda: emb.embed_query(q),
            "ResilientEmbeddings.embed_query": lambda: remb.embed_query(q),
            "embed_query .with_retry()": lambda: emb_retry.invoke(q),
            "tenacity+pybreaker embed_query": lambda: tenacity_embed(q),
            # the yardstick, timed in the same rounds: its machine ran a bare
            # FakeListChatModel.invoke in about 105 µs
            CALIBRATION: lambda: bare.invoke(q),
        },
        args.repeat,
        args.number,
    )
    scaled_query_us = statistics.median(
        (r - b) * REFERENCE_INVOKE_US / c
        for r, b, c in zip(
            embed_samples["ResilientEmbeddings.embed_query"],
            embed_samples["bare embed_query"],
            embed_samples[CALIBRATION],
            strict=True,
        )
    )
    del embed_samples[CALIBRATION]
    embed = paired(embed_samples, "bare embed_query")

    print(f"{'variant':<34}{'median us/call':>16}{'added us':>12}{'added %':>10}")
    for table in (chat, hook, embed):
        for name, row in table.items():
            print(f"{name:<34}{row['us']:>16.1f}{row['added_us']:>12.1f}{row['added_pct']:>9.1f}%")
    print(
        f"embed_query added, scaled to the issue's machine (bare invoke "
        f"{REFERENCE_INVOKE_US:.0f} us): {scaled_query_us:.1f} us "
        f"({'MET' if scaled_query_us <= 5.0 else 'MISSED'}: target <= 5 us)"
    )
    llm = chat["ResilientLLM.invoke"]
    query = embed["ResilientEmbeddings.embed_query"]
    result = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "clock": "process CPU time",
        "statistic": "median over rounds of the per-round difference to the bare call",
        "repeat": args.repeat,
        "number": args.number,
        "chat": chat,
        "chat_hook": hook,
        "embeddings": embed,
        "embed_query_added_us_at_reference_invoke_105us": scaled_query_us,
        "targets": {
            "ResilientLLM.invoke added_pct <= 10": llm["added_pct"] <= 10.0,
            "ResilientEmbeddings.embed_query added_us <= 5 (this machine)": query["added_us"]
            <= 5.0,
            "ResilientEmbeddings.embed_query added_us <= 5 (scaled to the issue's machine)": (
                scaled_query_us <= 5.0
            ),
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
