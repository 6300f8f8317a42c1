"""Overhead of the LangChain wrappers over in-process fakes (no network).

ResilientLLM.invoke over FakeListChatModel vs the bare invoke, `.with_retry()`, and
tenacity + pybreaker around the bare invoke; ResilientEmbeddings.embed_query over
DeterministicFakeEmbedding vs the bare call. Every variant runs in the same process,
interleaved, and the median of repeated runs is reported.

    .venv/bin/python benchmarks/langchain_overhead.py [--repeat 15] [--number 2000]
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

from rag_resilience.langchain import ResilientEmbeddings, ResilientLLM

RESULTS = Path(__file__).parent / "results" / "langchain_overhead.json"


def _per_call_us(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e6


def measure(variants: dict[str, Callable[[], Any]], repeat: int, number: int) -> dict[str, float]:
    for fn in variants.values():  # warm up
        _per_call_us(fn, max(50, number // 10))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeat):
        for name, fn in variants.items():  # interleaved: drift hits every variant alike
            samples[name].append(_per_call_us(fn, number))
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    logging.getLogger("rag_resilience").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")

    responses = ["The capital of France is Paris."]
    bare = FakeListChatModel(responses=responses)
    resilient = ResilientLLM(FakeListChatModel(responses=responses))
    with_retry = FakeListChatModel(responses=responses).with_retry(stop_after_attempt=4)
    tb_model = FakeListChatModel(responses=responses)
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    tenacity_call = tenacity.retry(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential(multiplier=1),
        reraise=True,
    )(breaker(lambda q: tb_model.invoke(q)))
    q = "What is the capital of France?"
    chat = measure(
        {
            "bare invoke": lambda: bare.invoke(q),
            "ResilientLLM.invoke": lambda: resilient.invoke(q),
            ".with_retry().invoke": lambda: with_retry.invoke(q),
            "tenacity+pybreaker": lambda: tenacity_call(q),
        },
        args.repeat,
        args.number,
    )

    emb = DeterministicFakeEmbedding(size=256)
    remb = ResilientEmbeddings(DeterministicFakeEmbedding(size=256))
    embed = measure(
        {
            "bare embed_query": lambda: emb.embed_query(q),
            "ResilientEmbeddings.embed_query": lambda: remb.embed_query(q),
        },
        args.repeat,
        args.number,
    )

    base = chat["bare invoke"]
    rows = [(k, v, v - base, (v / base - 1) * 100) for k, v in chat.items()]
    ebase = embed["bare embed_query"]
    erows = [(k, v, v - ebase, (v / ebase - 1) * 100) for k, v in embed.items()]
    print(f"{'variant':<34}{'median us/call':>16}{'overhead us':>14}{'overhead %':>12}")
    for name, v, d, pct in [*rows, *erows]:
        print(f"{name:<34}{v:>16.1f}{d:>14.1f}{pct:>11.1f}%")
    result = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "repeat": args.repeat,
        "number": args.number,
        "chat_us": chat,
        "embeddings_us": embed,
        "chat_overhead_pct": {k: (v / base - 1) * 100 for k, v in chat.items()},
        "embed_overhead_us": {k: v - ebase for k, v in embed.items()},
        "targets": {
            "ResilientLLM.invoke overhead_pct <= 10": chat["ResilientLLM.invoke"] / base - 1
            <= 0.10,
            "ResilientEmbeddings.embed_query overhead_us <= 5": embed[
                "ResilientEmbeddings.embed_query"
            ]
            - ebase
            <= 5.0,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
