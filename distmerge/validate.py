"""Checks of config values shared by every config reader (merge methods, FDA, AdaMerging, measure, Twin).

Each check returns the value it accepted, or raises a ``ConfigError`` whose message starts with ``where``
(the key as the user wrote it, e.g. ``anchors.count`` or ``models[0].parameters.weight``), so every config
reports a bad value in the same words.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

from distmerge.errors import ConfigError


def is_int(value: Any) -> bool:
    """An integer that is not a bool (YAML's true/false are ints to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def number(where: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False) -> Any:
    """A finite number within the bounds (None: unbounded on that side), as a float; with ``integer``, an int."""
    if integer:
        if not is_int(value) or not _within(value, lo, hi, lo_open, hi_open):
            raise ConfigError(f"{where}: expected an integer{_integer_bounds(lo, hi, lo_open, hi_open)}, "
                              f"got {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):  # NaN passes every range comparison and would merge into an all-NaN model
        raise ConfigError(f"{where}: {value} is not a finite number")
    if not _within(value, lo, hi, lo_open, hi_open):
        raise ConfigError(f"{where}: {value} is out of range {span(lo, hi, lo_open, hi_open)}")
    return float(value)


def choice(where: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def no_unknown(where: str, raw: dict, allowed: Collection[str]) -> None:
    """Refuse the first key of ``raw`` (in sorted order) that is not ``allowed``; ``where`` "" is the top level."""
    unknown = sorted(set(raw) - set(allowed), key=str)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"{key}: unknown key (allowed: {', '.join(sorted(allowed))})")


def span(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    """An interval as it is written in messages: ``(0, 1]``; a missing bound is an open infinity."""
    left = "[" if lo is not None and not lo_open else "("
    right = "]" if hi is not None and not hi_open else ")"
    return f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"


def _within(value: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    above = lo is None or value > lo or (not lo_open and value == lo)
    below = hi is None or value < hi or (not hi_open and value == hi)
    return above and below


def _integer_bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    # Integers read better as ">= 1" than as "[1, inf)"; an open bound is the next integer inside it.
    low = None if lo is None else (math.floor(lo) + 1 if lo_open or lo != math.floor(lo) else int(lo))
    high = None if hi is None else (math.ceil(hi) - 1 if hi_open or hi != math.ceil(hi) else int(hi))
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""
