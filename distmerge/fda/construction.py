"""Stage I on Ray: one job per (layer, task) builds that task's anchors for that layer.

A job reads only the layer's unit from the base and from its expert, runs the gradient-matching loop of
``distmerge.ops.fda``, and writes ``anchors/layer_{l}/task_{t}.safetensors`` (``anchors`` X, ``targets`` Y =
the expert's outputs on X) and then ``task_{t}.json`` (the job's config hash and losses). The JSON is the
commit mark: it is removed before and written after the tensors, both atomically, so a present JSON with a
matching hash always describes the tensors beside it, and a rerun skips exactly those jobs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from distmerge.errors import OutputError
from distmerge.fda.schema import FdaConfig
from distmerge.fda.inputs import FdaInputs, open_inputs

ANCHORS, TARGETS = "anchors", "targets"


def anchor_files(root: Path, layer: int, task: str) -> tuple[Path, Path]:
    folder = Path(root) / f"layer_{layer}"
    return folder / f"task_{task}.safetensors", folder / f"task_{task}.json"


def read_anchor_meta(root: Path, layer: int, task: str) -> dict[str, Any] | None:
    tensors, meta = anchor_files(root, layer, task)
    if not meta.is_file() or not tensors.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except ValueError:
        return None


def anchors_done(root: Path, layer: int, task: str, key: str) -> bool:
    meta = read_anchor_meta(root, layer, task)
    return meta is not None and meta.get("config_hash") == key


@dataclass(frozen=True)
class ConstructJob:
    layer: int
    task: str
    key: str


@dataclass(frozen=True)
class ConstructSpec:
    inputs: FdaInputs
    out: str


@dataclass
class ConstructResult:
    out: Path
    jobs: int  # (layer, task) pairs in the run
    skipped: int  # already there with a matching config hash
    seconds: float
    results: list[dict[str, Any]] = field(default_factory=list)  # the jobs run now

    def summary(self) -> str:
        ran = len(self.results)
        mean = (sum(r["best_loss"] / r["initial_loss"] for r in self.results if r["initial_loss"]) / ran) if ran else 0
        detail = f", best loss {mean:.2f}x the initial on average" if ran else ""
        return (f"FDA anchors in {self.out}: {ran} (layer, task) job(s) run, {self.skipped} already done, "
                f"in {self.seconds:.1f}s{detail}")


def load_unit_pair(inputs: FdaInputs, layer: int, task: str, device: str):
    """``(forward, base, expert)`` for one (layer, task): the unit's module and the two tensor sets, read lazily."""
    forward, base = inputs.base_unit(layer, device)
    return forward, base, inputs.read_unit(inputs.experts[task], layer, device)


def initial_anchors(inputs: FdaInputs, layer: int, task: str, expert, sigma: float | None = None):
    """The anchors construction starts from. The draw depends only on (seed, layer, task), so Gaussian anchors
    at two sigmas are the same draw scaled (as the paper's sigma choice, App. C.5, compares them)."""
    import torch

    from distmerge.ops import fda

    config, layout = inputs.config, inputs.layout
    settings = config.anchors
    generator = torch.Generator().manual_seed(fda.derive_seed(config.seed, "anchors", layer, task))
    if settings.init == "gauss":
        shape = (settings.tokens, layout.hidden_size) if settings.tokens else (layout.hidden_size,)
        init = fda.gauss_anchors(settings.count, shape, settings.sigma if sigma is None else sigma, generator)
    else:
        rows = fda.weight_rows({n: t.cpu() for n, t in expert.items()}, layout.hidden_size)
        init = fda.weight_anchors(rows, settings.count, settings.tokens, generator)
    first = next(iter(expert.values()))
    return init.to(device=first.device, dtype=first.dtype)


def run_construct_job(spec: ConstructSpec, job: ConstructJob) -> dict[str, Any]:
    """One (layer, task): runs inside a Ray worker process."""
    import torch

    from distmerge import telemetry
    from distmerge.fda.runner import job_device, torch_threads
    from distmerge.io import writer
    from distmerge.ops import fda

    began = time.perf_counter()
    inputs, config = spec.inputs, spec.inputs.config
    torch_threads(config.resources.num_cpus)
    device = job_device()
    forward, base, expert = load_unit_pair(inputs, job.layer, job.task, device)
    settings = config.anchors
    init = initial_anchors(inputs, job.layer, job.task, expert)

    tags = {"stage": "construct", "layer": str(job.layer), "task": job.task}
    every = max(1, settings.steps // 20)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0 or step == settings.steps - 1:
            telemetry.gauge("distmerge_fda_loss", loss, **tags)

    result = fda.construct_anchors(forward, base, expert, init, steps=settings.steps, lr=settings.lr,
                                   weight_decay=settings.weight_decay, kind=settings.loss, on_step=on_step)
    with torch.no_grad():
        targets = forward(expert, result.anchors)

    tensors_path, meta_path = anchor_files(Path(spec.out), job.layer, job.task)
    try:
        tensors_path.parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create '{tensors_path.parent}': {exc.strerror or exc}") from None
    meta_path.unlink(missing_ok=True)  # from here on the tensors are not committed
    writer.write_safetensors({ANCHORS: result.anchors.cpu(), TARGETS: targets.detach().cpu()}, tensors_path)
    meta = {"config_hash": job.key, "layer": job.layer, "task": job.task, "shape": list(result.anchors.shape),
            "init": settings.init, "steps": settings.steps, "initial_loss": result.initial_loss,
            "best_loss": result.best_loss, "best_step": result.best_step,
            "seconds": round(time.perf_counter() - began, 3), "device": device}
    writer.write_json(meta_path, meta)
    telemetry.count("distmerge_anchors_constructed")
    return meta


def construct(config: FdaConfig | str | Path | dict, out: str | Path, *, workers: int | None = None,
              address: str | None = None, progress: bool = True,
              on_result: Callable[[dict[str, Any]], None] | None = None) -> ConstructResult:
    """Stage I: anchors for every (layer, task) into ``out`` (created if needed; reruns resume)."""
    from distmerge.engine.ray_session import ray_session
    from distmerge.fda.runner import run_jobs
    from distmerge.io import writer

    began = time.perf_counter()
    inputs = open_inputs(config)
    config = inputs.config
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"'{out}' exists and is not a folder")
    if not out.parent.is_dir():
        raise OutputError(f"the parent folder of '{out}' does not exist")
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create '{out}': {exc.strerror or exc}") from None
    all_jobs = [ConstructJob(layer, task, config.construction_key(layer, task))
                for layer in inputs.layers for task in config.task_names]
    jobs = [job for job in all_jobs if not anchors_done(out, job.layer, job.task, job.key)]
    (out / "fda.yaml").write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))  # for the record

    def describe(meta: dict[str, Any]) -> str:
        return (f"anchors layer {meta['layer']} task {meta['task']}: loss {meta['initial_loss']:.4f} -> "
                f"{meta['best_loss']:.4f} (best at step {meta['best_step']}/{meta['steps']}), {meta['seconds']:.1f}s")

    with ray_session(address):
        results = run_jobs(run_construct_job, ConstructSpec(inputs, str(out)), jobs,
                           options=config.resources.ray_options(),
                           names=[f"fda-construct-layer{j.layer}-{j.task}" for j in jobs], workers=workers,
                           desc="FDA construct", progress=progress, describe=describe, on_result=on_result)
    writer.fsync_dir(out)
    return ConstructResult(out=out, jobs=len(all_jobs), skipped=len(all_jobs) - len(jobs),
                           seconds=time.perf_counter() - began, results=results)
