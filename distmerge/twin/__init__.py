"""Twin-Merging (spec algorithms.md §7): a shared expert theta*, every task's exclusive part E_t = compress(theta_t -
theta*) as low-rank factors, and a router that weighs them per input.

``build`` writes a twin folder (``distmerge twin build``), ``load`` gives its routed transformers model (batched:
one batch mixes routings), ``write_task_model`` writes theta* + E_task as a plain folder (``distmerge twin task``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["build", "load", "write_task_model", "is_twin_folder"]


def build(*args: Any, **kwargs: Any):
    from distmerge.twin.builder import build as _build

    return _build(*args, **kwargs)


def load(*args: Any, **kwargs: Any):
    from distmerge.twin.routed import load as _load

    return _load(*args, **kwargs)


def write_task_model(*args: Any, **kwargs: Any):
    from distmerge.twin.task import write_task_model as _write

    return _write(*args, **kwargs)


def is_twin_folder(path) -> bool:
    from distmerge.twin.folder import is_twin_folder as _is

    return _is(path)
