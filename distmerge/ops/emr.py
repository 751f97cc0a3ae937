"""EMR-Merging: elect, mask, rescale (Huang et al. 2024; spec section 5).

One unified task vector, a boolean mask per task and a scalar rescaler per task. The rescaler is a ratio of
sums over tensors of per-tensor *means* (the reference's quirk: every tensor weighs the same whatever its
size), so the engine accumulates ``sum|x| / numel`` per chunk.
"""

from __future__ import annotations

from distmerge.deferred import torch
from distmerge.ops import emr_fused


def elect(task_vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unified task vector [..], masks [T, ..]) from stacked task vectors [T, ..].

    The sign is +1 where the mean over tasks is > 0 and -1 elsewhere (an exact-zero mean gives -1, as in the
    reference). Only tasks that agree with it contribute their magnitude; exact zeros never agree.
    """
    flag = torch.where(task_vector.mean(dim=0) > 0, 1.0, -1.0).to(task_vector.dtype)
    masks = task_vector * flag > 0
    magnitude = (task_vector.abs() * masks).amax(dim=0)
    return magnitude * flag, masks


def rescaler_sums(task_vector: torch.Tensor, unified: torch.Tensor, masks: torch.Tensor, numel: int) -> torch.Tensor:
    """float64 [2, T]: this chunk's share of A_t = sum_n mean|tau_t,n| and B_t = sum_n mean|M_t,n * tau_uni,n|."""
    return magnitude_sums(task_vector.abs(), (unified.unsqueeze(0) * masks).abs(), numel)


def magnitude_sums(abs_task: torch.Tensor, abs_masked: torch.Tensor, numel: int) -> torch.Tensor:
    """``rescaler_sums`` from |tau_t| and |M_t * tau_uni| [T, ..] (as the compiled election gives them)."""
    count = abs_task.shape[0]
    a = abs_task.reshape(count, -1).sum(dim=1, dtype=torch.float64) / numel
    b = abs_masked.reshape(count, -1).sum(dim=1, dtype=torch.float64) / numel
    return torch.stack([a, b])


def rescalers(sums: torch.Tensor) -> list[float]:
    """lambda_t = A_t / B_t; a task whose masked vector is all zero gets 0."""
    a, b = sums[0], sums[1]
    return [float(x / y) if y > 0 else 0.0 for x, y in zip(a.tolist(), b.tolist())]


def task_model(base: torch.Tensor, unified: torch.Tensor, mask: torch.Tensor, rescaler: float) -> torch.Tensor:
    """theta_t = theta_0 + lambda_t * (M_t * tau_uni)."""
    return base + rescaler * (unified * mask.to(unified.dtype))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean tensor [T, ...] into uint8 [T, ceil(n/8)] (little-endian bit order)."""
    count = mask.shape[0]
    flat = mask.reshape(count, -1).to(torch.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    bits = flat.reshape(count, -1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (bits << shifts).sum(dim=2, dtype=torch.uint8)


def packed_bytes(shape: tuple[int, ...]) -> int:
    """Bytes per task of a packed mask of a tensor of ``shape``."""
    numel = 1
    for size in shape:
        numel *= size
    return (numel + 7) // 8


class MaskPacker:
    """``pack_mask`` of a tensor's mask given row chunk by row chunk, into one buffer of the packed size: the bits
    that do not fill a byte wait for the next chunk, so the result equals packing the whole mask at once. (A
    packed piece kept per chunk until the tensor ended split the heap around the chunks' temporaries: one of two
    EMR workers peaked at 1.2-1.5 GB on the 1.1B family, against 0.3 GB.)"""

    def __init__(self, tasks: int, shape: tuple[int, ...]):
        self.tasks = tasks
        self.out = torch.empty((tasks, packed_bytes(shape)), dtype=torch.uint8)
        self.filled = 0  # bytes per task written
        self.tail = torch.zeros((tasks, 0), dtype=torch.bool)

    def add(self, mask: torch.Tensor) -> None:
        flat = mask.reshape(self.tasks, -1)
        if self.tail.shape[1]:
            flat = torch.cat([self.tail, flat], dim=1)
        whole = flat.shape[1] // 8 * 8
        if whole:
            head = flat[:, :whole]
            self.out[:, self.filled:self.filled + whole // 8] = (emr_fused.pack_mask(head) if emr_fused.available()
                                                                 else pack_mask(head))
            self.filled += whole // 8
        self.tail = flat[:, whole:].clone()  # a copy: a view would hold the whole chunk's mask

    def finish(self) -> torch.Tensor:
        if self.tail.shape[1]:
            self.out[:, self.filled:self.filled + 1] = pack_mask(self.tail)
            self.filled += 1
        if self.filled != self.out.shape[1]:
            raise ValueError(f"masks of {self.filled * 8} elements packed where the tensor has {self.out.shape[1] * 8}")
        return self.out


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_mask for one or more tasks: packed [T, m] -> bool [T, *shape]."""
    count = packed.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    numel = 1
    for size in shape:
        numel *= size
    return bits.reshape(count, -1)[:, :numel].bool().reshape((count,) + tuple(shape))


def task_tensor(backbone: torch.Tensor, unified: torch.Tensor, packed_mask: torch.Tensor, rescaler: float) -> torch.Tensor:
    """One task's tensor from the backbone, the unified vector and that task's row [1, bytes] of the packed masks,
    computed in the vector's dtype and returned in the backbone's (what ``distmerge emr-task`` writes)."""
    mask = unpack_mask(packed_mask, tuple(unified.shape))[0]
    return task_model(backbone.to(unified.dtype), unified, mask, rescaler).to(backbone.dtype)
