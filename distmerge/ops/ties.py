"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al. 2023; spec algorithms.md section 3).

Two trim rules exist in the wild and both are kept here:

* ``paper``: the reference ``topk_values_mask``: with P values and density d, the threshold is the
  (P - int(P*d))-th smallest |tau| (``kthvalue``), and every |tau| >= threshold is kept, ties included
  (so int(P*d) + 1 values survive when there are no ties).
* ``mergekit``: ``sparsify.magnitude`` keeps exactly max(1, int(d*P)) largest |tau|, chosen by
  ``argsort`` (``mergekit_magnitude_mask``, the same call, so ties at the cut fall the same way with the
  same torch). As a threshold (global scope) that is the (P - max(1, int(P*d)) + 1)-th smallest, ties kept.

The exact threshold over a whole model (the paper's global trim) is found without holding the model:
|tau| as float32 bits is a monotone integer, so a 65536-bin histogram of the high 16 bits locates the bin of
the cut, and a second histogram of the low 16 bits inside that bin gives the exact value (``radix_*``).

The second histogram seldom needs the inputs again. A weight stored in bfloat16 (or float16) that fine-tuning
moved within its binade gives a task vector with at most 8 significant bits, whose float32 pattern's low 16 bits
are 0 ("regular"): its bin alone says its exact value. Only the others ("irregular": 0.5% of a bf16 1.1B Llama
family's task vectors) need the low bits. The first pass may keep their keys (``radix_irregular_keys``); the second
then counts the kept keys in the cut's bin (``low_histogram_of_keys``) without reading the model, and the bin's
regular values are its count less the irregular ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from distmerge.deferred import torch
from distmerge.ops.task_vectors import broadcast_weights

HIGH_BINS = 1 << 16
LOW_MASK = 0xFFFF
KEEP_ALL = 0.0  # threshold that keeps every value (|x| >= 0)
KEEP_NONE = float("inf")


def trim_rank(numel: int, density: float, rule: str = "paper") -> int:
    """1-based ascending rank of the threshold among |tau|; 0 means keep everything."""
    if density >= 1.0:
        return 0
    keep = int(numel * density)
    if rule == "paper":
        return numel - keep
    if rule == "mergekit":
        return numel - max(1, keep) + 1
    raise ValueError(f"unknown trim rule {rule!r}")


def magnitude_threshold(values: torch.Tensor, density: float, rule: str = "paper") -> float:
    """Threshold on |values| for one tensor (the per-tensor trim)."""
    flat = values.reshape(-1).abs().float()
    rank = trim_rank(flat.numel(), density, rule)
    if rank == 0:
        return KEEP_ALL
    if rank > flat.numel():
        return KEEP_NONE
    return float(flat.kthvalue(rank).values)


def mergekit_magnitude_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's ``sparsify.magnitude`` mask: the max(1, int(d*n)) largest |x| by a descending argsort."""
    if density >= 1.0:
        return torch.ones_like(values, dtype=torch.bool)
    flat = values.reshape(-1).abs().float()
    keep = max(1, int(density * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=values.device)
    mask[torch.argsort(flat, descending=True)[:keep]] = True
    return mask.reshape(values.shape)


def l1_rescale(trimmed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Scale ``trimmed`` back to ``original``'s L1 norm (mergekit's rescale; untouched below 1e-7)."""
    before, after = original.abs().sum(), trimmed.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return trimmed
    return trimmed * (before / after)


def trim(task_vector: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Zero every |tau_t| below its task's threshold; task_vector is [T, ...]."""
    out = torch.empty_like(task_vector)
    for t, threshold in enumerate(thresholds):
        _trim_row(task_vector[t], float(threshold), out[t])
    return out


def _trim_row(values: torch.Tensor, threshold: float, out: torch.Tensor) -> None:
    """out = values where |values| >= threshold, else 0: one ``hardshrink`` (keeps |x| > lambda).

    lambda is the largest value of the dtype below the threshold, so ``> lambda`` is exactly ``>= threshold``.
    One fused op instead of a comparison and a select: on CPU, bool tensors and ``where`` cost 5-20x a float op.
    """
    if threshold <= 0.0:
        out.copy_(values)
    elif threshold == float("inf"):
        out.zero_()
    else:
        limit = torch.tensor(threshold, dtype=values.dtype)
        below = float(torch.nextafter(limit, torch.zeros((), dtype=values.dtype)))
        torch.hardshrink(values, below, out=out)


def _at_least(values: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """1.0 where values >= threshold, else 0.0, in the values' dtype.

    Float arithmetic rather than a comparison and ``where``: on CPU, bool tensors and ``where`` cost 5-20x
    a float op per element, which made them most of a TIES merge. sign(v - t) is exact at equality (IEEE
    subtraction of distinct finite floats is never 0), so sign + 1 clamped to 1 is the >= mask.
    """
    return (values - threshold).sign_().add_(1.0).clamp_(max=1.0)


def elected_sign(weighted_trimmed: torch.Tensor) -> torch.Tensor:
    """s_i = sign(sum_t w_t trimmed_t,i), before zero signs are resolved."""
    return torch.sign(weighted_trimmed.sum(dim=0))


def majority_sign(sign: torch.Tensor) -> float:
    """The reference's fallback for s_i = 0: sign(sum_i s_i) (may itself be 0)."""
    return float(torch.sign(sign.sum(dtype=torch.float64)))


def disjoint_merge(
    weighted_trimmed: torch.Tensor,
    weights: Sequence[float],
    sign: torch.Tensor,
    zero_sign: float,
    mode: str = "mean",
) -> torch.Tensor:
    """Keep each task's value only where it agrees with the elected sign, then mean or sum them.

    ``sign`` is the unresolved elected sign; its zeros take ``zero_sign``. As in the reference
    (``torch.where(sign > 0, x > 0, x < 0)``) a resolved sign of 0 selects the negative entries.
    ``mean`` divides by the summed weights of the agreeing tasks (the count when all weights are 1),
    with an empty set giving 0.
    """
    return _disjoint(weighted_trimmed, weights, sign, zero_sign, mode)[0]


def _disjoint(weighted, weights, sign, zero_sign, mode):
    """(merged, number or summed weight of the agreeing tasks) per element."""
    if mode not in ("mean", "sum"):
        raise ValueError(f"unknown disjoint mode {mode!r}")
    # The agreeing entries of an element are its positive or its negative ones: summing each side separately
    # (in task order, as the reference's masked sum does) and choosing per element is exact.
    merged_up = weighted.clamp(min=0.0).sum(dim=0)
    merged_down = weighted.clamp(max=0.0).sum(dim=0)
    votes = weighted.sign()
    unit = all(w == 1.0 for w in weights)
    if unit:
        balance = votes.sum(dim=0)  # positives - negatives
        voters = votes.abs_().sum(dim=0)  # positives + negatives
    else:
        w = broadcast_weights(weights, weighted)
        balance = (votes * w).sum(dim=0)
        voters = votes.abs_().mul_(w).sum(dim=0)
    count_up = (voters + balance).mul_(0.5)
    count_down = (voters - balance).mul_(0.5)
    # A resolved sign of 0 behaves as -1 (negatives are selected), so only +1/-1 need handling:
    # up = 1 where the element takes +1 (elected +1, or elected 0 with a positive zero_sign).
    up = _at_least(sign, 0.0) if zero_sign > 0 else _at_least(sign, 0.5)
    if mode == "mean":
        merged_up.div_(_nonzero_divisor(count_up, unit))
        merged_down.div_(_nonzero_divisor(count_down, unit))
    down = 1.0 - up
    merged = merged_up.mul_(up).add_(merged_down.mul_(down))  # exact: 1*a + 0*b == a for finite b
    agreed = count_up.mul_(up).add_(count_down.mul_(down))
    return merged, agreed


def _nonzero_divisor(count: torch.Tensor, integral: bool) -> torch.Tensor:
    """count, with 0 replaced by 1 (an empty agreeing set merges to 0); counts of unit weights are integers."""
    if integral:
        return count.clamp(min=1.0)  # not in place: the counts are needed afterwards
    return count + (1.0 - _at_least(count.abs(), 1e-30))


def merge_deferred_sign(trimmed: torch.Tensor, weights: Sequence[float], mode: str = "mean", zero_sign: float = 1.0):
    """The global-scope merge before the model-wide majority sign is known.

    Returns (merged with zero signs taken as ``zero_sign`` (+1 or -1), the sum of elected signs of this chunk,
    flat indices of the elements whose elected sign is 0 but that hold a nonzero value, their merged value with
    zero signs taken as the other one). Such elements need exact cancellation between tasks; the caller patches
    them once the majority sign is known, should it differ from ``zero_sign``.
    """
    weighted = _weighted(trimmed, weights)
    sign = elected_sign(weighted)
    merged, agreed = _disjoint(weighted, weights, sign, zero_sign, mode)
    sign_sum = int(sign.sum(dtype=torch.float64))
    # A zero sum with a value on the chosen side implies one on the other side: the choice matters.
    index = (1.0 - sign.abs()).mul_(agreed).reshape(-1).nonzero().squeeze(1)
    if index.numel() == 0:
        return merged, sign_sum, index, merged.reshape(-1)[:0]
    alternative = disjoint_merge(weighted.reshape(weighted.shape[0], -1)[:, index], weights,
                                 sign.reshape(-1)[index], -zero_sign, mode)
    return merged, sign_sum, index, alternative


def _weighted(trimmed: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    return trimmed if all(w == 1.0 for w in weights) else trimmed * broadcast_weights(weights, trimmed)


def ties_delta(
    task_vector: torch.Tensor,
    thresholds: Sequence[float],
    weights: Sequence[float],
    zero_sign: float | None,
    mode: str = "mean",
) -> torch.Tensor:
    """The merged task vector of one tensor (or chunk): trim, elect, disjoint merge.

    ``zero_sign=None`` resolves zero signs by this tensor's own majority (the per-tensor scope).
    """
    return merge_trimmed(trim(task_vector, thresholds), weights, zero_sign, mode)


def merge_trimmed(trimmed: torch.Tensor, weights: Sequence[float], zero_sign: float | None,
                  mode: str = "mean") -> torch.Tensor:
    """Weight the trimmed task vectors, elect the sign, disjoint merge."""
    weighted = _weighted(trimmed, weights)
    sign = elected_sign(weighted)
    if zero_sign is None:
        zero_sign = majority_sign(sign)
    return disjoint_merge(weighted, weights, sign, zero_sign, mode)


# --- exact global threshold by radix selection over float32 bit patterns ---------------------------


def _abs_bits(values: torch.Tensor) -> torch.Tensor:
    """|x| as int32 keys ordered like the values (non-negative float32 bits are monotone)."""
    return values.detach().float().abs().reshape(-1).view(torch.int32)


def radix_high_histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts of |x| by the high 16 bits of its float32 pattern: int64[65536]."""
    return torch.bincount(_abs_bits(values) >> 16, minlength=HIGH_BINS).to(torch.int64)


def radix_irregular_keys(values: torch.Tensor) -> torch.Tensor:
    """The int32 keys (``_abs_bits``) of the |x| whose low 16 bits are not all 0, in element order."""
    keys = _abs_bits(values)
    return keys[(keys & LOW_MASK) != 0]


def low_histogram_of_keys(keys: torch.Tensor, high_bin: int, into: torch.Tensor) -> torch.Tensor:
    """Add to ``into`` (int64[65536]) the low-16-bit counts of the irregular ``keys`` in ``high_bin``: what
    ``radix_low_histogram`` counts there, bin 0 (the regular values) aside."""
    low = keys[(keys >> 16) == high_bin] & LOW_MASK
    if low.numel():
        into.scatter_add_(0, low.long(), torch.ones(low.numel(), dtype=torch.int64))
    return into


def radix_low_histogram(values: torch.Tensor, high_bin: int) -> torch.Tensor:
    """Counts by the low 16 bits, among the values whose high 16 bits equal ``high_bin``."""
    # Values outside the bin land in two overflow bins (integer clamp; boolean indexing costs more here).
    key = (_abs_bits(values) - (high_bin << 16)).clamp_(-1, HIGH_BINS).add_(1)
    return torch.bincount(key, minlength=HIGH_BINS + 2)[1:HIGH_BINS + 1].to(torch.int64)


def locate_rank(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin holding the rank-th smallest value, rank within that bin), rank 1-based."""
    cumulative = torch.cumsum(histogram, dim=0)
    total = int(cumulative[-1])
    if not 1 <= rank <= total:
        raise ValueError(f"rank {rank} outside 1..{total}")
    index = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype)))
    before = int(cumulative[index - 1]) if index > 0 else 0
    return index, rank - before


def bits_to_value(high_bin: int, low_bin: int) -> float:
    """The float32 whose pattern is (high << 16) | low."""
    return float(torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32))


def high_bin_of(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32)) >> 16
