"""Choosing sigma for Gaussian anchors the way the paper does (App. C.5): on one layer, start construction
from the same Gaussian draw scaled by each candidate sigma, run a fixed number of steps, and keep the sigma
whose anchors align best (the lowest construction loss, averaged over the tasks).

Each (sigma, task) is its own Ray job with the config's resources, like a construction job; nothing is
written. The winner goes into ``anchors.sigma`` of the config by hand (the command prints the line)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmerge.errors import ConfigError
from distmerge.fda.schema import FdaConfig
from distmerge.fda.inputs import FdaInputs, open_inputs

# Table 4 of the paper spans these (ViT-B/32: 10, 1, 1e-2, 1e-4), the reference default being 1e-2.
DEFAULT_SIGMAS = (1e-4, 1e-2, 1.0, 10.0)


@dataclass(frozen=True)
class SigmaJob:
    sigma: float
    task: str


@dataclass(frozen=True)
class SigmaSpec:
    inputs: FdaInputs
    layer: int
    steps: int


@dataclass
class SigmaResult:
    layer: int
    steps: int
    chosen: float
    mean_loss: dict[float, float]  # sigma -> mean over tasks of the best construction loss
    seconds: float
    results: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        tasks = sorted({r["task"] for r in self.results})
        lines = [f"sigma      | {' | '.join(tasks)} | mean", "-" * (24 + 10 * len(tasks))]
        for sigma, mean in self.mean_loss.items():
            per_task = {r["task"]: r["best_loss"] for r in self.results if r["sigma"] == sigma}
            mark = "  <- chosen" if sigma == self.chosen else ""
            lines.append(f"{sigma:<10g} | {' | '.join(f'{per_task[t]:.4f}' for t in tasks)} | {mean:.4f}{mark}")
        return "\n".join(lines)

    def summary(self) -> str:
        return (f"sigma {self.chosen:g}: best mean alignment loss after {self.steps} construction steps on layer "
                f"{self.layer} (set `anchors: {{sigma: {self.chosen:g}}}`), in {self.seconds:.1f}s")


def run_sigma_job(spec: SigmaSpec, job: SigmaJob) -> dict[str, Any]:
    """Construction from the shared draw at one sigma, for one task: the loss only, no files."""
    from distmerge.fda.construction import initial_anchors, load_unit_pair
    from distmerge.fda.runner import job_device, torch_threads
    from distmerge.ops import fda

    config = spec.inputs.config
    torch_threads(config.resources.num_cpus)
    forward, base, expert = load_unit_pair(spec.inputs, spec.layer, job.task, job_device())
    init = initial_anchors(spec.inputs, spec.layer, job.task, expert, sigma=job.sigma)
    result = fda.construct_anchors(forward, base, expert, init, steps=spec.steps, lr=config.anchors.lr,
                                   weight_decay=config.anchors.weight_decay, kind=config.anchors.loss)
    return {"sigma": job.sigma, "task": job.task, "initial_loss": result.initial_loss,
            "best_loss": result.best_loss, "best_step": result.best_step}


def choose_sigma(config: FdaConfig | str | Path | dict, *, sigmas: tuple[float, ...] = DEFAULT_SIGMAS,
                 layer: int | None = None, steps: int | None = None, workers: int | None = None,
                 address: str | None = None, progress: bool = True) -> SigmaResult:
    """The sigma among ``sigmas`` whose anchors align best on ``layer`` (default: the middle one of the run's
    layers) after ``steps`` construction steps (default: the config's)."""
    from distmerge.engine.ray_session import ray_session
    from distmerge.fda.runner import run_jobs

    began = time.perf_counter()
    inputs = open_inputs(config)
    config = inputs.config
    if config.anchors.init != "gauss":
        raise ConfigError("anchors.init: sigma only scales Gaussian anchors (init: gauss), not 'weights'")
    if not sigmas or any(not (s > 0 and math.isfinite(s)) for s in sigmas):
        raise ConfigError(f"sigmas: expected positive finite numbers, got {list(sigmas)}")
    if layer is None:
        layer = inputs.layers[len(inputs.layers) // 2]
    elif layer not in range(inputs.layout.num_layers):
        raise ConfigError(f"layer: {layer} is out of range (the base has {inputs.layout.num_layers} layers)")
    steps = config.anchors.steps if steps is None else steps
    if steps < 1:
        raise ConfigError(f"steps: expected a positive integer, got {steps}")
    sigmas = tuple(dict.fromkeys(float(s) for s in sigmas))
    jobs = [SigmaJob(sigma, task) for sigma in sigmas for task in config.task_names]

    def describe(r: dict[str, Any]) -> str:
        return f"sigma {r['sigma']:g} task {r['task']}: loss {r['initial_loss']:.4f} -> {r['best_loss']:.4f}"

    with ray_session(address):
        results = run_jobs(run_sigma_job, SigmaSpec(inputs, layer, steps), jobs,
                           options=config.resources.ray_options(),
                           names=[f"fda-sigma-{j.sigma:g}-layer{layer}-{j.task}" for j in jobs], workers=workers,
                           desc="FDA sigma", progress=progress, describe=describe)
    mean_loss = {s: statistics.fmean(r["best_loss"] for r in results if r["sigma"] == s) for s in sigmas}
    chosen = min(mean_loss, key=lambda s: (mean_loss[s], sigmas.index(s)))
    return SigmaResult(layer=layer, steps=steps, chosen=chosen, mean_loss=mean_loss,
                       seconds=time.perf_counter() - began, results=results)
