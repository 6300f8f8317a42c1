"""What only the async driver does to an attempt: cancel it at its timeout. A sync
attempt cannot be cut from outside; sync adapters pass the time left as their request
timeout instead (`deadline.py`), so `scripts/unasync.py` drops these calls."""

from __future__ import annotations

import inspect
from typing import Any

from ..clock import Clock
from ..retry import attempt_timeout_for
from ..timeouts import run_with_timeout


def first_timeout(
    attempt_timeout: float | None,
    left: float | None,
    limit: object | None,
    clock: Clock,
    since: float,
) -> float | None:
    """The first attempt's timeout: its own, or what the deadline left after the wait for
    a permit (`since`: when the call started waiting)."""
    if left is not None and limit is not None:
        left -= clock.monotonic() - since
    return attempt_timeout_for(attempt_timeout, left)


async def astream_of(stream: Any, timeout: float | None) -> Any:
    """An async stream from what the stream function returned: the stream itself, or the
    awaited coroutine of one (within the attempt's timeout)."""
    if inspect.isawaitable(stream):
        return await run_with_timeout(stream, timeout)
    return stream
