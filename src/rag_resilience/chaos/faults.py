"""Fault configuration and the exact error bodies/headers the real OpenAI API sends.

`Faults` is an immutable value: the server swaps whole configurations atomically, so a
request never sees half of an update. Error kinds are named after what the real API
means (``"rate_limit"`` vs ``"insufficient_quota"`` are both 429 but must be treated
differently by a caller), and plain status integers map onto them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ENDPOINTS",
    "ERROR_KINDS",
    "ErrorKind",
    "Faults",
    "error_body",
    "format_reset",
    "resolve_kind",
]

ENDPOINTS = ("embeddings", "chat", "models")
"""Endpoint names used by `Faults.endpoints` and in per-endpoint stats."""


@dataclass(frozen=True)
class ErrorKind:
    """One injectable upstream error: status, body fields, and whether Retry-After applies."""

    name: str
    status: int
    type: str | None
    code: str | int | None
    message: str
    param: str | None = None
    retry_after: bool = False


_SERVER_ERROR_MSG = (
    "The server had an error processing your request. Sorry about that! You can retry your "
    "request, or contact us through our help center at help.openai.com if you keep seeing "
    "this error."
)

ERROR_KINDS: dict[str, ErrorKind] = {
    k.name: k
    for k in (
        ErrorKind("server_error", 500, "server_error", None, _SERVER_ERROR_MSG),
        ErrorKind("bad_gateway", 502, "cf_bad_gateway", 502, "Bad gateway."),
        ErrorKind(
            "overloaded",
            503,
            "server_error",
            None,
            "The engine is currently overloaded, please try again later",
            retry_after=True,
        ),
        ErrorKind(
            "slow_down",
            503,
            "service_unavailable_error",
            "slow_down",
            "Please reduce your rate of requests and try again later.",
            retry_after=True,
        ),
        ErrorKind("gateway_timeout", 504, "cf_gateway_timeout", 504, "Gateway timeout."),
        ErrorKind(
            "rate_limit",
            429,
            "requests",
            "rate_limit_exceeded",
            "Rate limit reached for {model} in organization org-chaos on requests per min "
            "(RPM): Limit {limit}, Used {limit}, Requested 1. Please try again in {wait}. "
            "Visit https://platform.openai.com/account/rate-limits to learn more.",
            retry_after=True,
        ),
        ErrorKind(
            "rate_limit_tokens",
            429,
            "tokens",
            "rate_limit_exceeded",
            "Rate limit reached for {model} in organization org-chaos on tokens per min "
            "(TPM): Limit {limit}, Used {limit}. Please try again in {wait}. "
            "Visit https://platform.openai.com/account/rate-limits to learn more.",
            retry_after=True,
        ),
        ErrorKind(
            "insufficient_quota",
            429,
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
        ),
        ErrorKind(
            "context_length_exceeded",
            400,
            "invalid_request_error",
            "context_length_exceeded",
            "This model's maximum context length is {max_tokens} tokens. However, your "
            "messages resulted in {tokens} tokens. Please reduce the length of the messages.",
            param="messages",
        ),
        ErrorKind(
            "invalid_api_key",
            401,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided: {key}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
        ),
    )
}

_STATUS_TO_KIND = {
    500: "server_error",
    502: "bad_gateway",
    503: "overloaded",
    504: "gateway_timeout",
    429: "rate_limit",
    400: "context_length_exceeded",
    401: "invalid_api_key",
}
_ALIASES = {"quota": "insufficient_quota", "context_length": "context_length_exceeded"}


def resolve_kind(value: int | str, param: str = "status") -> ErrorKind:
    """Map 503 / "503" / "overloaded" / "quota" to an `ErrorKind`; other 4xx/5xx get a generic one."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            value = int(text)
        else:
            name = _ALIASES.get(text, text)
            if name in ERROR_KINDS:
                return ERROR_KINDS[name]
            raise ValueError(
                f"{param} must be an HTTP status 400-599 or one of "
                f"{sorted([*ERROR_KINDS, *_ALIASES])}, got {value!r}"
            )
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise ValueError(
            f"{param} must be an HTTP status 400-599 or an error kind name, got {value!r}"
        )
    if value in _STATUS_TO_KIND:
        return ERROR_KINDS[_STATUS_TO_KIND[value]]
    server = value >= 500
    return ErrorKind(
        f"http_{value}",
        value,
        "server_error" if server else "invalid_request_error",
        None,
        f"Injected HTTP {value} error.",
        retry_after=value in (408, 409, 529),
    )


def error_body(
    kind: ErrorKind,
    *,
    model: str = "gpt-4o-mini",
    wait: float = 1.0,
    limit: int = 60,
    api_key: str | None = None,
    request_id: str = "",
    param: str | None = None,
) -> dict[str, Any]:
    """The JSON body the real API returns for `kind`: ``{"error": {message,type,param,code}}``."""
    message = kind.message.format(
        model=model,
        wait=format_reset(wait),
        limit=limit,
        max_tokens=128000,
        tokens=130000,
        key=_mask_key(api_key),
    )
    if kind.name == "server_error" and request_id:
        message += f" (Please include the request ID {request_id} in your email.)"
    return {
        "error": {
            "message": message,
            "type": kind.type,
            "param": param if param is not None else kind.param,
            "code": kind.code,
        }
    }


def _mask_key(key: str | None) -> str:
    if not key:
        return "********"
    if len(key) <= 12:
        return key[:3] + "****"
    return f"{key[:8]}****{key[-4:]}"


def format_reset(seconds: float) -> str:
    """Format a duration the way OpenAI's x-ratelimit-reset-* headers do: "132ms", "8.64s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes = int(seconds // 60)
    return f"{minutes}m{round(seconds - 60 * minutes, 3):g}s"


Kind = int | str


@dataclass(frozen=True)
class Faults:
    """What the chaos server does wrong. Immutable; update with `ChaosServer.set_faults(**kw)`.

    Random faults draw one number per request from the server's seeded RNG, so a given
    seed yields the same fault sequence for the same sequence of requests.
    """

    error_rate: float = 0.0
    """Probability that a request fails with `status`."""
    status: Kind = 503
    """Error kind for `error_rate`: a status (500, 502, 503, 504, 429, 400, 401, ...) or a name."""
    error_rates: Mapping[Kind, float] = field(default_factory=dict)
    """Extra per-kind probabilities, e.g. ``{429: 0.1, "insufficient_quota": 0.01}``."""
    retry_after: float | None = None
    """Seconds advertised on injected 429/503 (``retry-after`` and ``retry-after-ms``); None: no header."""
    retry_after_header: Literal["both", "seconds", "ms"] = "both"
    outage: bool = False
    """Every request fails with `outage_status` while on."""
    outage_status: Kind = 503
    fail_next: int = 0
    """Fail the next N requests with `fail_next_status` (counts down; see stats()["fail_next_remaining"])."""
    fail_next_status: Kind = 503
    latency: float = 0.0
    """Seconds added before every answer (does not block other connections)."""
    latency_jitter: float = 0.0
    """Extra uniform random latency in [0, latency_jitter) seconds, from the seeded RNG."""
    stall: bool = False
    """Accept requests and never answer until the stall is cleared or the server stops."""
    stall_rate: float = 0.0
    """Probability that a request stalls (released when both stall settings are cleared)."""
    drop_rate: float = 0.0
    """Probability that the connection is closed without any response."""
    drop_next: int = 0
    """Close the connection without a response for the next N requests."""
    bad_body_next: int = 0
    """The next N answers that would succeed come back 200 with a broken body (`bad_body`)."""
    bad_body: Literal["truncated", "text"] = "truncated"
    """How a `bad_body_next` answer is broken: "truncated" (JSON cut in half, as a proxy
    timing out mid-body sends) or "text" (a text/plain page, as a gateway might answer)."""
    stream_break_after: int | None = None
    """Streaming answers are cut (connection closed) after this many SSE events."""
    rate_limit_rps: float | None = None
    """Server-side token bucket: requests per second; excess gets 429 with a correct Retry-After."""
    rate_limit_burst: int | None = None
    """Bucket capacity (default: max(1, floor(rate_limit_rps)))."""
    rate_limit_tpm: float | None = None
    """Server-side token bucket per API key: tokens per minute (charged what `usage` reports)."""
    rate_limit_token_burst: int | None = None
    """Token bucket capacity (default: one second's worth, max(1, floor(rate_limit_tpm / 60)))."""
    rate_limit_headers: Literal["openai", "azure", "anthropic", "none"] = "openai"
    """Format of the rate-limit headers on every response (see chaos/ratelimits.py); "azure":
    Azure OpenAI's remaining counts only (no limit, no reset)."""
    clock_offset: float = 0.0
    """Seconds the server's wall clock runs ahead of the real one (negative: behind), as
    on a host without NTP: it shows in the absolute (RFC 3339) resets it stamps."""
    max_concurrency: int | None = None
    """Requests in flight beyond this get 503 (`concurrency_mode="reject"`) or wait ("queue")."""
    concurrency_mode: Literal["reject", "queue"] = "reject"
    endpoints: tuple[str, ...] | None = None
    """Restrict faults to these endpoints ("embeddings", "chat", "models"); None: all."""

    def __post_init__(self) -> None:
        for name in ("error_rate", "stall_rate", "drop_rate"):
            _check_prob(name, getattr(self, name))
        resolve_kind(self.status, "status")
        resolve_kind(self.outage_status, "outage_status")
        resolve_kind(self.fail_next_status, "fail_next_status")
        rates = dict(self.error_rates)
        for key, rate in rates.items():
            resolve_kind(key, "error_rates key")
            _check_prob(f"error_rates[{key!r}]", rate)
        total = self.error_rate + sum(rates.values()) + self.stall_rate + self.drop_rate
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"error_rate + error_rates + stall_rate + drop_rate must be <= 1.0, got {total:.4g}"
            )
        if self.retry_after is not None and not (
            math.isfinite(self.retry_after) and self.retry_after >= 0
        ):
            raise ValueError(f"retry_after must be None or >= 0 seconds, got {self.retry_after!r}")
        if self.retry_after_header not in ("both", "seconds", "ms"):
            raise ValueError(
                f"retry_after_header must be 'both', 'seconds' or 'ms', got {self.retry_after_header!r}"
            )
        if self.bad_body not in ("truncated", "text"):
            raise ValueError(f"bad_body must be 'truncated' or 'text', got {self.bad_body!r}")
        for name in ("fail_next", "drop_next", "bad_body_next"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("latency", "latency_jitter"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 3600):
                raise ValueError(f"{name} must be between 0 and 3600 seconds, got {value!r}")
        if self.stream_break_after is not None and (
            not isinstance(self.stream_break_after, int) or self.stream_break_after < 0
        ):
            raise ValueError(
                f"stream_break_after must be None or an int >= 0, got {self.stream_break_after!r}"
            )
        if self.rate_limit_rps is not None and not (
            math.isfinite(self.rate_limit_rps) and self.rate_limit_rps > 0
        ):
            raise ValueError(f"rate_limit_rps must be None or > 0, got {self.rate_limit_rps!r}")
        if self.rate_limit_burst is not None and (
            not isinstance(self.rate_limit_burst, int) or self.rate_limit_burst < 1
        ):
            raise ValueError(
                f"rate_limit_burst must be None or an int >= 1, got {self.rate_limit_burst!r}"
            )
        if self.rate_limit_tpm is not None and not (
            isinstance(self.rate_limit_tpm, int | float)
            and math.isfinite(self.rate_limit_tpm)
            and self.rate_limit_tpm > 0
        ):
            raise ValueError(f"rate_limit_tpm must be None or > 0, got {self.rate_limit_tpm!r}")
        if self.rate_limit_token_burst is not None and (
            not isinstance(self.rate_limit_token_burst, int) or self.rate_limit_token_burst < 1
        ):
            raise ValueError(
                "rate_limit_token_burst must be None or an int >= 1, got "
                f"{self.rate_limit_token_burst!r}"
            )
        if not (isinstance(self.clock_offset, int | float) and math.isfinite(self.clock_offset)):
            raise ValueError(f"clock_offset must be a finite number, got {self.clock_offset!r}")
        if self.rate_limit_headers not in ("openai", "azure", "anthropic", "none"):
            raise ValueError(
                "rate_limit_headers must be 'openai', 'azure', 'anthropic' or 'none', got "
                f"{self.rate_limit_headers!r}"
            )
        if self.max_concurrency is not None and (
            not isinstance(self.max_concurrency, int) or self.max_concurrency < 1
        ):
            raise ValueError(
                f"max_concurrency must be None or an int >= 1, got {self.max_concurrency!r}"
            )
        if self.concurrency_mode not in ("reject", "queue"):
            raise ValueError(
                f"concurrency_mode must be 'reject' or 'queue', got {self.concurrency_mode!r}"
            )
        if self.endpoints is not None:
            endpoints = (
                (self.endpoints,) if isinstance(self.endpoints, str) else tuple(self.endpoints)
            )
            for ep in endpoints:
                if ep not in ENDPOINTS:
                    raise ValueError(f"endpoints entries must be in {ENDPOINTS}, got {ep!r}")
            object.__setattr__(self, "endpoints", endpoints)
        object.__setattr__(self, "error_rates", rates)

    @property
    def burst(self) -> int:
        """Effective token-bucket capacity."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, math.floor(self.rate_limit_rps or 1))

    @property
    def token_burst(self) -> int:
        """Effective token-bucket capacity (tokens)."""
        if self.rate_limit_token_burst is not None:
            return self.rate_limit_token_burst
        return max(1, math.floor((self.rate_limit_tpm or 60.0) / 60.0))

    def random_table(self) -> list[tuple[float, str, ErrorKind | None]]:
        """Cumulative probability table for the single per-request draw, in a fixed order."""
        table: list[tuple[float, str, ErrorKind | None]] = []
        acc = 0.0
        for action, prob, kind in (
            ("drop", self.drop_rate, None),
            ("stall", self.stall_rate, None),
            ("error", self.error_rate, resolve_kind(self.status)),
            *(("error", p, resolve_kind(k)) for k, p in self.error_rates.items()),
        ):
            if prob > 0:
                acc += prob
                table.append((acc, action, kind))
        return table

    def applies_to(self, endpoint: str) -> bool:
        return self.endpoints is None or endpoint in self.endpoints

    def replace(self, **changes: Any) -> Faults:
        """A copy with `changes`; unknown names raise ValueError listing the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown fault setting(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (used by the control endpoint)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["error_rates"] = {str(k): v for k, v in self.error_rates.items()}
        data["endpoints"] = list(self.endpoints) if self.endpoints is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        return cls().replace(**_coerce(data))


def _coerce(data: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(data)
    if isinstance(out.get("endpoints"), list):
        out["endpoints"] = tuple(out["endpoints"])
    return out


def _check_prob(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (0.0 <= float(value) <= 1.0)
    ):
        raise ValueError(f"{name} must be between 0.0 and 1.0, got {value!r}")
