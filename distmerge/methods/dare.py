"""DARE (spec section 4): drop and rescale each task vector, then merge with weight_average, task_arithmetic
or ties. The masks are seeded by (seed, model, tensor, block) so any actor layout draws the same ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from distmerge.errors import ConfigError
from distmerge.methods.base import MergeMethod, Setting, build_params, params_to_yaml, require_choice
from distmerge.methods.generalized import Recipe, Sparsifier, TaskVectorMerge

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


class Dare(TaskVectorMerge):
    """The random drop in front of ``then``'s recipe (drop, then TIES' trim and consensus for ``then: ties``)."""

    name = "dare"
    Params = DareParams

    paper = "Yu et al. 2024, Language Models are Super Mario (arXiv:2311.03099)"
    mergekit_name = None  # mergekit splits it by the consensus: dare_linear, dare_ties (see the mergekit table)

    def __init__(self, params: DareParams, inner: TaskVectorMerge):
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

    def divides_by_weight_sum(self) -> bool:
        return self.inner.divides_by_weight_sum()

    def recipe(self) -> Recipe:
        inner = self.inner.recipe()
        drop = Sparsifier("random", rescale=self.params.rescale)
        return dataclasses.replace(inner, sparsify=(drop,) + inner.sparsify, seed=self.params.seed)
