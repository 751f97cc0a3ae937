"""distmerge's own YAML dialect (``method:``), see README."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distmerge import validate
from distmerge.config.schema import MergeConfig, build_config
from distmerge.errors import ConfigError
from distmerge.methods import METHODS

TOP_LEVEL_KEYS = {
    "base_model", "models", "method", "parameters", "dtype", "out_dtype", "tokenizer", "exclude", "include",
    "out_shard_size", "device",
}
MODEL_KEYS = {"model", "name", "parameters", "lora"}


def read_distmerge(raw: dict[str, Any]) -> MergeConfig:
    validate.no_unknown("", raw, TOP_LEVEL_KEYS)
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
    from distmerge.io.checkpoint import HUB_ID
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
    if isinstance(named, str) and HUB_ID.match(named):  # a hub id: the cache or the hub, as any model source
        return f"{named}+{model}"
    raise ConfigError(f"{where}.model: '{model}' is a LoRA adapter; its base ({named!r}) is not a local folder and "
                      f"the config has no base_model: write model: BASE+{model}")


