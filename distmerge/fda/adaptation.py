"""Stage II on Ray: one job per layer adapts that layer's unit to every task's anchors; the final model is the
initial merge with the adapted units put in, written atomically.

Per-layer results go to a work folder beside the output (``.{out}.fda-work/layer_{l}.safetensors`` + a JSON
commit mark written last, as in construction), so an interrupted run resumes with the layers it has. The
initial merge is either a given model folder or an engine merge run inline (kept in the work folder). The
assembly is one Ray job per shard of the initial merge: it copies the shard, replacing the adapted tensors,
into the output's staging folder; the driver writes the index and the non-weight files and renames the
folder into place. The work folder is removed once the output is in place.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distmerge.engine.resume import make_private_folder
from distmerge.errors import InputError, OutputError, where
from distmerge.fda.schema import FdaConfig, engine_merge_config
from distmerge.fda.construction import ANCHORS, TARGETS, anchor_files, read_anchor_meta
from distmerge.fda.inputs import FdaInputs, check_unit, open_inputs
from distmerge.io.checkpoint import Checkpoint

COPIED_FILES = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class AdaptJob:
    layer: int
    key: str


@dataclass(frozen=True)
class AdaptSpec:
    inputs: FdaInputs
    initial: Checkpoint
    anchors: str
    work: str


@dataclass(frozen=True)
class ShardJob:
    index: int
    filename: str
    tensors: tuple[str, ...]
    replaced: tuple[tuple[str, str], ...]  # (tensor, layer file holding its adapted value)


@dataclass
class AdaptResult:
    out: Path
    layers: int
    skipped: int
    seconds: float
    initial: str
    results: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        ran = len(self.results)
        moved = sum(1 for r in self.results if r["final_loss"] < r["initial_loss"])
        detail = f", loss decreased in {moved}/{ran}" if ran else ""
        return (f"FDA-adapted model in {self.out}: {ran} layer(s) adapted, {self.skipped} already done{detail}, "
                f"initial merge {self.initial}, in {self.seconds:.1f}s")


def layer_files(work: Path, layer: int) -> tuple[Path, Path]:
    return Path(work) / f"layer_{layer}.safetensors", Path(work) / f"layer_{layer}.json"


def layer_done(work: Path, layer: int, key: str) -> bool:
    tensors, meta = layer_files(work, layer)
    if not (tensors.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text()).get("config_hash") == key
    except ValueError:
        return False


def default_work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.fda-work"


# --- the per-layer job ----------------------------------------------------------------------------


def run_adapt_job(spec: AdaptSpec, job: AdaptJob) -> dict[str, Any]:
    """Adapt layer ``job.layer``: runs inside a Ray worker process."""
    import torch
    from safetensors import safe_open

    from distmerge import telemetry
    from distmerge.fda.runner import job_device, torch_threads
    from distmerge.io import writer
    from distmerge.ops import fda

    began = time.perf_counter()
    inputs, config = spec.inputs, spec.inputs.config
    settings = config.adapt
    torch_threads(config.resources.num_cpus)
    device = job_device()
    forward, base = inputs.base_unit(job.layer, device)
    dtype = next(iter(base.values())).dtype

    anchors, targets = [], []
    for task in config.task_names:  # task order fixes the order of the training set
        path, _ = anchor_files(Path(spec.anchors), job.layer, task)
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            anchors.append(handle.get_tensor(ANCHORS).to(device=device, dtype=dtype))
            targets.append(handle.get_tensor(TARGETS).to(device=device, dtype=dtype))
    anchors_all, targets_all = torch.cat(anchors), torch.cat(targets)

    if settings.param == "raw":
        model = fda.RawWeights(base)
    elif settings.sources == "initial":
        initial = inputs.read_unit(spec.initial, job.layer, device)
        # At α = 1 the start is the initial merge itself, so zero epochs return it bit for bit.
        model = fda.ElementwiseMerge(base, [initial], settings.alpha_init,
                                     start=initial if settings.alpha_init == 1.0 else None)
    else:
        experts = [inputs.read_unit(inputs.experts[t], job.layer, device) for t in config.task_names]
        model = fda.ElementwiseMerge(base, experts, settings.alpha_init)

    tags = {"stage": "adapt", "layer": str(job.layer), "task": "all"}
    generator = torch.Generator().manual_seed(fda.derive_seed(config.seed, "adapt", job.layer))
    result = fda.adapt_unit(forward, model, anchors_all, targets_all, epochs=settings.epochs, lr=settings.lr,
                            batch_size=settings.batch_size, kind=settings.loss, generator=generator,
                            on_epoch=lambda epoch, loss: telemetry.gauge("distmerge_fda_loss", loss, **tags))
    prefix = inputs.layout.unit_prefix(job.layer)
    tensors_path, meta_path = layer_files(Path(spec.work), job.layer)
    meta_path.unlink(missing_ok=True)
    writer.write_safetensors({f"{prefix}.{n}": t.cpu() for n, t in result.params.items()}, tensors_path)
    meta = {"config_hash": job.key, "layer": job.layer, "anchors": int(anchors_all.shape[0]),
            "epochs": settings.epochs, "initial_loss": result.initial_loss, "final_loss": result.final_loss,
            "epoch_losses": result.epoch_losses, "seconds": round(time.perf_counter() - began, 3), "device": device}
    writer.write_json(meta_path, meta)
    telemetry.count("distmerge_layers_adapted")
    return meta


# --- assembly -------------------------------------------------------------------------------------


def run_shard_job(spec: dict[str, Any], job: ShardJob) -> dict[str, Any]:
    """Copy one shard of the initial merge into staging, with the adapted tensors in their dtype."""
    from safetensors import safe_open

    from distmerge.io import writer

    initial: Checkpoint = spec["initial"]
    replaced = dict(job.replaced)
    tensors = {}
    handles: dict[str, Any] = {}
    try:
        for name in job.tensors:
            stored = initial.read(name)
            source = replaced.get(name)
            if source is None:
                tensors[name] = stored
                continue
            if source not in handles:
                handles[source] = safe_open(source, framework="pt", device="cpu")
            tensors[name] = handles[source].get_tensor(name).to(stored.dtype)
    finally:
        handles.clear()
        initial.close()
    writer.write_safetensors(tensors, Path(spec["staging"]) / job.filename)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"shard": job.index, "filename": job.filename, "tensors": list(job.tensors), "bytes": nbytes}


def shard_jobs(initial: Checkpoint, replaced: dict[str, str]) -> list[ShardJob]:
    """The initial merge's shards, in file order, named model-0000i-of-0000N.safetensors."""
    by_file: dict[str, list[str]] = {}
    for name, info in initial.tensors.items():
        by_file.setdefault(info.file, []).append(name)
    files = sorted(by_file)
    jobs = []
    for index, file in enumerate(files):
        filename = "model.safetensors" if len(files) == 1 else f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        tensors = tuple(sorted(by_file[file]))
        jobs.append(ShardJob(index, filename, tensors, tuple((t, replaced[t]) for t in tensors if t in replaced)))
    return jobs


# --- the driver -----------------------------------------------------------------------------------


def materialize_initial(inputs: FdaInputs, work: Path, workers: int | None, progress: bool) -> Checkpoint:
    """The initial merge: the given folder, or the inline engine merge run into the work folder once."""
    config = inputs.config
    if isinstance(config.initial, str):
        return Checkpoint(config.initial, "initial")
    from distmerge.engine.driver import merge

    target = work / f"initial-{config.initial_id().split(':', 1)[1]}"
    if not target.is_dir():  # the engine renames a complete folder into place, so present = complete
        merge(engine_merge_config(config.initial, config.base, config.experts), target, workers=workers,
              progress=progress)
    return Checkpoint(str(target), "initial")


def check_anchors(inputs: FdaInputs, anchors: Path) -> None:
    config = inputs.config
    for layer in inputs.layers:
        for task in config.task_names:
            meta = read_anchor_meta(anchors, layer, task)
            tensors, _ = anchor_files(anchors, layer, task)
            if meta is None:
                raise InputError(f"{where(file=str(tensors))}: no anchors for layer {layer}, task '{task}'; run "
                                 "`distmerge fda construct` with this config first")
            if meta.get("config_hash") != config.construction_key(layer, task):
                raise InputError(f"{where(file=str(tensors))}: built with a different config (hash "
                                 f"{meta.get('config_hash')}); rerun `distmerge fda construct` with this config")


def adapt(config: FdaConfig | str | Path | dict, anchors: str | Path, out: str | Path, *, workers: int | None = None,
          address: str | None = None, force: bool = False, progress: bool = True, work: str | Path | None = None,
          on_result: Callable[[dict[str, Any]], None] | None = None) -> AdaptResult:
    """Stage II: adapt every layer on its anchors and write the merged model to ``out`` (atomically)."""
    from distmerge.engine.ray_session import ray_session
    from distmerge.fda.runner import run_jobs
    from distmerge.io import writer

    began = time.perf_counter()
    inputs = open_inputs(config)
    config = inputs.config
    anchors = Path(anchors).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    writer.check_target(out, force)
    check_anchors(inputs, anchors)
    work = Path(work).expanduser().resolve() if work else default_work_folder(out)
    try:
        # Its layer results and commit marks are read back and the folder is removed at the end: only a
        # folder of this user's that no one else can write.
        make_private_folder(work, "FDA work folder")
    except OSError as exc:
        raise OutputError(f"cannot create the work folder '{work}': {exc.strerror or exc}") from None

    with ray_session(address):
        initial = materialize_initial(inputs, work, workers, progress)
        for layer in inputs.layers:
            check_unit(initial, inputs.unit_tensors(layer), inputs.base)
        initial_id = config.initial_id()
        all_jobs = [AdaptJob(layer, config.adaptation_key(layer, initial_id)) for layer in inputs.layers]
        jobs = [job for job in all_jobs if not layer_done(work, job.layer, job.key)]

        def describe(meta: dict[str, Any]) -> str:
            return (f"adapted layer {meta['layer']}: loss {meta['initial_loss']:.4f} -> {meta['final_loss']:.4f} "
                    f"({meta['epochs']} epochs on {meta['anchors']} anchors), {meta['seconds']:.1f}s")

        results = run_jobs(run_adapt_job, AdaptSpec(inputs, initial, str(anchors), str(work)), jobs,
                           options=config.resources.ray_options(),
                           names=[f"fda-adapt-layer{j.layer}" for j in jobs], workers=workers, desc="FDA adapt",
                           progress=progress, describe=describe, on_result=on_result)

        replaced = {tensor: str(layer_files(work, layer)[0])
                    for layer in inputs.layers for tensor in inputs.unit_tensors(layer)}
        staging = writer.make_staging(out)
        try:
            shards = shard_jobs(initial, replaced)
            shard_results = run_jobs(run_shard_job, {"initial": initial, "staging": str(staging)}, shards,
                                     options={**config.resources.ray_options(), "num_gpus": 0},
                                     names=[f"fda-assemble-{s.filename}" for s in shards], workers=workers,
                                     desc="FDA assemble", progress=progress)
            _finish_folder(staging, inputs, initial, work, shard_results)
            writer.finalize(staging, out, force)
        except BaseException:
            writer.discard(staging)
            raise
    shutil.rmtree(work, ignore_errors=True)
    return AdaptResult(out=out, layers=len(all_jobs), skipped=len(all_jobs) - len(jobs),
                       seconds=time.perf_counter() - began, initial=str(config.initial), results=results)


def _finish_folder(staging: Path, inputs: FdaInputs, initial: Checkpoint, work: Path,
                   shard_results: list[dict[str, Any]]) -> None:
    import yaml

    from distmerge.io import writer
    from distmerge.io.model_files import TOKENIZER_FILES

    config = inputs.config
    writer.write_index(staging, shard_results, {"distmerge_method": "fda"})
    for name in COPIED_FILES + TOKENIZER_FILES:
        if (initial.folder / name).is_file():
            shutil.copyfile(initial.folder / name, staging / name)
    (staging / "fda.yaml").write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
    layers = {}
    for layer in inputs.layers:
        meta = json.loads(layer_files(work, layer)[1].read_text())
        layers[str(layer)] = {k: meta[k] for k in ("initial_loss", "final_loss", "epochs", "anchors")}
    writer.write_json(staging / "fda_summary.json", {"initial": str(config.initial), "layers": layers})
    (staging / "README.md").write_text(_card(config, layers))


def _card(config: FdaConfig, layers: dict[str, Any]) -> str:
    import yaml

    front = {"base_model": config.base, "library_name": "transformers", "tags": ["merge", "distmerge", "fda"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             "# Merged model (FDA: functional dual anchors)", "",
             f"Made with distmerge: the initial merge `{config.initial}` of the experts below, with the "
             f"'{config.modules}' unit of {len(layers)} layer(s) adapted on synthetic anchors "
             "(Shi, Wen, Liu, arXiv 2510.21223).", "", "## Models", "", f"- base: `{config.base}`"]
    lines += [f"- `{name}`: `{source}`" for name, source in config.experts]
    lines += ["", "## Settings", "", "```yaml", yaml.safe_dump(config.to_yaml_dict(), sort_keys=False).strip(), "```",
              "", "Per-layer losses before and after adaptation: `fda_summary.json`.", ""]
    return "\n".join(lines)
