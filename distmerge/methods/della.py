"""DELLA-Merging (Deep et al. 2024): MagPrune drops each task-vector entry at random with a keep probability
that rises with its magnitude's rank in its row (``density`` -/+ ``epsilon``), rescales the kept ones, then
merges with TIES' sign consensus and mean (``della``) or sums (``della_linear``); lambda scales the result.
Configurations of the generalized task-vector merge.

The draw is distmerge's counter-based stream per (seed, model, tensor, block), as DARE's, so any actor layout
gives the same model. ``rescale: inverse`` (default) is the paper's 1/p; ``l1`` is mergekit's (each pruned
tensor scaled back to its L1 norm); with ``convention: mergekit`` zero-sum signs take +1. mergekit's masks come
from ``torch.bernoulli`` and are not reproducible; only their distribution matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distmerge.errors import ConfigError
from distmerge.methods.base import Setting, require_choice, require_number
from distmerge.methods.generalized import CONVENTIONS, Recipe, Sparsifier, TaskVectorMerge
from distmerge.ops.sparsify import check_della_window

PAPER = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"


@dataclass(frozen=True)
class DellaParams:
    ALIASES = {"lambda": "lam"}
    PER_MODEL = {"density": Setting(0.0, 1.0), "epsilon": Setting(0.0, 1.0)}
    lam: float = 1.0
    density: Any = 0.7  # mean keep probability (a setting: per model, a gradient, filters)
    epsilon: Any = 0.15  # half-width of the keep probabilities around density (a setting)
    rescale: str = "inverse"  # inverse: 1/p (paper) | l1: back to the tensor's L1 norm (mergekit) | none
    convention: str = "paper"  # paper | mergekit: the sign of zero-sum elements under the consensus
    normalize: bool | None = None  # divide by the summed (agreeing) weights; default: della yes, della_linear no
    seed: int = 0

    def validate(self, where: str) -> None:
        require_number(where, "lambda", self.lam)
        require_choice(where, "rescale", self.rescale, ("inverse", "l1", "none"))
        require_choice(where, "convention", self.convention, CONVENTIONS)
        require_choice(where, "normalize", self.normalize, (True, False, None))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"{where}.seed: expected an integer, got {self.seed!r}")


class Della(TaskVectorMerge):
    name = "della"
    Params = DellaParams
    paper = PAPER
    mergekit_name = "della"
    consensus = "mass"
    default_normalize = True

    def normalize(self) -> bool:
        return self.default_normalize if self.params.normalize is None else self.params.normalize

    def divides_by_weight_sum(self) -> bool:
        return self.normalize() and self.consensus == "none"

    def chunkable(self) -> bool:
        return False  # ranks are taken along whole rows, and a 1-D tensor is one row

    def initial_state(self, jobs):
        for job in jobs:  # every tensor's window, before any tensor is read
            for model, density, epsilon in zip(job.model_names, job.per_model["density"], job.per_model["epsilon"]):
                try:
                    check_della_window(density, epsilon)
                except ValueError as exc:
                    raise ConfigError(f"models[{model}].parameters: tensor '{job.name}': {exc}") from None
        return super().initial_state(jobs)

    def recipe(self) -> Recipe:
        p = self.params
        prune = Sparsifier("della", rescale=p.rescale, convention=p.convention)
        return Recipe(sparsify=(prune,), consensus=self.consensus, combine="mean" if self.normalize() else "sum",
                      zero_sign=p.convention, lam=p.lam, seed=p.seed)


class DellaLinear(Della):
    name = "della_linear"
    mergekit_name = "della_linear"
    consensus = "none"
    default_normalize = False
