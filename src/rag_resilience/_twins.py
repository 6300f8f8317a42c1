"""The few primitives where the sync and async drivers differ, each under both names, so
the drivers are written once (`_async/drivers.py`) and the sync twin is generated
(`scripts/unasync.py` turns `await asettle(x)` into `settle(x)`). The sync ones are
plain values: no work on the sync path for what only the async side must do."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterable
from typing import Any


def settle(value: Any) -> Any:
    """A fallback's or a cache hook's result, as it is (sync callers return values)."""
    return value


async def asettle(value: Any) -> Any:
    """A fallback's or a cache hook's result: awaited when it is awaitable."""
    if inspect.isawaitable(value):
        return await value
    return value


def iter_items(value: Any) -> Iterable[Any]:
    """A degraded stream's items: a fallback's iterable, or one text as a single item."""
    return (value,) if isinstance(value, (str, bytes)) else value


async def aiter_items(value: Any) -> AsyncIterator[Any]:
    """As `iter_items`; a fallback of an async stream may also give an async iterable."""
    if hasattr(value, "__aiter__") and not isinstance(value, (str, bytes)):
        async for item in value:
            yield item
    else:
        for item in iter_items(value):
            yield item
