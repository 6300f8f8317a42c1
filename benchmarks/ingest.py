"""Bulk ingestion under a tokens-per-minute limit, side by side; then SIGKILL at 90% and resume.

Usage: python benchmarks/ingest.py [--chunks 10000] [--seconds 20] [--quick] [--json PATH]
                                   [--plot PATH] [--only NAME ...]

The chaos server (in this process) limits /v1/embeddings to a token bucket per API key
(`Faults.rate_limit_tpm` / `rate_limit_token_burst`, with OpenAI's `x-ratelimit-*-tokens`
headers and `retry-after-ms` on every answer), time scaled: the limit is set so that the corpus
takes `--seconds` at exactly the limit (the theoretical minimum, total tokens / limit).
The bucket holds `burst` tokens (one request of the largest default batch, LangChain's
1000 texts, plus 5%) and starts full, as the real API's does. Each contender embeds the
same corpus in one call, the way a vector store's `add_documents` does, with a fresh
bucket and fresh counters:

* LangChain `OpenAIEmbeddings` defaults (max_retries=2, chunk_size=1000; the only
  non-default is check_embedding_ctx_length=False: tiktoken's files are not offline here);
* LlamaIndex `OpenAIEmbedding` defaults (max_retries=10, embed_batch_size=100);
* ours: `ResilientEmbeddings(OpenAIEmbeddings(max_retries=0, ...))` and
  `ResilientEmbedding(OpenAIEmbedding(max_retries=0))`, "balanced", ingestion defaults
  (batches of 64 / LlamaIndex's 100 texts, 4 concurrent), not told the limit.

A second scenario adds an outage: every embeddings request gets a 503 for `--outage`
seconds (3 by default) once 40% of the corpus's tokens have been admitted.

Figures: wall time and its ratio to the theoretical minimum, chunks lost (an exception
from the one call loses all of them; ours hands back every vector it got), requests and
429s as the server counted them.

Then the resume run: a child process ingests with a SQLite vector cache and
``resume=True``, printing its progress; it is SIGKILLed once it reports 90% done, and
this process re-runs the same ingestion on the same file. Reported: done at the kill,
texts the re-run took from the checkpoint, texts it embedded again, and how many of
those were beyond the ones missing at the kill (the target: at most one batch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, machine_info, markdown_table, write_json

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import ChaosServer
from rag_resilience.chaos.responses import estimate_tokens
from rag_resilience.ingest import PartialEmbeddingError

DIM = 64
WORDS = [
    "retrieval",
    "augmented",
    "generation",
    "circuit",
    "breaker",
    "backoff",
    "jitter",
    "vector",
    "store",
    "chunk",
    "embedding",
    "index",
    "query",
    "answer",
    "context",
    "window",
    "token",
    "budget",
    "outage",
    "replica",
    "cache",
    "latency",
    "throughput",
    "limiter",
    "pacing",
    "bucket",
    "resume",
    "checkpoint",
    "document",
    "ingestion",
]
MODEL = "text-embedding-3-small"


def corpus(n: int) -> list[str]:
    """`n` distinct chunks of 400 characters (100 tokens by the server's estimate)."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(80)]
        text = f"chunk {i:06d} " + " ".join(words)
        out.append(text[:400].ljust(400, "."))
    return out


# -- contenders ---------------------------------------------------------------------------
def lc_openai(url: str, **kw: Any) -> Any:
    from langchain_openai import OpenAIEmbeddings

    return OpenAIEmbeddings(
        model=MODEL, base_url=url, api_key="sk-bench", check_embedding_ctx_length=False, **kw
    )


def li_openai(url: str, **kw: Any) -> Any:
    from llama_index.embeddings.openai import OpenAIEmbedding

    return OpenAIEmbedding(api_base=url, api_key="sk-bench", **kw)


def run_langchain_defaults(url: str, texts: list[str]) -> int:
    try:
        lc_openai(url).embed_documents(texts)
    except Exception:
        return len(texts)
    return 0


def run_llama_defaults(url: str, texts: list[str]) -> int:
    try:
        li_openai(url).get_text_embedding_batch(texts)
    except Exception:
        return len(texts)
    return 0


def ours_policy(name: str, **kw: Any) -> ResiliencePolicy:
    return ResiliencePolicy.preset("balanced", name=name, **kw)


def run_ours_langchain(url: str, texts: list[str]) -> int:
    from rag_resilience.langchain import ResilientEmbeddings

    emb = ResilientEmbeddings(lc_openai(url, max_retries=0), ours_policy("bench-ingest-lc"))
    try:
        emb.embed_documents(texts)
    except PartialEmbeddingError as exc:
        return len(exc.failed_indices)
    except Exception:
        return len(texts)
    return 0


def run_ours_llama(url: str, texts: list[str]) -> int:
    from rag_resilience.llama_index import ResilientEmbedding

    emb = ResilientEmbedding(li_openai(url, max_retries=0), ours_policy("bench-ingest-li"))
    try:
        emb.get_text_embedding_batch(texts)
    except PartialEmbeddingError as exc:
        return len(exc.failed_indices)
    except Exception:
        return len(texts)
    return 0


def run_ours_langchain_async(url: str, texts: list[str]) -> int:
    from rag_resilience.langchain import ResilientEmbeddings

    emb = ResilientEmbeddings(lc_openai(url, max_retries=0), ours_policy("bench-ingest-lca"))

    async def main() -> int:
        try:
            await emb.aembed_documents(texts)
        except PartialEmbeddingError as exc:
            return len(exc.failed_indices)
        except Exception:
            return len(texts)
        return 0

    return asyncio.run(main())


CONTENDERS: dict[str, Callable[[str, list[str]], int]] = {
    "LangChain OpenAIEmbeddings defaults": run_langchain_defaults,
    "LlamaIndex OpenAIEmbedding defaults": run_llama_defaults,
    "ours: ResilientEmbeddings (LangChain), sync": run_ours_langchain,
    "ours: ResilientEmbeddings (LangChain), async": run_ours_langchain_async,
    "ours: ResilientEmbedding (LlamaIndex), sync": run_ours_llama,
}


class Sampler:
    """Tokens admitted by the server over time (for the plot)."""

    def __init__(self, server: ChaosServer, every: float = 0.25) -> None:
        self.server = server
        self.every = every
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.points.append((time.perf_counter() - self._t0, admitted(self.server)))

    def __enter__(self) -> Sampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.points.append((time.perf_counter() - self._t0, admitted(self.server)))


def admitted(server: ChaosServer) -> int:
    """Tokens the server's bucket has admitted since the last reset."""
    tokens: int = server.stats()["rate_limits"]["admitted_tokens"]
    return tokens


def fresh_limit(server: ChaosServer, tpm: float, burst: int) -> None:
    """Fresh counters and a full bucket: the limit on /v1/embeddings only."""
    server.reset()
    assert server.wait_idle(30)
    server.set_faults(rate_limit_tpm=tpm, rate_limit_token_burst=burst, endpoints=("embeddings",))


class Outage:
    """Turns an embeddings outage (503) on once the server has admitted `at` of the
    corpus's tokens, and off `seconds` later."""

    def __init__(self, server: ChaosServer, total: int, at: float, seconds: float) -> None:
        self.server = server
        self.threshold, self.seconds = at * total, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while admitted(self.server) < self.threshold:
            if self._stop.wait(0.01):
                return
        self.server.set_faults(outage=True)  # the limit's faults apply to embeddings only
        self._stop.wait(self.seconds)
        self.server.set_faults(outage=False)

    def __enter__(self) -> Outage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.server.set_faults(outage=False)


def run_contender(
    server: ChaosServer,
    name: str,
    texts: list[str],
    tpm: float,
    burst: int,
    minimum: float,
    strict: float,
    outage: float = 0.0,
) -> dict[str, Any]:
    fresh_limit(server, tpm, burst)
    total = sum(estimate_tokens(t) for t in texts)
    with (
        warnings.catch_warnings(),
        Sampler(server) as sampler,
        Outage(server, total, 0.4, outage) if outage else contextlib.nullcontext(),
    ):
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        lost = CONTENDERS[name](server.base_url, texts)
        wall = time.perf_counter() - started
    server.wait_idle(30)
    stats = server.stats()["endpoints"]["embeddings"]
    return {
        "scenario": f"outage {outage:g} s at 40%" if outage else "token limit",
        "name": name,
        "wall_s": round(wall, 2),
        "ratio_to_minimum": round(wall / minimum, 3),
        "ratio_to_strict_minimum": round(wall / strict, 3),
        "chunks_lost": lost,
        "requests": stats["requests"],
        "status_429": stats["statuses"].get(429, 0),
        "errors_other": sum(n for s, n in stats["statuses"].items() if s not in (200, 429)),
        "tokens_admitted": admitted(server),
        "timeline": sampler.points,
    }


# -- SIGKILL at 90% and resume --------------------------------------------------------------
def child(url: str, db: str, chunks: int) -> None:
    """The process that gets killed: ingest with a SQLite checkpoint, print progress."""
    from rag_resilience.langchain import ResilientEmbeddings
    from rag_resilience.stores.sqlite import SQLiteStore

    texts = corpus(chunks)
    policy = ours_policy("bench-ingest-kill", store=SQLiteStore(db), cache_max_entries=2 * chunks)

    def progress(done: int, total: int) -> None:
        print(f"P {done}", flush=True)

    emb = ResilientEmbeddings(lc_openai(url, max_retries=0), policy, resume=True, progress=progress)
    emb.embed_documents(texts)
    print("DONE", flush=True)


def kill_and_resume(
    server: ChaosServer, chunks: int, tpm: float, burst: int, at: float = 0.9
) -> dict[str, Any]:
    from rag_resilience.langchain import ResilientEmbeddings
    from rag_resilience.stores.sqlite import SQLiteStore

    fresh_limit(server, tpm, burst)
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "vectors.db")
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", server.base_url, db, str(chunks)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        done_at_kill = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("P "):
                done_at_kill = int(line.split()[1])
                if done_at_kill >= at * chunks:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        server.wait_idle(30)
        fresh_limit(server, tpm, burst)
        policy = ours_policy(
            "bench-ingest-kill", store=SQLiteStore(db), cache_max_entries=2 * chunks
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            emb = ResilientEmbeddings(lc_openai(server.base_url, max_retries=0), policy)
        emb.ingestor.resume = True
        started = time.perf_counter()
        lost = 0
        try:
            emb.embed_documents(corpus(chunks))
        except PartialEmbeddingError as exc:
            lost = len(exc.failed_indices)
        wall = time.perf_counter() - started
        ingest = emb.stats()["ingest"]
        policy.fallbacks.store.close() if policy.fallbacks else None
    missing = chunks - done_at_kill
    re_embedded = chunks - ingest["resumed"]
    return {
        "killed": killed,
        "done_at_kill": done_at_kill,
        "resumed": ingest["resumed"],
        "re_embedded": re_embedded,
        "beyond_missing": re_embedded - missing,
        "batch_size": emb.batch_size,
        "rerun_wall_s": round(wall, 2),
        "rerun_chunks_lost": lost,
    }


def plot(rows: list[dict[str, Any]], rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    end = max(r["wall_s"] for r in rows)
    for row in rows:
        xs = [0.0] + [t for t, _ in row["timeline"]]
        ys = [0] + [n for _, n in row["timeline"]]
        ax.plot(xs, ys, label=f"{row['name']} ({row['wall_s']} s)")
    burst = rows[0]["burst"]
    ax.plot([0, end], [burst, burst + rate * end], "k--", label="the limit (burst + rate x t)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens embedded (server-side count)")
    ax.set_title("Bulk ingestion under a tokens-per-minute limit")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    # Every throttled attempt and throttled round is logged by default: thousands of lines.
    logging.getLogger("rag_resilience").setLevel(logging.CRITICAL)
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0, help="theoretical minimum")
    parser.add_argument("--quick", action="store_true", help="3,000 chunks in 6 s")
    parser.add_argument("--only", nargs="*", help="substrings of contender names")
    parser.add_argument("--no-kill", action="store_true")
    parser.add_argument("--no-outage", action="store_true")
    parser.add_argument(
        "--outage", type=float, default=3.0, help="seconds of 503s once 40%% is embedded"
    )
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "ingest.json")
    parser.add_argument("--plot", type=Path, default=RESULTS_DIR / "ingest.png")
    args = parser.parse_args()
    if args.quick:
        args.chunks, args.seconds = 3_000, 6.0
    texts = corpus(args.chunks)
    total = sum(estimate_tokens(t) for t in texts)
    rate = total / args.seconds  # tokens per second: the corpus takes `seconds` at the limit
    tpm = rate * 60
    burst = int(1000 * estimate_tokens(texts[0]) * 1.05)
    # The bucket starts full: `burst` tokens pass at once, so the least anyone can take
    # is (total - burst) / rate; the "theoretical minimum" is total / rate.
    strict = (total - burst) / rate
    names = [n for n in CONTENDERS if not args.only or any(o in n for o in args.only)]
    # Import every framework before any timer starts (the first contender would pay it).
    for module in (
        "langchain_openai",
        "llama_index.embeddings.openai",
        "rag_resilience.langchain",
        "rag_resilience.llama_index",
    ):
        importlib.import_module(module)
    rows = []
    with ChaosServer(seed=0, embedding_dim=DIM) as server:
        for outage in [0.0] if args.no_outage else [0.0, args.outage]:
            for name in names:
                row = run_contender(server, name, texts, tpm, burst, args.seconds, strict, outage)
                row["burst"] = burst
                rows.append(row)
                print(
                    f"{row['scenario']}: {name}: {row['wall_s']} s "
                    f"({row['ratio_to_minimum']}x), lost {row['chunks_lost']}, "
                    f"requests {row['requests']}, 429s {row['status_429']}",
                    flush=True,
                )
        kill = None if args.no_kill else kill_and_resume(server, args.chunks, tpm, burst)
    headers = [
        "scenario",
        "client",
        "wall s",
        "x total/limit",
        "x (total-burst)/limit",
        "chunks lost",
        "requests",
        "429s",
        "other errors",
    ]
    table = markdown_table(
        headers,
        [
            [
                r["scenario"],
                r["name"],
                r["wall_s"],
                r["ratio_to_minimum"],
                r["ratio_to_strict_minimum"],
                r["chunks_lost"],
                r["requests"],
                r["status_429"],
                r["errors_other"],
            ]
            for r in rows
        ],
    )
    print()
    print(
        f"{args.chunks} chunks, {total} tokens; limit {tpm:,.0f} tokens/min "
        f"({rate:,.0f}/s, burst {burst:,}); theoretical minimum {args.seconds} s "
        f"(total/limit), {strict:.2f} s ((total - burst)/limit)"
    )
    print(table)
    if kill is not None:
        print()
        print(
            "SIGKILL at 90% and re-run (SQLite checkpoint): "
            + ", ".join(f"{k} {v}" for k, v in kill.items())
        )
    write_json(
        "ingest",
        {
            "benchmark": "ingest",
            "settings": {
                "chunks": args.chunks,
                "tokens": total,
                "tokens_per_minute": tpm,
                "burst": burst,
                "theoretical_minimum_s": args.seconds,
                "strict_minimum_s": round(strict, 3),
                "embedding_dim": DIM,
                "outage_s": None if args.no_outage else args.outage,
            },
            "machine": machine_info(),
            "rows": [{k: v for k, v in r.items() if k != "timeline"} for r in rows],
            "kill_and_resume": kill,
        },
        args.json,
    )
    if rows and args.plot:
        try:
            plot([r for r in rows if r["scenario"] == "token limit"], rate, args.plot)
        except ImportError:
            print("(matplotlib not installed: no plot)")


if __name__ == "__main__":
    main()
