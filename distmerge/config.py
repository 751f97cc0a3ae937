"""Merge configuration: typed, validated before any tensor is read, with errors that name the key.

Two YAML dialects are read into the same ``MergeConfig``:

* distmerge's own (``method:``), see README;
* mergekit's (``merge_method:``) for linear, task_arithmetic, ties, dare_linear and dare_ties, translated to
  mergekit's semantics (per-tensor trim, weights normalized as mergekit does, L1 rescale for DARE).

Per-model and global parameter values may be a number, a list (a gradient over layers, interpolated as
mergekit does) or a list of ``{filter, value}`` (the first entry whose filter is a substring of the tensor
name wins).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distmerge.errors import ConfigError
from distmerge.methods import METHODS, build_method, method_params_yaml
from distmerge.methods.base import MergeMethod, check_setting, resolve_setting  # noqa: F401 (resolve_setting: re-exported)

DTYPES = ("float32", "float16", "bfloat16", "float64")
TOP_LEVEL_KEYS = {
    "base_model", "models", "method", "parameters", "dtype", "out_dtype", "tokenizer", "exclude", "include",
    "out_shard_size", "device",
}
MODEL_KEYS = {"model", "name", "parameters", "lora"}


@dataclass(frozen=True)
class ModelSpec:
    model: str  # local folder, safetensors/.bin file, or hub id
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)  # per-model settings (weight, density, drop_rate)


@dataclass(frozen=True)
class MergeConfig:
    method: str
    models: tuple[ModelSpec, ...]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # method parameters as given (scalars)
    dtype: str = "float32"  # compute dtype
    out_dtype: str | None = None  # default: the base's dtype
    tokenizer: str = "base"  # base | union | the name of a model
    exclude: tuple[str, ...] = ()  # regexes: tensors taken from the base unmerged
    include: tuple[str, ...] = ()  # regexes: when given, only matching tensors are merged
    out_shard_size: int = 1 << 30  # bytes per output shard
    device: str = "cpu"
    source_format: str = "distmerge"  # or "mergekit"
    global_settings: dict[str, Any] = field(default_factory=dict)  # per-model defaults given globally (mergekit)

    def build_method(self) -> MergeMethod:
        return build_method(self.method, self.parameters)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def to_yaml_dict(self) -> dict[str, Any]:
        """The fully resolved config in distmerge's dialect: running it again reproduces the merge."""
        method = self.build_method()
        out: dict[str, Any] = {}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        out["models"] = []
        for spec in self.models:
            entry: dict[str, Any] = {"model": spec.model, "name": spec.name}
            params = {**self.global_settings, **spec.parameters}
            if params:
                entry["parameters"] = params
            out["models"].append(entry)
        out["method"] = self.method
        out["parameters"] = method_params_yaml(method)
        out.update(dtype=self.dtype, out_dtype=self.out_dtype, tokenizer=self.tokenizer,
                   exclude=list(self.exclude), include=list(self.include), out_shard_size=self.out_shard_size,
                   device=self.device)
        return out


# --- loading ---------------------------------------------------------------------------------------


def parse_size(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", value.lower())
        if match:
            number, unit = float(match.group(1)), match.group(2).rstrip("b")
            scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30,
                     "ti": 1 << 40}[unit]
            if number > 0:
                return int(number * scale)
    raise ConfigError(f"{where}: expected a size such as 1GB or 500MB, got {value!r}")


def default_name(source: str) -> str:
    text = source.rstrip("/\\")
    base = os.path.basename(text) or text
    for suffix in (".safetensors", ".bin", ".pt"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """A YAML file's contents; an unreadable file or invalid YAML is a ConfigError naming the file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {exc}") from None


def load_config(source: str | Path | dict[str, Any]) -> MergeConfig:
    """Read a YAML file (or an already-parsed dict) in either dialect and validate it."""
    raw = source if isinstance(source, dict) else read_yaml(source)
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping at the top level")
    if "merge_method" in raw:
        from distmerge.mergekit_compat import translate_mergekit

        return translate_mergekit(raw)
    return _from_distmerge(raw)


def _from_distmerge(raw: dict[str, Any]) -> MergeConfig:
    unknown = set(raw) - TOP_LEVEL_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{key}: unknown key (allowed: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    if "method" not in raw:
        raise ConfigError(f"method: missing (one of {', '.join(sorted(METHODS))})")
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("models: expected a non-empty list of {model: ...}")
    models = []
    for i, entry in enumerate(models_raw):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{where}.model: missing")
        source = model_source(str(entry["model"]), entry.get("lora"), raw.get("base_model"), where)
        params = dict(entry.get("parameters") or {})
        for key, value in entry.items():
            if key not in MODEL_KEYS:
                params[key] = value  # per-model parameters may also be given inline (weight: 0.5)
        models.append((source, entry.get("name"), params))
    return build_config(
        method=raw["method"], models=models, base_model=raw.get("base_model"),
        parameters=raw.get("parameters") or {}, dtype=raw.get("dtype", "float32"), out_dtype=raw.get("out_dtype"),
        tokenizer=raw.get("tokenizer", "base"), exclude=raw.get("exclude") or (), include=raw.get("include") or (),
        out_shard_size=raw.get("out_shard_size", 1 << 30), device=raw.get("device", "cpu"),
    )


def model_source(model: str, lora: Any, base_model: Any, where: str) -> str:
    """One source string per model: a LoRA expert as ``BASE+ADAPTER`` (mergekit's syntax), whether it was given
    so, as ``lora: ADAPTER`` beside its base, or as an adapter folder alone (on the base its
    ``base_model_name_or_path`` names when that is a local folder, else on the config's ``base_model``)."""
    from distmerge.io.lora import ADAPTER_CONFIG, is_adapter_folder

    if lora is not None:
        if not isinstance(lora, str) or not lora:
            raise ConfigError(f"{where}.lora: expected the path (or hub id) of a PEFT adapter")
        return f"{model}+{lora}"
    if not is_adapter_folder(model):
        return model
    try:
        named = json.loads((Path(model).expanduser() / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}.model: unreadable {ADAPTER_CONFIG} in '{model}' ({exc})") from None
    if isinstance(named, str) and named and Path(named).expanduser().is_dir():
        return f"{named}+{model}"
    if isinstance(base_model, str):
        return f"{base_model}+{model}"
    raise ConfigError(f"{where}.model: '{model}' is a LoRA adapter; its base ({named!r}) is not a local folder and "
                      f"the config has no base_model: write model: BASE+{model}")


def build_config(*, method: str, models: list[tuple[str, str | None, dict]], base_model: str | None,
                 parameters: dict, dtype: str, out_dtype: str | None, tokenizer: str, exclude, include,
                 out_shard_size, device: str, source_format: str = "distmerge",
                 global_settings: dict | None = None) -> MergeConfig:
    """Validate every field and build the config; shared by both dialects."""
    if not isinstance(method, str):
        raise ConfigError(f"method: expected a name, got {method!r}")
    if not isinstance(parameters, dict):
        raise ConfigError("parameters: expected a mapping")
    method_obj = build_method(method, parameters)  # validates the method and its parameters
    if base_model is not None and not isinstance(base_model, str):
        raise ConfigError("base_model: expected a path or hub id")
    if method_obj.needs_base and base_model is None:
        raise ConfigError(f"base_model: method '{method}' needs a base model (task vectors are taken against it)")
    specs, seen = [], set()
    declared = method_obj.per_model_settings()
    allowed = set(declared)
    for i, (model, name, params) in enumerate(models):
        where = f"models[{i}]"
        if name is None:
            name = default_name(model)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name: expected a non-empty string")
        if name in seen:
            raise ConfigError(f"{where}.name: '{name}' is used twice; give each model a distinct name")
        seen.add(name)
        for key, value in params.items():
            if key not in allowed:
                raise ConfigError(f"{where}.parameters.{key}: not a per-model parameter of '{method}' "
                                  f"(allowed: {', '.join(sorted(allowed)) or 'none'})")
            check_setting(f"{where}.parameters.{key}", value, declared[key])
        specs.append(ModelSpec(model=model, name=name, parameters=dict(params)))
    for key, value in (global_settings or {}).items():
        check_setting(f"parameters.{key}", value, declared.get(key))
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise ConfigError(f"out_dtype: {out_dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(tokenizer, str):
        raise ConfigError("tokenizer: expected 'base', 'union' or a model name")
    if tokenizer not in ("base", "union") and tokenizer not in seen:
        raise ConfigError(f"tokenizer: {tokenizer!r} is neither 'base', 'union' nor a model name ({', '.join(sorted(seen))})")
    if tokenizer == "base" and base_model is None:
        tokenizer = specs[0].name
    patterns = []
    for key, values in (("exclude", exclude), ("include", include)):
        if isinstance(values, str):
            values = [values]
        for j, pattern in enumerate(values):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise ConfigError(f"{key}[{j}]: invalid regular expression {pattern!r}: {exc}") from None
        patterns.append(tuple(values))
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", device):
        raise ConfigError(f"device: {device!r} is not cpu, cuda, cuda:N, mps or auto")
    return MergeConfig(
        method=method, models=tuple(specs), base_model=base_model, parameters=dict(parameters), dtype=dtype,
        out_dtype=out_dtype, tokenizer=tokenizer, exclude=patterns[0], include=patterns[1],
        out_shard_size=parse_size(out_shard_size, "out_shard_size"), device=device, source_format=source_format,
        global_settings=dict(global_settings or {}),
    )
