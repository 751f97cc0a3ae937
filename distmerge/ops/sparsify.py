"""Sparsifiers of the next methods: Breadcrumbs' outlier mask and DELLA's rank-based random mask (spec methods-next.md).

Both come in two dialects where they differ:

* ``mergekit``: ``mergekit.sparsify`` of mergekit 0.1.5, element for element where no randomness is involved
  (``mergekit_outlier_mask``: the same ``torch.sort`` call, so ties at the cuts fall the same way with the same
  torch on the same device).
* ``native``: the papers' intent, with ties broken by a stable sort (lower flat index ranks lower), so the mask is
  the same on any device and under any chunking.

DELLA's Bernoulli draw never uses a global generator: element i of a tensor is kept iff the i-th 16-bit word of
distmerge's counter-based stream (``dare.stream_words``) is >= round((1 - p_i) * 2**16). With a constant p that
is DARE's mask for drop rate 1 - p, bit for bit. mergekit's masks come from ``torch.bernoulli`` and cannot be
reproduced; only their distribution is the same.
"""

from __future__ import annotations

import numpy as np
import torch

from distmerge.ops import dare
from distmerge.ops.ties import l1_rescale

WORD_RANGE = 65536.0  # 2**16 values of one stream word


# --- Breadcrumbs: drop the largest gamma and the smallest, keep density ---------------------------------


def mergekit_outlier_mask(task_vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit 0.1.5's ``magnitude_outliers`` mask (bool, the tensor's shape).

    0.1.5 keeps exactly k = int(density*n) entries: those after the n_bot = max(0, n - k - int(gamma*n)) smallest
    in its ascending ``torch.sort``. So gamma = 0 keeps the top k (0.1.5 slices [n_bot : n_bot + k]; the older
    [n_bot : -n_top] slice that emptied the mask at n_top = 0 is gone), gamma + density > 1 shrinks the outlier
    cut rather than the kept count, density >= 1 keeps everything whatever gamma, and k = 0 keeps nothing.
    """
    if density >= 1:
        return torch.ones_like(task_vector, dtype=torch.bool)
    numel = task_vector.numel()
    keep = int(density * numel)
    top = int(gamma * numel)
    bottom = max(0, numel - keep - top)
    magnitude = task_vector.abs().reshape(-1)
    if magnitude.device.type == "cpu":  # 0.1.5 sorts in float32 on the CPU, in the tensor's dtype elsewhere
        magnitude = magnitude.float()
    order = torch.sort(magnitude, descending=False).indices
    mask = torch.zeros(numel, dtype=torch.bool, device=task_vector.device)
    mask[order[bottom:bottom + keep]] = True
    return mask.reshape(task_vector.shape)


def outlier_mask(task_vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs as the paper means it: drop the int(gamma*n) largest |tau|, keep the int(density*n) below them.

    Requires density + gamma <= 1 (otherwise "drop the top gamma" and "keep density" contradict each other).
    """
    if not (0.0 <= gamma and 0.0 <= density <= 1.0 and density + gamma <= 1.0):
        raise ValueError(f"breadcrumbs needs 0 <= density, 0 <= gamma, density + gamma <= 1 "
                         f"(got density {density}, gamma {gamma})")
    numel = task_vector.numel()
    keep = int(density * numel)
    top = int(gamma * numel)
    order = ascending_magnitude_order(task_vector.reshape(-1))
    stop = numel - top
    mask = torch.zeros(numel, dtype=torch.bool, device=task_vector.device)
    mask[order[max(0, stop - keep):stop]] = True
    return mask.reshape(task_vector.shape)


def ascending_magnitude_order(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices sorting |values| ascending along ``dim``; equal magnitudes keep index order (any device agrees)."""
    return torch.sort(values.abs().float(), dim=dim, descending=False, stable=True).indices


# --- DELLA: MagPrune keep probabilities, counter-based mask, rescales ------------------------------------


def check_della_window(density: float, epsilon: float) -> None:
    """mergekit 0.1.5's (and the paper's) requirement 0 < density -/+ epsilon < 1, below density 1."""
    if 0 < density < 1 and not (0.0 < density - epsilon and density + epsilon < 1.0 and epsilon >= 0.0):
        raise ValueError(f"della needs 0 <= epsilon and 0 < density - epsilon, density + epsilon < 1 "
                         f"(got density {density}, epsilon {epsilon})")


def della_keep_probabilities(task_vector: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = (density - eps) + 2 eps (rank - 1)/(m - 1) per row (float64, the tensor's shape).

    Ranks 1..m of |tau| ascending along dim 1 (mergekit's ``argsort(dim=1)``; a 1-D tensor is one row), so the
    largest entry of a row is kept with density + eps and the smallest with density - eps. The formula is
    mergekit 0.1.5's rank_norm = (rank - min)/(max - min); ties are ranked by a stable sort here (0.1.5's
    unstable one is device-dependent, and its masks are random anyway). A row of one element has no order:
    0.1.5 fails on it (0/0 -> NaN probability), here it gets the mean probability, density. As in 0.1.5,
    density >= 1 keeps all and density <= 0 keeps nothing, whatever epsilon.
    """
    if density >= 1 or density <= 0:
        fill = 1.0 if density >= 1 else 0.0
        return torch.full(task_vector.shape, fill, dtype=torch.float64, device=task_vector.device)
    check_della_window(density, epsilon)
    rows = task_vector.unsqueeze(0) if task_vector.dim() < 2 else task_vector
    length = rows.shape[1]
    if length < 2:
        return torch.full(task_vector.shape, float(density), dtype=torch.float64, device=task_vector.device)
    order = ascending_magnitude_order(rows, dim=1)
    rank_shape = [1] * rows.dim()
    rank_shape[1] = length
    # rank - 1 of the element at each sorted position, scattered back to where the element sits
    rank_minus_one = torch.arange(length, dtype=torch.float64, device=rows.device).reshape(rank_shape)
    rank_norm = torch.empty(rows.shape, dtype=torch.float64, device=rows.device)
    rank_norm.scatter_(1, order, rank_minus_one.expand(rows.shape))
    rank_norm /= length - 1
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(task_vector.shape)


def drop_thresholds(keep_probability: torch.Tensor) -> np.ndarray:
    """round((1 - p) * 2**16) per element: DARE's ``drop_threshold`` with a per-element drop rate 1 - p."""
    drop = 1.0 - keep_probability.detach().to("cpu", torch.float64).reshape(-1).clamp(0.0, 1.0).numpy()
    return np.rint(drop * WORD_RANGE)  # half to even, as Python's round in drop_threshold


def della_keep_mask(keep_probability: torch.Tensor, seed: int, model: str, tensor: str, numel: int,
                    start: int = 0) -> torch.Tensor:
    """Bernoulli(p) keep-mask for the elements [start, start + p.numel()) of a flattened tensor of ``numel``.

    ``keep_probability`` holds the probabilities of those elements (a chunk of whole rows, or the whole tensor);
    the mask has its shape and device. The draw is DARE's stream (seed, model, tensor, block), on the CPU.
    """
    stop = start + keep_probability.numel()
    words = dare.stream_words(seed, model, tensor, numel, start, stop)
    kept = words >= drop_thresholds(keep_probability)
    return torch.from_numpy(kept).reshape(keep_probability.shape).to(keep_probability.device)


def inverse_probability_rescale(task_vector: torch.Tensor, keep: torch.Tensor,
                                keep_probability: torch.Tensor) -> torch.Tensor:
    """DELLA's paper rescale: tau * m / p, so each entry keeps its expectation (p > 0 by the epsilon window)."""
    wide = task_vector.to(torch.float64)
    dropped = torch.zeros((), dtype=torch.float64, device=wide.device)
    # where() rather than tau * m / p: p = 0 (density 0) would give 0/0 for the dropped entries
    return torch.where(keep, wide / keep_probability.clamp(min=1e-300), dropped).to(task_vector.dtype)


def masked_l1_rescale(task_vector: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """mergekit's ``rescaled_masked_tensor`` with the L1 norm: tau * m, scaled back to ||tau||_1 of the tensor."""
    masked = task_vector * keep.to(task_vector.dtype)
    return l1_rescale(masked, task_vector)
