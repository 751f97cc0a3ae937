"""EMR's election and mask packing as single loops over the inputs (numba), bit for bit ``ops.emr``.

``ops.emr.elect`` is a dozen full-size tensor operations (a mean, a ``where``, boolean masks, an ``amax``) and
``pack_mask`` three more over uint8 tensors; on a CPU they cost about 18 and 10 ns per element, against about
1 for reading the inputs. The loops here elect in one pass and pack eight mask bits per byte directly.

Same bits as ``ops.emr``: the mean is (0 + tau_1 + ... + tau_T) / T in float32, as torch's mean over the stacked
dimension of up to ``compiled.ORDERED_SUM_TASKS`` tasks (the method takes the loop for no more); the rescaler
sums stay torch's float64 reductions, over the very tensors the torch path builds (|tau_t| and |M_t * tau_uni|),
so their order of summation is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distmerge.deferred import torch
from distmerge.ops.compiled import BLOCK, flat_views, kernels, takes


def _kernels():
    return kernels(_build)


def _build(jit):
    @jit
    def elect(base, experts, unified, masks, abs_task, abs_masked):
        """unified[i], masks[t, i] (0/1); with ``abs_task`` of size > 0 also |tau_t| and |M_t * tau_uni|."""
        n = base.shape[0]
        tasks = len(experts)
        sums = abs_task.shape[1] > 0
        zero = np.float32(0.0)
        one = np.float32(1.0)
        count = np.float32(tasks)
        total = np.empty(BLOCK, dtype=np.float32)
        flag = np.empty(BLOCK, dtype=np.float32)
        magnitude = np.empty(BLOCK, dtype=np.float32)
        for block in range((n + BLOCK - 1) // BLOCK):  # range(0, n, BLOCK) compiles to slower loops
            start = block * BLOCK
            size = min(BLOCK, n - start)
            b = base[start:start + size]  # slices: the loops below then vectorize
            u = unified[start:start + size]
            total[:size] = zero
            magnitude[:size] = zero
            for t in range(tasks):
                e = experts[t][start:start + size]
                for j in range(size):
                    total[j] += e[j] - b[j]
            for j in range(size):
                flag[j] = one if total[j] / count > zero else -one
            for t in range(tasks):
                e = experts[t][start:start + size]
                m = masks[t, start:start + size]
                for j in range(size):
                    x = e[j] - b[j]
                    agrees = x * flag[j] > zero
                    m[j] = agrees
                    magnitude[j] = max(magnitude[j], abs(x) if agrees else zero)
                if sums:
                    a = abs_task[t, start:start + size]
                    for j in range(size):
                        a[j] = abs(e[j] - b[j])
            for j in range(size):
                u[j] = magnitude[j] * flag[j]
            if sums:
                for t in range(tasks):
                    m = masks[t, start:start + size]
                    c = abs_masked[t, start:start + size]
                    for j in range(size):
                        c[j] = abs(u[j]) if m[j] else zero

    @jit
    def pack(bits, out):
        """out[t, k] = sum_s bits[t, 8k + s] << s, bits [T, 8m] of 0/1."""
        for t in range(bits.shape[0]):
            row = bits[t]
            packed = out[t]
            for k in range(out.shape[1]):
                byte = np.uint8(0)
                for s in range(8):
                    byte |= np.uint8(row[8 * k + s] << s)
                packed[k] = byte

    return elect, pack


def available(*tensors: torch.Tensor) -> bool:
    """Whether the loops can take these chunks: float32, on the CPU, contiguous, and numba importable."""
    return takes(*tensors) and _kernels() is not None


def elect(base: torch.Tensor, experts: Sequence[torch.Tensor], with_sums: bool = False):
    """``ops.emr.elect(task_vectors(base, experts))``: (unified, masks as bool [T, ...]); with ``with_sums``
    also |tau| [T, ...] and |masks * unified| [T, ...], the tensors ``ops.emr.rescaler_sums`` reduces."""
    count, shape = len(experts), tuple(base.shape)
    n = base.numel()
    unified = torch.empty(shape, dtype=torch.float32)
    masks = torch.empty((count,) + shape, dtype=torch.bool)
    size = n if with_sums else 0
    abs_task = torch.empty((count, size), dtype=torch.float32)
    abs_masked = torch.empty((count, size), dtype=torch.float32)
    _kernels()[0](*flat_views(base, experts), unified.reshape(-1).numpy(), masks.reshape(count, -1).numpy().view(np.uint8),
                  abs_task.numpy(), abs_masked.numpy())
    if not with_sums:
        return unified, masks
    return unified, masks, abs_task.reshape((count,) + shape), abs_masked.reshape((count,) + shape)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``ops.emr.pack_mask`` of a bool [T, ...] mask whose per-task size is a multiple of 8."""
    count = mask.shape[0]
    flat = mask.reshape(count, -1)
    if flat.shape[1] % 8:
        raise ValueError(f"{flat.shape[1]} mask bits per task: a multiple of 8 is packed here")
    out = torch.empty((count, flat.shape[1] // 8), dtype=torch.uint8)
    _kernels()[1](flat.contiguous().numpy().view(np.uint8), out.numpy())
    return out
