"""Metrics for a whole chain, and a breaker guard for a model you did not wrap.

`ResilienceCallbackHandler` collects calls, errors, retries, fallbacks by source and
latency from every LLM run it sees (and the "rag_resilience" events of our wrappers).
With a breaker attached it fails fast while the circuit is open: no upstream call.
Runs with no API key (starts the chaos server when OPENAI_BASE_URL is not set).

    python examples/langchain_callback_handler.py
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from rag_resilience.breaker import CircuitBreaker
from rag_resilience.chaos import ChaosServer
from rag_resilience.errors import CircuitOpenError
from rag_resilience.fallback import GracefulFallbacks
from rag_resilience.langchain import ResilienceCallbackHandler, ResilientLLM
from rag_resilience.policy import ResiliencePolicy
from rag_resilience.testing import fake_clock


def main() -> int:
    # The demo prints what happened; silence the library's own warning/error log lines
    # (LangChain logs the guard's CircuitOpenError before raising it, too).
    for name in ("rag_resilience", "langchain_core.callbacks.manager"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    with contextlib.ExitStack() as stack:
        server = None
        base_url = os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            server = stack.enter_context(ChaosServer(seed=11))
            base_url = server.base_url
            stack.enter_context(fake_clock())  # demo: no real backoff waits
        api_key = os.environ.get("OPENAI_API_KEY", "sk-test")
        prompt = ChatPromptTemplate.from_messages([("human", "{question}")])

        # A) Metrics for a chain with a wrapped model.
        handler = ResilienceCallbackHandler()
        llm = ResilientLLM(
            ChatOpenAI(model="gpt-4o-mini", max_retries=0, base_url=base_url, api_key=api_key),
            policy=ResiliencePolicy.preset("balanced", name="handler-demo", failure_threshold=3),
        )
        chain = prompt | llm | StrOutputParser()
        config = {"callbacks": [handler]}
        chain.invoke({"question": "What is RAG?"}, config=config)
        if server is not None:
            server.set_faults(fail_next=1, fail_next_status=503)
        chain.invoke({"question": "What is a vector store?"}, config=config)
        if server is not None:
            server.set_faults(outage=True)
        chain.invoke({"question": "What is RAG?"}, config=config)  # from cache
        chain.invoke({"question": "Brand new question"}, config=config)  # generic
        stats = handler.stats()
        print("A) wrapped model, handler stats:")
        print(
            json.dumps(
                {
                    k: stats[k]
                    for k in (
                        "calls",
                        "retries",
                        "degraded",
                        "fallbacks_by_source",
                        "errors_by_class",
                        "breaker_states",
                        "latency_s",
                    )
                },
                indent=2,
                default=str,
            )
        )

        # B) A breaker guard for an unwrapped model.
        if server is not None:
            guard = ResilienceCallbackHandler(
                breaker=CircuitBreaker(failure_threshold=2, recovery_timeout=30.0, name="guard"),
                fallbacks=GracefulFallbacks(name="guard-answers"),
            )
            plain = ChatOpenAI(
                model="gpt-4o-mini", max_retries=0, base_url=base_url, api_key=api_key
            )
            server.clear_faults()
            plain.invoke("ping", config={"callbacks": [guard]})
            server.set_faults(outage=True)
            outcomes = []
            for _ in range(4):
                before = server.stats()["requests"]
                try:
                    plain.invoke("ping", config={"callbacks": [guard]})
                except CircuitOpenError:
                    outcomes.append(f"fail fast ({server.stats()['requests'] - before} requests)")
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
            print("B) unwrapped model behind the handler's breaker:", outcomes)
            print("   last known good for 'ping':", guard.last_known_good("ping"))
            g = guard.stats()
            print("   rejections:", g["rejections"], "| transitions:", g["breaker_transitions"])
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
