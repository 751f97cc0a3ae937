"""Weight averaging: theta = sum_t w_t theta_t / sum_t w_t (MergeLM average_merging; mergekit linear)."""

from __future__ import annotations

from dataclasses import dataclass

from distmerge.methods.execute import ChunkResult
from distmerge.methods.base import TaskVectorMethod
from distmerge.ops.task_vectors import weight_average, weighted_sum


@dataclass(frozen=True)
class WeightAverageParams:
    normalize: bool = True  # divide by the summed weights; false gives a plain weighted sum

    def validate(self, where: str) -> None:
        pass


class WeightAverage(TaskVectorMethod):
    name = "weight_average"
    Params = WeightAverageParams
    needs_base = False

    def divides_by_weight_sum(self) -> bool:
        return self.params.normalize

    def merge(self, base, experts, job, offset, state):
        return ChunkResult(weight_average(experts, job.weights, self.params.normalize))

    def merge_delta(self, base, task_vector, job, offset, state):
        # Used under DARE: the average of (theta_0 + delta_t) is theta_0 + the average of delta_t.
        merged = weighted_sum(task_vector, job.weights)
        total = sum(job.weights)
        if self.params.normalize and abs(total) >= 1e-8:
            merged = merged / total
        return base + merged
