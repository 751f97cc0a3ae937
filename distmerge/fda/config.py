"""Reading ``fda.yaml`` (or a dict): every field validated before any tensor is read, errors naming the field.

The fields and their defaults per model family are in ``distmerge.fda.schema``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from distmerge import validate
from distmerge.config import read_yaml
from distmerge.errors import ConfigError
from distmerge.fda.schema import DTYPES, AdaptSettings, AnchorSettings, FdaConfig, Resources, engine_merge_config

TOP_KEYS = {"base", "experts", "initial", "modules", "layers", "anchors", "adapt", "resources", "seed", "dtype"}
ANCHOR_KEYS = {"count", "tokens", "init", "sigma", "steps", "lr", "weight_decay", "loss"}
ADAPT_KEYS = {"param", "sources", "alpha_init", "loss", "lr", "batch_size", "epochs"}
RESOURCE_KEYS = {"num_cpus", "num_gpus", "memory", "retries"}


def load_fda_config(source: str | Path | dict[str, Any] | FdaConfig) -> FdaConfig:
    """Read ``fda.yaml`` (or a dict) and validate every field; errors are ConfigError naming the field."""
    if isinstance(source, FdaConfig):
        return source
    prefix = ""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        prefix = f"{path.name}: "
        raw = read_yaml(path)
    try:
        return _parse(raw)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def _parse(raw: Any) -> FdaConfig:
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping at the top level")
    validate.no_unknown("", raw, TOP_KEYS)
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise ConfigError("base: missing (a path or hub id of the pretrained model)")
    experts = _experts(raw.get("experts"), base)
    initial = _initial(raw.get("initial"), base, experts)
    modules = raw.get("modules")
    if modules is not None:
        validate.choice("modules", modules, ("mlp", "block"))
    layers = raw.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not layers or not all(validate.is_int(v) and v >= 0 for v in layers):
            raise ConfigError(f"layers: expected a non-empty list of layer indices, got {layers!r}")
        layers = tuple(sorted(set(layers)))
    anchors = _section("anchors", raw.get("anchors"), ANCHOR_KEYS, AnchorSettings, {
        "count": _POSITIVE_INT, "tokens": _POSITIVE_INT, "init": _one_of("gauss", "weights"),
        "sigma": _POSITIVE, "steps": _NON_NEGATIVE_INT, "lr": _POSITIVE, "weight_decay": _NON_NEGATIVE,
        "loss": _one_of("cos", "mse", "l1")})
    adapt = _section("adapt", raw.get("adapt"), ADAPT_KEYS, AdaptSettings, {
        "param": _one_of("elementwise", "raw"), "sources": _one_of("initial", "experts"),
        "alpha_init": validate.number, "loss": _one_of("cos", "mse", "l1"), "lr": _POSITIVE,
        "batch_size": _POSITIVE_INT, "epochs": _NON_NEGATIVE_INT})
    resources = _resources(raw.get("resources"))
    seed = validate.number("seed", raw.get("seed", 0), integer=True)
    dtype = validate.choice("dtype", raw.get("dtype", "float32"), DTYPES)
    return FdaConfig(base=base, experts=experts, initial=initial, modules=modules, layers=layers, anchors=anchors,
                     adapt=adapt, resources=resources, seed=seed, dtype=dtype)


def _experts(raw: Any, base: str) -> tuple[tuple[str, str], ...]:
    """(name, source) per expert; a LoRA expert as ``BASE+ADAPTER``, given so, as ``lora:`` beside ``model:``, or
    as an adapter folder alone (on ``base``), as a merge config takes it."""
    from distmerge.config.native import model_source

    entries: list[tuple[Any, Any]]
    if isinstance(raw, dict):
        entries = [(name, model_source(model, None, base, f"experts.{name}") if isinstance(model, str) and model
                    else model) for name, model in raw.items()]
    elif isinstance(raw, list):
        entries = []
        for i, item in enumerate(raw):
            if isinstance(item, dict) and isinstance(item.get("model"), str) and item["model"]:
                named = item.get("lora") if isinstance(item.get("lora"), str) else item["model"]
                entries.append((item.get("name") or Path(named.rstrip("/")).name,
                                model_source(item["model"], item.get("lora"), base, f"experts[{i}]")))
            else:
                raise ConfigError(f"experts[{i}]: expected {{model: ..., name: ...}}")
    else:
        raise ConfigError("experts: missing (a mapping name: path, e.g. {math: path, code: path})")
    if not entries:
        raise ConfigError("experts: needs at least one expert")
    seen = set()
    for name, model in entries:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"experts: {name!r} is not a usable task name (a non-empty name without '/')")
        if name in seen:
            raise ConfigError(f"experts.{name}: named twice")
        seen.add(name)
        if not isinstance(model, str) or not model:
            raise ConfigError(f"experts.{name}: expected a path or hub id")
    return tuple((name, model) for name, model in entries)


def _initial(raw: Any, base: str, experts: tuple[tuple[str, str], ...]) -> str | dict[str, Any] | None:
    if raw is None or isinstance(raw, str):
        return raw
    if not isinstance(raw, dict) or "method" not in raw:
        raise ConfigError("initial: expected a path to a merged model or {method: ..., <parameter>: ...}")
    engine_config = engine_merge_config(raw, base, experts)
    from distmerge.config import load_config

    try:
        load_config(engine_config)
    except ConfigError as exc:
        raise ConfigError(f"initial: {exc}") from None
    return dict(raw)


# The checks of a section's values: each takes (where, value) and returns the value.
_POSITIVE = functools.partial(validate.number, lo=0, lo_open=True)
_NON_NEGATIVE = functools.partial(validate.number, lo=0)
_POSITIVE_INT = functools.partial(validate.number, lo=1, integer=True)
_NON_NEGATIVE_INT = functools.partial(validate.number, lo=0, integer=True)


def _one_of(*options: str):
    return functools.partial(validate.choice, choices=options)


def _section(name: str, raw: Any, keys: set[str], cls, checks: dict):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping")
    validate.no_unknown(name, raw, keys)
    values = {}
    for key, value in raw.items():
        if value is not None:
            values[key] = checks[key](f"{name}.{key}", value)
    return cls(**values)


def _resources(raw: Any) -> Resources:
    if raw is None:
        return Resources()
    if not isinstance(raw, dict):
        raise ConfigError("resources: expected a mapping")
    validate.no_unknown("resources", raw, RESOURCE_KEYS)
    values: dict[str, Any] = {}
    if "num_cpus" in raw:
        values["num_cpus"] = _POSITIVE("resources.num_cpus", raw["num_cpus"])
    if "num_gpus" in raw:
        values["num_gpus"] = _NON_NEGATIVE("resources.num_gpus", raw["num_gpus"])
    if raw.get("memory") is not None:
        from distmerge.config import parse_size

        values["memory"] = parse_size(raw["memory"], "resources.memory")
    if "retries" in raw:
        values["retries"] = _NON_NEGATIVE_INT("resources.retries", raw["retries"])
    return Resources(**values)
