"""EMR-Merging (spec section 5): a unified task vector, a mask and a rescaler per task.

The output model folder holds the base weights (the shared backbone) and, in ``emr/``, the unified task
vector, the bit-packed masks and the rescalers; ``distmerge emr-task`` materializes one task's model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distmerge.methods.base import MergeMethod, stack_task_vectors
from distmerge.ops import emr as ops


@dataclass(frozen=True)
class EmrParams:
    def validate(self, where: str) -> None:
        pass


class Emr(MergeMethod):
    name = "emr"
    Params = EmrParams
    sidecar = "emr"
    per_model_keys = frozenset()

    def next_pass(self, state):
        return None if "rescalers" in state else "rescale"

    def stats(self, pass_name, base, experts, job, offset, state):
        task_vector = stack_task_vectors(base, experts)
        unified, masks = ops.elect(task_vector)
        return {"sums": ops.rescaler_sums(task_vector, unified, masks, job.numel)}

    def finish_pass(self, pass_name, totals, state):
        return {**state, "rescalers": ops.rescalers(totals["sums"])}

    def merge(self, base, experts, job, offset, state):
        unified, masks = ops.elect(stack_task_vectors(base, experts))
        return {"weight": base, "emr_vector": unified, "emr_mask": masks}

    def describe(self, state):
        return {"rescalers": state.get("rescalers")}
