"""``distmerge twin build``: shared expert, exclusive parts and router, written as one twin folder, atomically.

1. theta* = the engine's merge of the experts (``shared:``; task arithmetic 0.3 by default), written by
   ``distmerge.engine.driver.merge`` into a hidden staging folder beside the target. With ``exclusive.lora:
   factors`` the experts' LoRA factors are merged first (A* = lambda sum A_t, B* = lambda sum B_t, one adapter
   written beside the staging folder) and theta* is the engine's merge of that adapter on the base.
2. E_t = compress(theta_t - theta*) for every task and tensor, one Ray task per layer group (``compress``).
3. Router features of every task's samples under theta* (Ray Data on the evaluator's actors, ``features``), the
   MLP trained on the driver (``router``).
4. ``twin.json`` and the report, then the staging folder is renamed to the target. A failure at any step leaves
   no folder (and an existing target untouched).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge import dtypes
from distmerge.io import writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.lora import open_checkpoint
from distmerge.errors import ConfigError
from distmerge.io.vocab import INPUT_EMBEDDING
from distmerge.twin.config import TwinConfig, load_twin_config
from distmerge.twin.folder import EXCLUSIVE, EXCLUSIVE_INDEX, FORMAT, REPORT, TWIN_JSON

LOG = logging.getLogger(__name__)


@dataclass
class BuildResult:
    out: Path
    tasks: list[str]
    errors: dict[str, float]  # "task::tensor" -> relative Frobenius error of its exclusive part
    factor_bytes: int
    router: dict[str, Any]
    merge_summary: str

    def summary(self) -> str:
        worst = max(self.errors.items(), key=lambda kv: kv[1], default=("-", 0.0))
        mean = sum(self.errors.values()) / len(self.errors) if self.errors else 0.0
        held = self.router.get("holdout_accuracy")
        accuracy = f"{held:.3f}" if held is not None else "n/a (no held-out samples)"
        return (f"wrote a twin folder to {self.out}: {len(self.tasks)} task(s), exclusive parts "
                f"{self.factor_bytes / 1e6:.1f} MB, relative error mean {mean:.3g}, worst {worst[1]:.3g} ({worst[0]}); "
                f"router held-out accuracy {accuracy} (train {self.router['train_accuracy']:.3f}); per tensor in "
                f"{REPORT}")


def router_device(device: str) -> str:
    """The driver trains the router: on its GPU where it has one (and ``device`` allows)."""
    import torch

    return "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def floating_tensors(checkpoint: Checkpoint) -> list[str]:
    return sorted(n for n, info in checkpoint.tensors.items() if dtypes.is_floating(info.dtype))


def compress_all(config: TwinConfig, staging: Path, experts: list[Checkpoint], workers: int | None,
                 progress: bool) -> list[dict[str, Any]]:
    from distmerge.lora_extract import run_per_group
    from distmerge.twin.compress import compress_group

    calls = compress_calls(config, staging, experts)
    results = list(run_per_group(compress_group, calls, workers, desc="twin compress" if progress else None))
    write_exclusive_index(staging, config, results)
    return results


def compress_calls(config: TwinConfig, staging: Path, experts: list[Checkpoint]) -> list[tuple]:
    """The arguments of ``compress.compress_group`` for every layer group of theta* (experts checked first)."""
    from distmerge.lora_extract import layer_groups
    from distmerge.twin.compress import check_expert

    shared = Checkpoint(str(staging), "shared")
    names = floating_tensors(shared)
    for expert in experts:
        check_expert(expert, shared, names)
    tasks = list(zip(config.tasks, experts))
    # exclusive.lora: factors adds the shared lambda the factors are merged with
    extra = (config.merge.parameters["lambda"],) if config.exclusive.lora == "factors" else ()
    return [(i, group, shared, tasks, config.exclusive, str(staging), *extra)
            for i, group in enumerate(layer_groups(names))]


def check_factor_experts(config: TwinConfig, experts: list[Checkpoint]) -> None:
    """``exclusive.lora: factors``: every expert a LoRA adapter of linear layers on the base, all with the same
    adapted weights, factor keys, ranks and scales, and nothing stored whole (the factors are what is merged)."""
    from distmerge.io.lora import LoraCheckpoint

    base = Checkpoint(config.merge.base_model, "base")
    first = None
    for i, (spec, expert) in enumerate(zip(config.merge.models, experts)):
        where = f"models[{i}] ('{spec.name}')"
        if not isinstance(expert, LoraCheckpoint):
            raise ConfigError(f"{where}: exclusive.lora: factors needs every expert to be a LoRA adapter; "
                              f"'{spec.model}' is a full model (or use exclusive.lora: product)")
        if Path(expert.base.source).resolve() != Path(base.source).resolve():
            raise ConfigError(f"{where}: the adapter's base '{expert.base.source}' is not base_model "
                              f"'{config.merge.base_model}'")
        if expert.full:
            raise ConfigError(f"{where}: the adapter stores {sorted(expert.full)[0]} whole (modules_to_save); "
                              "exclusive.lora: factors routes LoRA factors only (use exclusive.lora: product)")
        if expert.settings.fan_in_fan_out or any(f.kind != "linear" for f in expert.factors.values()):
            raise ConfigError(f"{where}: exclusive.lora: factors takes LoRA on linear layers (no embedding or "
                              "fan_in_fan_out adapters; use exclusive.lora: product)")
        plan = {t: {"rank": f.rank, "scale": f.scale, "factor keys": (f.a_key, f.b_key)}
                for t, f in expert.factors.items()}
        if first is None:
            first = (spec.name, plan)
            continue
        difference = plan_difference(plan, *first)
        if difference:
            raise ConfigError(f"{where}: {difference}; exclusive.lora: factors averages the factors, so every "
                              "adapter must adapt the same modules with the same ranks and scales")


def plan_difference(plan: dict[str, dict], first_name: str, first: dict[str, dict]) -> str | None:
    """The first way one adapter's factors differ from the first adapter's: a module only one of them adapts, or
    a module's rank, scale or factor keys (None: the same)."""
    for module in sorted(set(plan) ^ set(first)):
        if module in plan:
            return f"it adapts {module}, which '{first_name}' does not"
        return f"it does not adapt {module}, which '{first_name}' does"
    for module in sorted(plan):
        for field, value in plan[module].items():
            if value != first[module][field]:
                return f"{module}: its {field} {value} against {first[module][field]} in '{first_name}'"
    return None


def write_merged_adapter(experts: list[Checkpoint], coefficient: float, out: Path) -> Path:
    """One adapter with A* = c sum A_t and B* = c sum B_t under the first expert's keys and adapter config."""
    import shutil

    from distmerge.io.lora import ADAPTER_CONFIG
    from distmerge.twin.compress import merged_factors

    out.mkdir(parents=True)
    shutil.copyfile(experts[0].path / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    named = [(e.name, e) for e in experts]
    tensors = {}
    for target, factors in experts[0].factors.items():
        merged = merged_factors(named, target, coefficient)
        tensors[factors.a_key], tensors[factors.b_key] = merged.lora_a, merged.lora_b
    writer.write_safetensors(tensors, out / "adapter_model.safetensors")
    return out


def shared_merge_config(config: TwinConfig, experts: list[Checkpoint], staging: Path):
    """The merge that writes theta*: the shared section's, or for exclusive.lora: factors, base + the merged
    adapter (task arithmetic at lambda 1 of that one adapter: theta* = base + scale B* A*)."""
    import dataclasses

    from distmerge.config.schema import ModelSpec

    if config.exclusive.lora != "factors":
        return config.merge
    adapter = write_merged_adapter(experts, config.merge.parameters["lambda"], staging.with_name(
        staging.name + "-adapter"))
    return dataclasses.replace(config.merge, models=(ModelSpec(f"{config.merge.base_model}+{adapter}", "shared"),),
                               parameters={**config.merge.parameters, "lambda": 1.0})


def write_exclusive_index(staging: Path, config: TwinConfig, results: list[dict[str, Any]]) -> None:
    (staging / EXCLUSIVE).mkdir(exist_ok=True)
    writer.write_index(staging, [r for r in results if r["tensors"]], {"tasks": list(config.tasks)},
                       filename=EXCLUSIVE_INDEX)


def manifest(config: TwinConfig, shared: Checkpoint) -> dict[str, Any]:
    settings = shared.config or {}
    tied = None
    if settings.get("tie_word_embeddings"):
        tied = next((n for n in shared.tensors if INPUT_EMBEDDING.search(n)), None)
    exclusive = config.exclusive
    return {"format": FORMAT, "version": 1, "tasks": list(config.tasks),
            "shared": {"method": config.merge.method, "parameters": config.merge.parameters},
            "exclusive": {"index": EXCLUSIVE_INDEX, "rank": exclusive.rank, "rank_fraction": exclusive.rank_fraction,
                          "svd": exclusive.svd, "oversample": exclusive.oversample, "niter": exclusive.niter,
                          "lora": exclusive.lora, "dtype": exclusive.dtype, "seed": exclusive.seed},
            "router": {"folder": "router", "field": config.router.field, "max_length": config.router.max_length},
            "experts": {spec.name: spec.model for spec in config.merge.models},
            "tied_embedding": tied}


def build(config_source: str | Path | dict, out: str | Path, *, workers: int | None = None,
          address: str | None = None, force: bool = False, progress: bool = True, device: str = "auto"
          ) -> BuildResult:
    from distmerge.engine.driver import merge
    from distmerge.engine.ray_session import ray_session
    from distmerge.twin.features import check_field, compute_features
    from distmerge.twin.router import train_router

    config = load_twin_config(config_source)
    out = Path(out).expanduser().resolve()
    writer.check_target(out, force)
    experts = [open_checkpoint(spec.model, spec.name) for spec in config.merge.models]  # headers checked now
    if config.exclusive.lora == "factors":
        check_factor_experts(config, experts)
    for task in config.tasks:
        check_field(Path(config.router.data[task]).expanduser(), config.router.field, task)
    staging = out.parent / f".{out.name}{writer.STAGING_MARK}twin-{uuid.uuid4().hex[:12]}"
    with ray_session(address, num_cpus=workers):
        try:
            merged = merge(shared_merge_config(config, experts, staging), staging, workers=workers,
                           progress=progress, resume=False)
            results = compress_all(config, staging, experts, workers, progress)
            features, labels = compute_features(staging, config.tasks, config.router, device)
            options = config.router
            trained = train_router(features, labels, list(config.tasks), options.epochs, options.lr,
                                   options.batch_size, options.dropout, options.holdout, options.seed,
                                   device=router_device(device), progress=progress)
            errors = finish_folder(staging, config, results, trained, merged.summary())
            writer.finalize(staging, out, force)
        except BaseException:
            writer.discard(staging)
            raise
        finally:
            writer.discard(staging.with_name(staging.name + "-adapter"))  # exclusive.lora: factors' merged adapter
    return BuildResult(out, list(config.tasks), errors, sum(r["bytes"] for r in results), trained.report(),
                       merged.summary())


def finish_folder(staging: Path, config: TwinConfig, results: list[dict[str, Any]], trained,
                  merge_summary: str) -> dict[str, float]:
    """Router, report and ``twin.json`` (last: a folder with it is complete); the per-tensor errors."""
    from distmerge.twin.router import save_router

    save_router(staging, trained, config.router.dropout)
    errors = {k: v for r in results for k, v in r["errors"].items()}
    ranks = {k: v for r in results for k, v in r["ranks"].items()}
    writer.write_json(staging / REPORT, {"relative_error": dict(sorted(errors.items())),
                                         "ranks": dict(sorted(ranks.items())), "router": trained.report(),
                                         "shared_merge": merge_summary})
    writer.write_json(staging / TWIN_JSON, manifest(config, Checkpoint(str(staging), "shared")))
    return errors
