"""A server-side tokens-per-minute limit for the chaos server (minimal; embeddings and chat).

`TokenRateLimit` is a token bucket refilled at `tokens_per_minute / 60` per second up to
`burst` tokens. A request is charged the tokens the chaos server itself reports as its
usage (`responses.estimate_tokens` per input text, one per token id; chat: the messages'
text plus `max_tokens`); when the bucket holds fewer, it gets the real API's 429 (type
"tokens") with an exact `retry-after-ms`, and the `x-ratelimit-*-tokens` headers describe
this bucket. Attach one with ``ChaosServer(...).token_limit = TokenRateLimit(...)``.

A request larger than `burst` can never pass: it gets a 429 whose wait is what it would
take to refill the whole bucket, as the real API refuses a request above the limit.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from .faults import ErrorKind, format_reset
from .responses import _inputs, _text_of, estimate_tokens

__all__ = ["TOKENS_KIND", "TokenRateLimit", "request_tokens"]

TOKENS_KIND = ErrorKind(
    "rate_limit_tokens",
    429,
    "tokens",
    "rate_limit_exceeded",
    "Rate limit reached for {model} in organization org-chaos on tokens per min (TPM): "
    "Limit {limit}, Used {limit}, Requested 1. Please try again in {wait}. "
    "Visit https://platform.openai.com/account/rate-limits to learn more.",
    retry_after=True,
)


def request_tokens(endpoint: str, body: bytes) -> int:
    """Tokens a request is charged (0 for an unparsable body: the server answers 400)."""
    try:
        payload = json.loads(body or b"{}")
        if endpoint == "embeddings":
            return sum(
                estimate_tokens(x) if isinstance(x, str) else max(1, len(x))
                for x in _inputs(payload.get("input"))
            )
        if endpoint == "chat":
            text = " ".join(_text_of(m.get("content")) for m in payload.get("messages") or [])
            return estimate_tokens(text) + int(payload.get("max_tokens") or 0)
    except (ValueError, TypeError, AttributeError):
        return 0
    return 0


class TokenRateLimit:
    """Tokens-per-minute bucket (thread-safe); `clock` drives refill (default: real time)."""

    def __init__(
        self,
        tokens_per_minute: float,
        *,
        burst: int | None = None,
        clock: Clock | None = None,
        endpoints: tuple[str, ...] = ("embeddings", "chat"),
    ) -> None:
        if not (math.isfinite(tokens_per_minute) and tokens_per_minute > 0):
            raise ValueError(f"tokens_per_minute must be > 0, got {tokens_per_minute!r}")
        cap = burst if burst is not None else math.ceil(tokens_per_minute)
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"burst must be None or an int >= 1, got {burst!r}")
        self.tokens_per_minute = float(tokens_per_minute)
        self.rate = self.tokens_per_minute / 60.0
        self.burst = cap
        self.endpoints = endpoints
        self._clock = clock if clock is not None else SYSTEM_CLOCK
        self._lock = threading.Lock()
        self._tokens = float(cap)
        self._t = self._clock.monotonic()
        self.admitted_tokens = 0
        self.rejected = 0

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._t) * self.rate)
        self._t = now

    def charge(self, endpoint: str, body: bytes) -> float:
        """Take the request's tokens and return 0.0, or return the seconds until it fits."""
        if endpoint not in self.endpoints:
            return 0.0
        cost = request_tokens(endpoint, body)
        with self._lock:
            self._refill()
            if cost <= self._tokens:
                self._tokens -= cost
                self.admitted_tokens += cost
                return 0.0
            self.rejected += 1
            if cost > self.burst:
                return self.burst / self.rate
            return (cost - self._tokens) / self.rate

    def headers(self) -> list[tuple[str, str]]:
        """The three `x-ratelimit-*-tokens` headers, as of now."""
        with self._lock:
            self._refill()
            remaining = max(0, math.floor(self._tokens))
            reset = max(0.0, (self.burst - self._tokens) / self.rate)
        return [
            ("x-ratelimit-limit-tokens", str(math.floor(self.tokens_per_minute))),
            ("x-ratelimit-remaining-tokens", str(remaining)),
            ("x-ratelimit-reset-tokens", format_reset(reset)),
        ]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"admitted_tokens": self.admitted_tokens, "rejected": self.rejected}
