"""Exclusive parts E_t = compress(theta_t - theta*), one Ray task per layer group (``lora_extract.run_per_group``).

A 2-D delta becomes its rank-r truncated SVD stored as two factors, US = U_r S_r and V = V_r (never the dense
matrix): exact (``torch.linalg.svd``) or randomized (``torch.svd_lowrank`` with oversampling and power
iterations, the sketch seeded from the task and tensor names, so the factors do not depend on which actor or how
many actors compute them); 1-D deltas are kept whole, as the reference does. A LoRA expert is read as its dense
adapted weights (``io.lora``), so its exclusive part is the SVD of the product delta B @ A * scale - theta*; with
``exclusive.lora: factors`` (``shared_factors`` given) an adapted weight's part is instead the SVD of each factor's
difference from the merged factors, A_t - A* and B_t - B* (``compress_factors``, the reference's generative way).
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
from distmerge.twin.folder import EXCLUSIVE, FACTOR_KINDS, SHARED, LoraShared, Part, part_key


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


def compress_factors(a: torch.Tensor, b: torch.Tensor, shared: LoraShared, options: ExclusiveConfig,
                     seed: int) -> Part:
    """One LoRA-adapted weight's part in LoRA space: the rank-r truncated SVDs of A_t - A* ([r, in]) and
    B_t - B* ([out, r]), each r capped by its factor's smaller side (the reference's per-factor compression)."""
    dtype = torch_dtype(options.dtype)
    factors = {}
    for name, delta, salt in (("a", a.float() - shared.lora_a.float(), 0), ("b", b.float() - shared.lora_b.float(), 1)):
        u, s, v = truncated_svd(delta, options.rank_for(tuple(delta.shape)), options.svd, options.oversample,
                                options.niter, seed ^ salt)
        factors[f"{name}_us"], factors[f"{name}_v"] = (u * s).to(dtype).contiguous(), v.to(dtype).contiguous()
    return Part(shared=shared, **factors)


def merged_factors(experts: list[tuple[str, Checkpoint]], tensor: str, coefficient: float) -> LoraShared:
    """A* = c sum_t A_t, B* = c sum_t B_t (float32) and the scale, of one adapted weight."""
    a_star = b_star = None
    for _, expert in experts:
        a, b = expert.factor_tensors(expert.factors[tensor])
        a_star = a.float() if a_star is None else a_star + a.float()
        b_star = b.float() if b_star is None else b_star + b.float()
    scale = experts[0][1].factors[tensor].scale
    return LoraShared(coefficient * a_star, coefficient * b_star, scale)


def tensor_seed(options: ExclusiveConfig, task: str, tensor: str) -> int:
    return options.seed ^ zlib.crc32(f"{task}::{tensor}".encode())


def check_expert(expert: Checkpoint, shared: Checkpoint, names: list[str]) -> None:
    """Every tensor theta* has, in the expert with the same shape (before any Ray task starts)."""
    check_same_tensors(expert, shared, names, "shared expert")


def compress_group(index: int, names: list[str], shared: Checkpoint, experts: list[tuple[str, Checkpoint]],
                   options: ExclusiveConfig, staging: str, factor_coefficient: float | None = None) -> dict[str, Any]:
    """Every task's exclusive part of one layer group's tensors, written to ``exclusive/group-INDEX.safetensors``
    in the staging folder; the index entry and per-tensor relative errors come back. ``factor_coefficient``:
    ``exclusive.lora: factors`` (every expert a LoRA adapter), the shared lambda the factors were merged with."""
    torch.set_num_threads(1)  # one Ray CPU per task, and one thread count so results do not vary with placement
    stored: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for name in names:
        shared_value = shared.read(name)
        lora = None
        if factor_coefficient is not None and name in experts[0][1].factors:
            lora = merged_factors(experts, name, factor_coefficient)
            stored[part_key(SHARED, name, "lora_a")] = lora.lora_a.contiguous()
            stored[part_key(SHARED, name, "lora_b")] = lora.lora_b.contiguous()
            stored[part_key(SHARED, name, "scale")] = torch.tensor([lora.scale], dtype=torch.float32)
        for task, expert in experts:
            value = expert.read(name)
            if lora is None and torch.equal(value, shared_value):
                continue  # no exclusive part: theta_t = theta* here
            delta = value.float() - shared_value.float()
            seed = tensor_seed(options, task, name)
            if lora is not None:
                a, b = expert.factor_tensors(expert.factors[name])
                part = compress_factors(a, b, lora, options, seed)
                kinds = FACTOR_KINDS
            else:
                part = compress_delta(delta, options, seed)
                kinds = ("delta",) if part.delta is not None else ("us", "v")
            stored.update({part_key(task, name, kind): getattr(part, kind) for kind in kinds})
            if part.rank:
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
