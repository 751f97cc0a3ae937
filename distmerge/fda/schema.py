"""The FDA config (``fda.yaml``) as typed settings, the model families' defaults, and the keys of each job.

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
``config.json`` is known (``FdaConfig.resolve``). The YAML is read and validated by ``distmerge.fda.config``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from distmerge import dtypes
from distmerge.errors import ConfigError

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


def engine_merge_config(initial: dict[str, Any], base: str, experts: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The engine config of an inline initial merge: ``{method, **parameters}`` over base and experts."""
    parameters = {k: v for k, v in initial.items() if k != "method" and k not in INITIAL_ENGINE_KEYS}
    config = {"base_model": base, "models": [{"model": path, "name": name} for name, path in experts],
              "method": initial["method"], "parameters": parameters}
    config.update({k: initial[k] for k in INITIAL_ENGINE_KEYS if k in initial})
    return config
