"""``distmerge lora sum``: a task arithmetic or weight average of LoRA experts on one base, as a LoRA adapter.

The merged delta of an adapted tensor is sum_t c_t s_t B_t A_t (c_t the method's coefficient of expert t, s_t
its LoRA scale), which is exactly the LoRA with concatenated factors B = [c_1 s_1 B_1, ..., c_T s_T B_T] and
A = [A_1; ...; A_T] of rank sum r_t: no approximation, no dense matrix. Tensors an expert stores whole
(``modules_to_save``, trained biases, an embedding's saved base weight) are merged densely against the base and
written as full tensors. Other methods do not keep the merge low rank: merge, then ``distmerge lora extract``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distmerge import dtypes
from distmerge.config import load_config
from distmerge.errors import ConfigError, InputError, where
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.lora import ADAPTER_CONFIG, LoraCheckpoint, open_checkpoint
from distmerge.io.lora_writer import Factors, adapter_config, adapter_state, module_of, write_adapter
from distmerge.io.writer import check_target
from distmerge.tensors import resolve_tensors

LOW_RANK_METHODS = ("task_arithmetic", "weight_average")


@dataclass(frozen=True)
class SumResult:
    out: Path
    modules: int
    full_tensors: int
    ranks: dict[str, int]

    def summary(self) -> str:
        top = max(self.ranks.values(), default=0)
        return (f"wrote a LoRA adapter to {self.out}: {self.modules} module(s) at rank up to {top} (concatenated "
                f"factors, exact), {self.full_tensors} full tensor(s)")


def coefficients(method: str, params, weights: tuple[float, ...], tensor: str) -> tuple[float, ...]:
    """c_t with merged = base + sum_t c_t tau_t, as the method computes it."""
    total = float(sum(weights))
    divisor = total if abs(total) >= 1e-8 else 1.0  # the ops' guard for a zero weight sum
    if method == "task_arithmetic":
        scale = params.lam / (divisor if params.normalize else 1.0)
        return tuple(scale * w for w in weights)
    if params.normalize:
        return tuple(w / divisor for w in weights)
    if abs(total - 1.0) > 1e-6:  # sum_t w_t theta_t = W theta_0 + sum_t w_t tau_t: W theta_0 is not low rank
        raise ConfigError(f"parameters.normalize: false with weights summing to {total:g} on tensor '{tensor}': "
                          "the merge is not base + a low-rank delta; use `distmerge merge` then "
                          "`distmerge lora extract`")
    return tuple(weights)


def concatenated(parts: list[tuple[float, torch.Tensor, torch.Tensor]], kind: str) -> Factors:
    """The factors of sum_i c_i B_i A_i: B = [c_1 B_1, ...], A = [A_1; ...] (rank sum r_i)."""
    a = torch.cat([part_a.float() for _, part_a, _ in parts], dim=0)
    b = torch.cat([c * part_b.float() for c, _, part_b in parts], dim=1)
    return Factors(kind, a, b)


def lora_sum(config_path: str | Path, out: str | Path, force: bool = False) -> SumResult:
    out = Path(out).expanduser()
    config = load_config(config_path)
    if config.method not in LOW_RANK_METHODS:
        raise ConfigError(f"method: '{config.method}' does not keep a merge of LoRAs low rank (only "
                          f"{' and '.join(LOW_RANK_METHODS)} do): run `distmerge merge`, then `distmerge lora "
                          "extract MERGED --base BASE --rank R`")
    if config.base_model is None:
        raise ConfigError("base_model: `lora sum` needs the experts' base model")
    check_target(out, force)
    base = Checkpoint(config.base_model, "base")
    experts = [open_checkpoint(spec.model, spec.name) for spec in config.models]
    for i, expert in enumerate(experts):
        if not isinstance(expert, LoraCheckpoint):
            raise ConfigError(f"models[{i}].model: '{config.models[i].model}' is not a LoRA adapter; `lora sum` "
                              "takes LoRA experts only (use `distmerge merge`, then `distmerge lora extract`)")
        if expert.base.path.resolve() != base.path.resolve():
            raise ConfigError(f"models[{i}].model: the adapter's base '{expert.base.source}' is not base_model "
                              f"'{config.base_model}'")
    fan_in_fan_out = {e.settings.fan_in_fan_out for e in experts}
    if len(fan_in_fan_out) > 1:
        raise InputError(f"{where(model=experts[0].name)}: the experts disagree on fan_in_fan_out")
    outputs, vocab_plan, _ = resolve_tensors(config, base, experts)
    if vocab_plan.changed:
        raise InputError("the experts' vocabularies differ from the base's: `lora sum` needs one vocabulary")
    method = config.build_method()
    factors: dict[str, Factors] = {}
    dense: dict[str, tuple[float, ...]] = {}
    for output in outputs:
        if not output.merged:
            continue
        c = coefficients(config.method, method.params, output.job.weights, output.name)
        if any(output.name in e.full for e in experts):
            dense[output.name] = c
            continue
        parts = [(c_t * e.factors[output.name].scale, *e.factor_tensors(e.factors[output.name]))
                 for c_t, e in zip(c, experts) if output.name in e.factors]
        if parts:
            kinds = {e.factors[output.name].kind for e in experts if output.name in e.factors}
            factors[output.name] = concatenated(parts, kinds.pop())
    by_name = {o.name: o for o in outputs}
    dense_weights = {module_of(n)[0] for n in dense if len(by_name[n].shape) >= 2}
    for name in [n for n in factors if module_of(n)[0] in dense_weights]:  # a module saved whole
        dense[name] = coefficients(config.method, method.params, by_name[name].job.weights, name)
        del factors[name]
    full = {name: merged_dense(name, c, base, experts, dtypes.torch_dtype(by_name[name].out_dtype)) for name, c in dense.items()}
    state, adapted, saved = adapter_state(factors, full, sorted(base.tensors), base.read)
    task_types = {json.loads((e.path / ADAPTER_CONFIG).read_text()).get("task_type") for e in experts}
    task_type = task_types.pop() if len(task_types) == 1 else None
    settings = adapter_config(factors, adapted, saved, full, str(config.base_model), fan_in_fan_out.pop(),
                              task_type if task_type == "CAUSAL_LM" else None)
    write_adapter(out, state, settings, force)
    return SumResult(out, len(adapted), len(full), {module_of(n)[0]: f.rank for n, f in factors.items()})


def merged_dense(name: str, c: tuple[float, ...], base: Checkpoint, experts: list[LoraCheckpoint],
                 out_dtype: torch.dtype) -> torch.Tensor:
    """base + sum_t c_t (theta_t - base) in float32, as the engine merges it, in the output dtype."""
    reference = base.read(name).float()
    merged = reference.clone()
    for c_t, expert in zip(c, experts):
        merged += c_t * (expert.read(name).float() - reference)
    return merged.to(out_dtype)
