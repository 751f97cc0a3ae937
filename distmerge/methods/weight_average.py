"""Weight averaging: theta = sum_t w_t theta_t / sum_t w_t (MergeLM average_merging; mergekit linear).

Under DARE (``then: weight_average``) it is the generalized merge's ``mean`` of the dropped task vectors: the
average of (theta_0 + delta_t) is theta_0 + the average of delta_t.
"""

from __future__ import annotations

from dataclasses import dataclass

from distmerge.methods.execute import ChunkResult
from distmerge.methods.generalized import Recipe, TaskVectorMerge
from distmerge.ops import dare_fused
from distmerge.ops.compiled import ORDERED_SUM_TASKS
from distmerge.ops.task_vectors import weight_average


@dataclass(frozen=True)
class WeightAverageParams:
    normalize: bool = True  # divide by the summed weights; false gives a plain weighted sum

    def validate(self, where: str) -> None:
        pass


class WeightAverage(TaskVectorMerge):
    name = "weight_average"
    Params = WeightAverageParams
    needs_base = False
    paper = "Wortsman et al. 2022, Model soups (arXiv:2203.05482)"
    mergekit_name = "linear"

    def divides_by_weight_sum(self) -> bool:
        return self.params.normalize

    def recipe(self) -> Recipe:
        return Recipe(combine="mean" if self.params.normalize else "sum")

    def merge(self, base, experts, job, offset, state):
        if len(experts) <= ORDERED_SUM_TASKS and dare_fused.available(*experts, widening=self.widens_bfloat16):
            return ChunkResult(dare_fused.weighted_sum(None, experts, job.weights, 1.0, self.params.normalize))
        if len(experts) <= ORDERED_SUM_TASKS and not self.widens_bfloat16 and dare_fused.rounds_bfloat16(*experts):
            return ChunkResult(dare_fused.rounded_sum(None, experts, job.weights, 1.0, self.params.normalize))  # bf16
        _, experts = self._float32(None, experts)
        return ChunkResult(weight_average(experts, job.weights, self.params.normalize))
