"""EMR-Merging (spec section 5): a unified task vector, a mask and a rescaler per task.

The output model folder holds the base weights (the shared backbone) and, in ``emr/``, the unified task
vector, the bit-packed masks (one file per shard, streamed chunk by chunk as the shard is) and the rescalers
(in ``emr/index.json``); ``distmerge emr-task`` materializes one task's model.
"""

from __future__ import annotations

from dataclasses import dataclass

from distmerge.deferred import torch
from distmerge.methods.base import MergeMethod, stack_task_vectors
from distmerge.methods.execute import ChunkResult
from distmerge.ops import emr as ops
from distmerge.ops import emr_fused
from distmerge.ops.compiled import ORDERED_SUM_TASKS


@dataclass(frozen=True)
class EmrParams:
    def validate(self, where: str) -> None:
        pass


class Emr(MergeMethod):
    name = "emr"
    Params = EmrParams
    artifact_folder = "emr"
    per_model_keys = frozenset()

    # The rescalers only go into emr/index.json, never into a written value: their sums come with the merge
    # (one read of every input) instead of a pass before it (two reads).
    def merge(self, base, experts, job, offset, state):
        if base is not None and len(experts) <= ORDERED_SUM_TASKS and emr_fused.available(base, *experts):
            unified, masks, abs_task, abs_masked = emr_fused.elect(base, experts, with_sums=True)
            sums = ops.magnitude_sums(abs_task, abs_masked, job.numel)
        else:
            task_vector = stack_task_vectors(base, experts)
            unified, masks = ops.elect(task_vector)
            sums = ops.rescaler_sums(task_vector, unified, masks, job.numel)
        return ChunkResult(base, artifacts={"vector": unified, "mask": masks}, partial={"sums": sums})

    def finish_merge(self, totals, state):
        return {**state, "rescalers": ops.rescalers(totals["sums"])}

    def artifact_entries(self, tensor, dtype):
        tasks = len(tensor.job.model_names)
        return [(tensor.name, dtype, tuple(tensor.shape)),
                (f"{tensor.name}::mask", torch.uint8, (tasks, ops.packed_bytes(tensor.shape)))]

    def artifact_stream(self, tensor, dtype):
        return _EmrStream(tensor.name, len(tensor.job.model_names), tuple(tensor.shape))

    builds_task_models = True

    def task_weights(self, weights, artifacts, state, task):
        rescaler = float(state["rescalers"][task])
        out = dict(weights)
        for name, unified in artifacts.items():
            if not name.endswith("::mask"):
                out[name] = ops.task_tensor(weights[name], unified, artifacts[f"{name}::mask"][task:task + 1], rescaler)
        return out

    def describe(self, state):
        return {"rescalers": state.get("rescalers")}

    def card_lines(self):
        return ["## EMR", "",
                "The weights in this folder are the shared backbone (the base). `emr/` holds the unified task "
                "vector, a bit-packed mask and a rescaler per task. Materialize a task's model with", "",
                "```", "distmerge emr-task THIS_FOLDER --task NAME --out DIR", "```", ""]


class _EmrStream:
    """The unified vector goes out chunk by chunk; the masks are packed as they come (an eighth of a byte per
    element and task) and go out whole after the tensor, keeping ``pack_mask``'s [T, bytes] layout."""

    def __init__(self, name: str, tasks: int, shape: tuple[int, ...]):
        self.name = name
        self.packer = ops.MaskPacker(tasks, shape)

    def add(self, artifacts):
        self.packer.add(artifacts["mask"].cpu())
        return [(self.name, artifacts["vector"].cpu())]

    def finish(self):
        return [(f"{self.name}::mask", self.packer.finish())]
