"""Cassettes replay offline (sockets disabled) with the outcomes recorded, and hold no secrets."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import yaml
from pytest_socket import SocketBlockedError, disable_socket, enable_socket

from rag_resilience.chaos.cassettes import (
    CASSETTE_BASE_URL,
    CASSETTE_DIR,
    cassette_path,
    list_cassettes,
    scrub_request,
    scrub_response,
    use_cassette,
)
from rag_resilience.chaos.record import CLIENTS, SCENARIOS, Client, Scenario, cases, run_case

CASES = cases()


@pytest.fixture
def no_network() -> Iterator[None]:
    disable_socket(allow_unix_socket=True)  # event loops still need their unix socketpair
    try:
        yield
    finally:
        enable_socket()


def test_every_case_has_a_committed_cassette_and_nothing_else() -> None:
    assert len(CASES) == 51
    assert list_cassettes() == sorted(f"{c.name}/{s.name}" for c, s in CASES)


@pytest.mark.parametrize(
    ("client", "scenario"), CASES, ids=[f"{c.name}/{s.name}" for c, s in CASES]
)
def test_replay_gives_the_recorded_outcomes(
    no_network: None, client: Client, scenario: Scenario
) -> None:
    with use_cassette(f"{client.name}/{scenario.name}") as cassette:
        got = run_case(client, scenario, CASSETTE_BASE_URL)
        assert cassette.all_played
    assert tuple(got) == scenario.expected


def test_sockets_really_are_disabled(no_network: None) -> None:
    import socket

    with pytest.raises(SocketBlockedError):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def test_replay_refuses_requests_not_in_the_cassette(no_network: None) -> None:
    import openai
    from vcr.errors import CannotOverwriteExistingCassetteException

    client = CLIENTS["openai_chat"]
    with use_cassette("openai_chat/success"), pytest.raises(openai.APIConnectionError) as info:
        run_case(client, SCENARIOS["503x3_then_success"], CASSETTE_BASE_URL)  # 2nd call unmatched
    assert isinstance(info.value.__cause__, CannotOverwriteExistingCassetteException)


def test_recorded_headers_and_retry_after_survive() -> None:
    data = yaml.safe_load(cassette_path("openai_chat/429_retry_after_then_success").read_text())
    first = data["interactions"][0]["response"]
    assert first["status"]["code"] == 429
    assert first["headers"]["retry-after-ms"] == ["1000"]
    assert data["interactions"][0]["request"]["uri"] == f"{CASSETTE_BASE_URL}/chat/completions"


_SECRET = re.compile(r"sk-[A-Za-z0-9]|Bearer\s", re.IGNORECASE)


@pytest.mark.parametrize("name", list_cassettes())
def test_cassette_holds_no_credentials(name: str) -> None:
    text = cassette_path(name).read_text()
    assert not _SECRET.search(text), f"{name} contains a key or bearer token"
    for interaction in yaml.safe_load(text)["interactions"]:
        for part in ("request", "response"):
            headers = {k.lower() for k in interaction[part].get("headers", {})}
            assert not headers & {
                "authorization",
                "openai-organization",
                "openai-project",
                "cookie",
                "set-cookie",
            }


def test_scrubbers_remove_keys_headers_and_host() -> None:
    from vcr.request import Request

    req = Request(
        "POST",
        "http://127.0.0.1:5555/v1/chat/completions?x=1",
        b'{"note": "key sk-proj-ABCdef123 here"}',
        {
            "Authorization": "Bearer sk-live-XYZ",
            "OpenAI-Organization": "org-1",
            "Host": "127.0.0.1:5555",
        },
    )
    out = scrub_request(req)
    assert out.uri == "http://chaos.invalid/v1/chat/completions?x=1"
    assert "Authorization" not in out.headers and "OpenAI-Organization" not in out.headers
    assert b"sk-" not in out.body and b"[REDACTED]" in out.body
    resp = {
        "headers": {"openai-organization": ["org"], "Set-Cookie": ["a=b"], "x-request-id": ["r"]},
        "body": {
            "string": b'{"error": {"message": "Incorrect API key provided: sk-wrong****-key."}}'
        },
    }
    scrubbed = scrub_response(resp)
    assert list(scrubbed["headers"]) == ["x-request-id"]
    assert b"sk-" not in scrubbed["body"]["string"]


def test_cassette_dir_is_the_repo_cassettes_folder() -> None:
    assert CASSETTE_DIR.name == "cassettes" and (CASSETTE_DIR / "openai_chat").is_dir()


def test_scrubber_removes_keys_that_do_not_start_with_sk() -> None:
    """Before: ?key= query parameters, x-goog-api-key, and non-sk- keys in bodies stayed."""
    from vcr.request import Request

    google = "AIzaSyA-" + "x" * 31
    req = Request(
        "POST",
        f"http://127.0.0.1:5555/v1beta/models:generate?key={google}&alt=json",
        b'{"api_key": "abc-123-secret", "model": "m", "note": "' + google.encode() + b'"}',
        {"x-goog-api-key": google, "X-Api-Key": "k2", "api-key": "k3"},
    )
    out = scrub_request(req)
    assert google not in out.uri and "alt=json" in out.uri and "key=%5BREDACTED%5D" in out.uri
    assert not any(h.lower() in {"x-goog-api-key", "x-api-key", "api-key"} for h in out.headers)
    assert b"abc-123-secret" not in out.body and google.encode() not in out.body
    assert b'"model": "m"' in out.body
