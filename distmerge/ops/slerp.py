"""SLERP and NuSLERP as mergekit 0.1.5 computes them (spec methods-next.md).

0.1.5's ``slerp`` is torch, not numpy: per tensor (flattened), float32 unless the inputs are float64; norms at
most eps = 1e-8 count as 1; cos = <a/|a|, b/|b|> clamped to [-1, 1]; |cos| > 0.9995 (``DOT_THRESHOLD``) falls back
to linear interpolation; else sin((1-t)W)/sin W * a + sin(tW)/sin W * b on the unnormalized tensors, written
back in the inputs' dtype. It sums norms and dots over chunks of 2**20 elements (a norm of chunk norms), and so
do we, so that a tensor merged alone gives 0.1.5's bits.

0.1.5's ``nuslerp`` runs in the inputs' dtype, normalizes along the last axis (``row_wise`` along the first,
``flatten`` over the whole tensor: the default), treats 1 - cos**2 <= 1e-16 as collinear (lerp), and with a
base slerps the task vectors and adds the base back; t = w_2 / (w_1 + w_2), 0.5 for a zero weight sum.
"""

from __future__ import annotations

from collections.abc import Sequence

from distmerge.deferred import torch

DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
CHUNK_ELEMENTS = 1 << 20  # 0.1.5's scratch bound; a one-tensor batch uses chunks of this many elements
NUSLERP_EPS = 1e-8
NORMALIZE_FLOOR = 1e-7  # nuslerp's clamp of a row norm
ZERO_WEIGHTS = 1e-6


def slerp_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _chunks(row: torch.Tensor, dtype: torch.dtype):
    for start in range(0, row.shape[1], CHUNK_ELEMENTS):
        yield row[:, start:start + CHUNK_ELEMENTS].to(dtype)


def _chunked_norm(row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    parts = [torch.linalg.vector_norm(chunk, dim=1, keepdim=True) for chunk in _chunks(row, dtype)]
    return torch.linalg.vector_norm(torch.stack(parts), dim=0)


def slerp_cosine(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """cos W between two tensors ([1, 1], compute dtype): normalized first, so a huge tensor cannot overflow the dot.

    The tensors are one row [1, n] and every reduction is 0.1.5's call on it, so the rounding is 0.1.5's.
    """
    dtype = slerp_dtype(v0)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    norm_a = _chunked_norm(a, dtype)
    norm_b = _chunked_norm(b, dtype)
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, 1)
    parts = [((x / norm_a) * (y / norm_b)).sum(dim=1, keepdim=True)
             for x, y in zip(_chunks(a, dtype), _chunks(b, dtype))]
    return torch.stack(parts).sum(dim=0).clamp(-1, 1)


def slerp_coefficients(t: float, cosine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_a, c_b) with theta = c_a * v0 + c_b * v1; (1 - t, t) where the tensors are (anti)collinear."""
    t = torch.tensor(t, dtype=cosine.dtype, device=cosine.device)
    linear = cosine.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, cosine))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return coef_a, coef_b


def combine(v0: torch.Tensor, v1: torch.Tensor, coef_a: torch.Tensor, coef_b: torch.Tensor) -> torch.Tensor:
    """c_a * v0 + c_b * v1 in the coefficients' dtype, returned in v0's dtype (elementwise: any chunk)."""
    merged = coef_a * v0.reshape(1, -1).to(coef_a.dtype) + coef_b * v1.reshape(1, -1).to(coef_a.dtype)
    return merged.to(v0.dtype).reshape(v0.shape)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's slerp of one whole tensor; v0 is the t = 0 endpoint (the base model)."""
    if v0.numel() == 0:
        return v0.clone()
    coef_a, coef_b = slerp_coefficients(t, slerp_cosine(v0, v1))
    return combine(v0, v1, coef_a, coef_b)


# --- NuSLERP -----------------------------------------------------------------------------------------------


def nuslerp_t(weights: Sequence[float]) -> float:
    """t = w_2 / (w_1 + w_2); 0.5 when the weights cancel."""
    if len(weights) != 2:
        raise ValueError(f"nuslerp takes exactly 2 weights, got {len(weights)}")
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < ZERO_WEIGHTS else weights[1] / total


def _unit_rows(values: torch.Tensor) -> torch.Tensor:
    return values / torch.norm(values, dim=-1, keepdim=True).clamp(min=NORMALIZE_FLOOR)


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False,
                 flatten: bool = True) -> torch.Tensor:
    """0.1.5's ``nuslerp(t, v0, v1)``: slerp of rows along the last axis (first with row_wise, all with flatten)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos_theta = torch.sum(_unit_rows(v0) * _unit_rows(v1), dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos_theta.square()) <= NUSLERP_EPS ** 2
    theta = torch.acos(torch.where(collinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(experts: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
            row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """mergekit 0.1.5's ``nuslerp`` merge of two experts, of their task vectors when a base is given."""
    if len(experts) != 2:
        raise ValueError(f"nuslerp merges exactly 2 models besides the base, got {len(experts)}")
    t = nuslerp_t(weights)
    if base is None:
        return nuslerp_pair(t, experts[0], experts[1], row_wise, flatten)
    return base + nuslerp_pair(t, experts[0] - base, experts[1] - base, row_wise, flatten)
