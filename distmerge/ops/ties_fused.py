"""TIES' global-trim passes and merge as single loops over the inputs (numba), bit for bit ``ops.ties``.

The torch formulation of a TIES chunk is about 25 full-size tensor operations per element (task vectors, trim,
sign election, the disjoint mean, the zero-sign bookkeeping) and two 65536-bin ``bincount`` passes: on a CPU it
spends 40+ ns per element where reading the inputs costs about 1. These loops read each input element once,
keep the per-element work in registers and write the merged value once.

They replicate ``ops.ties`` exactly: the same float32 operations in the same order (sums start from 0 and add
task by task, as torch's reduction over the stacked dimension does for up to ``compiled.ORDERED_SUM_TASKS``
tasks, which is why the merge loop takes no more; hardshrink's ``> nextafter(threshold, 0)``;
``lambda`` rounded to float32 before it multiplies), so a merge gives the same bytes with or without numba
(``tests/test_ties_fused.py`` checks them against each other on inputs full of ties, zeros and cancellations).
The inputs may also come as read, in bfloat16 (compute still float32): each block of each input is widened into
an L1 buffer as the loop goes, which spares the float32 copy of every chunk a merge would otherwise make and read
back (the same float32 values, so the same bits). numba is an optional dependency: without it (or off the CPU,
or for anything but float32 and bfloat16) the torch path runs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from distmerge.deferred import torch
from distmerge.ops.compiled import BLOCK, DE_BRUIJN, LOWEST_BIT, flat_views, kernels, takes, widens


def _kernels(widen: bool = False):
    """The loops over float32 inputs, or with ``widen`` over bfloat16 inputs (their bits as uint16)."""
    built = kernels(_build)
    return None if built is None else built[widen]


def _build(jit):
    return _loops(jit, False), _loops(jit, True)


def _loops(jit, widen: bool):
    # ``widen`` is a constant of each closure: numba prunes the branch not taken, and keys its disk cache on it.
    # Where it is set, ``b`` and ``e`` are a block of the inputs widened into L1 buffers, else slices of them.
    @jit
    def high_histogram(base, experts, hist, kept, counts, irregular):
        n = base.shape[0]
        bits = np.empty(BLOCK, dtype=np.float32)
        keys = bits.view(np.uint32)  # |tau| as float32 bits: monotone in the value
        base_wide = np.empty(BLOCK, dtype=np.float32)
        base_bits = base_wide.view(np.uint32)
        expert_wide = np.empty(BLOCK, dtype=np.float32)
        expert_bits = expert_wide.view(np.uint32)
        keeping = kept.shape[1] > 0  # room for every key of the chunk, or none kept
        binning = irregular.shape[1] > 0  # the kept keys' high bins counted too (or not)
        zero64 = np.uint64(0)
        shift = np.uint64(58)
        for block in range((n + BLOCK - 1) // BLOCK):  # range(0, n, BLOCK) compiles to slower loops
            start = block * BLOCK
            size = min(BLOCK, n - start)
            if widen:
                raw = base[start:start + size]
                for j in range(size):
                    base_bits[j] = np.uint32(raw[j]) << np.uint32(16)
                b = base_wide[:size]
            else:
                b = base[start:start + size]  # slices: the loops below then vectorize
            for t in range(len(experts)):
                if widen:
                    raw = experts[t][start:start + size]
                    for j in range(size):
                        expert_bits[j] = np.uint32(raw[j]) << np.uint32(16)
                    e = expert_wide[:size]
                else:
                    e = experts[t][start:start + size]
                row = hist[t]
                for j in range(size):
                    bits[j] = abs(e[j] - b[j])
                for j in range(size):
                    row[keys[j] >> 16] += 1
                if keeping:
                    # the irregular keys (nonzero low bits, under 1% of them) found 64 to a word, then only the
                    # set bits visited: a store per key, or a branch per key, cost a quarter of the histogram
                    keep = kept[t]
                    count = counts[t]
                    for group in range((size + 63) // 64):
                        first = group * 64
                        word = np.uint64(0)
                        for k in range(min(64, size - first)):
                            word |= np.uint64((keys[first + k] & 0xFFFF) != 0) << np.uint64(k)
                        while word:
                            key = keys[first + LOWEST_BIT[((word & (zero64 - word)) * DE_BRUIJN) >> shift]]
                            keep[count] = key
                            if binning:
                                irregular[t, key >> 16] += 1
                            count += 1
                            word &= word - np.uint64(1)
                    counts[t] = count

    @jit
    def low_histogram(base, experts, high_bins, hist):
        n = base.shape[0]
        bits = np.empty(BLOCK, dtype=np.float32)
        keys = bits.view(np.uint32)
        base_wide = np.empty(BLOCK, dtype=np.float32)
        base_bits = base_wide.view(np.uint32)
        expert_wide = np.empty(BLOCK, dtype=np.float32)
        expert_bits = expert_wide.view(np.uint32)
        for block in range((n + BLOCK - 1) // BLOCK):
            start = block * BLOCK
            size = min(BLOCK, n - start)
            if widen:
                raw = base[start:start + size]
                for j in range(size):
                    base_bits[j] = np.uint32(raw[j]) << np.uint32(16)
                b = base_wide[:size]
            else:
                b = base[start:start + size]
            for t in range(len(experts)):
                if high_bins[t] < 0:
                    continue
                if widen:
                    raw = experts[t][start:start + size]
                    for j in range(size):
                        expert_bits[j] = np.uint32(raw[j]) << np.uint32(16)
                    e = expert_wide[:size]
                else:
                    e = experts[t][start:start + size]
                row = hist[t]
                first = np.uint32(high_bins[t] << 16)
                for j in range(size):
                    bits[j] = abs(e[j] - b[j])
                for j in range(size):
                    low = keys[j] - first  # wraps around below the bin: one unsigned comparison
                    if low < 65536 and low != 0:  # low 0: the regular values, counted by the first pass
                        row[low] += 1

    return (high_histogram, low_histogram, _merge_loop(jit, widen, False, False), _merge_loop(jit, widen, True, False),
            _merge_loop(jit, widen, True, True))


def _merge_loop(jit, widen: bool, counting: bool, bracketing: bool):
    # ``counting`` and ``bracketing``: constants of the closure, as ``widen`` (three loops: the exact merge, a
    # merge from guessed thresholds it checks, a merge from brackets that also leaves elements undecided; the
    # counts and the bracket test cost a sixth of the loop, which the exact merge does not pay)
    @jit
    def merge(base, experts, below, low, high, open_low, open_high, weights, mean, lam, zero_up, out, index,
              alternative, above, reached, undecided):
        """TIES with global thresholds, zero signs taken as +1 (``zero_up`` 1) or -1 (0), the other way into
        ``alternative``; returns (sum of elected signs, deferred count, undecided count).

        Block by block: the inputs of a block are widened (or copied) into rows of one L1 buffer, then one loop
        over its elements runs the tasks in registers (their loop unrolls: a handful of tasks) and vectorizes.
        Sums start from 0 and add the tasks in order, as torch's sum over the stacked dimension does. Unit
        weights multiply exactly and their counts are integers, so one formulation serves both (``below`` -1
        keeps every value).

        With ``counting``, ``above[t]`` counts |tau_t| > high[t] and ``reached[t]`` |tau_t| >= low[t] (how a
        guessed threshold or a bracket is checked afterwards). With ``bracketing``, an element with any |tau_t|
        in [open_low[t], open_high[t]] (a bracket the threshold is known to lie in, not where) is undecided:
        merged with ``below`` as given, left out of the vote and of the deferred ones, its index recorded."""
        n = base.shape[0]
        tasks = len(experts)
        zero = np.float32(0.0)
        one = np.float32(1.0)
        half = np.float32(0.5)
        tiny = np.float32(1e-30)
        zero64 = np.uint64(0)
        shift = np.uint64(58)
        flipped = np.empty(BLOCK, dtype=np.float32)
        flags = np.empty(BLOCK, dtype=np.uint8)
        band = np.empty(BLOCK, dtype=np.uint8)
        base_wide = np.empty(BLOCK, dtype=np.float32)
        base_bits = base_wide.view(np.uint32)
        wide = np.empty((tasks, BLOCK), dtype=np.float32)
        wide_bits = wide.view(np.uint32)
        sign_sum = 0
        deferred = 0
        pending = 0
        for block in range((n + BLOCK - 1) // BLOCK):
            start = block * BLOCK
            size = min(BLOCK, n - start)
            if widen:
                raw = base[start:start + size]
                for j in range(size):
                    base_bits[j] = np.uint32(raw[j]) << np.uint32(16)
                for t in range(tasks):
                    raw = experts[t][start:start + size]
                    row = wide_bits[t]
                    for j in range(size):
                        row[j] = np.uint32(raw[j]) << np.uint32(16)
            else:
                base_wide[:size] = base[start:start + size]
                for t in range(tasks):
                    wide[t, :size] = experts[t][start:start + size]
            o = out[start:start + size]
            block_signs = 0
            block_deferred = 0
            block_pending = 0
            for j in range(size):
                bj = base_wide[j]
                total = zero
                up_sum = zero
                down_sum = zero
                balance = zero
                voters = zero
                open_ = np.int32(0)
                for t in range(tasks):
                    x = wide[t, j] - bj
                    magnitude = abs(x)
                    if bracketing:
                        open_ |= np.int32((magnitude >= open_low[t]) & (magnitude <= open_high[t]))
                    w = weights[t]
                    x = (x if magnitude > below[t] else zero) * w
                    total += x
                    up_sum += x if x > zero else zero
                    down_sum += x if x < zero else zero
                    vote = np.float32(x > zero) - np.float32(x < zero)
                    balance += vote * w
                    voters += abs(vote) * w
                count_up = (voters + balance) * half
                count_down = (voters - balance) * half
                mu = up_sum
                md = down_sum
                if mean:
                    mu = mu / (count_up + (zero if abs(count_up) >= tiny else one))
                    md = md / (count_down + (zero if abs(count_down) >= tiny else one))
                positive = total > zero
                negative = total < zero
                up = one if positive else (zero if negative else zero_up)
                down = one - up
                o[j] = bj + lam * (mu * up + md * down)
                flipped[j] = bj + lam * (mu * (one - zero_up) + md * zero_up)  # zero signs the other way
                # a zero-sign element that keeps a value depends on the majority sign: deferred (counted here, in
                # integers: flag passes of their own ran scalar and cost as much as the merge); an undecided one
                # neither votes nor is deferred yet
                agreed = count_up * up + count_down * down
                settled = np.int32(1) - open_
                defer = (np.int32(1) - np.int32(positive) - np.int32(negative)) * np.int32(agreed != zero) * settled
                flags[j] = np.uint8(defer)
                band[j] = np.uint8(open_)
                block_signs += (np.int32(positive) - np.int32(negative)) * settled
                block_deferred += defer
                block_pending += open_
            sign_sum += block_signs
            if counting:  # a loop per task over the block in L1: cheaper than counts kept per lane in the loop above
                for t in range(tasks):
                    over = 0
                    at = 0
                    for j in range(size):
                        magnitude = abs(wide[t, j] - base_wide[j])
                        over += np.int64(magnitude > high[t])
                        at += np.int64(magnitude >= low[t])
                    above[t] += over
                    reached[t] += at
            if block_deferred:
                for group in range((size + 63) // 64):  # 64 flags to a word, then only the set bits visited
                    first = group * 64
                    word = np.uint64(0)
                    for k in range(min(64, size - first)):
                        word |= np.uint64(flags[first + k]) << np.uint64(k)
                    while word:
                        j = first + LOWEST_BIT[((word & (zero64 - word)) * DE_BRUIJN) >> shift]
                        index[deferred] = start + j
                        alternative[deferred] = flipped[j]
                        deferred += 1
                        word &= word - np.uint64(1)
            if block_pending:
                for group in range((size + 63) // 64):
                    first = group * 64
                    word = np.uint64(0)
                    for k in range(min(64, size - first)):
                        word |= np.uint64(band[first + k]) << np.uint64(k)
                    while word:
                        undecided[pending] = start + first + LOWEST_BIT[((word & (zero64 - word)) * DE_BRUIJN) >> shift]
                        pending += 1
                        word &= word - np.uint64(1)
        return sign_sum, deferred, pending

    return merge


def available(*tensors: torch.Tensor, widening: bool = False) -> bool:
    """Whether the loops can take these chunks: float32 (or, ``widening``, all float32 or all bfloat16, widened
    in the loops), on the CPU, contiguous, and numba importable."""
    return takes(*tensors, widening=widening) and _kernels() is not None


def high_histograms(base: torch.Tensor, experts: Sequence[torch.Tensor], into: torch.Tensor | None = None,
                    keep: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """(hist, kept): ``ops.ties.radix_high_histogram`` of each task vector, int64[T, 65536], added into ``into``
    if given (a pass sums thousands of chunks: adding in place spares a 65536-bin tensor per chunk and task);
    with ``keep``, each task vector's ``radix_irregular_keys`` (int32), else None."""
    tasks = len(experts)
    hist = _histogram(tasks, into)
    flat_base, flat_experts = flat_views(base, experts)
    scratch = _key_scratch(tasks, flat_base.shape[0] if keep else 0)
    counts = np.zeros(tasks, dtype=np.int64)
    _kernels(widens(base))[0](flat_base, flat_experts, hist.numpy(), scratch.numpy().view(np.uint32), counts, _NO_BINS)
    kept = [scratch[t, :counts[t]].clone() for t in range(tasks)] if keep else None
    return hist, kept


def low_histograms(base: torch.Tensor, experts: Sequence[torch.Tensor], high_bins: Sequence[int],
                   into: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.ties.radix_low_histogram`` of each task vector in its bin (zeros where the bin is < 0), bin 0 (the
    regular values, which the first pass counted) left at 0."""
    hist = _histogram(len(experts), into)
    _kernels(widens(base))[1](*flat_views(base, experts), np.asarray(high_bins, dtype=np.int64), hist.numpy())
    return hist


def _histogram(tasks: int, into: torch.Tensor | None) -> torch.Tensor:
    from distmerge.ops.ties import HIGH_BINS

    if into is None:
        return torch.zeros((tasks, HIGH_BINS), dtype=torch.int64)
    if into.shape != (tasks, HIGH_BINS) or into.dtype != torch.int64 or not into.is_contiguous():
        raise ValueError(f"histogram of shape {tuple(into.shape)} ({into.dtype}); want ({tasks}, {HIGH_BINS}) int64")
    return into


def merge_deferred_sign(base: torch.Tensor, experts: Sequence[torch.Tensor], thresholds: Sequence[float],
                        weights: Sequence[float], mode: str, lam: float, zero_sign: float = 1.0):
    """base + lam * ``ops.ties.merge_deferred_sign`` of the trimmed task vectors, and its deferred elements:
    (merged, sum of elected signs, flat indices, their value with zero signs the other way than ``zero_sign``,
    base and lambda applied)."""
    merged, vote, index, alternative, _, _, _ = _merge(base, experts, thresholds, None, weights, mode, lam, zero_sign)
    return merged, vote, index, alternative


def merge_bracketed(base: torch.Tensor, experts: Sequence[torch.Tensor], brackets: Sequence[tuple[float, float] | None],
                    thresholds: Sequence[float], weights: Sequence[float], mode: str, lam: float,
                    zero_sign: float = 1.0):
    """``merge_deferred_sign`` where each task's threshold is only estimated: ``brackets[t]`` (low, high) it is
    known to lie in, or a guess (low == high), or None where ``thresholds[t]`` is exact. Returns (merged, vote,
    deferred index, alternative, undecided flat indices, int64[T] count of |tau_t| > high, int64[T] count of
    |tau_t| >= low). A guess is merged as the threshold; an element with any |tau_t| inside a bracket
    (low < high) is undecided: merged with the bracket's values dropped and left out of the vote and the
    deferred ones, for its caller to merge again once the thresholds are known."""
    return _merge(base, experts, thresholds, brackets, weights, mode, lam, zero_sign)


def _merge(base, experts, thresholds, brackets, weights, mode, lam, zero_sign):
    if mode not in ("mean", "sum"):
        raise ValueError(f"unknown disjoint mode {mode!r}")
    flat_base, flat_experts = flat_views(base, experts)
    n = flat_base.shape[0]
    tasks = len(experts)
    below = np.empty(tasks, dtype=np.float32)
    low = np.full(tasks, np.inf, dtype=np.float32)  # counts nothing where there is no estimate to check
    high = np.full(tasks, np.inf, dtype=np.float32)
    open_low = np.full(tasks, np.inf, dtype=np.float32)  # open_low > open_high: nothing undecided
    open_high = np.full(tasks, -1.0, dtype=np.float32)
    for t, threshold in enumerate(thresholds):
        bracket = brackets[t] if brackets is not None else None
        if bracket is not None:
            low[t], high[t] = bracket
            if low[t] < high[t]:
                open_low[t], open_high[t] = low[t], high[t]
                below[t] = high[t]  # merged as if the bracket's values were dropped
                continue
            threshold = float(low[t])  # a guess: merged as the threshold
        if threshold <= 0.0:
            below[t] = -1.0  # |x| > -1 keeps every value (and -0 as -0, as the torch path's copy)
        elif threshold == float("inf"):
            below[t] = np.inf  # nothing is > inf: every value is dropped
        else:
            below[t] = np.nextafter(np.float32(threshold), np.float32(0.0))
    out = torch.empty(base.shape, dtype=torch.float32)
    index, alternative, undecided = _scratch(n)
    above = np.zeros(tasks, dtype=np.int64)
    reached = np.zeros(tasks, dtype=np.int64)
    # the loop that does only what is asked: the exact merge, checking estimates, or leaving elements undecided
    checks = brackets is not None and any(b is not None for b in brackets)
    loop = _kernels(widens(base))[4 if bool((open_low <= open_high).any()) else 3 if checks else 2]
    sign_sum, deferred, pending = loop(flat_base, flat_experts, below, low, high, open_low, open_high,
                                       np.asarray(weights, dtype=np.float32), mode == "mean", np.float32(lam),
                                       np.float32(zero_sign > 0), out.reshape(-1).numpy(), index.numpy(),
                                       alternative.numpy(), above, reached, undecided.numpy())
    return (out, int(sign_sum), index[:deferred].clone(), alternative[:deferred].clone(), undecided[:pending].clone(),
            torch.from_numpy(above), torch.from_numpy(reached))


# The sample the bracket of a whole-model trim comes from: runs of SAMPLE_RUN consecutive elements, every
# SAMPLE_EVERY-th run of the tensor (runs, not single elements: a run is a cache line or two, so the sample reads
# about 1/SAMPLE_EVERY of the memory; ~65M values per task of a 1.1B model). SAMPLE_EVERY is odd: along rows
# whose length is a multiple of SAMPLE_RUN the runs visit every column, not the same few (a column's values can
# differ in scale from the rest: a sample of a few columns would bracket the wrong value).
SAMPLE_RUN = 64
SAMPLE_EVERY = 17


def sampled_high_histograms(base: torch.Tensor, experts: Sequence[torch.Tensor], into: torch.Tensor,
                            irregular: torch.Tensor, offset: int = 0) -> int:
    """``high_histograms`` of a fixed sample of the chunk's elements (``offset`` its first element's in the
    tensor) added into ``into``, and the same of the sample's irregular keys (nonzero low bits) into
    ``irregular``; returns the sample's size (per task). A bin's regular values all equal its lowest value: in
    the difference of two bfloat16 inputs nearly every value is regular, so a bin is then mostly one value."""
    flat_base, flat_experts = flat_views(base, experts)
    runs = flat_base.shape[0] // SAMPLE_RUN
    first = -(offset // SAMPLE_RUN) % SAMPLE_EVERY

    def sample(flat: np.ndarray) -> np.ndarray:
        rows = flat[:runs * SAMPLE_RUN].reshape(runs, SAMPLE_RUN)[first::SAMPLE_EVERY]
        picked = np.ascontiguousarray(rows).reshape(-1)
        picked.flags.writeable = False  # the array type the loops were compiled for (``flat_views``)
        return picked

    sampled_base = sample(flat_base)
    size = int(sampled_base.shape[0])
    if not size:
        return 0
    tasks = len(experts)
    _kernels(widens(base))[0](sampled_base, tuple(sample(e) for e in flat_experts), _histogram(tasks, into).numpy(),
                              _key_scratch(tasks, size).numpy().view(np.uint32), np.zeros(tasks, dtype=np.int64),
                              _histogram(tasks, irregular).numpy())
    return size


_NO_BINS = np.zeros((1, 0), dtype=np.int64)  # the irregular keys' bins not counted
_SCRATCH = threading.local()


def _key_scratch(tasks: int, n: int) -> torch.Tensor:
    """int32[tasks, n], reused from chunk to chunk (every key of a chunk fits; the kept ones leave as copies)."""
    held = getattr(_SCRATCH, "keys", None)
    if held is None or held.numel() < tasks * n:
        held = _SCRATCH.keys = torch.empty(tasks * n, dtype=torch.int32)
    return held[:tasks * n].view(tasks, n)  # contiguous, whatever the chunk's size


def _scratch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Room for every element of a chunk to be deferred (index, value) or undecided (index), reused from chunk
    to chunk; they leave as exact-size torch tensors. (Fresh numpy arrays per chunk, freed around the long-lived
    deferred copies, fragmented the heap: a worker's peak memory doubled on a 1.1B merge.)"""
    held = getattr(_SCRATCH, "tensors", None)
    if held is None or held[0].shape[0] < n:
        held = _SCRATCH.tensors = (torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float32),
                                   torch.empty(n, dtype=torch.int64))
    return held[0][:n], held[1][:n], held[2][:n]
