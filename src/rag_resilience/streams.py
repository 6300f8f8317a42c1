"""Closing an upstream stream the caller stopped reading.

A stream closed early (``break``, ``aclose()``, a cancelled consumer) still has an open
upstream response: the server keeps generating and the connection stays busy. Its
concurrency permit must not be handed to the next caller before that response is closed,
or the upstream sees more streams in flight than the limit allows (issue 17, item 7).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

__all__ = ["aclose_upstream", "close_upstream"]

logger = logging.getLogger("rag_resilience")


def close_upstream(iterator: Any) -> None:
    """Close a sync upstream iterator if it can be closed; never raises."""
    close = getattr(iterator, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # closing must not replace why the stream ended
            logger.debug("closing an upstream stream raised", exc_info=True)


async def aclose_upstream(iterator: Any) -> None:
    """Close an async upstream iterator (``aclose()``, else ``close()``); never raises."""
    close = getattr(iterator, "aclose", None) or getattr(iterator, "close", None)
    if not callable(close):
        return
    try:
        result = close()
        if hasattr(result, "__await__"):
            with contextlib.suppress(StopAsyncIteration):
                await result
    except Exception:
        logger.debug("closing an upstream stream raised", exc_info=True)
