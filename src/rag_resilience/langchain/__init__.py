"""LangChain integration: swap one class, keep the chain (``pip install rag-resilience[langchain]``).

>>> from rag_resilience.langchain import ResilientLLM, ResilientEmbeddings, with_resilience
>>> llm = ResilientLLM(ChatOpenAI(model="gpt-4o-mini", max_retries=0))
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "rag_resilience.langchain needs langchain-core: pip install rag-resilience[langchain]"
    ) from exc

from ._common import EVENT_NAME, NoTimeoutWarning
from .callbacks import ResilienceCallbackHandler
from .embeddings import ResilientEmbeddings
from .llm import ResilientChatModel, ResilientLLM
from .ratelimiter import PacingRateLimiter
from .runnable import ResilientRunnable, with_resilience

__all__ = [
    "EVENT_NAME",
    "NoTimeoutWarning",
    "PacingRateLimiter",
    "ResilienceCallbackHandler",
    "ResilientChatModel",
    "ResilientEmbeddings",
    "ResilientLLM",
    "ResilientRunnable",
    "with_resilience",
]
