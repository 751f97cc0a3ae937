"""``measure.yaml``: which expert runs on which data, validated before any model loads.

```yaml
tasks:
  - name: math                 # the expert's name in the merge config (its statistics folder: stats/math)
    model: experts/math        # a local Hugging Face folder (a LoRA expert: BASE+ADAPTER, or lora: ADAPTER)
    data: data/math.jsonl      # jsonl, json or parquet rows (or a txt file / folder of them)
    text_field: text           # the column with the text (default: text)
    limit: 1000                # rows at most (default: all)
max_length: 512                # tokens per row (truncated); default: the model's positions, at most 512
batch_size: 8                  # rows per forward pass
workers: 1                     # model actors per task
device: auto                   # auto: cuda when the cluster has GPUs
dtype: auto                    # the model's dtype in the actors (auto: float32 on CPU, the checkpoint's on GPU)
stats_dtype: float64           # the stored Gram sums: float64 or float32 (half the size)
model_class: causal_lm         # causal_lm | sequence_classification | encoder (a bare encoder, heads apart):
                               # the transformers class that names the layers as the checkpoint does
```
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from distmerge import dtypes, validate
from distmerge.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
MODEL_DTYPES = ("auto", *dtypes.STORAGE)
STATS_DTYPES = dtypes.FULL_PRECISION
MODEL_CLASSES = ("causal_lm", "sequence_classification", "encoder")
TOP_KEYS = ("tasks", "max_length", "batch_size", "workers", "device", "dtype", "stats_dtype", "model_class")
TASK_KEYS = ("name", "model", "lora", "data", "text_field", "limit")
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name under stats/


@dataclass(frozen=True)
class MeasureTask:
    name: str
    model: str
    data: str
    text_field: str = "text"
    limit: int | None = None


@dataclass(frozen=True)
class MeasureConfig:
    tasks: tuple[MeasureTask, ...]
    max_length: int = 512
    batch_size: int = 8
    workers: int = 1
    device: str = "auto"
    dtype: str = "auto"
    stats_dtype: str = "float64"
    model_class: str = "causal_lm"
    kind: str = "regmean"

    def task_key(self, task: MeasureTask, fingerprint: dict[str, str]) -> str:
        """What a task's statistics depend on: a finished task with the same key is not measured again."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("tasks", "workers", "device")}
        record = {"task": asdict(task), "settings": settings, "fingerprint": fingerprint,
                  "data_size": _data_size(task.data)}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def to_yaml_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("tasks", "kind")}
        out["tasks"] = [{k: v for k, v in asdict(t).items() if v is not None} for t in self.tasks]
        return out


def _data_size(path: str) -> int:
    """The data's size in bytes: an edited data file changes the key (a cheap stand-in for its hash)."""
    data = Path(path)
    files = [data] if data.is_file() else sorted(p for p in data.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files)


def _integer(where: str, value: Any) -> int:
    return validate.number(where, value, 1, integer=True)


def _task(raw: Any, index: int, folder: Path) -> MeasureTask:
    where = f"tasks[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with name, model and data")
    validate.no_unknown(where, raw, TASK_KEYS)
    for key in ("model", "data"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}: missing (a path)")
    model, data = (folder / Path(raw[k]).expanduser() for k in ("model", "data"))
    source, named = _model_source(raw, where, folder)
    if not data.exists():
        raise ConfigError(f"{where}.data: '{data}' does not exist")
    name = raw.get("name", named)
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise ConfigError(f"{where}.name: {name!r} must be a plain name (letters, digits, '.', '_', '-'): the merge "
                          f"config's name for this expert")
    text_field = raw.get("text_field", "text")
    if not isinstance(text_field, str) or not text_field:
        raise ConfigError(f"{where}.text_field: expected a column name")
    limit = raw.get("limit")
    if limit is not None:
        _integer(f"{where}.limit", limit)
    return MeasureTask(name, source, str(data.resolve()), text_field, limit)


def _model_source(raw: dict, where: str, folder: Path) -> tuple[str, str]:
    """(source, default name): a model folder, or a LoRA expert as ``BASE+ADAPTER`` (mergekit's syntax, or
    ``lora: ADAPTER`` beside ``model:``), every path relative to the config's folder."""
    from distmerge.io.lora import is_adapter_folder

    text, lora = raw["model"], raw.get("lora")
    if lora is not None and (not isinstance(lora, str) or not lora):
        raise ConfigError(f"{where}.lora: expected the path of a PEFT adapter folder")
    parts = (text, lora) if lora is not None else None
    if parts is None and "+" in text and not (folder / Path(text).expanduser()).exists():
        parts = tuple(text.rsplit("+", 1))
    if parts is None:
        model = folder / Path(text).expanduser()
        if not model.is_dir():
            raise ConfigError(f"{where}.model: '{model}' is not a model folder")
        return str(model.resolve()), model.resolve().name
    base, adapter = (folder / Path(part).expanduser() for part in parts)
    if not base.is_dir():
        raise ConfigError(f"{where}.model: '{base}' (the LoRA expert's base) is not a model folder")
    if not is_adapter_folder(adapter):
        raise ConfigError(f"{where}.{'lora' if lora is not None else 'model'}: '{adapter}' is not a PEFT adapter "
                          f"folder (no adapter_config.json)")
    return f"{base.resolve()}+{adapter.resolve()}", adapter.resolve().name


def parse_measure_config(raw: Any, kind: str, folder: Path = Path(".")) -> MeasureConfig:
    """A validated config from YAML data; relative paths are taken from ``folder`` (the YAML file's)."""
    if not isinstance(raw, dict):
        raise ConfigError("measure config: expected a mapping with 'tasks'")
    validate.no_unknown("", raw, TOP_KEYS)
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise ConfigError("tasks: expected a non-empty list of {name, model, data}")
    tasks = tuple(_task(entry, i, folder) for i, entry in enumerate(tasks_raw))
    names = [t.name for t in tasks]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"tasks: the name '{name}' is used twice; each expert has its own statistics")
    return MeasureConfig(
        tasks=tasks,
        max_length=_integer("max_length", raw.get("max_length", 512)),
        batch_size=_integer("batch_size", raw.get("batch_size", 8)),
        workers=_integer("workers", raw.get("workers", 1)),
        device=validate.choice("device", raw.get("device", "auto"), DEVICES),
        dtype=validate.choice("dtype", raw.get("dtype", "auto"), MODEL_DTYPES),
        stats_dtype=validate.choice("stats_dtype", raw.get("stats_dtype", "float64"), STATS_DTYPES),
        model_class=validate.choice("model_class", raw.get("model_class", "causal_lm"), MODEL_CLASSES),
        kind=kind,
    )


def load_measure_config(source: str | Path | dict, kind: str) -> MeasureConfig:
    if isinstance(source, dict):
        return parse_measure_config(source, kind)
    path = Path(source).expanduser()
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read '{path}': {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"'{path}': invalid YAML ({' '.join(str(exc).split())})") from None
    return parse_measure_config(raw, kind, path.resolve().parent)
