"""Range and choice checks of the config dataclasses, one message format everywhere.

Messages name the field plainly first (``"width must be >= 1, got 0"``); the params loader (``tasks.config``)
prefixes the full key (``pretrain.model.width``).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


def at_least(obj: object, minimum: int, *fields: str) -> None:
    """Every named field of ``obj`` is >= ``minimum``."""
    for name in fields:
        value = getattr(obj, name)
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def positive(obj: object, *fields: str) -> None:
    """Every named field of ``obj`` is > 0 (NaN fails too)."""
    for name in fields:
        value = getattr(obj, name)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def one_of(name: str, value: str, allowed: Sequence[str]) -> None:
    """``value`` is one of ``allowed``; the message suggests the closest one."""
    if value not in allowed:
        hint = difflib.get_close_matches(value, list(allowed), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"{name} = {value!r} is not one of {', '.join(allowed)}{extra}")


def choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    """Every value is one of ``allowed``, and none twice."""
    for v in values:
        one_of(name, v, allowed)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {list(values)}")


def positive_ints(name: str, values: Sequence[int]) -> None:
    """Every value is >= 1, and none twice."""
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must all be >= 1, got {list(values)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {list(values)}")
