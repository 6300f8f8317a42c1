"""Bulk ingestion: embed tens of thousands of texts without losing any of the work.

`Ingestor` runs a document load through an `EmbeddingEngine`:

* **batches** sized by the provider's per-request limits: at most `max_inputs` texts
  (OpenAI: 2048) and at most `batch_tokens` estimated tokens (OpenAI: ~300k per
  request) each; a text longer than the budget goes alone (the provider decides);
* **bounded concurrency**: `concurrency` workers take batches from one queue, threads
  for `embed`, tasks for `aembed`; both drive the same `_Ingestion` state machine, so
  scheduling, results, progress and failure rules exist once;
* each batch is **one policy call** (pacing, retry, breaker, per-text cached vectors
  all apply), exactly what `EmbeddingEngine.run_batch` does for a sub-batch. With a
  rate limiter on the policy, each batch first reserves its turn with the tokens its
  texts will spend (`ratelimit_tokens.count_text_tokens`, or `count_tokens` when
  given), so under a tokens-per-minute limit batches go out at the pace the server's
  headers taught, instead of into 429s; a batch
  whose call ends on a rate-limit 429 or an open circuit was only told "not yet": after
  the server's delay or the breaker's next probe time it runs again (`wait_rounds`
  times at most) instead of failing;
* a **failed batch never loses the others**: the rest go on, and the caller gets
  `PartialEmbeddingError` with every vector that was obtained (`None` where none
  was) and exactly which inputs failed; the first upstream error is its `__cause__`.
  Errors that would fail every batch alike (bad key, no quota, a programming error)
  stop the scheduling of new batches instead of sending them all;
* **resume** (`resume=True`): the vector cache is the checkpoint. Texts whose vector
  is kept (memory, SQLite or Redis store) are not embedded again, so a re-run after a
  crash at 9,000 of 10,000 embeds only the missing 1,000 (every finished batch was
  written before it was counted as done);
* **progress**: a `progress(done, total)` callback, or a tqdm bar (the `[progress]`
  extra) when stderr is a terminal; `stats()` and the policy's ``stats()["ingest"]``
  count texts embedded, resumed, served degraded and failed.

Token estimate: `estimate_tokens` is a character heuristic (1 token per 3 characters,
rounded up), deliberately above OpenAI's ~4 characters per English token, so a batch
planned under the budget stays under the provider's limit; pass `count_tokens` for an
exact tokenizer.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import logging
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import deadline
from .clock import get_clock
from .embedding_cache import EmbeddingEngine, EmbeddingResult, Vector, take_vectors
from .errors import CircuitOpenError, QueueFullError, ResilienceError, add_note
from .policy import Served

__all__ = [
    "OPENAI_MAX_INPUTS",
    "OPENAI_MAX_REQUEST_TOKENS",
    "BatchHook",
    "IngestStats",
    "Ingestor",
    "PartialEmbeddingError",
    "Progress",
    "estimate_tokens",
    "plan_batches",
]

_logger = logging.getLogger("rag_resilience")

#: OpenAI's per-request limits for /v1/embeddings: inputs per request, tokens per request.
OPENAI_MAX_INPUTS = 2048
OPENAI_MAX_REQUEST_TOKENS = 300_000

#: `progress(done, total)`: texts with a vector so far (embedded or resumed), of all.
Progress = Callable[[int, int], None]
#: Called after each successful batch with its texts and vectors (adapters emit their
#: framework's per-batch events from it). Runs under the ingestion's lock: keep it short.
BatchHook = Callable[[list[str], list[Vector]], None]

# Statuses that say the same about every batch: the key, the account or the URL is wrong.
_STOP_STATUSES = frozenset({401, 403, 404})
# A 429 that only asks us to slow down (not "insufficient_quota"): "handled" is how the
# classifier labels it once a policy has spent its attempts on it.
_THROTTLED = frozenset({"rate_limited", "handled"})
#: Seconds to wait before re-running a throttled batch when the server did not say.
_THROTTLE_WAIT = 1.0
#: Checkpoint lookups in flight at once on the async path.
_LOOKUPS_AT_ONCE = 256
#: Shortest wait for an open circuit (a half-open one may say "0 s" while its probe runs).
_MIN_PAUSE = 0.5


def estimate_tokens(text: str) -> int:
    """Tokens of `text`, estimated from its length: ceil(characters / 3), at least 1."""
    return max(1, (len(text) + 2) // 3)


def plan_batches(
    texts: Sequence[str],
    indices: Sequence[int],
    *,
    max_inputs: int,
    max_tokens: int,
    count_tokens: Callable[[str], int] = estimate_tokens,
) -> list[list[int]]:
    """Group `indices` (into `texts`, in order) into batches of at most `max_inputs`
    texts and `max_tokens` estimated tokens. A text above `max_tokens` on its own is a
    batch of one: the provider's answer (a 400) then fails it alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in indices:
        n = count_tokens(texts[i])
        if current and (len(current) >= max_inputs or tokens + n > max_tokens):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        batches.append(current)
    return batches


class PartialEmbeddingError(ResilienceError):
    """Some batches of a bulk embedding failed; the others' vectors are here.

    `vectors[i]` is the vector of input `i`, or None if it failed; `failed_indices`
    lists exactly those inputs (sorted); `errors` pairs each failed batch's input
    indices with its error. `__cause__` is the first upstream error. Re-running the
    same load with ``resume=True`` embeds only the failed inputs.
    """

    def __init__(
        self,
        vectors: list[Vector | None],
        errors: list[tuple[list[int], BaseException]],
        *,
        resumable: bool,
    ) -> None:
        self.vectors = vectors
        self.errors = errors
        self.failed_indices = sorted(i for batch, _ in errors for i in batch)
        first = errors[0][1]
        total = len(vectors)
        failed = len(self.failed_indices)
        hint = (
            "re-run with the same texts to embed only the failed ones"
            if resumable
            else "with resume=True a re-run embeds only the failed ones"
        )
        super().__init__(
            f"{total - failed} of {total} texts embedded; {failed} failed in {len(errors)} "
            f"batch(es), first: {type(first).__name__}: {first}; {hint}"
        )

    @property
    def succeeded(self) -> int:
        return len(self.vectors) - len(self.failed_indices)


class IngestStats:
    """Cumulative counts of an `Ingestor` (exact under threads)."""

    _FIELDS = (
        "ingestions",
        "texts",
        "embedded",
        "resumed",
        "degraded",
        "failed",
        "batches",
        "batches_failed",
        "partial_errors",
        "throttled",
        "paused",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self._FIELDS, 0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self._counts[key] += value

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def _tqdm() -> Any:
    try:
        return importlib.import_module("tqdm").tqdm
    except ImportError:
        return None


class _ProgressSink:
    """Where progress goes: the caller's callback, a tqdm bar, or nowhere."""

    __slots__ = ("bar", "callback", "shown", "total")

    def __init__(self, setting: Progress | bool | None, total: int, batches: int, desc: str):
        self.total = total
        self.callback: Progress | None = None
        self.bar: Any = None
        self.shown = 0
        if callable(setting):
            self.callback = setting
            return
        if setting is False or (setting is None and batches < 2):
            return
        if setting is None and not _is_terminal(sys.stderr):
            return
        tqdm = _tqdm()
        if tqdm is not None:
            self.bar = tqdm(total=total, desc=desc, unit="text")

    def update(self, done: int) -> None:
        if self.callback is not None:
            try:
                self.callback(done, self.total)
            except Exception:  # a broken callback must not lose the ingestion
                _logger.exception("progress callback %r raised; ignored", self.callback)
        elif self.bar is not None:
            self.bar.update(done - self.shown)
            self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False


class _Ingestion:
    """One bulk load's state, shared by its workers (threads or tasks): the queue of
    batches, the vectors so far, the failures, progress. Every transition is one short
    critical section; the upstream calls run outside it."""

    __slots__ = (
        "done",
        "failed",
        "hook",
        "lock",
        "progress",
        "queue",
        "served",
        "stop",
        "texts",
        "vectors",
    )

    def __init__(
        self,
        texts: Sequence[str],
        vectors: list[Vector | None],
        batches: list[list[int]],
        progress: _ProgressSink,
        hook: BatchHook | None,
    ) -> None:
        self.lock = threading.Lock()
        self.texts = texts
        self.vectors = vectors
        self.queue = deque(batches)
        self.done = sum(1 for v in vectors if v is not None)
        self.failed: list[tuple[list[int], BaseException]] = []
        self.served: list[Served[Any]] = []
        self.stop: BaseException | None = None
        self.progress = progress
        self.hook = hook
        progress.update(self.done)

    def take(self) -> tuple[list[int], list[str]] | None:
        """The next batch (its indices and texts), or None: all taken, or stopped."""
        with self.lock:
            if self.stop is not None or not self.queue:
                return None
            batch = self.queue.popleft()
        return batch, [self.texts[i] for i in batch]

    def succeeded(self, batch: list[int], texts: list[str], served: Served[Any]) -> None:
        vectors: list[Vector] = take_vectors(served)
        with self.lock:
            for i, vector in zip(batch, vectors, strict=True):
                self.vectors[i] = vector
            self.served.append(served)
            self.done += len(batch)
            if self.hook is not None:
                self.hook(texts, vectors)
            self.progress.update(self.done)

    def failed_with(self, batch: list[int], error: BaseException, stops: bool) -> None:
        with self.lock:
            self.failed.append((batch, error))
            if stops and self.stop is None:
                self.stop = error

    @property
    def stopping(self) -> bool:
        return self.stop is not None

    def abort(self, error: BaseException) -> None:
        """The caller was interrupted: workers take no new batch."""
        with self.lock:
            if self.stop is None:
                self.stop = error

    def unscheduled(self) -> None:
        """Batches never sent because scheduling stopped fail with the stopping error."""
        with self.lock:
            stop = self.stop
            while stop is not None and self.queue:
                self.failed.append((self.queue.popleft(), stop))


class Ingestor:
    """Bulk embedding over an `EmbeddingEngine`: planned batches, bounded concurrency,
    partial results, resume from the vector cache, progress. See the module docstring.

    `max_inputs`: texts per batch (the provider's per-request input limit or less);
    `batch_tokens`: estimated tokens per batch; `concurrency`: batches in flight;
    `progress`: None (a tqdm bar when stderr is a terminal), True (a bar), False
    (nothing) or a callable ``(done, total)``; `resume`: skip texts whose vector is
    kept in the engine's cache; `wait_rounds`: how many more times a batch told "not
    yet" is run again before it counts as failed: after the server's delay when its
    policy call ended on a rate-limit 429 (slow down, not stop), after the breaker's
    next probe time when the circuit is open (an outage that outlasts the rounds stops
    the ingestion: the rest fail at once, to be resumed later).
    """

    def __init__(
        self,
        engine: EmbeddingEngine,
        *,
        max_inputs: int = OPENAI_MAX_INPUTS,
        batch_tokens: int = OPENAI_MAX_REQUEST_TOKENS,
        concurrency: int = 4,
        progress: Progress | bool | None = None,
        resume: bool = False,
        count_tokens: Callable[[str], int] = estimate_tokens,
        wait_rounds: int = 10,
    ) -> None:
        _check_int("max_inputs", max_inputs, 1, 1_000_000)
        _check_int("wait_rounds", wait_rounds, 0, 1000)
        _check_int("batch_tokens", batch_tokens, 1, 10_000_000)
        _check_int("concurrency", concurrency, 1, 256)
        if not (progress is None or isinstance(progress, bool) or callable(progress)):
            raise ValueError(
                "progress must be None, True, False or a callable (done, total), got "
                f"{type(progress).__name__}"
            )
        if not callable(count_tokens):
            raise ValueError(f"count_tokens must be a callable text -> int, got {count_tokens!r}")
        self.engine = engine
        self.max_inputs = max_inputs
        self.batch_tokens = batch_tokens
        self.concurrency = concurrency
        self.progress = progress
        self.resume = bool(resume)
        self.count_tokens = count_tokens
        self.wait_rounds = wait_rounds
        self.stats = IngestStats()
        self._warned_capacity = False

    # -- planning -------------------------------------------------------------------------
    def plain(
        self,
        texts: Sequence[str],
        hook: BatchHook | None = None,
        progress: Progress | bool | None = None,
    ) -> bool:
        """A load that is one batch nobody watches: the engine's own path (a query-sized
        call pays for no ingestion machinery)."""
        if self.resume or hook is not None or len(texts) > self.max_inputs:
            return False
        if callable(self.progress if progress is None else progress):
            return False
        budget = self.batch_tokens
        total = 0
        for text in texts:
            total += self.count_tokens(text)
            if total > budget:
                return False
        return True

    def _plan(
        self, texts: Sequence[str], vectors: list[Vector | None]
    ) -> tuple[list[list[int]], int]:
        missing = [i for i, v in enumerate(vectors) if v is None]
        batches = plan_batches(
            texts,
            missing,
            max_inputs=self.max_inputs,
            max_tokens=self.batch_tokens,
            count_tokens=self.count_tokens,
        )
        return batches, len(texts) - len(missing)

    def _check_capacity(self, total: int) -> None:
        cache = self.engine.cache
        if self._warned_capacity:
            return
        if cache is None:
            self._warned_capacity = True
            _logger.warning(
                "[%s] resume=True, but the policy keeps no vectors (no fallback cache): "
                "every run embeds everything",
                self.engine.policy.name,
            )
            return
        if cache.max_entries is not None and total > cache.max_entries:
            self._warned_capacity = True
            _logger.warning(
                "[%s] resuming an ingestion of %d texts, but the vector cache keeps at most "
                "%d: a re-run re-embeds what was evicted; raise cache_max_entries",
                self.engine.policy.name,
                total,
                cache.max_entries,
            )

    def _start(
        self,
        texts: Sequence[str],
        vectors: list[Vector | None],
        hook: BatchHook | None,
        progress: Progress | bool | None,
    ) -> tuple[_Ingestion, int]:
        batches, resumed = self._plan(texts, vectors)
        setting = self.progress if progress is None else progress
        sink = _ProgressSink(setting, len(texts), len(batches), "embedding")
        return _Ingestion(texts, vectors, batches, sink, hook), resumed

    def _tokens(self, texts: list[str]) -> int | None:
        """A batch's tokens for the pacer: by `count_tokens` when the caller gave one
        (an exact tokenizer), else None (the engine counts as the rate limiter does)."""
        count = self.count_tokens
        if count is estimate_tokens or self.engine.policy.rate_limiter is None:
            return None
        return sum(count(t) for t in texts)

    def _may_wait(self, run: _Ingestion, wait: float, rounds: int) -> bool:
        if run.stopping or rounds >= self.wait_rounds:
            return False
        left = deadline.remaining()
        return left is None or wait < left

    def _failed(
        self, run: _Ingestion, batch: list[int], error: BaseException, rounds: int
    ) -> float | None:
        """After a batch's policy call failed: seconds to wait before running it again
        (the server only asked us to slow down, or the circuit is open; negative: a wait
        that costs no round), or None once it is recorded as failed. Shared by the
        thread and task workers."""
        if isinstance(error, QueueFullError):
            # A pacer's rejection (the rate-limit branch's RateLimitedError) says how long
            # the call would have waited: not yet, like a 429. A full queue just fails.
            wait = getattr(error, "wait", None)
            if isinstance(wait, (int, float)) and wait > 0 and self._may_wait(run, wait, rounds):
                self.stats.add(throttled=1)
                return float(wait)
            run.failed_with(batch, error, False)
            return None
        if isinstance(error, CircuitOpenError):
            # The upstream is down: wait for the breaker's next probe rather than fail
            # every remaining batch at once; an outage that outlasts the rounds stops it.
            # While a probe is in flight (half-open) the wait costs no round: the outage
            # has not lasted any longer, the probe's outcome is what matters.
            probing = error.state == "half_open"
            wait = max(error.retry_after, _MIN_PAUSE)
            if self._may_wait(run, wait, 0 if probing else rounds):
                self.stats.add(paused=1)
                return -wait if probing else wait
            run.failed_with(batch, error, True)
            return None
        verdict = self.engine.policy.classify(error)
        breaker = self.engine.policy.breaker
        if verdict.is_failure and verdict.fallback_ok and breaker is not None:
            # A batch in flight when the outage began spent its attempts on it and opened
            # the circuit (or saw it open): it waits for the probes like the others.
            state = breaker.get_state().value
            if state != "closed":
                wait = max(breaker.retry_after(), _MIN_PAUSE)
                probing = state == "half_open"
                if self._may_wait(run, wait, 0 if probing else rounds):
                    self.stats.add(paused=1)
                    return -wait if probing else wait
                run.failed_with(batch, error, True)
                return None
        if verdict.status == 429 and verdict.reason in _THROTTLED:
            wait = verdict.retry_after if verdict.retry_after is not None else _THROTTLE_WAIT
            if self._may_wait(run, wait, rounds):
                self.stats.add(throttled=1)
                return wait
        # Would every other batch fail the same way? (bad key, no quota, our own bug)
        stops = verdict.status in _STOP_STATUSES or verdict.reason == "insufficient_quota"
        stops = stops or (
            verdict.status is None and not verdict.fallback_ok and not verdict.retryable
        )
        run.failed_with(batch, error, stops)
        return None

    def _finish(self, run: _Ingestion, resumed: int, total: int) -> EmbeddingResult:
        run.progress.close()
        run.unscheduled()
        served = run.served
        failed = len({i for batch, _ in run.failed for i in batch})
        self.stats.add(
            ingestions=1,
            texts=total,
            resumed=resumed,
            embedded=total - resumed - failed,
            degraded=sum(1 for s in served if s.degraded),
            failed=failed,
            batches=len(served) + len(run.failed),
            batches_failed=len(run.failed),
            partial_errors=1 if run.failed and failed < total else 0,
        )
        if resumed:  # one record for every text the checkpoint had
            served.insert(0, Served([], "checkpoint", 0))
        if not run.failed:
            vectors: list[Vector] = run.vectors  # type: ignore[assignment] # all filled
            return EmbeddingResult(vectors, served)
        run.failed.sort(key=lambda item: item[0][0])
        first = min(run.failed, key=lambda item: item[0][0])[1]
        if failed == total:  # nothing to hand back: the upstream error itself, as before
            add_note(
                first,
                f"rag_resilience[{self.engine.policy.name}]: all {total} texts of the load "
                f"failed, in {len(run.failed)} batch(es)",
            )
            raise first
        _logger.warning(
            "[%s] bulk embedding: %d of %d texts failed in %d batch(es); the others were kept",
            self.engine.policy.name,
            failed,
            total,
            len(run.failed),
        )
        error = PartialEmbeddingError(run.vectors, run.failed, resumable=self.resume)
        raise error from first

    # -- drivers --------------------------------------------------------------------------
    def embed(
        self,
        texts: Sequence[str],
        embed_batch: Callable[[list[str]], list[Vector]],
        *,
        hook: BatchHook | None = None,
        progress: Progress | bool | None = None,
    ) -> EmbeddingResult:
        """Embed `texts` with `concurrency` worker threads (one batch in the caller's
        thread when the load is a single batch). Raises `PartialEmbeddingError` when
        some (not all) inputs failed."""
        if self.plain(texts, hook, progress):
            return self.engine.embed(texts, embed_batch)
        vectors: list[Vector | None] = [None] * len(texts)
        if self.resume:
            self._check_capacity(len(texts))
            for i, text in enumerate(texts):
                vectors[i] = self.engine.kept_vector(text)
        run, resumed = self._start(texts, vectors, hook, progress)

        clock = get_clock(self.engine.policy.clock)

        def worker() -> None:
            while (item := run.take()) is not None:
                batch, chunk = item
                rounds = 0
                while True:
                    try:
                        served = self.engine.run_batch(chunk, embed_batch, self._tokens(chunk))
                    except Exception as exc:
                        wait = self._failed(run, batch, exc, rounds)
                        if wait is None:
                            break
                        rounds += wait > 0  # a negative wait costs no round
                        clock.sleep(abs(wait))
                        continue
                    run.succeeded(batch, chunk, served)
                    break

        workers = min(self.concurrency, len(run.queue))
        if workers <= 1:
            worker()
        else:
            # Each worker runs in a copy of the caller's context: its deadline and
            # degraded-answer scope apply to the batches, as they would inline.
            crashed: list[BaseException] = []

            def guarded() -> None:
                try:
                    worker()
                except BaseException as exc:  # not an upstream failure: the caller's to see
                    run.abort(exc)
                    crashed.append(exc)

            threads = [
                threading.Thread(
                    target=contextvars.copy_context().run,
                    args=(guarded,),
                    name=f"rag-resilience-ingest-{n}",
                    daemon=True,
                )
                for n in range(workers)
            ]
            for thread in threads:
                thread.start()
            try:
                for thread in threads:
                    thread.join()
            except BaseException as exc:  # KeyboardInterrupt: finish what is in flight
                run.abort(exc)
                raise
            if crashed:
                run.progress.close()
                raise crashed[0]
        return self._finish(run, resumed, len(texts))

    async def aembed(
        self,
        texts: Sequence[str],
        aembed_batch: Callable[[list[str]], Awaitable[list[Vector]]],
        *,
        hook: BatchHook | None = None,
        progress: Progress | bool | None = None,
    ) -> EmbeddingResult:
        """`embed` with `concurrency` tasks on the running loop."""
        if self.plain(texts, hook, progress):
            return await self.engine.aembed(texts, aembed_batch)
        vectors: list[Vector | None] = [None] * len(texts)
        if self.resume:
            self._check_capacity(len(texts))
            # A shared store is a round trip per text: a few hundred at a time.
            for start in range(0, len(texts), _LOOKUPS_AT_ONCE):
                chunk = texts[start : start + _LOOKUPS_AT_ONCE]
                found = await asyncio.gather(*(self.engine.akept_vector(t) for t in chunk))
                vectors[start : start + len(found)] = found
        run, resumed = self._start(texts, vectors, hook, progress)

        clock = get_clock(self.engine.policy.clock)

        async def worker() -> None:
            while (item := run.take()) is not None:
                batch, chunk = item
                rounds = 0
                while True:
                    try:
                        served = await self.engine.arun_batch(
                            chunk, aembed_batch, self._tokens(chunk)
                        )
                    except Exception as exc:
                        wait = self._failed(run, batch, exc, rounds)
                        if wait is None:
                            break
                        rounds += wait > 0  # a negative wait costs no round
                        await clock.asleep(abs(wait))
                        continue
                    run.succeeded(batch, chunk, served)
                    break

        workers = min(self.concurrency, len(run.queue))
        tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
        try:
            await asyncio.gather(*tasks)
        except BaseException as exc:  # cancelled: stop the other workers too
            run.abort(exc)
            for task in tasks:
                task.cancel()
            raise
        return self._finish(run, resumed, len(texts))

    def describe(self) -> dict[str, Any]:
        return {
            "max_inputs": self.max_inputs,
            "batch_tokens": self.batch_tokens,
            "concurrency": self.concurrency,
            "resume": self.resume,
        }


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
