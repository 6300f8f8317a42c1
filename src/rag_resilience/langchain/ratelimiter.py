"""`PacingRateLimiter`: our pacer as a LangChain `BaseRateLimiter`.

LangChain's own `InMemoryRateLimiter` must be told the limit, counts requests only and
works in one process. This one learns the limit from the responses of the model it is
attached to (the ``x-ratelimit-*`` headers of every answer and 429), paces by requests and
tokens, and its `limiter` can pace embeddings and other models too:

>>> pacing = PacingRateLimiter()
>>> llm = pacing.attach(ChatOpenAI(model="gpt-4o-mini", rate_limiter=pacing))
>>> embeddings = ResilientEmbeddings(
...     OpenAIEmbeddings(max_retries=0),
...     policy=ResiliencePolicy.preset("balanced", rate_limit=pacing.limiter),
... )

`acquire()` waits for the next slot (FIFO), bounded by the call's deadline
(`rag_resilience.deadline`); a slot that comes too late raises `RateLimitedError` at once.
``acquire(blocking=False)`` takes a slot only if it is free now.
"""

from __future__ import annotations

from typing import Any, TypeVar

from langchain_core.rate_limiters import BaseRateLimiter

from ..errors import RateLimitedError
from ..ratelimit import PaceRequest, RateLimiter
from ..ratelimit_instrument import instrument, model_upstream

__all__ = ["PacingRateLimiter"]

M = TypeVar("M")


class PacingRateLimiter(BaseRateLimiter):
    """A LangChain rate limiter that paces to the limits the upstream reports.

    `limiter`: the `RateLimiter` to use (shared with policies: pass it as
    ``ResiliencePolicy.preset(..., rate_limit=limiter)``); a new one by default.
    `upstream`: the pacer key (set by `attach` from the model's base URL, model name and
    a hash of its API key). `tokens_per_call`: tokens charged per call before its usage is
    known (LangChain does not tell a rate limiter what it is about to send).
    """

    def __init__(
        self,
        limiter: RateLimiter | None = None,
        *,
        upstream: str = "langchain",
        tokens_per_call: int = 0,
    ) -> None:
        if not isinstance(tokens_per_call, int) or tokens_per_call < 0:
            raise ValueError(f"tokens_per_call must be an int >= 0, got {tokens_per_call!r}")
        self.limiter = limiter if limiter is not None else RateLimiter()
        self.upstream = upstream
        self.tokens_per_call = tokens_per_call

    def attach(self, model: M) -> M:
        """Learn from `model`'s responses (response hooks on its HTTP clients) and pace
        under its key. Returns `model`, so it can wrap a constructor call."""
        self.upstream = model_upstream(model)
        instrument(model, self.limiter)
        return model

    def _request(self) -> PaceRequest:
        return PaceRequest(self.upstream, self.tokens_per_call)

    def acquire(self, *, blocking: bool = True) -> bool:
        if not blocking:
            try:
                self.limiter.reserve(self._request(), max_wait=0.0)
            except RateLimitedError:
                return False
            return True
        self.limiter.acquire(self._request())
        return True

    async def aacquire(self, *, blocking: bool = True) -> bool:
        if not blocking:
            return self.acquire(blocking=False)
        await self.limiter.aacquire(self._request())
        return True

    def stats(self) -> dict[str, Any]:
        return self.limiter.stats()

    def __repr__(self) -> str:
        return f"PacingRateLimiter(upstream={self.upstream!r})"
