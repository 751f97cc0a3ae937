"""Unit tests of the next methods' pure math (issue 17): sparsify, model_stock, slerp, svd_merge, regmean.

CPU only, no Ray, seconds. For each op: values computed by hand on tiny tensors, a flat single-process
reference of the paper's (or official code's) formula written out here, the invariants of the issue, and,
where mergekit 0.1.5 has the method, values recorded once from mergekit 0.1.5's own functions.

Recorded mergekit values: computed with the PyPI mergekit 0.1.5 wheel's ``mergekit.sparsify``,
``merge_methods.model_stock``, ``merge_methods.slerp.slerp`` and ``merge_methods.nuslerp.nuslerp`` under the
project venv's torch (2.13.0+cpu), on the inputs built by the same code as here; float tensors as printed by
``tolist()``, larger ones as the first 16 hex digits of sha256 of their bytes (``digest``). Tie order and last
bits are torch's, so a torch upgrade may move the digests: re-record them the same way.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from distmerge.ops import dare, model_stock, regmean, slerp, sparsify, svd_merge
from distmerge.ops.ties import mergekit_magnitude_mask

T = torch.tensor


def close(actual, expected, atol=1e-6):
    expected = expected if isinstance(expected, torch.Tensor) else torch.tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected.to(actual.dtype), atol=atol, rtol=0), f"\n{actual}\n!=\n{expected}"


def digest(tensor: torch.Tensor) -> str:
    data = tensor.contiguous()
    raw = data.numpy().tobytes() if data.dtype == torch.bool else data.view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


def kept(mask: torch.Tensor) -> list:
    return mask.reshape(-1).nonzero().flatten().tolist()


def seeded(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


X10 = T([0.5, -3, 1, -2, 0, 4, 2.5, -1.5, 0.1, -0.2])
# |X10| ascending: 0 (i4) .1 (i8) .2 (i9) .5 (i0) 1 (i2) 1.5 (i7) 2 (i3) 2.5 (i6) 3 (i1) 4 (i5)


def tied(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic values with many equal magnitudes (no RNG, so the same on every torch)."""
    index = torch.arange(numel, dtype=torch.float64)
    return (((index * 7919) % 613 - 306) / 64).to(dtype)


# =====================================================================================================
# Breadcrumbs: outlier masks
# =====================================================================================================


@pytest.mark.parametrize(
    "density, gamma, expected",
    [
        (0.5, 0.1, [1, 2, 3, 6, 7]),  # keep 5 below the top 1: ranks 5..9 (1, 1.5, 2, 2.5, 3)
        (0.3, 0.0, [1, 5, 6]),  # gamma 0: the top 3 (2.5, 3, 4)
        (0.8, 0.4, [0, 2, 3, 6, 7, 8, 9]),  # 8 + 4 > 10: the 8 smallest (i4 = 0 is kept but reads as 0)
        (0.0, 0.4, []),  # k = 0 keeps nothing
        (1.0, 0.3, [0, 1, 2, 3, 5, 6, 7, 8, 9]),  # density 1 keeps all whatever gamma (i4 is 0)
        (0.5, 0.0, [1, 3, 5, 6, 7]),
    ],
)
def test_mergekit_outlier_mask_hand_and_recorded(density, gamma, expected):
    # ``expected`` = nonzero positions of mergekit 0.1.5's magnitude_outliers(X10, density, gamma=gamma),
    # which is also what the hand ranks above give.
    mask = sparsify.mergekit_outlier_mask(X10, density, gamma)
    assert kept(X10 * mask) == expected


def test_mergekit_outlier_mask_clamp_keeps_k_smallest():
    # density 0.8, gamma 0.4 on 10: n_bot = max(0, 10 - 8 - 4) = 0, so the 8 smallest are kept (i5, i1 dropped)
    mask = sparsify.mergekit_outlier_mask(X10, 0.8, 0.4)
    assert kept(mask) == [0, 2, 3, 4, 6, 7, 8, 9]


def test_mergekit_outlier_mask_ties_recorded():
    values = T([1.0, 1, 1, -1, 2, 0, 1, 1])  # six magnitudes tie at 1
    assert kept(values * sparsify.mergekit_outlier_mask(values, 0.5, 0.125)) == [2, 3, 6, 7]  # mergekit 0.1.5


@pytest.mark.parametrize(
    "numel, dtype, density, gamma, count, expected",
    [
        (4096, torch.float32, 0.3, 0.05, 1228, "510170cd7d12dcb4"),
        (4096, torch.float32, 0.5, 0.0, 2048, "7126350a90a35219"),
        (5000, torch.bfloat16, 0.3, 0.05, 1500, "3c0878b33d984ff4"),
        (5000, torch.bfloat16, 0.5, 0.0, 2500, "22b596998be2cce3"),
        (70000, torch.bfloat16, 0.3, 0.05, 21000, "e62ba90b5d5b0b53"),
        (70000, torch.bfloat16, 0.5, 0.0, 35000, "d2192078b3229981"),
    ],
)
def test_mergekit_outlier_mask_tie_order_matches_recorded(numel, dtype, density, gamma, count, expected):
    """Heavily tied tensors (bf16 as mergekit sees a bf16 merge): 0.1.5's unstable sort order, bit for bit."""
    values = tied(numel, dtype)
    survivors = (values * sparsify.mergekit_outlier_mask(values, density, gamma).to(dtype)) != 0
    assert int(survivors.sum()) == count
    assert digest(survivors) == expected


def reference_breadcrumbs(values: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The paper's rule by a Python sort of (|x|, index): drop the int(g n) largest, keep int(d n) below them."""
    flat = values.reshape(-1).tolist()
    ranked = sorted(range(len(flat)), key=lambda i: (abs(flat[i]), i))
    n, top, keep = len(flat), int(gamma * len(flat)), int(density * len(flat))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ranked[n - top - keep:n - top]] = True
    return mask.reshape(values.shape)


@pytest.mark.parametrize("density, gamma", [(0.5, 0.1), (0.3, 0.0), (0.2, 0.05), (0.9, 0.1), (1.0, 0.0), (0.0, 0.0)])
def test_outlier_mask_native_against_reference(density, gamma):
    for values in (X10, seeded(1, 37, 11), tied(999, torch.bfloat16).reshape(27, 37)):
        assert torch.equal(sparsify.outlier_mask(values, density, gamma), reference_breadcrumbs(values, density, gamma))


def test_outlier_mask_native_hand():
    assert kept(sparsify.outlier_mask(X10, 0.5, 0.1)) == [1, 2, 3, 6, 7]
    values = T([1.0, 1, 1, -1, 2, 0, 1, 1])  # the tied ones rank in index order: i0 < i1 < i2 < i3 < i6 < i7
    assert kept(sparsify.outlier_mask(values, 0.5, 0.125)) == [2, 3, 6, 7]
    assert kept(sparsify.outlier_mask(values, 0.25, 0.125)) == [6, 7]


def test_outlier_mask_native_gamma_zero_is_magnitude_top_k():
    for seed, density in [(2, 0.3), (3, 0.5), (4, 0.05)]:
        values = seeded(seed, 16, 24)  # continuous values: no ties, so top-k is unique
        assert torch.equal(sparsify.outlier_mask(values, density, 0.0), mergekit_magnitude_mask(values, density))


def test_outlier_mask_native_refuses_contradictory_fractions():
    with pytest.raises(ValueError, match="density \\+ gamma"):
        sparsify.outlier_mask(X10, 0.95, 0.1)


def test_outlier_masks_keep_device_and_shape():
    values = seeded(5, 3, 4, 5)
    for mask in (sparsify.outlier_mask(values, 0.5, 0.1), sparsify.mergekit_outlier_mask(values, 0.5, 0.1)):
        assert mask.shape == values.shape and mask.dtype == torch.bool and mask.device == values.device
        assert int(mask.sum()) == 30


# =====================================================================================================
# DELLA: keep probabilities, counter-based mask, rescales
# =====================================================================================================

R2 = T([[0.5, -3, 1, -2, 0], [4, 2.5, -1.5, 0.1, -0.2]])


def test_della_probabilities_hand_and_recorded():
    # row 0 ranks (|.| ascending): i4=1, i0=2, i2=3, i3=4, i1=5 -> (r-1)/4 = .25 1 .5 .75 0; p = .4 + .2 * that
    # (the same numbers as mergekit 0.1.5's della_magprune(R2, 0.5, 0.1) hands torch.bernoulli, in float32)
    expected = [[0.45, 0.6, 0.5, 0.55, 0.4], [0.6, 0.55, 0.5, 0.4, 0.45]]
    close(sparsify.della_keep_probabilities(R2, 0.5, 0.1), T(expected, dtype=torch.float64), atol=1e-12)
    one_row = sparsify.della_keep_probabilities(R2[0], 0.5, 0.1)  # a 1-D tensor is one row
    close(one_row, T(expected[0], dtype=torch.float64), atol=1e-12)


def reference_della_probabilities(values: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune per row, by Python sorting (the official ``rank_magnitude``: ranks 1..m, min-max normed)."""
    rows = values.reshape(values.shape[0], -1) if values.dim() == 2 else values.reshape(1, -1)
    out = torch.empty(rows.shape, dtype=torch.float64)
    for r, row in enumerate(rows.tolist()):
        order = sorted(range(len(row)), key=lambda i: (abs(row[i]), i))
        for rank, i in enumerate(order, start=1):
            out[r, i] = (density - epsilon) + 2 * epsilon * (rank - 1) / (len(row) - 1)
    return out.reshape(values.shape)


def test_della_probabilities_against_reference():
    for values, density, epsilon in [(seeded(6, 6, 50), 0.6, 0.2), (seeded(7, 40), 0.3, 0.1),
                                     (tied(300, torch.bfloat16).reshape(10, 30), 0.5, 0.15)]:
        close(sparsify.della_keep_probabilities(values, density, epsilon),
              reference_della_probabilities(values, density, epsilon), atol=1e-12)


def float32_della_probabilities(values: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """mergekit 0.1.5's arithmetic on the CPU: float32 ranks + 1, min-max normed, (d - e) + rn * 2e."""
    ranks = values.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    return (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon


def test_della_probabilities_match_mergekit_recorded():
    # digest of the probabilities mergekit 0.1.5's della_magprune(values, 0.6, 0.2) hands torch.bernoulli
    values = torch.randn(6, 50, generator=torch.Generator().manual_seed(5))
    mergekit_like = float32_della_probabilities(values, 0.6, 0.2)
    assert digest(mergekit_like) == "c01d861c7cf048ae"
    # ours are the same numbers in float64 (the stream's thresholds need no float32 rounding)
    close(sparsify.della_keep_probabilities(values, 0.6, 0.2).float(), mergekit_like, atol=1e-7)
    # tensors of more dimensions rank along dim 1, as 0.1.5's argsort(dim=1)
    cube = seeded(53, 3, 7, 4)
    close(sparsify.della_keep_probabilities(cube, 0.5, 0.1).float(), float32_della_probabilities(cube, 0.5, 0.1),
          atol=1e-7)


@pytest.mark.parametrize("density, epsilon", [(0.5, 0.5), (0.9, 0.1), (0.1, 0.2), (0.5, -0.1)])
def test_della_window_refused(density, epsilon):
    with pytest.raises(ValueError, match="della needs"):
        sparsify.della_keep_probabilities(R2, density, epsilon)


def test_della_probabilities_edges():
    assert torch.equal(sparsify.della_keep_probabilities(R2, 1.0, 0.3), torch.ones(2, 5, dtype=torch.float64))
    assert torch.equal(sparsify.della_keep_probabilities(R2, 0.0, 0.3), torch.zeros(2, 5, dtype=torch.float64))
    # rows of one element have no rank order (mergekit 0.1.5 fails on them): the mean probability
    close(sparsify.della_keep_probabilities(T([[3.0], [-1.0]]), 0.4, 0.1), T([[0.4], [0.4]], dtype=torch.float64))


def test_della_density_one_no_epsilon_keeps_everything():
    values = seeded(8, 12, 9)
    probability = sparsify.della_keep_probabilities(values, 1.0, 0.0)
    keep = sparsify.della_keep_mask(probability, 1, "m", "w", values.numel())
    assert bool(keep.all())
    assert torch.equal(sparsify.inverse_probability_rescale(values, keep, probability), values)
    assert torch.equal(sparsify.masked_l1_rescale(values, keep), values)


def test_della_constant_probability_is_dare_mask():
    """epsilon 0: p = density everywhere, and the mask is DARE's for drop rate 1 - density, bit for bit."""
    numel = 3 * dare.MASK_BLOCK // 2 + 17  # crosses a block boundary
    probability = torch.full((numel,), 0.7, dtype=torch.float64)
    della = sparsify.della_keep_mask(probability, 42, "expert", "layers.0.w", numel)
    assert torch.equal(della, dare.keep_mask(1 - 0.7, 42, "expert", "layers.0.w", numel, 0, numel))


def test_della_mask_hand_from_stream_words():
    """Kept iff the element's stream word >= round((1 - p) * 65536)."""
    probability = T([0.0, 0.25, 0.5, 0.75, 1.0, 0.5], dtype=torch.float64)
    words = dare.stream_words(3, "a", "b", 6, 0, 6).astype(np.int64)
    expected = words >= np.array([65536, 49152, 32768, 16384, 0, 32768])
    assert sparsify.della_keep_mask(probability, 3, "a", "b", 6).tolist() == expected.tolist()


def test_della_mask_is_the_same_under_any_chunking():
    rows, columns = 40, 3000
    values = seeded(9, rows, columns)
    probability = sparsify.della_keep_probabilities(values, 0.4, 0.15)
    whole = sparsify.della_keep_mask(probability, 7, "m", "t", values.numel())
    pieces = [sparsify.della_keep_mask(probability[lo:hi], 7, "m", "t", values.numel(), start=lo * columns)
              for lo, hi in [(0, 1), (1, 17), (17, 40)]]
    assert torch.equal(torch.cat(pieces), whole)
    # the draw follows p: the top ranks survive more often (deterministic: fixed seed)
    rate_low = whole[probability < 0.3].float().mean()
    rate_high = whole[probability > 0.5].float().mean()
    assert abs(float(whole.float().mean()) - 0.4) < 0.01 and rate_low < 0.3 < 0.5 < rate_high


def test_della_mask_depends_on_seed_model_tensor():
    probability = torch.full((1000,), 0.5, dtype=torch.float64)
    base = sparsify.della_keep_mask(probability, 1, "m", "t", 1000)
    for other in [(2, "m", "t"), (1, "n", "t"), (1, "m", "u")]:
        assert not torch.equal(base, sparsify.della_keep_mask(probability, *other, 1000))


def test_della_rescales_hand_and_recorded():
    keep = T([[1, 0, 1, 0, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    probability = sparsify.della_keep_probabilities(R2, 0.5, 0.1)
    # paper: tau / p where kept: .5/.45, 1/.5, 0/.4 ; 2.5/.55, -1.5/.5
    close(sparsify.inverse_probability_rescale(R2, keep, probability),
          [[0.5 / 0.45, 0, 2.0, 0, 0], [0, 2.5 / 0.55, -3.0, 0, 0]])
    # mergekit (rescale: l1): sum|R2| = 14.8, kept sum 5.5 -> x 2.690909; recorded from mergekit 0.1.5's
    # della_magprune(R2, 0.5, 0.1, rescale_norm=l1) with torch.bernoulli returning this mask
    recorded = [[1.3454545736312866, -0.0, 2.6909091472625732, -0.0, 0.0],
                [0.0, 6.727272987365723, -4.03636360168457, 0.0, -0.0]]
    assert sparsify.masked_l1_rescale(R2, keep).tolist() == recorded


# =====================================================================================================
# Breadcrumbs and DELLA without full sorts (issue 18): the fast paths against the sort-based formulation
# =====================================================================================================


def sort_outlier_mask(values: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The native cut as it was computed before issue 18: a stable sort of |x| in float32, sliced."""
    numel = values.numel()
    keep, top = int(density * numel), int(gamma * numel)
    order = torch.sort(values.abs().float().reshape(-1), stable=True).indices
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[max(0, numel - top - keep):numel - top]] = True
    return mask.reshape(values.shape)


def sort_della_probabilities(values: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's probabilities as computed before issue 18: stable row sort in float32, arange scattered."""
    if density >= 1 or density <= 0:
        return torch.full(values.shape, 1.0 if density >= 1 else 0.0, dtype=torch.float64)
    rows = values.unsqueeze(0) if values.dim() < 2 else values
    length = rows.shape[1]
    if length < 2:
        return torch.full(values.shape, float(density), dtype=torch.float64)
    order = torch.sort(rows.abs().float(), dim=1, stable=True).indices
    shape = [1] * rows.dim()
    shape[1] = length
    rank_norm = torch.empty(rows.shape, dtype=torch.float64)
    rank_norm.scatter_(1, order, torch.arange(length, dtype=torch.float64).reshape(shape).expand(rows.shape))
    rank_norm /= length - 1
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(values.shape)


def sort_della_prune(values, density, epsilon, rescale, seed, model, tensor):
    """DELLA's stage before issue 18: per-element probabilities, the stream's mask, the rescale."""
    probability = sort_della_probabilities(values, density, epsilon)
    keep = torch.from_numpy(dare.stream_words(seed, model, tensor, values.numel(), 0, values.numel())
                            >= sparsify.drop_thresholds(probability)).reshape(values.shape)
    if rescale == "inverse":
        kept = values.to(torch.float64) / probability.clamp(min=1e-300)
        return torch.where(keep, kept, torch.zeros((), dtype=torch.float64)).to(values.dtype)
    if rescale == "l1":
        return sparsify.masked_l1_rescale(values, keep)
    return values * keep.to(values.dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bytes (signed zeros and NaN payloads included), same dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and digest(a) == digest(b)


def few_levels(seed: int, shape, dtype, levels: int = 7) -> torch.Tensor:
    """Seeded values on a few magnitudes with both signs (ties everywhere), plus zeros of both signs."""
    generator = torch.Generator().manual_seed(seed)
    level = torch.randint(0, levels, shape, generator=generator).to(torch.float64) / 4
    sign = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
    return (level * sign).to(dtype)


DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def test_magnitude_keys_order_and_tie_as_the_float32_sort():
    specials = [0.0, -0.0, 1e-45, -1e-40, 6e-8, 1.0, -1.0, 65504.0, 3e38, float("inf"), -float("inf"),
                float("nan"), -float("nan"), 1e300, -1e-300]
    for dtype in DTYPES:
        values = torch.cat([T(specials, dtype=torch.float64).to(dtype), seeded(12, 200, dtype=dtype),
                            few_levels(13, (100,), dtype)])
        if dtype != torch.float64:  # NaNs of other payloads (torch ties them all): built from bit patterns
            bits = torch.int16 if values.element_size() == 2 else torch.int32
            patterns = [0x7C01, -0x0201, 0x7F81, 0x7E00] if bits == torch.int16 else [0x7F800001, -0x00400001]
            values = torch.cat([values, T(patterns, dtype=bits).view(dtype), values[:20]])
        keys = sparsify.magnitude_keys(values)
        assert keys.dtype == (torch.int16 if dtype in (torch.bfloat16, torch.float16) else torch.int32)
        expected = torch.sort(values.abs().float(), stable=True).indices
        assert torch.equal(torch.sort(keys, stable=True).indices, expected), dtype
        assert torch.equal(sparsify.ascending_magnitude_order(values), expected), dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_outlier_mask_equals_the_stable_sort_cut(dtype):
    cuts = [(0.9, 0.01), (0.5, 0.1), (0.3, 0.0), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.02, 0.97),
            (0.37, 0.2)]
    tensors = [few_levels(14, (61, 53), dtype), few_levels(15, (997,), dtype, levels=2),
               seeded(16, 40, 37, dtype=dtype), torch.zeros(50, dtype=dtype), few_levels(17, (3, 5, 7), dtype)]
    for values in tensors:
        for density, gamma in cuts:
            assert torch.equal(sparsify.outlier_mask(values, density, gamma),
                               sort_outlier_mask(values, density, gamma)), (values.shape, density, gamma)


def test_outlier_mask_ties_inside_one_key_and_the_int32_radix():
    # both cuts inside one run of equal keys: ascending ranks are i9 (0), i1..i8 (the 1s, by index), i0 (5);
    # keep 3 below the top 2 = ranks 5, 6, 7 = occurrences 4..6 of the run of 1s
    values = T([5.0, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    assert kept(sparsify.outlier_mask(values, 0.3, 0.2)) == [5, 6, 7]
    # float32 keys far apart in their high 16 bits, ties straddling both cuts
    values = T([3e-30, 1.0, 3e-30, 1e20, 1.0, 3e-30, 1e20, 1.0, 2.0, 1e20])
    for density, gamma in [(0.3, 0.2), (0.5, 0.1), (0.2, 0.0), (0.6, 0.3)]:
        assert torch.equal(sparsify.outlier_mask(values, density, gamma), sort_outlier_mask(values, density, gamma))
    assert sparsify.keys_at_ranks(sparsify.magnitude_keys(values), (0, 2, 3, 9)) == [
        (int(T(3e-30).view(torch.int32)), 0), (int(T(3e-30).view(torch.int32)), 0),
        (int(T(1.0).view(torch.int32)), 3), (int(T(1e20).view(torch.int32)), 7)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_della_prune_equals_the_sort_formulation(dtype, monkeypatch):
    monkeypatch.setattr(sparsify, "BLOCK_ELEMENTS", 150)  # several blocks of rows, and a ragged last one
    tensors = [few_levels(18, (23, 41), dtype), few_levels(19, (300,), dtype, levels=3),
               seeded(20, 9, 64, dtype=dtype), few_levels(21, (9, 6, 5), dtype), few_levels(22, (5, 1), dtype)]
    settings = [(0.7, 0.15), (0.5, 0.0), (0.2, 0.19), (1.0, 0.3), (0.0, 0.3)]
    for values in tensors:
        before = values.clone()
        for density, epsilon in settings:
            for rescale in ("inverse", "l1", "none"):
                fast = sparsify.della_prune(values, density, epsilon, rescale, 4, "m", "w", values.numel())
                slow = sort_della_prune(values, density, epsilon, rescale, 4, "m", "w")
                assert same_bits(fast, slow), (values.shape, density, epsilon, rescale)
        assert same_bits(values, before)  # the input is not worked on in place (float64 blocks are no copies)
        assert torch.equal(sparsify.della_keep_probabilities(values, 0.6, 0.2),
                           sort_della_probabilities(values, 0.6, 0.2))


def test_della_prune_refuses_the_window_and_keeps_the_chunk_offset():
    with pytest.raises(ValueError, match="della needs"):
        sparsify.della_prune(R2, 0.5, 0.5, "inverse", 0, "m", "w", R2.numel())
    # a chunk of whole rows at flat offset 5 of a 10-element tensor draws the words [5, 10)
    probability = sparsify.della_keep_probabilities(R2[1:], 0.5, 0.1)
    keep = sparsify.della_keep_mask(probability, 3, "m", "w", 10, start=5)
    assert same_bits(sparsify.della_prune(R2[1:], 0.5, 0.1, "none", 3, "m", "w", 10, start=5),
                     R2[1:] * keep.to(R2.dtype))


# =====================================================================================================
# Model stock
# =====================================================================================================


def test_model_stock_hand_and_recorded():
    # d1 = [1, 0], d2 = [1, 1]: cos = 1/sqrt 2, t = 2c / (1 + c) = 2 (sqrt 2 - 1); mean = [1, .5]
    t = 2 * (math.sqrt(2) - 1)
    merged = model_stock.model_stock(torch.zeros(2), [T([1.0, 0]), T([1.0, 1])])
    close(merged, [t, t / 2])
    assert merged.tolist() == [0.8284270763397217, 0.41421353816986084]  # mergekit 0.1.5


def test_model_stock_singular_keeps_base():
    # d1 = [1, 0], d2 = [-1, 0]: cos = -1, 1 + (N - 1) cos = 0 -> t = 0 (0.1.5's rule), the base
    assert model_stock.model_stock(T([1.0, 1]), [T([2.0, 1]), T([0.0, 1])]).tolist() == [1.0, 1.0]
    close(model_stock.interpolation_ratio(T([-1.0, 0.0, 1.0]), 2), [0.0, 0.0, 1.0])


def test_model_stock_identical_experts_give_the_expert():
    base, expert = seeded(10, 5, 7), seeded(11, 5, 7)
    for filter_wise in (False, True):
        close(model_stock.model_stock(base, [expert, expert.clone(), expert.clone()], filter_wise), expert, atol=1e-5)


def test_model_stock_needs_two_experts():
    with pytest.raises(ValueError, match="at least 2 experts"):
        model_stock.model_stock(torch.zeros(3), [torch.ones(3)])


def _model_stock_inputs():
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(4, 6, generator=generator)
    experts = [base + 0.1 * torch.randn(4, 6, generator=generator) for _ in range(3)]
    return base, experts


MS_RECORDED = {  # mergekit 0.1.5 model_stock_merge_method.merge_group(base, 3 experts, filter_wise=...)
    False: [[-0.510973334312439, 1.0278568267822266, -0.35440370440483093, 0.12309420853853226, -0.1814710944890976,
             -1.4999783039093018],
            [0.14058136940002441, -0.5238854289054871, 0.0735483318567276, -0.18369877338409424, 0.7959128022193909,
             0.9596556425094604],
            [0.7787371277809143, 0.4825325310230255, -1.8289715051651, -0.5535373687744141, 1.9114254713058472,
             0.2970430552959442],
            [-0.7024034261703491, 0.5000825524330139, -0.04955960437655449, 1.3253165483474731, 0.923058271408081,
             0.22572021186351776]],
    True: [[-0.5142375826835632, 1.020151138305664, -0.3776509165763855, 0.1250046193599701, -0.17992298305034637,
            -1.5510410070419312],
           [0.17076735198497772, -0.5317528247833252, 0.09120313078165054, -0.19552555680274963, 0.7983691692352295,
            0.9513059258460999],
           [0.7662060260772705, 0.4831521511077881, -1.8326281309127808, -0.49696338176727295, 1.9073097705841064,
            0.3203755021095276],
           [-0.6764284372329712, 0.5270058512687683, -0.06084137409925461, 1.3278053998947144, 0.9087446331977844,
            0.22863174974918365]],
}


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit_recorded(filter_wise):
    base, experts = _model_stock_inputs()
    assert model_stock.model_stock(base, experts, filter_wise).tolist() == MS_RECORDED[filter_wise]


def test_model_stock_bf16_matches_mergekit_recorded():
    base, experts = _model_stock_inputs()
    base, experts = base.to(torch.bfloat16), [e.to(torch.bfloat16) for e in experts]
    assert digest(model_stock.model_stock(base, experts, False)) == "bff27729952f1670"
    assert digest(model_stock.model_stock(base, experts, True)) == "a93fee39f3d643bc"


def reference_model_stock(base, experts, rows: bool):
    """The formula in float64, by loops: cos per pair over the flattened tensor or each row."""
    base64 = base.double().reshape(base.shape[0], -1) if rows else base.double().reshape(1, -1)
    offsets = [e.double().reshape(base64.shape) - base64 for e in experts]
    n = len(experts)
    out = torch.empty_like(base64)
    for r in range(base64.shape[0]):
        pairs = [float(offsets[i][r] @ offsets[j][r]) / max(float(offsets[i][r].norm() * offsets[j][r].norm()), 1e-6)
                 for i in range(n) for j in range(i + 1, n)]
        cos = sum(min(max(c, -1.0), 1.0) for c in pairs) / len(pairs)
        t = n * cos / (1 + (n - 1) * cos)
        out[r] = t * sum(e.double().reshape(base64.shape)[r] for e in experts) / n + (1 - t) * base64[r]
    return out.reshape(base.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_against_reference(filter_wise):
    base, experts = seeded(12, 8, 16), [seeded(13 + i, 8, 16) * 0.1 + seeded(12, 8, 16) for i in range(4)]
    expected = reference_model_stock(base, experts, filter_wise).float()
    close(model_stock.model_stock(base, experts, filter_wise), expected, atol=1e-5)


# =====================================================================================================
# SLERP and NuSLERP
# =====================================================================================================


def test_slerp_hand_and_recorded():
    # a = [2, 0], b = [0, 4]: W = pi/2, t = .5 -> sin(pi/4) (a + b) (unnormalized tensors)
    assert slerp.slerp(0.5, T([2.0, 0]), T([0.0, 4])).tolist() == [1.4142135381698608, 2.8284270763397217]
    # t = 1/3: sin(pi/3) a + sin(pi/6) b
    assert slerp.slerp(1 / 3, T([1.0, 0]), T([0.0, 1])).tolist() == [0.8660253286361694, 0.5]
    # a zero endpoint: 0.1.5 counts its norm as 1, so cos = 0 and it gives sin(t pi/2) b, not the lerp t b
    assert slerp.slerp(0.5, T([0.0, 0]), T([0.0, 2])).tolist() == [0.0, 1.4142135381698608]
    # collinear: the lerp .75 a + .25 b
    assert slerp.slerp(0.25, T([1.0, 2]), T([3.0, 6])).tolist() == [1.5, 3.0]


def test_slerp_endpoints_and_collinear():
    a, b = seeded(14, 9, 5), seeded(15, 9, 5)
    close(slerp.slerp(0.0, a, b), a, atol=1e-6)
    close(slerp.slerp(1.0, a, b), b, atol=1e-6)
    close(slerp.slerp(0.3, a, -2 * a), 0.7 * a + 0.3 * (-2 * a))  # antipodal counts as collinear too
    nearly = a + 1e-3 * b  # cos > 0.9995 -> lerp
    assert torch.equal(slerp.slerp(0.4, a, nearly), (0.6 * a + 0.4 * nearly))


def reference_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The textbook formula in float64 on the flattened tensors."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    cos = float((x / x.norm()) @ (y / y.norm()))
    omega = math.acos(cos)
    return ((math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)).reshape(a.shape)


def test_slerp_against_reference():
    a, b = seeded(16, 30, 20), seeded(17, 30, 20)
    for t in (0.1, 0.5, 0.85):
        close(slerp.slerp(t, a, b), reference_slerp(t, a, b).float(), atol=1e-5)


def test_slerp_matches_mergekit_recorded_bits():
    """1.2M elements (two 2**20 chunks), in float32, bf16 and float64: 0.1.5's slerp of a one-tensor batch."""
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(1200, 1000, generator=generator)
    b = a + 0.5 * torch.randn(1200, 1000, generator=generator)
    assert digest(slerp.slerp(0.3, a, b)) == "64481fc6c950bd7a"
    merged_bf16 = slerp.slerp(0.3, a.to(torch.bfloat16), b.to(torch.bfloat16))
    assert merged_bf16.dtype == torch.bfloat16 and digest(merged_bf16) == "da99403cee9ef759"
    assert digest(slerp.slerp(0.7, a.double(), b.double())) == "772e57f69290b03d"


def test_slerp_coefficients_make_chunks_elementwise():
    a, b = seeded(18, 6, 10), seeded(19, 6, 10)
    coef_a, coef_b = slerp.slerp_coefficients(0.35, slerp.slerp_cosine(a, b))
    pieces = torch.cat([slerp.combine(a[i:i + 2], b[i:i + 2], coef_a, coef_b) for i in range(0, 6, 2)])
    assert torch.equal(pieces, slerp.slerp(0.35, a, b))


NU0 = T([[1.0, 0], [0, 1]])
NU1 = T([[0.0, 1], [0, 1]])


def test_nuslerp_hand_and_recorded():
    # flatten (default): cos = 1/2, W = pi/3, t = .5 -> (v0 + v1) sin(pi/6) / sin(pi/3) = (v0 + v1) / sqrt 3
    s3 = 1 / math.sqrt(3)
    flat = slerp.nuslerp([NU0, NU1], [1.0, 1.0])
    close(flat, [[s3, s3], [0, 2 * s3]])
    assert flat.tolist() == [[0.5773502588272095, 0.5773502588272095], [0.0, 1.154700517654419]]  # mergekit 0.1.5
    # per row (last axis): row 0 at a right angle, row 1 identical -> collinear lerp
    rows = slerp.nuslerp([NU0, NU1], [1.0, 1.0], flatten=False)
    assert rows.tolist() == [[0.7071067690849304, 0.7071067690849304], [0.0, 1.0]]
    # row_wise (first axis = columns): column 0 against a zero column (cos 0: sin(pi/4) [1, 0]); column 1:
    # [0, 1] vs [1, 1], W = pi/4 -> sin(pi/8)/sin(pi/4) [1, 2]
    cols = slerp.nuslerp([NU0, NU1], [1.0, 1.0], row_wise=True, flatten=False)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(cols, [[math.sqrt(0.5), c], [0, 2 * c]])
    assert cols.tolist() == [[0.7071067690849304, 0.5411961674690247], [0.0, 1.0823923349380493]]


@pytest.mark.parametrize("row_wise, flatten, expected",
                         [(False, True, "62a070754067d2d2"), (False, False, "1079a69a67237e8c"),
                          (True, False, "8ff0f277c383ea68")])
def test_nuslerp_with_base_matches_mergekit_recorded(row_wise, flatten, expected):
    # mergekit 0.1.5: base + nuslerp(0.25, x - base, y - base, dim=0 if row_wise else -1, flatten=flatten)
    generator = torch.Generator().manual_seed(4)
    x, y, base = (torch.randn(5, 7, generator=generator) for _ in range(3))
    assert digest(slerp.nuslerp([x, y], [3.0, 1.0], base, row_wise, flatten)) == expected  # t = 1 / (3 + 1)


def test_nuslerp_t_and_refusals():
    assert slerp.nuslerp_t([1.0, 3.0]) == 0.75
    assert slerp.nuslerp_t([1.0, -1.0]) == 0.5
    with pytest.raises(ValueError, match="exactly 2"):
        slerp.nuslerp([NU0, NU1, NU0], [1.0, 1.0, 1.0])
    a, b = seeded(20, 4, 4), seeded(21, 4, 4)
    close(slerp.nuslerp([a, b], [1.0, 0.0]), a, atol=1e-6)  # t = 0 and t = 1 are the endpoints
    close(slerp.nuslerp([a, b], [0.0, 1.0]), b, atol=1e-6)


# =====================================================================================================
# TSV-M, Iso-C, Iso-CTS
# =====================================================================================================


def test_tsv_hand():
    # tau_1 = diag(3, 1), tau_2 = diag(0, 2); k = 2 // 2 = 1: e1 (3) from task 1, e2 (2) from task 2 -> diag(3, 2)
    task_vectors = torch.stack([torch.diag(T([3.0, 1])), torch.diag(T([0.0, 2]))])
    close(svd_merge.tsv_delta(task_vectors), torch.diag(T([3.0, 2])), atol=1e-6)
    assert svd_merge.tsv_rank(6, 4, 3) == 1 and svd_merge.tsv_rank(4096, 11008, 3) == 1365


def reference_tsv(task_vectors: torch.Tensor) -> torch.Tensor:
    """The official compute_and_sum_svd_mem_reduction for one key: zero-padded r-wide stacks, multi_dot."""
    tasks = task_vectors.shape[0]
    for i in range(tasks):
        u, s, v = torch.linalg.svd(task_vectors[i], full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        k = int(s.shape[0] * (1 / tasks))
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


@pytest.mark.parametrize("tasks, rows, columns", [(3, 12, 9), (2, 8, 8), (4, 10, 23), (3, 7, 7)])
def test_tsv_against_official_formula(tasks, rows, columns):
    task_vectors = seeded(22, tasks, rows, columns, dtype=torch.float64)
    close(svd_merge.tsv_delta(task_vectors), reference_tsv(task_vectors), atol=1e-10)


def test_tsv_one_task_full_rank_is_task_arithmetic():
    tau = seeded(23, 1, 9, 6)
    close(svd_merge.tsv_delta(tau), tau[0], atol=1e-5)
    base = seeded(24, 9, 6)
    close(svd_merge.merge("tsv", base, tau, alpha=0.5), base + 0.5 * tau[0], atol=1e-5)


def test_tsv_more_tasks_than_rank_is_zero():
    assert torch.equal(svd_merge.tsv_delta(seeded(25, 5, 3, 4)), torch.zeros(3, 4))


def test_iso_c_hand():
    # M = diag(3, 1) + diag(1, 1) = diag(4, 2): mean singular value 3 -> 3 I
    task_vectors = torch.stack([torch.diag(T([3.0, 1])), torch.diag(T([1.0, 1]))])
    close(svd_merge.iso_c_delta(task_vectors), 3 * torch.eye(2), atol=1e-6)


def reference_iso_c(task_vectors: torch.Tensor) -> torch.Tensor:
    """The official iso_c for one 2-D key."""
    tvs = list(task_vectors)
    new = sum(tvs) / len(tvs) * len(tvs)
    u, s, v = torch.linalg.svd(new, full_matrices=False)
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), v))


def test_iso_c_against_official_formula():
    task_vectors = seeded(26, 3, 11, 7, dtype=torch.float64)
    close(svd_merge.iso_c_delta(task_vectors), reference_iso_c(task_vectors), atol=1e-10)


def test_iso_c_one_task_invariants():
    """One task: Iso-C keeps tau's singular vectors and nuclear norm and flattens its spectrum to the mean, so
    it is task arithmetic exactly when tau's singular values are equal (tau = c Q, Q orthonormal); and it only
    ever sees the sum, so T tasks give what one task tau = sum_t tau_t gives."""
    tau = seeded(27, 8, 5, dtype=torch.float64)
    delta = svd_merge.iso_c_delta(tau.unsqueeze(0))
    s = torch.linalg.svdvals(tau)
    close(torch.linalg.svdvals(delta), torch.full((5,), float(s.mean()), dtype=torch.float64), atol=1e-10)
    close(torch.linalg.matrix_norm(delta, "nuc"), torch.linalg.matrix_norm(tau, "nuc"), atol=1e-10)
    u, _, vh = torch.linalg.svd(tau, full_matrices=False)
    close(delta, s.mean() * (u @ vh), atol=1e-10)
    flat = 2.5 * torch.linalg.qr(seeded(28, 8, 5, dtype=torch.float64)).Q  # equal singular values
    close(svd_merge.iso_c_delta(flat.unsqueeze(0)), flat, atol=1e-10)
    several = seeded(29, 3, 8, 5, dtype=torch.float64)
    close(svd_merge.iso_c_delta(several), svd_merge.iso_c_delta(several.sum(0, keepdim=True)), atol=1e-10)


def test_iso_cts_hand():
    # r = 4, T = 2, fraction .5: k_c = 2, one direction per task. M = diag(4, 3, 1.5, 2): common e1 (4), e2 (3);
    # off the common space tau_1 -> diag(0, 0, 1, 0) gives e3 (1), tau_2 -> diag(0, 0, .5, 2) gives e4 (2);
    # the stacks are a permutation (already orthonormal), spectrum [1, 2, 4, 3] -> mean 2.5 -> 2.5 I.
    # (Iso-C on the same tasks: mean of (4, 3, 2, 1.5) = 2.625.)
    task_vectors = torch.stack([torch.diag(T([4.0, 0, 1, 0])), torch.diag(T([0.0, 3, 0.5, 2]))])
    close(svd_merge.iso_cts_delta(task_vectors, 0.5), 2.5 * torch.eye(4), atol=1e-6)
    close(svd_merge.iso_c_delta(task_vectors), 2.625 * torch.eye(4), atol=1e-6)


@pytest.mark.parametrize("rank, tasks, fraction, expected",
                         [(10, 2, 0.8, (8, 1)), (4, 2, 0.8, (4, 0)), (768, 8, 0.8, (616, 19)),
                          (4096, 3, 0.8, (3277, 273)), (1, 1, 0.8, (0, 1)), (2, 2, 0.8, (2, 0))])
def test_iso_cts_split(rank, tasks, fraction, expected):
    # the official: k_c = int(r f); total = round((r - k_c) / T) * T; k_c = r - total; per task (r - k_c) / T
    assert svd_merge.iso_cts_split(rank, tasks, fraction) == expected


def reference_iso_cts(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """The official iso_cts for one 2-D key (zero buffers, (U_c U_c^T) w, python round)."""
    shape, tasks = task_vectors.shape[1:], task_vectors.shape[0]
    combined_w = sum(list(task_vectors))
    common = int(min(shape) * fraction)
    common = min(shape) - round((min(shape) - common) / tasks) * tasks
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per = int((min(shape) - common) / tasks)
    for i in range(tasks):
        w = task_vectors[i]
        u_ts, s_ts, v_ts = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        if i == 0:
            su, ss, sv = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
        su[:, i * per:(i + 1) * per] = u_ts[:, :per]
        ss[i * per:(i + 1) * per] = s_ts[:per]
        sv[i * per:(i + 1) * per, :] = v_ts[:per, :]
    su[:, tasks * per:tasks * per + common] = cu
    ss[tasks * per:tasks * per + common] = cs
    sv[tasks * per:tasks * per + common, :] = cv
    a, _, b = torch.linalg.svd(su, full_matrices=False)
    c, _, d = torch.linalg.svd(sv, full_matrices=False)
    return torch.linalg.multi_dot((a @ b, torch.diag(torch.ones_like(ss) * ss.mean()), c @ d))


@pytest.mark.parametrize("tasks, rows, columns, fraction", [(2, 12, 10, 0.8), (3, 9, 16, 0.8), (4, 20, 20, 0.5)])
def test_iso_cts_against_official_formula(tasks, rows, columns, fraction):
    task_vectors = seeded(30, tasks, rows, columns, dtype=torch.float64)
    close(svd_merge.iso_cts_delta(task_vectors, fraction), reference_iso_cts(task_vectors, fraction), atol=1e-10)


def test_iso_cts_one_task_is_iso_c():
    """One task: the task-specific part is the rest of tau's own spectrum, so Iso-CTS = Iso-C."""
    tau = seeded(31, 1, 10, 7, dtype=torch.float64)
    close(svd_merge.iso_cts_delta(tau), svd_merge.iso_c_delta(tau), atol=1e-10)


def test_svd_merges_one_d_rule_dtype_and_refusals():
    base = seeded(32, 6).to(torch.bfloat16)
    task_vectors = seeded(33, 3, 6)
    for method in ("tsv", "iso_c", "iso_cts"):
        merged = svd_merge.merge(method, base, task_vectors, alpha=2.0)
        assert merged.dtype == torch.bfloat16
        close(merged.float(), (base.float() + 2.0 * task_vectors.mean(0)).to(torch.bfloat16).float(), atol=0)
    assert svd_merge.merged_delta("tsv", seeded(34, 2, 4, 3).to(torch.bfloat16)).dtype == torch.float32
    assert svd_merge.merged_delta("iso_c", seeded(34, 2, 4, 3), wide=True).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown SVD merge"):
        svd_merge.merged_delta("svd", task_vectors)
    with pytest.raises(ValueError, match="common_space_fraction"):
        svd_merge.iso_cts_delta(seeded(35, 2, 4, 4), 1.5)


# =====================================================================================================
# RegMean
# =====================================================================================================


def test_shrink_off_diagonal_hand():
    gram = T([[2.0, 1], [1, 4]], dtype=torch.float64)
    close(regmean.shrink_off_diagonal(gram, 0.5), T([[2.0, 0.5], [0.5, 4]], dtype=torch.float64))
    close(regmean.shrink_off_diagonal(gram, 0.0), T([[2.0, 0], [0, 4]], dtype=torch.float64))
    assert torch.equal(regmean.shrink_off_diagonal(gram, 1.0), gram)
    assert gram.tolist() == [[2.0, 1], [1, 4]]  # the input is not modified
    with pytest.raises(ValueError, match="alpha"):
        regmean.shrink_off_diagonal(gram, 1.5)


def test_regmean_hand():
    # G~_1 = [[2, .5], [.5, 2]], G~_2 = I; sum = [[3, .5], [.5, 3]], rhs = [6, 8.5] -> W = [11/7, 18/7]
    w1, w2 = T([[1.0, 2]]), T([[3.0, 4]])
    g1, g2 = T([[2.0, 1], [1, 2]]), torch.eye(2)
    close(regmean.regmean_linear([w1, w2], [g1, g2], alpha=0.5), [[11 / 7, 18 / 7]], atol=1e-6)


def test_regmean_identical_grams_give_the_weighted_average():
    weights = [seeded(36 + i, 5, 4) for i in range(3)]
    gram = (lambda x: x.T @ x)(seeded(40, 50, 4, dtype=torch.float64))
    close(regmean.regmean_linear(weights, [gram] * 3, alpha=0.9), sum(weights) / 3, atol=1e-5)
    weighted = regmean.regmean_linear(weights, [gram] * 3, alpha=0.9, model_weights=[1.0, 2.0, 5.0])
    close(weighted, (weights[0] + 2 * weights[1] + 5 * weights[2]) / 8, atol=1e-5)


def test_regmean_diagonal_grams_give_per_column_weighted_average():
    w1, w2 = T([[1.0, 2], [0, 4]]), T([[3.0, 4], [2, 0]])
    g1, g2 = torch.diag(T([1.0, 3])), torch.diag(T([3.0, 1]))
    # column 0: (1 w1 + 3 w2) / 4, column 1: (3 w1 + 1 w2) / 4
    close(regmean.regmean_linear([w1, w2], [g1, g2], alpha=0.9), [[2.5, 2.5], [1.5, 3.0]], atol=1e-6)


def test_regmean_against_least_squares_on_the_data():
    """alpha = 1: W minimizes sum_t ||X_t W^T - X_t W_t^T||^2, so it is lstsq on the stacked inputs/outputs."""
    inputs = [seeded(41 + t, 30 + 10 * t, 6, dtype=torch.float64) for t in range(3)]
    weights = [seeded(45 + t, 4, 6, dtype=torch.float64) for t in range(3)]
    grams = [regmean.gram_of_inputs(x).total for x in inputs]
    stacked_x = torch.cat(inputs)
    stacked_y = torch.cat([x @ w.T for x, w in zip(inputs, weights)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    close(regmean.regmean_linear(weights, grams, alpha=1.0), expected, atol=1e-9)


def test_regmean_singular_sum_takes_the_average_on_unseen_inputs():
    # feature 1 is never fed (zero row/column in every Gram): its column is the experts' average (5 + 1) / 2;
    # feature 0 is the Gram-weighted (2 * 1 + 1 * 4) / 3
    w1, w2 = T([[1.0, 5]]), T([[4.0, 1]])
    g1, g2 = torch.diag(T([2.0, 0])), torch.diag(T([1.0, 0]))
    close(regmean.regmean_linear([w1, w2], [g1, g2], alpha=0.9), [[2.0, 3.0]], atol=1e-9)


def test_regmean_dtype_device_and_refusals():
    w = [seeded(50, 3, 4).to(torch.bfloat16), seeded(51, 3, 4).to(torch.bfloat16)]
    merged = regmean.regmean_linear(w, [torch.eye(4), torch.eye(4)], alpha=0.9)
    assert merged.dtype == torch.bfloat16 and merged.shape == (3, 4)
    with pytest.raises(ValueError, match="does not fit"):
        regmean.regmean_linear(w, [torch.eye(3), torch.eye(3)], alpha=0.9)
    with pytest.raises(ValueError, match="one Gram per expert"):
        regmean.regmean_linear(w, [torch.eye(4)], alpha=0.9)


def test_gram_of_inputs_hand_mask_and_shard_sums():
    x = T([[[1.0, 2], [3, 4]], [[0, 1], [9, 9]]])  # [batch 2, tokens 2, in 2]
    mask = T([[True, True], [True, False]])  # the last token is padding
    gram = regmean.gram_of_inputs(x, mask)
    # rows [1, 2], [3, 4], [0, 1]: X^T X = [[10, 14], [14, 21]]
    assert gram.count == 3 and gram.total.dtype == torch.float64
    assert gram.total.tolist() == [[10.0, 14.0], [14.0, 21.0]]
    close(gram.mean(), T([[10 / 3, 14 / 3], [14 / 3, 7.0]], dtype=torch.float64), atol=1e-12)
    # sums over shards add up to the sum over all the data (exactly here: small integers)
    tokens = torch.randint(-8, 8, (64, 5), generator=torch.Generator().manual_seed(52)).to(torch.bfloat16)
    whole = regmean.gram_of_inputs(tokens)
    shards = regmean.empty_gram(5)
    for part in tokens.split(7):
        shards = shards + regmean.gram_of_inputs(part)
    assert shards.count == 64 and torch.equal(shards.total, whole.total)
    with pytest.raises(ValueError, match="shapes"):
        whole + regmean.empty_gram(4)
    with pytest.raises(ValueError, match="no tokens"):
        regmean.empty_gram(3).mean()


# =====================================================================================================
# Devices: the ops compute where their inputs are (run on a GPU machine; skipped without one)
# =====================================================================================================


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ops_run_on_the_inputs_device_and_agree_with_cpu():
    cuda = torch.device("cuda")
    values = seeded(60, 64, 96)
    on_gpu = values.to(cuda)
    # masks: the native outlier mask and the DELLA mask are the same on any device
    native = sparsify.outlier_mask(on_gpu, 0.3, 0.05)
    assert native.device.type == "cuda" and torch.equal(native.cpu(), sparsify.outlier_mask(values, 0.3, 0.05))
    probability = sparsify.della_keep_probabilities(on_gpu, 0.5, 0.15)
    keep = sparsify.della_keep_mask(probability, 5, "m", "t", values.numel())
    assert keep.device.type == "cuda"
    assert torch.equal(keep.cpu(), sparsify.della_keep_mask(sparsify.della_keep_probabilities(values, 0.5, 0.15),
                                                            5, "m", "t", values.numel()))
    rescaled = sparsify.inverse_probability_rescale(on_gpu, keep, probability)
    assert rescaled.device.type == "cuda"
    assert sparsify.mergekit_outlier_mask(on_gpu, 0.3, 0.05).device.type == "cuda"
    # issue 18's sort-free paths on the device (torch's stable sort and bincount there): the CPU's bits
    for tied_values in (few_levels(62, (64, 96), torch.bfloat16), few_levels(63, (48, 40), torch.float32)):
        on_device = tied_values.to(cuda)
        cut = sparsify.outlier_mask(on_device, 0.5, 0.1)
        assert torch.equal(cut.cpu(), sparsify.outlier_mask(tied_values, 0.5, 0.1))
        for rescale in ("inverse", "none", "l1"):
            pruned = sparsify.della_prune(on_device, 0.6, 0.2, rescale, 5, "m", "t", tied_values.numel())
            expected = sparsify.della_prune(tied_values, 0.6, 0.2, rescale, 5, "m", "t", tied_values.numel())
            assert pruned.device.type == "cuda"
            if rescale == "l1":  # a norm: the device's summation order
                close(pruned.cpu().float(), expected.float(), atol=1e-2)
            else:
                assert same_bits(pruned.cpu(), expected), rescale
    # model stock, slerp, nuslerp
    experts = [seeded(61 + i, 64, 96) for i in range(3)]
    close(model_stock.model_stock(on_gpu, [e.to(cuda) for e in experts]).cpu(),
          model_stock.model_stock(values, experts), atol=1e-5)
    close(slerp.slerp(0.4, on_gpu, experts[0].to(cuda)).cpu(), slerp.slerp(0.4, values, experts[0]), atol=1e-5)
    close(slerp.nuslerp([e.to(cuda) for e in experts[:2]], [1.0, 2.0], on_gpu).cpu(),
          slerp.nuslerp(experts[:2], [1.0, 2.0], values), atol=1e-5)
    # SVD merges (exact SVD on the GPU) and RegMean
    task_vectors = torch.stack([e - values for e in experts])
    for method in ("tsv", "iso_c", "iso_cts"):
        merged = svd_merge.merge(method, on_gpu, task_vectors.to(cuda))
        assert merged.device.type == "cuda"
        close(merged.cpu(), svd_merge.merge(method, values, task_vectors), atol=1e-4)
    inputs = [seeded(70 + t, 200, 96) for t in range(3)]
    grams = [regmean.gram_of_inputs(x.to(cuda)) for x in inputs]
    assert grams[0].total.device.type == "cuda"
    merged = regmean.regmean_linear([e.to(cuda) for e in experts], [g.mean() for g in grams], alpha=0.9)
    assert merged.device.type == "cuda"
    close(merged.cpu(), regmean.regmean_linear(experts, [regmean.gram_of_inputs(x).mean() for x in inputs], 0.9),
          atol=1e-5)


def test_an_svd_that_does_not_converge_is_retried_in_float64_then_transposed(monkeypatch):
    """gesdd fails to converge on some matrices (Iso-CTS on the 1.1B benchmark family): the same decomposition in
    float64, then of the transpose, gives the factors; a matrix nothing decomposes names its tensor."""
    from distmerge.errors import InputError
    from distmerge.methods import build_method
    from distmerge.methods.base import TensorJob

    svd_ops = svd_merge
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(7, 5, generator=g)
    real_svd = torch.linalg.svd
    calls = []

    def failing(a, full_matrices=True):
        calls.append((a.dtype, tuple(a.shape)))
        if a.dtype == torch.float32 or a.shape == (7, 5):
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", failing)
    left, values, right = svd_ops.thin_svd(matrix)
    assert calls == [(torch.float32, (7, 5)), (torch.float64, (7, 5)), (torch.float64, (5, 7))]
    assert left.dtype == values.dtype == right.dtype == torch.float32
    assert left.shape == (7, 5) and right.shape == (5, 5)
    assert torch.allclose(left @ torch.diag(values) @ right, matrix, atol=1e-5)
    assert torch.allclose(left.T @ left, torch.eye(5), atol=1e-5)

    monkeypatch.setattr(torch.linalg, "svd", lambda a, full_matrices=True: (_ for _ in ()).throw(
        torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")))
    method = build_method("iso_c", {})
    job = TensorJob(name="model.layers.3.mlp.down_proj.weight", numel=35, model_names=("a", "b"), weights=(1.0, 1.0))
    with pytest.raises(InputError, match=r"tensor 'model.layers.3.mlp.down_proj.weight': iso_c's SVD did not converge"):
        method.merge(matrix, [matrix + 1, matrix - 0.5], job, 0, {})
