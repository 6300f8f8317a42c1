"""The seed's four scenarios (notebook Section 6), each run on a wrapped and an unwrapped app.

Each side has its own chaos server, so upstream calls are counted exactly per side and
the two sides run at the same time (the unwrapped side spends most of its time in the
SDK's backoff sleeps). Questions within a scenario run one after another, as one user
would ask them, except in the spike, where 150 arrive at once.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..chaos import ChaosServer
from .common import USER_TIMEOUT_S, RagApp, Reply, timed

__all__ = [
    "KNOWN_QUESTION",
    "SCENARIOS",
    "Row",
    "ScenarioResult",
    "ScenarioRun",
    "SideResult",
    "run_scenario",
    "steps_count",
]

SCENARIOS: dict[str, str] = {
    "normal": "Normal operation (no failures)",
    "transient": "Transient failures (60% of upstream requests fail)",
    "outage": "Complete outage (every upstream request fails)",
    "spike": "Traffic spike (150 concurrent requests, upstream capacity 10)",
}

NORMAL_QUESTIONS = (
    "What is a circuit breaker?",
    "Why add jitter to exponential backoff?",
    "What does a last-known-good cache serve?",
)
TRANSIENT_QUESTIONS = (
    "What is retrieval-augmented generation?",
    "Which errors are worth retrying?",
    "How does backpressure protect a service?",
    "What happens while a circuit is open?",
    "Why not retry a 401 error?",
)
KNOWN_QUESTION = "What is a circuit breaker?"
OUTAGE_QUESTIONS = (
    ("warm-up, before the outage", KNOWN_QUESTION),
    ("new", "How should retries be spaced?"),
    ("new", "What is a bounded request queue?"),
    ("known", KNOWN_QUESTION),
    ("new", "Brand new question: what is a vector store?"),
)
SPIKE_REQUESTS = 150
SPIKE_CAPACITY = 10
"""Requests the chaos server serves at once in the spike; more get 503 ("slow_down")."""
SPIKE_LATENCY = 0.1
SPIKE_TIMEOUT_S = 8.0
"""In the spike the user waits longer: 150 requests on 2 cores queue behind each other."""
TRANSIENT_ERROR_RATE = 0.6


@dataclass
class Row:
    """One question as the user experienced it, and what it cost upstream."""

    question: str
    answer: str
    source: str
    degraded: bool
    failed: bool
    age_s: float | None
    attempts: int
    upstream_calls: int
    latency_ms: float
    note: str = ""
    breaker: str | None = None
    error: str | None = None


@dataclass
class SideResult:
    """One app (wrapped or not) through one scenario."""

    wrapped: bool
    rows: list[Row] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    degraded: int = 0
    live: int = 0
    upstream_calls: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def upstream_per_request(self) -> float:
        return self.upstream_calls / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_rate"] = round(self.error_rate, 4)
        data["upstream_per_request"] = round(self.upstream_per_request, 3)
        return data


@dataclass
class ScenarioResult:
    name: str
    title: str
    framework: str
    wrapped: SideResult
    plain: SideResult
    wall_s: float = 0.0
    faults: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "framework": self.framework,
            "faults": self.faults,
            "wall_s": round(self.wall_s, 3),
            "wrapped": self.wrapped.as_dict(),
            "unwrapped": self.plain.as_dict(),
        }


Progress = Callable[[int], None]


def _attempts(app: RagApp) -> int:
    return sum(int(p.stats()["attempts"]) for k, p in app.policies().items() if k != "app")


def _breaker(app: RagApp) -> str | None:
    for policy in app.policies().values():
        if policy.breaker is not None:
            return policy.breaker.get_state().value
    return None


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)

    return {"p50": pick(0.5), "p95": pick(0.95), "max": round(ordered[-1], 1)}


def _tally(side: SideResult, replies: list[Reply], upstream: int) -> None:
    side.requests = len(replies)
    side.errors = sum(r.failed for r in replies)
    side.degraded = sum(r.degraded and not r.failed for r in replies)
    side.live = side.requests - side.errors - side.degraded
    side.upstream_calls = upstream
    side.sources = dict(Counter(r.source for r in replies))
    side.latency_ms = _percentiles([r.latency_s * 1000 for r in replies])


async def _ask(
    app: RagApp,
    server: ChaosServer | None,
    question: str,
    note: str = "",
    timeout: float = USER_TIMEOUT_S,
) -> tuple[Row, Reply]:
    before_up = server.stats()["requests"] if server is not None else 0
    before_att = _attempts(app)
    reply = await timed(lambda: app.aask(question), timeout)
    upstream = server.stats()["requests"] - before_up if server is not None else -1
    attempts = _attempts(app) - before_att if app.wrapped else upstream
    row = Row(
        question=question,
        answer=reply.answer,
        source=reply.source,
        degraded=reply.degraded,
        failed=reply.failed,
        age_s=None if reply.age_s is None else round(float(reply.age_s), 2),
        attempts=attempts,
        upstream_calls=upstream,
        latency_ms=round(reply.latency_s * 1000, 1),
        note=note,
        breaker=_breaker(app),
        error=reply.error,
    )
    return row, reply


async def _sequence(
    app: RagApp,
    server: ChaosServer | None,
    steps: list[tuple[str, str, dict[str, Any] | None]],
    progress: Progress,
    timeout: float = USER_TIMEOUT_S,
) -> SideResult:
    """Ask questions in order; a step's faults (if any) are set just before it."""
    side = SideResult(wrapped=app.wrapped)
    replies: list[Reply] = []
    upstream = 0
    for note, question, faults in steps:
        if faults is not None and server is not None:
            server.set_faults(**faults)
        row, reply = await _ask(app, server, question, note, timeout)
        side.rows.append(row)
        replies.append(reply)
        upstream += max(0, row.upstream_calls)
        progress(1)
    _tally(side, replies, upstream)
    return side


async def _spike(
    app: RagApp, server: ChaosServer, progress: Progress, timeout: float = SPIKE_TIMEOUT_S
) -> SideResult:
    server.set_faults(latency=SPIKE_LATENCY, max_concurrency=SPIKE_CAPACITY)
    limit = app.policies()["app"].limit if app.wrapped else None
    peaks = {"in_flight": 0, "waiting": 0}
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            if limit is not None:
                peaks["in_flight"] = max(peaks["in_flight"], limit.in_flight)
                peaks["waiting"] = max(peaks["waiting"], limit.waiting)
            await asyncio.sleep(0.005)

    async def one(i: int) -> Reply:
        reply = await timed(
            lambda: app.aask(f"Burst question {i}: how does backpressure work?"), timeout
        )
        progress(1)
        return reply

    before = server.stats()
    before_att = _attempts(app)
    watcher = asyncio.create_task(watch())
    replies = await asyncio.gather(*(one(i) for i in range(SPIKE_REQUESTS)))
    done.set()
    await watcher
    await asyncio.to_thread(server.wait_idle)  # the server counts a request after answering
    after = server.stats()
    side = SideResult(wrapped=app.wrapped)
    _tally(side, list(replies), after["requests"] - before["requests"])
    rejected_upstream = after["faults"].get("concurrency_rejected", 0) - before["faults"].get(
        "concurrency_rejected", 0
    )
    groups: dict[str, list[Reply]] = {}
    for reply in replies:
        groups.setdefault(reply.source, []).append(reply)
    for source, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        first = members[0]
        lat = _percentiles([r.latency_s * 1000 for r in members])
        side.rows.append(
            Row(
                question=f"{len(members)} of {SPIKE_REQUESTS} requests",
                answer=first.answer,
                source=source,
                degraded=first.degraded,
                failed=first.failed,
                age_s=None,
                attempts=0,
                upstream_calls=-1,
                latency_ms=lat.get("p50", 0.0),
                note=f"p50 {lat.get('p50', 0):.0f} ms, max {lat.get('max', 0):.0f} ms",
                error=first.error,
            )
        )
    side.extra = {
        "upstream_rejected_busy": rejected_upstream,
        "upstream_max_in_flight": after["max_in_flight"],
        "attempts": (_attempts(app) - before_att) if app.wrapped else side.upstream_calls,
    }
    if limit is not None:
        stats = app.policies()["app"].stats()
        side.extra.update(
            limit_max_concurrency=limit.max_concurrency,
            limit_max_waiting=limit.max_waiting,
            peak_in_flight=peaks["in_flight"],
            peak_waiting=peaks["waiting"],
            rejected_by_limit=int(stats["rejections"]),
        )
    return side


def _steps(name: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    if name == "normal":
        return [("", q, None) for q in NORMAL_QUESTIONS]
    if name == "transient":
        rate: dict[str, Any] = {"error_rate": TRANSIENT_ERROR_RATE, "status": 500}
        return [("", q, rate if i == 0 else None) for i, q in enumerate(TRANSIENT_QUESTIONS)]
    if name == "outage":
        steps: list[tuple[str, str, dict[str, Any] | None]] = []
        for i, (note, question) in enumerate(OUTAGE_QUESTIONS):
            outage: dict[str, Any] | None = (
                {"outage": True, "outage_status": 500} if i == 1 else None
            )
            steps.append((note, question, outage))
        return steps
    raise ValueError(f"scenario must be one of {sorted(SCENARIOS)}, got {name!r}")


FAULTS_DESCRIPTION: dict[str, dict[str, Any]] = {
    "normal": {},
    "transient": {"error_rate": TRANSIENT_ERROR_RATE, "status": 500},
    "outage": {"outage": True, "outage_status": 500, "after_question": 1},
    "spike": {
        "requests": SPIKE_REQUESTS,
        "max_concurrency": SPIKE_CAPACITY,
        "latency_s": SPIKE_LATENCY,
    },
}


class ScenarioRun:
    """One scenario on a wrapped and an unwrapped app: `build()` (servers and apps, with
    faults off), then `run()`. Building is separate so that several scenarios can be built
    one after another and then run at the same time without their setup skewing latencies.

    With `real`, only the normal scenario runs, against `real_base_url` (None: the SDK's
    default, the OpenAI API), and upstream calls are not counted.
    """

    def __init__(
        self,
        name: str,
        framework: str,
        make_app: Callable[[str | None, bool], RagApp],
        *,
        seed: int,
        real: bool = False,
        real_base_url: str | None = None,
        user_timeout: float = USER_TIMEOUT_S,
        spike_timeout: float = SPIKE_TIMEOUT_S,
    ) -> None:
        if name not in SCENARIOS:
            raise ValueError(f"scenario must be one of {sorted(SCENARIOS)}, got {name!r}")
        if real and name != "normal":
            raise ValueError("--real runs the normal scenario only")
        self.name = name
        self.framework = framework
        self.make_app = make_app
        self.seed = seed
        self.real = real
        self.real_base_url = real_base_url
        self.user_timeout = user_timeout
        self.spike_timeout = spike_timeout
        self.servers: list[ChaosServer | None] = [None, None]
        self.apps: list[RagApp] = []

    def build(self) -> None:
        if self.real:
            urls: list[str | None] = [self.real_base_url, self.real_base_url]
        else:
            for i in range(2):
                server = ChaosServer(seed=self.seed, embedding_dim=256)
                self.servers[i] = server.start()
            urls = [s.base_url if s is not None else None for s in self.servers]
        self.apps = [self.make_app(urls[0], True), self.make_app(urls[1], False)]

    async def prime(self) -> None:
        """Ask each app one throwaway question, so the first timed row does not pay for
        the async HTTP client's setup (it must happen in the running event loop)."""
        for app in self.apps:
            await timed(functools.partial(app.aask, "Warm-up question"), 30.0)

    def close(self) -> None:
        for server in self.servers:
            if server is not None:
                server.stop()

    async def run(self, progress: Progress) -> ScenarioResult:
        if not self.apps:
            await asyncio.to_thread(self.build)
        started = time.perf_counter()
        pairs = list(zip(self.apps, self.servers, strict=True))
        try:
            if self.name == "spike":
                # One side after the other: 300 concurrent requests on 2 cores would
                # measure the event loop, not the apps.
                sides = []
                for app, server in pairs:
                    assert server is not None
                    sides.append(await _spike(app, server, progress, self.spike_timeout))
            else:
                sides = list(
                    await asyncio.gather(
                        *(
                            _sequence(a, s, _steps(self.name), progress, self.user_timeout)
                            for a, s in pairs
                        )
                    )
                )
        finally:
            self.close()
        return ScenarioResult(
            self.name,
            SCENARIOS[self.name],
            self.framework,
            sides[0],
            sides[1],
            time.perf_counter() - started,
            {} if self.real else FAULTS_DESCRIPTION[self.name],
        )


async def run_scenario(
    name: str,
    framework: str,
    make_app: Callable[[str | None, bool], RagApp],
    *,
    seed: int,
    progress: Progress,
    real_base_url: str | None = None,
    real: bool = False,
) -> ScenarioResult:
    """Build and run one scenario (see `ScenarioRun`)."""
    run = ScenarioRun(name, framework, make_app, seed=seed, real=real, real_base_url=real_base_url)
    return await run.run(progress)


def steps_count(name: str) -> int:
    """Progress units (answered questions, both sides) of one scenario."""
    if name == "spike":
        return 2 * SPIKE_REQUESTS
    return 2 * len(_steps(name))
