"""The merge worker: reads its layer groups from every input, merges them chunk by chunk, writes its shards.

Plain Python class; ``distmerge.engine.driver`` wraps it as a Ray actor. The method protocol (passes, merge,
artifacts, deferred decisions) is ``distmerge.methods.execute``'s; this class gives it the lazy checkpoint
reader and the streaming shard writers. It holds the input chunks of one tensor (and, for a method with
artifacts, what its stream keeps of that tensor), never a shard or the model: tensors go from disk to the
shard files directly.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmerge import dtypes, telemetry
from distmerge.deferred import torch
from distmerge.engine import faults, parking
from distmerge.engine.allocator import keep_freed_memory, rss_anon_bytes
from distmerge.errors import DistmergeError, InputError, OutputError, where
from distmerge.io import vocab
from distmerge.io.checkpoint import Checkpoint
from distmerge.engine.resume import file_sha256
from distmerge.io.writer import ShardWriter, write_safetensors
from distmerge.methods import execute
from distmerge.methods.base import MergeMethod
from distmerge.methods.execute import add_partials, check_finite_output, converted, is_finite, patch_key, row_chunks  # noqa: F401
from distmerge.plan import MergePlan
from distmerge.tensors import OutputTensor, TensorSource


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
    lease: parking.LeaseSpec | None = None  # a detached worker's (see engine.parking)


class MergeWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.dtype = dtypes.torch_dtype(spec.dtype)
        self.device = torch.device(spec.device)
        torch.set_num_threads(max(1, spec.num_threads))
        keep_freed_memory()
        self.needs_base = spec.method.needs_base
        widening = widening_method(spec.method, self.dtype, self.device)
        self.method = widening or spec.method
        self.keeps_bfloat16 = widening is not None
        self.writer: ShardWriter | None = None  # the shard being merged, streamed to its file
        self.writer_shard: int | None = None
        self.artifact_writer: ShardWriter | None = None  # the method's artifacts of that shard, streamed beside it
        self.timings = {"read": 0.0, "merge": 0.0, "write": 0.0}
        self.bytes_read = 0
        self.groups_merged = 0
        self.failed_shard: int | None = None
        self.failure: BaseException | None = None  # what failed it: its finish_shard raises the same
        self.peak_anon = rss_anon_bytes()
        self.exit_after = faults.worker_exit_after(spec.faults, spec.worker_index, spec.incarnation)
        self._reconciled: dict[tuple[str, str], torch.Tensor] = {}
        # Deferred decisions of the shard being merged: its share of the model-wide vote and the elements to
        # rewrite should the method say so once every shard is in; written beside the shard.
        self.deferred = execute.DeferredLog()
        # Undecided elements of that shard with their inputs, for the driver to merge once every shard is in.
        self.undecided = execute.UndecidedLog()
        # The shard's merge partials by layer group (``ChunkResult.partial``), summed per group as a pass sums
        # them, and sent with the shard's result (JSON: its manifest record keeps them for a resume).
        self.partials: dict[int, dict[str, Any]] = {}
        # What a reduction pass keeps for the next one (a pass's layer groups come back to the same worker);
        # dropped when the merge starts.
        self.memo = execute.PassMemo()
        if getattr(self, "lease", None) is None:  # a reset keeps the lease of the set's first merge
            self.lease = parking.Lease(spec.lease) if spec.lease is not None else None

    def reset(self, spec: WorkerSpec) -> bool:
        """Start over for another merge (a warm worker, see ``engine.pool``): nothing of the last one is kept."""
        self.__init__(spec)
        return True

    def claim(self, job_id: str):
        """Take this parked worker for ``job_id``'s merge: its set's placement group, or None (not parked, taken)."""
        return self.lease.group if self.lease is not None and self.lease.claim(job_id) else None

    def park(self, seconds: float) -> bool:
        """Wait ``seconds`` for the next merge's claim, then end the set."""
        if self.lease is None:
            return False
        self.lease.park(seconds)
        return True

    # --- reading --------------------------------------------------------------------------------
    def _read(self, model: Checkpoint, source: TensorSource, start: int | None, stop: int | None,
              check: bool = True) -> torch.Tensor:
        """The rows in the dtype the method takes, checked finite (``check``: a pass that looks at a sample of
        them leaves that to the merge, which reads every value)."""
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
        kept = self.keeps_bfloat16 and value.dtype == torch.bfloat16
        if check:
            value, finite = converted(value, self.device, torch.bfloat16 if kept else self.dtype)
            check_finite(model, source.tensor, value, finite)
        elif not kept:
            value = value.to(self.device, self.dtype)
        self.timings["read"] += time.perf_counter() - began
        return value


    def _inputs(self, tensor: OutputTensor, start, stop, check: bool = True
                ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        spec = self.spec
        base = (self._read(spec.base, tensor.base, start, stop, check)
                if (spec.base is not None and self.needs_base) else None)
        experts = [self._read(m, s, start, stop, check) for m, s in zip(spec.experts, tensor.experts)]
        if self.keeps_bfloat16 and len({t.dtype for t in (base, *experts) if t is not None}) > 1:
            # inputs stored in different dtypes: the loops take one, so all come in the compute dtype
            base = base.to(self.dtype) if base is not None else None
            experts = [e.to(self.dtype) for e in experts]
        return base, experts

    def _groups(self, shard_index: int, group_index: int | None = None):
        shard = self.spec.plan.shards[shard_index]
        return shard.groups if group_index is None else (shard.groups[group_index],)

    # --- reduction passes -----------------------------------------------------------------------
    def run_pass(self, pass_name: str, state: dict, shard_index: int, group_index: int) -> dict[str, Any]:
        """This group's summable partial of a reduction pass (histograms, sums) and the input bytes read for it
        (less than the group's inputs where the memo answered)."""
        bytes_before = self.bytes_read
        totals = None
        read = functools.partial(self._inputs, check=not self.method.samples(pass_name))
        for group in self._groups(shard_index, group_index):
            read_before = self.timings["read"]
            began = time.perf_counter()
            for tensor in (t for t in group.tensors if t.merged):  # the reconciled vocabulary rows go with it
                part = execute.pass_partial(self.method, pass_name, state, [tensor], read, memo=self.memo)
                if part is not None:
                    totals = add_partials(totals, part)
                self._reconciled.clear()
            self.timings["merge"] += time.perf_counter() - began - (self.timings["read"] - read_before)
        self._sample_memory()
        return {"partial": totals, "bytes_read": self.bytes_read - bytes_before}

    # --- merging --------------------------------------------------------------------------------
    def merge_group(self, state: dict, shard_index: int, group_index: int) -> dict[str, Any]:
        try:
            return self._merge_group(state, shard_index, group_index)
        except BaseException as exc:
            self.failed_shard, self.failure = shard_index, exc  # its finish_shard must not write what is there
            raise

    def _merge_group(self, state: dict, shard_index: int, group_index: int) -> dict[str, Any]:
        self.memo.clear()
        writer = self._shard_writer(shard_index)
        groups = self._groups(shard_index, group_index)
        indices = [group_index] if group_index is not None else range(len(groups))
        for index, group in zip(indices, groups):
            totals = None
            for tensor in group.tensors:
                if tensor.merged:
                    part = self._merge_tensor(tensor, state, writer)
                    if part is not None:
                        totals = add_partials(totals, part)
                else:
                    self._copy_tensor(tensor, writer)
                self._reconciled.clear()
            if totals is not None:
                self.partials[index] = totals
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
            self.partials = {}
            self.artifact_writer = self._artifact_writer(shard)
        return self.writer

    def _artifact_writer(self, shard) -> ShardWriter | None:
        """The method's artifact file of this shard (``<folder>/<folder>-0000k-of-N.safetensors``), if any."""
        if self.artifact_writer is not None:
            self.artifact_writer.abort()
        folder = self.spec.method.artifact_folder
        entries = execute.artifact_entries(self.spec.method, shard.tensors, self.dtype)
        if not folder or not entries:
            return None
        name = shard.filename.replace("model-", f"{folder}-")
        return ShardWriter(Path(self.spec.staging) / folder / name, entries)

    def _copy_tensor(self, tensor: OutputTensor, writer: ShardWriter) -> None:
        """An unmerged tensor (excluded, or not floating point): the base's value (the first model's without one)."""
        spec = self.spec
        model, source = (spec.base, tensor.base) if spec.base is not None else (spec.experts[0], tensor.experts[0])
        for start, stop in row_chunks(tensor, True):
            value = self._read(model, source, start, stop).to("cpu", dtypes.torch_dtype(tensor.out_dtype))
            began = time.perf_counter()
            writer.write(tensor.name, value)
            self.timings["write"] += time.perf_counter() - began

    def _merge_tensor(self, tensor: OutputTensor, state: dict, writer: ShardWriter) -> dict[str, Any] | None:
        read_before, write_before = self.timings["read"], self.timings["write"]
        began = time.perf_counter()
        sink = _TimedSink(writer, self.artifact_writer, self.timings)
        part = execute.merge_tensor(self.method, tensor, state, self._inputs, sink, self.deferred, self.dtype,
                                    undecided=self.undecided)
        spent = time.perf_counter() - began
        self.timings["merge"] += spent - (self.timings["read"] - read_before) - (self.timings["write"] - write_before)
        return part

    def finish_shard(self, shard_index: int) -> dict[str, Any]:
        """Write the shard (and its artifacts, and its deferred patches) atomically inside the staging folder."""
        shard = self.spec.plan.shards[shard_index]
        writer, self.writer, self.writer_shard = self.writer, None, None
        artifacts, self.artifact_writer = self.artifact_writer, None
        deferred, self.deferred = self.deferred, self.deferred.next()
        undecided, self.undecided = self.undecided, execute.UndecidedLog()
        partials, self.partials = self.partials, {}
        if self.failed_shard == shard_index or writer is None or writer.path.name != shard.filename \
                or not writer.complete or (artifacts is not None and not artifacts.complete):
            for open_writer in (writer, artifacts):
                if open_writer is not None:
                    open_writer.abort()
            # The driver can hear of this call's failure before the merge call's (CI saw it): a user error
            # must read the same whichever of the two it sees first.
            if self.failed_shard == shard_index and isinstance(self.failure, DistmergeError):
                raise self.failure
            raise RuntimeError(f"shard {shard.filename} is incomplete on this worker; not written")
        staging = Path(self.spec.staging)
        began = time.perf_counter()
        files = [{"name": shard.filename, **writer.close()}]
        written = {t.name: list(t.shape) for t in shard.tensors}
        nbytes = writer.data_bytes
        artifact = None
        if artifacts is not None:
            files.append({"name": str(artifacts.path.relative_to(staging)), **artifacts.close()})
            artifact = {"shard": shard_index, "filename": artifacts.path.name, "tensors": list(artifacts.order),
                        "bytes": artifacts.data_bytes}
        patches = None
        if deferred.patches:
            patches = f".patches/{shard.filename}"
            tensors = {}
            for assumed in deferred.patches:
                for tensor, (index, value) in deferred.joined(assumed).items():
                    tensors[patch_key(tensor, "index", assumed)] = index
                    tensors[patch_key(tensor, "value", assumed)] = value
            files.append(self._write(tensors, staging / patches))
        pending = None
        if undecided.entries:
            pending = f".undecided/{shard.filename}"
            files.append(self._write(undecided.tensors(), staging / pending))
        result = {"shard": shard_index, "filename": shard.filename, "tensors": written, "bytes": nbytes,
                  "artifacts": artifact, "deferred_vote": deferred.vote, "patches": patches,
                  "deferred_counts": {str(assumed): count for assumed, count in deferred.counts.items()},
                  "undecided": pending, "files": files,
                  "partials": {str(g): execute.partial_to_json(p) for g, p in sorted(partials.items())},
                  "node": _node_id()}
        self.timings["write"] += time.perf_counter() - began
        self._sample_memory()
        return result

    def _write(self, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
        """A small whole file beside a shard (deferred patches, undecided elements)."""
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


def widening_method(method: MergeMethod, dtype: torch.dtype, device: torch.device) -> MergeMethod | None:
    """The copy of ``method`` a worker hands bfloat16 inputs as read (its loops widen them: no float32 copy of
    every chunk), or None: only a float32 merge on the CPU, and only a method that can."""
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        return None
    return method.with_bfloat16_inputs()


def check_finite(model, tensor: str, value, finite: bool | None = None) -> None:
    """NaN/Inf in an input is an error naming the model, file and tensor (``finite``: already known)."""
    if not (is_finite(value) if finite is None else finite):
        raise InputError(f"{where(model=model.name, file=model.info(tensor).file, tensor=tensor)}: contains NaN or Inf")


def peak_rss_bytes() -> int:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return 0


class _TimedSink(execute.WriterSink):
    """The shard's writers, with the time spent writing counted as the worker's write time."""

    def __init__(self, writer, artifact_writer, timings):
        super().__init__(writer, artifact_writer)
        self.timings = timings

    def weights(self, tensor, offset, values):
        began = time.perf_counter()
        super().weights(tensor, offset, values)
        self.timings["write"] += time.perf_counter() - began

    def artifact(self, key, values):
        began = time.perf_counter()
        super().artifact(key, values)
        self.timings["write"] += time.perf_counter() - began
