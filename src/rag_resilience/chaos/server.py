"""`ChaosServer`: an OpenAI-compatible HTTP/1.1 server on loopback that fails on purpose.

A hand-written asyncio server (keep-alive, Content-Length, chunked SSE) in a daemon thread:
no framework, so it serves thousands of small requests per second and can misbehave at
the byte level (drop a connection, stall, cut a stream mid-body) the way real networks do.
Latency and stalls are awaited per connection, so they never block other clients, and
`stop()` cancels every connection, stalled or not.

Fault decisions for a request are taken under one lock in a fixed order (concurrency gate,
rate limit, outage, fail-next, drop-next, stall, one seeded random draw), so the same seed
and the same request sequence give the same faults.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from . import responses
from .faults import ERROR_KINDS, ErrorKind, Faults, error_body, resolve_kind
from .ratelimits import RateLimits, request_cost

__all__ = ["ChaosServer", "FaultEvent"]

_JSON_HEADERS = (("content-type", "application/json"),)
_MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class FaultEvent:
    """One injected fault, passed to the `on_fault` callback (the CLI prints these)."""

    endpoint: str
    fault: str
    status: int | None
    request_id: str
    detail: str = ""

    def __str__(self) -> str:
        status = f" -> {self.status}" if self.status is not None else ""
        detail = f" ({self.detail})" if self.detail else ""
        return f"[{self.request_id}] {self.endpoint}: {self.fault}{status}{detail}"


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass
class _Decision:
    action: str  # "ok" | "error" | "drop" | "stall" | "rate_limited" | "rejected"
    kind: ErrorKind | None = None
    fault: str = ""
    wait: float = 0.0
    latency: float = 0.0


class _EndpointStats:
    __slots__ = ("faults", "requests", "statuses", "successes")

    def __init__(self) -> None:
        self.requests = 0
        self.successes = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "successes": self.successes,
            "faults": dict(self.faults),
            "faults_total": sum(self.faults.values()),
            "statuses": dict(self.statuses),
        }


def _endpoint_of(method: str, path: str) -> str | None:
    if path in ("/v1/embeddings", "/embeddings"):
        return "embeddings"
    if path in ("/v1/chat/completions", "/chat/completions"):
        return "chat"
    if path.startswith(("/v1/models", "/models")):
        return "models"
    return None


class ChaosServer:
    """OpenAI-compatible fault-injecting server; use as a context manager.

    >>> with ChaosServer(seed=1, error_rate=0.2) as server:
    ...     client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)

    Fault settings can be given as keyword arguments (any `Faults` field) or as `faults=`.
    `clock` drives the rate limiter only (default: real monotonic time); pass a FakeClock
    to make Retry-After arithmetic exact in tests. Latency always uses real time.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        embedding_dim: int = 1536,
        on_fault: Callable[[FaultEvent], None] | None = None,
        clock: Clock | None = None,
        **fault_settings: Any,
    ) -> None:
        if not isinstance(embedding_dim, int) or not 1 <= embedding_dim <= 8192:
            raise ValueError(f"embedding_dim must be between 1 and 8192, got {embedding_dim!r}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {port!r}")
        base = faults if faults is not None else Faults()
        self._initial = base.replace(**fault_settings) if fault_settings else base
        self.seed = seed
        self.host = host
        self._requested_port = port
        self.embedding_dim = embedding_dim
        self.on_fault = on_fault
        self._clock = clock if clock is not None else SYSTEM_CLOCK

        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._port: int | None = None
        self._startup_error: BaseException | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._stall_event: asyncio.Event | None = None
        # Gauges of requests being handled now: a reset must not zero them, or requests
        # still in flight would drive them negative when they finish.
        self._in_flight = 0
        self._stalled = 0
        self._reset_state(self._initial)

    # ----------------------------------------------------------------- state
    def _reset_state(self, faults: Faults) -> None:
        self._faults = faults
        self._table = faults.random_table()
        self._fail_next = faults.fail_next
        self._drop_next = faults.drop_next
        self._bad_body_next = faults.bad_body_next
        self._rng = random.Random(self.seed)
        self._seq = 0
        self._requests = 0
        self._successes = 0
        self._fault_counts: collections.Counter[str] = collections.Counter()
        self._statuses: collections.Counter[int] = collections.Counter()
        self._endpoints = {name: _EndpointStats() for name in ("embeddings", "chat", "models")}
        self._max_in_flight = self._in_flight  # the peak from now on
        self._limits = RateLimits()

    @property
    def faults(self) -> Faults:
        """The current fault configuration."""
        return self._faults

    def set_faults(self, faults: Faults | None = None, /, **changes: Any) -> Faults:
        """Replace the configuration (`faults`) and/or change some settings; returns the result.

        Setting `fail_next`/`drop_next` (re)starts that countdown. Clearing `stall` and
        `stall_rate` releases stalled requests, which then get a normal answer.
        """
        with self._lock:
            new = faults if faults is not None else self._faults
            if changes:
                new = new.replace(**changes)
            self._faults = new
            self._table = new.random_table()
            if faults is not None or "fail_next" in changes:
                self._fail_next = new.fail_next
            if faults is not None or "drop_next" in changes:
                self._drop_next = new.drop_next
            if faults is not None or "bad_body_next" in changes:
                self._bad_body_next = new.bad_body_next
        self._notify_loop()
        return new

    def clear_faults(self) -> Faults:
        """No faults at all (counters are kept; see `reset`)."""
        return self.set_faults(Faults())

    def reset(self) -> None:
        """Back to the constructor's faults, fresh counters, RNG re-seeded, stalls released.

        Requests still being handled stay counted in `in_flight` until they finish; see
        `wait_idle`."""
        with self._lock:
            self._reset_state(self._initial)
        self._notify_loop()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait (real time) until no request is in flight; False if some still are after
        `timeout` seconds. A client can hold its answer a moment before the server counts
        the request done, and a reset lets stalled requests finish in the background."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._in_flight == 0:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    def stats(self) -> dict[str, Any]:
        """Counters: requests, successes, faults by kind, HTTP statuses, per endpoint, in flight;
        `rate_limits`: tokens the rate-limit buckets charged to admitted requests, 429s by bucket."""
        with self._lock:
            return {
                "requests": self._requests,
                "successes": self._successes,
                "faults": dict(self._fault_counts),
                "faults_total": sum(self._fault_counts.values()),
                "statuses": dict(self._statuses),
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "stalled": self._stalled,
                "fail_next_remaining": self._fail_next,
                "drop_next_remaining": self._drop_next,
                "endpoints": {k: v.snapshot() for k, v in self._endpoints.items()},
                "rate_limits": self._limits.stats(),
            }

    # ------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ChaosServer is not running; call start() or use `with`")
        return self._port

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:PORT (control endpoints live under /_chaos/)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL ending in /v1, for `openai.OpenAI(base_url=...)`."""
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ChaosServer:
        """Start serving in a daemon thread; returns once the port is bound."""
        if self.running:
            return self
        ready = threading.Event()
        self._startup_error = None
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="rag-resilience-chaos", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("ChaosServer did not start within 10 s")
        if self._startup_error is not None:
            self._thread = None
            raise self._startup_error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving; stalled and streaming connections are cut. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        self._port = None

    def serve_forever(self) -> None:
        """Run until KeyboardInterrupt (the CLI's foreground mode)."""
        self.start()
        try:
            while self.running:
                time.sleep(0.2)
        finally:
            self.stop()

    def __enter__(self) -> ChaosServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.base_url if self._port is not None else "stopped"
        return f"ChaosServer({where}, seed={self.seed})"

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._stall_event = asyncio.Event()
            self._server = loop.run_until_complete(
                asyncio.start_server(
                    self._handle_conn, self.host, self._requested_port, limit=1024 * 1024
                )
            )
            self._port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:
            self._startup_error = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.close()
            self._loop = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2)
        for fut in self._waiters:
            fut.cancel()
        self._waiters.clear()

    def _notify_loop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._on_faults_changed()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_faults_changed)

    def _on_faults_changed(self) -> None:
        faults = self._faults
        if not faults.stall and faults.stall_rate == 0 and self._stall_event is not None:
            self._stall_event.set()
            self._stall_event = asyncio.Event()
        self._pump()

    # ------------------------------------------------------------ connection
    async def _handle_conn(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    break
                keep = await self._dispatch(request, writer)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            # stop() cancels connections; finishing normally keeps asyncio's stream
            # callback (which calls task.exception()) from logging a spurious traceback.
            writer.transport.abort()
        except ValueError:
            with contextlib.suppress(ConnectionError):
                await self._write(writer, 400, _JSON_HEADERS, b'{"error":"bad request"}', False)
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise ValueError("malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(chunks)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if not 0 <= length <= _MAX_BODY:
                raise ValueError("bad content-length")
            body = await reader.readexactly(length)
        conn = headers.get("connection", "").lower()
        keep_alive = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        return _Request(method.upper(), target.split("?", 1)[0], headers, body, keep_alive)

    async def _write(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        headers: tuple[tuple[str, str], ...] | list[tuple[str, str]],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        lines = [f"HTTP/1.1 {status} {phrase}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"content-length: {len(body)}")
        lines.append("connection: keep-alive" if keep_alive else "connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    # --------------------------------------------------------------- routing
    async def _dispatch(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        if req.path.startswith("/_chaos/"):
            status, payload = self._control(req)
            body = json.dumps(payload).encode()
            await self._write(writer, status, _JSON_HEADERS, body, req.keep_alive)
            return req.keep_alive
        endpoint = _endpoint_of(req.method, req.path)
        if endpoint is None:
            kind = ErrorKind("not_found", 404, "invalid_request_error", None, "")
            payload = error_body(kind)
            payload["error"]["message"] = f"Invalid URL ({req.method} {req.path})"
            await self._write(
                writer, 404, _JSON_HEADERS, json.dumps(payload).encode(), req.keep_alive
            )
            return req.keep_alive
        return await self._api(req, endpoint, writer)

    def _control(self, req: _Request) -> tuple[int, dict[str, Any]]:
        name = req.path[len("/_chaos/") :].strip("/")
        try:
            if name == "stats" and req.method == "GET":
                return 200, self.stats()
            if name == "faults" and req.method == "GET":
                return 200, {"faults": self._faults.to_dict()}
            if name == "faults" and req.method in ("POST", "PUT", "PATCH"):
                data = json.loads(req.body or b"{}")
                if not isinstance(data, dict):
                    raise ValueError("body must be a JSON object of fault settings")
                if req.method == "PUT" or data.pop("replace", False):
                    new = self.set_faults(Faults.from_dict(data))
                else:
                    new = self.set_faults(**_coerce_changes(data))
                return 200, {"faults": new.to_dict()}
            if name == "reset" and req.method == "POST":
                self.reset()
                return 200, {"reset": True, "faults": self._faults.to_dict()}
            if name == "health":
                return 200, {"ok": True}
        except (ValueError, TypeError) as exc:
            return 400, {"error": {"message": str(exc), "type": "invalid_request_error"}}
        return 404, {"error": {"message": f"unknown control endpoint {req.method} {req.path}"}}

    # ------------------------------------------------------------ API calls
    def _next_id(self) -> str:
        self._seq += 1
        digest = hashlib.blake2b(f"{self.seed}:{self._seq}".encode(), digest_size=16)
        return "req_" + digest.hexdigest()

    def _decide(self, endpoint: str, req: _Request) -> tuple[str, Faults, _Decision]:
        """Count the request and take every fault decision for it, atomically."""
        faults = self._faults
        cost = 1
        if faults.rate_limit_tpm is not None and faults.applies_to(endpoint):
            cost = request_cost(endpoint, req.body)  # parsed outside the lock
        with self._lock:
            faults = self._faults
            request_id = self._next_id()
            self._requests += 1
            self._endpoints[endpoint].requests += 1
            draw = self._rng.random()
            jitter = self._rng.random() * faults.latency_jitter if faults.latency_jitter else 0.0
            if not faults.applies_to(endpoint):
                return request_id, faults, _Decision("ok")
            latency = faults.latency + jitter
            if RateLimits.enabled(faults):
                key = RateLimits.key_of(req.headers.get("authorization"))
                wait, which = self._limits.take(faults, key, cost, self._clock.monotonic())
                if wait > 0:
                    kind = ERROR_KINDS["rate_limit_tokens" if which == "tokens" else "rate_limit"]
                    return request_id, faults, _Decision("rate_limited", kind, "rate_limited", wait)
            if faults.outage:
                kind = resolve_kind(faults.outage_status)
                return request_id, faults, _Decision("error", kind, "outage", latency=latency)
            if self._fail_next > 0:
                self._fail_next -= 1
                kind = resolve_kind(faults.fail_next_status)
                return request_id, faults, _Decision("error", kind, "fail_next", latency=latency)
            if self._drop_next > 0:
                self._drop_next -= 1
                return request_id, faults, _Decision("drop", None, "drop_next", latency=latency)
            if faults.stall:
                return request_id, faults, _Decision("stall", None, "stall", latency=latency)
            for bound, action, kind_or_none in self._table:
                if draw < bound:
                    name = kind_or_none.name if kind_or_none is not None else action
                    return (
                        request_id,
                        faults,
                        _Decision(action, kind_or_none, name, latency=latency),
                    )
            return request_id, faults, _Decision("ok", latency=latency)

    def _ratelimit_headers(self, faults: Faults, req: _Request) -> list[tuple[str, str]]:
        """Rate-limit headers for `req`'s API key (call under the lock)."""
        key = RateLimits.key_of(req.headers.get("authorization"))
        # the wall clock first: a stamp is then never later than the bucket state it
        # reports (a clock moved between the reads would make every reset look longer)
        wall = self._clock.time() + faults.clock_offset
        return self._limits.headers(faults, key, self._clock.monotonic(), wall)

    def _record(
        self, endpoint: str, request_id: str, status: int | None, fault: str = "", detail: str = ""
    ) -> None:
        with self._lock:
            ep = self._endpoints[endpoint]
            if status is not None:
                self._statuses[status] += 1
                ep.statuses[status] += 1
            if fault:
                self._fault_counts[fault] += 1
                ep.faults[fault] += 1
            elif status == 200:
                self._successes += 1
                ep.successes += 1
        if fault and self.on_fault is not None:
            with contextlib.suppress(Exception):
                self.on_fault(FaultEvent(endpoint, fault, status, request_id, detail))

    async def _acquire(self, limit: int | None, mode: str) -> bool:
        if limit is None or (self._in_flight < limit and not self._waiters):
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            return True
        if mode == "reject":
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()
            raise
        return True

    def _release(self) -> None:
        self._in_flight -= 1
        self._pump()

    def _pump(self) -> None:
        limit = self._faults.max_concurrency
        while self._waiters and (limit is None or self._in_flight < limit):
            fut = self._waiters.popleft()
            if fut.done():
                continue
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            fut.set_result(None)

    async def _api(self, req: _Request, endpoint: str, writer: asyncio.StreamWriter) -> bool:
        started = time.perf_counter()
        request_id, faults, decision = self._decide(endpoint, req)
        applies = faults.applies_to(endpoint)
        limit = faults.max_concurrency if applies else None
        if not await self._acquire(limit, faults.concurrency_mode):
            kind = ERROR_KINDS["slow_down"]
            self._record(endpoint, request_id, kind.status, "concurrency_rejected")
            await self._send_error(writer, req, kind, request_id, faults, faults.retry_after)
            return req.keep_alive
        try:
            return await self._api_admitted(
                req, endpoint, writer, request_id, faults, decision, started
            )
        finally:
            self._release()

    async def _api_admitted(
        self,
        req: _Request,
        endpoint: str,
        writer: asyncio.StreamWriter,
        request_id: str,
        faults: Faults,
        decision: _Decision,
        started: float,
    ) -> bool:
        if decision.action == "rate_limited":
            assert decision.kind is not None
            self._record(
                endpoint, request_id, 429, "rate_limited", f"retry after {decision.wait:.3f}s"
            )
            await self._send_error(
                writer, req, decision.kind, request_id, faults, decision.wait, both=True
            )
            return req.keep_alive
        if decision.action == "stall":
            self._record(endpoint, request_id, None, decision.fault)
            await self._stall()
        if decision.latency > 0:
            await asyncio.sleep(decision.latency)
        if decision.action == "drop":
            self._record(endpoint, request_id, None, decision.fault)
            return False
        if decision.action == "error":
            assert decision.kind is not None
            self._record(
                endpoint, request_id, decision.kind.status, decision.fault, decision.kind.name
            )
            retry_after = faults.retry_after if decision.kind.retry_after else None
            await self._send_error(writer, req, decision.kind, request_id, faults, retry_after)
            return req.keep_alive
        return await self._answer(req, endpoint, writer, request_id, faults, started)

    async def _stall(self) -> None:
        with self._lock:
            self._stalled += 1
        try:
            while True:
                faults = self._faults
                if not faults.stall and faults.stall_rate == 0:
                    return
                event = self._stall_event
                assert event is not None
                await event.wait()
        finally:
            with self._lock:
                self._stalled -= 1

    async def _send_error(
        self,
        writer: asyncio.StreamWriter,
        req: _Request,
        kind: ErrorKind,
        request_id: str,
        faults: Faults,
        retry_after: float | None,
        both: bool = False,
    ) -> None:
        model, key = "gpt-4o-mini", None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            model = str(json.loads(req.body or b"{}").get("model") or model)
        auth = req.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        limit: int = faults.burst if faults.rate_limit_rps else 60
        if kind.name == "rate_limit_tokens":
            limit = faults.token_burst
        body = error_body(
            kind,
            model=model,
            wait=retry_after if retry_after is not None else 1.0,
            limit=limit,
            api_key=key,
            request_id=request_id,
            param="input"
            if kind.name == "context_length_exceeded" and "embeddings" in req.path
            else None,
        )
        headers = [
            ("content-type", "application/json; charset=utf-8"),
            ("x-request-id", request_id),
        ]
        with self._lock:
            headers += self._ratelimit_headers(faults, req)
        if retry_after is not None:
            mode = "both" if both else faults.retry_after_header
            if mode in ("both", "ms"):
                headers.append(("retry-after-ms", str(math.ceil(retry_after * 1000))))
            if mode in ("both", "seconds"):
                seconds = math.ceil(retry_after) if both else retry_after
                headers.append(("retry-after", f"{seconds:g}"))
        await self._write(writer, kind.status, headers, json.dumps(body).encode(), req.keep_alive)

    def _base_headers(
        self, request_id: str, faults: Faults, started: float, req: _Request
    ) -> list[tuple[str, str]]:
        with self._lock:
            ratelimit = self._ratelimit_headers(faults, req)
        elapsed = max(1, round((time.perf_counter() - started) * 1000))
        return [
            ("x-request-id", request_id),
            ("openai-processing-ms", str(elapsed)),
            ("openai-version", "2020-10-01"),
            *ratelimit,
        ]

    async def _answer(
        self,
        req: _Request,
        endpoint: str,
        writer: asyncio.StreamWriter,
        request_id: str,
        faults: Faults,
        started: float,
    ) -> bool:
        try:
            if endpoint == "models":
                payload: dict[str, Any] = {}
                result: Any = responses.models_response()
                if req.path.rstrip("/") not in ("/v1/models", "/models"):
                    model_id = req.path.rstrip("/").rsplit("/", 1)[-1]
                    result = {
                        "id": model_id,
                        "object": "model",
                        "created": 1_700_000_000,
                        "owned_by": "system",
                    }
            else:
                if req.method != "POST":
                    raise ValueError(f"{req.method} is not allowed here; use POST")
                payload = json.loads(req.body or b"{}")
                if not isinstance(payload, dict):
                    raise ValueError("request body must be a JSON object")
                completion_id = "chatcmpl-" + request_id[4:28]
                if endpoint == "embeddings":
                    result = responses.embeddings_response(payload, self.embedding_dim)
                elif payload.get("stream"):
                    events = responses.chat_stream_events(payload, completion_id)
                    return await self._stream(
                        req, endpoint, writer, request_id, faults, started, events
                    )
                else:
                    result = responses.chat_completion(payload, completion_id)
        except (ValueError, TypeError, AttributeError) as exc:
            kind = ErrorKind("invalid_request", 400, "invalid_request_error", None, str(exc))
            body = error_body(kind)
            headers = [("content-type", "application/json"), ("x-request-id", request_id)]
            self._record(endpoint, request_id, 400)
            await self._write(writer, 400, headers, json.dumps(body).encode(), req.keep_alive)
            return req.keep_alive
        body_bytes = json.dumps(result, separators=(",", ":")).encode()
        content_type = "application/json"
        broken = self._take_bad_body(faults, endpoint)
        if broken == "truncated":
            body_bytes = body_bytes[: len(body_bytes) // 2]
        elif broken == "text":
            content_type = "text/plain; charset=utf-8"
            body_bytes = b"upstream gateway: service temporarily unavailable, try again"
        headers = [
            ("content-type", content_type),
            *self._base_headers(request_id, faults, started, req),
        ]
        await self._write(writer, 200, headers, body_bytes, req.keep_alive)
        self._record(endpoint, request_id, 200, f"bad_body_{broken}" if broken else "")
        return req.keep_alive

    def _take_bad_body(self, faults: Faults, endpoint: str) -> str | None:
        """The `bad_body` kind if this 200 answer is to be broken (counts `bad_body_next` down)."""
        if not faults.applies_to(endpoint):
            return None
        with self._lock:
            if self._bad_body_next <= 0:
                return None
            self._bad_body_next -= 1
        return faults.bad_body

    async def _stream(
        self,
        req: _Request,
        endpoint: str,
        writer: asyncio.StreamWriter,
        request_id: str,
        faults: Faults,
        started: float,
        events: list[dict[str, Any]],
    ) -> bool:
        headers = [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
            *self._base_headers(request_id, faults, started, req),
            ("transfer-encoding", "chunked"),
            ("connection", "keep-alive" if req.keep_alive else "close"),
        ]
        head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        writer.write(head.encode("latin-1"))
        cut = faults.stream_break_after if faults.applies_to(endpoint) else None
        frames = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n".encode() for e in events] + [
            b"data: [DONE]\n\n"
        ]
        for i, frame in enumerate(frames):
            if cut is not None and i >= cut:
                self._record(endpoint, request_id, 200, "stream_break", f"after {cut} events")
                await writer.drain()
                return False
            writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        self._record(endpoint, request_id, 200)
        return req.keep_alive


def _coerce_changes(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    if isinstance(out.get("endpoints"), list):
        out["endpoints"] = tuple(out["endpoints"])
    return out
