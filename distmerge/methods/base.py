"""What the engine needs from a merge method: its parameters, its reduction passes, its per-chunk merge.

A method object is small and picklable: the driver builds it from the config, ships it to every worker,
and the workers call ``stats`` (reduction passes) and ``merge`` on chunks of tensors. The math lives in
``distmerge.ops``; a method only decides which op runs with which numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from distmerge.errors import ConfigError
from distmerge.methods.execute import ArtifactStream, ChunkResult


@dataclass(frozen=True)
class TensorJob:
    """One output tensor as a method sees it: its name, size and the per-model numbers resolved for it."""

    name: str
    numel: int
    model_names: tuple[str, ...]
    weights: tuple[float, ...]
    densities: tuple[float | None, ...]
    drop_rates: tuple[float | None, ...]


# The ranges of the per-model parameters a method may declare in ``per_model_keys``, as require_number's
# (lo, hi, lo_open): checked on every value a config gives, gradients and filtered lists included.
PER_MODEL_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "weight": (None, None, False),
    "density": (0.0, 1.0, True),
    "drop_rate": (0.0, 1.0, False),
}


class MergeMethod:
    """Base class. Subclasses set ``name``, ``Params`` and override ``merge`` (and the pass hooks if any)."""

    name: ClassVar[str]
    Params: ClassVar[type]
    needs_base: ClassVar[bool] = True
    # Folder of the method's artifacts beside the shards (one file per shard, streamed as the shard is), or None.
    artifact_folder: ClassVar[str | None] = None
    per_model_keys: ClassVar[frozenset[str]] = frozenset({"weight"})

    def __init__(self, params: Any):
        self.params = params

    # --- planning -------------------------------------------------------------------------------
    def chunkable(self) -> bool:
        """True when the merge is elementwise given the pass results, so rows can be processed in chunks;
        False gives ``stats`` and ``merge`` whole tensors (one layer group at a time per actor, so memory
        stays bounded by the largest layer group)."""
        return True

    def initial_state(self, jobs: list[TensorJob]) -> dict:
        """State before the first pass, from every tensor's resolved numbers (checked here, before any read)."""
        return {}

    def next_pass(self, state: dict) -> str | None:
        """Name of the next whole-model reduction pass, or None when ``merge`` can run."""
        return None

    def stats(self, pass_name: str, base: torch.Tensor | None, experts: list[torch.Tensor], job: TensorJob,
              offset: int, state: dict) -> dict[str, Any]:
        """A summable partial (tensors or numbers) of one chunk for a reduction pass."""
        raise NotImplementedError(f"{self.name} has no pass {pass_name!r}")

    def finish_pass(self, pass_name: str, totals: dict[str, Any], state: dict) -> dict:
        """Turn the summed partials of a pass into state for the next pass or the merge."""
        raise NotImplementedError(f"{self.name} has no pass {pass_name!r}")

    def divides_by_weight_sum(self) -> bool:
        """True when the merge divides by the sum of the models' weights (a zero sum is then refused)."""
        return False

    # --- work -----------------------------------------------------------------------------------
    def merge(self, base: torch.Tensor | None, experts: list[torch.Tensor], job: TensorJob, offset: int,
              state: dict) -> ChunkResult:
        """The merged chunk, with the method's artifacts and deferred decision if any; ``offset`` is the
        chunk's first flat element."""
        raise NotImplementedError

    def settle_deferred(self, state: dict, vote: int) -> tuple[dict, bool]:
        """With the model-wide sum of the chunks' ``Deferred.vote``: the state for the card, and whether the
        recorded patches apply."""
        return state, False

    def record_patched(self, state: dict, count: int) -> dict:
        """The state once ``count`` deferred elements were rewritten."""
        return state

    # --- artifacts (methods with an ``artifact_folder``) ----------------------------------------------
    def artifact_entries(self, tensor, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(key, dtype, shape) of a merged tensor's artifacts, in the order its stream writes them."""
        return []

    def artifact_stream(self, tensor, dtype: torch.dtype) -> ArtifactStream:
        raise NotImplementedError

    # --- reporting ------------------------------------------------------------------------------
    def describe(self, state: dict) -> dict[str, Any]:
        """Numbers worth putting on the model card (thresholds, rescalers)."""
        return {}

    def card_lines(self) -> list[str]:
        """Markdown the model card adds for this method (how to use its artifacts)."""
        return []


def build_params(params_cls: type, raw: dict[str, Any], where: str = "parameters") -> Any:
    """Build a params dataclass from YAML values; unknown keys and wrong types name the key."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    aliases = getattr(params_cls, "ALIASES", {})
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field_name = aliases.get(key, key)
        if field_name not in fields:
            allowed = sorted(fields_yaml_names(params_cls))
            raise ConfigError(f"{where}.{key}: unknown parameter for this method (allowed: {', '.join(allowed) or 'none'})")
        values[field_name] = value
    try:
        params = params_cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    check = getattr(params, "validate", None)
    if check is not None:
        check(where)
    return params


def fields_yaml_names(params_cls: type) -> list[str]:
    """Parameter names as written in YAML (``lambda`` rather than ``lam``)."""
    reverse = {v: k for k, v in getattr(params_cls, "ALIASES", {}).items()}
    return [reverse.get(f.name, f.name) for f in dataclasses.fields(params_cls)]


def params_to_yaml(params: Any) -> dict[str, Any]:
    reverse = {v: k for k, v in getattr(type(params), "ALIASES", {}).items()}
    return {reverse.get(k, k): v for k, v in dataclasses.asdict(params).items()}


def require_choice(where: str, key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{where}.{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def require_number(where: str, key: str, value: Any, lo: float | None = None, hi: float | None = None,
                   lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
    if not math.isfinite(value):  # NaN passes every range comparison and would merge into an all-NaN model
        raise ConfigError(f"{where}.{key}: {value} is not a finite number")
    span = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        raise ConfigError(f"{where}.{key}: {value} is out of range {span}")


class TaskVectorMethod(MergeMethod):
    """A method defined on task vectors tau_t = theta_t - theta_0; DARE reuses it on dropped vectors."""

    def stats(self, pass_name, base, experts, job, offset, state):
        return self.stats_delta(pass_name, base, stack_task_vectors(base, experts), job, offset, state)

    def merge(self, base, experts, job, offset, state):
        return as_result(self.merge_delta(base, stack_task_vectors(base, experts), job, offset, state))

    def stats_delta(self, pass_name: str, base: torch.Tensor, task_vector: torch.Tensor, job: TensorJob,
                    offset: int, state: dict) -> dict[str, Any]:
        raise NotImplementedError(f"{self.name} has no pass {pass_name!r}")

    def merge_delta(self, base: torch.Tensor, task_vector: torch.Tensor, job: TensorJob, offset: int,
                    state: dict) -> torch.Tensor | ChunkResult:
        """The merged chunk, or a ``ChunkResult`` when the method defers part of its decision."""
        raise NotImplementedError


def as_result(merged: torch.Tensor | ChunkResult) -> ChunkResult:
    return merged if isinstance(merged, ChunkResult) else ChunkResult(merged)


def stack_task_vectors(base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
    if base is None:
        raise ConfigError("this method needs base_model: task vectors are taken against it")
    return torch.stack([expert - base for expert in experts])
