"""Read what a provider says about its rate limits, from any response (success or error).

Formats:

* OpenAI / Azure OpenAI: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, resets as
  Go-style durations ("6m0s", "12ms", "1s", "8.64s", "1h2m3.5s");
* Anthropic: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,
  remaining,reset}``, resets as RFC 3339 timestamps;
* ``retry-after-ms`` (preferred) and ``retry-after`` (seconds or an HTTP date).

Headers come from the network: every value is checked. Anything malformed, non-finite,
negative or absurdly long is ignored (that field reads as absent); parsing never raises.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from .classify import parse_retry_after

__all__ = [
    "BucketInfo",
    "RateLimitInfo",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_rfc3339",
]

#: Longest header value we look at; longer ones are "too long" and ignored.
MAX_VALUE_CHARS = 64
#: Largest count or duration we accept (a limit of 10^12 tokens or a reset of 31 years
#: is not something a server means).
MAX_NUMBER = 1e12

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(h|ms|m|s|us|µs|ns)", re.ASCII)
_NUMBER_RE = re.compile(r"\d{1,15}(?:\.\d{1,9})?", re.ASCII)


@dataclass(frozen=True, slots=True)
class BucketInfo:
    """One limit as the server reported it: capacity, what is left, seconds until full."""

    limit: float | None = None
    remaining: float | None = None
    reset: float | None = None
    #: the largest error in `reset` (seconds): durations are rounded to the millisecond
    #: (half of one), RFC 3339 times truncated to their last digit (one unit of it)
    resolution: float = 0.0005
    #: an absolute (RFC 3339) reset as the server stated it: a POSIX time on the server's
    #: clock, which may be ahead of ours or behind it (`reset` is read on ours). Only
    #: differences of these are exact.
    reset_at: float | None = None
    #: how long before it was read an absolute (RFC 3339) reset may have been stamped: the
    #: bucket's real time-to-full, counted from the stamp, is longer by up to this, never
    #: shorter (so it loosens the lower bound on the rate only)
    age: float = 0.0

    @property
    def empty(self) -> bool:
        return self.limit is None and self.remaining is None and self.reset is None


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """What one response said; None where it said nothing (or nothing usable)."""

    requests: BucketInfo | None = None
    tokens: BucketInfo | None = None
    retry_after: float | None = None
    format: str | None = None  # "openai" | "anthropic" | None (retry-after only, or nothing)

    @property
    def empty(self) -> bool:
        return self.requests is None and self.tokens is None and self.retry_after is None


_EMPTY = RateLimitInfo()


def _clean(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = str(value).strip()
    if not text or len(text) > MAX_VALUE_CHARS:
        return None
    return text


def _number(value: object) -> float | None:
    """A non-negative finite count ("10000", "9999.5"), else None."""
    text = _clean(value)
    if text is None or not _NUMBER_RE.fullmatch(text):
        return None
    number = float(text)
    return number if number <= MAX_NUMBER else None


def parse_duration(value: object) -> float | None:
    """Seconds in a Go-style duration ("6m0s", "12ms", "8.64s", "1h2m3.5s") or a plain
    number of seconds ("0.5"); None when malformed, negative, non-finite or too long."""
    text = _clean(value)
    if text is None:
        return None
    if _NUMBER_RE.fullmatch(text):
        seconds = float(text)
        return seconds if seconds <= MAX_NUMBER else None
    pos = 0
    total = 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        return None
    return total if math.isfinite(total) and total <= MAX_NUMBER else None


def rfc3339_resolution(value: object) -> float:
    """The precision of an RFC 3339 time: 10^-digits of its fraction, else 1 second."""
    text = _clean(value) or ""
    match = re.search(r"\.(\d+)", text)
    return 10.0 ** -min(len(match.group(1)), 9) if match else 1.0


def parse_rfc3339(value: object, now: float) -> float | None:
    """Seconds from `now` (wall clock) until an RFC 3339 time ("2024-05-01T12:00:05Z");
    0 if it has passed; None when malformed or without a time zone."""
    when = _rfc3339_time(value)
    if when is None or not math.isfinite(when - now) or when - now > MAX_NUMBER:
        return None
    return max(0.0, when - now)


def _rfc3339_time(value: object) -> float | None:
    """The POSIX time of an RFC 3339 time with a time zone, else None."""
    text = _clean(value)
    if text is None:
        return None
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            return None
        return when.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _get(headers: Mapping[str, str], name: str) -> object:
    try:
        return headers.get(name)
    except Exception:
        return None


def _bucket(
    limit: float | None,
    remaining: float | None,
    reset: float | None,
    resolution: float = 0.0005,
    reset_at: float | None = None,
) -> BucketInfo | None:
    if limit is None and remaining is None and reset is None:
        return None
    if limit is not None and remaining is not None and remaining > limit:
        remaining = limit  # a confused server: never believe more is left than exists
    return BucketInfo(limit, remaining, reset, resolution, reset_at)


def _openai(headers: Mapping[str, str], kind: str) -> BucketInfo | None:
    return _bucket(
        _number(_get(headers, f"x-ratelimit-limit-{kind}")),
        _number(_get(headers, f"x-ratelimit-remaining-{kind}")),
        parse_duration(_get(headers, f"x-ratelimit-reset-{kind}")),
    )


def _anthropic(headers: Mapping[str, str], kind: str, now: float) -> BucketInfo | None:
    prefix = f"anthropic-ratelimit-{kind}"
    reset = _get(headers, f"{prefix}-reset")
    seconds = parse_rfc3339(reset, now)
    return _bucket(
        _number(_get(headers, f"{prefix}-limit")),
        _number(_get(headers, f"{prefix}-remaining")),
        seconds,
        rfc3339_resolution(reset),
        None if seconds is None else _rfc3339_time(reset),
    )


def parse_rate_limit_headers(
    headers: Mapping[str, str] | None, *, now: float | None = None
) -> RateLimitInfo:
    """Everything usable in `headers` (any case-insensitive mapping: httpx, requests, a
    dict with lowercase names). `now` is the wall clock for RFC 3339 and HTTP-date values
    (default ``time.time()``). Never raises."""
    if headers is None:
        return _EMPTY
    try:
        wall = time.time() if now is None else now
        retry_after = parse_retry_after(headers, now=wall)
        if retry_after is not None and retry_after > MAX_NUMBER:
            retry_after = None
        requests = _openai(headers, "requests")
        tokens = _openai(headers, "tokens")
        fmt: str | None = "openai" if requests is not None or tokens is not None else None
        if fmt is None:
            requests = _anthropic(headers, "requests", wall)
            # Anthropic reports a combined tokens limit, or input and output separately
            # (input tokens are the ones a request spends before it is answered).
            tokens = _anthropic(headers, "tokens", wall) or _anthropic(
                headers, "input-tokens", wall
            )
            if requests is not None or tokens is not None:
                fmt = "anthropic"
    except Exception:  # a headers object that misbehaves: say nothing rather than crash
        return _EMPTY
    if fmt is None and retry_after is None:
        return _EMPTY
    return RateLimitInfo(requests, tokens, retry_after, fmt)
