"""mergekit YAML (``merge_method:``) translated to a distmerge config with mergekit's semantics.

Covered: linear, task_arithmetic, ties, dare_linear, dare_ties with ``models:`` (not ``slices:``). The
translation follows mergekit's registry defaults: ties normalizes by the weights of the agreeing models,
dare_* do not; dare_* rescale to the task vector's L1 norm; density is the fraction *kept* (default 1); the
trim is per tensor; a zero-sum element takes the positive sign; the base model is never a task vector.
"""

from __future__ import annotations

import logging
from typing import Any

from distmerge.config import MergeConfig, build_config, default_name
from distmerge.errors import ConfigError

LOG = logging.getLogger(__name__)

TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
PER_MODEL = {"weight", "density"}
SUPPORTED = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


def _dtype(value: Any, key: str) -> str | None:
    if value is None:
        return None
    text = str(value).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    return aliases.get(text, text)


def _one_minus(setting: Any) -> Any:
    """density (kept) -> drop_rate, for every form a setting can take."""
    if isinstance(setting, list):
        return [
            {**entry, "value": _one_minus(entry["value"])} if isinstance(entry, dict) else 1.0 - entry
            for entry in setting
        ]
    return 1.0 - setting


def translate_mergekit(raw: dict[str, Any]) -> MergeConfig:
    unknown = set(raw) - TOP_LEVEL
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown mergekit key")
    method = raw["merge_method"]
    if method not in SUPPORTED:
        raise ConfigError(f"merge_method: '{method}' is not supported from mergekit YAML (supported: {', '.join(SUPPORTED)})")
    if "slices" in raw or "modules" in raw:
        raise ConfigError("slices: layer slicing/stacking is not supported; list the models under 'models:'")
    if "chat_template" in raw:
        LOG.warning("chat_template is not applied: tokenizer files are copied from the tokenizer source as they are")
    base = raw.get("base_model")
    if isinstance(base, dict):
        base = base.get("model")
    params = dict(raw.get("parameters") or {})
    global_settings = {k: params.pop(k) for k in list(params) if k in PER_MODEL}
    lam = params.pop("lambda", 1.0)
    normalize = params.pop("normalize", None)
    rescale = params.pop("rescale", None)  # default: true for dare_*, false for ties
    params.pop("int8_mask", None)  # only the mask's storage dtype; results are the same
    if params:
        raise ConfigError(f"parameters.{sorted(params)[0]}: not a parameter of mergekit's {method}")

    models: list[tuple[str, str | None, dict]] = []
    for i, entry in enumerate(raw.get("models") or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        model = entry.get("model") if isinstance(entry, dict) else None
        if isinstance(model, dict):
            model = model.get("model")
        if not isinstance(model, str):
            raise ConfigError(f"models[{i}].model: missing")
        if method != "linear" and model == base:
            continue  # mergekit never takes a task vector of the base
        model_params = dict(entry.get("parameters") or {})
        for key in model_params:
            if key not in PER_MODEL:
                raise ConfigError(f"models[{i}].parameters.{key}: not a per-model parameter of mergekit's {method}")
        models.append((model, None, model_params))
    if not models:
        raise ConfigError("models: no model to merge besides the base")

    if method in ("dare_linear", "dare_ties"):
        # Per-model density (kept) becomes drop_rate; the magnitude trim is off.
        if "density" in global_settings:
            global_settings["drop_rate"] = _one_minus(global_settings.pop("density"))
        for _, _, model_params in models:
            if "density" in model_params:
                model_params["drop_rate"] = _one_minus(model_params.pop("density"))
        global_settings.setdefault("drop_rate", 0.0)

    if method == "linear":
        name, method_params = "weight_average", {"normalize": True if normalize is None else bool(normalize)}
    elif method == "task_arithmetic":
        name, method_params = "task_arithmetic", {"lambda": lam, "normalize": bool(normalize)}
    elif method == "ties":
        global_settings.setdefault("density", 1.0)
        name, method_params = "ties", {
            "lambda": lam, "density": 1.0, "trim_scope": "tensor", "convention": "mergekit",
            "disjoint": "mean" if (normalize is None or normalize) else "sum",
            "trim_rescale": "l1" if rescale else "none",
        }
    else:
        name = "dare"
        method_params = {"drop_rate": 0.0, "rescale": "none" if rescale is False else "l1", "seed": 0, "lambda": lam}
        if method == "dare_linear":
            method_params.update(then="task_arithmetic", normalize=bool(normalize))
        else:
            method_params.update(then="ties", density=1.0, trim_scope="tensor", convention="mergekit",
                                 disjoint="mean" if normalize else "sum")

    tokenizer = "base"
    source = raw.get("tokenizer_source")
    if isinstance(raw.get("tokenizer"), dict):
        source = raw["tokenizer"].get("source", "union")
    if source in ("union", "base"):
        tokenizer = source
    elif isinstance(source, str):
        tokenizer = default_name(source)
    dtype = _dtype(raw.get("dtype"), "dtype")
    out_dtype = _dtype(raw.get("out_dtype"), "out_dtype") or dtype
    names = [default_name(m) for m, _, _ in models]
    if tokenizer not in ("base", "union") and tokenizer not in names:
        raise ConfigError(f"tokenizer_source: '{source}' is not one of the merged models")
    return build_config(
        method=name, models=models, base_model=base, parameters=method_params, dtype=dtype or "float32",
        out_dtype=out_dtype, tokenizer=tokenizer, exclude=(), include=(), out_shard_size=1 << 30, device="cpu",
        source_format="mergekit", global_settings=global_settings,
    )
