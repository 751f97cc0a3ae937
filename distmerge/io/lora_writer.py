"""Writing a PEFT LoRA adapter folder from per-tensor results: low-rank factors or full tensors.

The layout is the one PEFT itself saves and reloads exactly:

* factors under ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` /
  ``lora_embedding_B`` for embeddings), with every scale already folded into B; each module's ``lora_alpha``
  equals its rank (``rank_pattern`` and ``alpha_pattern`` by exact, escaped module name), so PEFT's scale
  ``alpha / r`` is 1. A folded scale is the only exact form for a sum of LoRAs: the experts' scales differ
  inside one concatenated module, so no single alpha could carry them.
* full tensors of a module without factors: the module goes into ``modules_to_save`` (by its full name) with
  all of its parameters, since PEFT's wrapper looks up every one of them when it loads.
* full tensors of a module with factors (a changed bias): ``<module>.base_layer.<leaf>``, the key PEFT's
  ``bias: all`` saves and loads into the adapted layer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge.deferred import torch
from distmerge.errors import OutputError
from distmerge.io.lora import ADAPTER_CONFIG, PEFT_PREFIX
from distmerge.io.writer import check_target, discard, finalize, make_staging, write_json, write_safetensors

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class Factors:
    """delta = B @ A (``embedding``: delta = (B @ A)^T, as PEFT's lora_embedding), scale folded in."""

    kind: str  # linear | embedding
    a: torch.Tensor  # [r, in] (embedding: [r, rows])
    b: torch.Tensor  # [out, r] (embedding: [dim, r])

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def module_of(tensor: str) -> tuple[str, str]:
    module, _, leaf = tensor.rpartition(".")
    return module, leaf


def adapter_state(factors: dict[str, Factors], full: dict[str, torch.Tensor], base_tensors: list[str],
                  read_base: Callable[[str], torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The adapter's tensors by saved key, the adapted module names and the modules_to_save names.

    ``factors`` and ``full`` are keyed by base tensor name; a module with a full 2-D weight is saved whole
    (its factors, if any, are already inside the full value the caller gives)."""
    state: dict[str, torch.Tensor] = {}
    adapted = {module_of(name)[0] for name in factors}
    saved = sorted({module_of(name)[0] for name in full} - adapted)
    for name, f in factors.items():
        module = module_of(name)[0]
        prefix = "lora_embedding_" if f.kind == "embedding" else "lora_"
        suffix = "" if f.kind == "embedding" else ".weight"
        state[f"{PEFT_PREFIX}{module}.{prefix}A{suffix}"] = f.a.contiguous()
        state[f"{PEFT_PREFIX}{module}.{prefix}B{suffix}"] = f.b.contiguous()
    for name, value in full.items():
        module, leaf = module_of(name)
        key = f"{PEFT_PREFIX}{module}.base_layer.{leaf}" if module in adapted else f"{PEFT_PREFIX}{name}"
        state[key] = value.contiguous()
    for module in saved:  # every parameter of a saved module, the unchanged ones from the base
        for name in base_tensors:
            if module_of(name)[0] == module and f"{PEFT_PREFIX}{name}" not in state:
                state[f"{PEFT_PREFIX}{name}"] = read_base(name).contiguous()
    return state, sorted(adapted), saved


def adapter_config(factors: dict[str, Factors], adapted: list[str], saved: list[str], full: dict[str, torch.Tensor],
                   base_model: str, fan_in_fan_out: bool, task_type: str | None) -> dict[str, Any]:
    ranks = {module_of(name)[0]: f.rank for name, f in factors.items()}
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    # Exact names, escaped: PEFT reads pattern keys as regexes matched against a suffix of the module name.
    other = {re.escape(m): r for m, r in sorted(ranks.items()) if r != common}
    biases = any(module_of(n)[0] in ranks for n in full)
    return {
        "peft_type": "LORA", "base_model_name_or_path": base_model, "task_type": task_type,
        "r": common, "lora_alpha": common, "rank_pattern": other, "alpha_pattern": dict(other),
        "target_modules": adapted, "modules_to_save": saved or None, "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
        "bias": "all" if biases else "none", "init_lora_weights": True, "inference_mode": True,
    }


def write_adapter(out: Path, state: dict[str, torch.Tensor], config: dict[str, Any], force: bool,
                  extra_json: dict[str, Any] | None = None) -> Path:
    """The adapter folder at ``out``, staged beside it and renamed into place only when complete."""
    out = Path(out).expanduser()
    check_target(out, force)
    if not state:
        raise OutputError(f"'{out}': the adapter would be empty (no tensor differs from the base)")
    staging = make_staging(out)
    try:
        write_safetensors(state, staging / ADAPTER_FILE)
        write_json(staging / ADAPTER_CONFIG, config)
        for filename, data in (extra_json or {}).items():
            write_json(staging / filename, data)
        finalize(staging, out, force)
    except BaseException:
        discard(staging)
        raise
    return out
