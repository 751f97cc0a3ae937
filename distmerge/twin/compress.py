"""Exclusive parts E_t = compress(theta_t - theta*), one Ray task per layer group (``lora_extract.run_per_group``).

A 2-D delta becomes its rank-r truncated SVD stored as two factors, US = U_r S_r and V = V_r (never the dense
matrix): exact (``torch.linalg.svd``) or randomized (``torch.svd_lowrank`` with oversampling and power
iterations, the sketch seeded from the task and tensor names, so the factors do not depend on which actor or how
many actors compute them); 1-D deltas are kept whole, as the reference does. A LoRA expert is read as its dense
adapted weights (``io.lora``), so its exclusive part is the SVD of the product delta B @ A * scale - theta*.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

from distmerge.dtypes import torch_dtype
from distmerge.io.checkpoint import Checkpoint, check_same_tensors
from distmerge.io.writer import write_safetensors
from distmerge.lora_extract import relative_error, truncated_svd
from distmerge.twin.config import ExclusiveConfig
from distmerge.twin.folder import EXCLUSIVE, Part, part_key


def compress_delta(delta: torch.Tensor, options: ExclusiveConfig, seed: int) -> Part:
    """One tensor's exclusive part: rank-r factors of a 2-D delta, the delta itself otherwise (float32 math,
    stored in ``options.dtype``)."""
    dtype = torch_dtype(options.dtype)
    delta = delta.float()
    if delta.dim() != 2:
        return Part(delta=delta.to(dtype))
    u, s, v = truncated_svd(delta, options.rank_for(tuple(delta.shape)), options.svd, options.oversample,
                            options.niter, seed)
    return Part(us=(u * s).to(dtype).contiguous(), v=v.to(dtype).contiguous())


def tensor_seed(options: ExclusiveConfig, task: str, tensor: str) -> int:
    return options.seed ^ zlib.crc32(f"{task}::{tensor}".encode())


def check_expert(expert: Checkpoint, shared: Checkpoint, names: list[str]) -> None:
    """Every tensor theta* has, in the expert with the same shape (before any Ray task starts)."""
    check_same_tensors(expert, shared, names, "shared expert")


def compress_group(index: int, names: list[str], shared: Checkpoint, experts: list[tuple[str, Checkpoint]],
                   options: ExclusiveConfig, staging: str) -> dict[str, Any]:
    """Every task's exclusive part of one layer group's tensors, written to ``exclusive/group-INDEX.safetensors``
    in the staging folder; the index entry and per-tensor relative errors come back."""
    torch.set_num_threads(1)  # one Ray CPU per task, and one thread count so results do not vary with placement
    stored: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for name in names:
        shared_value = shared.read(name)
        for task, expert in experts:
            value = expert.read(name)
            if torch.equal(value, shared_value):
                continue  # no exclusive part: theta_t = theta* here
            delta = value.float() - shared_value.float()
            part = compress_delta(delta, options, tensor_seed(options, task, name))
            if part.delta is not None:
                stored[part_key(task, name, "delta")] = part.delta
            else:
                stored[part_key(task, name, "us")] = part.us
                stored[part_key(task, name, "v")] = part.v
                ranks[f"{task}::{name}"] = part.rank
            errors[f"{task}::{name}"] = relative_error(delta, part.dense())
    shared.close()
    for _, expert in experts:
        expert.close()
    filename = f"group-{index:05d}.safetensors"
    nbytes = 0
    if stored:
        path = Path(staging) / EXCLUSIVE / filename
        write_safetensors(stored, path)
        nbytes = path.stat().st_size
    return {"shard": index, "filename": filename, "tensors": sorted(stored), "bytes": nbytes, "errors": errors,
            "ranks": ranks}
