"""DARE (spec section 4): drop and rescale each task vector, then merge with weight_average, task_arithmetic
or ties. The masks are seeded by (seed, model, tensor, block) so any actor layout draws the same ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from distmerge.errors import ConfigError
from distmerge.methods.base import (
    MergeMethod,
    Setting,
    TaskVectorMethod,
    as_result,
    build_params,
    params_to_yaml,
    require_choice,
    stack_task_vectors,
)
from distmerge.ops import dare as ops

INNER_METHODS = ("weight_average", "task_arithmetic", "ties")


@dataclass(frozen=True)
class DareParams:
    PER_MODEL = {"drop_rate": Setting(0.0, 1.0)}
    drop_rate: Any = 0.9  # probability of dropping an element of a task vector (a setting, as TIES' density)
    then: str = "task_arithmetic"
    seed: int = 0
    rescale: str = "inverse"  # inverse: 1/(1-p) (paper) | l1: match tau's L1 norm (mergekit) | none (DropOnly)
    inner: Any = field(default=None, compare=False)  # the params of `then`

    def validate(self, where: str) -> None:
        require_choice(where, "then", self.then, INNER_METHODS)
        require_choice(where, "rescale", self.rescale, ("inverse", "l1", "none"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"{where}.seed: expected an integer, got {self.seed!r}")


class Dare(MergeMethod):
    name = "dare"
    Params = DareParams

    def __init__(self, params: DareParams, inner: TaskVectorMethod):
        super().__init__(params)
        self.inner = inner
        self.per_model_keys = inner.per_model_keys

    def per_model_settings(self):
        return {**self.inner.per_model_settings(), **super().per_model_settings()}

    def per_tensor_settings(self):
        return {**self.inner.per_tensor_settings(), **super().per_tensor_settings()}

    def setting_value(self, key):
        return self.params.drop_rate if key == "drop_rate" else self.inner.setting_value(key)

    @classmethod
    def from_raw(cls, raw: dict[str, Any], where: str, registry: dict[str, type[MergeMethod]]) -> "Dare":
        own_keys = {"drop_rate", "then", "seed", "rescale"}
        own = {k: v for k, v in raw.items() if k in own_keys}
        params = build_params(DareParams, own, where)
        inner_cls = registry[params.then]
        inner = inner_cls(build_params(inner_cls.Params, {k: v for k, v in raw.items() if k not in own_keys}, where))
        return cls(params, inner)

    def to_yaml(self) -> dict[str, Any]:
        own = params_to_yaml(self.params)
        own.pop("inner", None)
        return {**own, **params_to_yaml(self.inner.params)}

    def chunkable(self) -> bool:
        return self.params.rescale != "l1" and self.inner.chunkable()

    def divides_by_weight_sum(self) -> bool:
        return self.inner.divides_by_weight_sum()

    def initial_state(self, jobs):
        return self.inner.initial_state(jobs)

    def next_pass(self, state):
        return self.inner.next_pass(state)

    def dropped(self, base: torch.Tensor, experts: list[torch.Tensor], job, offset: int) -> torch.Tensor:
        task_vector = stack_task_vectors(base, experts)  # a fresh tensor: dropped in place below
        stop = offset + task_vector[0].numel()
        for t, model in enumerate(job.model_names):
            rate = job.per_model["drop_rate"][t]
            if self.params.rescale == "l1":  # the factor depends on the values
                keep = ops.keep_mask(rate, self.params.seed, model, job.name, job.numel, offset, stop)
                task_vector[t] = ops.drop_and_rescale(task_vector[t], keep, rate, "l1")
                continue
            scale = ops.keep_scale(rate, ops.inverse_scale(rate, self.params.rescale), self.params.seed, model,
                                   job.name, job.numel, offset, stop)
            task_vector[t].mul_(scale.to(task_vector.device).reshape(task_vector[t].shape))
        return task_vector

    def stats(self, pass_name, base, experts, job, offset, state):
        return self.inner.stats_delta(pass_name, base, self.dropped(base, experts, job, offset), job, offset, state)

    def finish_pass(self, pass_name, totals, state):
        return self.inner.finish_pass(pass_name, totals, state)

    def merge(self, base, experts, job, offset, state):
        return as_result(self.inner.merge_delta(base, self.dropped(base, experts, job, offset), job, offset, state))

    def settle_deferred(self, state, vote):
        return self.inner.settle_deferred(state, vote)

    def record_patched(self, state, count):
        return self.inner.record_patched(state, count)

    def describe(self, state):
        return self.inner.describe(state)
