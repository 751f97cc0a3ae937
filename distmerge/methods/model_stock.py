"""Model stock (Jang et al. 2024), as mergekit 0.1.5 computes it: per tensor, the angle between the experts'
offsets from the base sets how far the experts' average is trusted over the base (``distmerge.ops.model_stock``).

Whole tensors: the angle is a reduction over the tensor (over each row with ``filter_wise``), so a chunk of rows
would see another angle. Per-model weights do not enter the formula (mergekit ignores them too).
"""

from __future__ import annotations

from dataclasses import dataclass

from distmerge.errors import ConfigError
from distmerge.methods.base import MergeMethod
from distmerge.methods.execute import ChunkResult
from distmerge.ops.model_stock import model_stock


@dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = False  # one ratio per row (mergekit's option) instead of one per tensor

    def validate(self, where: str) -> None:
        if not isinstance(self.filter_wise, bool):
            raise ConfigError(f"{where}.filter_wise: expected true or false, got {self.filter_wise!r}")


class ModelStock(MergeMethod):
    name = "model_stock"
    Params = ModelStockParams
    per_model_keys = frozenset()

    def chunkable(self) -> bool:
        return False

    def initial_state(self, jobs):
        require_experts(self.name, jobs, 2)
        return {}

    def merge(self, base, experts, job, offset, state):
        if base is None:
            raise ConfigError("model_stock needs base_model: the angle is taken between offsets from it")
        return ChunkResult(model_stock(base, experts, self.params.filter_wise))


def require_experts(method: str, jobs, count: int, exact: bool = False) -> None:
    """Refuse, before any read, a config with too few (or, ``exact``, other than ``count``) experts."""
    if not jobs:
        return
    have = len(jobs[0].model_names)
    if have < count or (exact and have != count):
        wanted = f"exactly {count}" if exact else f"at least {count}"
        raise ConfigError(f"models: method '{method}' needs {wanted} models to merge, the config has {have}")
