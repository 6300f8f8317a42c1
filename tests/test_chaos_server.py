"""The chaos server observed through the real openai SDK (max_retries=0: one HTTP call each)."""

from __future__ import annotations

import base64
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from rag_resilience.chaos import ChaosServer, Faults
from rag_resilience.testing import FakeClock

pytest_plugins = ["rag_resilience.chaos.pytest_plugin"]

MSG = [{"role": "user", "content": "What is a circuit breaker?"}]


_CLIENTS: dict[tuple[str, float], openai.OpenAI] = {}


def client(server: ChaosServer, timeout: float = 10.0) -> openai.OpenAI:
    """A cached SDK client per server (building one costs more than a hundred requests)."""
    key = (server.base_url, timeout)
    if key not in _CLIENTS:
        _CLIENTS[key] = openai.OpenAI(
            base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=timeout
        )
    return _CLIENTS[key]


def chat(server: ChaosServer) -> int:
    """One chat call; returns the HTTP status the SDK saw."""
    try:
        client(server).chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


def settled(server: ChaosServer) -> dict[str, Any]:
    """The server's counters once nothing is in flight: it counts a request done after
    writing its answer, so a client can hold the answer before the count moves."""
    assert server.wait_idle()
    return server.stats()


# ----------------------------------------------------------------- success shapes
def test_embeddings_default_base64_float_and_dimensions(chaos_server: ChaosServer) -> None:
    c = client(chaos_server)
    r = c.embeddings.create(
        input=["hello world", "circuit breaker"], model="text-embedding-3-small"
    )
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 1536
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens
    f = c.embeddings.create(
        input="hello world", model="text-embedding-3-small", encoding_format="float"
    )
    assert f.data[0].embedding == pytest.approx(list(r.data[0].embedding), abs=1e-6)
    norm = sum(x * x for x in f.data[0].embedding) ** 0.5
    assert norm == pytest.approx(1.0, abs=1e-4)
    small = c.embeddings.create(input="x", model="m", dimensions=8, encoding_format="float")
    assert len(small.data[0].embedding) == 8


def test_embeddings_base64_is_little_endian_float32_and_tokens_accepted(
    chaos_server: ChaosServer,
) -> None:
    raw = httpx.post(
        f"{chaos_server.base_url}/embeddings",
        json={
            "input": [[1, 2, 3], [4, 5]],
            "model": "m",
            "encoding_format": "base64",
            "dimensions": 4,
        },
    )
    body = raw.json()
    assert raw.status_code == 200 and len(body["data"]) == 2
    vec = struct.unpack("<4f", base64.b64decode(body["data"][0]["embedding"]))
    assert sum(v * v for v in vec) == pytest.approx(1.0, abs=1e-4)
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}


def test_similar_texts_have_similar_vectors(chaos_server: ChaosServer) -> None:
    c = client(chaos_server)
    texts = ["retry with exponential backoff", "exponential backoff for retry", "pasta recipe"]
    vecs = [
        d.embedding
        for d in c.embeddings.create(input=texts, model="m", encoding_format="float").data
    ]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.3


def test_chat_answer_echoes_question_and_context(chaos_server: ChaosServer) -> None:
    r = client(chaos_server).chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "Context: breakers open after 5 failures."},
            {"role": "user", "content": "When does a breaker open?"},
        ],
    )
    text = r.choices[0].message.content or ""
    assert "When does a breaker open?" in text and "breakers open after 5 failures" in text
    assert r.choices[0].finish_reason == "stop" and r.usage is not None
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.model == "gpt-4o-mini"


def test_chat_stream_chunks_usage_and_done(chaos_server: ChaosServer) -> None:
    c = client(chaos_server)
    chunks = list(
        c.chat.completions.create(
            model="gpt-4o-mini",
            messages=MSG,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    full = c.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    raw = httpx.post(
        f"{chaos_server.base_url}/chat/completions",
        json={"model": "m", "messages": MSG, "stream": True},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")
    assert '"usage"' not in raw.text  # only with stream_options.include_usage


def test_models_and_headers_like_the_real_api(chaos_server: ChaosServer) -> None:
    c = client(chaos_server)
    assert "gpt-4o-mini" in [m.id for m in c.models.list()]
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
    h = raw.headers
    assert h["x-request-id"].startswith("req_")
    for name in ("limit", "remaining", "reset"):
        for what in ("requests", "tokens"):
            assert f"x-ratelimit-{name}-{what}" in h
    assert int(h["openai-processing-ms"]) >= 1


def test_max_tokens_truncates_with_finish_reason_length(chaos_server: ChaosServer) -> None:
    r = client(chaos_server).chat.completions.create(model="m", messages=MSG, max_tokens=3)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "length"
    assert len((r.choices[0].message.content or "").split()) == 3


# ------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("status", "exc_type", "code", "type_"),
    [
        (500, openai.InternalServerError, None, "server_error"),
        (502, openai.InternalServerError, 502, "cf_bad_gateway"),
        (503, openai.InternalServerError, None, "server_error"),
        (504, openai.InternalServerError, 504, "cf_gateway_timeout"),
        (429, openai.RateLimitError, "rate_limit_exceeded", "requests"),
        ("insufficient_quota", openai.RateLimitError, "insufficient_quota", "insufficient_quota"),
        (400, openai.BadRequestError, "context_length_exceeded", "invalid_request_error"),
        (401, openai.AuthenticationError, "invalid_api_key", "invalid_request_error"),
    ],
)
def test_each_error_kind_has_the_real_body(
    chaos_server: ChaosServer, status: int | str, exc_type: type, code: object, type_: str
) -> None:
    chaos_server.set_faults(error_rate=1.0, status=status)
    with pytest.raises(exc_type) as info:
        client(chaos_server).chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
    err = info.value
    assert isinstance(err.body, dict)
    assert set(err.body) == {"message", "type", "param", "code"}
    assert err.body["code"] == code and err.body["type"] == type_
    assert err.response.headers["x-request-id"].startswith("req_")
    stats = settled(chaos_server)
    assert stats["faults_total"] == 1 and stats["successes"] == 0


def test_invalid_api_key_message_masks_the_key(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(fail_next=1, fail_next_status=401)
    c = openai.OpenAI(
        base_url=chaos_server.base_url, api_key="sk-proj-abcdefghijkl1234", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as info:
        c.models.list()
    assert "sk-proj-****1234" in info.value.message
    assert "abcdefghijkl" not in info.value.message


def test_retry_after_headers_on_429_and_503(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(fail_next=3, fail_next_status=429, retry_after=2.5)
    for expected_status in (429,):
        with pytest.raises(openai.RateLimitError) as info:
            client(chaos_server).chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
        h = info.value.response.headers
        assert info.value.status_code == expected_status
        assert h["retry-after-ms"] == "2500" and h["retry-after"] == "2.5"
        assert "Please try again in 2.5s" in info.value.message
    chaos_server.set_faults(fail_next=1, fail_next_status=503, retry_after_header="seconds")
    with pytest.raises(openai.InternalServerError) as info2:
        client(chaos_server).models.list()
    assert info2.value.response.headers["retry-after"] == "2.5"
    assert "retry-after-ms" not in info2.value.response.headers
    chaos_server.set_faults(fail_next=1, fail_next_status=500)  # no Retry-After on 500
    with pytest.raises(openai.InternalServerError) as info3:
        client(chaos_server).models.list()
    assert "retry-after" not in info3.value.response.headers


def test_no_retry_after_header_unless_configured(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(fail_next=1, fail_next_status=429)
    with pytest.raises(openai.RateLimitError) as info:
        client(chaos_server).models.list()
    assert "retry-after" not in info.value.response.headers


def test_outage_on_and_off(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(outage=True)
    assert [chat(chaos_server) for _ in range(3)] == [503, 503, 503]
    chaos_server.set_faults(outage=False)
    assert chat(chaos_server) == 200
    s = settled(chaos_server)
    assert (
        s["faults"] == {"outage": 3} and s["successes"] == 1 and s["statuses"] == {503: 3, 200: 1}
    )
    assert s["endpoints"]["chat"]["faults"] == {"outage": 3}


def test_fail_next_counts_down(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(fail_next=3, fail_next_status=503)
    assert chaos_server.stats()["fail_next_remaining"] == 3
    assert [chat(chaos_server) for _ in range(5)] == [503, 503, 503, 200, 200]
    assert chaos_server.stats()["fail_next_remaining"] == 0


def test_latency_is_added_without_blocking_others(chaos_server: ChaosServer) -> None:
    """Latency is added to the chosen endpoint only, and a delayed request holds no one
    else up. Shown with stalls (held until released), not with timing: a loaded machine
    can make any upper time bound fail."""
    c = client(chaos_server)
    c.models.list()
    chaos_server.set_faults(latency=0.05, endpoints=("chat",))
    t0 = time.perf_counter()
    assert chat(chaos_server) == 200
    assert time.perf_counter() - t0 >= 0.05  # a lower bound only: load cannot break it
    chaos_server.set_faults(stall=True, endpoints=("chat",))
    threads, results = start_chats(chaos_server, 8)
    wait_until(lambda: chaos_server.stats()["stalled"] == 8)  # all 8 held at once
    assert c.models.list().data  # an endpoint without the fault answers meanwhile
    chaos_server.set_faults(stall=False)
    for t in threads:
        t.join(10)
    assert results == [200] * 8
    assert settled(chaos_server)["max_in_flight"] >= 8


def test_drop_connection_without_response(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(drop_next=1)
    with pytest.raises(openai.APIConnectionError):
        client(chaos_server).models.list()
    assert chat(chaos_server) == 200
    assert settled(chaos_server)["faults"] == {"drop_next": 1}
    chaos_server.set_faults(drop_rate=1.0)
    with pytest.raises(openai.APIConnectionError):
        client(chaos_server).models.list()
    assert settled(chaos_server)["faults"]["drop"] == 1


def test_stall_until_cleared_does_not_block_others(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(stall=True, endpoints=("chat",))
    with pytest.raises(openai.APITimeoutError):
        client(chaos_server, timeout=0.05).chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(chat(chaos_server)))
    t.start()
    wait_until(lambda: chaos_server.stats()["stalled"] == 2)
    assert client(chaos_server).models.list().data  # other endpoint still served
    assert done == []
    chaos_server.set_faults(stall=False)  # released stalls get a normal answer
    t.join(10)
    assert done == [200]
    assert settled(chaos_server)["faults"]["stall"] == 2


def test_stop_does_not_hang_with_stalled_connections(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    server = chaos_server_factory(stall=True)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client(server, timeout=5).models.list()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: server.stats()["stalled"] == 3)
    t0 = time.perf_counter()
    server.stop()
    # Not held until the clients give up (5 s): a bound far above any load-induced delay.
    assert time.perf_counter() - t0 < 4.0
    for t in threads:
        t.join(10)
    assert len(errors) == 3 and all(isinstance(e, openai.APIConnectionError) for e in errors)


def test_stream_breaks_after_k_chunks(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(stream_break_after=3)
    got = []
    with pytest.raises(httpx.RemoteProtocolError):
        for ch in client(chaos_server).chat.completions.create(
            model="m", messages=MSG, stream=True
        ):  # type: ignore[arg-type]
            got.append(ch)
    assert len(got) == 3
    assert settled(chaos_server)["faults"] == {"stream_break": 1}
    chaos_server.set_faults(stream_break_after=None)
    assert (
        len(
            list(client(chaos_server).chat.completions.create(model="m", messages=MSG, stream=True))
        )
        > 3
    )  # type: ignore[arg-type]


def test_rate_limiter_retry_after_is_exact_on_a_fake_clock(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    clock = FakeClock()
    server = chaos_server_factory(clock=clock, rate_limit_rps=4.0, rate_limit_burst=2)
    assert [chat(server), chat(server)] == [200, 200]
    with pytest.raises(openai.RateLimitError) as info:
        client(server).chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
    h = info.value.response.headers
    assert h["retry-after-ms"] == "250" and h["retry-after"] == "1"
    assert h["x-ratelimit-remaining-requests"] == "0" and h["x-ratelimit-limit-requests"] == "2"
    assert info.value.code == "rate_limit_exceeded"
    clock.advance(0.2)
    with pytest.raises(openai.RateLimitError) as info2:
        client(server).models.list()
    assert info2.value.response.headers["retry-after-ms"] == "50"
    clock.advance(0.05)
    assert chat(server) == 200  # waiting exactly Retry-After is enough
    assert settled(server)["faults"] == {"rate_limited": 2}


def test_rate_limiter_real_time_retry_after_is_honourable(
    chaos_server: ChaosServer,
) -> None:
    chaos_server.set_faults(rate_limit_rps=10.0, rate_limit_burst=1)
    assert chat(chaos_server) == 200
    with pytest.raises(openai.RateLimitError) as info:
        client(chaos_server).models.list()
    wait_ms = int(info.value.response.headers["retry-after-ms"])
    assert 0 < wait_ms <= 100
    time.sleep(wait_ms / 1000)
    assert chat(chaos_server) == 200


def start_chats(server: ChaosServer, n: int) -> tuple[list[threading.Thread], list[int]]:
    """`n` chat calls on their own threads, started; their statuses land in the list."""
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(chat(server))) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_max_concurrency_rejects_beyond_the_limit(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(max_concurrency=2, stall=True)
    threads, results = start_chats(chaos_server, 2)
    wait_until(lambda: chaos_server.stats()["in_flight"] == 2)
    with pytest.raises(openai.InternalServerError) as info:
        client(chaos_server).models.list()
    assert info.value.status_code == 503 and info.value.code == "slow_down"
    chaos_server.set_faults(stall=False)
    for t in threads:
        t.join(10)
    assert results == [200, 200]
    s = settled(chaos_server)
    assert s["max_in_flight"] == 2 and s["faults"]["concurrency_rejected"] == 1


def test_max_concurrency_queue_mode_serves_in_turn(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(max_concurrency=2, concurrency_mode="queue", latency=0.01)
    threads, results = start_chats(chaos_server, 6)
    for t in threads:
        t.join(10)
    assert results == [200] * 6
    s = settled(chaos_server)
    assert s["max_in_flight"] <= 2 and s["in_flight"] == 0 and s["faults_total"] == 0


def test_faults_only_on_chosen_endpoint(chaos_server: ChaosServer) -> None:
    chaos_server.set_faults(error_rate=1.0, status=500, endpoints=("embeddings",))
    assert chat(chaos_server) == 200
    with pytest.raises(openai.InternalServerError):
        client(chaos_server).embeddings.create(input="x", model="m")
    eps = settled(chaos_server)["endpoints"]
    assert eps["embeddings"]["faults"] == {"server_error": 1}
    assert eps["chat"]["successes"] == 1


# -------------------------------------------------------------------- determinism
def _sequence(server: ChaosServer, n: int) -> list[int]:
    return [chat(server) for _ in range(n)]


def test_same_seed_same_fault_sequence(chaos_server_factory: Callable[..., ChaosServer]) -> None:
    rates = {"error_rate": 0.3, "status": 503, "error_rates": {429: 0.2}}
    a = _sequence(chaos_server_factory(seed=42, **rates), 40)
    b = _sequence(chaos_server_factory(seed=42, **rates), 40)
    c = _sequence(chaos_server_factory(seed=43, **rates), 40)
    assert a == b and a != c
    assert {200, 503, 429} <= set(a)


def test_reset_restores_initial_faults_and_reseeds(
    chaos_server_factory: Callable[..., ChaosServer],
) -> None:
    server = chaos_server_factory(seed=5, error_rate=0.5)
    first = _sequence(server, 20)
    server.set_faults(outage=True)
    server.reset()
    assert server.faults == Faults(error_rate=0.5)
    assert server.stats()["requests"] == 0
    assert _sequence(server, 20) == first


# ----------------------------------------------------------------- control plane
def test_http_control_endpoints(chaos_server: ChaosServer) -> None:
    with httpx.Client(base_url=chaos_server.url) as http:
        r = http.post("/_chaos/faults", json={"fail_next": 2, "fail_next_status": 502})
        assert r.status_code == 200 and r.json()["faults"]["fail_next"] == 2
        assert [chat(chaos_server) for _ in range(3)] == [502, 502, 200]
        assert chaos_server.wait_idle()  # counted done after the answer: read once idle
        stats = http.get("/_chaos/stats").json()
        assert stats["faults"] == {"fail_next": 2} and stats["statuses"] == {"502": 2, "200": 1}
        bad = http.post("/_chaos/faults", json={"error_rate": 3})
        assert bad.status_code == 400 and "error_rate" in bad.json()["error"]["message"]
        assert http.post("/_chaos/faults", json={"nope": 1}).status_code == 400
        assert http.post("/_chaos/reset").status_code == 200
        assert http.get("/_chaos/stats").json()["requests"] == 0
        assert http.get("/v1/nothing").status_code == 404


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"status": 200}, "status"),
        ({"status": "teapot"}, "status"),
        ({"error_rate": 0.6, "drop_rate": 0.6}, "<= 1.0"),
        ({"fail_next": -1}, "fail_next"),
        ({"latency": -0.1}, "latency"),
        ({"rate_limit_rps": 0}, "rate_limit_rps"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"concurrency_mode": "drop"}, "concurrency_mode"),
        ({"endpoints": ("completions",)}, "endpoints"),
        ({"retry_after": -1}, "retry_after"),
    ],
)
def test_invalid_faults_raise_value_error_naming_the_parameter(
    kwargs: dict[str, object], param: str
) -> None:
    with pytest.raises(ValueError, match=param.replace("<", "\\<").replace(".", "\\.")):
        Faults(**kwargs)  # type: ignore[arg-type]


def test_set_faults_rejects_unknown_names(chaos_server: ChaosServer) -> None:
    with pytest.raises(ValueError, match="unknown fault setting"):
        chaos_server.set_faults(error_ratio=0.1)


def test_reset_keeps_counting_requests_still_in_flight(chaos_server: ChaosServer) -> None:
    """A reset while requests are stalled: they finish after it, and the in-flight gauge
    comes back to 0 (it used to be zeroed by the reset and end negative)."""
    chaos_server.set_faults(stall=True)
    threads, results = start_chats(chaos_server, 2)
    wait_until(lambda: chaos_server.stats()["stalled"] == 2)
    chaos_server.reset()  # releases the stall; the two are still being answered
    for t in threads:
        t.join(10)
    assert results == [200, 200]
    assert chaos_server.wait_idle()
    stats = chaos_server.stats()
    assert stats["in_flight"] == 0 and stats["stalled"] == 0
