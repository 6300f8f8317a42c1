"""LlamaIndex with rag-resilience: swap two Settings, wrap the query engine, survive an outage.

Runs with no API key: when OPENAI_BASE_URL is unset it starts the embedded chaos server
(an OpenAI-compatible fake with scripted faults) and points the models at it.

    python examples/llama_index_settings.py
"""

from __future__ import annotations

import contextlib
import logging
import os

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

from rag_resilience import ResiliencePolicy
from rag_resilience.chaos import ChaosServer
from rag_resilience.llama_index import (
    ResilientEmbedding,
    ResilientLLM,
    ResilientQueryEngine,
)

DOCS = [
    "A circuit breaker stops calling a failing service for a while, then probes it.",
    "Exponential backoff with jitter waits longer after each failed attempt.",
    "A last-known-good cache serves the previous answer, with its age, when live calls fail.",
]


def main() -> int:
    logging.basicConfig(level=logging.ERROR)  # our WARNING logs would drown the output
    with contextlib.ExitStack() as stack:
        base_url = os.environ.get("OPENAI_BASE_URL")
        server = None
        if not base_url:
            server = stack.enter_context(ChaosServer(seed=1, embedding_dim=64))
            base_url = server.base_url
        api_key = os.environ.get("OPENAI_API_KEY", "sk-test")
        quick = {"max_retries": 1, "initial_delay": 0.05, "max_delay": 0.2}

        # 1. The two lines that matter: every index, retriever and engine uses them.
        Settings.llm = ResilientLLM(
            OpenAI(model="gpt-4o-mini", api_base=base_url, api_key=api_key, max_retries=0),
            policy=ResiliencePolicy.preset("balanced", name="example-llm", **quick),
        )
        Settings.embed_model = ResilientEmbedding(
            OpenAIEmbedding(api_base=base_url, api_key=api_key, max_retries=0),
            policy=ResiliencePolicy.preset("balanced", name="example-embed", **quick),
        )

        # 2. Build an index and a query engine wrapped with a last-known-good answer cache.
        index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS])
        engine = ResilientQueryEngine(
            index.as_query_engine(similarity_top_k=1),
            policy=ResiliencePolicy.preset("balanced", name="example-rag", **quick),
        )

        def ask(question: str) -> None:
            response = engine.query(question)
            meta = response.metadata["resilience"]
            age = f" age={meta['age_s']:.2f}s" if meta.get("age_s") is not None else ""
            print(f"Q: {question}\n   source={meta['source']}{age}\n   A: {response}")
            for node in response.source_nodes:
                print(f"   from: {node.node.get_content()[:60]}...")

        print("== healthy upstream ==")
        ask("What does a circuit breaker do?")

        if server is not None:
            print("\n== outage: every request now fails with 503 ==")
            server.set_faults(outage=True)
            ask("What does a circuit breaker do?")  # known: last answer, with its age
            ask("What is a bulkhead?")  # new: the generic message, no exception
            server.set_faults(outage=False)
            print(
                f"\nchaos server: {server.stats()['requests']} requests, "
                f"{server.stats()['faults_total']} faults injected"
            )

        print("\n== stats ==")
        for name, stats in (
            ("llm", Settings.llm.stats()),  # type: ignore[attr-defined]
            ("embeddings", Settings.embed_model.stats()),  # type: ignore[attr-defined]
            ("query engine", engine.stats()),
        ):
            print(
                f"{name:>12}: calls={stats['calls']} retries={stats['retries']} "
                f"degraded={stats['degraded']} fallbacks={stats['fallbacks_by_source']} "
                f"breaker={stats.get('breaker_state')}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
