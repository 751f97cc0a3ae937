"""``twin.yaml``: a merge config (base_model, models, dtype, exclude ...) for the shared expert, plus three sections.

```yaml
base_model: base/
models: [{model: math/, name: math}, {model: base/+code_lora/, name: code}]
shared: {method: task_arithmetic, parameters: {lambda: 0.3}}   # default: the reference's TA 0.3
exclusive: {rank: 8}            # or rank_fraction: 0.1; svd: auto | exact | randomized; lora: product | factors
router:
  data: {math: math_train.jsonl, code: code_train.parquet}   # every task's samples, by model name
  field: text                   # the prompt column
```

``exclusive.lora`` says how a LoRA expert's exclusive part is taken:

* ``product`` (default): the rank-r SVD of the product delta theta_t - theta* (B_t A_t * scale on the base, minus
  theta*), whatever merge theta* is: the best rank-r approximation of what the expert adds.
* ``factors``: the reference's generative variant. theta* is the merge of the LoRA factors (A* = lambda sum_t A_t,
  B* = lambda sum_t B_t, theta* = base + scale B* A*), each factor's difference (A_t - A*, B_t - B*) gets its own
  rank-r SVD, and a routed layer computes base + scale (B* + sum_t w_t dB_t)(A* + sum_t w_t dA_t). Every expert
  must then be a LoRA adapter of linear layers on ``base_model`` with the same modules, ranks and scales, no
  ``modules_to_save``, and ``shared`` task arithmetic without per-model weights.

Everything is validated here, before Ray starts or a tensor is read (the adapters' own checks for ``factors``
run in ``twin build`` before Ray starts); errors name the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmerge import validate
from distmerge.config import MergeConfig, load_config, read_yaml
from distmerge.errors import ConfigError
from distmerge.lora_extract import FACTOR_DTYPES, SVD_MODES

SECTIONS = ("shared", "exclusive", "router")
DEFAULT_SHARED = {"method": "task_arithmetic", "parameters": {"lambda": 0.3}}
DEFAULT_RANK = 8  # the generative reference's new_rank
LORA_MODES = ("product", "factors")  # product: the SVD of B @ A * scale - theta*; factors: of A and B each
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # names become tensor keys and file names


@dataclass(frozen=True)
class ExclusiveConfig:
    rank: int | None = None
    rank_fraction: float | None = None
    svd: str = "auto"  # auto: exact when the smaller side is <= 1024, randomized above
    oversample: int = 10
    niter: int = 4
    lora: str = "product"  # LoRA experts: product (the SVD of B @ A * scale - theta*) | factors (see above)
    dtype: str = "float32"
    seed: int = 0

    def validate(self) -> None:
        where = "exclusive"
        if self.rank is not None and self.rank_fraction is not None:
            raise ConfigError(f"{where}: give one of rank (e.g. 8) or rank_fraction (e.g. 0.1), not both")
        if self.rank is not None:
            validate.number(f"{where}.rank", self.rank, 1, integer=True)
        if self.rank_fraction is not None:
            validate.number(f"{where}.rank_fraction", self.rank_fraction, 0, 1, lo_open=True)
        for key, choices in (("svd", SVD_MODES), ("lora", LORA_MODES), ("dtype", FACTOR_DTYPES)):
            validate.choice(f"{where}.{key}", getattr(self, key), choices)
        for key in ("oversample", "niter", "seed"):
            validate.number(f"{where}.{key}", getattr(self, key), 0, integer=True)

    def rank_for(self, shape: tuple[int, ...]) -> int:
        """The rank a 2-D tensor of ``shape`` keeps: ``rank``, or int(fraction * min side) as the reference (at
        least 1), never more than the smaller side."""
        side = min(shape)
        wanted = self.rank if self.rank is not None else max(1, int(self.rank_fraction * side))
        return min(wanted, side)


def reproducing_oversample(oversample: int, built_rank: int, rank: int) -> int:
    """The oversampling at which a rank-``rank`` build draws the randomized SVD sketch of a build at ``built_rank``
    (width built_rank + oversample, the same seed), so its factors are the first ``rank`` directions of that
    build's: a narrower sketch (rank + oversample) finds slightly different directions. Exact SVDs, and tensors
    small enough that ``truncated_svd`` takes the exact path at one width, take it at the other as well."""
    return oversample + max(0, built_rank - rank)


@dataclass(frozen=True)
class RouterConfig:
    data: dict[str, str] = field(default_factory=dict)  # task name -> jsonl/json/parquet file or folder
    field: str = "text"
    tokenizer: str | None = None  # a tokenizer folder; default: the shared expert's (the base's)
    max_samples: int = 5500  # per task, as the reference
    holdout: float = 0.1  # share of each task's samples kept for the reported accuracy
    max_length: int = 512
    epochs: int = 50
    lr: float = 5e-4
    batch_size: int = 1024
    dropout: float = 0.5
    seed: int = 0
    workers: int = 1  # model actors computing features
    feature_batch_size: int = 16

    def validate(self, tasks: tuple[str, ...]) -> None:
        where = "router"
        if not isinstance(self.data, dict):
            raise ConfigError(f"{where}.data: expected a mapping of task name to a jsonl/parquet file")
        for task in tasks:
            if task not in self.data:
                raise ConfigError(f"{where}.data.{task}: missing (every task needs router samples)")
        for task, path in self.data.items():
            if task not in tasks:
                raise ConfigError(f"{where}.data.{task}: not a task (models are {', '.join(tasks)})")
            if not isinstance(path, str) or not Path(path).expanduser().exists():
                raise ConfigError(f"{where}.data.{task}: '{path}' does not exist")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str)
                                           or not Path(self.tokenizer).expanduser().is_dir()):
            raise ConfigError(f"{where}.tokenizer: '{self.tokenizer}' is not a folder")
        if not isinstance(self.field, str) or not self.field:
            raise ConfigError(f"{where}.field: expected a column name")
        for key in ("max_samples", "max_length", "epochs", "batch_size", "workers", "feature_batch_size"):
            validate.number(f"{where}.{key}", getattr(self, key), 1, integer=True)
        for key, lo, hi in (("holdout", 0.0, 0.9), ("lr", 0.0, 10.0), ("dropout", 0.0, 0.99)):
            validate.number(f"{where}.{key}", getattr(self, key), lo, hi, lo_open=key == "lr")


@dataclass(frozen=True)
class TwinConfig:
    merge: MergeConfig  # the shared expert's merge (its models are the tasks)
    exclusive: ExclusiveConfig
    router: RouterConfig
    raw_shared: dict[str, Any]

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.merge.names


def _section(raw: dict, key: str) -> dict:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping")
    return dict(value)


def _build(cls, values: dict, where: str):
    validate.no_unknown(where, values, cls.__dataclass_fields__)
    return cls(**values)


def load_twin_config(source: str | Path | dict) -> TwinConfig:
    raw = dict(source) if isinstance(source, dict) else read_yaml(source, "twin config")
    if not isinstance(raw, dict):
        raise ConfigError("twin config: expected a mapping at the top level")
    sections = {key: _section(raw, key) for key in SECTIONS}
    for key in ("method", "merge_method", "parameters"):
        if key in raw:
            raise ConfigError(f"{key}: the shared expert's merge goes under 'shared:' (method, parameters)")
    shared = sections["shared"] or dict(DEFAULT_SHARED)
    validate.no_unknown("shared", shared, ("method", "parameters"))
    merge_raw = {k: v for k, v in raw.items() if k not in SECTIONS}
    merge_raw["method"] = shared.get("method", DEFAULT_SHARED["method"])
    merge_raw["parameters"] = shared.get("parameters") or {}
    merge = load_config(merge_raw)
    if merge.base_model is None:
        raise ConfigError("base_model: Twin-Merging needs the base model (the experts' common pretrained weights)")
    for i, name in enumerate(merge.names):
        if not TASK_NAME.fullmatch(name):
            raise ConfigError(f"models[{i}].name: '{name}' must be letters, digits, '_', '.' or '-' (it names the "
                              "task in the twin folder)")
    exclusive_raw = sections["exclusive"]
    if "rank" not in exclusive_raw and "rank_fraction" not in exclusive_raw:
        exclusive_raw["rank"] = DEFAULT_RANK
    exclusive = _build(ExclusiveConfig, exclusive_raw, "exclusive")
    exclusive.validate()
    if exclusive.lora == "factors":
        check_factor_merge(merge)
    router = _build(RouterConfig, sections["router"], "router")
    router.validate(merge.names)
    return TwinConfig(merge=merge, exclusive=exclusive, router=router,
                      raw_shared={"method": merge.method, "parameters": merge.parameters})


def check_factor_merge(merge: MergeConfig) -> None:
    """``exclusive.lora: factors`` merges the LoRA factors themselves, as the reference does: task arithmetic,
    one lambda for every expert."""
    if merge.method != "task_arithmetic":
        raise ConfigError(f"shared.method: exclusive.lora: factors merges the LoRA factors (A* = lambda sum A_t, "
                          f"B* = lambda sum B_t), so the shared merge is task_arithmetic, not '{merge.method}' "
                          "(or use exclusive.lora: product)")
    if merge.parameters.get("normalize"):
        raise ConfigError("shared.parameters.normalize: exclusive.lora: factors takes lambda sum A_t unnormalized")
    for i, spec in enumerate(merge.models):
        if spec.parameters:
            raise ConfigError(f"models[{i}].parameters: exclusive.lora: factors merges every adapter's factors with "
                              f"the one shared lambda; per-model {', '.join(sorted(spec.parameters))} are not taken")
