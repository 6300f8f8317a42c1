"""One vcrpy configuration for recording and replaying the project's HTTP cassettes.

Recorded URIs are rewritten to a fixed placeholder host (`CASSETTE_BASE_URL`), and the same
rewrite is applied to live requests before matching, so a cassette replays whatever port
(or real host) it was recorded from. Matching is on method + path: each cassette is an
ordered script of exchanges (vcr plays identical requests in recorded order), which is what
retry tests need. Secrets are scrubbed on record: authorization, organization and project
headers, cookies, and any ``sk-...`` string in bodies.

>>> from rag_resilience.chaos.cassettes import use_cassette, CASSETTE_BASE_URL
>>> with use_cassette("openai_chat/500_then_success"):
...     client = openai.OpenAI(base_url=CASSETTE_BASE_URL, api_key="sk-test", max_retries=0)
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "CASSETTE_BASE_URL",
    "CASSETTE_DIR",
    "CASSETTE_HOST",
    "DEFAULT_MATCH_ON",
    "SECRET_HEADERS",
    "cassette_path",
    "list_cassettes",
    "make_vcr",
    "scrub_request",
    "scrub_response",
    "use_cassette",
]

CASSETTE_HOST = "chaos.invalid"
CASSETTE_BASE_URL = f"http://{CASSETTE_HOST}/v1"
"""Pass this as the client's base_url when replaying."""

CASSETTE_DIR = Path(
    os.environ.get("RAG_RESILIENCE_CASSETTES", Path(__file__).resolve().parents[3] / "cassettes")
)
DEFAULT_MATCH_ON: tuple[str, ...] = ("method", "path")
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "api-key",
        "x-api-key",
        "x-goog-api-key",
        "anthropic-api-key",
        "proxy-authorization",
        "openai-organization",
        "openai-project",
        "cookie",
        "set-cookie",
    }
)
_NOISY_HEADERS = frozenset(
    {
        "x-stainless-arch",
        "x-stainless-os",
        "x-stainless-runtime-version",
        "x-stainless-package-version",
        "x-stainless-runtime",
        "x-stainless-lang",
        "x-stainless-async",
        "x-stainless-raw-response",
        "x-stainless-read-timeout",
    }
)
_KEY = re.compile(r"sk-[A-Za-z0-9_\-*]{2,}")
_BEARER = re.compile(r"Bearer\s+\S+")
# Keys that do not start with sk-: Google (AIza...), and any JSON field or query parameter
# named like a credential, whatever its value looks like.
_GOOGLE_KEY = re.compile(r"AIza[0-9A-Za-z_\-]{20,}")
_SECRET_NAME = r"(?:api[_-]?key|key|access[_-]?token|token|secret|password|client[_-]?secret)"
_SECRET_FIELD = re.compile(rf'("{_SECRET_NAME}"\s*:\s*)"[^"]*"', re.IGNORECASE)
_SECRET_PARAM = re.compile(rf"^{_SECRET_NAME}$", re.IGNORECASE)


def cassette_path(name: str) -> Path:
    """Path of cassette `name` ("openai_chat/success" or with ".yaml")."""
    if not name.endswith((".yaml", ".yml")):
        name += ".yaml"
    return CASSETTE_DIR / name


def list_cassettes() -> list[str]:
    """Names of all committed cassettes, e.g. ["langchain_chat/500_then_success", ...]."""
    return sorted(
        str(p.relative_to(CASSETTE_DIR).with_suffix("")) for p in CASSETTE_DIR.rglob("*.yaml")
    )


def _scrub_text(text: str) -> str:
    text = _BEARER.sub("[REDACTED]", _KEY.sub("[REDACTED]", text))
    text = _GOOGLE_KEY.sub("[REDACTED]", text)
    return _SECRET_FIELD.sub(r'\1"[REDACTED]"', text)


def _scrub_query(query: str) -> str:
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    scrubbed = [(k, "[REDACTED]" if _SECRET_PARAM.match(k) else _scrub_text(v)) for k, v in pairs]
    return query if scrubbed == pairs else urlencode(scrubbed)


def _scrub_body(body: Any) -> Any:
    if isinstance(body, bytes):
        try:
            return _scrub_text(body.decode("utf-8")).encode("utf-8")
        except UnicodeDecodeError:
            return body
    if isinstance(body, str):
        return _scrub_text(body)
    return body


def _placeholder(uri: str) -> str:
    parts = urlsplit(uri)
    return urlunsplit(("http", CASSETTE_HOST, parts.path, _scrub_query(parts.query), ""))


def scrub_request(request: Any) -> Any:
    """vcr before_record_request hook: placeholder host, no secrets, no machine noise."""
    request.uri = _placeholder(request.uri)
    for name in list(request.headers):
        lower = name.lower()
        if lower in SECRET_HEADERS or lower in _NOISY_HEADERS:
            del request.headers[name]
        elif lower == "host":
            request.headers[name] = CASSETTE_HOST
    request.body = _scrub_body(request.body)
    return request


def scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    """vcr before_record_response hook: drop secret headers, redact keys in the body."""
    headers = response.get("headers", {})
    for name in list(headers):
        if name.lower() in SECRET_HEADERS:
            del headers[name]
    body = response.get("body")
    if isinstance(body, dict) and "string" in body:
        body["string"] = _scrub_body(body["string"])
    return response


def make_vcr(record_mode: str = "none", match_on: Sequence[str] = DEFAULT_MATCH_ON) -> Any:
    """A `vcr.VCR` with the project's settings (import of vcrpy deferred to here)."""
    import vcr

    return vcr.VCR(
        cassette_library_dir=str(CASSETTE_DIR),
        record_mode=record_mode,
        match_on=tuple(match_on),
        before_record_request=scrub_request,
        before_record_response=scrub_response,
        decode_compressed_response=True,
        serializer="yaml",
    )


def use_cassette(
    name: str,
    *,
    record_mode: str = "none",
    match_on: Sequence[str] = DEFAULT_MATCH_ON,
    allow_playback_repeats: bool = False,
    **kwargs: Any,
) -> Any:
    """Context manager replaying cassette `name` (record mode "none": no network, ever)."""
    return make_vcr(record_mode, match_on).use_cassette(
        str(cassette_path(name)), allow_playback_repeats=allow_playback_repeats, **kwargs
    )
