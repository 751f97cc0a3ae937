"""DARE: drop each task-vector element with probability p, rescale the survivors (Yu et al. 2024; spec section 4).

The masks come from a counter-based stream: the flattened tensor is cut into fixed blocks of
``MASK_BLOCK`` elements and block j draws from a generator seeded by (seed, model, tensor name, j). Any
chunking of the work, any number of actors and any placement therefore see the same mask. The generator
always runs on the CPU, so a GPU run draws the same mask too.
"""

from __future__ import annotations

import hashlib

import torch

MASK_BLOCK = 1 << 20


def block_seed(seed: int, model: str, tensor: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{model}\0{tensor}\0{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keep_mask(drop_rate: float, seed: int, model: str, tensor: str, numel: int, start: int, stop: int) -> torch.Tensor:
    """Boolean keep-mask for elements [start, stop) of a tensor with ``numel`` elements (flattened)."""
    if stop <= start:
        return torch.zeros(0, dtype=torch.bool)
    parts = []
    first, last = start // MASK_BLOCK, (stop - 1) // MASK_BLOCK
    for block in range(first, last + 1):
        block_start = block * MASK_BLOCK
        block_len = min(MASK_BLOCK, numel - block_start)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(block_seed(seed, model, tensor, block))
        uniform = torch.rand(block_len, generator=generator)
        lo = max(start, block_start) - block_start
        hi = min(stop, block_start + block_len) - block_start
        parts.append(uniform[lo:hi] >= drop_rate)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def drop_and_rescale(task_vector: torch.Tensor, keep: torch.Tensor, drop_rate: float, rescale: str = "inverse") -> torch.Tensor:
    """delta = tau * keep / (1 - p)  ('inverse', MergeLM), or scaled to tau's L1 norm ('l1', mergekit), or unscaled.

    p = 1 drops everything and rescales nothing (MergeLM's ``mask_input_with_mask_rate``).
    """
    dropped = task_vector * keep.reshape(task_vector.shape).to(task_vector.device, task_vector.dtype)
    if rescale == "none" or drop_rate >= 1.0:
        return dropped
    if rescale == "inverse":
        return dropped / (1.0 - drop_rate)
    if rescale == "l1":
        from distmerge.ops.ties import l1_rescale

        return l1_rescale(dropped, task_vector)
    raise ValueError(f"unknown rescale {rescale!r}")
