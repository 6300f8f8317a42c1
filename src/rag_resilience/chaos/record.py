"""`rag-resilience record` / `scripts/record_cassettes.py`: rewrite every HTTP cassette.

Each cassette is one scenario played by one client library against the chaos server, with
the calls a resilient caller would make (e.g. "500 then success": a call that gets 500, then
a call that gets 200). Clients are built with ``max_retries=0`` so every HTTP exchange is
one recorded interaction. `SCENARIOS` and `CLIENTS` are reused by the replay tests, which
assert the same outcome sequence with sockets disabled.

``--real`` (with OPENAI_API_KEY) records the success scenarios against api.openai.com.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cassettes import CASSETTE_DIR, cassette_path, make_vcr
from .server import ChaosServer

__all__ = ["CLIENTS", "SCENARIOS", "Client", "Scenario", "cases", "main", "outcome", "run_case"]

QUESTION = "What does a circuit breaker do in a RAG pipeline?"
TEXTS = ["Circuit breakers stop calls to a failing service.", "Retries use exponential backoff."]
REAL_BASE_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class Scenario:
    """Faults to set, and the outcome of each call ("ok" or the HTTP status)."""

    name: str
    expected: tuple[str, ...]
    faults: dict[str, Any] = field(default_factory=dict)
    stream: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("success", ("ok",)),
        Scenario("stream_success", ("ok",), stream=True),
        Scenario("500_then_success", ("500", "ok"), {"fail_next": 1, "fail_next_status": 500}),
        Scenario(
            "503x3_then_success",
            ("503", "503", "503", "ok"),
            {"fail_next": 3, "fail_next_status": 503},
        ),
        Scenario(
            "429_retry_after_then_success",
            ("429", "ok"),
            {"fail_next": 1, "fail_next_status": "rate_limit", "retry_after": 1.0},
        ),
        Scenario(
            "429_insufficient_quota",
            ("429",),
            {"fail_next": 1, "fail_next_status": "insufficient_quota"},
        ),
        Scenario(
            "400_context_length_exceeded",
            ("400",),
            {"fail_next": 1, "fail_next_status": "context_length_exceeded"},
        ),
        Scenario("outage", ("503", "503", "503", "503"), {"outage": True, "retry_after": 2.0}),
        # the server's request bucket (1 request, refilled every 2 s): the first call
        # empties it, the second gets 429 with retry-after-ms and x-ratelimit-* headers
        Scenario(
            "429_rate_limit_headers",
            ("ok", "429"),
            {"rate_limit_rps": 0.5, "rate_limit_burst": 1},
        ),
    )
}


@dataclass(frozen=True)
class Client:
    """How to build one library's client for a base URL, and make one call with it."""

    name: str
    build: Callable[[str, str], Any]
    call: Callable[[Any, bool], Any]
    streams: bool


def _openai(base_url: str, key: str) -> Any:
    import openai

    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)


def _openai_chat_call(client: Any, stream: bool) -> Any:
    messages = [{"role": "user", "content": QUESTION}]
    if stream:
        chunks = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(model="gpt-4o-mini", messages=messages)


def _openai_embed_call(client: Any, stream: bool) -> Any:
    return client.embeddings.create(model="text-embedding-3-small", input=TEXTS)


def _lc_chat(base_url: str, key: str) -> Any:
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    return ChatOpenAI(
        model="gpt-4o-mini", base_url=base_url, api_key=SecretStr(key), max_retries=0, timeout=30
    )


def _lc_chat_call(llm: Any, stream: bool) -> Any:
    if stream:
        return "".join(str(c.content) for c in llm.stream(QUESTION))
    return llm.invoke(QUESTION)


def _lc_embed(base_url: str, key: str) -> Any:
    from langchain_openai import OpenAIEmbeddings
    from pydantic import SecretStr

    # check_embedding_ctx_length=False: the default tokenises with tiktoken, which downloads
    # its encoding on first use; cassettes must replay offline.
    return OpenAIEmbeddings(
        model="text-embedding-3-small",
        base_url=base_url,
        api_key=SecretStr(key),
        max_retries=0,
        check_embedding_ctx_length=False,
    )


def _lc_embed_call(emb: Any, stream: bool) -> Any:
    return emb.embed_documents(TEXTS)


def _li_chat(base_url: str, key: str) -> Any:
    from llama_index.llms.openai import OpenAI

    return OpenAI(model="gpt-4o-mini", api_base=base_url, api_key=key, max_retries=0, timeout=30)


def _li_chat_call(llm: Any, stream: bool) -> Any:
    if stream:
        return "".join(r.delta or "" for r in llm.stream_complete(QUESTION))
    return llm.complete(QUESTION)


def _li_embed(base_url: str, key: str) -> Any:
    from llama_index.embeddings.openai import OpenAIEmbedding

    return OpenAIEmbedding(
        model="text-embedding-3-small", api_base=base_url, api_key=key, max_retries=0
    )


def _li_embed_call(emb: Any, stream: bool) -> Any:
    return emb.get_text_embedding_batch(TEXTS)


CLIENTS: dict[str, Client] = {
    c.name: c
    for c in (
        Client("openai_chat", _openai, _openai_chat_call, True),
        Client("openai_embeddings", _openai, _openai_embed_call, False),
        Client("langchain_chat", _lc_chat, _lc_chat_call, True),
        Client("langchain_embeddings", _lc_embed, _lc_embed_call, False),
        Client("llamaindex_chat", _li_chat, _li_chat_call, True),
        Client("llamaindex_embeddings", _li_embed, _li_embed_call, False),
    )
}


def cases() -> list[tuple[Client, Scenario]]:
    """Every (client, scenario) pair that has a cassette."""
    return [
        (c, s) for c in CLIENTS.values() for s in SCENARIOS.values() if c.streams or not s.stream
    ]


def _status_of(exc: BaseException) -> int | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for attr in ("status_code", "status", "http_status"):
            value = getattr(current, attr, None)
            if isinstance(value, int):
                return value
        response = getattr(current, "response", None)
        value = getattr(response, "status_code", None)
        if isinstance(value, int):
            return value
        current = current.__cause__ or current.__context__
    return None


def outcome(fn: Callable[[], Any]) -> str:
    """Run one call: "ok", or the HTTP status it failed with (other errors propagate)."""
    try:
        fn()
    except Exception as exc:
        status = _status_of(exc)
        if status is None:
            raise
        return str(status)
    return "ok"


def run_case(
    client: Client, scenario: Scenario, base_url: str, api_key: str = "sk-test"
) -> list[str]:
    """Make the scenario's calls with a fresh client; returns the outcome of each."""
    instance = client.build(base_url, api_key)
    return [outcome(lambda: client.call(instance, scenario.stream)) for _ in scenario.expected]


def record(
    *,
    real: bool = False,
    only: str | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Rewrite cassettes; returns the number written. Raises if an outcome is unexpected."""
    vcr = make_vcr(record_mode="all")
    written = 0
    selected = [
        (c, s)
        for c, s in cases()
        if (only is None or only in f"{c.name}/{s.name}")
        and (not real or s.name in ("success", "stream_success"))
    ]
    key = os.environ.get("OPENAI_API_KEY", "") if real else "sk-test"
    with ChaosServer(seed=0, embedding_dim=16) as server:
        base_url = REAL_BASE_URL if real else server.base_url
        for client, scenario in selected:
            name = f"{client.name}/{scenario.name}"
            path = cassette_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            server.reset()
            if scenario.faults:
                server.set_faults(**scenario.faults)
            with vcr.use_cassette(str(path)):
                got = run_case(client, scenario, base_url, key)
            if tuple(got) != scenario.expected:
                raise RuntimeError(f"{name}: expected {scenario.expected}, got {tuple(got)}")
            written += 1
            out(f"recorded {path.relative_to(CASSETTE_DIR.parent)}  {' '.join(got)}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rag-resilience record", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="record success cassettes against the real API (needs OPENAI_API_KEY)",
    )
    parser.add_argument("--only", default=None, help="substring of CLIENT/SCENARIO to record")
    args = parser.parse_args(argv)
    if args.real and not os.environ.get("OPENAI_API_KEY"):
        print("rag-resilience record: --real needs OPENAI_API_KEY", file=sys.stderr)
        return 2
    count = record(real=args.real, only=args.only)
    print(f"{count} cassettes written to {CASSETTE_DIR}")
    return 0
