"""The FDA config (``fda.yaml``): typed, validated before any tensor is read, errors naming the field.

```yaml
base: meta-llama/Llama-2-13b-hf                 # path or hub id
experts: {math: WizardLM/WizardMath-13B-V1.0, code: layoric/llama-2-13b-code-alpaca}
initial: {method: task_arithmetic, lambda: 0.5} # an engine merge run inline, or a path to a merged model
modules: mlp              # mlp (decoder LLMs) | block (whole layers: RoBERTa/BERT/ViT, or decoders); default by architecture
layers: [0, 1]            # optional: only these layers (default: all)
anchors: {count: 8192, tokens: 1, init: gauss, sigma: 0.01, steps: 200, lr: 0.01, weight_decay: 0.01, loss: cos}
adapt: {param: elementwise, sources: initial, alpha_init: 1.0, loss: cos, lr: 0.01, batch_size: 8192, epochs: 50}
resources: {num_cpus: 1, num_gpus: 0, memory: 8GB, retries: 3}
seed: 0
dtype: float32
```

Anything left out takes the default of the model family (spec §8.3), resolved once the base's
``config.json`` is known (``FdaConfig.resolve``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from distmerge import dtypes, validate
from distmerge.config import read_yaml
from distmerge.errors import ConfigError

TOP_KEYS = {"base", "experts", "initial", "modules", "layers", "anchors", "adapt", "resources", "seed", "dtype"}
ANCHOR_KEYS = {"count", "tokens", "init", "sigma", "steps", "lr", "weight_decay", "loss"}
ADAPT_KEYS = {"param", "sources", "alpha_init", "loss", "lr", "batch_size", "epochs"}
RESOURCE_KEYS = {"num_cpus", "num_gpus", "memory", "retries"}
INITIAL_ENGINE_KEYS = {"exclude", "include", "tokenizer", "out_dtype"}  # passed to the engine as they are
DTYPES = dtypes.NAMES
FAMILIES = ("decoder", "encoder", "vit")

# Spec §8.3: the reference settings per family. ``tokens`` None = single-token anchors [n, d].
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "decoder": {  # Llama-2-13B NLG: MLP only, TA(0.5) init, α = 1 on the merged delta
        "modules": "mlp", "initial": {"method": "task_arithmetic", "lambda": 0.5},
        "anchors": {"count": 8192, "tokens": None, "init": "gauss", "sigma": 0.01, "steps": 200, "lr": 1e-2,
                    "weight_decay": 0.01, "loss": "cos"},
        "adapt": {"param": "elementwise", "sources": "initial", "alpha_init": 1.0, "loss": "cos", "lr": 1e-2,
                  "batch_size": 8192, "epochs": 50},
    },
    "encoder": {  # RoBERTa GLUE: whole encoder layer, anchors [64, 5, d], TA(0.3) init with α per expert
        "modules": "block", "initial": {"method": "task_arithmetic", "lambda": 0.3},
        "anchors": {"count": 64, "tokens": 5, "init": "gauss", "sigma": 0.01, "steps": 1200, "lr": 1e-2,
                    "weight_decay": 0.01, "loss": "cos"},
        "adapt": {"param": "elementwise", "sources": "experts", "alpha_init": 0.3, "loss": "mse", "lr": 1e-2,
                  "batch_size": 128, "epochs": 100},
    },
    "vit": {  # ViT-B/32: whole encoder layer, anchors [64, 50, d] (tokens from the image and patch size)
        "modules": "block", "initial": {"method": "task_arithmetic", "lambda": 0.3},
        "anchors": {"count": 64, "tokens": 50, "init": "gauss", "sigma": 0.01, "steps": 1200, "lr": 1e-2,
                    "weight_decay": 0.01, "loss": "cos"},
        "adapt": {"param": "elementwise", "sources": "experts", "alpha_init": 0.3, "loss": "cos", "lr": 1e-2,
                  "batch_size": 128, "epochs": 100},
    },
}


# A whole decoder layer (modules: block) has no reference setting; its anchors are token sequences, sized as
# the encoder ones (RoBERTa: 64 anchors of 5 tokens, 1200 steps) with a few more tokens for the causal mask.
DECODER_BLOCK_ANCHORS: dict[str, Any] = {"count": 64, "tokens": 8, "steps": 1200}


@dataclass(frozen=True)
class AnchorSettings:
    count: int | None = None
    tokens: int | None = None  # None: single-token anchors [count, d]; n: [count, n, d]
    init: str | None = None  # gauss | weights
    sigma: float | None = None
    steps: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    loss: str | None = None  # similarity S: cos | mse | l1


@dataclass(frozen=True)
class AdaptSettings:
    param: str | None = None  # elementwise (α on the merged delta(s)) | raw (the unit's weights, from the base)
    sources: str | None = None  # elementwise: initial (one α on θ_init − θ0) | experts (one α per τ_t)
    alpha_init: float | None = None
    loss: str | None = None  # cos | mse | l1
    lr: float | None = None
    batch_size: int | None = None
    epochs: int | None = None


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None  # bytes; Ray's memory resource per job
    retries: int = 3  # times a job is rerun after its worker process died

    def ray_options(self) -> dict[str, Any]:
        """Ray task options: the declared resources; retried when the process dies, not on the job's own errors."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_retries": self.retries,
                                   "retry_exceptions": False}
        if self.memory:
            options["memory"] = self.memory
        return options


@dataclass(frozen=True)
class FdaConfig:
    base: str
    experts: tuple[tuple[str, str], ...]  # (name, path or hub id), in the given order
    initial: str | dict[str, Any] | None = None  # path, or {method: ..., parameters...}; None: family default
    modules: str | None = None
    layers: tuple[int, ...] | None = None
    anchors: AnchorSettings = field(default_factory=AnchorSettings)
    adapt: AdaptSettings = field(default_factory=AdaptSettings)
    resources: Resources = field(default_factory=Resources)
    seed: int = 0
    dtype: str = "float32"
    family: str | None = None  # set by resolve()

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.experts)

    @property
    def resolved(self) -> bool:
        return self.family is not None

    def resolve(self, family: str, vit_tokens: int | None = None) -> "FdaConfig":
        """Fill what was left out with the family's defaults and check the combination."""
        if family not in FAMILY_DEFAULTS:
            raise ConfigError(f"no FDA defaults for model family {family!r} (one of {', '.join(FAMILIES)})")
        defaults = FAMILY_DEFAULTS[family]
        anchor_defaults = dict(defaults["anchors"])
        if family == "vit" and vit_tokens:
            anchor_defaults["tokens"] = vit_tokens
        # Which units a family has is checked where the model is read (modules.detect_layout).
        modules = self.modules or defaults["modules"]
        if family == "decoder" and modules == "block":
            anchor_defaults.update(DECODER_BLOCK_ANCHORS)
        anchors = _fill(self.anchors, anchor_defaults)
        if modules == "mlp" and anchors.tokens == 1:  # one token per anchor: the NLG shape [count, d]
            anchors = replace(anchors, tokens=None)
        adapt = _fill(self.adapt, defaults["adapt"])
        initial = self.initial if self.initial is not None else dict(defaults["initial"])
        return replace(self, modules=modules, anchors=anchors, adapt=adapt, initial=initial, family=family)

    # --- hashes: what each job's result depends on ---------------------------------------------------
    def construction_key(self, layer: int, task: str) -> str:
        self._require_resolved()
        expert = dict(self.experts)[task]
        return _digest({"stage": "construct", "version": 1, "base": self.base, "expert": expert, "task": task,
                        "contents": [content_fingerprint(self.base), content_fingerprint(expert)], "layer": layer,
                        "modules": self.modules, "anchors": asdict(self.anchors), "seed": self.seed,
                        "dtype": self.dtype})

    def adaptation_key(self, layer: int, initial_id: str) -> str:
        self._require_resolved()
        return _digest({"stage": "adapt", "version": 1, "layer": layer, "initial": initial_id,
                        "anchors": [self.construction_key(layer, t) for t in self.task_names],
                        "adapt": asdict(self.adapt), "seed": self.seed, "dtype": self.dtype})

    def initial_id(self) -> str:
        """Identifies the initial merge: its path, or the hash of the inline engine merge."""
        self._require_resolved()
        if isinstance(self.initial, str):
            return f"path:{self.initial}:{content_fingerprint(self.initial)}"
        return "merge:" + _digest({"base": self.base, "experts": list(self.experts), "initial": self.initial,
                                   "contents": [content_fingerprint(m) for m in (self.base, *dict(self.experts).values())]})

    def _require_resolved(self) -> None:
        if not self.resolved:
            raise ValueError("resolve() the config against the base model first")

    def to_yaml_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"base": self.base, "experts": dict(self.experts), "initial": self.initial,
                               "modules": self.modules}
        if self.layers is not None:
            out["layers"] = list(self.layers)
        out["anchors"] = asdict(self.anchors)
        out["adapt"] = asdict(self.adapt)
        out["resources"] = asdict(self.resources)
        out.update(seed=self.seed, dtype=self.dtype)
        return out


def _fill(settings, defaults: dict[str, Any]):
    values = {k: (v if v is not None else defaults.get(k)) for k, v in asdict(settings).items()}
    return type(settings)(**values)


def content_fingerprint(source: str) -> str:
    """Names, sizes and modification times of a local model's files (a hub id as itself): a model rewritten
    in place gets new keys, so a rerun never reuses anchors or layers computed from the old weights."""
    path = Path(source).expanduser()
    if not path.exists():
        return f"id:{source}"
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return _digest([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- loading and validation -----------------------------------------------------------------------


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
    experts = _experts(raw.get("experts"))
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


def _experts(raw: Any) -> tuple[tuple[str, str], ...]:
    entries: list[tuple[Any, Any]]
    if isinstance(raw, dict):
        entries = list(raw.items())
    elif isinstance(raw, list):
        entries = []
        for i, item in enumerate(raw):
            if isinstance(item, dict) and "model" in item:
                entries.append((item.get("name") or Path(str(item["model"]).rstrip("/")).name, item["model"]))
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


def engine_merge_config(initial: dict[str, Any], base: str, experts: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The engine config of an inline initial merge: ``{method, **parameters}`` over base and experts."""
    parameters = {k: v for k, v in initial.items() if k != "method" and k not in INITIAL_ENGINE_KEYS}
    config = {"base_model": base, "models": [{"model": path, "name": name} for name, path in experts],
              "method": initial["method"], "parameters": parameters}
    config.update({k: initial[k] for k in INITIAL_ENGINE_KEYS if k in initial})
    return config


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
