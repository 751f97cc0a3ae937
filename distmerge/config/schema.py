"""The merge configuration both dialects are read into: typed, validated before any tensor is read, with errors
that name the key. Per-model values may be a number, a gradient over layers or a list of {filter, value}
(``methods.base.check_setting``, ``resolve_setting``), checked against the ranges the method declares."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from distmerge import dtypes, validate
from distmerge.errors import ConfigError
from distmerge.methods import build_method, method_params_yaml
from distmerge.methods.base import MergeMethod, check_setting

DTYPES = dtypes.NAMES


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
    parameters: dict[str, Any] = field(default_factory=dict)  # the method's parameters, validated, defaults filled
    dtype: str = "float32"  # compute dtype
    out_dtype: str | None = None  # default: the base's dtype
    tokenizer: str = "base"  # base | union | the name of a model
    exclude: tuple[str, ...] = ()  # regexes: tensors taken from the base unmerged
    include: tuple[str, ...] = ()  # regexes: when given, only matching tensors are merged
    out_shard_size: int = 1 << 30  # bytes per output shard
    device: str = "cpu"
    source_format: str = "distmerge"  # the dialect it was read from: distmerge | mergekit

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
            if spec.parameters:
                entry["parameters"] = dict(spec.parameters)
            out["models"].append(entry)
        out["method"] = self.method
        out["parameters"] = method_params_yaml(method)
        out.update(dtype=self.dtype, out_dtype=self.out_dtype, tokenizer=self.tokenizer,
                   exclude=list(self.exclude), include=list(self.include), out_shard_size=self.out_shard_size,
                   device=self.device)
        return out


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


def build_config(*, method: str, models: list[tuple[str, str | None, dict]], base_model: str | None,
                 parameters: dict, dtype: str, out_dtype: str | None, tokenizer: str, exclude, include,
                 out_shard_size, device: str, source_format: str = "distmerge",
                 shared_model_settings: dict | None = None) -> MergeConfig:
    """Validate every field and build the config; shared by both dialects. ``shared_model_settings``: per-model
    values given once for all models (mergekit's global ``parameters: {density: ...}``), checked as
    ``parameters.KEY`` and given to every model that has no value of its own."""
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
    shared = dict(shared_model_settings or {})
    for key, value in shared.items():
        if key not in allowed:
            raise ConfigError(f"parameters.{key}: not a parameter of '{method}'")
        check_setting(f"parameters.{key}", value, declared[key])
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
        specs.append(ModelSpec(model=model, name=name, parameters={**shared, **params}))
    validate.choice("dtype", dtype, DTYPES)
    if out_dtype is not None:
        validate.choice("out_dtype", out_dtype, DTYPES)
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
        method=method, models=tuple(specs), base_model=base_model, parameters=method_params_yaml(method_obj), dtype=dtype,
        out_dtype=out_dtype, tokenizer=tokenizer, exclude=patterns[0], include=patterns[1],
        out_shard_size=parse_size(out_shard_size, "out_shard_size"), device=device, source_format=source_format,
    )
