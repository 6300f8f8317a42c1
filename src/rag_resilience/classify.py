"""Error classification: may this failure be retried, does it say the upstream is sick, may a
degraded answer mask it, and how long did the server ask us to wait (DESIGN.md §3).

Everything is duck-typed so the core imports no SDK: the status comes from ``.status_code`` /
``.status`` / ``.response.status_code`` / ``.http_status``, headers from ``.response.headers``
or ``.headers``, the provider's error code from openai's ``.code`` / ``.type`` / ``.body`` or an
Anthropic-style ``{"type": "error", "error": {...}}`` body, transport failures from class names
anywhere in the MRO (httpx, openai/anthropic, requests/urllib3, aiohttp). Precedence, per
exception: our own errors, then the HTTP status (with body code and ``x-should-retry``), then a
status-less body code, then transport class names, then LangChain's ``is_retryable`` hint, then
programming errors, else "unknown" (retried, like tenacity's default). A wrapper with no verdict
of its own is looked through (``__cause__``, ``__context__``) to the SDK error it hides.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import (
    CircuitOpenError,
    DeadlineExceededError,
    QueueFullError,
    RateLimitedError,
    is_handled,
    is_malformed_response,
)

__all__ = [
    "Classifier",
    "ErrorVerdict",
    "classify_error",
    "error_code_of",
    "headers_of",
    "is_parse_failure",
    "make_classifier",
    "parse_retry_after",
    "retry_after_hint",
    "status_of",
]


@dataclass(frozen=True, slots=True)
class ErrorVerdict:
    """What a failure means for retry, the circuit breaker and fallbacks."""

    #: may the same call be retried?
    retryable: bool
    #: does it count against the upstream's health (circuit breaker)?
    is_failure: bool
    #: may a degraded answer (cache / generic / fallback model) mask it? False for the caller's
    #: own errors (400 incl. context_length_exceeded, 401, 403, 404, 422) and programming errors
    fallback_ok: bool
    #: short machine label: "http_503", "rate_limited", "overloaded", "insufficient_quota", ...
    reason: str
    status: int | None = None
    #: seconds the server asked us to wait (headers, else a body hint); None if it did not say
    retry_after: float | None = None


Classifier = Callable[[BaseException], ErrorVerdict | bool | None]

# The model answered (a 200) but its answer does not parse or validate: the model's answer,
# not an upstream failure. Recognised by class name in the MRO, so nothing is imported.
_PARSE_FAILURE_NAMES = frozenset(
    {
        "ValidationError",  # pydantic (v2 and v1)
        "JSONDecodeError",
        "OutputParserException",  # LangChain
        "LengthFinishReasonError",  # openai: parse() cut by max_tokens
        "ContentFilterFinishReasonError",
    }
)


def is_parse_failure(exc: BaseException) -> bool:
    """True when `exc` says a model's answer did not parse or validate (verdict
    "parse_failure": not retried unless asked, not a breaker failure, never masked)."""
    return any(klass.__name__ in _PARSE_FAILURE_NAMES for klass in type(exc).__mro__)


# Builtin exception families whose meaning is "the code is wrong", not "the upstream is sick".
# Only when the exception carries no HTTP status: some SDK errors subclass ValueError.
_PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    ValueError,  # includes UnicodeError
    AttributeError,
    LookupError,  # KeyError, IndexError
    NameError,
    AssertionError,
    NotImplementedError,
    ImportError,
    ZeroDivisionError,
    RecursionError,
)

# Transport failures recognised by class name anywhere in the MRO, so nothing is imported.
_TIMEOUT_NAMES = frozenset(
    {
        "TimeoutError",  # builtins, asyncio (distinct on 3.10), concurrent.futures, urllib3
        "TimeoutException",  # httpx base
        "ConnectTimeout",  # httpx, requests
        "ReadTimeout",  # httpx, requests
        "WriteTimeout",  # httpx
        "PoolTimeout",  # httpx
        "Timeout",  # requests
        "APITimeoutError",  # openai, anthropic
        "ReadTimeoutError",  # urllib3
        "ConnectTimeoutError",  # urllib3
        "ServerTimeoutError",  # aiohttp
        "timeout",  # socket.timeout before 3.10
    }
)
_CONNECTION_NAMES = frozenset(
    {
        "ConnectionError",  # builtins (reset, refused, aborted, broken pipe), requests
        "gaierror",  # socket: DNS failure
        "ConnectError",  # httpx
        "ReadError",  # httpx
        "WriteError",  # httpx
        "RemoteProtocolError",  # httpx: server closed mid-response
        "NetworkError",  # httpx
        "TransportError",  # httpx
        "APIConnectionError",  # openai, anthropic
        "ProtocolError",  # urllib3 (connection aborted), httpx base
        "NewConnectionError",  # urllib3
        "ClientConnectionError",  # aiohttp
        "ServerDisconnectedError",  # aiohttp
    }
)
# httpx transport errors that are the caller's bug (bad URL scheme, invalid request), not a blip:
# classified as programming errors.
_NOT_TRANSPORT_NAMES = frozenset({"LocalProtocolError", "UnsupportedProtocol"})

_BILLING_CODES = frozenset({"insufficient_quota", "credit_balance_exhausted"})
_OVERLOADED_CODES = frozenset({"overloaded_error", "server_is_overloaded", "slow_down"})
_RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "rate_limit_error"})
_SERVER_CODES = frozenset({"server_error", "api_error", "service_unavailable_error"})
_CLIENT_CODES: dict[str, int] = {
    "context_length_exceeded": 400,
    "invalid_request_error": 400,
    "invalid_api_key": 401,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "model_not_found": 404,
}
# Anthropic reports an empty balance as a 400 with this sentence, not with a code.
_CREDIT_PHRASE = "credit balance is too low"

# LangChain (langchain-core 1.x) ModelError subclasses -> reason, and the status they stand for.
_MODEL_ERROR_REASONS: dict[str, tuple[str, int | None]] = {
    "ModelRateLimitError": ("rate_limited", 429),
    "ModelAPIError": ("server_error", None),
    "ModelConnectionError": ("connection", None),
    "ModelTimeoutError": ("timeout", None),
    "ContextOverflowError": ("context_length_exceeded", 400),
    "ModelInvalidRequestError": ("client_error_400", 400),
    "ModelAuthenticationError": ("client_error_401", 401),
    "ModelPermissionDeniedError": ("client_error_403", 403),
    "ModelNotFoundError": ("client_error_404", 404),
    "ModelRefusalError": ("model_refusal", None),
}

_UNIT_SECONDS: dict[str, float] = {
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "ms": 0.001,
    "millisecond": 0.001,
    "milliseconds": 0.001,
    "us": 1e-6,
    "µs": 1e-6,
}
_DURATION_PART = r"\d+(?:\.\d+)?(?:ms|us|µs|h|m|s)"
_HINT_RE = re.compile(
    r"(?:try\s+again\s+in|retry\s+(?:after|in))\s+"
    r"(?P<go>(?:" + _DURATION_PART + r")+)(?![a-z])"
    r"|(?:try\s+again\s+in|retry\s+(?:after|in))\s+"
    r"(?P<num>\d+(?:\.\d+)?)\s*"
    r"(?P<unit>milliseconds?|seconds?|secs?|minutes?|mins?|hours?|hrs?)\b",
    re.IGNORECASE,
)
_GO_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|h|m|s)", re.IGNORECASE)

# Header containers known to look names up case-insensitively (returned as they are).
_CI_HEADER_TYPES = frozenset(
    {"Headers", "CaseInsensitiveDict", "HTTPHeaderDict", "CIMultiDict", "CIMultiDictProxy"}
)
_MAX_CHAIN = 8  # links followed through __cause__ / __context__
_MAX_BODY_CHARS = 65536  # a str body longer than this is not parsed as JSON


# --------------------------------------------------------------------------- duck-typed reads


def _safe_getattr(obj: object, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:  # properties that raise (httpx's RequestError.request when unset)
        return None


def _plain_attr(obj: object, name: str) -> Any:
    """An attribute without running properties (aiohttp's deprecated ``.code`` warns when read)."""
    own = getattr(obj, "__dict__", None)
    if isinstance(own, dict) and name in own:
        return own[name]
    for klass in type(obj).__mro__:
        found = vars(klass).get(name)
        if found is not None:
            return found  # a property object is not a str: ignored by the callers
    return None


def _as_status(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return int(value)
    return None


def status_of(exc: object) -> int | None:
    """The HTTP status an exception carries, or None (ints in 100..599 only)."""
    for name in ("status_code", "status"):
        status = _as_status(_safe_getattr(exc, name))
        if status is not None:
            return status
    response = _safe_getattr(exc, "response")
    if response is not None:
        status = _as_status(_safe_getattr(response, "status_code"))
        if status is None:
            status = _as_status(_safe_getattr(response, "status"))  # aiohttp
        if status is not None:
            return status
    return _as_status(_safe_getattr(exc, "http_status"))


class _CIHeaders(Mapping[str, str]):
    """Read-only headers with case-insensitive lookups, for plain dicts and email Messages."""

    __slots__ = ("_items",)

    def __init__(self, items: dict[str, str]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"_CIHeaders({self._items!r})"


def _header_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def _ci_headers(headers: object) -> Mapping[str, str] | None:
    if headers is None:
        return None
    if isinstance(headers, _CIHeaders) or (
        isinstance(headers, Mapping) and type(headers).__name__ in _CI_HEADER_TYPES
    ):
        return headers
    items = _safe_getattr(headers, "items")
    if not callable(items):
        return None
    lowered: dict[str, str] = {}
    try:
        for key, value in items():
            name = _header_text(key).lower()
            if name not in lowered:  # first value wins, like Message.get
                lowered[name] = _header_text(value)
    except Exception:
        return None
    return _CIHeaders(lowered)


def headers_of(exc: object) -> Mapping[str, str] | None:
    """Response headers of an exception (``.response.headers``, else ``.headers``).

    Lookups are case-insensitive: httpx/requests/urllib3/multidict containers are returned as
    they are, anything else (plain dict, ``email.message.Message``) as a lowercased copy.
    """
    response = _safe_getattr(exc, "response")
    if response is not None:
        found = _ci_headers(_safe_getattr(response, "headers"))
        if found is not None:
            return found
    return _ci_headers(_safe_getattr(exc, "headers"))


def _get_header(headers: Mapping[str, str], name: str) -> str | None:
    try:
        value = headers.get(name)
    except Exception:
        return None
    return None if value is None else _header_text(value)


def _parse_body(body: object) -> object:
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8", "replace")
        except Exception:  # pragma: no cover - decode with "replace" does not raise
            return None
    if isinstance(body, str):
        text = body.strip()
        if text.startswith("{") and len(text) <= _MAX_BODY_CHARS:
            try:
                return json.loads(text)
            except ValueError:
                return body
    return body


def _dict_codes(body: Mapping[Any, Any], depth: int = 0) -> Iterator[str]:
    """Codes in a JSON error body, most specific first: nested ``error`` dict, code, type."""
    inner = body.get("error")
    if isinstance(inner, Mapping) and depth < 3:
        yield from _dict_codes(inner, depth + 1)
    elif isinstance(inner, str) and inner:
        yield inner  # {"error": "insufficient_quota"}-style bodies
    for key in ("code", "type"):
        value = body.get(key)
        if isinstance(value, str) and value and value != "error":
            yield value


def _codes_of(exc: object) -> Iterator[str]:
    """Every candidate error code an exception carries, most specific first."""
    body = _parse_body(_safe_getattr(exc, "body"))
    if isinstance(body, Mapping):
        yield from _dict_codes(body)
    for name in ("code", "type", "error_code"):
        value = _plain_attr(exc, name)
        if isinstance(value, str) and value and value != "error":
            yield value


def error_code_of(exc: object) -> str | None:
    """The provider's error code/type (``insufficient_quota``, ``overloaded_error``...), or None.

    Reads openai's ``.code`` / ``.type`` / ``.body`` (the inner error dict), Anthropic's full
    ``{"type": "error", "error": {"type": ...}}`` body, and ``.body`` given as a JSON string.
    """
    return next(_codes_of(exc), None)


def _body_message(exc: object) -> str | None:
    body = _parse_body(_safe_getattr(exc, "body"))
    for _ in range(3):
        if not isinstance(body, Mapping):
            break
        message = body.get("message")
        if isinstance(message, str):
            return message
        body = body.get("error")
    message = _safe_getattr(exc, "message")
    return message if isinstance(message, str) else None


def _exc_text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return ""


# --------------------------------------------------------------------------- Retry-After


# A wait beyond any sensible max_retry_after: what `inf` or a 400-digit Retry-After means
# (before, those read as absent and were retried after ~1 s while 1e9 stopped).
RETRY_AFTER_TOO_LONG = 1e9


def _finite_non_negative(value: float) -> float | None:
    if math.isnan(value):
        return None
    return min(max(0.0, value), RETRY_AFTER_TOO_LONG)


def parse_retry_after(
    headers: Mapping[str, str] | None, *, now: float | None = None
) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, else ``retry-after`` as
    (float) seconds or an HTTP-date relative to `now` (wall clock, default ``time.time()``).

    Negative waits become 0; missing, malformed or non-finite values give None. Never raises.
    """
    ci = _ci_headers(headers)
    if ci is None:
        return None
    millis = _get_header(ci, "retry-after-ms")
    if millis is not None:
        try:
            found = _finite_non_negative(float(millis.strip()) / 1000.0)
        except ValueError:
            found = None
        if found is not None:
            return found
    value = _get_header(ci, "retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return _finite_non_negative(float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        when = float(email.utils.mktime_tz(parsed))
    except Exception:  # malformed dates raise TypeError/ValueError/OverflowError/OSError
        return None
    return _finite_non_negative(when - (time.time() if now is None else now))


def retry_after_hint(message: str) -> float | None:
    """A wait hinted in an error message: "Please try again in 26.604s", "in 6m0s", "in 20ms",
    "in 1.5 seconds", "retry after 2 seconds". None if there is no such hint."""
    if not message:
        return None
    match = _HINT_RE.search(message)
    if match is None:
        return None
    go = match.group("go")
    if go is not None:
        total = 0.0
        for number, unit in _GO_PART_RE.findall(go):
            total += float(number) * _UNIT_SECONDS[unit.lower()]
        return total
    unit = match.group("unit").lower()
    return float(match.group("num")) * _UNIT_SECONDS[unit]


# --------------------------------------------------------------------------- verdicts


def _retryable(
    reason: str, status: int | None = None, retry_after: float | None = None
) -> ErrorVerdict:
    return ErrorVerdict(True, True, True, reason, status, retry_after)


def _rate_limited(status: int | None, retry_after: float | None) -> ErrorVerdict:
    # Throttling is an upstream that is up and answering: retry after its Retry-After, but
    # do not count it against its health, or a burst that briefly exceeds the limit would
    # open the circuit and serve stale answers while live ones were a second away.
    return ErrorVerdict(True, False, True, "rate_limited", status, retry_after)


def _caller_error(reason: str, status: int | None = None) -> ErrorVerdict:
    return ErrorVerdict(False, False, False, reason, status)


def _billing(code: str, status: int | None, retry_after: float | None) -> ErrorVerdict:
    # Retrying cannot refill a quota; but an exhausted quota is the upstream failing us, so it
    # counts for the breaker and a degraded answer (another provider, the cache) may mask it.
    return ErrorVerdict(False, True, True, code, status, retry_after)


def _billing_code(exc: BaseException, status: int | None, codes: list[str]) -> str | None:
    for code in codes:
        if code in _BILLING_CODES:
            return code
    if status not in (None, 400, 402, 403, 429):
        return None
    text = _exc_text(exc)
    body = _safe_getattr(exc, "body")
    if isinstance(body, (str, bytes)):
        text = f"{text} {_header_text(body)}"
    if status in (None, 429):
        for code in _BILLING_CODES:
            if code in text:
                return code
    if _CREDIT_PHRASE in text.lower():
        return "credit_balance_exhausted"
    return None


def _status_verdict(exc: BaseException, status: int, now: float | None) -> ErrorVerdict:
    codes = list(_codes_of(exc))
    headers = headers_of(exc)
    retry_after = parse_retry_after(headers, now=now) if headers is not None else None
    if status == 429 and retry_after is None:
        retry_after = retry_after_hint(_body_message(exc) or "") or retry_after_hint(_exc_text(exc))

    billing = _billing_code(exc, status, codes) if 400 <= status < 500 else None
    if billing is not None:
        verdict = _billing(billing, status, retry_after)
    elif status == 429:
        verdict = _rate_limited(status, retry_after)
    elif status == 529 or (status >= 500 and any(c in _OVERLOADED_CODES for c in codes)):
        verdict = _retryable("overloaded", status, retry_after)
    elif status >= 500 or status in (408, 409):
        verdict = _retryable(f"http_{status}", status, retry_after)
    elif status >= 400:
        reason = "context_length_exceeded" if "context_length_exceeded" in codes else None
        verdict = _caller_error(reason or f"client_error_{status}", status)
        verdict = dataclasses.replace(verdict, retry_after=retry_after)
    else:  # an error with a 1xx-3xx status (e.g. a response that failed validation)
        verdict = _retryable(f"http_{status}", status, retry_after)

    if headers is not None:
        said = _get_header(headers, "x-should-retry")
        if said is not None:
            said = said.strip().lower()
            if said == "true" and not verdict.retryable:
                verdict = dataclasses.replace(verdict, retryable=True)
            elif said == "false" and verdict.retryable:
                verdict = dataclasses.replace(
                    verdict, retryable=False, reason="server_said_no_retry"
                )
    return verdict


def _code_verdict(exc: BaseException) -> ErrorVerdict | None:
    """Verdict from the body code alone, for errors without a status (e.g. an error event in
    the middle of an openai stream, or LangChain's OpenAIAPIContextOverflowError)."""
    codes = list(_codes_of(exc))
    billing = _billing_code(exc, None, codes)
    if billing is not None:
        return _billing(billing, None, None)
    for code in codes:
        if code in _RATE_LIMIT_CODES:
            return _rate_limited(None, retry_after_hint(_exc_text(exc)))
        if code in _OVERLOADED_CODES:
            return _retryable("overloaded")
        if code in _SERVER_CODES:
            return _retryable("server_error")
        status = _CLIENT_CODES.get(code)
        if status is not None:
            reason = code if code == "context_length_exceeded" else f"client_error_{status}"
            return _caller_error(reason)
    return None


_TRANSPORT_CACHE: dict[type, str | None] = {}


def _transport_reason(exc_type: type) -> str | None:
    """ "timeout"/"connection" if a class in the MRO is a known transport failure (cached)."""
    try:
        return _TRANSPORT_CACHE[exc_type]
    except KeyError:
        pass
    found: str | None = None
    for klass in exc_type.__mro__:
        name = klass.__name__
        if name in _NOT_TRANSPORT_NAMES:
            found = "local"
            break
        if name in _TIMEOUT_NAMES:
            found = "timeout"
            break
        if name in _CONNECTION_NAMES:
            found = "connection"
            break
    if len(_TRANSPORT_CACHE) >= 1024:  # classes made on the fly must not grow it forever
        _TRANSPORT_CACHE.clear()
    _TRANSPORT_CACHE[exc_type] = found
    return found


def _model_error_verdict(exc: BaseException) -> ErrorVerdict | None:
    """LangChain's ``ModelError.is_retryable`` (or any bool ``is_retryable``) as a last hint."""
    flag = _safe_getattr(exc, "is_retryable")
    if not isinstance(flag, bool):
        return None
    reason, status = "model_error", None
    for klass in type(exc).__mro__:
        known = _MODEL_ERROR_REASONS.get(klass.__name__)
        if known is not None:
            reason, status = known
            break
    if flag:
        if reason == "rate_limited":
            return _rate_limited(status, None)
        return ErrorVerdict(True, True, True, reason, status)
    return _caller_error(reason, status)


_CANCELLED_NAMES = frozenset({"CancelledError"})


def _own_verdict(exc: BaseException, now: float | None) -> ErrorVerdict:
    """The verdict of one exception, ignoring its cause chain and handled mark."""
    if isinstance(exc, CircuitOpenError):
        return ErrorVerdict(False, False, True, "circuit_open", None, exc.retry_after)
    if isinstance(exc, RateLimitedError):  # our pacer: no call was made
        return ErrorVerdict(False, False, True, "rate_limit_wait", None, exc.wait)
    if isinstance(exc, QueueFullError):
        return ErrorVerdict(False, False, True, "queue_full")
    if isinstance(exc, DeadlineExceededError):
        if exc.scope == "attempt":
            return _retryable("timeout")
        return ErrorVerdict(False, True, True, "deadline")
    if is_malformed_response(exc):  # a 200 whose body is not the API's: the upstream's fault
        return _retryable("malformed_response")
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit, CancelledError...
        name = "cancelled" if type(exc).__name__ in _CANCELLED_NAMES else "interrupted"
        return ErrorVerdict(False, False, False, name)
    if is_parse_failure(exc):  # checked before the status: the SDK attaches the 200 response
        return ErrorVerdict(False, False, False, "parse_failure", status_of(exc))

    status = status_of(exc)
    if status is not None:
        return _status_verdict(exc, status, now)
    by_code = _code_verdict(exc)
    if by_code is not None:
        return by_code
    transport = _transport_reason(type(exc))
    if transport == "local":
        return _caller_error("programming_error")
    if transport == "connection" and _lost_to_closed_loop(exc):
        # Not the upstream: the client reused a pooled connection of an event loop that has
        # closed (langchain-openai shares one httpx.AsyncClient per process across loops,
        # langchain-ai/langchain#35783). The request may have been answered; the answer was
        # lost on our side. A retry opens a fresh connection at once (no backoff: nothing
        # to wait out); the breaker must not count it.
        return ErrorVerdict(True, False, True, "stale_connection", retry_after=0.0)
    if transport is not None:
        return _retryable(transport)
    hinted = _model_error_verdict(exc)
    if hinted is not None:
        return hinted
    if isinstance(exc, _PROGRAMMING_ERRORS):
        return _caller_error("programming_error")
    return _retryable("unknown")


def _lost_to_closed_loop(exc: BaseException) -> bool:
    """True if a ``RuntimeError("Event loop is closed")`` is in `exc`'s chain."""
    return any(
        type(link) is RuntimeError and str(link) == "Event loop is closed"
        for link, _ in _links(exc, explicit_only=False)
    )


def _links(exc: BaseException, explicit_only: bool) -> Iterator[tuple[BaseException, bool]]:
    """Exceptions `exc` wraps, nearest first, with whether an implicit ``__context__`` link was
    followed to reach them. Bounded and cycle-safe."""
    seen = {id(exc)}
    current: BaseException | None = exc
    implicit = False
    for _ in range(_MAX_CHAIN):
        assert current is not None
        nxt: BaseException | None = current.__cause__
        if nxt is None:
            group = _safe_getattr(current, "exceptions")
            if (
                isinstance(group, tuple)
                and len(group) == 1
                and isinstance(group[0], BaseException)
                and "ExceptionGroup" in type(current).__name__
            ):
                nxt = group[0]
        if nxt is None and not explicit_only and not current.__suppress_context__:
            nxt = current.__context__
            implicit = True
        if nxt is None or id(nxt) in seen:
            return
        seen.add(id(nxt))
        yield nxt, implicit
        current = nxt


def classify_error(exc: BaseException, *, now: float | None = None) -> ErrorVerdict:
    """Classify `exc` by the DESIGN.md §3 table. `now` is the wall clock used for an
    HTTP-date ``Retry-After`` (default ``time.time()``).

    A wrapper whose own verdict is "unknown" (or "programming_error" with an explicit
    ``raise ... from``) takes the verdict of the error it wraps, so a LlamaIndex/LangChain
    wrapper around an SDK 404 is not retried. A handled error (an inner policy already retried
    it) is never retryable again; it keeps its status and other fields, reason "handled".
    """
    verdict = _own_verdict(exc, now)
    decider: BaseException = exc
    if verdict.status is None and verdict.reason in ("unknown", "programming_error"):
        explicit_only = verdict.reason == "programming_error"
        for link, implicit in _links(exc, explicit_only):
            inner = _own_verdict(link, now)
            if inner.reason == "unknown":
                continue
            if inner.reason == "programming_error" and (implicit or explicit_only):
                continue  # a bug hit while handling another error says nothing about that error
            verdict, decider = inner, link
            break
    if (
        verdict.retryable
        and verdict.reason not in ("circuit_open", "queue_full")
        and (
            is_handled(exc)
            or (decider is not exc and is_handled(decider))
            or _handled_in_chain(exc)
        )
    ):
        verdict = dataclasses.replace(verdict, retryable=False, reason="handled")
    return verdict


def _handled_in_chain(exc: BaseException) -> bool:
    """True if `exc` was raised while handling an error a policy already gave up on, even
    through ``raise ... from None`` (which hides `__context__` but keeps it): an outer
    policy must not retry what an inner one retried (4 requests, not 16)."""
    seen = {id(exc)}
    todo = [exc.__cause__, exc.__context__]
    while todo and len(seen) <= _MAX_CHAIN:
        link = todo.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        if is_handled(link) and not isinstance(link, (CircuitOpenError, QueueFullError)):
            return True
        todo += [link.__cause__, link.__context__]
    return False


def make_classifier(user: Classifier | None = None) -> Callable[[BaseException], ErrorVerdict]:
    """Combine a user's classifier with the default one.

    The user's runs first: an ErrorVerdict is used as is; True/False overrides only
    ``retryable`` of the default verdict (its retry_after and failure accounting stay);
    None defers to the default verdict.
    """
    if user is None:
        return classify_error
    if not callable(user):
        raise ValueError(f"classifier must be callable or None, got {type(user).__name__}")

    def classify(exc: BaseException) -> ErrorVerdict:
        said = user(exc)
        if isinstance(said, ErrorVerdict):
            return said
        if said is None:
            return classify_error(exc)
        if isinstance(said, bool):
            verdict = classify_error(exc)
            if verdict.retryable is said:
                return verdict
            return dataclasses.replace(verdict, retryable=said)
        raise TypeError(
            f"classifier {user!r} returned {type(said).__name__}; "
            "expected ErrorVerdict, bool or None"
        )

    return classify
