"""The OpenAI SDK behind rag-resilience: same calls, same result objects, plus `.resilience`.

Runs with no API key: when OPENAI_BASE_URL is not set it starts the bundled chaos server
(an OpenAI-compatible fake that fails on purpose) and walks through a fault sequence:
healthy, two 500s (retried), a full outage (cached answer with its age, then a generic
answer for a new question, circuit open), and recovery.

    python examples/openai_client.py
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from rag_resilience import ResiliencePolicy, ResilientOpenAIClient
from rag_resilience.chaos import ChaosServer

MODEL = "gpt-4o-mini"


def ask(client: ResilientOpenAIClient, question: str) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}]
    )
    meta = completion.resilience
    age = f", {meta['age_s']:.1f}s old" if meta.get("age_s") is not None else ""
    text = (completion.choices[0].message.content or "")[:60]
    print(f"   {question!r}: source={meta['source']}{age}, attempts={meta['attempts']}")
    print(f"      -> {text}")


def main() -> int:
    logging.getLogger("rag_resilience").setLevel(logging.CRITICAL)  # we print what happens
    with contextlib.ExitStack() as stack:
        server = None
        base_url = os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            server = stack.enter_context(ChaosServer(seed=3))
            base_url = server.base_url
        # Short waits so the example runs in a second; in production use a preset as is,
        # e.g. ResilientOpenAIClient(policy="balanced").
        policy = ResiliencePolicy.preset(
            "balanced",
            name="openai-example",
            initial_delay=0.05,
            max_delay=0.2,
            failure_threshold=2,  # failed calls in a row (of 4 attempts each)
            recovery_timeout=1.0,
            min_recovery_timeout=1.0,
            generic_fallback=True,
        )
        client = ResilientOpenAIClient(
            api_key=os.environ.get("OPENAI_API_KEY", "sk-demo"), base_url=base_url, policy=policy
        )

        print("1. healthy upstream")
        ask(client, "What is a circuit breaker?")
        vectors = client.embeddings.create(model="text-embedding-3-small", input=["hello"])
        print(f"   embeddings: {len(vectors.data[0].embedding)} dims, {vectors.resilience}")
        if server is None:
            print("(OPENAI_BASE_URL is set: the fault steps need the chaos server; skipped)")
            print("done")
            return 0

        print("2. two 500s, then success (retried: 3 upstream requests)")
        before = server.stats()["requests"]
        server.set_faults(fail_next=2, fail_next_status=500)
        ask(client, "What is exponential backoff?")
        print(f"   upstream requests: {server.stats()['requests'] - before}")

        print("3. full outage (every request fails with 503)")
        server.set_faults(outage=True, outage_status=503)
        before = server.stats()["requests"]
        ask(client, "What is a circuit breaker?")  # asked before: last-known-good answer
        ask(client, "A brand new question")  # never asked: generic answer
        print(f"   circuit: {policy.breaker.get_state().value if policy.breaker else '-'}")
        before_open = server.stats()["requests"]
        ask(client, "What is exponential backoff?")
        print(
            f"   upstream requests during the outage: {before_open - before}, "
            f"after the circuit opened: {server.stats()['requests'] - before_open}"
        )

        print("4. recovery: the circuit probes again after its recovery timeout")
        server.set_faults(outage=False)
        time.sleep(1.1)
        ask(client, "What is a circuit breaker?")
        print(f"   circuit: {policy.breaker.get_state().value if policy.breaker else '-'}")
        stats = client.stats()
        print(
            f"stats: calls={stats['calls']} retries={stats['retries']} "
            f"degraded={stats['degraded']} fallbacks={stats['fallbacks_by_source']} "
            f"transitions={stats['breaker_transitions']}"
        )
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
