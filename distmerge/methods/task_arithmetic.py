"""Task Arithmetic: theta = theta_0 + lambda * sum_t w_t tau_t (Ilharco et al. 2023; spec section 2)."""

from __future__ import annotations

from dataclasses import dataclass

from distmerge.methods.base import TaskVectorMethod, require_number
from distmerge.ops.task_vectors import task_arithmetic


@dataclass(frozen=True)
class TaskArithmeticParams:
    ALIASES = {"lambda": "lam"}
    lam: float = 1.0
    normalize: bool = False  # mergekit's option: divide the weighted sum by the summed weights

    def validate(self, where: str) -> None:
        require_number(where, "lambda", self.lam)


class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    Params = TaskArithmeticParams

    def divides_by_weight_sum(self) -> bool:
        return self.params.normalize

    def merge_delta(self, base, task_vector, job, offset, state):
        return task_arithmetic(base, task_vector, job.weights, self.params.lam, self.params.normalize)
