"""DESIGN.md §3 classification table, row by row, on real SDK exception objects."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import email.message
import email.utils
import math
import socket
import urllib.error
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_resilience.classify import (
    RETRY_AFTER_TOO_LONG,
    ErrorVerdict,
    classify_error,
    error_code_of,
    headers_of,
    make_classifier,
    parse_retry_after,
    retry_after_hint,
    status_of,
)
from rag_resilience.errors import (
    CircuitOpenError,
    DeadlineExceededError,
    QueueFullError,
    WaitTimeoutError,
    mark_handled,
)

URL = "https://api.openai.com/v1/chat/completions"
REQUEST = httpx.Request("POST", URL)

# Real OpenAI error bodies (DESIGN.md §3), as the API sends them.
RATE_LIMIT_BODY = {
    "error": {
        "message": "Rate limit reached for gpt-4o-mini in organization org-x on requests per min "
        "(RPM): Limit 3, Used 3, Requested 1. Please try again in 26.604s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
QUOTA_BODY = {
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}
SERVER_ERROR_BODY = {
    "error": {
        "message": "The server had an error processing your request. Sorry about that! You can "
        "retry your request, or contact us through our help center if the error persists.",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}
ENGINE_OVERLOADED_BODY = {
    "error": {
        "message": "The engine is currently overloaded, please try again later",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}
SERVER_OVERLOADED_BODY = {
    "error": {
        "message": "The server is overloaded, please slow down.",
        "type": "service_unavailable_error",
        "param": None,
        "code": "server_is_overloaded",
    }
}
CONTEXT_BODY = {
    "error": {
        "message": "This model's maximum context length is 128000 tokens. However, your messages "
        "resulted in 130512 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
AUTH_BODY = {
    "error": {
        "message": "Incorrect API key provided: sk-xxx.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}
NOT_FOUND_BODY = {
    "error": {
        "message": "The model `gpt-9` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
}
ANTHROPIC_OVERLOADED = {
    "type": "error",
    "error": {"type": "overloaded_error", "message": "Overloaded"},
}
ANTHROPIC_CREDIT = {
    "type": "error",
    "error": {
        "type": "invalid_request_error",
        "message": "Your credit balance is too low to access the Anthropic API. Please go to "
        "Plans & Billing to upgrade or purchase credits.",
    },
}
OPENAI_HEADERS = {
    "x-request-id": "req_123",
    "x-ratelimit-limit-requests": "3",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "20s",
    "x-ratelimit-reset-tokens": "6m0s",
}


def response(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    if body is None:
        return httpx.Response(status, headers=headers, request=REQUEST)
    return httpx.Response(status, json=body, headers=headers, request=REQUEST)


def openai_error(
    cls: type[openai.APIStatusError],
    status: int,
    body: dict[str, Any] | None,
    headers: dict[str, str] | None = None,
) -> openai.APIStatusError:
    """Build the error exactly as openai's client does: `.body` is the inner `error` dict."""
    data = body.get("error", body) if body is not None else None
    return cls(
        f"Error code: {status} - {body}", response=response(status, body, headers), body=data
    )


def sdk_error(
    status: int, body: Any, headers: dict[str, str] | None = None
) -> openai.APIStatusError:
    """Let the openai client itself turn an HTTP response into its exception."""
    client = openai.OpenAI(api_key="sk-test", max_retries=0)
    try:
        return client._make_status_error_from_response(response(status, body, headers))
    finally:
        client.close()


class SeedAPIError(Exception):
    """The seed notebook's error: `APIError(status_code, message)`."""

    def __init__(self, status_code: int, message: str) -> None:
        self.status_code = status_code
        super().__init__(message)


class AnthropicLikeError(Exception):
    """Shaped like anthropic.APIStatusError: `.body` is the FULL JSON, no `.code`/`.type`."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        self.response = response(status, body, headers)
        self.status_code = status
        self.body = body
        self.message = f"Error code: {status} - {body}"
        super().__init__(self.message)


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize(
    ("cls", "status", "body", "reason"),
    [
        (openai.APIStatusError, 408, None, "http_408"),
        (openai.ConflictError, 409, None, "http_409"),
        (openai.RateLimitError, 429, RATE_LIMIT_BODY, "rate_limited"),
        (openai.InternalServerError, 500, SERVER_ERROR_BODY, "http_500"),
        (openai.InternalServerError, 502, None, "http_502"),
        (openai.InternalServerError, 503, ENGINE_OVERLOADED_BODY, "http_503"),
        (openai.InternalServerError, 503, SERVER_OVERLOADED_BODY, "overloaded"),
        (openai.InternalServerError, 504, None, "http_504"),
        (openai.InternalServerError, 529, ANTHROPIC_OVERLOADED, "overloaded"),
        (openai.InternalServerError, 520, None, "http_520"),
        (openai.InternalServerError, 599, None, "http_599"),
    ],
)
def test_retryable_statuses(
    cls: type[openai.APIStatusError], status: int, body: dict[str, Any] | None, reason: str
) -> None:
    exc = openai_error(cls, status, body, OPENAI_HEADERS)
    verdict = classify_error(exc)
    assert verdict.retryable and verdict.fallback_ok
    # Throttling is retried but is no sign of an unhealthy upstream: it never trips a breaker.
    assert verdict.is_failure is (reason != "rate_limited")
    assert verdict.reason == reason
    assert verdict.status == status


@pytest.mark.parametrize(
    ("cls", "status", "body", "reason"),
    [
        (openai.BadRequestError, 400, CONTEXT_BODY, "context_length_exceeded"),
        (
            openai.BadRequestError,
            400,
            {"error": {"message": "bad", "type": "x"}},
            "client_error_400",
        ),
        (openai.AuthenticationError, 401, AUTH_BODY, "client_error_401"),
        (openai.PermissionDeniedError, 403, None, "client_error_403"),
        (openai.NotFoundError, 404, NOT_FOUND_BODY, "client_error_404"),
        (openai.UnprocessableEntityError, 422, None, "client_error_422"),
        (openai.APIStatusError, 402, None, "client_error_402"),
        (openai.APIStatusError, 413, None, "client_error_413"),
        (openai.APIStatusError, 451, None, "client_error_451"),
    ],
)
def test_caller_errors_are_not_retried_nor_breaker_failures(
    cls: type[openai.APIStatusError], status: int, body: dict[str, Any] | None, reason: str
) -> None:
    verdict = classify_error(openai_error(cls, status, body))
    assert verdict == ErrorVerdict(False, False, False, reason, status, None)


@pytest.mark.parametrize(
    "body", [QUOTA_BODY, {"error": {"message": "x", "code": "insufficient_quota"}}]
)
def test_insufficient_quota_429_is_billing_not_retryable(body: dict[str, Any]) -> None:
    exc = openai_error(openai.RateLimitError, 429, body, {"retry-after": "1"})
    verdict = classify_error(exc)
    assert not verdict.retryable
    assert verdict.is_failure and verdict.fallback_ok  # a fallback model may mask a dead quota
    assert verdict.reason == "insufficient_quota"
    assert verdict.status == 429


def test_billing_code_found_in_message_when_body_is_text() -> None:
    # A proxy in between flattened the body into text: the code is still in there.
    exc = openai.RateLimitError(
        "Error code: 429 - quota: insufficient_quota",
        response=httpx.Response(429, text="insufficient_quota", request=REQUEST),
        body="insufficient_quota",
    )
    assert classify_error(exc).reason == "insufficient_quota"
    assert not classify_error(exc).retryable


def test_anthropic_529_overloaded_full_json_body() -> None:
    exc = AnthropicLikeError(529, ANTHROPIC_OVERLOADED, {"retry-after": "3"})
    assert error_code_of(exc) == "overloaded_error"
    verdict = classify_error(exc)
    assert verdict == ErrorVerdict(True, True, True, "overloaded", 529, 3.0)


def test_anthropic_credit_balance_exhausted_code() -> None:
    body = {"type": "error", "error": {"type": "credit_balance_exhausted", "message": "no credit"}}
    verdict = classify_error(AnthropicLikeError(429, body))
    assert verdict == ErrorVerdict(False, True, True, "credit_balance_exhausted", 429, None)


def test_anthropic_low_credit_400_is_billing() -> None:
    verdict = classify_error(AnthropicLikeError(400, ANTHROPIC_CREDIT))
    assert verdict.reason == "credit_balance_exhausted"
    assert not verdict.retryable and verdict.is_failure and verdict.fallback_ok


@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (429, True), (404, False), (401, False)]
)
def test_seed_api_error_with_status_code(status: int, retryable: bool) -> None:
    verdict = classify_error(SeedAPIError(status, "boom"))
    assert verdict.retryable is retryable
    assert verdict.is_failure is (retryable and status != 429)
    assert verdict.status == status


def test_sdk_factory_builds_what_the_tests_build() -> None:
    exc = sdk_error(429, QUOTA_BODY, OPENAI_HEADERS)
    assert type(exc) is openai.RateLimitError
    assert exc.body == QUOTA_BODY["error"]  # openai keeps only the inner error dict
    assert exc.code == "insufficient_quota"
    assert classify_error(exc).reason == "insufficient_quota"
    assert classify_error(sdk_error(503, SERVER_ERROR_BODY)).reason == "http_503"
    assert classify_error(sdk_error(400, CONTEXT_BODY)).reason == "context_length_exceeded"


def test_sdk_error_with_non_json_body() -> None:
    resp = httpx.Response(502, text="<html>Bad gateway</html>", request=REQUEST)
    client = openai.OpenAI(api_key="sk-test", max_retries=0)
    exc = client._make_status_error_from_response(resp)
    client.close()
    assert classify_error(exc) == ErrorVerdict(True, True, True, "http_502", 502, None)
    assert error_code_of(exc) is None


# --------------------------------------------------------------------------- Retry-After


def test_retry_after_ms_wins_over_retry_after() -> None:
    exc = openai_error(
        openai.RateLimitError, 429, RATE_LIMIT_BODY, {"retry-after-ms": "1500", "retry-after": "30"}
    )
    assert classify_error(exc).retry_after == 1.5


def test_retry_after_seconds_float() -> None:
    exc = openai_error(openai.InternalServerError, 503, None, {"Retry-After": "2.5"})
    assert classify_error(exc).retry_after == 2.5


def test_retry_after_http_date_with_injected_now() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 120, usegmt=True)
    exc = openai_error(openai.InternalServerError, 503, None, {"retry-after": date})
    assert classify_error(exc, now=now).retry_after == pytest.approx(120.0)
    # a date in the past means "now", never a negative wait
    assert classify_error(exc, now=now + 500).retry_after == 0.0


def test_rate_limit_hint_from_body_message_when_no_header() -> None:
    exc = openai_error(openai.RateLimitError, 429, RATE_LIMIT_BODY, OPENAI_HEADERS)
    assert classify_error(exc).retry_after == pytest.approx(26.604)
    # the x-ratelimit-reset-* headers are not a Retry-After
    assert parse_retry_after(exc.response.headers) is None


def test_header_beats_body_hint() -> None:
    exc = openai_error(openai.RateLimitError, 429, RATE_LIMIT_BODY, {"retry-after": "4"})
    assert classify_error(exc).retry_after == 4.0


def test_body_hint_only_for_rate_limits() -> None:
    body = {"error": {"message": "Please try again in 20s", "type": "server_error"}}
    assert classify_error(openai_error(openai.InternalServerError, 500, body)).retry_after is None


def test_parse_retry_after_variants() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after({"Retry-After": "7"}) == 7.0  # plain dict, any case
    assert parse_retry_after({"RETRY-AFTER-MS": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "-3"}) == 0.0
    assert parse_retry_after({"retry-after-ms": "-3"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({"retry-after": "inf"}) == RETRY_AFTER_TOO_LONG
    # an unusable retry-after-ms falls back to retry-after
    assert parse_retry_after({"retry-after-ms": "x", "retry-after": "2"}) == 2.0
    assert (
        parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0)
        == 10.0
    )
    assert parse_retry_after(httpx.Headers({"Retry-After": "5"})) == 5.0


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("Please try again in 26.604s. Visit https://platform.openai.com", 26.604),
        ("Please try again in 6m0s.", 360.0),
        ("Please try again in 1h2m3.5s", 3723.5),
        ("Please try again in 20ms.", 0.02),
        ("Please try again in 1.5 seconds.", 1.5),
        ("Try again in 59 seconds.", 59.0),
        ("Rate limit is exceeded. Please retry after 2 seconds.", 2.0),
        ("Please try again in 1 minute", 60.0),
        ("no hint here", None),
        ("Please try again later.", None),
        ("", None),
    ],
)
def test_retry_after_hint(message: str, seconds: float | None) -> None:
    found = retry_after_hint(message)
    if seconds is None:
        assert found is None
    else:
        assert found == pytest.approx(seconds)


header_text = st.text(max_size=40) | st.sampled_from(
    [
        "1",
        "-1",
        "1e400",
        "nan",
        "inf",
        "-inf",
        "1_0",
        " 3 ",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "Mon, 01 Jan 9999 00:00:00 GMT",
        "Thu, 01 Jan 1970 00:00:00 -9999",
        "0x10",
        "١٢",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    ms=st.none() | header_text,
    ra=st.none() | header_text,
    now=st.none()
    | st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
)
def test_parse_retry_after_never_raises_never_negative(
    ms: str | None, ra: str | None, now: float | None
) -> None:
    headers = {}
    if ms is not None:
        headers["retry-after-ms"] = ms
    if ra is not None:
        headers["Retry-After"] = ra
    found = parse_retry_after(headers, now=now)
    assert found is None or (math.isfinite(found) and found >= 0.0)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=80) | st.from_regex(r"try again in [0-9.hms ]{0,12}(seconds)?", fullmatch=True)
)
def test_retry_after_hint_never_raises_never_negative(message: str) -> None:
    found = retry_after_hint(message)
    assert found is None or (math.isfinite(found) and found >= 0.0)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.booleans(), st.text(max_size=5), st.floats()))
def test_status_of_only_accepts_http_ints(value: object) -> None:
    exc = Exception("x")
    exc.status_code = value  # type: ignore[attr-defined]
    exc.status = value  # type: ignore[attr-defined]
    status = status_of(exc)
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        assert status == value
    else:
        assert status is None
    classify_error(exc)  # never raises whatever the attribute holds


# --------------------------------------------------------------------------- x-should-retry


def test_x_should_retry_true_on_400() -> None:
    exc = openai_error(openai.BadRequestError, 400, None, {"x-should-retry": "true"})
    verdict = classify_error(exc)
    assert verdict.retryable
    assert verdict.status == 400 and verdict.reason == "client_error_400"


def test_x_should_retry_false_on_503() -> None:
    exc = openai_error(openai.InternalServerError, 503, None, {"X-Should-Retry": "false"})
    verdict = classify_error(exc)
    assert not verdict.retryable
    assert verdict.reason == "server_said_no_retry"
    assert verdict.is_failure and verdict.fallback_ok and verdict.status == 503


def test_x_should_retry_garbage_ignored() -> None:
    exc = openai_error(openai.InternalServerError, 503, None, {"x-should-retry": "maybe"})
    assert classify_error(exc).retryable


# --------------------------------------------------------------------------- transport errors


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (openai.APIConnectionError(request=REQUEST), "connection"),
        (openai.APITimeoutError(request=REQUEST), "timeout"),
        (httpx.ConnectError("refused", request=REQUEST), "connection"),
        (httpx.ConnectTimeout("slow", request=REQUEST), "timeout"),
        (httpx.ReadTimeout("slow", request=REQUEST), "timeout"),
        (httpx.WriteTimeout("slow", request=REQUEST), "timeout"),
        (httpx.PoolTimeout("slow", request=REQUEST), "timeout"),
        (httpx.ReadError("reset", request=REQUEST), "connection"),
        (httpx.WriteError("pipe", request=REQUEST), "connection"),
        (httpx.RemoteProtocolError("closed mid-body", request=REQUEST), "connection"),
        (httpx.ConnectError("no request attached"), "connection"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection"),
        (ConnectionRefusedError(111, "Connection refused"), "connection"),
        (BrokenPipeError(), "connection"),
        (ConnectionError("API temporarily unavailable"), "connection"),  # the seed's demos
        (socket.gaierror(-2, "Name or service not known"), "connection"),
        (TimeoutError(), "timeout"),
        (asyncio.TimeoutError(), "timeout"),
        (concurrent.futures.TimeoutError(), "timeout"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_transport_errors_retry(exc: BaseException, reason: str) -> None:
    assert classify_error(exc) == ErrorVerdict(True, True, True, reason, None, None)


def test_requests_urllib3_aiohttp_by_class_name() -> None:
    import aiohttp
    import requests
    import urllib3

    assert classify_error(requests.exceptions.ConnectionError("x")).reason == "connection"
    assert classify_error(requests.exceptions.ReadTimeout("x")).reason == "timeout"
    assert classify_error(requests.exceptions.Timeout("x")).reason == "timeout"
    assert classify_error(urllib3.exceptions.ProtocolError("aborted")).reason == "connection"
    assert classify_error(urllib3.exceptions.ReadTimeoutError(None, URL, "x")).reason == "timeout"
    assert classify_error(aiohttp.ServerDisconnectedError()).reason == "connection"
    assert classify_error(aiohttp.ClientConnectionError("x")).reason == "connection"
    assert classify_error(aiohttp.ServerTimeoutError("x")).reason == "timeout"


def test_status_carrying_http_client_errors() -> None:
    import aiohttp
    import requests
    from multidict import CIMultiDict

    resp = requests.Response()
    resp.status_code = 503
    resp.headers["Retry-After"] = "9"
    verdict = classify_error(requests.HTTPError("503", response=resp))
    assert verdict == ErrorVerdict(True, True, True, "http_503", 503, 9.0)

    exc = aiohttp.ClientResponseError(
        None, (), status=429, message="Too Many", headers=CIMultiDict({"Retry-After": "2"})
    )
    assert classify_error(exc) == ErrorVerdict(True, False, True, "rate_limited", 429, 2.0)

    httpx_exc = httpx.HTTPStatusError("404", request=REQUEST, response=response(404))
    assert classify_error(httpx_exc) == ErrorVerdict(False, False, False, "client_error_404", 404)

    headers = email.message.Message()
    headers["Retry-After"] = "11"
    urllib_exc = urllib.error.HTTPError(URL, 503, "busy", headers, None)
    assert classify_error(urllib_exc).retry_after == 11.0
    assert classify_error(urllib_exc).status == 503


def test_httpx_local_errors_are_the_callers_bug() -> None:
    verdict = classify_error(httpx.UnsupportedProtocol("Request URL has an unsupported protocol"))
    assert verdict == ErrorVerdict(False, False, False, "programming_error")
    assert not classify_error(httpx.LocalProtocolError("bad header")).retryable


# --------------------------------------------------------------------------- our own errors


def test_circuit_open_and_queue_full() -> None:
    verdict = classify_error(CircuitOpenError("openai", retry_after=12.0))
    assert verdict == ErrorVerdict(False, False, True, "circuit_open", None, 12.0)
    queue = classify_error(QueueFullError("full", in_flight=4, waiting=8, limit=4))
    assert queue == ErrorVerdict(False, False, True, "queue_full")
    assert classify_error(WaitTimeoutError("waited")).reason == "queue_full"


def test_deadline_scopes() -> None:
    attempt = classify_error(DeadlineExceededError("slow attempt", timeout=5.0, scope="attempt"))
    assert attempt == ErrorVerdict(True, True, True, "timeout")
    total = classify_error(DeadlineExceededError("out of time", timeout=30.0, scope="total"))
    assert total == ErrorVerdict(False, True, True, "deadline")


# --------------------------------------------------------------------------- handled errors


def test_handled_error_is_not_retried_again_but_keeps_its_status() -> None:
    exc = openai_error(openai.InternalServerError, 503, None, {"retry-after": "2"})
    mark_handled(exc)
    verdict = classify_error(exc)
    assert verdict == ErrorVerdict(False, True, True, "handled", 503, 2.0)


def test_handled_caller_error_keeps_its_reason() -> None:
    exc = openai_error(openai.NotFoundError, 404, NOT_FOUND_BODY)
    mark_handled(exc)
    assert classify_error(exc) == ErrorVerdict(False, False, False, "client_error_404", 404)


def test_handled_error_wrapped_by_a_framework() -> None:
    inner = openai_error(openai.InternalServerError, 500, SERVER_ERROR_BODY)
    mark_handled(inner)
    try:
        try:
            raise inner
        except openai.APIError as exc:
            raise RuntimeError("query engine failed") from exc
    except RuntimeError as outer:
        verdict = classify_error(outer)
    assert not verdict.retryable and verdict.reason == "handled" and verdict.status == 500


def test_x_should_retry_true_does_not_resurrect_handled() -> None:
    exc = openai_error(openai.BadRequestError, 400, None, {"x-should-retry": "true"})
    mark_handled(exc)
    assert not classify_error(exc).retryable


# --------------------------------------------------------------------------- programming errors


@pytest.mark.parametrize(
    "exc",
    [
        TypeError("x"),
        ValueError("x"),
        AttributeError("x"),
        KeyError("x"),
        IndexError("x"),
        NameError("x"),
        AssertionError(),
        NotImplementedError(),
        ImportError("x"),
        ModuleNotFoundError("x"),
        ZeroDivisionError(),
        RecursionError(),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_programming_errors(exc: BaseException) -> None:
    assert classify_error(exc) == ErrorVerdict(False, False, False, "programming_error")


def test_status_wins_over_value_error_base() -> None:
    class SDKError(ValueError):
        def __init__(self, status_code: int) -> None:
            self.status_code = status_code
            super().__init__(f"HTTP {status_code}")

    assert classify_error(SDKError(503)).retryable
    assert classify_error(SDKError(503)).reason == "http_503"
    assert classify_error(SDKError(404)).reason == "client_error_404"


@pytest.mark.parametrize(
    "exc", [Exception("x"), RuntimeError("x"), OSError("disk?"), ArithmeticError()]
)
def test_unknown_errors_retry(exc: BaseException) -> None:
    assert classify_error(exc) == ErrorVerdict(True, True, True, "unknown")


def test_base_exceptions_never_retry() -> None:
    assert classify_error(asyncio.CancelledError()).reason == "cancelled"
    assert not classify_error(asyncio.CancelledError()).retryable
    assert classify_error(KeyboardInterrupt()) == ErrorVerdict(False, False, False, "interrupted")


# --------------------------------------------------------------------------- cause chains


def raise_from(
    outer: BaseException, inner: BaseException, *, implicit: bool = False
) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            if implicit:
                raise outer  # noqa: B904 - implicit __context__ on purpose
            raise outer from inner
    except BaseException as caught:
        return caught


def test_wrapper_without_status_takes_the_sdk_verdict() -> None:
    inner = openai_error(openai.NotFoundError, 404, NOT_FOUND_BODY)
    assert (
        classify_error(raise_from(RuntimeError("LLM failed"), inner)).reason == "client_error_404"
    )
    assert not classify_error(raise_from(Exception("x"), inner, implicit=True)).retryable

    quota = openai_error(openai.RateLimitError, 429, QUOTA_BODY)
    assert classify_error(raise_from(RuntimeError("wrapped"), quota)).reason == "insufficient_quota"


def test_value_error_raised_from_sdk_error_takes_its_status() -> None:
    inner = openai_error(openai.InternalServerError, 503, None, {"retry-after": "1"})
    verdict = classify_error(raise_from(ValueError("Failed to call LLM"), inner))
    assert verdict == ErrorVerdict(True, True, True, "http_503", 503, 1.0)


def test_bug_while_handling_an_error_is_still_a_bug() -> None:
    # implicit context: a TypeError raised in an `except` block is not the 503's fault
    outer = raise_from(
        TypeError("bad arg"), openai_error(openai.InternalServerError, 503, None), implicit=True
    )
    assert classify_error(outer).reason == "programming_error"
    # and a wrapper whose implicit context is a KeyError is not a programming error
    outer2 = raise_from(RuntimeError("service down"), KeyError("k"), implicit=True)
    assert classify_error(outer2) == ErrorVerdict(True, True, True, "unknown")


def test_explicit_wrap_of_a_bug_is_a_bug() -> None:
    outer = raise_from(RuntimeError("tool failed"), TypeError("bad"))
    assert classify_error(outer).reason == "programming_error"


def test_suppressed_context_is_ignored() -> None:
    try:
        try:
            raise openai_error(openai.NotFoundError, 404, None)
        except openai.APIError:
            raise RuntimeError("x") from None
    except RuntimeError as exc:
        assert classify_error(exc).reason == "unknown"


def test_cause_chain_cycle_and_depth_are_bounded() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert classify_error(a).reason == "unknown"

    head: BaseException = RuntimeError("0")
    node = head
    for i in range(1, 50):
        nxt = RuntimeError(str(i))
        node.__cause__ = nxt
        node = nxt
    node.__cause__ = openai_error(openai.NotFoundError, 404, None)
    assert classify_error(head).reason == "unknown"  # too deep: not searched


@pytest.mark.skipif(not hasattr(builtins, "ExceptionGroup"), reason="Python 3.11+")
def test_single_exception_group_is_looked_through() -> None:
    group = builtins.ExceptionGroup("task group", [openai_error(openai.NotFoundError, 404, None)])
    assert classify_error(group).reason == "client_error_404"


# --------------------------------------------------------------------------- LangChain


def test_langchain_openai_wrapped_classes() -> None:
    from langchain_openai.chat_models.base import (
        OpenAIAPIContextOverflowError,
        OpenAIAPIError,
        OpenAIConnectionError,
        OpenAIContextOverflowError,
        OpenAIRateLimitError,
        OpenAITimeoutError,
    )

    def lc(cls: Any, status: int, body: dict[str, Any] | None) -> Any:
        src = openai_error(openai.APIStatusError, status, body)
        return cls(message=src.message, response=src.response, body=src.body)

    quota = lc(OpenAIRateLimitError, 429, QUOTA_BODY)
    assert quota.is_retryable is True  # LangChain's flag says retry...
    assert not classify_error(quota).retryable  # ...the body code wins
    assert classify_error(quota).reason == "insufficient_quota"

    limited = lc(OpenAIRateLimitError, 429, RATE_LIMIT_BODY)
    assert classify_error(limited).retryable and classify_error(
        limited
    ).retry_after == pytest.approx(26.604)
    assert classify_error(lc(OpenAIAPIError, 500, SERVER_ERROR_BODY)).reason == "http_500"
    overflow = lc(OpenAIContextOverflowError, 400, CONTEXT_BODY)
    assert classify_error(overflow) == ErrorVerdict(
        False, False, False, "context_length_exceeded", 400
    )
    # no status at all: the body code decides
    no_status = OpenAIAPIContextOverflowError(
        message="input exceeds the context window", request=REQUEST, body=CONTEXT_BODY["error"]
    )
    assert classify_error(no_status) == ErrorVerdict(False, False, False, "context_length_exceeded")
    assert classify_error(OpenAITimeoutError(REQUEST)).reason == "timeout"
    assert (
        classify_error(OpenAIConnectionError(message="x", request=REQUEST)).reason == "connection"
    )


def test_langchain_core_model_errors_flag_as_hint() -> None:
    from langchain_core.exceptions import (
        ContextOverflowError,
        ModelAPIError,
        ModelAuthenticationError,
        ModelConnectionError,
        ModelRateLimitError,
        ModelRefusalError,
    )

    assert classify_error(ModelRateLimitError("x")) == ErrorVerdict(
        True, False, True, "rate_limited", 429
    )
    assert classify_error(ModelAPIError("x")).retryable
    assert classify_error(ModelConnectionError("x")).reason == "connection"
    assert classify_error(ContextOverflowError("x")) == ErrorVerdict(
        False, False, False, "context_length_exceeded", 400
    )
    assert classify_error(ModelAuthenticationError("x")).reason == "client_error_401"
    assert not classify_error(ModelRefusalError()).retryable
    # an explicit status beats the flag
    err = ModelRateLimitError("x")
    err.status_code = 404  # type: ignore[attr-defined]
    assert not classify_error(err).retryable


def test_openai_stream_error_event_without_status() -> None:
    # openai raises APIError(no status) for an error event in the middle of a stream
    exc = openai.APIError("stream error", REQUEST, body={"message": "boom", "type": "server_error"})
    assert classify_error(exc) == ErrorVerdict(True, True, True, "server_error")
    quota = openai.APIError("stream error", REQUEST, body={"code": "insufficient_quota"})
    assert classify_error(quota).reason == "insufficient_quota"


# --------------------------------------------------------------------------- helpers


def test_error_code_of_shapes() -> None:
    assert (
        error_code_of(openai_error(openai.RateLimitError, 429, RATE_LIMIT_BODY))
        == "rate_limit_exceeded"
    )
    assert error_code_of(AnthropicLikeError(529, ANTHROPIC_OVERLOADED)) == "overloaded_error"

    class StrBody(Exception):
        body = '{"error": {"type": "insufficient_quota"}}'

    assert error_code_of(StrBody()) == "insufficient_quota"

    class BytesBody(Exception):
        body = b'{"type":"error","error":{"type":"overloaded_error"}}'

    assert error_code_of(BytesBody()) == "overloaded_error"
    assert error_code_of(ValueError("x")) is None

    class IntCode(Exception):
        code = 503  # urllib's HTTPError.code is the status, not a body code

    assert error_code_of(IntCode()) is None


def test_headers_of_is_case_insensitive() -> None:
    exc = openai_error(openai.InternalServerError, 503, None, {"Retry-After": "3"})
    headers = headers_of(exc)
    assert headers is not None and headers["retry-after"] == "3"

    class DictHeaders(Exception):
        def __init__(self) -> None:
            self.headers = {"X-Should-Retry": "false", "Retry-After": b"4"}
            super().__init__("dict headers")

    found = headers_of(DictHeaders())
    assert found is not None
    assert found["x-should-retry"] == "false" and found.get("RETRY-AFTER") == "4"
    assert "X-SHOULD-RETRY" in found and len(found) == 2
    assert headers_of(ValueError("x")) is None


def test_status_of_reads_every_spelling() -> None:
    class Status(Exception):
        status = 502

    class HttpStatus(Exception):
        http_status = 504

    class Resp(Exception):
        response = response(503)

    class NonInt(Exception):
        status_code = "503"
        status = True

    assert status_of(Status()) == 502
    assert status_of(HttpStatus()) == 504
    assert status_of(Resp()) == 503
    assert status_of(NonInt()) is None
    assert classify_error(NonInt()).reason == "unknown"


class _RaisingProperty(Exception):
    @property
    def response(self) -> Any:
        raise RuntimeError("no response")

    @property
    def status_code(self) -> Any:
        raise RuntimeError("no status")


def test_raising_properties_do_not_break_classification() -> None:
    assert classify_error(_RaisingProperty()).reason == "unknown"


# --------------------------------------------------------------------------- make_classifier


def test_make_classifier_without_user_is_default() -> None:
    assert make_classifier() is classify_error
    assert make_classifier(None)(ConnectionError()).reason == "connection"


def test_make_classifier_user_verdict_used_as_is() -> None:
    mine = ErrorVerdict(False, False, True, "mine")
    classify = make_classifier(lambda exc: mine if isinstance(exc, KeyError) else None)
    assert classify(KeyError("x")) is mine
    assert classify(TimeoutError()).reason == "timeout"


def test_make_classifier_bool_overrides_only_retryable() -> None:
    exc = openai_error(openai.InternalServerError, 503, None, {"retry-after": "5"})
    classify = make_classifier(lambda e: False)
    verdict = classify(exc)
    assert verdict == ErrorVerdict(False, True, True, "http_503", 503, 5.0)

    retry_404 = make_classifier(lambda e: True)(openai_error(openai.NotFoundError, 404, None))
    assert retry_404 == ErrorVerdict(True, False, False, "client_error_404", 404)


def test_make_classifier_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="classifier"):
        make_classifier(42)  # type: ignore[arg-type]
    classify = make_classifier(lambda e: "yes")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="expected ErrorVerdict, bool or None"):
        classify(RuntimeError())


def test_verdict_is_frozen() -> None:
    verdict = classify_error(RuntimeError())
    with pytest.raises(AttributeError):
        verdict.retryable = False  # type: ignore[misc]


@pytest.mark.parametrize("value", ["inf", "1" * 400, "1e400", "1e9", "Infinity"])
def test_huge_retry_after_is_too_long_not_absent(value: str) -> None:
    """Before: inf and 400 digits read as absent (retried after ~1 s) while 1e9 stopped."""
    assert parse_retry_after({"retry-after": value}) == RETRY_AFTER_TOO_LONG
    assert parse_retry_after({"retry-after-ms": value}) == RETRY_AFTER_TOO_LONG or value == "1e9"


def test_huge_retry_after_stops_retrying() -> None:
    from rag_resilience.retry import RetryStrategy
    from rag_resilience.testing import FakeClock

    clock = FakeClock()
    calls = 0

    def limited() -> None:
        nonlocal calls
        calls += 1
        raise openai_error(openai.RateLimitError, 429, None, {"retry-after": "1" * 400})

    strategy = RetryStrategy(max_retries=3, retry_budget=None, clock=clock)
    with pytest.raises(openai.RateLimitError):
        strategy.execute(limited)
    assert calls == 1 and clock.total_slept == 0.0


def test_handled_error_survives_raise_from_none() -> None:
    """`raise RuntimeError(...) from None` hides __context__ but keeps it: the handled mark
    of the error an inner policy gave up on still stops an outer policy's retries."""
    inner = ConnectionError("upstream down")
    mark_handled(inner)
    try:
        try:
            raise inner
        except ConnectionError:
            raise RuntimeError("lookup failed") from None
    except RuntimeError as exc:
        outer = exc
    assert outer.__suppress_context__ and outer.__cause__ is None
    verdict = classify_error(outer)
    assert not verdict.retryable and verdict.reason == "handled"
    # an unrelated error with no handled link is still retried
    assert classify_error(RuntimeError("lookup failed")).retryable
