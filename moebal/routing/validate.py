"""The checks every config repeats: numbers in a range, ints, bools, one of a few choices.

Each raises ``ValueError`` naming the field and the offending value, e.g.
``iters must be an int >= 1, got 0``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int = 0) -> None:
    """``value`` is an int (not a bool) ``>= minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_number(
    name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
    low_open: bool = False, high_open: bool = False,
) -> None:
    """``value`` is a finite number in the interval from ``low`` to ``high`` (None: no
    bound; ``*_open``: the bound itself is excluded)."""
    ok = is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if low is not None or high is not None else ""
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
