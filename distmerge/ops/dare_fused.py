"""DARE followed by task arithmetic as one loop over the inputs and the mask words (numba), bit for bit the
torch path (``methods.generalized``: ``dare.keep_scale`` multipliers, then ``task_vectors.task_arithmetic``);
and task arithmetic and weight average, the same loop with nothing dropped (``weighted_sum``).

The mask words are still numpy's PCG64 stream (``dare.stream_words``): the masks are the same. What the loop
saves is the rest: the float32 multiplier tensor per task, the stacked task vectors and the separate sum,
scale and shift passes. Multiplying by 1.0 (unit weights, lambda 1) and dividing by 1.0 (no normalization)
are exact, so one formulation serves every case. bfloat16 inputs are widened block by block in the loop, as
``ops.ties_fused`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distmerge.deferred import torch
from distmerge.ops.compiled import BLOCK, flat_views, kernels, takes, widens


def _kernels(widen: bool = False):
    """(the loop with masks, without) over float32 inputs, or with ``widen`` over bfloat16 inputs (their bits
    as uint16)."""
    built = kernels(_build)
    return None if built is None else built[widen]


def _build(jit):
    return tuple((_loop(jit, widen, True, True), _loop(jit, widen, False, True), _loop(jit, widen, False, False))
                 for widen in (False, True))


def _loop(jit, widen: bool, masked: bool, based: bool):
    # ``widen``, ``masked`` and ``based``: constants of the closure, as in ``ops.ties_fused`` (without masks
    # ``words``, ``thresholds`` and ``scales`` are not read; without a base, ``base`` and ``lam`` are not, and
    # the experts' weighted sum is the merge: weight average)
    @jit
    def drop_and_sum(base, experts, words, thresholds, scales, weights, divisor, lam, out):
        n = base.shape[0]
        zero = np.float32(0.0)
        acc = np.empty(BLOCK, dtype=np.float32)
        base_wide = np.empty(BLOCK, dtype=np.float32)
        base_bits = base_wide.view(np.uint32)
        expert_wide = np.empty(BLOCK, dtype=np.float32)
        expert_bits = expert_wide.view(np.uint32)
        for block in range((n + BLOCK - 1) // BLOCK):  # range(0, n, BLOCK) compiles to slower loops
            start = block * BLOCK
            size = min(BLOCK, n - start)
            if not based:
                b = base_wide[:size]  # not read
            elif widen:
                raw = base[start:start + size]
                for j in range(size):
                    base_bits[j] = np.uint32(raw[j]) << np.uint32(16)
                b = base_wide[:size]
            else:
                b = base[start:start + size]  # slices: the loops below then vectorize
            o = out[start:start + size]
            acc[:size] = zero  # torch's sum over the stacked dimension starts from +0
            for t in range(len(experts)):
                if widen:
                    raw = experts[t][start:start + size]
                    for j in range(size):
                        expert_bits[j] = np.uint32(raw[j]) << np.uint32(16)
                    e = expert_wide[:size]
                else:
                    e = experts[t][start:start + size]
                weight = weights[t]
                if masked:
                    w = words[t][start:start + size]
                    threshold = thresholds[t]
                    scale = scales[t]
                    for j in range(size):
                        acc[j] += (e[j] - b[j]) * (scale if w[j] >= threshold else zero) * weight
                elif based:
                    for j in range(size):
                        acc[j] += (e[j] - b[j]) * weight  # torch's stacked * weights, then the sum
                else:
                    for j in range(size):
                        acc[j] += e[j] * weight
            if based:
                for j in range(size):
                    o[j] = acc[j] / divisor * lam + b[j]
            else:
                for j in range(size):
                    o[j] = acc[j] / divisor

    return drop_and_sum


def available(*tensors: torch.Tensor, widening: bool = False) -> bool:
    """Whether the loop can take these chunks: float32 (or, ``widening``, all float32 or all bfloat16, widened
    in the loop), on the CPU, contiguous, and numba importable."""
    return takes(*tensors, widening=widening) and _kernels() is not None


def drop_and_sum(base: torch.Tensor, experts: Sequence[torch.Tensor], words: Sequence[np.ndarray],
                 thresholds: Sequence[int], scales: Sequence[float], weights: Sequence[float], lam: float,
                 normalize: bool) -> torch.Tensor:
    """base + lam * sum_t w_t tau_t m_t (divided by sum_t w_t with ``normalize``), m_t = scale_t where the
    task's word >= its threshold, else 0."""
    return _run(0, base, experts, tuple(np.ascontiguousarray(w, dtype=np.uint16) for w in words),
                np.asarray(thresholds, dtype=np.int64), np.asarray(scales, dtype=np.float32), weights, lam,
                normalize)


def weighted_sum(base: torch.Tensor | None, experts: Sequence[torch.Tensor], weights: Sequence[float], lam: float,
                 normalize: bool) -> torch.Tensor:
    """Task arithmetic: base + lam * sum_t w_t tau_t (divided by sum_t w_t with ``normalize``), bit for bit
    ``task_vectors.task_arithmetic`` of the stacked task vectors; without a base, weight average: sum_t w_t
    theta_t (divided likewise; ``lam`` unused), bit for bit ``task_vectors.weight_average``. Bit for bit up to
    ``compiled.ORDERED_SUM_TASKS`` tasks, as every loop here (torch reorders larger sums)."""
    return _run(1 if base is not None else 2, base if base is not None else experts[0], experts, (),
                np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), weights, lam, normalize)


def _run(which: int, base, experts, words, thresholds, scales, weights, lam, normalize) -> torch.Tensor:
    divisor = 1.0
    if normalize:
        divisor = float(sum(weights))
        if abs(divisor) < 1e-8:  # task_arithmetic's guard
            divisor = 1.0
    out = torch.empty(base.shape, dtype=torch.float32)
    _kernels(widens(base))[which](*flat_views(base, experts), words, thresholds, scales,
                                  np.asarray(weights, dtype=np.float32), np.float32(divisor), np.float32(lam),
                                  out.reshape(-1).numpy())
    return out
