"""Task Arithmetic: theta = theta_0 + lambda * sum_t w_t tau_t (Ilharco et al. 2023; spec section 2): the
generalized task-vector merge with no sparsifier and no consensus."""

from __future__ import annotations

from dataclasses import dataclass

from distmerge.methods.base import require_number
from distmerge.methods.generalized import Recipe, TaskVectorMerge


@dataclass(frozen=True)
class TaskArithmeticParams:
    ALIASES = {"lambda": "lam"}
    lam: float = 1.0
    normalize: bool = False  # mergekit's option: divide the weighted sum by the summed weights

    def validate(self, where: str) -> None:
        require_number(where, "lambda", self.lam)


class TaskArithmetic(TaskVectorMerge):
    name = "task_arithmetic"
    Params = TaskArithmeticParams
    paper = "Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)"
    mergekit_name = "task_arithmetic"

    def divides_by_weight_sum(self) -> bool:
        return self.params.normalize

    def recipe(self) -> Recipe:
        return Recipe(combine="mean" if self.params.normalize else "sum", lam=self.params.lam)
