"""The AdaMerging driver: validate, stream each task's unlabelled rows into a Ray Train job, write the merge.

The run's state lives in ``.OUT.adamerging-KEY/`` beside the output (KEY hashes the config and worker count):
Ray Train's checkpoints of the coefficients and Adam state, then the learned coefficients. Running the same
command again after a kill resumes from the last checkpoint. The merged folder is written by the merge
engine (task_arithmetic with lambda 1 and one weight per tensor and model, given as a filter list per
model), so it gets the same shards, index, tokenizer and card as any merge; AdaMerging++ first writes each
task's selected entries as an expert (theta_t where kept, theta0 elsewhere) so the engine's sum is the ++
sum. ``lambdas.json``, ``lambdas.parquet``, ``adamerging.png`` and ``adamerging.yaml`` are added to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from distmerge.adamerging.bank import PlusMasks, plus_keep
from distmerge.adamerging.config import AdaConfig, load_ada_config, resolve_kind
from distmerge.adamerging.objective import text_fields
from distmerge.adamerging.train import RESULT_FILE, STATE_FILE, TENSORS_FILE, latest_checkpoint, train_worker
from distmerge.engine import faults
from distmerge.errors import ConfigError, InputError, OutputError
from distmerge.io import writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.lora import open_checkpoint

LOG = logging.getLogger(__name__)
ARTIFACTS = ("lambdas.json", "lambdas.parquet", "adamerging.png", "adamerging.yaml")


@dataclass
class AdaResult:
    out: Path | None
    lambdas: dict[str, dict[str, float]]  # tensor -> task -> coefficient
    history: list[float]
    steps: int
    workers: int
    seconds: float
    resumed_from: int = 0
    last_gradient: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        values = [v for per_task in self.lambdas.values() for v in per_task.values()]
        first = f"{self.history[0]:.4f}" if self.history else "-"
        last = f"{self.history[-1]:.4f}" if self.history else "-"
        line = (f"adamerging: {self.steps} step(s) on {self.workers} worker(s) in {self.seconds:.1f}s, objective "
                f"{first} -> {last}; lambda mean {sum(values) / len(values):.4f} in [{min(values):.4f}, "
                f"{max(values):.4f}] over {len(self.lambdas)} tensor(s)")
        if self.resumed_from:
            line += f"; resumed at step {self.resumed_from}"
        return line + (f"; merged into {self.out}" if self.out else "")


def prepare(config: AdaConfig | str | Path | dict) -> AdaConfig:
    """The config with ``kind`` resolved and every path checked before Ray starts."""
    if not isinstance(config, AdaConfig):
        config = load_ada_config(config)
    base = Checkpoint(config.base, "base")
    config = resolve_kind(config, base.config or {})
    for task, path in config.experts.items():
        open_checkpoint(path, task)  # a missing or unreadable expert fails here, naming it
    for task, data in config.data.items():
        if not Path(data.path).expanduser().is_file():
            raise InputError(f"data.{task}.path: '{data.path}' does not exist")
    return config


# Ray Data's tasks (read, column projection, shuffle) asked for a whole CPU each by default: on a 2-CPU node with
# 2 workers the half CPU left beside them never fit one, and the job waited forever. They are light; a quarter each.
DATA_TASK_CPUS = 0.25


def task_dataset(config: AdaConfig, task: str):
    """The task's rows as a Ray Dataset of its text columns only: labels never reach the workers."""
    import ray.data

    data = config.data[task]
    path = str(Path(data.path).expanduser().resolve())
    light = {"num_cpus": DATA_TASK_CPUS}
    try:
        ds = (ray.data.read_parquet(path, ray_remote_args=light) if path.endswith(".parquet")
              else ray.data.read_json(path, ray_remote_args=light))
        columns = ds.schema().names
    except Exception as exc:  # Ray wraps reader errors in its own types
        raise InputError(f"data.{task}.path: cannot read '{path}' ({' '.join(str(exc).split())[:200]})") from None
    wanted = list(text_fields(task, data.fields)) + ([data.target] if config.objective == "sft" else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise InputError(f"data.{task}: '{path}' has no column '{missing[0]}' (columns: {', '.join(columns)}); "
                         f"name the text columns with data.{task}.fields")
    ds = ds.select_columns(wanted, num_cpus=DATA_TASK_CPUS)
    if config.shuffle:
        ds = ds.random_shuffle(seed=config.seed, **light)
    return ds


def checkpoint_step(folder: Path | None) -> int:
    """The step a checkpoint folder holds (0 for none)."""
    return int(json.loads((folder / STATE_FILE).read_text())["step"]) if folder is not None else 0


def run_folder(out: Path, key: str) -> Path:
    return out.parent / f".{out.name}.adamerging-{key}"


def train(variants: list[tuple[AdaConfig, Path]], storage: Path, workers: int, *, run_name: str = "adamerging",
          max_failures: int = 0) -> list[dict[str, Any]]:
    """One Ray Train job running each (config, result folder) in turn; returns each variant's result.json
    with its tensors. The caller holds a Ray session."""
    for config, _ in variants:
        if config.batch_size % workers:
            raise ConfigError(f"batch_size: {config.batch_size} rows do not split evenly over {workers} workers")
    with _no_data_progress_bars():
        return _train(variants, storage, workers, run_name, max_failures)


@contextlib.contextmanager
def _no_data_progress_bars():
    """The split coordinators' progress bars would flood a job log; the rank-0 step lines are the progress."""
    import ray.data

    context = ray.data.DataContext.get_current()
    shown = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = shown


def _train(variants, storage: Path, workers: int, run_name: str, max_failures: int) -> list[dict[str, Any]]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    first = variants[0][0]
    datasets, prefixes, sources = {}, [], {}
    for config, _ in variants:  # variants reading the same files share one split of them (one coordinator each)
        signature = json.dumps({t: [config.data[t].path, list(config.data[t].fields), config.data[t].target]
                                for t in config.tasks} | {"shuffle": config.shuffle, "seed": config.seed})
        if signature not in sources:
            sources[signature] = f"d{len(sources)}"
            for task in config.tasks:
                datasets[f"{sources[signature]}:{task}"] = task_dataset(config, task)
        prefixes.append(sources[signature])
    total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    num_cpus = first.num_cpus
    if workers * num_cpus > total_cpus - 0.5:  # Ray Data's tasks (DATA_TASK_CPUS each) need room beside the workers
        num_cpus = max(0.1, (total_cpus - 0.5) / workers)
        print(f"adamerging: {workers} worker(s) x {first.num_cpus} CPU do not leave a CPU for the data on this "
              f"{total_cpus:g}-CPU cluster; each worker takes {num_cpus:.2f}", flush=True)
    resources = {"CPU": num_cpus, **({"GPU": first.num_gpus} if first.num_gpus else {})}
    loop_config = {
        "variants": [{"config": config.to_dict(), "result_dir": str(result_dir), "datasets": prefix}
                     for (config, result_dir), prefix in zip(variants, prefixes)],
        "faults": faults.parse(), "num_threads": max(1, int(num_cpus)), "run": run_name,
        "storage": str(storage),
    }
    trainer = TorchTrainer(
        train_worker, train_loop_config=loop_config, datasets=datasets,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=first.num_gpus > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name="train", storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    faults.watch_adamerging_driver_exit(loop_config["faults"], lambda: checkpoint_step(latest_checkpoint(storage)))
    try:
        trainer.fit()
    except Exception as exc:
        raise OutputError(f"the AdaMerging train job failed ({_root_cause(exc)}); run the same command again to "
                          f"resume from the last checkpoint in {storage}") from exc
    return [read_result(result_dir) for _, result_dir in variants]


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def read_result(result_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = result_dir / RESULT_FILE
    if not path.exists():
        raise OutputError(f"the train job ended without writing {path}")
    result = json.loads(path.read_text())
    result["tensors"] = load_file(str(result_dir / TENSORS_FILE))
    return result


def lambdas_by_tensor(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    values = result["tensors"]["lambdas"]
    return {name: {task: float(values[i, t]) for t, task in enumerate(result["tasks"])}
            for i, name in enumerate(result["names"])}


def run(config: AdaConfig | str | Path | dict, out: str | Path | None, *, workers: int = 2,
        address: str | None = None, force: bool = False, max_failures: int = 1) -> AdaResult:
    """Learn the coefficients and write the merged model into ``out`` (None: only learn them)."""
    from distmerge.engine.ray_session import ray_session

    began = time.perf_counter()
    config = prepare(config)
    if workers < 1:
        raise ConfigError("workers: at least 1")
    target = Path(out).expanduser().resolve() if out is not None else None
    if target is not None:
        writer.check_target(target, force)
        folder = run_folder(target, config.run_key(workers))
    else:
        folder = Path.cwd() / f".adamerging-{config.run_key(workers)}"
    folder.mkdir(parents=True, exist_ok=True)
    with ray_session(address):
        storage = folder / "ray"
        resumed = latest_checkpoint(storage)
        resumed_from = checkpoint_step(resumed)
        [result] = train([(config, folder / "result")], storage, workers, run_name=target.name if target else "run",
                         max_failures=max_failures)
        lambdas = lambdas_by_tensor(result)
        write_artifacts(folder, config, result, lambdas)
        if target is not None:
            merge_output(config, result, lambdas, folder, target, workers, force)
            for name in ARTIFACTS:
                shutil.copy2(folder / name, target / name)
    if target is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return AdaResult(out=target, lambdas=lambdas, history=list(result["history"]), steps=int(result["steps"]),
                     workers=workers, seconds=time.perf_counter() - began, resumed_from=int(resumed_from),
                     last_gradient=result["tensors"].get("last_gradient"), raw=result["tensors"]["raw"])


# --- outputs ------------------------------------------------------------------------------------


def write_artifacts(folder: Path, config: AdaConfig, result: dict[str, Any],
                    lambdas: dict[str, dict[str, float]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from distmerge.tensors import layer_of

    writer.write_json(folder / "lambdas.json", {
        "granularity": config.granularity, "plus": config.plus, "tasks": list(config.tasks),
        "lambda_init": config.lambda_init, "steps": result["steps"], "objective": result["history"],
        "frozen": [n for n, r in zip(result["names"], result["rows"]) if r is None],
        **({"plus_masks": result["plus"]} if result.get("plus") else {}),
        "lambdas": lambdas})
    rows = [(name, layer_of(name)[1], task, value) for name, per_task in lambdas.items() for task, value in per_task.items()]
    table = pa.table({"tensor": [r[0] for r in rows], "layer": pa.array([r[1] for r in rows], pa.int64()),
                      "task": [r[2] for r in rows], "lambda": pa.array([r[3] for r in rows], pa.float64())})
    pq.write_table(table, folder / "lambdas.parquet")
    (folder / "adamerging.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    plot(folder / "adamerging.png", config, lambdas, result["history"])


def plot(path: Path, config: AdaConfig, lambdas: dict[str, dict[str, float]], history: list[float]) -> None:
    """Coefficients per layer and task (mean over the layer's tensors), and the objective per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distmerge.tensors import layer_of

    groups: dict[str, list[str]] = {}
    for name in lambdas:
        groups.setdefault(layer_of(name)[0], []).append(name)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for task in config.tasks:
        means = [sum(lambdas[n][task] for n in names) / len(names) for names in groups.values()]
        left.plot(range(len(means)), means, marker="o", label=task)
    left.set_xticks(range(len(groups)), [_short(g) for g in groups], rotation=90, fontsize=6)
    left.set_ylim(-0.02, 1.02)
    left.set_ylabel("mean lambda of the group")
    left.set_title(f"AdaMerging{'++' if config.plus else ''} coefficients ({config.granularity}-wise)")
    left.legend(fontsize=7)
    right.plot(range(1, len(history) + 1), history)
    right.set_xlabel("step")
    right.set_ylabel(f"objective ({config.objective})")
    right.set_title("objective per step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _short(group: str) -> str:
    parts = group.split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 else group


def weight_filters(lambdas: dict[str, dict[str, float]], task: str) -> list[dict[str, Any]]:
    """A per-tensor weight as the engine's filter list: the first filter that is a substring of a tensor's name
    wins, so longer names come first (a full name is a substring only of itself or of longer names)."""
    names = sorted(lambdas, key=lambda n: (-len(n), n))
    return [{"filter": name, "value": lambdas[name][task]} for name in names]


def merge_output(config: AdaConfig, result: dict[str, Any], lambdas: dict[str, dict[str, float]], folder: Path,
                 target: Path, workers: int, force: bool) -> None:
    from distmerge.engine.driver import merge

    experts = dict(config.experts)
    if config.plus:
        masks = PlusMasks(tuple(result["plus"]["thresholds"]), float(result["plus"]["zero_sign"]))
        experts = write_plus_experts(config, masks, list(lambdas), folder / "plus-experts")
    merge_config = {
        "base_model": config.base, "method": "task_arithmetic", "parameters": {"lambda": 1.0},
        "models": [{"model": path, "name": task, "parameters": {"weight": weight_filters(lambdas, task)}}
                   for task, path in experts.items()],
        "exclude": list(config.excluded()), "tokenizer": "base",
    }
    merged = merge(merge_config, target, workers=workers, force=force, progress=sys.stderr.isatty())
    print(merged.summary(), flush=True)


def write_plus_experts(config: AdaConfig, masks: PlusMasks, names: list[str], root: Path) -> dict[str, str]:
    """Each task's AdaMerging++ selection as a checkpoint: theta_t where kept, theta0 elsewhere (exact: the
    engine's theta_t - theta0 is then tau_t or 0). One safetensors file per task, written tensor by tensor."""
    from distmerge.tensors import layer_of

    base = Checkpoint(config.base, "base")
    experts = {t: open_checkpoint(p, t) for t, p in config.experts.items()}
    root.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name)[0], []).append(name)
    folders = {t: root / t for t in experts}
    weight_maps: dict[str, dict[str, str]] = {t: {} for t in experts}
    for index, group in enumerate(groups.values()):
        shard = f"model-{index:05d}.safetensors"
        outputs: dict[str, dict[str, torch.Tensor]] = {t: {} for t in experts}
        for name in group:
            theta0 = base.read(name)
            stacked = torch.stack([experts[t].read(name).to(theta0.dtype) for t in experts], dim=-1)
            flat = stacked.reshape(-1, len(experts)).float()
            keep = plus_keep(flat - theta0.reshape(-1, 1).float(), masks)
            for j, task in enumerate(experts):
                chosen = torch.where(keep[:, j], stacked.reshape(-1, len(experts))[:, j], theta0.reshape(-1))
                outputs[task][name] = chosen.reshape(theta0.shape).contiguous()
        for task in experts:
            folders[task].mkdir(exist_ok=True)
            writer.write_safetensors(outputs[task], folders[task] / shard)
            weight_maps[task].update({n: shard for n in outputs[task]})
    for task, expert in experts.items():
        writer.write_json(folders[task] / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_maps[task]})
        if (expert.folder / "config.json").exists():
            shutil.copy2(expert.folder / "config.json", folders[task] / "config.json")
    return {t: str(f) for t, f in folders.items()}
