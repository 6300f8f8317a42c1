"""Deterministic OpenAI-shaped payloads: embeddings, chat completions, SSE chunks, models.

Vectors are feature-hashed bags of words, so texts that share words are close in cosine
similarity: a RAG demo's retrieval over the chaos server behaves sensibly. Token-id
inputs (LangChain's default) hash the ids instead of words: same text, same vector, per
input form.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
import struct
import time
from collections.abc import Iterator
from typing import Any

from .model_answers import ToolCall, json_content, tool_call_for

__all__ = [
    "MODELS",
    "chat_answer",
    "chat_completion",
    "chat_stream_events",
    "embed",
    "embeddings_response",
    "estimate_tokens",
    "models_response",
]

MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
)
_CREATED = 1_700_000_000
_WORD = re.compile(r"\w+")


def estimate_tokens(text: str) -> int:
    """Roughly 4 characters per token, like OpenAI's rule of thumb."""
    return max(1, (len(text) + 3) // 4)


def _features(words: list[str]) -> Iterator[tuple[int, float]]:
    for word in words:
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=16).digest()
        h = int.from_bytes(digest, "little")
        for _ in range(4):
            yield h & 0xFFFFFFFF, 1.0 if (h >> 32) & 1 else -1.0
            h >>= 33


@functools.lru_cache(maxsize=8192)
def embed(key: str | tuple[int, ...], dim: int) -> tuple[float, ...]:
    """Unit-length deterministic vector for a text (or a token-id tuple)."""
    if isinstance(key, str):
        words = _WORD.findall(key.lower()) or [key]
        seed_bytes = key.encode("utf-8")
    else:
        words = [f"#{t}" for t in key] or ["#"]
        seed_bytes = ",".join(map(str, key)).encode()
    vec = [0.0] * dim
    for h, sign in _features(words):
        vec[h % dim] += sign
    # a small dense component so no coordinate is exactly zero, as in real embeddings
    noise = hashlib.shake_256(seed_bytes).digest(dim)
    for i, b in enumerate(noise):
        vec[i] += (b - 127.5) / 2550.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return tuple(round(v / norm, 7) for v in vec)


@functools.lru_cache(maxsize=8192)
def _embed_b64(key: str | tuple[int, ...], dim: int) -> str:
    return base64.b64encode(struct.pack(f"<{dim}f", *embed(key, dim))).decode("ascii")


def _inputs(raw: Any) -> list[str | tuple[int, ...]]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            return [tuple(raw)]
        out: list[str | tuple[int, ...]] = []
        for item in raw:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, list) and all(isinstance(x, int) for x in item):
                out.append(tuple(item))
            else:
                raise ValueError("'input' items must be strings or lists of token ids")
        return out
    raise ValueError("'input' must be a string, a list of strings, or token-id lists")


def embeddings_response(payload: dict[str, Any], default_dim: int) -> dict[str, Any]:
    """The /v1/embeddings body; honours `dimensions` and `encoding_format: base64`."""
    if "input" not in payload:
        raise ValueError("you must provide an 'input' parameter")
    inputs = _inputs(payload["input"])
    dim = payload.get("dimensions") or default_dim
    if not isinstance(dim, int) or not 1 <= dim <= 8192:
        raise ValueError("'dimensions' must be an integer between 1 and 8192")
    b64 = payload.get("encoding_format") == "base64"
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _embed_b64(item, dim) if b64 else list(embed(item, dim)),
        }
        for i, item in enumerate(inputs)
    ]
    tokens = sum(estimate_tokens(x) if isinstance(x, str) else max(1, len(x)) for x in inputs)
    return {
        "object": "list",
        "data": data,
        "model": str(payload.get("model") or "text-embedding-3-small"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def chat_answer(messages: Any) -> str:
    """A deterministic reply that echoes the question and the context found in the prompt."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty array")
    texts = [(str(m.get("role", "")), _text_of(m.get("content"))) for m in messages]
    user = [t for r, t in texts if r == "user"]
    question = user[-1] if user else texts[-1][1]
    if texts[-1][0] in ("tool", "function"):  # an agent's tool result: answer from it
        q = _one_line(question, 200) or "(empty question)"
        return f'Answer to "{q}": the tool returned {_one_line(texts[-1][1], 300)}'
    context = " ".join(t for r, t in texts if r in ("system", "developer"))
    match = re.search(
        r"(?is)context\s*(?:information)?[^:\n]*:\s*(.*?)(?:\n\s*(?:question|query)\s*:|$)",
        question,
    )
    if match and match.group(1).strip():
        context = match.group(1)
    q_match = re.search(r"(?is)(?:question|query)\s*:\s*(.+?)\s*(?:answer\s*:\s*)?$", question)
    if q_match:
        question = q_match.group(1)
    q = _one_line(question, 200) or "(empty question)"
    if context.strip():
        return f'Answer to "{q}": according to the context, {_one_line(context, 300)}'
    return f'Answer to "{q}": this is a deterministic reply from the rag-resilience chaos server.'


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _question(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    texts = [
        _text_of(m.get("content"))
        for m in messages
        if isinstance(m, dict) and m.get("role") == "user"
    ]
    return texts[-1] if texts else ""


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


class _Reply:
    """One answer: text (or JSON text) in pieces, or a tool call; its finish reason."""

    __slots__ = ("content", "finish", "pieces", "prompt_tokens", "tool_call")

    def __init__(self, payload: dict[str, Any]) -> None:
        answer = chat_answer(payload.get("messages"))
        question = _question(payload.get("messages"))
        self.tool_call: ToolCall | None = tool_call_for(payload, question)
        structured = json_content(payload, question, answer)
        pieces = _pieces(structured if structured is not None else answer)
        limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
        finish = "tool_calls" if self.tool_call is not None else "stop"
        if self.tool_call is not None:
            pieces = []
        elif isinstance(limit, int) and limit > 0 and len(pieces) > limit:
            pieces, finish = pieces[:limit], "length"
        self.pieces = pieces
        self.content: str | None = "".join(pieces) if self.tool_call is None else None
        self.finish = finish
        self.prompt_tokens = sum(
            estimate_tokens(_text_of(m.get("content"))) + 4
            for m in payload.get("messages", [])
            if isinstance(m, dict)
        )

    @property
    def completion_tokens(self) -> int:
        if self.tool_call is not None:
            return estimate_tokens(self.tool_call.name + self.tool_call.arguments)
        return len(self.pieces)

    def message(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": "assistant",
            "content": self.content,
            "refusal": None,
            "annotations": [],
        }
        if self.tool_call is not None:
            out["tool_calls"] = [self.tool_call.message_entry()]
        return out


def chat_completion(payload: dict[str, Any], completion_id: str) -> dict[str, Any]:
    """The non-streaming /v1/chat/completions body (``n`` choices, identical content)."""
    reply = _Reply(payload)
    n = payload.get("n") or 1
    if not isinstance(n, int) or not 1 <= n <= 128:
        raise ValueError("'n' must be an integer between 1 and 128")
    choices: list[dict[str, Any]] = [
        {
            "index": i,
            "message": reply.message(),
            "logprobs": None,
            "finish_reason": reply.finish,
        }
        for i in range(n)
    ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(payload.get("model") or "gpt-4o-mini"),
        "choices": choices,
        "usage": _usage(reply.prompt_tokens, reply.completion_tokens * n),
        "service_tier": "default",
        "system_fingerprint": "fp_chaos",
    }


def chat_stream_events(payload: dict[str, Any], completion_id: str) -> list[dict[str, Any]]:
    """The `chat.completion.chunk` objects of a streamed answer (without ``[DONE]``)."""
    reply = _Reply(payload)
    options = payload.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": str(payload.get("model") or "gpt-4o-mini"),
        "service_tier": "default",
        "system_fingerprint": "fp_chaos",
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        out = {
            **base,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            out["usage"] = None
        return out

    call = reply.tool_call
    if call is None:
        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        events += [chunk({"content": p}) for p in reply.pieces]
    else:  # the call's name and id first, then its arguments in pieces, as OpenAI streams them
        head = {"index": 0, "id": call.id, "type": "function"}
        head["function"] = {"name": call.name, "arguments": ""}
        events = [chunk({"role": "assistant", "content": None, "tool_calls": [head]})]
        events += [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
            for p in _pieces(call.arguments)
        ]
    events.append(chunk({}, reply.finish))
    if include_usage:
        usage = _usage(reply.prompt_tokens, reply.completion_tokens)
        events.append({**base, "choices": [], "usage": usage})
    return events


def models_response() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": _CREATED, "owned_by": "system"} for m in MODELS
        ],
    }
