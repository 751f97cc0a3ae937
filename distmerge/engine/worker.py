"""The merge worker: reads its layer groups from every input, merges them chunk by chunk, writes its shards.

Plain Python class; ``distmerge.engine.driver`` wraps it as a Ray actor. It holds at most one output shard
plus the input chunks of one tensor, never the model. Tensors go from disk to its shards directly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distmerge import telemetry
from distmerge.engine import faults
from distmerge.engine.allocator import keep_freed_memory, rss_anon_bytes
from distmerge.errors import InputError, MergeError, OutputError, where
from distmerge.io import vocab
from distmerge.io.checkpoint import Checkpoint
from distmerge.engine.resume import file_sha256
from distmerge.io.writer import ShardWriter, write_safetensors
from distmerge.methods.base import MergeMethod
from distmerge.ops.emr import pack_mask
from distmerge.plan import MergePlan
from distmerge.tensors import OutputTensor, TensorSource

CHUNK_ELEMENTS = 1 << 18


@dataclass
class WorkerSpec:
    """Everything a worker needs, shipped once at construction."""

    base: Checkpoint | None
    experts: list[Checkpoint]
    method: MergeMethod
    plan: MergePlan
    staging: str
    dtype: str
    device: str
    num_threads: int
    worker_index: int = 0
    incarnation: int = 0  # 0 for the first actor of a worker slot, then 1, 2, ... for its replacements
    faults: dict[str, str] = field(default_factory=dict)


def add_partials(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    if total is None:
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in part.items()}
    for key, value in part.items():
        total[key] = total[key] + value
    return total


class MergeWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.dtype = getattr(torch, spec.dtype)
        self.device = torch.device(spec.device)
        torch.set_num_threads(max(1, spec.num_threads))
        keep_freed_memory()
        self.needs_base = spec.method.needs_base
        self.writer: ShardWriter | None = None  # the shard being merged, streamed to its file
        self.writer_shard: int | None = None
        self.sidecar: dict[str, torch.Tensor] = {}
        self.timings = {"read": 0.0, "merge": 0.0, "write": 0.0}
        self.bytes_read = 0
        self.groups_merged = 0
        self.failed_shard: int | None = None
        self.peak_anon = rss_anon_bytes()
        self.exit_after = faults.worker_exit_after(spec.faults, spec.worker_index, spec.incarnation)
        self._reconciled: dict[tuple[str, str], torch.Tensor] = {}
        # Deferred decisions (TIES' global majority sign) of the shard being merged: its summed signs and
        # the elements to rewrite should the model-wide sum say so; written beside the shard.
        self.sign_sum = 0
        self.pending_patches: dict[str, tuple[list, list]] = {}

    # --- reading --------------------------------------------------------------------------------
    def _read(self, model: Checkpoint, source: TensorSource, start: int | None, stop: int | None) -> torch.Tensor:
        began = time.perf_counter()
        if self.spec.faults:
            file = model.info(source.tensor).file
            try:
                faults.check_read(self.spec.faults, source.tensor, file)
            except OSError as exc:
                raise InputError(f"{where(model=model.name, file=file, tensor=source.tensor)}: read failed "
                                 f"({exc.strerror})") from None
        if source.row_map is not None:
            key = (model.name, source.tensor)
            if key not in self._reconciled:
                self._reconciled[key] = vocab.reconcile(model.read(source.tensor), source.row_map)
            full = self._reconciled[key]
            value = full if start is None else full[start:stop]
        else:
            value = model.read(source.tensor, start, stop)
        self.bytes_read += value.numel() * value.element_size()
        value = value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
        check_finite(model, source.tensor, value)
        self.timings["read"] += time.perf_counter() - began
        return value


    def _inputs(self, tensor: OutputTensor, start, stop) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        spec = self.spec
        base = self._read(spec.base, tensor.base, start, stop) if (spec.base is not None and self.needs_base) else None
        experts = [self._read(m, s, start, stop) for m, s in zip(spec.experts, tensor.experts)]
        return base, experts

    def _row_offset(self, tensor: OutputTensor, start: int | None) -> int:
        return 0 if start is None else start * row_elements(tensor)

    def _groups(self, shard_index: int, group_index: int | None = None):
        shard = self.spec.plan.shards[shard_index]
        return shard.groups if group_index is None else (shard.groups[group_index],)

    # --- reduction passes -----------------------------------------------------------------------
    def run_pass(self, pass_name: str, state: dict, shard_index: int, group_index: int) -> dict[str, Any] | None:
        """This group's summable partial of a reduction pass (histograms, sums)."""
        method = self.spec.method
        chunked = method.chunkable()
        totals = None
        for group in self._groups(shard_index, group_index):
            for tensor in group.tensors:
                if not tensor.merged:
                    continue
                for start, stop in row_chunks(tensor, chunked):
                    base, experts = self._inputs(tensor, start, stop)
                    began = time.perf_counter()
                    part = method.stats(pass_name, base, experts, tensor.job, self._row_offset(tensor, start), state)
                    totals = add_partials(totals, part)
                    self.timings["merge"] += time.perf_counter() - began
                self._reconciled.clear()
        self._sample_memory()
        return totals

    # --- merging --------------------------------------------------------------------------------
    def merge_group(self, state: dict, shard_index: int, group_index: int) -> dict[str, Any]:
        try:
            return self._merge_group(state, shard_index, group_index)
        except BaseException:
            self.failed_shard = shard_index  # its finish_shard must not write what is there
            raise

    def _merge_group(self, state: dict, shard_index: int, group_index: int) -> dict[str, Any]:
        writer = self._shard_writer(shard_index)
        for group in self._groups(shard_index, group_index):
            for tensor in group.tensors:
                if tensor.merged:
                    self._merge_tensor(tensor, state, writer)
                else:
                    self._copy_tensor(tensor, writer)
                self._reconciled.clear()
        self._sample_memory()
        self.groups_merged += 1
        telemetry.count("distmerge_layer_groups_merged", 1)
        if self.exit_after is not None and self.groups_merged >= self.exit_after:
            os._exit(17)  # injected fault: the process dies without cleanup, as a killed actor does
        return {"shard": shard_index, "group": group_index}

    def _shard_writer(self, shard_index: int) -> ShardWriter:
        if self.writer_shard != shard_index:
            if self.writer is not None:
                self.writer.abort()
            shard = self.spec.plan.shards[shard_index]
            path = Path(self.spec.staging) / shard.filename
            if self.spec.faults:
                try:
                    faults.check_write(self.spec.faults, shard_index, path)
                except OSError as exc:
                    raise OutputError(f"cannot write '{path}': {exc.strerror}") from None
            self.writer = ShardWriter(path, [(t.name, t.out_dtype, tuple(t.shape)) for t in shard.tensors])
            self.writer_shard = shard_index
        return self.writer

    def _copy_tensor(self, tensor: OutputTensor, writer: ShardWriter) -> None:
        """An unmerged tensor (excluded, or not floating point): the base's value (the first model's without one)."""
        spec = self.spec
        model, source = (spec.base, tensor.base) if spec.base is not None else (spec.experts[0], tensor.experts[0])
        for start, stop in row_chunks(tensor, True):
            value = self._read(model, source, start, stop).to("cpu", tensor.out_dtype)
            began = time.perf_counter()
            writer.write(tensor.name, value)
            self.timings["write"] += time.perf_counter() - began

    def _merge_tensor(self, tensor: OutputTensor, state: dict, writer: ShardWriter) -> None:
        method = self.spec.method
        vector = mask = None
        for start, stop in row_chunks(tensor, method.chunkable()):
            base, experts = self._inputs(tensor, start, stop)
            began = time.perf_counter()
            offset = self._row_offset(tensor, start)
            result = method.merge(base, experts, tensor.job, offset, state)
            merged = result["weight"].to("cpu", tensor.out_dtype)
            check_finite_output(tensor.name, merged, method.name)
            self.sign_sum += result.get("sign_sum", 0)
            if "patch_index" in result and result["patch_index"].numel():
                index, value = self.pending_patches.setdefault(tensor.name, ([], []))
                index.append(result["patch_index"].cpu() + offset)
                value.append(result["patch_value"].to("cpu", tensor.out_dtype))
            if "emr_vector" in result:
                if vector is None:
                    vector = torch.empty(tensor.shape, dtype=self.dtype)
                    mask = torch.empty((len(experts),) + tuple(tensor.shape), dtype=torch.bool)
                _put(vector, start, stop, result["emr_vector"].cpu())
                _put(mask, start, stop, result["emr_mask"].cpu(), task_axis=True)
            wrote = time.perf_counter()
            self.timings["merge"] += wrote - began
            writer.write(tensor.name, merged)
            self.timings["write"] += time.perf_counter() - wrote
        if vector is not None:
            self.sidecar[tensor.name] = vector
            self.sidecar[f"{tensor.name}::mask"] = pack_mask(mask)

    def finish_shard(self, shard_index: int) -> dict[str, Any]:
        """Write the shard (and its sidecar, and its deferred patches) atomically inside the staging folder."""
        shard = self.spec.plan.shards[shard_index]
        writer, self.writer, self.writer_shard = self.writer, None, None
        if self.failed_shard == shard_index or writer is None or writer.path.name != shard.filename \
                or not writer.complete:
            if writer is not None:
                writer.abort()
            self.sidecar, self.pending_patches, self.sign_sum = {}, {}, 0
            raise RuntimeError(f"shard {shard.filename} is incomplete on this worker; not written")
        staging = Path(self.spec.staging)
        began = time.perf_counter()
        files = [{"name": shard.filename, **writer.close()}]
        written = {t.name: list(t.shape) for t in shard.tensors}
        nbytes = writer.data_bytes
        sidecar = None
        if self.sidecar and self.spec.method.sidecar:
            folder = self.spec.method.sidecar
            name = f"{folder}/" + shard.filename.replace("model-", f"{folder}-")
            files.append(self._write(self.sidecar, staging / name))
            sidecar = {"shard": shard_index, "filename": name.split("/", 1)[1], "tensors": list(self.sidecar),
                       "bytes": sum(t.numel() * t.element_size() for t in self.sidecar.values())}
        patches = None
        if self.pending_patches:
            patches = f".patches/{shard.filename}"
            tensors = {}
            for tensor, (index, value) in self.pending_patches.items():
                tensors[f"{tensor}::index"] = torch.cat(index)
                tensors[f"{tensor}::value"] = torch.cat(value)
            files.append(self._write(tensors, staging / patches))
        result = {"shard": shard_index, "filename": shard.filename, "tensors": written, "bytes": nbytes,
                  "sidecar": sidecar, "sign_sum": self.sign_sum, "patches": patches, "files": files,
                  "node": _node_id()}
        self.sidecar, self.pending_patches, self.sign_sum = {}, {}, 0
        self.timings["write"] += time.perf_counter() - began
        self._sample_memory()
        return result

    def _write(self, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
        """A small whole file beside a shard (EMR sidecar, deferred patches)."""
        write_safetensors(tensors, path)
        return {"name": str(path.relative_to(self.spec.staging)), "bytes": path.stat().st_size,
                "sha256": file_sha256(path)}

    def _sample_memory(self) -> None:
        # Freed chunk memory stays in the heap (allocator.py), so sampling between groups sees the high-water mark.
        self.peak_anon = max(self.peak_anon, rss_anon_bytes())

    def report(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": _node_id(), "worker": self.spec.worker_index,
                "incarnation": self.spec.incarnation, "timings": dict(self.timings), "bytes_read": self.bytes_read,
                "peak_rss_bytes": peak_rss_bytes(), "peak_anon_bytes": self.peak_anon}


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def _put(target: torch.Tensor, start: int | None, stop: int | None, value: torch.Tensor,
         task_axis: bool = False) -> None:
    """Write a chunk (rows [start, stop), or the whole tensor) into its place; ``task_axis``: target is [T, ...]."""
    if start is None:
        target.copy_(value.reshape(target.shape))
    elif task_axis:
        target[:, start:stop] = value
    else:
        target[start:stop] = value


def is_finite(value: torch.Tensor) -> bool:
    """No NaN or Inf. The sum is one cheap pass, finite for almost every tensor (accumulated in float32, so a
    float16 chunk's sum does not overflow); only when it is not is the element-wise check run to be sure."""
    if not value.is_floating_point():
        return True
    return bool(torch.isfinite(value.sum(dtype=torch.float32))) or bool(torch.isfinite(value).all())


def check_finite(model, tensor: str, value) -> None:
    """NaN/Inf in an input is an error naming the model, file and tensor."""
    if not is_finite(value):
        raise InputError(f"{where(model=model.name, file=model.info(tensor).file, tensor=tensor)}: contains NaN or Inf")


def check_finite_output(tensor: str, value: torch.Tensor, method: str) -> None:
    """A merged chunk with NaN/Inf (from parameters, an overflow in the output dtype, anything) stops the run
    before it reaches a shard."""
    if not is_finite(value):
        raise MergeError(f"tensor '{tensor}': the {method} merge gives NaN or Inf in {str(value.dtype).removeprefix('torch.')} "
                         f"(check the parameters, and out_dtype's range)")


def row_chunks(tensor: OutputTensor, chunked: bool) -> list[tuple[int | None, int | None]]:
    """Row ranges of about CHUNK_ELEMENTS elements, or the whole tensor as (None, None)."""
    if not tensor.shape or not chunked:
        return [(None, None)]
    rows = max(1, CHUNK_ELEMENTS // max(1, row_elements(tensor)))
    return [(a, min(a + rows, tensor.shape[0])) for a in range(0, tensor.shape[0], rows)]


def row_elements(tensor: OutputTensor) -> int:
    count = 1
    for size in tensor.shape[1:]:
        count *= size
    return count


def peak_rss_bytes() -> int:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return 0
