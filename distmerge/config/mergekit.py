"""mergekit YAML (``merge_method:``) read into a distmerge config with mergekit 0.1.5's semantics.

One row per mergekit method (``ROWS``): the distmerge method it becomes, the parameters that give mergekit's
semantics (per-tensor trim, mergekit's zero-sign rule and cuts, L1 rescale), mergekit's defaults for its own
parameters, and what the base model is to it. Only ``models:`` (not ``slices:``). Per-model values given once in
``parameters:`` apply to every model without its own, as in mergekit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from distmerge.config.schema import MergeConfig, build_config, default_name
from distmerge.errors import ConfigError

LOG = logging.getLogger(__name__)

TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
IGNORED = {"int8_mask"}  # only the consensus mask's storage dtype; results are the same


def _one_minus(setting: Any) -> Any:
    """density (kept) -> drop_rate, for every form a setting can take."""
    if isinstance(setting, list):
        return [
            {**entry, "value": _one_minus(entry["value"])} if isinstance(entry, dict) else 1.0 - entry
            for entry in setting
        ]
    return 1.0 - setting


def _flag(default: bool) -> Callable[[Any], bool]:
    return lambda value: default if value is None else bool(value)


def _disjoint(default: bool) -> Callable[[Any], str]:
    return lambda value: "mean" if _flag(default)(value) else "sum"


def _l1_or(otherwise: str, default: bool) -> Callable[[Any], str]:
    return lambda value: "l1" if _flag(default)(value) else otherwise


@dataclass(frozen=True)
class Row:
    """How one mergekit method reads: ``method`` with ``fixed`` parameters; each of mergekit's shared parameters
    (``shared``: name -> (distmerge parameter, value from mergekit's value or None when absent)); its
    per-model parameters (``per_model``: name -> (distmerge per-model parameter, value converter));
    ``base``: ``task_vectors`` (the base is theta_0, never a task vector), ``first`` (the base is the first
    endpoint and stays among the models: slerp), ``optional`` (a base makes the method use it: nuslerp),
    ``model`` (the base is only where tokenizer and config come from: linear)."""

    method: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    shared: Mapping[str, tuple[str, Callable[[Any], Any]]] = field(default_factory=dict)
    per_model: Mapping[str, tuple[str, Callable[[Any], Any]]] = field(default_factory=dict)
    base: str = "task_vectors"


def _same(value: Any) -> Any:
    return value


LAMBDA = {"lambda": ("lambda", lambda v: 1.0 if v is None else v)}
WEIGHT = {"weight": ("weight", _same)}
DENSITY = {"density": ("density", _same)}
MERGEKIT_TIES = {"density": 1.0, "trim_scope": "tensor", "convention": "mergekit"}  # mergekit's density default: 1

ROWS: dict[str, Row] = {
    "linear": Row("weight_average", shared={"normalize": ("normalize", _flag(True))}, per_model=WEIGHT, base="model"),
    "task_arithmetic": Row("task_arithmetic", shared={**LAMBDA, "normalize": ("normalize", _flag(False))},
                           per_model=WEIGHT),
    "ties": Row("ties", fixed=MERGEKIT_TIES,
                shared={**LAMBDA, "normalize": ("disjoint", _disjoint(True)), "rescale": ("trim_rescale", _l1_or("none", False))},
                per_model={**WEIGHT, **DENSITY}),
    # DARE: mergekit's density is the fraction kept; the magnitude trim of dare_ties is off (density 1)
    "dare_linear": Row("dare", fixed={"drop_rate": 0.0, "seed": 0, "then": "task_arithmetic"},
                       shared={**LAMBDA, "normalize": ("normalize", _flag(False)), "rescale": ("rescale", _l1_or("none", True))},
                       per_model={**WEIGHT, "density": ("drop_rate", _one_minus)}),
    "dare_ties": Row("dare", fixed={"drop_rate": 0.0, "seed": 0, "then": "ties", **MERGEKIT_TIES},
                     shared={**LAMBDA, "normalize": ("disjoint", _disjoint(False)), "rescale": ("rescale", _l1_or("none", True))},
                     per_model={**WEIGHT, "density": ("drop_rate", _one_minus)}),
    "breadcrumbs": Row("breadcrumbs", fixed={"density": 1.0, "gamma": 0.01, "convention": "mergekit"},
                       shared={**LAMBDA, "normalize": ("normalize", _flag(False)), "rescale": ("rescale", _l1_or("none", False))},
                       per_model={**WEIGHT, **DENSITY, "gamma": ("gamma", _same)}),
    "breadcrumbs_ties": Row("breadcrumbs_ties", fixed={"density": 1.0, "gamma": 0.01, "convention": "mergekit"},
                            shared={**LAMBDA, "normalize": ("normalize", _flag(False)),
                                    "rescale": ("rescale", _l1_or("none", False))},
                            per_model={**WEIGHT, **DENSITY, "gamma": ("gamma", _same)}),
    "della": Row("della", fixed={"density": 1.0, "epsilon": 0.15, "convention": "mergekit"},
                 shared={**LAMBDA, "normalize": ("normalize", _flag(True)), "rescale": ("rescale", _l1_or("none", True))},
                 per_model={**WEIGHT, **DENSITY, "epsilon": ("epsilon", _same)}),
    "della_linear": Row("della_linear", fixed={"density": 1.0, "epsilon": 0.15, "convention": "mergekit"},
                        shared={**LAMBDA, "normalize": ("normalize", _flag(False)), "rescale": ("rescale", _l1_or("none", True))},
                        per_model={**WEIGHT, **DENSITY, "epsilon": ("epsilon", _same)}),
    "model_stock": Row("model_stock", shared={"filter_wise": ("filter_wise", _flag(False))}),
    "slerp": Row("slerp", shared={"t": ("t", _same)}, base="first"),
    "nuslerp": Row("nuslerp", shared={"nuslerp_flatten": ("nuslerp_flatten", _flag(True)),
                                      "nuslerp_row_wise": ("nuslerp_row_wise", _flag(False))},
                   per_model=WEIGHT, base="optional"),
}


def _dtype(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    return aliases.get(text, text)


def _model_path(entry: Any) -> Any:
    model = entry.get("model") if isinstance(entry, dict) else entry
    return model.get("model") if isinstance(model, dict) else model


def _method_parameters(row: Row, method: str, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(distmerge method parameters, per-model values given once for all models) from mergekit's ``parameters``."""
    params = dict(row.fixed)
    shared_models: dict[str, Any] = {}
    for key in sorted(set(given) - set(row.shared) - set(row.per_model) - IGNORED):
        raise ConfigError(f"parameters.{key}: not a parameter of mergekit's {method}")
    for key, (target, convert) in row.shared.items():
        value = convert(given.get(key))
        if value is not None:
            params[target] = value
    for key, (target, convert) in row.per_model.items():
        if key in given:
            shared_models[target] = convert(given[key])
    return params, shared_models


def read_mergekit(raw: dict[str, Any]) -> MergeConfig:
    unknown = set(raw) - TOP_LEVEL
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown mergekit key")
    method = raw["merge_method"]
    if method not in ROWS:
        raise ConfigError(f"merge_method: '{method}' is not supported from mergekit YAML (supported: {', '.join(ROWS)})")
    row = ROWS[method]
    if "slices" in raw or "modules" in raw:
        raise ConfigError("slices: layer slicing/stacking is not supported; list the models under 'models:'")
    if "chat_template" in raw:
        LOG.warning("chat_template is not applied: tokenizer files are copied from the tokenizer source as they are")
    base = _model_path(raw.get("base_model"))
    given = raw.get("parameters") or {}
    if not isinstance(given, dict):
        raise ConfigError("parameters: expected a mapping")
    method_params, shared_models = _method_parameters(row, method, given)

    models: list[tuple[str, str | None, dict]] = []
    for i, entry in enumerate(raw.get("models") or []):
        model = _model_path(entry)
        if not isinstance(model, str):
            raise ConfigError(f"models[{i}].model: missing")
        if row.base in ("task_vectors", "optional") and model == base:
            continue  # mergekit never takes a task vector of the base
        model_params: dict[str, Any] = {}
        for key, value in ((entry.get("parameters") or {}) if isinstance(entry, dict) else {}).items():
            if key not in row.per_model:
                raise ConfigError(f"models[{i}].parameters.{key}: not a per-model parameter of mergekit's {method}")
            target, convert = row.per_model[key]
            model_params[target] = convert(value)
        models.append((model, None, model_params))
    if row.base == "first" and base is not None:
        # the base is the t = 0 endpoint: first among the models, not a base to take task vectors against
        models.sort(key=lambda m: m[0] != base)
        base = None
    if row.base == "optional":
        method_params["use_base"] = base is not None
    if not models:
        raise ConfigError("models: no model to merge besides the base")

    tokenizer = "base"
    source = raw.get("tokenizer_source")
    if isinstance(raw.get("tokenizer"), dict):
        source = raw["tokenizer"].get("source", "union")
    if source in ("union", "base"):
        tokenizer = source
    elif isinstance(source, str):
        tokenizer = default_name(source)
    dtype = _dtype(raw.get("dtype"))
    out_dtype = _dtype(raw.get("out_dtype")) or dtype
    names = [default_name(m) for m, _, _ in models]
    if tokenizer not in ("base", "union") and tokenizer not in names:
        raise ConfigError(f"tokenizer_source: '{source}' is not one of the merged models")
    return build_config(
        method=row.method, models=models, base_model=base, parameters=method_params, dtype=dtype or "float32",
        out_dtype=out_dtype, tokenizer=tokenizer, exclude=(), include=(), out_shard_size=1 << 30, device="cpu",
        source_format="mergekit", shared_model_settings=shared_models,
    )
