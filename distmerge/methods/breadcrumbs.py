"""Model Breadcrumbs (Davari & Belilovsky 2023): per tensor, drop the ``gamma`` largest |tau| (outliers) and
the smallest, keep ``density``; sum the masked task vectors (``breadcrumbs``) or merge them with TIES' sign
consensus (``breadcrumbs_ties``). Configurations of the generalized task-vector merge.

``convention: paper`` cuts as the paper means (``ops.sparsify.outlier_mask``: density + gamma <= 1, ties broken
by index); ``mergekit`` reproduces mergekit 0.1.5's ``magnitude_outliers`` element for element (its cut shrinks
the outlier drop when density + gamma > 1) and its +1 for zero-sum signs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distmerge.errors import ConfigError
from distmerge.methods.base import Setting, require_choice, require_number
from distmerge.methods.generalized import CONVENTIONS, Recipe, Sparsifier, TaskVectorMerge

PAPER = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)"


@dataclass(frozen=True)
class BreadcrumbsParams:
    ALIASES = {"lambda": "lam"}
    PER_MODEL = {"density": Setting(0.0, 1.0), "gamma": Setting(0.0, 1.0)}
    lam: float = 1.0
    density: Any = 0.9  # fraction of each task vector kept (a setting: per model, a gradient, filters)
    gamma: Any = 0.01  # fraction of the largest |tau| dropped as outliers (a setting)
    convention: str = "paper"  # paper | mergekit: the cut, and (with a consensus) the sign of zero sums
    rescale: str = "none"  # none | l1: scale each masked task vector back to its L1 norm (mergekit's rescale)
    normalize: bool = False  # divide by the summed weights (of the agreeing models, with a consensus)

    def validate(self, where: str) -> None:
        require_number(where, "lambda", self.lam)
        require_choice(where, "convention", self.convention, CONVENTIONS)
        require_choice(where, "rescale", self.rescale, ("none", "l1"))
        require_choice(where, "normalize", self.normalize, (True, False))


class Breadcrumbs(TaskVectorMerge):
    name = "breadcrumbs"
    Params = BreadcrumbsParams
    paper = PAPER
    mergekit_name = "breadcrumbs"
    consensus = "none"

    def divides_by_weight_sum(self) -> bool:
        return self.params.normalize and self.consensus == "none"

    def initial_state(self, jobs):
        if self.params.convention == "paper":  # the paper's cut needs room for both; checked before any read
            for job in jobs:
                for model, density, gamma in zip(job.model_names, job.per_model["density"], job.per_model["gamma"]):
                    if density + gamma > 1.0:
                        raise ConfigError(f"models[{model}].parameters: tensor '{job.name}': breadcrumbs keeps density "
                                          f"{density} below the gamma {gamma} it drops: density + gamma must be <= 1 "
                                          f"(convention 'mergekit' shrinks the outlier cut instead)")
        return super().initial_state(jobs)

    def recipe(self) -> Recipe:
        p = self.params
        cut = Sparsifier("breadcrumbs", rescale=p.rescale, convention=p.convention)
        return Recipe(sparsify=(cut,), consensus=self.consensus, combine="mean" if p.normalize else "sum",
                      zero_sign=p.convention, lam=p.lam)


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    mergekit_name = "breadcrumbs_ties"
    consensus = "mass"
