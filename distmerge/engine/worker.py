"""The merge worker: reads its layer groups from every input, merges them chunk by chunk, writes its shards.

Plain Python class; ``distmerge.engine.driver`` wraps it as a Ray actor. It holds at most one output shard
plus the input chunks of one tensor, never the model. Tensors go from disk to its shards directly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distmerge.errors import InputError, where
from distmerge.io import vocab
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.writer import write_safetensors
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
        self.needs_base = spec.method.needs_base
        self.outputs: dict[str, torch.Tensor] = {}
        self.sidecar: dict[str, torch.Tensor] = {}
        self.pass_totals: dict[str, Any] | None = None
        self.timings = {"read": 0.0, "merge": 0.0, "write": 0.0}
        self.bytes_read = 0
        self._reconciled: dict[tuple[str, str], torch.Tensor] = {}
        self.sign_sum = 0  # deferred decisions (TIES' global majority sign): summed here, patched later
        self.pending_patches: dict[str, tuple[list, list]] = {}
        self.patches: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # file -> tensor -> patch

    # --- reading --------------------------------------------------------------------------------
    def _read(self, model: Checkpoint, source: TensorSource, start: int | None, stop: int | None) -> torch.Tensor:
        began = time.perf_counter()
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
        if value.is_floating_point() and not torch.isfinite(value.sum()) and not torch.isfinite(value).all():
            raise InputError(f"{where(model=model.name, file=model.info(source.tensor).file, tensor=source.tensor)}: "
                             "contains NaN or Inf")
        self.timings["read"] += time.perf_counter() - began
        return value

    def _chunks(self, tensor: OutputTensor, chunked: bool) -> list[tuple[int | None, int | None]]:
        if not tensor.shape or not chunked:
            return [(None, None)]
        rows = max(1, CHUNK_ELEMENTS // max(1, row_elements(tensor)))
        return [(a, min(a + rows, tensor.shape[0])) for a in range(0, tensor.shape[0], rows)]

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
    def run_pass(self, pass_name: str, state: dict, shard_index: int, group_index: int) -> int:
        """Add this group's partial of a reduction pass to the worker's running total."""
        method = self.spec.method
        chunked = method.chunkable()
        for group in self._groups(shard_index, group_index):
            for tensor in group.tensors:
                if not tensor.merged:
                    continue
                for start, stop in self._chunks(tensor, chunked):
                    base, experts = self._inputs(tensor, start, stop)
                    began = time.perf_counter()
                    part = method.stats(pass_name, base, experts, tensor.job, self._row_offset(tensor, start), state)
                    self.pass_totals = add_partials(self.pass_totals, part)
                    self.timings["merge"] += time.perf_counter() - began
                self._reconciled.clear()
        return group_index

    def take_pass_totals(self) -> dict[str, Any] | None:
        totals, self.pass_totals = self.pass_totals, None
        return totals

    # --- merging --------------------------------------------------------------------------------
    def merge_group(self, state: dict, shard_index: int, group_index: int) -> dict[str, Any]:
        for group in self._groups(shard_index, group_index):
            for tensor in group.tensors:
                if tensor.merged:
                    self._merge_tensor(tensor, state)
                else:
                    self._copy_tensor(tensor)
                self._reconciled.clear()
        return {"shard": shard_index, "group": group_index}

    def _copy_tensor(self, tensor: OutputTensor) -> None:
        """An unmerged tensor (excluded, or not floating point): the base's value (the first model's without one)."""
        spec = self.spec
        model, source = (spec.base, tensor.base) if spec.base is not None else (spec.experts[0], tensor.experts[0])
        out = torch.empty(tensor.shape, dtype=tensor.out_dtype)
        for start, stop in self._chunks(tensor, True):
            _put(out, start, stop, self._read(model, source, start, stop).to("cpu", tensor.out_dtype))
        self.outputs[tensor.name] = out

    def _merge_tensor(self, tensor: OutputTensor, state: dict) -> None:
        method = self.spec.method
        out = torch.empty(tensor.shape, dtype=tensor.out_dtype)
        vector = mask = None
        for start, stop in self._chunks(tensor, method.chunkable()):
            base, experts = self._inputs(tensor, start, stop)
            began = time.perf_counter()
            offset = self._row_offset(tensor, start)
            result = method.merge(base, experts, tensor.job, offset, state)
            _put(out, start, stop, result["weight"].to("cpu", tensor.out_dtype))
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
            self.timings["merge"] += time.perf_counter() - began
        self.outputs[tensor.name] = out
        if vector is not None:
            self.sidecar[tensor.name] = vector
            self.sidecar[f"{tensor.name}::mask"] = pack_mask(mask)

    def finish_shard(self, shard_index: int) -> dict[str, Any]:
        """Write the shard (and its sidecar) atomically inside the staging folder."""
        shard = self.spec.plan.shards[shard_index]
        began = time.perf_counter()
        target = Path(self.spec.staging) / shard.filename
        write_safetensors(self.outputs, target)
        written = {name: list(t.shape) for name, t in self.outputs.items()}
        patches = {name: (torch.cat(idx), torch.cat(val)) for name, (idx, val) in self.pending_patches.items()}
        if patches:
            self.patches[shard.filename] = patches
        self.pending_patches = {}
        nbytes = sum(t.numel() * t.element_size() for t in self.outputs.values())
        sidecar = None
        if self.sidecar and self.spec.method.sidecar:
            folder = self.spec.method.sidecar
            name = shard.filename.replace("model-", f"{folder}-")
            write_safetensors(self.sidecar, Path(self.spec.staging) / folder / name)
            sidecar = {"shard": shard_index, "filename": name, "tensors": list(self.sidecar),
                       "bytes": sum(t.numel() * t.element_size() for t in self.sidecar.values())}
        self.outputs, self.sidecar = {}, {}
        self.timings["write"] += time.perf_counter() - began
        return {"shard": shard_index, "filename": shard.filename, "tensors": written, "bytes": nbytes,
                "sidecar": sidecar}

    def take_sign_sum(self) -> int:
        return self.sign_sum

    def apply_patches(self) -> int:
        """Rewrite the deferred elements in this worker's written shards (still in the staging folder)."""
        from distmerge.io.writer import patch_safetensors

        return sum(patch_safetensors(Path(self.spec.staging) / f, p) for f, p in self.patches.items())

    def report(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "timings": dict(self.timings), "bytes_read": self.bytes_read,
                "peak_rss_bytes": peak_rss_bytes()}


def _put(target: torch.Tensor, start: int | None, stop: int | None, value: torch.Tensor,
         task_axis: bool = False) -> None:
    """Write a chunk (rows [start, stop), or the whole tensor) into its place; ``task_axis``: target is [T, ...]."""
    if start is None:
        target.copy_(value.reshape(target.shape))
    elif task_axis:
        target[:, start:stop] = value
    else:
        target[start:stop] = value


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
