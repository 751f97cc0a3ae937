"""Model stock (Jang et al. 2024) as mergekit 0.1.5 computes it (spec methods-next.md).

Per tensor (flattened; ``filter_wise`` per row, a 1-D tensor as one row): offsets d_i = theta_i - theta_0,
cos = mean over pairs i<j of <d_i, d_j> / max(|d_i| |d_j|, 1e-6) each clamped to [-1, 1], then
t = N cos / (1 + (N - 1) cos) and theta = t * mean_i theta_i + (1 - t) * theta_0. Where |1 + (N-1) cos| < 1e-6
(opposing updates) 0.1.5 keeps the base: t = 0. The arithmetic runs in the inputs' dtype, in 0.1.5's order, so
the same dtype gives mergekit's tensor; the paper has no released code, only this formula.
"""

from __future__ import annotations

from collections.abc import Sequence

from distmerge.deferred import torch

NORM_FLOOR = 1e-6  # 0.1.5's clamp of the norm product
SINGULAR = 1e-6  # |denominator| below this keeps the base


def _as_rows(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    if filter_wise:
        return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor
    return tensor.reshape(-1)


def mean_pairwise_cosine(base: torch.Tensor, experts: Sequence[torch.Tensor],
                         filter_wise: bool = False) -> torch.Tensor:
    """cos of model stock: a 0-d-like [1] tensor (flattened) or one per row [..., 1] (filter_wise)."""
    if len(experts) < 2:
        raise ValueError(f"model_stock needs at least 2 experts besides the base, got {len(experts)}")
    origin = _as_rows(base, filter_wise)
    offsets = [_as_rows(expert, filter_wise) - origin for expert in experts]
    cosines = []
    for i, first in enumerate(offsets):
        for second in offsets[i + 1:]:
            norm_product = torch.norm(first, dim=-1) * torch.norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norm_product.clamp(min=NORM_FLOOR)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def interpolation_ratio(cos_theta: torch.Tensor, count: int) -> torch.Tensor:
    """t = N cos / (1 + (N-1) cos); 0 (the base) where the denominator is singular."""
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


def interpolate(base: torch.Tensor, experts: Sequence[torch.Tensor], ratio: torch.Tensor,
                filter_wise: bool = False) -> torch.Tensor:
    """t * mean_i theta_i + (1 - t) * theta_0 with ``ratio`` from ``interpolation_ratio`` (elementwise in t)."""
    origin = _as_rows(base, filter_wise)
    rows = [_as_rows(expert, filter_wise) for expert in experts]
    average = sum(rows) / len(rows)  # Python's sum: 0 + theta_1 + ..., the order 0.1.5 adds in
    return (ratio * average + (1 - ratio) * origin).reshape(base.shape)


def model_stock(base: torch.Tensor, experts: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """mergekit 0.1.5's ``model_stock`` of one whole tensor."""
    cos_theta = mean_pairwise_cosine(base, experts, filter_wise)
    return interpolate(base, experts, interpolation_ratio(cos_theta, len(experts)), filter_wise)
