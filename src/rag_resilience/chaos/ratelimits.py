"""The chaos server's rate limits: a request bucket and a token bucket per API key, and
the headers that report them, in OpenAI's or Anthropic's format, on every response.

Semantics (what our pacer, and any client, can learn from the headers):

* requests: capacity `rate_limit_burst`, refilled at `rate_limit_rps` per second;
* tokens: capacity `rate_limit_token_burst` (default: one second's worth), refilled at
  `rate_limit_tpm / 60` per second. A request is charged the tokens its `usage` will
  report (prompt + completion), on admission, as OpenAI charges ``max_tokens`` up front.
  A request larger than the whole capacity is admitted when the bucket is full, leaving
  it in debt (it could never be admitted otherwise);
* a request short of either bucket gets 429 (type "requests" or "tokens") with the exact
  wait in ``retry-after-ms`` (and whole seconds in ``retry-after``), and is not charged;
* headers: ``limit`` = capacity, ``remaining`` = what is left, rounded down, ``reset`` =
  time until the bucket is full again (OpenAI: a duration like "8.64s"; Anthropic: an
  RFC 3339 time); Azure OpenAI sends ``remaining`` only. Without a configured limit the
  bucket reads as full and unlimited.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from typing import Any

from . import responses
from .faults import Faults, format_reset

__all__ = ["RateLimits", "request_cost"]

_UNLIMITED_REQUESTS = 10_000
_UNLIMITED_TOKENS = 2_000_000


def request_cost(endpoint: str, body: bytes) -> int:
    """Tokens a request will be charged: what its response's `usage` will say."""
    try:
        payload: Any = __import__("json").loads(body or b"{}")
        if not isinstance(payload, dict):
            return 1
        if endpoint == "embeddings":
            data = payload.get("input")
            items = data if isinstance(data, list) else [data]
            if items and all(isinstance(x, int) for x in items):
                return max(1, len(items))  # one pre-tokenized input
            return max(
                1,
                sum(
                    responses.estimate_tokens(x) if isinstance(x, str) else max(1, len(x))
                    for x in items
                    if isinstance(x, (str, list))
                ),
            )
        if endpoint == "chat":
            reply = responses._Reply(payload)
            n = payload.get("n") or 1
            completion = reply.completion_tokens * (n if isinstance(n, int) else 1)
            return max(1, reply.prompt_tokens + completion)
    except Exception:
        return 1
    return 1


class _Bucket:
    __slots__ = ("level", "t")

    def __init__(self, level: float, t: float) -> None:
        self.level = level
        self.t = t

    def refill(self, now: float, rate: float, cap: float) -> None:
        self.level = min(cap, self.level + max(0.0, now - self.t) * rate)
        self.t = now


class RateLimits:
    """Per-API-key buckets. Not thread-safe: the server calls it under its lock."""

    def __init__(self) -> None:
        self._config: tuple[Any, ...] | None = None
        self._keys: dict[str, tuple[_Bucket, _Bucket]] = {}
        #: tokens charged to admitted requests, and 429s by bucket (all keys; read them
        #: through `ChaosServer.stats()["rate_limits"]`)
        self.admitted_tokens = 0
        self.rejected: dict[str, int] = {"requests": 0, "tokens": 0}

    def stats(self) -> dict[str, Any]:
        return {"admitted_tokens": self.admitted_tokens, "rejected": dict(self.rejected)}

    @staticmethod
    def key_of(authorization: str | None) -> str:
        token = (authorization or "").strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        return hashlib.blake2b(token.encode(), digest_size=8).hexdigest()

    def _buckets(self, faults: Faults, key: str, now: float) -> tuple[_Bucket, _Bucket]:
        config = (faults.rate_limit_rps, faults.burst, faults.rate_limit_tpm, faults.token_burst)
        if config != self._config:  # new limits: every key starts full
            self._config = config
            self._keys.clear()
        found = self._keys.get(key)
        if found is None:
            found = (_Bucket(float(faults.burst), now), _Bucket(float(faults.token_burst), now))
            self._keys[key] = found
        requests, tokens = found
        if faults.rate_limit_rps is not None:
            requests.refill(now, faults.rate_limit_rps, faults.burst)
        if faults.rate_limit_tpm is not None:
            tokens.refill(now, faults.rate_limit_tpm / 60.0, faults.token_burst)
        return found

    @staticmethod
    def enabled(faults: Faults) -> bool:
        return faults.rate_limit_rps is not None or faults.rate_limit_tpm is not None

    def take(self, faults: Faults, key: str, cost: int, now: float) -> tuple[float, str]:
        """Admit a request (0.0, "") or say how long it must wait and for which bucket."""
        requests, tokens = self._buckets(faults, key, now)
        wait, which = 0.0, ""
        if faults.rate_limit_rps is not None and requests.level < 1.0:
            wait, which = (1.0 - requests.level) / faults.rate_limit_rps, "requests"
        if faults.rate_limit_tpm is not None:
            need = min(float(cost), float(faults.token_burst))
            if tokens.level < need:
                token_wait = (need - tokens.level) / (faults.rate_limit_tpm / 60.0)
                if token_wait > wait:
                    wait, which = token_wait, "tokens"
        if wait > 0.0:
            self.rejected[which] += 1
            return wait, which
        if faults.rate_limit_rps is not None:
            requests.level -= 1.0
        if faults.rate_limit_tpm is not None:
            tokens.level -= float(cost)
            self.admitted_tokens += cost
        return 0.0, ""

    def headers(self, faults: Faults, key: str, now: float, wall: float) -> list[tuple[str, str]]:
        """The rate-limit headers for a response to `key`, in `faults.rate_limit_headers`."""
        fmt = faults.rate_limit_headers
        if fmt == "none":
            return []
        rows: list[tuple[str, float, float, float]] = []  # kind, limit, remaining, reset
        if self.enabled(faults):
            requests, tokens = self._buckets(faults, key, now)
        for kind, rate, cap, bucket_attr, unlimited in (
            ("requests", faults.rate_limit_rps, faults.burst, 0, _UNLIMITED_REQUESTS),
            ("tokens", faults.rate_limit_tpm, faults.token_burst, 1, _UNLIMITED_TOKENS),
        ):
            if rate is None:
                rows.append((kind, unlimited, unlimited, 0.0))
                continue
            per_s = rate if kind == "requests" else rate / 60.0
            bucket = (requests, tokens)[bucket_attr]
            level = bucket.level
            rows.append((kind, cap, max(0.0, math.floor(level)), max(0.0, (cap - level) / per_s)))
        out: list[tuple[str, str]] = []
        for kind, limit, remaining, reset in rows:
            if fmt == "anthropic":
                when = datetime.fromtimestamp(wall + reset, tz=timezone.utc)
                stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                prefix = f"anthropic-ratelimit-{kind}"
                out += [
                    (f"{prefix}-limit", f"{limit:.0f}"),
                    (f"{prefix}-remaining", f"{remaining:.0f}"),
                    (f"{prefix}-reset", stamp),
                ]
            elif fmt == "azure":  # Azure OpenAI: what is left, nothing else
                out.append((f"x-ratelimit-remaining-{kind}", f"{remaining:.0f}"))
            else:
                out += [
                    (f"x-ratelimit-limit-{kind}", f"{limit:.0f}"),
                    (f"x-ratelimit-remaining-{kind}", f"{remaining:.0f}"),
                    (f"x-ratelimit-reset-{kind}", format_reset(reset)),
                ]
        return out
