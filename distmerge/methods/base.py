"""What the engine needs from a merge method: its parameters, its reduction passes, its per-chunk merge.

A method object is small and picklable: the driver builds it from the config, ships it to every worker,
and the workers call ``stats`` (reduction passes) and ``merge`` on chunks of tensors. The math lives in
``distmerge.ops``; a method only decides which op runs with which numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from distmerge import validate
from distmerge.deferred import torch
from distmerge.errors import ConfigError
from distmerge.methods.execute import ArtifactStream, ChunkResult, PassMemo, add_partials
from distmerge.ops.task_vectors import task_vectors


@dataclass(frozen=True)
class TensorJob:
    """One output tensor as a method sees it: its name, size and the parameters resolved for it.

    ``per_model[key]`` holds one value per model (in ``model_names`` order) of each per-model parameter the
    method declares (``Params.PER_MODEL``): the model's own setting, else the method's parameter of that name,
    resolved for this tensor. ``per_tensor[key]`` holds each global parameter a config may give as a gradient
    or filtered list (``Params.PER_TENSOR``), resolved for this tensor. Weights are always per model, in
    ``weights``.
    """

    name: str
    numel: int
    model_names: tuple[str, ...]
    weights: tuple[float, ...]
    per_model: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    per_tensor: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Setting:
    """A parameter that may vary by model or by tensor: its range (as ``require_number``'s) and its value when
    neither a model nor the method's parameters give one. Checked on every value a config gives, gradients and
    filtered lists included: a gradient interpolates between its entries, so checking the entries checks every
    value a tensor can get, before any tensor is read."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    default: float | None = None


WEIGHT = Setting(default=1.0)
NO_SETTINGS: Mapping[str, Setting] = {}


class MergeMethod:
    """Base class. Subclasses set ``name``, ``Params`` and override ``merge`` (and the pass hooks if any)."""

    name: ClassVar[str]
    Params: ClassVar[type]
    needs_base: ClassVar[bool] = True
    # Folder of the method's artifacts beside the shards (one file per shard, streamed as the shard is), or None.
    artifact_folder: ClassVar[str | None] = None
    # Whether models take a ``weight`` (the one per-model parameter any method may have); the others are
    # declared with their ranges on ``Params.PER_MODEL``.
    per_model_keys: ClassVar[frozenset[str]] = frozenset({"weight"})

    def __init__(self, params: Any):
        self.params = params

    # --- declared parameters ----------------------------------------------------------------------
    def per_model_settings(self) -> dict[str, Setting]:
        """Every per-model parameter a config may give this method, weight included."""
        declared = {"weight": WEIGHT} if "weight" in self.per_model_keys else {}
        return {**declared, **getattr(type(self.params), "PER_MODEL", NO_SETTINGS)}

    def per_tensor_settings(self) -> dict[str, Setting]:
        """The method's global parameters a config may give as a layer gradient or a filtered list."""
        return dict(getattr(type(self.params), "PER_TENSOR", NO_SETTINGS))

    def setting_value(self, key: str) -> Any:
        """The method's own value of a declared setting (a number, gradient or filtered list), or None."""
        return getattr(self.params, key, None)

    # --- planning -------------------------------------------------------------------------------
    def chunkable(self) -> bool:
        """True when the merge is elementwise given the pass results, so rows can be processed in chunks;
        False gives ``stats`` and ``merge`` whole tensors (one layer group at a time per actor, so memory
        stays bounded by the largest layer group)."""
        return True

    def with_bfloat16_inputs(self) -> MergeMethod | None:
        """A copy of this method whose ``stats`` and ``merge`` take bfloat16 chunks as they were read and compute
        in float32 all the same (compiled loops widen a block at a time), or None where it cannot. A float32
        merge on the CPU hands such a copy its bfloat16 inputs without widening them first; a chunk's inputs come
        all bfloat16 or all float32. (This instance, given bfloat16, computes in bfloat16: a bfloat16 merge.)"""
        return None

    def initial_state(self, jobs: list[TensorJob]) -> dict:
        """State before the first pass, from every tensor's resolved numbers (checked here, before any read)."""
        return {}

    def leaves_undecided(self, state: dict) -> dict:
        """The initial state for a caller that places undecided elements after the merge (``ChunkResult.undecided``,
        ``execute.finish``): a method may then trade a reduction pass over every input for an estimate, and leave
        the elements the estimate cannot place to its passes and merge over them alone. Unchanged by default."""
        return state

    def merge_again(self, state: dict) -> dict | None:
        """After the passes over the undecided elements: None, or the initial state of a merge to run again from
        its first pass (an estimate that did not hold)."""
        return None

    def next_pass(self, state: dict) -> str | None:
        """Name of the next whole-model reduction pass, or None when ``merge`` can run (or, after the merge, the
        undecided elements be merged)."""
        return None

    def samples(self, pass_name: str) -> bool:
        """True for a pass that looks at a sample of each chunk: its reader may skip the finite check (the merge
        reads and checks every value)."""
        return False

    def stats(self, pass_name: str, base: torch.Tensor | None, experts: list[torch.Tensor], job: TensorJob,
              offset: int, state: dict) -> dict[str, Any]:
        """A summable partial (tensors or numbers) of one chunk for a reduction pass."""
        raise NotImplementedError(f"{self.name} has no pass {pass_name!r}")

    def add_stats(self, totals: dict[str, Any] | None, pass_name: str, base: torch.Tensor | None,
                  experts: list[torch.Tensor], job: TensorJob, offset: int, state: dict,
                  memo: PassMemo | None = None) -> dict[str, Any]:
        """``totals`` (None before the first chunk) with this chunk's ``stats`` added; a method whose partials
        are large may add into ``totals`` in place instead, and one whose next pass needs a little of what this
        one saw may keep it in ``memo`` (the process's, when it has one) for ``stats_from_memo``."""
        return add_partials(totals, self.stats(pass_name, base, experts, job, offset, state))

    def stats_from_memo(self, totals: dict[str, Any] | None, pass_name: str, job: TensorJob, offset: int,
                        state: dict, memo: PassMemo) -> dict[str, Any] | None:
        """``add_stats`` of this chunk from what an earlier pass kept in ``memo``, without reading the chunk;
        None when nothing was kept for it (the chunk is then read)."""
        return None

    def finish_pass(self, pass_name: str, totals: dict[str, Any], state: dict) -> dict:
        """Turn the summed partials of a pass into state for the next pass or the merge."""
        raise NotImplementedError(f"{self.name} has no pass {pass_name!r}")

    def finish_merge(self, totals: dict[str, Any], state: dict) -> dict:
        """After every chunk is merged: the state from the summed ``ChunkResult.partial`` of all chunks (summed
        in the order a pass sums its partials), for the card and the artifacts' index (EMR's rescalers)."""
        return state

    def divides_by_weight_sum(self) -> bool:
        """True when the merge divides by the sum of the models' weights (a zero sum is then refused)."""
        return False

    def check_models(self, checkpoints: dict) -> None:
        """Refuse inputs the method cannot use ({model name: opened checkpoint}), once they are open and before
        any tensor is read (RegMean: statistics measured on other models)."""

    # --- work -----------------------------------------------------------------------------------
    def merge(self, base: torch.Tensor | None, experts: list[torch.Tensor], job: TensorJob, offset: int,
              state: dict) -> ChunkResult:
        """The merged chunk, with the method's artifacts and deferred decision if any; ``offset`` is the
        chunk's first flat element."""
        raise NotImplementedError

    def deferred_outcome(self, vote: int) -> int | None:
        """The outcome of the method's deferred decisions (``Deferred``) for a vote, None for a method that
        defers none. Asked with the model-wide vote once every chunk is merged, and before each chunk with the
        vote seen so far: the chunk is merged as that outcome (``execute.LEANING``), so only chunks whose lean
        the final vote overturns are rewritten."""
        return None

    def settle_deferred(self, state: dict, vote: int) -> tuple[dict, int | None]:
        """With the model-wide sum of the chunks' ``Deferred.vote``: the state for the card, and the outcome
        (elements merged as another are rewritten)."""
        return state, self.deferred_outcome(vote)

    def record_settled(self, state: dict, count: int) -> dict:
        """The state once the ``count`` deferred elements of the model were settled."""
        return state

    # --- artifacts (methods with an ``artifact_folder``) ----------------------------------------------
    def artifact_entries(self, tensor, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(key, dtype, shape) of a merged tensor's artifacts, in the order its stream writes them."""
        return []

    def artifact_stream(self, tensor, dtype: torch.dtype) -> ArtifactStream:
        raise NotImplementedError

    # A method whose result is one model per task (a backbone plus per-task artifacts) says so; whatever scores a
    # merge held in memory (a sweep trial) then scores each task on that task's own model.
    builds_task_models: ClassVar[bool] = False

    def task_weights(self, weights: dict[str, torch.Tensor], artifacts: dict[str, torch.Tensor], state: dict,
                     task: int) -> dict[str, torch.Tensor]:
        """The weights of the model of task ``task`` (its index among the config's models)."""
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
    reverse = {v: k for k, v in aliases.items()}
    declared = {**getattr(params_cls, "PER_MODEL", NO_SETTINGS), **getattr(params_cls, "PER_TENSOR", NO_SETTINGS)}
    for key, bounds in declared.items():
        # a per-model parameter may also be given once for all models, as a setting; None: the default
        if key in fields and getattr(params, key) is not None:
            check_setting(f"{where}.{reverse.get(key, key)}", getattr(params, key), bounds)
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
    validate.choice(f"{where}.{key}", value, choices)


def require_number(where: str, key: str, value: Any, lo: float | None = None, hi: float | None = None,
                   lo_open: bool = False) -> None:
    validate.number(f"{where}.{key}", value, lo, hi, lo_open=lo_open)


def check_setting(where: str, value: Any, bounds: Setting | None = None) -> None:
    """A setting must be a number/bool/string, a list of them (a gradient), or a list of {filter, value}.
    Numbers must be finite, and within ``bounds`` when given."""
    if isinstance(value, list):
        for i, entry in enumerate(value):
            if isinstance(entry, dict):
                unknown = set(entry) - {"filter", "value"}
                if unknown or "value" not in entry:
                    raise ConfigError(f"{where}[{i}]: a filtered value needs exactly 'filter' and 'value'")
                check_setting(f"{where}[{i}].value", entry["value"], bounds)
            elif isinstance(entry, list):
                raise ConfigError(f"{where}[{i}]: nested lists are not a parameter value")
            else:
                _check_leaf(f"{where}[{i}]", entry, bounds)
    elif isinstance(value, dict):
        raise ConfigError(f"{where}: expected a number, a list (gradient) or a list of {{filter, value}}")
    else:
        _check_leaf(where, value, bounds)


def _check_leaf(where: str, value: Any, bounds: Setting | None) -> None:
    if bounds is not None:
        validate.number(where, value, bounds.lo, bounds.hi, lo_open=bounds.lo_open)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value} is not a finite number")


def resolve_setting(value: Any, tensor: str, t: float) -> Any:
    """The value of a setting for one tensor; ``t`` is the layer's position in [0, 1] (0 outside layers).
    A list of numbers is a gradient over the layers, interpolated as mergekit does; a list of
    ``{filter, value}`` takes the first entry whose filter is a substring of the tensor name (None if none)."""
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            for entry in value:
                if _filter_matches(entry.get("filter"), tensor):
                    return resolve_setting(entry["value"], tensor, t)
            return None
        if not value:
            return None
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return value[int(t * (len(value) - 1))]
        return (1 - frac) * value[i0] + frac * value[i1]
    if isinstance(value, dict):
        if "value" in value:
            return resolve_setting(value["value"], tensor, t) if _filter_matches(value.get("filter"), tensor) else None
    return value


def _filter_matches(filt: str | None, tensor: str) -> bool:
    return filt is None or filt == "*" or filt in tensor


def resolve_job_settings(method: MergeMethod, tensor: str, t: float,
                         model_settings: list[Mapping[str, Any]]) -> tuple[dict[str, tuple], dict[str, Any]]:
    """(per_model, per_tensor) of one tensor, as ``TensorJob`` holds them, weights included in per_model.

    ``model_settings[i]``: model i's own settings as the config gives them (numbers, gradients, filters). A
    per-model value not given for a model (or whose filters miss the tensor) is the method's own parameter of
    that name, else the declaration's default; ``t`` is the tensor's layer position in [0, 1].
    """
    per_model = {}
    for key, setting in {"weight": WEIGHT, **method.per_model_settings()}.items():
        own = _resolved(method.setting_value(key), tensor, t, setting.default)
        per_model[key] = tuple(_resolved(given.get(key), tensor, t, own) for given in model_settings)
    per_tensor = {}
    for key, setting in method.per_tensor_settings().items():
        value = _resolved(method.setting_value(key), tensor, t, setting.default)
        if value is None:
            raise ConfigError(f"parameters.{key}: no value for tensor '{tensor}' (no filter matches it)")
        per_tensor[key] = value
    return per_model, per_tensor


def _resolved(value: Any, tensor: str, t: float, default: Any) -> Any:
    resolved = None if value is None else resolve_setting(value, tensor, t)
    return default if resolved is None else resolved


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
    return task_vectors(base, experts)
