"""Task vectors and the linear merges built on them (weight average, task arithmetic)."""

from __future__ import annotations

from collections.abc import Sequence

from distmerge.deferred import torch


def task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """tau_t = theta_t - theta_0, stacked as [T, ...] (a fresh tensor: callers may work on it in place)."""
    first = experts[0]
    if any(e.shape != base.shape or e.dtype != first.dtype or e.device != first.device for e in experts):
        return torch.stack([expert - base for expert in experts])
    # each difference written into its row: the same values as stacking them, without a second full copy
    stacked = torch.empty((len(experts),) + tuple(base.shape), dtype=torch.result_type(first, base),
                          device=first.device)
    for row, expert in zip(stacked, experts):
        torch.sub(expert, base, out=row)
    return stacked


def broadcast_weights(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model weights shaped [T, 1, ..., 1] to multiply a stacked [T, ...] tensor."""
    w = torch.tensor(list(weights), dtype=like.dtype, device=like.device)
    return w.reshape((len(weights),) + (1,) * (like.dim() - 1))


def weighted_sum(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    if all(float(w) == 1.0 for w in weights):  # x * 1.0 is x exactly: skip a full pass and its copy
        return stacked.sum(dim=0)
    return (stacked * broadcast_weights(weights, stacked)).sum(dim=0)


def weight_average(experts: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """theta = sum_t w_t theta_t / sum_t w_t (MergeLM's average_merging when all w_t = 1; mergekit's linear)."""
    merged = weighted_sum(torch.stack(list(experts)), weights)
    if normalize:
        total = float(sum(weights))
        if abs(total) < 1e-8:  # mergekit's guard: a zero weight sum is left undivided
            total = 1.0
        merged = merged / total
    return merged


def task_arithmetic(
    base: torch.Tensor, task_vector: torch.Tensor, weights: Sequence[float], lam: float, normalize: bool = False
) -> torch.Tensor:
    """theta = theta_0 + lambda * sum_t w_t tau_t  (optionally divided by sum_t w_t, as mergekit's normalize)."""
    merged = weighted_sum(task_vector, weights)
    if normalize:
        total = float(sum(weights))
        if abs(total) < 1e-8:
            total = 1.0
        merged = merged / total
    # merged is this function's own tensor: scale and shift it in place (the same roundings as base + lam * merged)
    if float(lam) != 1.0:
        merged.mul_(lam)
    return merged.add_(base) if merged.dtype == torch.result_type(merged, base) else base + merged
