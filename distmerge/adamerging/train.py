"""The AdaMerging train loop: a Ray Train worker function, and the Ray-free pieces it is made of.

A worker builds the functional model (``setup``): the base's architecture on the meta device, a ``Bank`` of
theta0 and the task vectors sharded (placed by FSDP2 or ZeRO-3; whole in one process), the replicated coefficients,
and the tensors that are not merged (each task's classifier head from its expert, the rest from the base).
Each step sums the objective over ``batches`` batches of every task, back-propagates into the coefficients
only, sums their gradients over ranks, and takes one Adam step. Rank 0 writes the checkpoints (safetensors +
JSON) and reports them to Ray Train, so a killed run resumes from the last one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from distmerge import telemetry
from distmerge.adamerging import layerwise
from distmerge.adamerging.bank import (AllReduce, Bank, Coefficients, PlusMasks, TensorPlan, apply_plus,
                                       compute_dtype, fill_bank, local_tensor, no_reduce, plan_tensors)
from distmerge.adamerging.config import AdaConfig, load_ada_config
from distmerge.adamerging.objective import (ENCODER_HEAD_PREFIX, batch_objective, check_parameters, encode, skeleton,
                                            text_fields)
from distmerge.architectures import CLASSIFIER_HEAD
from distmerge.dtypes import torch_dtype
from distmerge.errors import InputError
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.lora import open_checkpoint
from distmerge.io.writer import write_json, write_safetensors

HEAD_PATTERN = re.compile(CLASSIFIER_HEAD)  # what evaluation's head_from takes from an expert
STATE_FILE = "state.json"
TENSORS_FILE = "coefficients.safetensors"
RESULT_FILE = "result.json"


@dataclass
class Setup:
    config: AdaConfig
    plan: TensorPlan
    model: Any
    bank: Bank
    coefficients: Coefficients
    fixed: dict[str, torch.Tensor]  # tensors not merged, the same for every task
    heads: dict[str, dict[str, torch.Tensor]]  # task -> its own head tensors (classifiers)
    masks: PlusMasks | None
    tokenizer: Any
    world: int
    rank: int
    in_layers: frozenset[int] = frozenset()  # bank groups merged inside their layer's forward (layerwise)
    device: str = "cpu"  # of the bank's shard, the coefficients, the model's buffers and every batch


def build_setup(config: AdaConfig, world: int = 1, rank: int = 0, shard: Callable[[Bank], None] | None = None,
                reduce: AllReduce = no_reduce, device: str = "cpu") -> Setup:
    """Everything one rank needs; ``shard`` splits the bank across ranks (FSDP2) before its shard is read;
    ``strategy: deepspeed`` (world > 1) partitions it with ZeRO-3 instead."""
    from distmerge.evaluate.models import ModelSource, load_tokenizer

    base = Checkpoint(config.base, "base")
    experts = {t: open_checkpoint(p, t) for t, p in config.experts.items()}
    plan = plan_tensors(base, experts, config.excluded(), config.freeze, config.granularity,
                        config.freeze_first_layers)
    storage = torch_dtype(config.dtype)
    dtype = compute_dtype(storage)  # of the merged weights, so of every tensor the forward meets
    zero3 = config.strategy == "deepspeed" and world > 1
    if zero3:
        from distmerge.adamerging import zero3 as zero3_strategy

        bank = zero3_strategy.partitioned_bank(plan, storage, world)
    else:
        with torch.device("meta"):
            bank = Bank(plan, storage)
        if shard is not None:
            shard(bank)
        bank.to_empty(device=device)
    bank.place(world, rank)
    fill_bank(bank, base, list(experts.values()), world, rank)
    masks = apply_plus(bank, config.density, reduce, world, rank) if config.plus else None
    model = skeleton(str(base.folder), config.kind)
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    merged = set(plan.names)
    heads: dict[str, dict[str, torch.Tensor]] = {t: {} for t in experts}
    fixed = {}
    if config.kind == "encoder":  # heads kept apart from the encoders, one file per task
        heads = {task: {ENCODER_HEAD_PREFIX + k: v.to(device=device, dtype=dtype)
                        for k, v in load_file(config.heads[task]).items()} for task in experts}
    for name in base.tensors:
        if name in merged:
            continue
        if config.kind == "classify" and HEAD_PATTERN.fullmatch(name):
            for task, expert in experts.items():
                heads[task][name] = _read(expert, name, device, dtype)
        else:
            fixed[name] = _read(base, name, device, dtype)
    check_parameters(model, set(fixed) | merged | {n for h in heads.values() for n in h}, f"model '{config.base}'")
    tokenizer = load_tokenizer(ModelSource(path=str(base.folder)), "right")
    coefficients = Coefficients(plan, config.lambda_init).to(device)
    for checkpoint in (base, *experts.values()):
        checkpoint.close()
    model.config.use_cache = False  # a layer's forward runs twice (recomputation): no cache may grow
    # the benchmarks' comparison: every tensor merged before the forward, one whole merged copy per rank
    upfront = os.environ.get("DISTMERGE_ADAMERGING_MERGE_UPFRONT") == "1"
    in_layers = frozenset() if upfront else layerwise.install(model, bank, coefficients)
    return Setup(config, plan, model, bank, coefficients, fixed, heads, masks, tokenizer, world, rank, in_layers,
                 str(device))


def _read(checkpoint: Checkpoint, name: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    value = checkpoint.read(name)
    return (value.to(dtype) if value.is_floating_point() else value).to(device)


def step_objective(setup: Setup, batches: dict[str, list[dict[str, torch.Tensor]]], global_batch: int) -> torch.Tensor:
    """This rank's part of one step's objective: every task's batches through the merged model and its head."""
    merged = setup.bank.merged(setup.coefficients, setup.in_layers)
    total = torch.zeros((), dtype=torch.float32)
    for task, encoded_batches in batches.items():
        params = {**setup.fixed, **merged, **setup.heads.get(task, {})}
        for encoded in encoded_batches:
            total = total + batch_objective(setup.model, params, encoded, setup.config.kind, setup.config.objective,
                                            global_batch, setup.config.pooling)
    return total


def encode_rows(setup: Setup, task: str, rows: dict) -> dict[str, torch.Tensor]:
    data = setup.config.data[task]
    one_segment = getattr(setup.model.config, "type_vocab_size", 2) <= 1
    target = data.target if setup.config.objective == "sft" else None
    encoded = encode(setup.tokenizer, rows, text_fields(task, data.fields), target, setup.config.max_length, one_segment)
    return {key: value.to(setup.device) for key, value in encoded.items()}


class TorchCoefficients:
    """The coefficients, replicated on every rank whatever shards the bank, trained by torch's Adam on gradients
    summed over ranks; their state is what the checkpoints hold."""

    def __init__(self, coefficients: Coefficients, lr: float, reduce: AllReduce):
        self.param, self.reduce = coefficients.raw, reduce
        self.optimizer = torch.optim.Adam([self.param], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """Back-propagates ``loss`` (this rank's part of a sum), steps Adam; returns the summed gradient."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradient = self.reduce(self.param.grad)
        self.param.grad = gradient.clone()
        self.optimizer.step()
        return gradient

    def raw(self) -> torch.Tensor:
        return self.param.detach().clone()

    def adam_state(self) -> dict[str, torch.Tensor]:
        adam = self.optimizer.state.get(self.param, {})
        state = {key: adam[key].detach().clone() for key in ("exp_avg", "exp_avg_sq") if key in adam}
        if "step" in adam:
            state["step"] = torch.as_tensor(adam["step"], dtype=torch.float32).reshape(1)
        return state

    def load(self, raw: torch.Tensor, adam: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.param.copy_(raw)
        if "step" in adam:
            self.optimizer.state[self.param] = {"step": torch.tensor(float(adam["step"][0])),
                                                "exp_avg": adam["exp_avg"].to(self.param.device, copy=True),
                                                "exp_avg_sq": adam["exp_avg_sq"].to(self.param.device, copy=True)}


def summary(setup: Setup, trainer) -> dict[str, float]:
    values = setup.coefficients.per_tensor(raw=trainer.raw())
    return {"lambda_mean": float(values.mean()), "lambda_min": float(values.min()), "lambda_max": float(values.max())}


# --- checkpoints: safetensors + JSON (no pickle) -------------------------------------------------


def save_state(folder: Path, setup: Setup, trainer, state: dict[str, Any], gradient: torch.Tensor | None,
               first_gradient: torch.Tensor | None = None) -> None:
    raw, adam = trainer.raw(), trainer.adam_state()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"raw": raw.cpu().contiguous(), **{f"adam.{k}": v.cpu().contiguous() for k, v in adam.items()}}
    if gradient is not None:
        tensors["last_gradient"] = gradient.detach().cpu().contiguous()
    if first_gradient is not None:  # the gradient of the run's first step (a resumed run has none)
        tensors["first_gradient"] = first_gradient.detach().cpu().contiguous()
    tensors["lambdas"] = setup.coefficients.per_tensor(raw=raw).detach().cpu().contiguous()
    write_safetensors(tensors, folder / TENSORS_FILE)
    write_json(folder / STATE_FILE, state)


def load_state(folder: Path, trainer) -> dict[str, Any]:
    tensors = load_file(str(folder / TENSORS_FILE))
    state = json.loads((folder / STATE_FILE).read_text())
    trainer.load(tensors["raw"], {k[len("adam."):]: v for k, v in tensors.items() if k.startswith("adam.")})
    return state


# --- data -------------------------------------------------------------------------------------


def joined(batches: list[dict]) -> dict:
    """Numpy batches of the same columns as one."""
    import numpy as np

    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


class TaskStream:
    """Batches of one task from a Ray Data shard, epoch after epoch (drop_last keeps every batch full)."""

    def __init__(self, task: str, shard, local_batch: int):
        self.task, self.shard, self.local_batch = task, shard, local_batch
        self.iterator = None

    def next(self) -> dict:
        for _ in range(2):
            if self.iterator is None:
                self.iterator = iter(self.shard.iter_batches(batch_size=self.local_batch, batch_format="numpy",
                                                             drop_last=True))
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
        raise InputError(f"data.{self.task}: fewer than {self.local_batch} rows per worker (batch_size / workers); "
                         f"give more rows or a smaller batch_size")


# --- the Ray Train worker -----------------------------------------------------------------------


def fsdp_shard(bank: Bank) -> None:
    """FSDP2 places each group's rows (dim-0 DTensor shards); its hooks never run: ``GroupBank.merge`` is no
    forward, and the merged-rows gather replaces FSDP2's gather of theta0 and every task vector."""
    from torch.distributed.fsdp import fully_shard

    for group in bank.groups:
        fully_shard(group)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, on the tensor's device; NCCL (GPU workers) reduces only CUDA tensors."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    out = tensor.to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs each variant of ``loop_config["variants"]`` in turn (the driver passes one; tests pass several to
    share one Train run); a variant whose result is written is skipped, so a restarted run resumes."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(loop_config.get("num_threads", 1))))
    # Ray Train hands a restarted group only the checkpoints its controller heard of; a worker that dies right
    # after reporting may take its last ones with it, though they are on disk (the upload is synchronous).
    # The run's storage also holds what an earlier driver's run left: a driver run again resumes from it.
    resumed = latest_state([latest_checkpoint(Path(loop_config["storage"])), ray.train.get_checkpoint()])
    faults = loop_config.get("faults", {})
    for index, variant in enumerate(loop_config["variants"]):
        result_dir = Path(variant["result_dir"])
        if (result_dir / RESULT_FILE).exists():
            continue
        config = load_ada_config(variant["config"])
        strategy_shard = fsdp_shard if world > 1 and config.strategy == "fsdp" else None
        began = time.perf_counter()
        device = str(ray.train.torch.get_device()) if config.num_gpus else "cpu"  # the GPU Ray Train gave it
        setup = build_setup(config, world, rank, strategy_shard, all_reduce_sum if world > 1 else no_reduce, device)
        held = sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in setup.bank.parameters())
        print(f"adamerging {loop_config.get('run', 'adamerging')}: rank {rank}/{world} holds {held / 2**20:.1f} MiB "
              f"of theta0 and {len(config.tasks)} task vectors ({len(setup.plan.names)} tensors), ready in "
              f"{time.perf_counter() - began:.1f}s", flush=True)
        start_from = resumed[1] if resumed is not None and resumed[0] == index else None
        _train_variant(setup, index, variant["datasets"], result_dir, start_from, faults,
                       loop_config.get("run", "adamerging"))


def latest_checkpoint(storage: Path) -> Path | None:
    """The most advanced complete checkpoint persisted under ``storage`` (by variant and step); one whose files
    do not both read back (a worker killed while uploading it) is skipped."""
    best, best_key = None, (-1, -1)
    for state_file in storage.glob("**/checkpoint_*/" + STATE_FILE):
        try:
            state = json.loads(state_file.read_text())
            key = (int(state.get("variant", 0)), int(state.get("step", 0)))
            if key > best_key:
                load_file(str(state_file.parent / TENSORS_FILE))
                best, best_key = state_file.parent, key
        except (OSError, ValueError, TypeError, SafetensorError):
            continue
    return best


def latest_state(sources: list) -> tuple[int, Path] | None:
    """(variant, folder) of the most advanced checkpoint: the one found in the run's storage (a restarted
    driver, or a worker group restarted after a death its controller did not hear the last reports of) or the
    one Ray Train hands a restarted worker group, whichever went further."""
    best, best_key = None, (-1, -1)
    for source in sources:
        if source is None:
            continue
        folder = Path(source) if isinstance(source, (str, Path)) else Path(source.to_directory())
        state = json.loads((folder / STATE_FILE).read_text())
        key = (int(state["variant"]), int(state["step"]))
        if key > best_key:
            best, best_key = (key[0], folder), key
    return best


def _train_variant(setup: Setup, index: int, datasets: str, result_dir: Path, start_from: Path | None,
                   faults: dict, run_name: str) -> None:
    import ray.train

    config = setup.config
    reduce = all_reduce_sum if setup.world > 1 else no_reduce
    trainer = TorchCoefficients(setup.coefficients, config.lr, reduce)
    history: list[float] = []
    step = 0
    if start_from is not None:
        state = load_state(start_from, trainer)
        step, history = int(state["step"]), list(state["history"])
    resumed_from = step
    local_batch = config.batch_size // setup.world
    streams = {t: TaskStream(t, ray.train.get_dataset_shard(f"{datasets}:{t}"), local_batch) for t in config.tasks}
    for stream in streams.values():  # the batches the interrupted run consumed: the data continues where it was
        for _ in range(step * config.batches):
            stream.next()
    exit_after = exit_after_steps(faults, index) if start_from is None else 0
    # fault injection: the group waits at this step's checkpoint while the driver, watching for it, exits
    hold_at = int(faults.get("adamerging_driver_exit_at_step") or 0) if start_from is None else 0
    every = max(1, config.steps // 20)
    gradient, first_gradient = None, None
    step_seconds: list[float] = []
    began = time.perf_counter()
    while step < config.steps:
        step_began = time.perf_counter()
        # a task's batches of the step go through the model as one: each layer is then gathered (and, merged
        # per layer, recomputed) once per task and step; the losses are per-sample sums, so nothing else changes
        batches = {t: [encode_rows(setup, t, joined([streams[t].next() for _ in range(config.batches)]))]
                   for t in config.tasks}
        loss = step_objective(setup, batches, config.batch_size)
        objective = float(reduce(loss.detach()))
        gradient = trainer.step(loss)
        if step == 0:
            first_gradient = gradient.clone()
        history.append(objective)
        step_seconds.append(time.perf_counter() - step_began)
        step += 1
        if setup.rank == 0:
            telemetry.gauge("distmerge_adamerging_objective", objective, run=run_name)
            telemetry.gauge("distmerge_adamerging_step", float(step), run=run_name)
        if step % every == 0 or step == config.steps:
            if setup.rank == 0:
                s = summary(setup, trainer)
                print(f"adamerging {run_name}: step {step}/{config.steps} objective {objective:.6f} lambda mean "
                      f"{s['lambda_mean']:.4f} [{s['lambda_min']:.4f}, {s['lambda_max']:.4f}] "
                      f"({time.perf_counter() - began:.1f}s)", flush=True)
        if step % config.checkpoint_every == 0 or step == config.steps:
            _report(setup, trainer, {"variant": index, "step": step, "history": history}, gradient, objective)
        if exit_after and step == exit_after and setup.rank == 0:
            os._exit(17)  # fault injection: a worker dies here (a restarted group, or run again, resumes)
        if hold_at and step == hold_at:
            time.sleep(600)  # until the driver's death takes the job down
    _finish(setup, trainer, result_dir, step, history, gradient, first_gradient,
            {"step_seconds": step_seconds, "resumed_from": resumed_from, **worker_memory(setup, reduce)})


def exit_after_steps(faults: dict, variant: int) -> int:
    """``adamerging_exit_after_steps=K[@V]``: the run dies after K steps of variant V (default 0), once: a
    resumed variant never dies again (the engine's faults module's convention)."""
    spec = faults.get("adamerging_exit_after_steps")
    if not spec:
        return 0
    count, _, target = spec.partition("@")
    return int(count) if int(target or 0) == variant else 0


def _report(setup: Setup, trainer, state: dict, gradient, objective: float) -> None:
    import ray.train

    metrics = {"step": state["step"], "objective": objective, **summary(setup, trainer)}
    if setup.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_state(Path(folder), setup, trainer, state, gradient)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def worker_memory(setup: Setup, reduce: AllReduce) -> dict[str, Any]:
    """Every rank's share of theta0 + task vectors and its peak RSS (for the report; all ranks take part)."""
    import resource

    rows = torch.zeros(setup.world, 2, dtype=torch.float64)
    rows[setup.rank, 0] = sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in setup.bank.parameters())
    rows[setup.rank, 1] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux
    rows = reduce(rows)
    return {"held_bytes": [int(x) for x in rows[:, 0]], "peak_rss_bytes": [int(x) for x in rows[:, 1]],
            "parameters": sum(setup.plan.numel(i) for i in range(len(setup.plan.names)))}


def _finish(setup: Setup, trainer, result_dir: Path, step: int, history: list[float], gradient,
            first_gradient, stats: dict[str, Any]) -> None:
    """Rank 0 writes the variant's learned coefficients; result.json last, as the variant's commit mark."""
    if setup.rank != 0:
        return
    state = {"step": step, "history": history}
    save_state(result_dir, setup, trainer, state, gradient, first_gradient)
    result = {"names": list(setup.plan.names), "tasks": list(setup.plan.tasks), "rows": list(setup.plan.rows),
              "granularity": setup.plan.granularity, "steps": step, "history": history, **stats,
              "plus": None if setup.masks is None else {"thresholds": list(setup.masks.thresholds),
                                                         "zero_sign": setup.masks.zero_sign}}
    write_json(result_dir / RESULT_FILE, result)
