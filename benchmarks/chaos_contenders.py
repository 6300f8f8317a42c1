"""The contenders of the chaos benchmark: what people use today, and ours.

Every contender talks to the chaos server with the real openai SDK over loopback, through
an httpx transport that records each upstream request (which user call sent it, when,
the status, any Retry-After). The harness tags the calling thread with the user call's
index; every library here makes its HTTP request from the calling thread in sync mode,
so requests are attributed exactly.

Time scaling: the benchmark compresses time by `time_scale` (0.1: one real-world second
lasts 0.1 s). Every library's own delays are scaled by the same factor so no contender
gains from it: the openai SDK's backoff constants, LlamaIndex's tenacity decorators,
LangChain's `with_retry` jitter parameters, the hand-rolled tenacity/pybreaker numbers
and our preset's delays, recovery times, deadline and attempt timeout.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

CHAT_MODEL = "gpt-4o-mini"
FALLBACK_MODEL = "gpt-3.5-turbo"
EMBED_MODEL = "text-embedding-3-small"
API_KEY = "sk-chaos-bench"

# The contenders, in table order: name -> one-line description for the report.
CONTENDERS: dict[str, str] = {
    "openai-sdk": "raw openai SDK, defaults (max_retries=2, honours Retry-After)",
    "langchain": "LangChain ChatOpenAI / OpenAIEmbeddings, defaults (SDK retries 2)",
    "langchain-retry-fb": "ChatOpenAI(max_retries=0).with_retry(stop_after_attempt=4)"
    ".with_fallbacks([ChatOpenAI(gpt-3.5-turbo)]); embeddings: RunnableLambda.with_retry",
    "llamaindex": "LlamaIndex OpenAI / OpenAIEmbedding, defaults (tenacity x SDK retries)",
    "tenacity-pybreaker": "hand-rolled: tenacity (4 attempts, random exp. backoff) around "
    "pybreaker (fail_max=5) around openai(max_retries=0, timeout)",
    "ours-openai": "ResilientOpenAIClient, balanced preset",
    "ours-langchain": "ResilientLLM(ChatOpenAI(max_retries=0)) / ResilientEmbeddings, balanced",
    "ours-llamaindex": "llama_index ResilientLLM(OpenAI(max_retries=0)) / ResilientEmbedding, balanced",
}
OURS = ("ours-openai", "ours-langchain", "ours-llamaindex")

# Thread-local tags set by the harness around each user call.
_local = threading.local()


def set_current_call(index: int | None) -> None:
    _local.call = index
    _local.served = None


def served_from() -> str | None:
    """What our policy's FALLBACK event said for the current thread's call (None: live)."""
    return getattr(_local, "served", None)


def _fallback_listener(event: Any) -> None:
    if str(getattr(event, "kind", "")) == "fallback":
        _local.served = event.served_from or "fallback"


# ------------------------------------------------------------------ upstream recording
@dataclass(slots=True)
class Upstream:
    """One HTTP request to the API: who sent it, when, what came back."""

    call: int | None
    t_send: float
    t_done: float
    status: int | None  # None: transport error (timeout, reset)
    retry_after: float | None


class Recorder:
    """Collects `Upstream` records from every transport of a run; thread-safe appends."""

    def __init__(self) -> None:
        self.records: list[Upstream] = []
        self._lock = threading.Lock()
        self.enabled = True

    def add(self, rec: Upstream) -> None:
        if self.enabled:
            with self._lock:
                self.records.append(rec)

    def clear(self) -> None:
        with self._lock:
            self.records = []


def _retry_after_of(headers: httpx.Headers) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    sec = headers.get("retry-after")
    if sec is not None:
        try:
            return float(sec)
        except ValueError:
            return None
    return None


class RecordingTransport(httpx.HTTPTransport):
    """httpx transport that records API requests (chat, embeddings) into a `Recorder`."""

    def __init__(self, recorder: Recorder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._recorder = recorder

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if not path.endswith(("/chat/completions", "/embeddings")):
            return super().handle_request(request)
        call = getattr(_local, "call", None)
        t0 = time.perf_counter()
        try:
            response = super().handle_request(request)
        except BaseException:
            self._recorder.add(Upstream(call, t0, time.perf_counter(), None, None))
            raise
        self._recorder.add(
            Upstream(
                call,
                t0,
                time.perf_counter(),
                response.status_code,
                _retry_after_of(response.headers),
            )
        )
        return response


def http_client(recorder: Recorder) -> httpx.Client:
    """An httpx client like the SDK's default one (same pool limits, httpx default timeout so
    the SDK keeps its own default timeout), recording every API request."""
    import openai._constants as oc

    return httpx.Client(
        transport=RecordingTransport(recorder, limits=oc.DEFAULT_CONNECTION_LIMITS),
        follow_redirects=True,
    )


# ------------------------------------------------------------------------ time scaling
_SCALED = {"done": False}


def scale_library_delays(scale: float) -> dict[str, str]:
    """Scale the built-in backoff of the openai SDK and of LlamaIndex's retry decorators by
    `scale` (process-wide, once). Returns what was changed, for the report."""
    changed: dict[str, str] = {}
    if _SCALED["done"]:
        return changed
    _SCALED["done"] = True
    import openai._base_client as obc

    obc.INITIAL_RETRY_DELAY = 0.5 * scale  # type: ignore[attr-defined]
    obc.MAX_RETRY_DELAY = 8.0 * scale  # type: ignore[attr-defined]
    changed["openai SDK backoff"] = f"0.5-8 s -> {0.5 * scale:g}-{8 * scale:g} s"
    try:
        import llama_index.embeddings.openai.base as lie
        import llama_index.llms.openai.base as lil
    except ImportError:  # pragma: no cover - without the llama-index extra
        return changed
    for module in (lil, lie):
        original = module.create_retry_decorator

        def scaled(
            max_retries: int,
            random_exponential: bool = False,
            stop_after_delay_seconds: float | None = None,
            min_seconds: float = 4,
            max_seconds: float = 10,
            _orig: Callable[..., Any] = original,
        ) -> Any:
            return _orig(
                max_retries=max_retries,
                random_exponential=random_exponential,
                stop_after_delay_seconds=None
                if stop_after_delay_seconds is None
                else stop_after_delay_seconds * scale,
                min_seconds=min_seconds * scale,
                max_seconds=max_seconds * scale,
            )

        module.create_retry_decorator = scaled
    changed["LlamaIndex tenacity"] = (
        f"wait 1-20 s -> {scale:g}-{20 * scale:g} s, stop_after_delay 60 s -> {60 * scale:g} s"
    )
    return changed


def our_overrides(scale: float) -> dict[str, float]:
    """The balanced preset's time constants, scaled."""
    return {
        "initial_delay": 1.0 * scale,
        "max_delay": 30.0 * scale,
        "recovery_timeout": 60.0 * scale,
        "min_recovery_timeout": 2.0 * scale,
        "deadline": 60.0 * scale,
        "attempt_timeout": 30.0 * scale,
    }


# ---------------------------------------------------------------------------- contenders
@dataclass
class Contender:
    """A user's client: `chat(prompt)` and `embed(text)` return the answer's source
    ("live", "fallback", "cache", "generic_fallback", "rejected") or raise the user-facing
    error. `opened_at` collects (operation, perf_counter time) when a circuit opens; the
    operation is "chat", "embed" or "*" (one breaker for both)."""

    name: str
    chat_fn: Callable[[str], str]
    embed_fn: Callable[[str], str]
    opened_at: list[tuple[str, float]] = field(default_factory=list)
    timeouts: str = ""
    closers: list[Callable[[], Any]] = field(default_factory=list)

    def chat(self, prompt: str) -> str:
        return self.chat_fn(prompt)

    def embed(self, text: str) -> str:
        return self.embed_fn(text)

    def close(self) -> None:
        for close in self.closers:
            with contextlib.suppress(Exception):
                close()


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def build(
    name: str, base_url: str, recorder: Recorder, *, scale: float, timeout: float | None
) -> Contender:
    """Build contender `name`. `timeout`: per-request timeout for every contender that has
    one (the stall scenario); None keeps each library's default."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"contender must be one of {sorted(_BUILDERS)}, got {name!r}")
    return builder(base_url, recorder, scale, timeout)


def _langchain_models(
    base_url: str,
    hc: httpx.Client,
    timeout: float | None,
    chat_model: str = CHAT_MODEL,
    **chat_kw: Any,
) -> tuple[Any, Any]:
    """ChatOpenAI (`chat_model`) and OpenAIEmbeddings on the chaos server through the
    recording client. `chat_kw` (e.g. max_retries=0) applies to both."""
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    common: dict[str, Any] = {
        "base_url": base_url,
        "api_key": API_KEY,
        "http_client": hc,
        "timeout": timeout,
        **chat_kw,
    }
    # check_embedding_ctx_length=False: tiktoken would download its encoding (no network here).
    return (
        ChatOpenAI(model=chat_model, **common),
        OpenAIEmbeddings(model=EMBED_MODEL, check_embedding_ctx_length=False, **common),
    )


def _llamaindex_models(
    base_url: str, hc: httpx.Client, timeout: float | None, **kw: Any
) -> tuple[Any, Any]:
    """LlamaIndex OpenAI and OpenAIEmbedding on the chaos server (their default timeout
    unless one is given)."""
    from llama_index.embeddings.openai import OpenAIEmbedding
    from llama_index.llms.openai import OpenAI

    common: dict[str, Any] = {"api_base": base_url, "api_key": API_KEY, "http_client": hc, **kw}
    if timeout is not None:
        common["timeout"] = timeout
    return OpenAI(model=CHAT_MODEL, **common), OpenAIEmbedding(model=EMBED_MODEL, **common)


def _sdk(base_url: str, recorder: Recorder, scale: float, timeout: float | None) -> Contender:
    import openai

    hc = http_client(recorder)
    kw: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    client = openai.OpenAI(base_url=base_url, api_key=API_KEY, http_client=hc, **kw)

    def chat(prompt: str) -> str:
        client.chat.completions.create(model=CHAT_MODEL, messages=_messages(prompt))  # type: ignore[arg-type]
        return "live"

    def embed(text: str) -> str:
        client.embeddings.create(model=EMBED_MODEL, input=text)
        return "live"

    return Contender(
        "openai-sdk", chat, embed, timeouts=f"timeout={client.timeout}", closers=[hc.close]
    )


def _langchain(base_url: str, recorder: Recorder, scale: float, timeout: float | None) -> Contender:
    hc = http_client(recorder)
    llm, emb = _langchain_models(base_url, hc, timeout)

    def chat(prompt: str) -> str:
        llm.invoke(prompt)
        return "live"

    def embed(text: str) -> str:
        emb.embed_query(text)
        return "live"

    return Contender(
        "langchain",
        chat,
        embed,
        timeouts=f"ChatOpenAI.request_timeout={llm.request_timeout} -> SDK timeout "
        f"{llm.root_client.timeout}",
        closers=[hc.close],
    )


def _langchain_retry(
    base_url: str, recorder: Recorder, scale: float, timeout: float | None
) -> Contender:
    from langchain_core.runnables import RunnableLambda

    hc = http_client(recorder)
    jitter = {"initial": 1.0 * scale, "max": 60.0 * scale, "exp_base": 2.0, "jitter": 1.0 * scale}
    primary, emb = _langchain_models(base_url, hc, timeout, max_retries=0)
    backup, _ = _langchain_models(base_url, hc, timeout, FALLBACK_MODEL, max_retries=0)
    chain = primary.with_retry(
        stop_after_attempt=4,
        exponential_jitter_params=jitter,  # type: ignore[arg-type]
    ).with_fallbacks([backup])
    embed_chain = RunnableLambda(emb.embed_query).with_retry(
        stop_after_attempt=4,
        exponential_jitter_params=jitter,  # type: ignore[arg-type]
    )

    def chat(prompt: str) -> str:
        msg = chain.invoke(prompt)
        model = str(msg.response_metadata.get("model_name", ""))
        return "fallback" if model.startswith(FALLBACK_MODEL) else "live"

    def embed(text: str) -> str:
        embed_chain.invoke(text)
        return "live"

    return Contender(
        "langchain-retry-fb",
        chat,
        embed,
        timeouts=f"request_timeout={timeout}",
        closers=[hc.close],
    )


def _llamaindex(
    base_url: str, recorder: Recorder, scale: float, timeout: float | None
) -> Contender:
    from llama_index.core.llms import ChatMessage

    hc = http_client(recorder)
    llm, emb = _llamaindex_models(base_url, hc, timeout)

    def chat(prompt: str) -> str:
        llm.chat([ChatMessage(role="user", content=prompt)])
        return "live"

    def embed(text: str) -> str:
        emb.get_query_embedding(text)
        return "live"

    return Contender(
        "llamaindex",
        chat,
        embed,
        timeouts=f"OpenAI timeout={llm.timeout} max_retries={llm.max_retries}; "
        f"OpenAIEmbedding timeout={emb.timeout} max_retries={emb.max_retries}",
        closers=[hc.close],
    )


def _tenacity_pybreaker(
    base_url: str, recorder: Recorder, scale: float, timeout: float | None
) -> Contender:
    import openai
    import pybreaker
    import tenacity

    hc = http_client(recorder)
    per_request = timeout if timeout is not None else 30.0 * scale
    client = openai.OpenAI(
        base_url=base_url, api_key=API_KEY, http_client=hc, max_retries=0, timeout=per_request
    )
    opened: list[tuple[str, float]] = []

    class Listener(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
        def state_change(self, cb: Any, old: Any, new: Any) -> None:
            if getattr(new, "name", "") == "open":
                opened.append(("*", time.perf_counter()))

    breaker = pybreaker.CircuitBreaker(
        fail_max=5,
        reset_timeout=60.0 * scale,
        # the caller's own mistakes say nothing about the upstream's health
        exclude=[
            openai.BadRequestError,
            openai.AuthenticationError,
            openai.PermissionDeniedError,
            openai.NotFoundError,
            openai.UnprocessableEntityError,
        ],
        listeners=[Listener()],
    )
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_random_exponential(multiplier=scale, min=scale, max=60.0 * scale),
        retry=tenacity.retry_if_exception_type(
            (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
        ),
        reraise=True,
    )

    def chat(prompt: str) -> str:
        retrying(
            breaker.call,
            client.chat.completions.create,
            model=CHAT_MODEL,
            messages=_messages(prompt),
        )
        return "live"

    def embed(text: str) -> str:
        retrying(breaker.call, client.embeddings.create, model=EMBED_MODEL, input=text)
        return "live"

    return Contender(
        "tenacity-pybreaker",
        chat,
        embed,
        opened_at=opened,
        timeouts=f"timeout={per_request:g}",
        closers=[hc.close],
    )


def _policy(scale: float, name: str) -> Any:
    from rag_resilience import ResiliencePolicy

    return ResiliencePolicy.preset("balanced", name=name, **our_overrides(scale))


def _watch(policy: Any, opened: list[tuple[str, float]], op: str) -> None:
    policy.add_listener(_fallback_listener)
    if policy.breaker is not None:

        def on_change(old: Any, new: Any) -> None:
            if getattr(new, "value", str(new)).lower() == "open":
                opened.append((op, time.perf_counter()))

        policy.breaker.add_state_listener(on_change)


def _ours_openai(
    base_url: str, recorder: Recorder, scale: float, timeout: float | None
) -> Contender:
    from rag_resilience.openai_client import ResilientOpenAIClient

    hc = http_client(recorder)
    policy = _policy(scale, "bench-openai")
    opened: list[tuple[str, float]] = []
    _watch(policy, opened, "*")
    kw: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    client = ResilientOpenAIClient(
        api_key=API_KEY, base_url=base_url, policy=policy, http_client=hc, **kw
    )

    def chat(prompt: str) -> str:
        r = client.chat.completions.create(model=CHAT_MODEL, messages=_messages(prompt))
        return str(r.resilience["source"])

    def embed(text: str) -> str:
        r = client.embeddings.create(model=EMBED_MODEL, input=text)
        return str(r.resilience["source"])

    return Contender(
        "ours-openai",
        chat,
        embed,
        opened_at=opened,
        timeouts=f"attempt_timeout={policy.attempt_timeout:g} deadline={policy.deadline:g}",
        closers=[hc.close],
    )


def _ours_langchain(
    base_url: str, recorder: Recorder, scale: float, timeout: float | None
) -> Contender:
    from rag_resilience.langchain import ResilientEmbeddings, ResilientLLM

    hc = http_client(recorder)
    opened: list[tuple[str, float]] = []
    llm_policy = _policy(scale, "bench-lc-llm")
    emb_policy = _policy(scale, "bench-lc-emb")
    _watch(llm_policy, opened, "chat")
    _watch(emb_policy, opened, "embed")
    chat_model, embeddings = _langchain_models(base_url, hc, timeout, max_retries=0)
    llm = ResilientLLM(chat_model, policy=llm_policy)
    emb = ResilientEmbeddings(embeddings, policy=emb_policy)

    def chat(prompt: str) -> str:
        msg = llm.invoke(prompt)
        meta = msg.response_metadata.get("resilience") or {}
        return str(meta.get("source") or served_from() or "live")

    def embed(text: str) -> str:
        emb.embed_query(text)
        return served_from() or "live"

    return Contender(
        "ours-langchain",
        chat,
        embed,
        opened_at=opened,
        timeouts=f"attempt_timeout={llm_policy.attempt_timeout:g} deadline={llm_policy.deadline:g}",
        closers=[hc.close],
    )


def _ours_llamaindex(
    base_url: str, recorder: Recorder, scale: float, timeout: float | None
) -> Contender:
    from llama_index.core.llms import ChatMessage

    from rag_resilience.llama_index import ResilientEmbedding, ResilientLLM

    hc = http_client(recorder)
    opened: list[tuple[str, float]] = []
    llm_policy = _policy(scale, "bench-li-llm")
    emb_policy = _policy(scale, "bench-li-emb")
    _watch(llm_policy, opened, "chat")
    _watch(emb_policy, opened, "embed")
    inner_llm, inner_emb = _llamaindex_models(base_url, hc, timeout, max_retries=0)
    llm = ResilientLLM(inner_llm, policy=llm_policy, generic_fallback=False)
    emb = ResilientEmbedding(inner_emb, policy=emb_policy)

    def chat(prompt: str) -> str:
        resp = llm.chat([ChatMessage(role="user", content=prompt)])
        meta = (resp.additional_kwargs or {}).get("resilience") or {}
        return str(meta.get("source") or served_from() or "live")

    def embed(text: str) -> str:
        emb.get_query_embedding(text)
        return served_from() or "live"

    return Contender(
        "ours-llamaindex",
        chat,
        embed,
        opened_at=opened,
        timeouts=f"attempt_timeout={llm_policy.attempt_timeout:g} deadline={llm_policy.deadline:g}",
        closers=[hc.close],
    )


_BUILDERS: dict[str, Callable[[str, Recorder, float, float | None], Contender]] = {
    "openai-sdk": _sdk,
    "langchain": _langchain,
    "langchain-retry-fb": _langchain_retry,
    "llamaindex": _llamaindex,
    "tenacity-pybreaker": _tenacity_pybreaker,
    "ours-openai": _ours_openai,
    "ours-langchain": _ours_langchain,
    "ours-llamaindex": _ours_llamaindex,
}


def available(name: str) -> str | None:
    """None if contender `name` can be built here, else why not (a missing package/module)."""
    modules = {
        "langchain": ["langchain_openai"],
        "langchain-retry-fb": ["langchain_openai"],
        "llamaindex": ["llama_index.llms.openai", "llama_index.embeddings.openai"],
        "tenacity-pybreaker": ["tenacity", "pybreaker"],
        "ours-langchain": ["langchain_openai", "rag_resilience.langchain"],
        "ours-llamaindex": ["llama_index.llms.openai", "rag_resilience.llama_index"],
    }.get(name, [])
    import importlib

    for module in ["openai", *modules]:
        try:
            importlib.import_module(module)
        except Exception as exc:
            return f"{module}: {type(exc).__name__}: {exc}"
    return None
