"""Rate-limit header parsing: OpenAI/Azure durations, Anthropic RFC 3339 resets,
retry-after(-ms); hostile values are ignored, never a crash."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_resilience.ratelimit_headers import (
    BucketInfo,
    parse_duration,
    parse_rate_limit_headers,
    parse_rfc3339,
)

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1s", 1.0),
        ("8.64s", 8.64),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("500us", 0.0005),
        ("1m30.5s", 90.5),
        ("0.25", 0.25),
        (" 2s ", 2.0),
    ],
)
def test_durations_like_openai_sends_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "NaN", "nan", "inf", "-1s", "-5", "1e400", "9" * 400, "1x", "s", "ms", "1s2", "1.s",
     "1h" * 40, "abc", "1 s", "+3s", "1s-2s", "٣s"],
)  # fmt: skip
def test_bad_durations_are_ignored(text: str) -> None:
    assert parse_duration(text) is None


def test_rfc3339_resets() -> None:
    later = datetime.fromtimestamp(NOW + 2.5, tz=timezone.utc)
    assert parse_rfc3339(later.isoformat().replace("+00:00", "Z"), NOW) == pytest.approx(2.5)
    assert parse_rfc3339("2023-11-14T22:13:20.500+00:00", NOW) == pytest.approx(0.5)
    assert parse_rfc3339("2000-01-01T00:00:00Z", NOW) == 0.0  # passed: no wait
    for bad in ("2023-11-14T22:13:20", "yesterday", "9" * 400, "NaN", "2023-13-45T99:00:00Z"):
        assert parse_rfc3339(bad, NOW) is None


def test_openai_headers_with_httpx_case_insensitive_headers() -> None:
    headers = httpx.Headers(
        {
            "X-RateLimit-Limit-Requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "200000",
            "x-ratelimit-remaining-tokens": "199000",
            "x-ratelimit-reset-tokens": "6m0s",
            "retry-after-ms": "250",
            "retry-after": "1",
        }
    )
    info = parse_rate_limit_headers(headers, now=NOW)
    assert info.format == "openai"
    assert info.requests == BucketInfo(500, 499, 0.12)
    assert info.tokens == BucketInfo(200000, 199000, 360.0)
    assert info.retry_after == 0.25  # retry-after-ms wins


def test_anthropic_headers() -> None:
    reset = datetime.fromtimestamp(NOW, tz=timezone.utc) + timedelta(seconds=3)
    stamp = reset.isoformat().replace("+00:00", "Z")
    info = parse_rate_limit_headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": stamp,
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "39000",
            "anthropic-ratelimit-input-tokens-reset": stamp,
            "retry-after": "Tue, 14 Nov 2023 22:13:25 GMT",
        },
        now=NOW,
    )
    assert info.format == "anthropic"
    # whole seconds; the reset as the server stated it kept too (its clock may not be ours)
    assert info.requests == BucketInfo(50, 49, pytest.approx(3.0), 1.0, NOW + 3.0)
    assert info.tokens == BucketInfo(40000, 39000, pytest.approx(3.0), 1.0, NOW + 3.0)
    precise = parse_rate_limit_headers(
        {"anthropic-ratelimit-requests-reset": "2023-11-14T22:13:20.250Z"}, now=NOW
    )
    assert precise.requests == BucketInfo(None, None, pytest.approx(0.25), 0.001, NOW + 0.25)
    assert info.retry_after == pytest.approx(5.0)  # an HTTP date, 5 s after NOW


def test_remaining_above_limit_is_clamped_and_nothing_is_empty() -> None:
    info = parse_rate_limit_headers(
        {"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "9"}, now=NOW
    )
    assert info.requests == BucketInfo(5, 5, None)
    assert parse_rate_limit_headers({}, now=NOW).empty
    assert parse_rate_limit_headers(None).empty


HOSTILE = st.one_of(
    st.sampled_from(["NaN", "inf", "-inf", "-1", "1e999", "9" * 400, "", " ", "0x10", "1_000"]),
    st.text(max_size=80),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers().map(str),
    st.binary(max_size=40),
)
NAMES = [
    f"x-ratelimit-{a}-{b}"
    for a in ("limit", "remaining", "reset")
    for b in ("requests", "tokens")
] + [
    f"anthropic-ratelimit-{b}-{a}"
    for a in ("limit", "remaining", "reset")
    for b in ("requests", "tokens", "input-tokens")
] + ["retry-after", "retry-after-ms"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), HOSTILE, max_size=len(NAMES)))
def test_hostile_headers_never_crash_and_give_only_sane_numbers(headers: dict[str, object]) -> None:
    info = parse_rate_limit_headers(headers, now=NOW)  # type: ignore[arg-type]
    for bucket in (info.requests, info.tokens):
        if bucket is None:
            continue
        for value in (bucket.limit, bucket.remaining, bucket.reset):
            assert value is None or (math.isfinite(value) and 0 <= value <= 1e12)
    if info.retry_after is not None:
        assert math.isfinite(info.retry_after) and 0 <= info.retry_after <= 1e12


@settings(deadline=None)
@given(st.integers(0, 99), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
def test_go_durations_round_trip(h: int, m: int, s: int, ms: int) -> None:
    text = f"{h}h{m}m{s}.{ms:03d}s"
    assert parse_duration(text) == pytest.approx(h * 3600 + m * 60 + s + ms / 1000)
    assert parse_duration(f"{ms}ms") == pytest.approx(ms / 1000)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_duration_text_is_none_or_sane(text: str) -> None:
    value = parse_duration(text)
    assert value is None or (math.isfinite(value) and 0 <= value <= 1e12)
