"""The AdaMerging config (``ada.yaml``): typed, validated before any tensor or row is read, errors naming the key.

```yaml
base: /m/roberta-base
experts: {cola: /m/roberta-cola, rte: /m/roberta-rte}   # task name -> fine-tuned model (or BASE+ADAPTER, LoRA)
data:                                                   # unlabelled inputs per task (jsonl or parquet)
  cola: /data/cola.jsonl                                # GLUE tasks know their text fields
  rte: {path: /data/rte.parquet, fields: [sentence1, sentence2]}
granularity: layer        # task: one coefficient per task | layer: one per (tensor, task), as the reference
plus: false               # AdaMerging++: TIES-trimmed (global, density 0.2), sign-elected task vectors
objective: entropy        # entropy (classifier heads, or next-token for causal LMs) | sft (targets given)
kind: auto                # classify (*ForSequenceClassification) | causal | encoder (bare encoders, heads apart)
heads:                    # kind encoder only: each task's head, a torch.nn.Linear state dict (weight, bias)
  cola: /m/heads/cola.safetensors   # weight [labels, hidden], bias [labels], on the pooled last hidden states
  rte: /m/heads/rte.safetensors
pooling: mean             # kind encoder: mean over the attended tokens | cls (the first token)
lambda_init: 0.3
lr: 0.001
steps: 500
batches: 2                # batches per task per step
batch_size: 16
seed: 0
freeze: []                # regexes: tensors kept at lambda_init
freeze_first_layers: 0.0  # a fraction: the first int(f x layers) transformer layers kept at lambda_init too
                          # (FusionBench's Llama AdaMerging freezes the first 30%: 0.3)
exclude: [".*classifier.*"]   # not merged (default for classifiers: the heads; each task scores with its own;
                              # nothing for causal LMs and encoders)
strategy: fsdp            # fsdp (torch FSDP2) | deepspeed (ZeRO-3; pip install deepspeed)
resources: {num_cpus: 1, num_gpus: 0}
```
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distmerge import dtypes, validate
from distmerge.architectures import CLASSIFIER_HEAD
from distmerge.config import read_yaml
from distmerge.errors import ConfigError

TOP_KEYS = {
    "base", "experts", "data", "granularity", "plus", "density", "objective", "lambda_init", "lr", "steps",
    "batches", "batch_size", "seed", "freeze", "freeze_first_layers", "exclude", "kind", "max_length", "strategy", "resources",
    "checkpoint_every", "dtype", "shuffle", "heads", "pooling",
}
DATA_KEYS = {"path", "fields", "target"}
RESOURCE_KEYS = {"num_cpus", "num_gpus"}
GRANULARITIES = ("task", "layer")
OBJECTIVES = ("entropy", "sft")
KINDS = ("auto", "classify", "causal", "encoder")
POOLINGS = ("mean", "cls")
HEAD_SUFFIX = ".safetensors"
HEAD_TENSORS = ("bias", "weight")
STRATEGIES = ("fsdp", "deepspeed")
DTYPES = dtypes.NAMES  # what theta0 and the task vectors are stored in; merged weights are float32 (float64 if named)
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class TaskData:
    path: str
    fields: tuple[str, ...] = ()  # text columns; () = the task's GLUE fields, else "text"
    target: str | None = None  # sft only: the column holding the target text


@dataclass(frozen=True)
class AdaConfig:
    base: str
    experts: dict[str, str]  # task -> model folder, in task order
    data: dict[str, TaskData]
    granularity: str = "layer"
    plus: bool = False
    density: float = 0.2  # AdaMerging++: the fraction of each task vector kept by the global trim (K=20)
    objective: str = "entropy"
    kind: str = "auto"  # classify | causal | encoder, resolved when auto (heads given: encoder; else the base's config)
    lambda_init: float = 0.3
    lr: float = 1e-3
    steps: int = 500
    batches: int = 2
    batch_size: int = 16
    seed: int = 0
    freeze: tuple[str, ...] = ()
    freeze_first_layers: float = 0.0  # the first int(f x layers) layers' tensors kept at lambda_init
    exclude: tuple[str, ...] | None = None  # None: the heads for classifiers, nothing for causal LMs
    max_length: int = 128
    strategy: str = "fsdp"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    checkpoint_every: int = 10
    dtype: str = "float32"
    shuffle: bool = False  # one seeded shuffle of each task's rows before streaming
    heads: dict[str, str] | None = None  # kind encoder: task -> .safetensors of its Linear head (weight, bias)
    pooling: str = "mean"  # kind encoder: how a text's last hidden states become the head's input

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.experts)

    def excluded(self) -> tuple[str, ...]:
        if self.exclude is not None:
            return self.exclude
        return (CLASSIFIER_HEAD,) if self.kind == "classify" else ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"] = {t: {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(d).items()}
                       for t, d in self.data.items()}
        out["freeze"] = list(self.freeze)
        out["exclude"] = list(self.excluded())
        out["resources"] = {"num_cpus": out.pop("num_cpus"), "num_gpus": out.pop("num_gpus")}
        if self.heads is None:  # the keys of configs without heads, so their run keys stay what they were
            del out["heads"], out["pooling"]
        if not self.freeze_first_layers:  # likewise
            del out["freeze_first_layers"]
        return out

    def run_key(self, workers: int) -> str:
        """Names the run folder: a resumed run must be the same training (same config, same worker count,
        since the data split follows it)."""
        text = json.dumps({"config": self.to_dict(), "workers": workers}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_ada_config(source: str | Path | dict[str, Any]) -> AdaConfig:
    raw = source if isinstance(source, dict) else read_yaml(source, "AdaMerging config")
    if not isinstance(raw, dict):
        raise ConfigError("AdaMerging config: expected a mapping at the top level")
    validate.no_unknown("", raw, TOP_KEYS)
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise ConfigError("base: missing (the pretrained model folder the task vectors are taken against)")
    experts = _experts(raw.get("experts"), base)
    data = _data(raw.get("data"), experts)
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict) or set(resources) - RESOURCE_KEYS:
        raise ConfigError(f"resources: expected a mapping with {', '.join(sorted(RESOURCE_KEYS))}")
    config = AdaConfig(
        base=base, experts=experts, data=data,
        granularity=validate.choice("granularity", raw.get("granularity", "layer"), GRANULARITIES),
        plus=validate.flag("plus", raw.get("plus", False)),
        density=validate.number("density", raw.get("density", 0.2), 0.0, 1.0, lo_open=True),
        objective=validate.choice("objective", raw.get("objective", "entropy"), OBJECTIVES),
        kind=validate.choice("kind", raw.get("kind", "auto"), KINDS),
        lambda_init=validate.number("lambda_init", raw.get("lambda_init", 0.3), 0.0, 1.0),
        lr=validate.number("lr", raw.get("lr", 1e-3), 0.0, lo_open=True),
        steps=_integer(raw, "steps", 500, 0),
        batches=_integer(raw, "batches", 2, 1),
        batch_size=_integer(raw, "batch_size", 16, 1),
        seed=_integer(raw, "seed", 0, 0),
        freeze=_regexes(raw, "freeze", ()),
        freeze_first_layers=validate.number("freeze_first_layers", raw.get("freeze_first_layers", 0.0), 0.0, 1.0,
                                            hi_open=True),
        exclude=_regexes(raw, "exclude", None),
        max_length=_integer(raw, "max_length", 128, 2),
        strategy=validate.choice("strategy", raw.get("strategy", "fsdp"), STRATEGIES),
        num_cpus=validate.number("resources.num_cpus", resources.get("num_cpus", 1.0), 0.0, lo_open=True),
        num_gpus=validate.number("resources.num_gpus", resources.get("num_gpus", 0.0), 0.0),
        checkpoint_every=_integer(raw, "checkpoint_every", 10, 1),
        dtype=validate.choice("dtype", raw.get("dtype", "float32"), DTYPES),
        shuffle=validate.flag("shuffle", raw.get("shuffle", False)),
        heads=_heads(raw.get("heads"), experts),
        pooling=validate.choice("pooling", raw.get("pooling", "mean"), POOLINGS),
    )
    if config.objective == "sft":
        missing = [t for t, d in data.items() if d.target is None]
        if missing:
            raise ConfigError(f"data.{missing[0]}.target: objective 'sft' needs the column holding the targets")
    if config.kind != "auto":
        check_kind_fields(config)
    return config


def resolve_kind(config: AdaConfig, base_config: dict[str, Any]) -> AdaConfig:
    """``kind: auto`` resolved (heads given: an encoder; else a *ForSequenceClassification base is a classifier,
    any other a causal LM), then the kind's own fields checked, the heads' files against the base's width."""
    from dataclasses import replace

    if config.kind != "auto":
        kind = config.kind
    elif config.heads is not None:
        kind = "encoder"
    else:
        architectures = base_config.get("architectures") or []
        kind = "classify" if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal"
    if kind in ("classify", "encoder") and config.objective == "sft":
        raise ConfigError(f"objective: 'sft' trains on target text; a{'n' if kind == 'encoder' else ''} {kind} "
                          f"model's objective is 'entropy'")
    config = replace(config, kind=kind)
    check_kind_fields(config)
    if kind == "encoder":
        check_head_files(config, base_config.get("hidden_size"))
    return config


def check_kind_fields(config: AdaConfig) -> None:
    """``heads`` and ``pooling`` belong to kind encoder: required there, refused elsewhere."""
    if config.kind == "encoder" and config.heads is None:
        raise ConfigError("heads: kind 'encoder' needs each task's head ({task: a .safetensors of weight and bias})")
    if config.kind != "encoder" and config.heads is not None:
        raise ConfigError(f"heads: only for kind 'encoder' (this config is kind '{config.kind}', whose heads, if "
                          f"any, come from the experts)")
    if config.kind != "encoder" and config.pooling != "mean":
        raise ConfigError(f"pooling: only for kind 'encoder' (this config is kind '{config.kind}')")


def check_head_files(config: AdaConfig, hidden: int | None) -> None:
    """Each head file exists and holds a Linear's state dict whose input width is the encoder's (headers only)."""
    from safetensors import safe_open

    for task, path in (config.heads or {}).items():
        key = f"heads.{task}"
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"{key}: '{path}' does not exist")
        try:
            with safe_open(str(file), framework="pt") as handle:
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise ConfigError(f"{key}: '{path}' is not a readable safetensors file "
                              f"({' '.join(str(exc).split())[:200]})") from None
        if tuple(sorted(shapes)) != HEAD_TENSORS:
            held = ", ".join(sorted(shapes)[:3]) + (f" and {len(shapes) - 3} more" if len(shapes) > 3 else "")
            raise ConfigError(f"{key}: '{path}' holds {held or 'no tensor'}; a head is a torch.nn.Linear state "
                              f"dict: weight [labels, hidden] and bias [labels]")
        weight, bias = shapes["weight"], shapes["bias"]
        if len(weight) != 2 or bias != weight[:1]:
            raise ConfigError(f"{key}: '{path}' has weight {list(weight)} and bias {list(bias)}; expected weight "
                              f"[labels, hidden] and bias [labels]")
        if hidden is not None and weight[1] != hidden:
            raise ConfigError(f"{key}: '{path}' takes inputs of width {weight[1]}; the base's hidden size is {hidden}")


def _experts(value: Any, base: str) -> dict[str, str]:
    """Task -> model source; a LoRA expert becomes ``BASE+ADAPTER`` as in a merge config (``lora:`` beside
    ``model:`` in the list form, ``BASE+ADAPTER`` itself, or an adapter folder alone, on ``base``)."""
    from distmerge.config.native import model_source

    if isinstance(value, list):
        entries = {}
        for i, item in enumerate(value):
            if not isinstance(item, dict) or not isinstance(item.get("model"), str) or \
                    not isinstance(item.get("name"), str):
                raise ConfigError(f"experts[{i}]: expected {{name: TASK, model: PATH}} (and lora: ADAPTER for a LoRA expert)")
            entries[item["name"]] = model_source(item["model"], item.get("lora"), base, f"experts[{i}]")
        value = entries
    if not isinstance(value, dict) or not value:
        raise ConfigError("experts: expected a mapping of task name to fine-tuned model folder")
    for task, path in value.items():
        if not isinstance(task, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", task):
            raise ConfigError(f"experts.{task}: a task name is letters, digits, '_', '.' or '-'")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"experts.{task}: expected the path of a model folder")
    return {task: model_source(path, None, base, f"experts.{task}") for task, path in value.items()}


def _heads(value: Any, experts: dict[str, str]) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError("heads: expected a mapping of task name to the .safetensors file of its head")
    extra = sorted(set(value) - set(experts), key=str)
    if extra:
        raise ConfigError(f"heads.{extra[0]}: no expert has this task name ({', '.join(experts)})")
    for task in experts:
        path = value.get(task)
        if path is None:
            raise ConfigError(f"heads.{task}: missing (every task is scored with its own head)")
        if not isinstance(path, str) or not path.endswith(HEAD_SUFFIX):
            raise ConfigError(f"heads.{task}: expected the path of a {HEAD_SUFFIX} file, got {path!r}")
    return {task: value[task] for task in experts}


def _data(value: Any, experts: dict[str, str]) -> dict[str, TaskData]:
    if not isinstance(value, dict):
        raise ConfigError("data: expected a mapping of task name to a jsonl/parquet file of unlabelled inputs")
    extra = sorted(set(value) - set(experts))
    if extra:
        raise ConfigError(f"data.{extra[0]}: no expert has this task name ({', '.join(experts)})")
    out = {}
    for task in experts:
        if task not in value:
            raise ConfigError(f"data.{task}: missing (every task needs its unlabelled inputs)")
        entry = value[task]
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or set(entry) - DATA_KEYS or not isinstance(entry.get("path"), str):
            raise ConfigError(f"data.{task}: expected a path or {{path, fields, target}}")
        path = entry["path"]
        if not any(path.endswith(s) for s in DATA_SUFFIXES):
            raise ConfigError(f"data.{task}.path: '{path}' is not a .jsonl, .json or .parquet file")
        fields = entry.get("fields") or ()
        if isinstance(fields, str):
            fields = (fields,)
        if not isinstance(fields, (list, tuple)) or not all(isinstance(f, str) for f in fields) or len(fields) > 2:
            raise ConfigError(f"data.{task}.fields: expected one or two column names")
        target = entry.get("target")
        if target is not None and not isinstance(target, str):
            raise ConfigError(f"data.{task}.target: expected a column name")
        out[task] = TaskData(path=path, fields=tuple(fields), target=target)
    return out


def _integer(raw: dict, key: str, default: int, lo: int) -> int:
    return validate.number(key, raw.get(key, default), lo, integer=True)


def _regexes(raw: dict, key: str, default):
    if key not in raw or raw[key] is None:
        return default
    values = raw[key]
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise ConfigError(f"{key}: expected a list of regular expressions")
    for i, pattern in enumerate(values):
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ConfigError(f"{key}[{i}]: invalid regular expression {pattern!r}: {exc}") from None
    return tuple(values)
