"""The merge driver: validate, plan, run reduction passes and the merge on Ray actors, finalize the folder.

The driver never touches tensor data: actors read inputs and write shards themselves; the driver sums the
small pass partials (histograms, scalars), writes the index, config, tokenizer and card, and renames the
staging folder into place.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from distmerge.config import MergeConfig, load_config
from distmerge.engine.ray_session import cluster_cpus, cluster_gpus, ray_session
from distmerge.engine.worker import MergeWorker, WorkerSpec, add_partials
from distmerge.errors import DistmergeError
from distmerge.io import model_files, writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.plan import MergePlan, make_plan
from distmerge.tensors import resolve_tensors

LOG = logging.getLogger(__name__)


@dataclass
class MergeResult:
    out: Path
    method: str
    shards: int
    workers: int
    seconds: float
    bytes_written: int
    bytes_read: int
    method_state: dict[str, Any] = field(default_factory=dict)
    worker_reports: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        peak = max((r["peak_rss_bytes"] for r in self.worker_reports), default=0)
        return (f"merged ({self.method}) into {self.out}: {self.shards} shard(s) by {self.workers} worker(s) in "
                f"{self.seconds:.1f}s; read {_size(self.bytes_read)}, wrote {_size(self.bytes_written)}, "
                f"peak worker RSS {peak / 2**20:.0f} MiB")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def merge(config: MergeConfig | str | Path | dict, out: str | Path, *, workers: int | None = None,
          address: str | None = None, force: bool = False, progress: bool = True) -> MergeResult:
    """Merge as the config says into ``out`` (a Hugging Face model folder). Same as ``distmerge merge``."""
    began = time.perf_counter()
    if not isinstance(config, MergeConfig):
        config = load_config(config)
    method = config.build_method()
    out = Path(out).expanduser().resolve()
    writer.check_target(out, force)
    base = Checkpoint(config.base_model, "base") if config.base_model else None
    experts = [Checkpoint(spec.model, spec.name) for spec in config.models]
    outputs, vocab_plan, _ = resolve_tensors(config, base, experts)
    state = method.initial_state([o.job for o in outputs if o.merged])
    device = resolve_device(config.device)

    staging = writer.make_staging(out)
    try:
        with ray_session(address):
            total_cpus = cluster_cpus()
            requested = workers or max(1, int(total_cpus))
            plan = make_plan(outputs, config.out_shard_size, requested, len(experts) + (1 if base else 0))
            actors = _start_actors(plan, base, experts, method, staging, config.dtype, device, total_cpus)
            try:
                state = _run_passes(actors, plan, method, state, progress)
                shard_results = _run_merge(actors, plan, state, progress)
                state = _resolve_deferred(actors, method, state)
                reports = _get([a.report.remote() for a in actors])
            finally:
                for actor in actors:
                    ray.kill(actor)
        summary = _finish_folder(staging, config, method, state, base, experts, vocab_plan, shard_results, reports,
                                 time.perf_counter() - began)
        writer.finalize(staging, out, force)
    except BaseException:
        writer.discard(staging)
        raise
    return MergeResult(out=out, method=config.method, shards=len(plan.shards), workers=len(plan.assignment),
                       seconds=time.perf_counter() - began, bytes_written=sum(r["bytes"] for r in shard_results),
                       bytes_read=sum(r["bytes_read"] for r in reports), method_state=summary["method_state"],
                       worker_reports=reports)


def _start_actors(plan: MergePlan, base, experts, method, staging: Path, dtype: str, device: str,
                  total_cpus: float) -> list:
    count = len(plan.assignment)
    # Fractional CPUs so that N workers fit on fewer cores without waiting on each other.
    num_cpus = min(1.0, total_cpus / count)
    # One GPU per worker where there are enough; otherwise the GPUs are shared evenly.
    num_gpus = min(1.0, cluster_gpus() / count) if device.startswith("cuda") else 0.0
    run = uuid.uuid4().hex[:6]
    remote = ray.remote(MergeWorker)
    actors = []
    for index in range(count):
        spec = WorkerSpec(base=base, experts=experts, method=method, plan=plan, staging=str(staging), dtype=dtype,
                          device=device, num_threads=max(1, int(num_cpus)))
        actors.append(remote.options(name=f"distmerge-merge-worker-{index}-{run}", num_cpus=num_cpus,
                                     num_gpus=num_gpus, max_restarts=0).remote(spec))
    return actors


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="group", disable=not enabled, file=sys.stderr, leave=True)


def _owned_groups(plan: MergePlan, worker: int):
    for shard_index in plan.assignment[worker]:
        for group_index in range(len(plan.shards[shard_index].groups)):
            yield shard_index, group_index


def _get(refs):
    """ray.get that re-raises a user-facing error from an actor as itself, without Ray's wrapping."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, DistmergeError):
            raise cause from None
        raise


def _wait_all(refs: list, bar) -> list:
    """Wait for every ref, advancing the bar as they finish; re-raise the first failure."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        _get(done)
        bar.update(len(done))
    return _get(refs)


def _run_passes(actors: list, plan: MergePlan, method, state: dict, progress: bool) -> dict:
    while (pass_name := method.next_pass(state)) is not None:
        state_ref = ray.put(state)
        refs = [actor.run_pass.remote(pass_name, state_ref, s, g)
                for w, actor in enumerate(actors) for s, g in _owned_groups(plan, w)]
        with _bar(len(refs), f"pass {pass_name}", progress) as bar:
            _wait_all(refs, bar)
        totals = None
        for part in _get([a.take_pass_totals.remote() for a in actors]):
            if part is not None:
                totals = add_partials(totals, part)
        state = method.finish_pass(pass_name, totals or {}, state)
    return state


def _run_merge(actors: list, plan: MergePlan, state: dict, progress: bool) -> list[dict[str, Any]]:
    state_ref = ray.put(state)
    group_refs, shard_refs = [], []
    for worker, actor in enumerate(actors):
        for shard_index in plan.assignment[worker]:
            for group_index in range(len(plan.shards[shard_index].groups)):
                group_refs.append(actor.merge_group.remote(state_ref, shard_index, group_index))
            shard_refs.append(actor.finish_shard.remote(shard_index))
    with _bar(len(group_refs), "merge", progress) as bar:
        _wait_all(group_refs, bar)
    return _get(shard_refs)


def _resolve_deferred(actors: list, method, state: dict) -> dict:
    """Decisions only the whole merged model could make (TIES' majority sign): patch the few elements."""
    state = {**state, "sign_sum": sum(_get([a.take_sign_sum.remote() for a in actors]))}
    if method.resolve_deferred(state):
        state["patched_elements"] = sum(_get([a.apply_patches.remote() for a in actors]))
    return state


def _finish_folder(staging: Path, config: MergeConfig, method, state: dict, base, experts, vocab_plan,
                   shard_results: list[dict[str, Any]], reports: list[dict[str, Any]], seconds: float) -> dict:
    reference = base if base is not None else experts[0]
    writer.write_index(staging, shard_results, {"distmerge_method": config.method})
    model_files.write_config_json(staging, reference, vocab_plan, config.out_dtype)
    tokenizer = model_files.write_tokenizer(staging, config, base, experts, vocab_plan)
    model_files.copy_generation_config(staging, reference)
    if method.sidecar:
        sidecar_results = [r["sidecar"] for r in shard_results if r["sidecar"]]
        writer.write_index(staging, sidecar_results, {"tasks": list(config.names), **method.describe(state)},
                           filename=f"{method.sidecar}/index.json")
    method_state = {k: v for k, v in method.describe(state).items() if v is not None}
    timings = {
        "seconds": round(seconds, 2),
        "workers": len(reports),
        "per_worker": [{k: round(v, 2) for k, v in r["timings"].items()} | {"peak_rss_mib": r["peak_rss_bytes"] >> 20}
                       for r in reports],
        "tokenizer": tokenizer,
    }
    model_files.write_resolved_config(staging, config)
    model_files.write_card(staging, config, {"method_state": method_state, "timings": timings})
    return {"method_state": method_state}
