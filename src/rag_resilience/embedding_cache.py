"""Framework-free engine behind every resilient embeddings wrapper.

Two jobs the LangChain and LlamaIndex adapters share:

* sub-batching: a large document load is split into `batch_size` sub-batches, each
  its own policy call (retry, breaker, limit), so one failing sub-batch is retried
  alone instead of the whole load; async sub-batches run concurrently, bounded by
  the policy's ConcurrencyLimit;
* per-text last-known-good vectors: every live vector is remembered per (model,
  text); when a sub-batch fails for an upstream reason, it is served from cache only
  if *every* text in it has a cached vector. Vectors are never invented: if one is
  missing, the original error is raised with a note saying how many were missing.
  A text whose vector is already kept (and not near its expiry) is not re-written.

Vectors are stored as base64 float32 (what the OpenAI API itself returns), which is
JSON-safe for shared stores and 6 KB for a 1536-dimension vector instead of ~50 KB of
Python floats.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import sys
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _validate as _v
from .clock import get_clock
from .errors import add_note
from .fallback import GracefulFallbacks, stable_key
from .policy import CacheHooks, ResiliencePolicy, Served
from .ratelimit import PaceRequest
from .ratelimit_tokens import estimate_request_tokens

__all__ = [
    "EmbeddingEngine",
    "EmbeddingResult",
    "decode_vector",
    "encode_vector",
    "take_vectors",
]

Vector = list[float]

_logger = logging.getLogger("rag_resilience")


_STRUCTS: dict[tuple[str, int], struct.Struct] = {}


def _pack(vector: Sequence[float], order: str) -> bytes:
    """float32 bytes of `vector` (`order`: "<" little-endian, "=" native).

    `struct` converts each float about twice as fast as `array("f", vector)` (whose item
    setter parses every element like a function argument). Anything struct refuses
    (a value beyond float32 range, a non-number) goes through `array("f")`, so the result,
    or the error, is exactly what `array("f", vector)` gives.
    """
    try:
        n = len(vector)
        packer = _STRUCTS.get((order, n))
        if packer is None:
            packer = struct.Struct(f"{order}{n}f")
            if len(_STRUCTS) < 64:  # a handful of dimensions in practice; stay bounded
                _STRUCTS[(order, n)] = packer
        return packer.pack(*vector)
    except (struct.error, OverflowError, TypeError):
        packed = array("f", vector)
        if order == "<" and sys.byteorder != "little":  # pragma: no cover - big-endian hosts
            packed.byteswap()
        return packed.tobytes()


def encode_vector(vector: Sequence[float]) -> str:
    """Compact, JSON-safe form of a vector: base64 of little-endian float32."""
    return base64.b64encode(_pack(vector, "<")).decode("ascii")


def decode_vector(data: Any) -> Vector:
    """Inverse of `encode_vector`; also accepts native float32 bytes, an `array` or a
    plain list (what process-local stores hold)."""
    if isinstance(data, bytes):
        return array("f", data).tolist()
    if isinstance(data, array):
        return data.tolist()
    if isinstance(data, list):
        return [float(x) for x in data]
    raw = base64.b64decode(data)
    if len(raw) % 4:
        raise ValueError("corrupt cached vector: length is not a multiple of 4 bytes")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def _to_native(vector: Sequence[float]) -> bytes:
    return _pack(vector, "=")


class _BatchVectors(CacheHooks):
    """Last-known-good vectors of one sub-batch, one cache entry per text."""

    __slots__ = ("batch", "cache", "encode", "refresh_after")

    def __init__(
        self,
        cache: GracefulFallbacks,
        encode: Callable[[Sequence[float]], Any],
        batch: list[str],
        refresh_after: float | None,
    ) -> None:
        self.cache = cache
        self.encode = encode
        self.batch = batch
        self.refresh_after = refresh_after

    def store(self, value: Any) -> None:
        for text, vector in zip(self.batch, value, strict=True):
            self._keep(text, vector)

    def _keep(self, text: str, vector: Sequence[float]) -> None:
        if self.refresh_after is not None:
            age = self.cache.age_of(text)
            if age is not None and age < self.refresh_after:
                return  # a fresh vector of this text is already kept
        self.cache.update_cache(text, self.encode(vector))

    def lookup(self) -> tuple[Any, float] | None:  # (the batch's vectors, oldest age)
        found: list[Vector] = []
        oldest = 0.0
        for text in self.batch:
            hit = self.cache.get_last_known_good(text)
            if hit is None:
                return None
            found.append(decode_vector(hit[0]))
            oldest = max(oldest, hit[1])
        return found, oldest


class _TextVector(_BatchVectors):
    """The last-known-good vector of one text (a query): the value is the vector itself."""

    __slots__ = ()

    def store(self, value: Any) -> None:
        self._keep(self.batch[0], value)

    def lookup(self) -> tuple[Vector, float] | None:
        found = super().lookup()  # ([vector], age)
        return None if found is None else (found[0][0], found[1])


def take_vectors(served: Served[Any]) -> Any:
    """A sub-batch's vectors (or a query's vector), moved out of its `Served`: the record
    of how it was served should not keep them alive after the caller is done with them."""
    vectors = served.value
    served.value = []
    return vectors


@dataclass(slots=True)
class EmbeddingResult:
    """Vectors in input order, and how each sub-batch was served (each `Served` record
    without its value: the vectors are here)."""

    vectors: list[Vector]
    served: list[Served[Any]] = field(default_factory=list)

    @classmethod
    def of_one(cls, served: Served[Vector]) -> EmbeddingResult:
        """The result of `embed_one`: its vector, moved out of the record."""
        return cls([take_vectors(served)], [served])

    @property
    def degraded(self) -> bool:
        return any(s.degraded for s in self.served)

    @property
    def sources(self) -> dict[str, int]:
        return dict(Counter(s.source for s in self.served))

    def metadata(self) -> dict[str, Any]:
        ages = [s.age_s for s in self.served if s.age_s is not None]
        return {
            "source": "live" if not self.degraded else "cache",
            "sources": self.sources,
            "attempts": sum(s.attempts for s in self.served),
            "retries": sum(max(0, s.attempts - 1) for s in self.served),
            "age_s": max(ages) if ages else None,
            "degraded": self.degraded,
        }


class EmbeddingEngine:
    """Runs embedding batches through a policy with per-text last-known-good vectors."""

    def __init__(
        self,
        policy: ResiliencePolicy,
        *,
        model_id: str,
        batch_size: int = 64,
        pace_upstream: str | None = None,
    ) -> None:
        _v.integer("batch_size", batch_size, 1)
        self.policy = policy
        # The pacer key of the model (`ratelimit_instrument.model_upstream`): each call is
        # paced on it, charged the estimated tokens of its texts. None: the policy's name.
        self.pace_upstream = pace_upstream if policy.rate_limiter is not None else None
        self.model_id = model_id
        self.batch_size = batch_size
        base = policy.fallbacks
        # Own namespace in the policy's store: vectors never evict an LLM's answers.
        self.cache: GracefulFallbacks | None = (
            GracefulFallbacks(
                ttl=base.ttl,
                max_entries=base.max_entries,
                name=f"{policy.name}:embeddings:{model_id}",
                store=base.store,
                clock=base.clock,
            )
            if base is not None
            else None
        )
        # A process-local store keeps float32 bytes (6 KB for 1536 dimensions, no text
        # encoding on the hot path); shared stores need JSON, so base64 of the same bytes.
        shared = self.cache is not None and self.cache.store.shared
        self._encode: Callable[[Sequence[float]], Any] = encode_vector if shared else _to_native
        # An embedding model maps a text to the same vector every time, so re-encoding and
        # re-writing a text's vector on every call is wasted work (float32 packing alone is
        # ~30 µs for 1536 dimensions). A process-local store is checked first (a dict
        # lookup) and a vector younger than half its TTL (or an hour, without a TTL) is
        # kept as is; refreshed before it expires, it never lapses while the text is in
        # use. A shared store is written every time: a check would be a round trip too.
        self._refresh_after: float | None = None
        if self.cache is not None and not shared:
            ttl = self.cache.ttl
            self._refresh_after = ttl / 2 if ttl is not None else 3600.0

    def _pace(self, texts: list[str]) -> PaceRequest | None:
        """The call's turn at the rate limit: its upstream, its texts' estimated tokens
        (what an embeddings endpoint charges: the inputs; no completion)."""
        upstream = self.pace_upstream
        if upstream is None:
            return None
        return PaceRequest(upstream, estimate_request_tokens({"input": texts}))

    def _batches(self, texts: Sequence[str]) -> list[list[str]]:
        size = self.batch_size
        if 0 < len(texts) <= size:  # one sub-batch: every query, most small loads
            return [list(texts)]
        return [list(texts[i : i + size]) for i in range(0, len(texts), size)]

    def _run(
        self,
        fn: Callable[[Any], Any],
        arg: Any,
        texts: list[str],
        hooks: type[_BatchVectors] = _BatchVectors,
    ) -> Served[Any]:
        """One policy call for `texts`, with their vectors as its last-known-good cache;
        a failure is noted with how many of them have no cached vector."""
        cache = self.cache
        kept = None if cache is None else hooks(cache, self._encode, texts, self._refresh_after)
        try:
            return self.policy.execute(
                fn, (arg,), cache=kept, generic=False, pace=self._pace(texts)
            )
        except Exception as exc:
            self._missing_note(exc, texts)
            raise

    async def _arun(
        self,
        fn: Callable[[Any], Awaitable[Any]],
        arg: Any,
        texts: list[str],
        hooks: type[_BatchVectors] = _BatchVectors,
    ) -> Served[Any]:
        cache = self.cache
        kept = None if cache is None else hooks(cache, self._encode, texts, self._refresh_after)
        try:
            return await self.policy.aexecute(
                fn, (arg,), cache=kept, generic=False, pace=self._pace(texts)
            )
        except Exception as exc:
            self._missing_note(exc, texts)
            raise

    def embed_one(self, text: str, embed_text: Callable[[str], Vector]) -> Served[Vector]:
        """One text (a query): `embed_text(text) -> vector` through the policy, without the
        batch lists of `embed`. The `Served` record holds the vector: take it out with
        `EmbeddingResult.of_one`, or directly on a hot path."""
        return self._run(embed_text, text, [text], _TextVector)

    async def aembed_one(
        self, text: str, aembed_text: Callable[[str], Awaitable[Vector]]
    ) -> Served[Vector]:
        return await self._arun(aembed_text, text, [text], _TextVector)

    def run_batch(
        self, texts: list[str], embed_batch: Callable[[list[str]], list[Vector]]
    ) -> Served[list[Vector]]:
        """One sub-batch as one policy call (what `embed` does for each); the `Served`
        record holds the vectors: move them out with `take_vectors`."""
        return self._run(embed_batch, texts, texts)

    async def arun_batch(
        self, texts: list[str], aembed_batch: Callable[[list[str]], Awaitable[list[Vector]]]
    ) -> Served[list[Vector]]:
        return await self._arun(aembed_batch, texts, texts)

    def kept_vector(self, text: str) -> Vector | None:
        """The vector kept for `text` (not expired), or None; not counted as a fallback
        hit. An unreadable store or value counts as absent (logged)."""
        cache = self.cache
        if cache is None:
            return None
        try:
            found = cache.store.cache_get(cache.namespace, stable_key(text), self._now())
            return None if found is None else decode_vector(found[0])
        except Exception:
            self._unreadable()
            return None

    async def akept_vector(self, text: str) -> Vector | None:
        cache = self.cache
        if cache is None:
            return None
        try:
            found = await cache.store.acache_get(cache.namespace, stable_key(text), self._now())
            return None if found is None else decode_vector(found[0])
        except Exception:
            self._unreadable()
            return None

    def _now(self) -> float:
        return get_clock(self.cache.clock if self.cache is not None else None).time()

    def _unreadable(self) -> None:
        _logger.warning(
            "[%s] a kept vector could not be read; the text is embedded again",
            self.policy.name,
            exc_info=True,
        )

    def _missing_note(self, exc: BaseException, batch: list[str]) -> None:
        if self.cache is None:
            return
        missing = sum(1 for t in batch if self.cache.get_last_known_good(t) is None)
        if missing:
            add_note(
                exc,
                f"rag_resilience[{self.policy.name}]: {missing} of {len(batch)} texts in the failed "
                "batch have no cached vector; vectors are never invented, so the error is raised",
            )

    def embed(
        self, texts: Sequence[str], embed_batch: Callable[[list[str]], list[Vector]]
    ) -> EmbeddingResult:
        """Embed `texts` in sub-batches through the policy (sequentially)."""
        batches = self._batches(texts)
        if len(batches) == 1:  # a small load: no accumulation
            served = self._run(embed_batch, batches[0], batches[0])
            return EmbeddingResult(take_vectors(served), [served])
        result = EmbeddingResult([])
        for batch in batches:
            served = self._run(embed_batch, batch, batch)
            result.vectors.extend(take_vectors(served))
            result.served.append(served)
        return result

    async def aembed(
        self, texts: Sequence[str], aembed_batch: Callable[[list[str]], Awaitable[list[Vector]]]
    ) -> EmbeddingResult:
        """Embed `texts` with sub-batches running concurrently under the policy's limit."""
        batches = self._batches(texts)
        if len(batches) == 1:  # a small load: no task per sub-batch
            served = await self._arun(aembed_batch, batches[0], batches[0])
            return EmbeddingResult(take_vectors(served), [served])
        outcomes = await asyncio.gather(
            *(self._arun(aembed_batch, b, b) for b in batches), return_exceptions=True
        )
        result = EmbeddingResult([])
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            result.vectors.extend(take_vectors(outcome))
            result.served.append(outcome)
        return result
