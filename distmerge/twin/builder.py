"""``distmerge twin build``: shared expert, exclusive parts and router, written as one twin folder, atomically.

1. theta* = the engine's merge of the experts (``shared:``; task arithmetic 0.3 by default), written by
   ``distmerge.engine.driver.merge`` into a hidden staging folder beside the target.
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

from distmerge.io import writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.lora import open_checkpoint
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
    return sorted(n for n, info in checkpoint.tensors.items() if info.dtype.is_floating_point)


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
    return [(i, group, shared, tasks, config.exclusive, str(staging)) for i, group in enumerate(layer_groups(names))]


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
    for task in config.tasks:
        check_field(Path(config.router.data[task]).expanduser(), config.router.field, task)
    staging = out.parent / f".{out.name}{writer.STAGING_MARK}twin-{uuid.uuid4().hex[:12]}"
    with ray_session(address, num_cpus=workers):
        try:
            merged = merge(config.merge, staging, workers=workers, progress=progress, resume=False)
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
