"""DARE followed by task arithmetic as one loop over the inputs and the mask words (numba), bit for bit the
torch path (``methods.generalized``: ``dare.keep_scale`` multipliers, then ``task_vectors.task_arithmetic``).

The mask words are still numpy's PCG64 stream (``dare.stream_words``): the masks are the same. What the loop
saves is the rest: the float32 multiplier tensor per task, the stacked task vectors and the separate sum,
scale and shift passes. Multiplying by 1.0 (unit weights, lambda 1) and dividing by 1.0 (no normalization)
are exact, so one formulation serves every case.
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
    def drop_and_sum(base, experts, words, thresholds, scales, weights, divisor, lam, out):
        n = base.shape[0]
        zero = np.float32(0.0)
        acc = np.empty(BLOCK, dtype=np.float32)
        for block in range((n + BLOCK - 1) // BLOCK):  # range(0, n, BLOCK) compiles to slower loops
            start = block * BLOCK
            size = min(BLOCK, n - start)
            b = base[start:start + size]  # slices: the loops below then vectorize
            o = out[start:start + size]
            acc[:size] = zero  # torch's sum over the stacked dimension starts from +0
            for t in range(len(experts)):
                e = experts[t][start:start + size]
                w = words[t][start:start + size]
                threshold = thresholds[t]
                scale = scales[t]
                weight = weights[t]
                for j in range(size):
                    acc[j] += (e[j] - b[j]) * (scale if w[j] >= threshold else zero) * weight
            for j in range(size):
                o[j] = acc[j] / divisor * lam + b[j]

    return (drop_and_sum,)


def available(*tensors: torch.Tensor) -> bool:
    return takes(*tensors) and _kernels() is not None


def drop_and_sum(base: torch.Tensor, experts: Sequence[torch.Tensor], words: Sequence[np.ndarray],
                 thresholds: Sequence[int], scales: Sequence[float], weights: Sequence[float], lam: float,
                 normalize: bool) -> torch.Tensor:
    """base + lam * sum_t w_t tau_t m_t (divided by sum_t w_t with ``normalize``), m_t = scale_t where the
    task's word >= its threshold, else 0."""
    divisor = 1.0
    if normalize:
        divisor = float(sum(weights))
        if abs(divisor) < 1e-8:  # task_arithmetic's guard
            divisor = 1.0
    out = torch.empty(base.shape, dtype=torch.float32)
    _kernels()[0](*flat_views(base, experts), tuple(np.ascontiguousarray(w, dtype=np.uint16) for w in words),
                  np.asarray(thresholds, dtype=np.int64), np.asarray(scales, dtype=np.float32),
                  np.asarray(weights, dtype=np.float32), np.float32(divisor), np.float32(lam), out.reshape(-1).numpy())
    return out
