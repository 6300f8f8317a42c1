"""How many tokens a request will spend, estimated before it is sent.

With `tiktoken` installed *and* its encoding already on disk (tiktoken downloads encodings
on first use; we never let it reach the network), texts are counted with ``o200k_base``.
Otherwise the documented heuristic applies: **one token per 4 characters, rounded up, plus
4 tokens per chat message** (role and separators), the rule of thumb OpenAI gives for
English. Requests are charged their prompt plus ``max_tokens`` / ``max_completion_tokens``
when given (OpenAI counts the maximum against the tokens-per-minute limit on admission).
The pacer corrects its token bucket with the `usage` the response reports, so the
estimate only has to be roughly right.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["count_text_tokens", "estimate_request_tokens", "tokenizer_name"]

_ENCODING = "o200k_base"
_ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
_PER_MESSAGE = 4
_MAX_SCAN = 10_000  # parts of a payload we look at; a bigger one is charged by its size

_lock = threading.Lock()
_encoder: Callable[[str], int] | None = None
_resolved = False
_name = "chars/4"


def _cached_encoding_file() -> bool:
    """True if tiktoken would load the encoding from its cache (no download)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache is None:
        cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache:  # tiktoken treats an empty setting as "no cache": it would download
        return False
    name = hashlib.sha1(_ENCODING_URL.encode()).hexdigest()
    return os.path.isfile(os.path.join(cache, name))


def _resolve() -> Callable[[str], int] | None:
    global _encoder, _resolved, _name
    if _resolved:
        return _encoder
    with _lock:
        if not _resolved:
            try:
                if _cached_encoding_file():
                    import tiktoken

                    enc = tiktoken.get_encoding(_ENCODING)

                    def count(text: str) -> int:
                        return len(enc.encode(text, disallowed_special=()))

                    count("probe")
                    _encoder, _name = count, f"tiktoken:{_ENCODING}"
            except Exception:  # not installed, corrupt cache, anything: use the heuristic
                _encoder = None
            _resolved = True
    return _encoder


def tokenizer_name() -> str:
    """ "tiktoken:o200k_base" or "chars/4" (what `count_text_tokens` uses)."""
    _resolve()
    return _name


def count_text_tokens(text: str) -> int:
    """Tokens in `text`: tiktoken when available offline, else ceil(len / 4)."""
    if not text:
        return 0
    encoder = _resolve()
    if encoder is not None:
        try:
            return encoder(text)
        except Exception:
            pass
    return math.ceil(len(text) / 4)


def _texts(value: Any, out: list[str], budget: list[int]) -> None:
    """Collect the strings of a JSON-like value (message contents, tool schemas...)."""
    budget[0] -= 1
    if budget[0] < 0:
        return
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key in ("role", "type", "image_url") and not isinstance(item, (dict, list)):
                continue
            _texts(item, out, budget)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool):
                out.append("xxxx")  # a pre-tokenized input: one token per id
            else:
                _texts(item, out, budget)
    else:
        content = getattr(value, "content", None)  # LangChain / LlamaIndex messages
        if content is not None:
            _texts(content, out, budget)


def _tokens_of(value: Any) -> int:
    out: list[str] = []
    _texts(value, out, [_MAX_SCAN])
    return sum(count_text_tokens(text) for text in out)


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def estimate_request_tokens(payload: Mapping[str, Any] | None, messages: Any = None) -> int:
    """Tokens an OpenAI-style request will be charged: its `messages` (or `input` for
    embeddings, or `prompt`), `tools`/`functions`, plus `max_tokens` or
    `max_completion_tokens`. `messages` may be given separately (e.g. LangChain messages).
    Never raises; at least 1."""
    try:
        payload = payload or {}
        total = 0
        msgs = messages if messages is not None else payload.get("messages")
        if isinstance(msgs, (list, tuple)):
            total += sum(_tokens_of(m) + _PER_MESSAGE for m in msgs)
        elif msgs is not None:
            total += _tokens_of(msgs)
        for name in ("input", "prompt"):
            if name in payload:
                total += _tokens_of(payload[name])
        for name in ("tools", "functions"):
            tools = payload.get(name)
            if tools:
                try:
                    total += count_text_tokens(json.dumps(tools, default=str))
                except Exception:
                    total += _tokens_of(tools)
        total += _int(payload.get("max_completion_tokens")) or _int(payload.get("max_tokens"))
        return max(1, total)
    except Exception:
        return 1
