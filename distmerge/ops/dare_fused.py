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
                 for widen in (False, True)) + ((_rounding_loop(jit, True), _rounding_loop(jit, False)),)


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


def _rounding_loop(jit, based: bool):
    # bfloat16 compute: torch's CPU kernels compute each bfloat16 operation in float32 and round its result to
    # bfloat16 (nearest, ties to even); its sum over the stacked dimension adds in float32 and rounds once. The
    # loop does the same operations in the same order on float32 values, each rounded where torch rounds.
    @jit
    def rounded_sum(base, experts, weights, divisor, lam, out):
        def bfloat16(x):
            # c10::BFloat16's round to nearest even, as a float32 value; a NaN stays a (quiet) NaN instead of
            # carrying into the sign. (Defined in here: a helper held by the closure makes the cache miss.)
            u = np.float32(x).view(np.uint32)
            rounded = np.uint32((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                                & np.uint32(0xFFFF0000))
            nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            return np.uint32(np.uint32(0x7FC00000) if nan else rounded).view(np.float32)

        n = out.shape[0]
        tasks = len(experts)
        zero = np.float32(0.0)
        base_wide = np.zeros(BLOCK, dtype=np.float32)  # stays 0 without a base
        base_bits = base_wide.view(np.uint32)
        wide = np.empty((tasks, BLOCK), dtype=np.float32)
        wide_bits = wide.view(np.uint32)
        plain = divisor == np.float32(1.0) and (lam == np.float32(1.0) or not based)
        for t in range(tasks):
            plain = plain and weights[t] == np.float32(1.0)
        for block in range((n + BLOCK - 1) // BLOCK):
            start = block * BLOCK
            size = min(BLOCK, n - start)
            if based:
                raw = base[start:start + size]
                for j in range(size):
                    base_bits[j] = np.uint32(raw[j]) << np.uint32(16)
            for t in range(tasks):
                raw = experts[t][start:start + size]
                row = wide_bits[t]
                for j in range(size):
                    row[j] = np.uint32(raw[j]) << np.uint32(16)
            o = out[start:start + size]
            if plain:  # unit weights, no division, lambda 1: those roundings are of bfloat16 values, exact
                for j in range(size):
                    bj = base_wide[j]
                    total = zero
                    for t in range(tasks):
                        total += bfloat16(wide[t, j] - bj) if based else wide[t, j]
                    merged = bfloat16(bfloat16(total) + bj) if based else bfloat16(total)
                    o[j] = np.uint16(np.float32(merged).view(np.uint32) >> np.uint32(16))
                continue
            for j in range(size):
                bj = base_wide[j]
                total = zero  # the stacked sum: float32 from +0, one rounding at its end
                for t in range(tasks):
                    x = wide[t, j]
                    if based:
                        x = bfloat16(x - bj)  # the task vector, a bfloat16 tensor
                    total += bfloat16(x * weights[t])  # the weights are bfloat16 values already
                merged = bfloat16(bfloat16(total) / divisor)
                if based:
                    merged = bfloat16(bfloat16(merged * lam) + bj)
                o[j] = np.uint16(np.float32(merged).view(np.uint32) >> np.uint32(16))

    return rounded_sum


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


def rounds_bfloat16(*tensors: torch.Tensor) -> bool:
    """Whether ``rounded_sum`` can take these chunks: all bfloat16 on the CPU, contiguous, numba importable."""
    return bool(tensors) and tensors[0].dtype == torch.bfloat16 and available(*tensors, widening=True)


def rounded_sum(base: torch.Tensor | None, experts: Sequence[torch.Tensor], weights: Sequence[float], lam: float,
                normalize: bool) -> torch.Tensor:
    """``weighted_sum`` computed in bfloat16 as torch computes on bfloat16 tensors (each operation rounded to
    bfloat16, the stacked sum added in float32 and rounded once): bit for bit ``task_arithmetic`` (without a
    base, ``weight_average``) of bfloat16 inputs up to ``compiled.ORDERED_SUM_TASKS`` tasks, where torch's own
    bfloat16 sum over the stacked dimension runs at a fraction of a float32 one. Returns bfloat16."""
    reference = base if base is not None else experts[0]
    out = torch.empty(reference.shape, dtype=torch.bfloat16)
    # torch's weights tensor takes the inputs' dtype: each weight is rounded to bfloat16 first
    rounded = torch.tensor([float(w) for w in weights], dtype=torch.bfloat16).float().numpy()
    kernels(_build)[2][0 if base is not None else 1](*flat_views(reference, experts), rounded,
                                                     np.float32(_divisor(weights, normalize)), np.float32(lam),
                                                     out.reshape(-1).view(torch.int16).numpy().view(np.uint16))
    return out


def _divisor(weights: Sequence[float], normalize: bool) -> float:
    if not normalize:
        return 1.0
    divisor = float(sum(weights))
    return 1.0 if abs(divisor) < 1e-8 else divisor  # task_arithmetic's guard


def _run(which: int, base, experts, words, thresholds, scales, weights, lam, normalize) -> torch.Tensor:
    divisor = _divisor(weights, normalize)
    out = torch.empty(base.shape, dtype=torch.float32)
    _kernels(widens(base))[which](*flat_views(base, experts), words, thresholds, scales,
                                  np.asarray(weights, dtype=np.float32), np.float32(divisor), np.float32(lam),
                                  out.reshape(-1).numpy())
    return out
