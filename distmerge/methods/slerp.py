"""Spherical interpolation of two models, as mergekit 0.1.5 computes it (``distmerge.ops.slerp``).

* ``slerp``: the two models of ``models:`` (the first is the t = 0 endpoint; mergekit's ``base_model``), ``t``
  a number, a layer gradient (``t: [0, 0.5, 1]``) or a filtered list, resolved per tensor.
* ``nuslerp``: two models with per-model ``weight`` (t = w_2 / (w_1 + w_2)), along rows (``row_wise``) or the
  flattened tensor (``flatten``, the default); ``use_base: true`` slerps the task vectors against
  ``base_model`` and adds it back (mergekit does so whenever a base_model is given).

Whole tensors: the angle is a reduction over the tensor (over each row without ``flatten``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distmerge.errors import ConfigError
from distmerge.methods.base import MergeMethod, Setting
from distmerge.methods.execute import ChunkResult
from distmerge.methods.model_stock import require_experts
from distmerge.ops import slerp as ops


def _require_bool(where: str, key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class SlerpParams:
    PER_TENSOR = {"t": Setting(0.0, 1.0)}
    t: Any = 0.5  # 0: the first model, 1: the second; a number, a layer gradient or a filtered list

    def validate(self, where: str) -> None:
        pass  # t's range is checked on every entry by build_params (PER_TENSOR)


class TwoModels(MergeMethod):
    """Whole tensors of exactly two models (besides an optional base)."""

    def chunkable(self) -> bool:
        return False

    def initial_state(self, jobs):
        require_experts(self.name, jobs, 2, exact=True)
        return {}


class Slerp(TwoModels):
    name = "slerp"
    Params = SlerpParams
    needs_base = False
    per_model_keys = frozenset()

    def merge(self, base, experts, job, offset, state):
        return ChunkResult(ops.slerp(float(job.per_tensor["t"]), experts[0], experts[1]))


@dataclass(frozen=True)
class NuSlerpParams:
    ALIASES = {"nuslerp_row_wise": "row_wise", "nuslerp_flatten": "flatten"}
    row_wise: bool = False  # slerp columns as vectors (mergekit's nuslerp_row_wise); else rows
    flatten: bool = True  # one angle for the whole tensor (mergekit's nuslerp_flatten)
    use_base: bool = False  # slerp the task vectors against base_model

    def validate(self, where: str) -> None:
        _require_bool(where, "nuslerp_row_wise", self.row_wise)
        _require_bool(where, "nuslerp_flatten", self.flatten)
        _require_bool(where, "use_base", self.use_base)


class NuSlerp(TwoModels):
    name = "nuslerp"
    Params = NuSlerpParams

    def __init__(self, params):
        super().__init__(params)
        self.needs_base = params.use_base  # the engine reads the base only when the method uses it

    def merge(self, base, experts, job, offset, state):
        return ChunkResult(ops.nuslerp(experts, job.weights, base if self.params.use_base else None,
                                       self.params.row_wise, self.params.flatten))
