"""Sparsifiers of the next methods: Breadcrumbs' outlier mask and DELLA's rank-based random mask (spec methods-next.md).

Both come in two dialects where they differ:

* ``mergekit``: ``mergekit.sparsify`` of mergekit 0.1.5, element for element where no randomness is involved
  (``mergekit_outlier_mask``: the same ``torch.sort`` call, so ties at the cuts fall the same way with the same
  torch on the same device).
* ``native``: the papers' intent, with ties broken by a stable sort (lower flat index ranks lower), so the mask is
  the same on any device and under any chunking.

Neither native path sorts whole tensors of floats: |x| becomes integer keys (its float bits, ``magnitude_keys``);
Breadcrumbs' cut takes its two order statistics from histograms and resolves ties at them by flat index, which
is the stable sort's result without the sort (``stable_rank_window``); DELLA's row ranks come from numpy's
radix sort of 16-bit keys and its float64 work is done per rank, in cache-sized blocks of rows (``della_prune``).

DELLA's Bernoulli draw never uses a global generator: element i of a tensor is kept iff the i-th 16-bit word of
distmerge's counter-based stream (``dare.stream_words``) is >= round((1 - p_i) * 2**16). With a constant p that
is DARE's mask for drop rate 1 - p, bit for bit. mergekit's masks come from ``torch.bernoulli`` and cannot be
reproduced; only their distribution is the same.
"""

from __future__ import annotations

import numpy as np

from distmerge.deferred import torch
from distmerge.ops import dare
from distmerge.ops.ties import HIGH_BINS, l1_rescale, locate_rank

WORD_RANGE = 65536.0  # 2**16 values of one stream word
# the key of every NaN (one above inf's bit pattern) by the dtype whose bits are the keys
NAN_KEYS = {"torch.bfloat16": 0x7F81, "torch.float16": 0x7C01, "torch.float32": 0x7F800001}
BLOCK_ELEMENTS = 1 << 16  # DELLA works on blocks of whole rows about this size (float64 temporaries in cache)


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
    The kept ranks of a stable ascending sort of |tau|, found without sorting (``stable_rank_window``).
    """
    if not (0.0 <= gamma and 0.0 <= density <= 1.0 and density + gamma <= 1.0):
        raise ValueError(f"breadcrumbs needs 0 <= density, 0 <= gamma, density + gamma <= 1 "
                         f"(got density {density}, gamma {gamma})")
    numel = task_vector.numel()
    keep = int(density * numel)
    top = int(gamma * numel)
    stop = numel - top
    mask = stable_rank_window(magnitude_keys(task_vector), max(0, stop - keep), stop)
    return mask.reshape(task_vector.shape)


def ascending_magnitude_order(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices sorting |values| ascending along ``dim``; equal magnitudes keep index order (any device agrees).

    The order of a stable sort of ``values.abs().float()``, taken on integer keys (``magnitude_keys``).
    """
    keys = magnitude_keys(values)
    if keys.device.type != "cpu":
        return torch.sort(keys, dim=dim, descending=False, stable=True).indices
    return torch.from_numpy(_stable_argsort(keys.numpy(), dim))


def _stable_argsort(keys: np.ndarray, axis: int) -> np.ndarray:
    """Stable argsort of non-negative int16/int32 keys by numpy's radix sort of 16-bit words (about 5x torch's
    stable sort for one word; int32 keys take two passes, low word then high, still under torch's)."""
    if keys.dtype == np.int16:
        return np.argsort(keys.view(np.uint16), axis=axis, kind="stable")
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), axis=axis, kind="stable")
    high = np.take_along_axis((keys >> 16).astype(np.uint16), order, axis=axis)
    return np.take_along_axis(order, np.argsort(high, axis=axis, kind="stable"), axis=axis)


# --- order without sorting: integer keys, order statistics by histogram, ties by index -------------------


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """|values| as integers that order and tie exactly as ``values.abs().float()`` does under ``torch.sort``.

    The bit patterns of non-negative floats are monotone in the value; bf16 and float16 widen to float32
    exactly, so their own 16-bit patterns serve (int16 keys, half the memory, and radix-sortable); anything
    else is ranked as the float32 it becomes (int32 keys). torch sorts every NaN after inf and equal to
    the other NaNs, so all NaN patterns become one key, one above inf.
    """
    if values.dtype in (torch.bfloat16, torch.float16):
        return (values.view(torch.int16) & 0x7FFF).clamp_(max=NAN_KEYS[str(values.dtype)])
    wide = values if values.dtype == torch.float32 else values.abs().float()
    return (wide.view(torch.int32) & 0x7FFFFFFF).clamp_(max=NAN_KEYS["torch.float32"])


def stable_rank_window(keys: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Flat bool mask of the elements whose rank in a stable ascending sort of ``keys`` is in [start, stop).

    Without sorting: the keys at ranks ``start`` and ``stop - 1`` come from histograms; elements strictly
    between them are in, and of the elements equal to a cut key, the stable sort ranks them by flat index, so
    the ones in are a run of consecutive occurrences, picked by position.
    """
    flat = keys.reshape(-1)
    numel = flat.numel()
    if start >= stop:
        return torch.zeros(numel, dtype=torch.bool, device=flat.device)
    if start == 0 and stop == numel:
        return torch.ones(numel, dtype=torch.bool, device=flat.device)
    (low, low_below), (high, high_below) = keys_at_ranks(flat, (start, stop - 1))
    mask = (flat > low) & (flat < high)
    if low == high:
        _keep_occurrences(mask, flat == low, start - low_below, stop - low_below)
    else:
        _keep_occurrences(mask, flat == low, start - low_below, None)
        _keep_occurrences(mask, flat == high, 0, stop - high_below)
    return mask


def keys_at_ranks(flat_keys: torch.Tensor, ranks: tuple[int, ...]) -> list[tuple[int, int]]:
    """(key, count of smaller keys) at each 0-based ascending rank: one histogram of int16 keys, or for int32
    keys the radix selection of ``ops.ties`` (high 16 bits, then the low 16 bits inside the located bin)."""
    if flat_keys.dtype == torch.int16:
        histogram = torch.bincount(flat_keys, minlength=1 << 15)
        located = [locate_rank(histogram, rank + 1) for rank in ranks]
        return [(key, rank + 1 - within) for rank, (key, within) in zip(ranks, located)]
    high_histogram = torch.bincount(flat_keys >> 16, minlength=HIGH_BINS)
    low_histograms: dict[int, torch.Tensor] = {}
    found = []
    for rank in ranks:
        high_bin, within_bin = locate_rank(high_histogram, rank + 1)
        if high_bin not in low_histograms:
            # keys outside the bin fall into two overflow bins (integer clamp: cheaper than boolean indexing)
            offset = (flat_keys - (high_bin << 16)).clamp_(-1, HIGH_BINS).add_(1)
            low_histograms[high_bin] = torch.bincount(offset, minlength=HIGH_BINS + 2)[1:HIGH_BINS + 1]
        low_bin, within_key = locate_rank(low_histograms[high_bin], within_bin)
        found.append(((high_bin << 16) | low_bin, rank + 1 - within_key))
    return found


def _keep_occurrences(mask: torch.Tensor, equal: torch.Tensor, first: int, last: int | None) -> None:
    """Set ``mask`` at the occurrences first..last-1 (0-based, in flat order) of ``equal``; last None: to the end."""
    if first == 0 and last is None:
        mask |= equal
        return
    if equal.device.type == "cpu":
        positions = torch.from_numpy(np.flatnonzero(equal.numpy()))  # a quarter of torch.nonzero's time here
    else:
        positions = torch.nonzero(equal).reshape(-1)
    mask[positions[first:last]] = True


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
    rows = task_vector.reshape(1, -1) if task_vector.dim() < 2 else task_vector  # a 0-d tensor: a row of one
    length = rows.shape[1]
    if length < 2:
        return torch.full(task_vector.shape, float(density), dtype=torch.float64, device=task_vector.device)
    order = ascending_magnitude_order(rows, dim=1)
    return by_rank(order, della_rank_probabilities(length, density, epsilon)).reshape(task_vector.shape)


def della_rank_probabilities(length: int, density: float, epsilon: float) -> torch.Tensor:
    """The keep probability of ranks 1..length of a row (float64[length]): (d - eps) + 2 eps (rank - 1)/(m - 1)."""
    rank_norm = torch.arange(length, dtype=torch.float64)
    rank_norm /= length - 1
    return (density - epsilon) + rank_norm * (2 * epsilon)


def by_rank(order: torch.Tensor, per_rank: torch.Tensor) -> torch.Tensor:
    """``per_rank[rank]`` at every element, where ``order`` sorts the rows along dim 1 (one scatter, no ranks)."""
    shape = [1] * order.dim()
    shape[1] = per_rank.numel()
    per_rank = per_rank.to(order.device).reshape(shape).expand(order.shape)
    return torch.empty(order.shape, dtype=per_rank.dtype, device=order.device).scatter_(1, order, per_rank)


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


def della_prune(task_vector: torch.Tensor, density: float, epsilon: float, rescale: str, seed: int, model: str,
                tensor: str, numel: int, start: int = 0) -> torch.Tensor:
    """DELLA's stage for one model's task vector (elements [start, ...) of a flattened tensor of ``numel``).

    The values of ``della_keep_probabilities`` -> ``della_keep_mask`` -> ``della_rescaled``, bit for bit, with
    the float64 work done once per rank (the drop thresholds and probabilities of ranks 1..m, scattered to
    the elements by the row order) and the rest in blocks of rows that stay in cache: the elementwise float64
    passes over a whole tensor cost several times the sort.
    """
    rows = task_vector.reshape(1, -1) if task_vector.dim() < 2 else task_vector  # a 0-d tensor: a row of one
    length = rows.shape[1]
    if density >= 1 or density <= 0 or length < 2:  # one probability for every element: no order to take
        probability = della_keep_probabilities(task_vector, density, epsilon)
        keep = della_keep_mask(probability, seed, model, tensor, numel, start)
        return della_rescaled(task_vector, keep, probability, rescale)
    check_della_window(density, epsilon)
    per_rank = della_rank_probabilities(length, density, epsilon)
    thresholds = torch.from_numpy(drop_thresholds(per_rank).astype(np.int32))  # uint16 words: 2**16 needs int32
    words = dare.stream_words(seed, model, tensor, numel, start, start + task_vector.numel())
    row_numel = rows[0].numel()
    step = max(1, BLOCK_ELEMENTS // row_numel)
    if rescale == "inverse":
        divisor = per_rank.clamp(min=1e-300)  # inverse_probability_rescale's clamp, once per rank
        out = torch.empty_like(rows)
    else:
        keep = torch.empty(rows.shape, dtype=torch.bool)
    for first in range(0, rows.shape[0], step):
        block = rows[first:first + step]
        order = ascending_magnitude_order(block, dim=1)
        drop_at = by_rank(order, thresholds).cpu().numpy().reshape(-1)
        offset = first * row_numel
        dropped = torch.from_numpy(words[offset:offset + drop_at.size] < drop_at).reshape(block.shape)
        if rescale == "inverse":  # inverse_probability_rescale's values: tau / p in float64, +0 where dropped
            wide = block.to(torch.float64, copy=True)  # a float64 block must not be divided in place
            wide /= by_rank(order, divisor)
            out[first:first + step] = wide
            out[first:first + step].masked_fill_(dropped.to(wide.device), 0.0)  # after the cast: fewer bytes
        else:
            keep[first:first + step] = dropped.logical_not_()
    if rescale == "inverse":
        return out.reshape(task_vector.shape)
    return della_rescaled(task_vector, keep.reshape(task_vector.shape).to(task_vector.device), None, rescale)


def della_rescaled(task_vector: torch.Tensor, keep: torch.Tensor, keep_probability: torch.Tensor | None,
                   rescale: str) -> torch.Tensor:
    """The kept entries, rescaled: ``inverse`` (1/p, the paper's), ``l1`` (mergekit's) or ``none``."""
    if rescale == "inverse":
        return inverse_probability_rescale(task_vector, keep, keep_probability)
    if rescale == "l1":
        return masked_l1_rescale(task_vector, keep)
    return task_vector * keep.to(task_vector.dtype)


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
