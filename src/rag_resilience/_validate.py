"""Constructor checks for numeric parameters: one line per parameter, one message style.

`NaN` passes every ``<``/``>`` check written the obvious way (all comparisons are False)
and `inf` disables deadlines or overflows `time.sleep`, so each check here first asks for
a real, finite number; `True`/`False` are refused although they are ints in Python. The
ValueError names the parameter, the allowed range and the value received.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["at_least", "in_range", "integer", "positive"]


def _number(name: str, value: Any, allowed: str, none_ok: bool) -> float | None:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{name} must be a number {allowed}, got {value!r} ({type(value).__name__})"
        )
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be {allowed} (finite), got {value!r}")
    return number


def _or_none(allowed: str, none_ok: bool) -> str:
    return f"{allowed} or None" if none_ok else allowed


def positive(name: str, value: Any, *, none_ok: bool = False, unit: str = "seconds") -> Any:
    """`value` unchanged if it is a finite number > 0 (or None when `none_ok`)."""
    allowed = _or_none(f"> 0 {unit}" if unit else "> 0", none_ok)
    number = _number(name, value, allowed, none_ok)
    if number is not None and not number > 0:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def at_least(
    name: str, value: Any, minimum: float, *, none_ok: bool = False, unit: str = "seconds"
) -> Any:
    """`value` unchanged if it is a finite number >= `minimum` (or None when `none_ok`)."""
    allowed = _or_none(f">= {minimum:g} {unit}" if unit else f">= {minimum:g}", none_ok)
    number = _number(name, value, allowed, none_ok)
    if number is not None and not number >= minimum:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def in_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> Any:
    """`value` unchanged if it is a finite number in [low, high] ((low, high] if `low_open`)."""
    allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    number = _number(name, value, allowed, False)
    assert number is not None
    if not (low < number if low_open else low <= number) or not number <= high:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def integer(name: str, value: Any, minimum: int, *, none_ok: bool = False) -> Any:
    """`value` unchanged if it is an int (not a bool) >= `minimum` (or None when `none_ok`)."""
    if value is None and none_ok:
        return None
    allowed = _or_none(f"an integer >= {minimum}", none_ok)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value
