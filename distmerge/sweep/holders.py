"""Holders: actors that read the inputs of some layer groups once and merge them on request, per trial.

A holder keeps, for each of its merged tensors, the base and expert values as the engine's worker reads
them (vocabulary rows reconciled, stored dtype), for the whole sweep. They merge through the engine's own
executor (``distmerge.methods.execute``, chunk by chunk as the engine's worker), so every method runs exactly
the engine's code path and a trial's tensors and artifacts are bit-identical to what ``distmerge merge``
writes for the same parameters. Holding the
inputs in their stored dtype costs what holding the task vectors would (less, for bf16 checkpoints).

Unmerged tensors (excluded, not floating point) are put into the object store once; merged tensors go to
the trial through the object store as numpy arrays (bf16 as an int16 view), which the trial maps without
copying.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
import torch

from distmerge import dtypes
from distmerge.engine.worker import check_finite, peak_rss_bytes
from distmerge.methods import execute
from distmerge.io import vocab
from distmerge.io.checkpoint import Checkpoint
from distmerge.methods.base import MergeMethod, TensorJob
from distmerge.plan import assign, group_tensors
from distmerge.tensors import OutputTensor, TensorSource


def to_wire(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    """A tensor as a numpy array the object store shares without copying, and its torch dtype's name."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bits
        return tensor.view(torch.int16).numpy(), dtype
    return tensor.numpy(), dtype


def from_wire(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The tensor back, as a read-only view of the object store's buffer (no copy)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": the model only reads it
        tensor = torch.from_numpy(array)
    return tensor.view(dtypes.torch_dtype(dtype)) if dtype == "bfloat16" else tensor


class TaskVectorHolder:
    """Plain class; ``start_holders`` wraps it as a Ray actor."""

    def __init__(self, base: Checkpoint | None, experts: list[Checkpoint], tensors: list[OutputTensor],
                 needs_base: bool, dtype: str, num_threads: int):
        torch.set_num_threads(max(1, num_threads))
        self.base, self.experts = base, experts
        self.tensors = {t.name: t for t in tensors}
        self.needs_base = needs_base
        self.dtype = dtypes.torch_dtype(dtype)
        self.inputs: dict[str, tuple[torch.Tensor | None, list[torch.Tensor]]] = {}
        self.copies: dict[str, torch.Tensor] = {}
        self.reads: Counter = Counter()  # (model, stored tensor) -> times read from disk
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.merge_seconds = 0.0
        self.merges_served = 0
        self.requests: dict[str, dict[str, Any]] = {}

    # --- reading, once ---------------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """Read every input this holder needs. Called once, right after start."""
        began = time.perf_counter()
        cache: dict[tuple[str, str], torch.Tensor] = {}  # a tied head shares its embedding's read
        for tensor in self.tensors.values():
            if tensor.merged:
                base = self._read(self.base, tensor.base, cache) if (self.base is not None and self.needs_base) \
                    else None
                experts = [self._read(m, s, cache) for m, s in zip(self.experts, tensor.experts)]
                self.inputs[tensor.name] = (base, experts)
            else:
                model, source = (self.base, tensor.base) if self.base is not None else \
                    (self.experts[0], tensor.experts[0])
                value = self._read(model, source, cache)
                if value.is_floating_point():  # as the engine copies: through the compute dtype
                    value = value.to(self.dtype)
                self.copies[tensor.name] = value.to(dtypes.torch_dtype(tensor.out_dtype))
        self.read_seconds = time.perf_counter() - began
        return self.report()

    def _read(self, model: Checkpoint, source: TensorSource, cache: dict) -> torch.Tensor:
        key = (model.name, source.tensor)
        if key in cache:
            value = cache[key]
        else:
            value = model.read(source.tensor)
            self.reads[key] += 1
            self.bytes_read += value.numel() * value.element_size()
            check_finite(model, source.tensor, value)
            cache[key] = value
        return vocab.reconcile(value, source.row_map) if source.row_map is not None else value

    def copied(self) -> dict[str, tuple[np.ndarray, str]]:
        """The unmerged tensors (the same for every trial); the driver keeps the reference."""
        return {name: to_wire(value) for name, value in self.copies.items()}

    # --- merging, per trial ----------------------------------------------------------------------
    def _operands(self, tensor: OutputTensor, start, stop):
        """The held inputs of a chunk, in the compute dtype: the values the engine's worker hands its method (as
        bf16, where the method's loops widen them themselves: the same float32 values, the same bits)."""
        base, experts = self.inputs[tensor.name]
        if start is not None:
            base = base[start:stop] if base is not None else None
            experts = [e[start:stop] for e in experts]
        return (base.to(self.dtype) if base is not None else None), [e.to(self.dtype) for e in experts]

    def _merged(self, jobs: dict[str, TensorJob]) -> list[OutputTensor]:
        """The held merged tensors, with this trial's resolved numbers."""
        return [dataclasses.replace(self.tensors[name], job=jobs[name]) for name in self.inputs]

    def run_pass(self, method: MergeMethod, pass_name: str, state: dict, jobs: dict[str, TensorJob]):
        """This holder's summed partial of a method's reduction pass (e.g. TIES' trim histograms)."""
        began = time.perf_counter()
        totals = execute.pass_partial(method, pass_name, state, self._merged(jobs), self._operands)
        self.merge_seconds += time.perf_counter() - began
        return totals

    def merge(self, request: str, method: MergeMethod, state: dict, jobs: dict[str, TensorJob]) -> dict[str, Any]:
        """Merge every held tensor for one trial; keep the result under ``request``; return this holder's share
        of the method's deferred vote and its summed merge partials (``ChunkResult.partial``)."""
        began = time.perf_counter()
        sink, deferred = execute.DictSink(), execute.DeferredLog()
        totals = None
        for tensor in self._merged(jobs):  # partials in the order this holder's pass would sum them
            totals = execute.merge_tensor(method, tensor, state, self._operands, sink, deferred, self.dtype,
                                          totals=totals)
        self.requests[request] = {"sink": sink, "deferred": deferred}
        self.merges_served += 1
        self.merge_seconds += time.perf_counter() - began
        return {"vote": deferred.vote, "partial": totals}

    def fetch(self, request: str, outcome: int | None) -> dict[str, Any]:
        """A trial's merged tensors (deferred elements merged as another outcome than the method's decision
        ``outcome`` rewritten) and the method's artifacts: {"weights": ..., "artifacts": ..., "deferred": how
        many deferred elements it holds}."""
        held = self.requests.pop(request)
        sink = held["sink"]
        held["deferred"].apply(sink.outputs, outcome)
        return {"weights": {name: to_wire(value) for name, value in sink.outputs.items()},
                "deferred": held["deferred"].count,
                "artifacts": {key: to_wire(value) for key, value in sink.artifacts().items()}}

    def discard(self, request: str) -> None:
        self.requests.pop(request, None)

    def report(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "tensors": len(self.tensors), "tensor_reads": sum(self.reads.values()),
                "distinct_reads": len(self.reads), "most_reads_of_one_tensor": max(self.reads.values(), default=0),
                "bytes_read": self.bytes_read, "read_seconds": round(self.read_seconds, 3),
                "merge_seconds": round(self.merge_seconds, 3), "merges_served": self.merges_served,
                "bytes_held": sum(t.numel() * t.element_size() for b, es in self.inputs.values()
                                  for t in ([b] if b is not None else []) + es),
                "peak_rss_bytes": peak_rss_bytes()}


def split_groups(outputs: list[OutputTensor], holders: int) -> list[list[OutputTensor]]:
    """Layer groups onto holders by bytes (the planner's own rule), each holder's tensors in model order."""
    groups = group_tensors(outputs)
    count = max(1, min(holders, len(groups)))
    owned = assign([g.nbytes for g in groups], count)
    return [[t for i in indices for t in groups[i].tensors] for indices in owned]


def start_holders(base: Checkpoint | None, experts: list[Checkpoint], outputs: list[OutputTensor],
                  needs_base: bool, dtype: str, holders: int, num_cpus: float) -> tuple[list, list[tuple[str, ...]]]:
    """Start the holder actors (named, so the dashboard shows them); returns them and the names of the
    merged tensors each holds. Their ``load`` reads the inputs."""
    import ray

    remote = ray.remote(TaskVectorHolder)
    run = uuid.uuid4().hex[:6]
    handles, merged = [], []
    for index, tensors in enumerate(split_groups(outputs, holders)):
        handles.append(remote.options(name=f"distmerge-sweep-holder-{index}-{run}", num_cpus=num_cpus,
                                      max_restarts=0, max_concurrency=1).remote(
            base, experts, tensors, needs_base, dtype, max(1, int(num_cpus))))
        merged.append(tuple(t.name for t in tensors if t.merged))
    return handles, merged
