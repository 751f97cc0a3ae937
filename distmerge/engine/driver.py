"""The merge driver: validate, plan, run reduction passes and the merge on Ray actors, finalize the folder.

The driver never reads the model: actors read inputs and write shards themselves; the driver sums the
small pass partials (histograms, scalars) and the merge partials that come with each shard's result (EMR's
rescaler sums), records finished shards for resume, applies the few deferred element patches, writes the
index, config, tokenizer and card, and renames the staging folder into place.

Output location: every worker writes its shards straight into the staging folder beside the target, so on
a cluster the target must be on a filesystem every node mounts at the same path (NFS, Lustre, a FUSE
bucket). The driver checks each shard is visible to it and stops with an explanation when it is not.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from distmerge import telemetry, validate
from distmerge.config import MergeConfig, load_config
from distmerge.deferred import import_in_background
from distmerge.engine import faults
from distmerge.engine.pool import WorkerPool, WorkItem
from distmerge.engine.ray_session import cluster_cpus, cluster_gpus, ray_session
from distmerge.engine.resume import RunFolder, run_key
from distmerge.engine.worker import WorkerSpec
from distmerge.methods import execute
from distmerge.methods.base import MergeMethod
from distmerge.methods.execute import add_partials
from distmerge.errors import OutputError
from distmerge.io import model_files, writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.lora import open_checkpoint
from distmerge.plan import MergePlan, assign, make_plan
from distmerge.tensors import OutputTensor, resolve_tensors

LOG = logging.getLogger(__name__)


PLACEMENTS = ("pack", "spread", "strict_spread")


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
    resumed_shards: int = 0
    replaced_workers: int = 0
    warm_workers: bool = False  # ran on the idle workers of an earlier merge (no actor start-up)

    def summary(self) -> str:
        memory = "+".join(f"{r['peak_anon_bytes'] / 2**20:.0f}" for r in self.worker_reports) or "0"
        rate = self.bytes_read / self.seconds if self.seconds > 0 else 0.0
        line = (f"merged ({self.method}) into {self.out}: {self.shards} shard(s) by {self.workers} "
                f"{'warm ' if self.warm_workers else ''}worker(s) in "
                f"{self.seconds:.1f}s; read {_size(self.bytes_read)} ({_size(rate)}/s), wrote "
                f"{_size(self.bytes_written)}, peak worker memory {memory} MiB")
        if self.resumed_shards:
            line += f"; reused {self.resumed_shards} verified shard(s) of an interrupted run"
        if self.replaced_workers:
            line += f"; replaced {self.replaced_workers} dead worker(s)"
        return line


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def resolve_device(device: str, cluster_gpus: float) -> str:
    """``auto``: cuda where the cluster has GPUs for the workers (the driver's own machine may have none)."""
    if device == "auto":
        return "cuda" if cluster_gpus > 0 else "cpu"
    return device


def merge(config: MergeConfig | str | Path | dict, out: str | Path, *, workers: int | None = None,
          address: str | None = None, force: bool = False, progress: bool = True, placement: str = "pack",
          resume: bool = True) -> MergeResult:
    """Merge as the config says into ``out`` (a Hugging Face model folder). Same as ``distmerge merge``.

    ``placement``: how worker actors spread over nodes (``pack`` fills nodes in turn, ``spread`` puts them on
    as many nodes as possible). ``resume``: reuse the verified shards of an interrupted run of the same merge.
    """
    began = time.perf_counter()
    if not isinstance(config, MergeConfig):
        config = load_config(config)
    validate.choice("placement", placement, PLACEMENTS)
    method = config.build_method()
    out = Path(out).expanduser().resolve()
    writer.check_target(out, force)
    base = Checkpoint(config.base_model, "base") if config.base_model else None
    experts = [open_checkpoint(spec.model, spec.name) for spec in config.models]
    method.check_models({spec.name: checkpoint for spec, checkpoint in zip(config.models, experts)})
    outputs, vocab_plan, _ = resolve_tensors(config, base, experts)
    initial_state = method.initial_state([o.job for o in outputs if o.merged])
    injected = faults.parse()
    models = ([base] if base is not None else []) + experts

    with ray_session(address, keeps_warm_workers=True) as session:
        total_cpus = cluster_cpus()
        device = resolve_device(config.device, cluster_gpus())
        key_config = config.to_yaml_dict()
        if device == "cpu" and config.dtype == "float32":  # what the undecided elements' merge here computes in
            estimated = method.leaves_undecided(initial_state)
            if estimated != initial_state:  # a resume must start as this run did (numba, the CPU): in the key
                key_config["leaves_undecided"] = True
            initial_state = estimated
        if method.next_pass(initial_state) is not None:  # its totals come back as torch tensors
            import_in_background("torch")
        plan = make_plan(outputs, config.out_shard_size, workers or max(1, int(total_cpus)), len(models))
        run = RunFolder(out, run_key(key_config, models, plan))
        if not resume:
            run.discard()
        finished = _resumable(run.open(), method)
        resumed = len(finished)
        try:
            count = len(plan.assignment)
            num_cpus = min(1.0, total_cpus / count)  # fractional, so N workers fit on fewer cores
            num_gpus = min(1.0, cluster_gpus() / count) if device.startswith("cuda") else 0.0
            specs = [WorkerSpec(base=base, experts=experts, method=method, plan=plan, staging=str(run.path),
                                dtype=config.dtype, device=device, num_threads=max(1, int(num_cpus)),
                                worker_index=i, faults=injected) for i in range(count)]
            sizes = _group_input_bytes(plan, base, experts, method.needs_base)
            pool = WorkerPool(specs, num_cpus, num_gpus, placement, parked=session.on_cluster)
            try:
                state = run.load_passes() if finished else None
                if state is None:
                    state = _run_passes(pool, plan, method, initial_state, sizes, progress)
                    run.save_passes(state)
                while True:
                    results = _run_merge(pool, plan, state, sizes, finished, run, injected, progress)
                    state, again = _finish(method, state, results, run.path, plan)
                    if again is None:
                        break
                    LOG.warning("%s: the estimate its merge started from did not hold; merging again from its exact "
                                "passes", config.method)
                    run.forget()
                    finished = {}
                    state = _run_passes(pool, plan, method, again, sizes, progress)
                    run.save_passes(state)
                reports = pool.call_all("report")
                bytes_read = sum(r["bytes_read"] for r in reports) + pool.retired_bytes_read
                replaced = sum(pool.replacements)
            except BaseException:
                pool.shutdown(graceful=False)  # the others may still be busy: stop them now
                raise
            # Workers wait for the next merge only where Ray outlives this one and nothing else needs the CPUs.
            pool.shutdown(keep_warm=(session.borrowed and session.outermost) or session.on_cluster)
            seconds = time.perf_counter() - began
            summary = _finish_folder(run.path, config, method, state, base, experts, vocab_plan, results, reports,
                                     seconds, resumed, replaced)
            run.clear_bookkeeping()
            writer.finalize(run.path, out, force)
        except KeyboardInterrupt:
            LOG.warning("interrupted: the finished shards stay in %s; rerun the same command to resume", run.path)
            raise
        except BaseException:
            writer.discard(run.path)
            raise
        finally:
            run.release()
    return MergeResult(out=out, method=config.method, shards=len(plan.shards), workers=len(plan.assignment),
                       seconds=time.perf_counter() - began, bytes_written=sum(r["bytes"] for r in results),
                       bytes_read=bytes_read, method_state=summary["method_state"],
                       worker_reports=reports, resumed_shards=resumed, replaced_workers=replaced,
                       warm_workers=pool.reused)


def _group_input_bytes(plan: MergePlan, base, experts, needs_base: bool) -> dict[tuple[int, int], int]:
    """Input bytes each (shard, group) reads, for progress in bytes."""

    def tensor_bytes(tensor: OutputTensor) -> int:
        if not tensor.merged:
            model, source = (base, tensor.base) if base is not None else (experts[0], tensor.experts[0])
            return model.info(source.tensor).nbytes
        total = sum(m.info(s.tensor).nbytes for m, s in zip(experts, tensor.experts))
        if base is not None and needs_base:
            total += base.info(tensor.base.tensor).nbytes
        return total

    return {(s, g): sum(tensor_bytes(t) for t in group.tensors)
            for s, shard in enumerate(plan.shards) for g, group in enumerate(shard.groups)}


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, file=sys.stderr,
                leave=True, dynamic_ncols=True)


def _run_passes(pool: WorkerPool, plan: MergePlan, method, state: dict, sizes: dict, progress: bool) -> dict:
    # A pass writes nothing, so its layer groups need not follow the shards' owners: they are spread over the
    # workers by their input bytes (whole shards would leave one worker a shard's worth behind at the pass's
    # end). The partials are summed in (shard, group) order, not as they come back, so a float sum is the same
    # bits whatever the worker count and timing.
    keys = sorted(sizes)
    slots = assign([sizes[k] for k in keys], len(plan.assignment))

    def partial(pass_name: str, state: dict) -> dict[str, Any] | None:
        state_ref = ray.put(state)
        # a group's pass may read less than its inputs (what an earlier pass kept): its result says how much
        items = [[WorkItem(keys[i], lambda actor, s=keys[i][0], g=keys[i][1]:
                           [actor.run_pass.remote(pass_name, state_ref, s, g)], [sizes[keys[i]]],
                           reads=lambda result: result["bytes_read"])
                  for i in slot] for slot in slots]
        parts: dict[tuple[int, int], Any] = {}

        def add(item: WorkItem, result) -> None:
            parts[item.key] = result["partial"]

        with _bar(sum(sizes.values()), f"pass {pass_name}", progress) as bar:
            pool.run(items, add, bar.update)
        totals: dict[str, Any] | None = None
        for key in sorted(parts):
            if parts[key] is not None:
                totals = add_partials(totals, parts[key])
        return totals

    return execute.run_passes(method, state, partial)


def _run_merge(pool: WorkerPool, plan: MergePlan, state: dict, sizes: dict, finished: dict, run: RunFolder,
               injected: dict, progress: bool) -> list[dict[str, Any]]:
    state_ref = ray.put(state)
    results = dict(finished)

    def shard_item(s: int) -> WorkItem:
        groups = range(len(plan.shards[s].groups))
        return WorkItem(s, lambda actor: [actor.merge_group.remote(state_ref, s, g) for g in groups]
                        + [actor.finish_shard.remote(s)], [sizes[s, g] for g in groups] + [0])

    exit_after = faults.driver_exit_after(injected)

    def record(item: WorkItem, result: dict) -> None:
        _check_visible(run.path, result)
        run.record(result)
        results[item.key] = result
        if exit_after is not None and len(results) - len(finished) >= exit_after:
            os._exit(3)  # injected fault: the driver dies without cleanup

    def advance(nbytes: int) -> None:
        bar.update(nbytes)
        telemetry.count("distmerge_bytes_read", nbytes)

    items = [[shard_item(s) for s in shards if s not in finished] for shards in plan.assignment]
    total = sum(sum(i.sizes) for slot in items for i in slot)
    with _bar(total, "merge", progress) as bar:
        pool.run(items, record, advance)
    return [results[s] for s in sorted(results)]


def _check_visible(staging: Path, result: dict) -> None:
    """A worker on another node wrote this shard: the driver must see the same file."""
    for file in result["files"]:
        path = staging / file["name"]
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        if size != file["bytes"]:
            raise OutputError(f"shard '{file['name']}' written on node {result.get('node')} is not visible at "
                              f"'{path}' from the driver: the output folder must be on a filesystem every node "
                              "mounts at the same path (NFS, Lustre, a mounted bucket)")


def _resumable(records: dict[int, dict[str, Any]], method) -> dict[int, dict[str, Any]]:
    """The finished shards a resume keeps. Where the method sums merge partials, a shard's must read back:
    one recorded before they existed, or whose partials do not read, is merged again."""
    if type(method).finish_merge is MergeMethod.finish_merge:
        return records
    kept = {}
    for shard, record in records.items():
        partials = record.get("partials")
        try:
            if not isinstance(partials, dict) or not all(str(g).isdigit() for g in partials):
                raise ValueError("no partials")
            for part in partials.values():
                execute.partial_from_json(part)
        except ValueError as exc:
            LOG.warning("shard %s of the interrupted run is merged again: its merge partials are unusable (%s)",
                        record.get("filename", shard), exc)
            continue
        kept[shard] = record
    return kept


def _merge_partials(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards' merge partials summed in (shard, group) order, as a pass sums its partials: the same bits
    whatever the worker count, the timing or a resume (``_resumable`` checked the recorded ones)."""
    totals = None
    for result in sorted(results, key=lambda r: r["shard"]):
        partials = result.get("partials") or {}
        for group in sorted(partials, key=int):
            totals = add_partials(totals, execute.partial_from_json(partials[group]))
    return totals or {}


def _finish(method, state: dict, results: list[dict[str, Any]], staging: Path, plan: MergePlan):
    """``execute.finish`` over the written shards: the undecided elements the workers left beside them are
    merged here and, with the deferred ones the method decides to rewrite, patched into the shards."""
    tensors = {t.name: t for shard in plan.shards for t in shard.tensors if t.merged}
    shards = [_WrittenShard(staging, result) for result in results]
    return execute.finish(method, state, _merge_partials(results), sum(r.get("deferred_vote", 0) for r in results),
                          shards, tensors)


class _WrittenShard:
    def __init__(self, staging: Path, result: dict[str, Any]):
        self.staging, self.result = staging, result

    def undecided(self):
        if not self.result.get("undecided"):
            return iter(())
        from safetensors import safe_open  # only methods that leave elements undecided need torch in the driver

        handle = safe_open(str(self.staging / self.result["undecided"]), framework="pt", device="cpu")
        return execute.undecided_groups(handle.keys(), handle.get_tensor)

    def patch(self, decided, outcome: int | None) -> int:
        patches = dict(decided)
        # deferred elements by the outcome their chunk assumed (a record from before chunks leaned: all 1)
        counts = {int(a): n for a, n in self.result.get("deferred_counts", {}).items()}
        legacy = "deferred_counts" not in self.result
        if self.result.get("patches") and outcome is not None and (legacy or any(
                n for assumed, n in counts.items() if assumed != outcome)):
            from safetensors import safe_open

            stored = safe_open(str(self.staging / self.result["patches"]), framework="pt", device="cpu")
            for key in stored.keys():
                tensor, part, assumed = execute.parse_patch_key(key)
                if part != "index" or (assumed == outcome and not legacy):
                    continue  # merged as decided: not read
                index = stored.get_tensor(key)
                if legacy:
                    counts[assumed] = counts.get(assumed, 0) + index.numel()
                if assumed != outcome:
                    value = stored.get_tensor(execute.patch_key(tensor, "value", assumed))
                    patches[tensor] = _joined(patches.get(tensor), (index, value))
        if patches:
            writer.patch_safetensors(self.staging / self.result["filename"], patches)
        return sum(counts.values())


def _joined(first, second):
    """Two (flat indices, values) of one tensor's patches (disjoint) as one."""
    if first is None:
        return second
    import torch

    return torch.cat([first[0].long(), second[0].long()]), torch.cat([first[1], second[1]])


def _finish_folder(staging: Path, config: MergeConfig, method, state: dict, base, experts, vocab_plan,
                   shard_results: list[dict[str, Any]], reports: list[dict[str, Any]], seconds: float,
                   resumed: int, replaced: int) -> dict:
    reference = base if base is not None else experts[0]
    writer.write_index(staging, shard_results, {"distmerge_method": config.method})
    model_files.write_config_json(staging, reference, vocab_plan, config.out_dtype)
    tokenizer = model_files.write_tokenizer(staging, config, base, experts, vocab_plan)
    model_files.copy_generation_config(staging, reference)
    if method.artifact_folder:
        artifact_results = [r["artifacts"] for r in shard_results if r.get("artifacts")]
        writer.write_index(staging, artifact_results, {"tasks": list(config.names), **method.describe(state)},
                           filename=f"{method.artifact_folder}/index.json")
    method_state = {k: v for k, v in method.describe(state).items() if v is not None}
    timings = {
        "seconds": round(seconds, 2),
        "workers": len(reports),
        "per_worker": [{k: round(v, 2) for k, v in r["timings"].items()}
                       | {"peak_anon_mib": r["peak_anon_bytes"] >> 20, "node": r["node"],
                          "incarnation": r["incarnation"]} for r in reports],
        "resumed_shards": resumed,
        "replaced_workers": replaced,
        "tokenizer": tokenizer,
    }
    model_files.write_resolved_config(staging, config)
    model_files.write_card(staging, config, {"method_state": method_state, "method_card": method.card_lines(),
                                             "timings": timings})
    return {"method_state": method_state}
