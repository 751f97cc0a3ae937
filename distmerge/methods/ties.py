"""TIES-Merging (spec section 3): trim per task, elect a sign, merge the agreeing values; a configuration of
the generalized task-vector merge (``methods.generalized``): magnitude trim, mass consensus, mean or sum.

``trim_scope: global`` is the paper's: one threshold per task over the whole model, found exactly by two
histogram passes over all actors (``distmerge.ops.ties``). ``trim_scope: tensor`` is mergekit's and PEFT's:
a threshold per tensor, no reduction pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distmerge.errors import ConfigError
from distmerge.methods.base import Setting, require_choice, require_number
from distmerge.methods.generalized import Recipe, Sparsifier, TaskVectorMerge


@dataclass(frozen=True)
class TiesParams:
    ALIASES = {"lambda": "lam"}
    PER_MODEL = {"density": Setting(0.0, 1.0, lo_open=True)}
    lam: float = 1.0
    density: Any = 0.2  # fraction of each task vector kept by the trim (a setting: per model, a gradient, filters)
    trim_scope: str = "global"  # global (paper) | tensor (mergekit, PEFT)
    disjoint: str = "mean"  # mean | sum
    convention: str = "paper"  # paper | mergekit: trim count and the sign given to zero-sum elements
    trim_rescale: str = "none"  # none | l1: scale each trimmed task vector back to its L1 norm (mergekit's rescale)

    def validate(self, where: str) -> None:
        require_number(where, "lambda", self.lam)
        require_choice(where, "trim_scope", self.trim_scope, ("global", "tensor"))
        require_choice(where, "disjoint", self.disjoint, ("mean", "sum"))
        require_choice(where, "convention", self.convention, ("paper", "mergekit"))
        require_choice(where, "trim_rescale", self.trim_rescale, ("none", "l1"))
        if self.trim_rescale == "l1" and self.trim_scope != "tensor":
            raise ConfigError(f"{where}.trim_rescale: 'l1' is a per-tensor rescale; it needs trim_scope 'tensor'")


class Ties(TaskVectorMerge):
    name = "ties"
    Params = TiesParams
    paper = "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)"
    mergekit_name = "ties"

    def recipe(self) -> Recipe:
        p = self.params
        trim = Sparsifier("magnitude", rescale=p.trim_rescale, scope=p.trim_scope, convention=p.convention)
        return Recipe(sparsify=(trim,), consensus="mass", combine=p.disjoint, zero_sign=p.convention, lam=p.lam)
