"""Unit tests of the pure merge math in distmerge.ops (CPU only, no Ray, fast).

1. Hand-computed values on tiny tensors for every op.
2. The exact radix (two-histogram) selection of the TIES global threshold against torch.kthvalue.
3. Reference formulations (TIES ``ties-merging/src/utils/merge_utils.py`` flattened over the model, and EMR's
   ``emr_merge``), written out here, against distmerge's per-tensor / per-chunk ops.
4. The unit-level invariants of spec section 10 (DARE p=0, TIES k=1 T=1, EMR T=1).
5. Method-level checks through ``distmerge.methods.build_method``, run by the engine's Ray-free executor.
"""

from __future__ import annotations

import math

import pytest
import torch

from distmerge.methods import execute
from distmerge.methods.execute import add_partials
from distmerge.errors import ConfigError
from distmerge.methods import TensorJob, build_method
from distmerge.methods.base import resolve_job_settings
from distmerge.ops import dare, emr, ties
from distmerge.ops.task_vectors import task_arithmetic, task_vectors, weight_average

T = torch.tensor


def close(actual, expected, atol=1e-6):
    expected = expected if isinstance(expected, torch.Tensor) else torch.tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected.to(actual.dtype), atol=atol, rtol=0), f"\n{actual}\n!=\n{expected}"


# =====================================================================================================
# 1. Hand-computed values
# =====================================================================================================


# --- task vectors, weight average, task arithmetic ---------------------------------------------------


def test_task_vectors_hand():
    base = T([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
    e1 = T([[2.0, 2, 3], [4, 5, 6], [7, 8, 10]])
    e2 = T([[0.0, 2, 3], [4, 7, 6], [7, 8, 9]])
    tv = task_vectors(base, [e1, e2])
    assert tv.shape == (2, 3, 3)
    close(tv[0], [[1.0, 0, 0], [0, 0, 0], [0, 0, 1]])
    close(tv[1], [[-1.0, 0, 0], [0, 2, 0], [0, 0, 0]])


A6 = [1.0, 2, 3, 4, 5, 6]
B6 = [3.0, 2, 1, 0, -1, -2]


@pytest.mark.parametrize(
    "weights, normalize, expected",
    [
        ([1.0, 1.0], True, [2.0, 2, 2, 2, 2, 2]),  # plain mean
        ([1.0, 3.0], True, [2.5, 2, 1.5, 1, 0.5, 0]),  # (a + 3b) / 4
        ([1.0, 3.0], False, [10.0, 8, 6, 4, 2, 0]),  # a + 3b
        ([1.0, -1.0], True, [-2.0, 0, 2, 4, 6, 8]),  # zero weight sum: left undivided (mergekit guard)
    ],
)
def test_weight_average_hand(weights, normalize, expected):
    close(weight_average([T(A6), T(B6)], weights, normalize), expected)


def test_task_arithmetic_hand():
    base = torch.ones(6)
    tv = T([[1.0, 0, -1, 2, 0, 0], [0.0, 1, 1, -2, 0, 3]])
    # 1 + 0.5 * (t1 + t2)
    close(task_arithmetic(base, tv, [1.0, 1.0], 0.5), [1.5, 1.5, 1, 1, 1, 2.5])
    # lambda 0 gives the base
    close(task_arithmetic(base, tv, [1.0, 1.0], 0.0), base)
    # weighted, no normalize: 1 + 2 * (t1 + 3 t2) = 1 + 2 * [1, 3, 2, -4, 0, 9]
    close(task_arithmetic(base, tv, [1.0, 3.0], 2.0), [3.0, 7, 5, -7, 1, 19])
    # normalize: 1 + 2 * (t1 + 3 t2) / 4
    close(task_arithmetic(base, tv, [1.0, 3.0], 2.0, normalize=True), [1.5, 2.5, 2, -1, 1, 5.5])


# --- TIES: trim ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "numel, density, rule, rank",
    [
        (10, 0.2, "paper", 8),  # P - int(P d)
        (10, 0.2, "mergekit", 9),  # P - int(P d) + 1
        (10, 0.35, "paper", 7),  # int(3.5) = 3
        (10, 0.35, "mergekit", 8),
        (10, 1.0, "paper", 0),  # keep all
        (10, 1.0, "mergekit", 0),
        (10, 0.05, "paper", 10),  # keep 0 -> paper still keeps the max (rank P)
        (10, 0.05, "mergekit", 10),  # mergekit keeps at least one value: max(1, int(n*d))
    ],
)
def test_trim_rank(numel, density, rule, rank):
    assert ties.trim_rank(numel, density, rule) == rank


def test_trim_rank_unknown_rule():
    with pytest.raises(ValueError):
        ties.trim_rank(10, 0.5, "nope")


MAG10 = T([0.5, -3, 1, -2, 0, 4, 2.5, -1.5, 0.1, -0.2])  # |.| sorted: 0 .1 .2 .5 1 1.5 2 2.5 3 4


@pytest.mark.parametrize(
    "density, rule, threshold, kept",
    [
        (0.2, "paper", 2.5, 3),  # 8th smallest; int(P d) + 1 values survive
        (0.2, "mergekit", 3.0, 2),  # 9th smallest; exactly int(P d)
        (0.5, "paper", 1.0, 6),
        (0.5, "mergekit", 1.5, 5),
        (1.0, "paper", 0.0, 10),
        (1.0, "mergekit", 0.0, 10),
        (0.05, "paper", 4.0, 1),
        (0.05, "mergekit", 4.0, 1),
    ],
)
def test_magnitude_threshold_hand(density, rule, threshold, kept):
    thr = ties.magnitude_threshold(MAG10, density, rule)
    assert thr == threshold
    trimmed = ties.trim(MAG10.unsqueeze(0), [thr])[0]
    assert int((MAG10.abs() >= thr).sum()) == kept
    # every survivor is >= the threshold and unchanged, everything else is 0
    close(trimmed, torch.where(MAG10.abs() >= thr, MAG10, torch.zeros(())))


def test_magnitude_threshold_ties_at_cut_are_kept():
    values = T([1.0, 1, 1, -1, 2, 0])  # |.| sorted 0 1 1 1 1 2
    for rule in ("paper", "mergekit"):  # rank 3 / 4 -> both 1.0
        thr = ties.magnitude_threshold(values, 0.5, rule)
        assert thr == 1.0
        close(ties.trim(values.unsqueeze(0), [thr])[0], [1.0, 1, 1, -1, 2, 0])


def test_trim_hand():
    tv = T([[0.5, -3, 1, -2, 0, 4], [1.0, -1, 2, -2, 3, -3]])
    close(ties.trim(tv, [2.0, 2.5]), [[0.0, -3, 0, -2, 0, 4], [0.0, 0, 0, 0, 3, -3]])
    close(ties.trim(tv, [ties.KEEP_ALL, ties.KEEP_NONE]), torch.stack([tv[0], torch.zeros(6)]))
    # 2-D per task ([T, 2, 3]) broadcasts the per-task threshold
    close(ties.trim(tv.reshape(2, 2, 3), [2.0, 2.5]).reshape(2, 6), [[0.0, -3, 0, -2, 0, 4], [0.0, 0, 0, 0, 3, -3]])


# --- TIES: sign and disjoint merge --------------------------------------------------------------------

W3 = T([[1.0, -2, 0, 3, 0, -1], [-1.0, 1, 0, -1, 0, -1], [0.0, -1, 2, 0, 0, 0]])  # trimmed task vectors


def test_elected_sign_hand():
    # column sums [0, -2, 2, 2, 0, -2]
    close(ties.elected_sign(W3), [0.0, -1, 1, 1, 0, -1])


@pytest.mark.parametrize(
    "sign, expected",
    [([0.0, -1, 1, 1, 0, -1], 0.0), ([1.0, 1, -1, 0], 1.0), ([-1.0, -1, 0, 1], -1.0), ([0.0, 0], 0.0)],
)
def test_majority_sign_hand(sign, expected):
    assert ties.majority_sign(T(sign)) == expected


@pytest.mark.parametrize(
    "zero_sign, mode, expected",
    [
        (1.0, "mean", [1.0, -1.5, 2, 3, 0, -1]),
        (1.0, "sum", [1.0, -3, 2, 3, 0, -2]),
        (-1.0, "mean", [-1.0, -1.5, 2, 3, 0, -1]),
        (-1.0, "sum", [-1.0, -3, 2, 3, 0, -2]),
        # reference quirk: a resolved sign of 0 selects the NEGATIVE entries (torch.where(s > 0, x > 0, x < 0))
        (0.0, "mean", [-1.0, -1.5, 2, 3, 0, -1]),
        (0.0, "sum", [-1.0, -3, 2, 3, 0, -2]),
    ],
)
def test_disjoint_merge_hand(zero_sign, mode, expected):
    sign = ties.elected_sign(W3)
    close(ties.disjoint_merge(W3, [1.0, 1.0, 1.0], sign, zero_sign, mode), expected)


def test_disjoint_merge_zero_sign_quirk_only_positive_column():
    # One column holding only a positive value, elected sign forced to 0 and resolved to 0: nothing selected.
    x = T([[2.0], [0.0]])
    sign = T([0.0])
    close(ties.disjoint_merge(x, [1.0, 1.0], sign, 0.0, "mean"), [0.0])
    close(ties.disjoint_merge(x, [1.0, 1.0], sign, 1.0, "mean"), [2.0])


def test_disjoint_merge_weighted_hand():
    weights = [1.0, 2.0, 1.0]
    weighted = W3 * T(weights).reshape(3, 1)  # [[1,-2,0,3,0,-1],[-2,2,0,-2,0,-2],[0,-1,2,0,0,0]]
    sign = ties.elected_sign(weighted)  # sums [-1,-1,2,1,0,-3]
    close(sign, [-1.0, -1, 1, 1, 0, -1])
    # mean divides by the summed weights of the agreeing tasks
    close(ties.disjoint_merge(weighted, weights, sign, 1.0, "mean"), [-1.0, -1.5, 2, 3, 0, -1])
    close(ties.disjoint_merge(weighted, weights, sign, 1.0, "sum"), [-2.0, -3, 2, 3, 0, -3])


def test_disjoint_merge_empty_agreement_gives_zero():
    x = T([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    sign = T([0.0, -1.0, 1.0])  # col1: elected -1 but nobody negative; col0/col2: nothing at all
    for mode in ("mean", "sum"):
        out = ties.disjoint_merge(x, [1.0, 1.0], sign, 1.0, mode)
        close(out, [0.0, 0.0, 0.0])
        assert torch.isfinite(out).all()


def test_disjoint_merge_unknown_mode():
    with pytest.raises(ValueError):
        ties.disjoint_merge(W3, [1.0] * 3, ties.elected_sign(W3), 1.0, "max")


def test_ties_delta_hand():
    tv = T([[1.0, -2, 0.5, 3, 0, -1], [-1.0, 1, 0.2, -1, 0, -1], [0.0, -1, 2, 0.1, 0, 0]])
    thr = [1.0, 1.0, 1.0]  # trims 0.5, 0.2, 0.1 -> W3
    # per-tensor majority: signs [0,-1,1,1,0,-1] sum to 0 -> zero sign 0 -> negatives selected
    close(ties.ties_delta(tv, thr, [1.0] * 3, None, "mean"), [-1.0, -1.5, 2, 3, 0, -1])
    close(ties.ties_delta(tv, thr, [1.0] * 3, 1.0, "mean"), [1.0, -1.5, 2, 3, 0, -1])
    close(ties.ties_delta(tv, thr, [1.0] * 3, 1.0, "sum"), [1.0, -3, 2, 3, 0, -2])
    # weights [1,2,1]: signs [-1,-1,1,1,0,-1] -> majority -1
    close(ties.ties_delta(tv, thr, [1.0, 2.0, 1.0], None, "mean"), [-1.0, -1.5, 2, 3, 0, -1])
    close(ties.ties_delta(tv, thr, [1.0, 2.0, 1.0], None, "sum"), [-2.0, -3, 2, 3, 0, -3])
    # thresholds 2: only |x| >= 2 survive: [[0,-2,0,3,0,0],[0]*6,[0,0,2,0,0,0]]
    close(ties.ties_delta(tv, [2.0] * 3, [1.0] * 3, 1.0, "mean"), [0.0, -2, 2, 3, 0, 0])


# --- DARE ---------------------------------------------------------------------------------------------


def test_keep_mask_deterministic_and_keyed():
    n = 5000
    m = dare.keep_mask(0.5, 7, "math", "layers.0.w", n, 0, n)
    assert m.dtype == torch.bool and m.shape == (n,)
    assert torch.equal(m, dare.keep_mask(0.5, 7, "math", "layers.0.w", n, 0, n))
    assert not torch.equal(m, dare.keep_mask(0.5, 7, "math", "layers.1.w", n, 0, n))  # other tensor
    assert not torch.equal(m, dare.keep_mask(0.5, 7, "code", "layers.0.w", n, 0, n))  # other model
    assert not torch.equal(m, dare.keep_mask(0.5, 8, "math", "layers.0.w", n, 0, n))  # other seed
    # the block seed is keyed on every field
    seeds = {dare.block_seed(*k) for k in [(0, "a", "t", 0), (1, "a", "t", 0), (0, "b", "t", 0), (0, "a", "u", 0),
                                           (0, "a", "t", 1)]}
    assert len(seeds) == 5


def test_keep_mask_slices_equal_whole_across_block_boundary():
    block = dare.MASK_BLOCK
    n = 2 * block + 777
    whole = dare.keep_mask(0.3, 3, "m", "embed", n, 0, n)
    assert whole.shape == (n,)
    ranges = [(0, 10), (5, block - 1), (block - 5, block + 5), (block - 1, block + 1), (block, block + 1),
              (block - 100, 2 * block + 100), (2 * block - 3, n), (n - 1, n), (123, 124), (0, n)]
    for a, b in ranges:
        assert torch.equal(dare.keep_mask(0.3, 3, "m", "embed", n, a, b), whole[a:b]), (a, b)
    # row-chunking (what the worker does) reassembles the whole mask
    step = 300_001
    parts = [dare.keep_mask(0.3, 3, "m", "embed", n, a, min(a + step, n)) for a in range(0, n, step)]
    assert torch.equal(torch.cat(parts), whole)


def test_words_drawn_ahead_are_the_stream_words_in_any_order_of_requests(monkeypatch):
    """The merge's read-ahead gives ``stream_words``'s words whether a span was drawn ahead (the next chunk), is
    asked again, out of order, by another model or tensor, or after the oldest spans drawn ahead were dropped."""
    monkeypatch.setattr(dare, "AHEAD_SPANS", 3)
    n = dare.MASK_BLOCK + 70_001
    step = 40_000
    spans = [(a, min(a + step, n)) for a in range(0, n, step)]
    requests = [("m", "w", s) for s in spans]  # walking a tensor: each next span was drawn ahead
    requests += [("m", "w", spans[3]), ("m", "w", spans[1]), ("e", "w", spans[2]), ("m", "b", spans[0])]
    requests += [(model, "w", s) for s in spans[:6] for model in ("m", "e", "f", "g")]  # more models than spans kept
    requests += [("m", "w", (17, 50_017)), ("m", "w", (50_017, 100_017)), ("m", "w", (n - 5, n)), ("m", "w", (9, 9))]
    for model, tensor, (a, b) in requests:
        got = dare.stream_words_ahead(7, model, tensor, n, a, b)
        assert (got == dare.stream_words(7, model, tensor, n, a, b)).all() and got.shape == (b - a,), (model, tensor, a, b)
    assert len(dare._AHEAD) <= 3


def test_keep_mask_empty_range():
    # A 0-element tensor merged unchunked asks for the range [a, a).
    assert dare.keep_mask(0.5, 0, "m", "t", 0, 0, 0).shape == (0,)
    assert dare.keep_mask(0.5, 0, "m", "t", 2 * dare.MASK_BLOCK, dare.MASK_BLOCK, dare.MASK_BLOCK).shape == (0,)


TAU6 = T([1.0, -2, 3, -4, 5, -6])
KEEP6 = T([True, False, True, True, False, True])


def test_drop_and_rescale_hand():
    close(dare.drop_and_rescale(TAU6, KEEP6, 0.5, "inverse"), [2.0, 0, 6, -8, 0, -12])  # / (1 - 0.5)
    close(dare.drop_and_rescale(TAU6, KEEP6, 0.75, "inverse"), [4.0, 0, 12, -16, 0, -24])  # / 0.25
    close(dare.drop_and_rescale(TAU6, KEEP6, 0.5, "none"), [1.0, 0, 3, -4, 0, -6])
    # l1: |tau|_1 = 21, kept 14 -> x 1.5, whatever p
    out = dare.drop_and_rescale(TAU6, KEEP6, 0.9, "l1")
    close(out, [1.5, 0, 4.5, -6, 0, -9])
    assert abs(float(out.abs().sum()) - 21.0) < 1e-5
    # l1 guard: everything dropped -> zeros, no NaN
    close(dare.drop_and_rescale(TAU6, torch.zeros(6, dtype=torch.bool), 0.5, "l1"), torch.zeros(6))
    # keep given in another shape is reshaped to tau's
    close(dare.drop_and_rescale(TAU6.reshape(2, 3), KEEP6, 0.5, "none"), T([[1.0, 0, 3], [-4, 0, -6]]))
    with pytest.raises(ValueError):
        dare.drop_and_rescale(TAU6, KEEP6, 0.5, "bogus")


def test_drop_rate_one_gives_zeros():
    keep = dare.keep_mask(1.0, 0, "m", "t", 6, 0, 6)
    assert not keep.any()
    for rescale in ("inverse", "l1", "none"):
        out = dare.drop_and_rescale(TAU6, keep, 1.0, rescale)
        assert torch.isfinite(out).all()
        close(out, torch.zeros(6))
    # p = 1 never divides by 0 even with a (foreign) non-empty keep
    close(dare.drop_and_rescale(TAU6, KEEP6, 1.0, "inverse"), [1.0, 0, 3, -4, 0, -6])


def test_keep_fraction_close_to_one_minus_p():
    n = dare.MASK_BLOCK * 2 + 12345
    for p in (0.1, 0.5, 0.9):
        frac = float(dare.keep_mask(p, 0, "m", "big", n, 0, n).float().mean())
        # binomial std sqrt(p(1-p)/n) <= 3.5e-4; 6 sigma
        assert abs(frac - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n), (p, frac)


# --- EMR ----------------------------------------------------------------------------------------------

EMR_TV = T([[1.0, -2, 0, 3, -1, 0], [-1.0, 1, 0, -1, 2, 0], [2.0, -2, 0, 0, -1, 2]])
# means: [2/3, -1, 0, 2/3, 0, 2/3] -> flags [+, -, -(zero mean), +, -(zero mean, quirk), +]


def test_elect_hand():
    unified, masks = emr.elect(EMR_TV)
    close(unified, [2.0, -2, 0, 3, -1, 2])
    assert masks.dtype == torch.bool
    assert masks.tolist() == [
        [True, True, False, True, True, False],  # task 0: its 0 in col 5 never agrees
        [False, False, False, False, False, False],  # task 1 disagrees everywhere (col 4: +2 vs the -1 flag)
        [True, True, False, False, True, True],  # task 2: its 0 in col 3 never agrees
    ]


def test_elect_zero_mean_gives_minus_one():
    tv = T([[1.0, 0.0], [-1.0, 0.0]])  # exact zero means
    unified, masks = emr.elect(tv)
    close(unified, [-1.0, 0.0])  # flag -1: only the negative task contributes
    assert masks.tolist() == [[False, False], [True, False]]


def test_rescaler_sums_and_rescalers_hand():
    unified, masks = emr.elect(EMR_TV)
    sums = emr.rescaler_sums(EMR_TV, unified, masks, 6)
    assert sums.dtype == torch.float64 and sums.shape == (2, 3)
    close(sums, T([[7 / 6, 5 / 6, 7 / 6], [8 / 6, 0.0, 7 / 6]], dtype=torch.float64))
    r = emr.rescalers(sums)
    assert r == pytest.approx([7 / 8, 0.0, 1.0], abs=1e-12)  # task 1: empty mask -> 0
    # per-chunk sums add up to the whole tensor's
    parts = [emr.rescaler_sums(EMR_TV[:, a:b], unified[a:b], masks[:, a:b], 6) for a, b in [(0, 2), (2, 5), (5, 6)]]
    close(sum(parts), sums.to(torch.float64), atol=1e-12)
    assert emr.rescalers(T([[1.0, 2.0], [4.0, 0.0]], dtype=torch.float64)) == [0.25, 0.0]


def test_rescaler_is_sum_of_per_tensor_means():
    # two tensors of different sizes: each counts by its mean, not by its number of elements
    tv_a = T([[2.0, 2.0]])  # mean|.| = 2
    tv_b = T([[4.0, 0, 0, 0]])  # mean|.| = 1
    total = None
    for tv in (tv_a, tv_b):
        u, m = emr.elect(tv)
        total = add_partials(total, {"s": emr.rescaler_sums(tv, u, m, tv.shape[1])})
    close(total["s"], T([[3.0], [3.0]], dtype=torch.float64))


def test_task_model_hand():
    unified, masks = emr.elect(EMR_TV)
    close(emr.task_model(torch.ones(6), unified, masks[0], 0.5), [2.0, 0, 1, 2.5, 0.5, 1])
    close(emr.task_model(torch.ones(6), unified, masks[1], 3.0), torch.ones(6))


def test_pack_mask_known_bits():
    mask = T([[True, False, True, True, False, False, False, False, True]])
    packed = emr.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[13, 1]]  # little-endian bit order


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (3, 5), (2, 3, 3), (4, 4), (5, 7, 3)])
@pytest.mark.parametrize("count", [1, 3])
def test_pack_unpack_round_trip(shape, count):
    g = torch.Generator().manual_seed(hash((shape, count)) % 1000)
    mask = torch.rand((count,) + shape, generator=g) > 0.5
    packed = emr.pack_mask(mask)
    numel = math.prod(shape)
    assert packed.shape == (count, (numel + 7) // 8)
    assert torch.equal(emr.unpack_mask(packed, shape), mask)
    # one task at a time too (emr-task reads one row)
    assert torch.equal(emr.unpack_mask(packed[1 % count:1 % count + 1], shape)[0], mask[1 % count])


# =====================================================================================================
# 2. Exact radix selection
# =====================================================================================================


def nasty_values(n: int, seed: int) -> torch.Tensor:
    """Random values spanning many magnitudes, with repeats, exact zeros, -0.0 and subnormals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.pow(10.0, torch.empty(n).uniform_(-9, 4, generator=g))
    repeats = T([0.5, -0.5, 1e-3, 3.0, -3.0, 1.0000001])
    idx = torch.randint(0, n, (n // 5,), generator=g)
    x[idx] = repeats[torch.randint(0, len(repeats), (len(idx),), generator=g)]
    x[torch.randint(0, n, (n // 20,), generator=g)] = 0.0
    x[torch.randint(0, n, (n // 50,), generator=g)] = -0.0
    x[torch.randint(0, n, (n // 100,), generator=g)] = 1e-40  # subnormal
    x[torch.randint(0, n, (50,), generator=g)] = 65504.0 * 1000
    return x


def radix_kth(chunks: list[torch.Tensor], rank: int) -> float:
    high = sum(ties.radix_high_histogram(c) for c in chunks)
    hb, within = ties.locate_rank(high, rank)
    low = sum(ties.radix_low_histogram(c, hb) for c in chunks)
    lb, _ = ties.locate_rank(low, within)
    return ties.bits_to_value(hb, lb)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_radix_selection_equals_kthvalue(seed):
    n = 12_000 + 17 * seed
    x = nasty_values(n, seed)
    cuts = [0, 1, 1500, 1501, 5_999, 10_001, n]
    chunks = [x[a:b].reshape(-1, 1) if i % 2 else x[a:b] for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    flat = x.abs()
    g = torch.Generator().manual_seed(100 + seed)
    ranks = [1, 2, n // 2, n - 1, n] + torch.randint(1, n + 1, (25,), generator=g).tolist()
    sorted_abs = flat.sort().values
    # ranks at the boundaries of runs of ties (repeated values)
    change = (sorted_abs[1:] != sorted_abs[:-1]).nonzero().reshape(-1)
    ranks += [int(change[i]) + 1 for i in (0, len(change) // 3, len(change) // 2)]
    ranks += [int(change[i]) + 2 for i in (0, len(change) // 3, len(change) // 2)]
    for rank in ranks:
        expected = float(flat.kthvalue(rank).values)
        assert radix_kth(chunks, rank) == expected, rank
        assert ties.high_bin_of(expected) == ties.locate_rank(sum(ties.radix_high_histogram(c) for c in chunks),
                                                              rank)[0]


def test_radix_histogram_counts_and_locate_rank():
    x = T([0.0, -0.0, 1.0, -1.0, 1.0, 2.0, 1e-42])  # 1e-42: a subnormal of 714 ulps, high bits 0
    hist = ties.radix_high_histogram(x)
    assert hist.shape == (ties.HIGH_BINS,) and int(hist.sum()) == 7
    assert int(hist[0]) == 3  # 0, -0 (abs) and the subnormal share bin 0
    assert int(hist[ties.high_bin_of(1.0)]) == 3
    assert ties.locate_rank(hist, 4) == (ties.high_bin_of(1.0), 1)
    assert ties.locate_rank(hist, 7) == (ties.high_bin_of(2.0), 1)
    with pytest.raises(ValueError):
        ties.locate_rank(hist, 0)
    with pytest.raises(ValueError):
        ties.locate_rank(hist, 8)
    assert ties.bits_to_value(ties.high_bin_of(1.5), 0) == 1.5
    low = ties.radix_low_histogram(x, 0)
    assert int(low.sum()) == 3 and int(low[0]) == 2  # two exact zeros and one subnormal


# =====================================================================================================
# 3. Reference formulations (ties-merging merge_utils.py, EMR_Merging emr_merge)
# =====================================================================================================


def ref_state_dict_to_vector(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for _, v in sorted(sd.items())])


def ref_vector_to_state_dict(vec: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, value in sorted(like.items()):
        out[key] = vec[offset:offset + value.numel()].reshape(value.shape)
        offset += value.numel()
    return out


def ref_topk_values_mask(M: torch.Tensor, K: float) -> torch.Tensor:
    if K > 1:
        K /= 100
    if M.dim() == 1:
        M = M.unsqueeze(0)
    n, d = M.shape
    k = int(d * K)
    k = d - k
    kth_values, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    return M * (M.abs() >= kth_values)


def ref_resolve_sign(tensor: torch.Tensor) -> torch.Tensor:
    sign_to_mult = torch.sign(tensor.sum(dim=0))
    majority_sign = torch.sign(sign_to_mult.sum())
    sign_to_mult[sign_to_mult == 0] = majority_sign
    return sign_to_mult


def ref_disjoint_merge(tensor: torch.Tensor, merge_func: str, sign_to_mult: torch.Tensor) -> torch.Tensor:
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, tensor > 0, tensor < 0)
    selected = tensor * rows_to_keep
    if merge_func == "mean":
        counts = (selected != 0).sum(dim=0).float()
        return selected.sum(dim=0) / torch.clamp(counts, min=1)
    if merge_func == "sum":
        return selected.sum(dim=0)
    raise ValueError(merge_func)


def ref_ties(base: dict, experts: list[dict], density: float, merge_func: str, lam: float) -> dict:
    flat_ft = torch.vstack([ref_state_dict_to_vector(e) for e in experts])
    flat_ptm = ref_state_dict_to_vector(base)
    tv = flat_ft - flat_ptm
    trimmed = ref_topk_values_mask(tv.clone(), K=density)
    signs = ref_resolve_sign(trimmed)
    merged_tv = ref_disjoint_merge(trimmed, merge_func, signs)
    return ref_vector_to_state_dict(flat_ptm + lam * merged_tv, base)


def ref_emr_merge(tvs: list[dict]):
    """EMR_Merging merge_vit/src/main_emr_merging.py::emr_merge, on plain dicts."""
    sum_param = {}
    for tv in tvs:
        for n in tv:
            sum_param.setdefault(n, []).append(tv[n])
    sum_param = {k: torch.stack(v, 0).mean(0) for k, v in sum_param.items()}
    vector_unified, masks = {}, {}
    scales = torch.zeros(len(tvs))
    for n in sum_param:
        masks[n] = []
        flag = (sum_param[n] > 0) * 2 - 1
        param_max = torch.zeros_like(tvs[0][n])
        for m in range(len(tvs)):
            param = tvs[m][n]
            mask = (param * flag) > 0
            masks[n].append(mask)
            param_abs = torch.abs(mask * param)
            param_max = torch.where(param_abs > param_max, param_abs, param_max)
            scales[m] += torch.mean(torch.abs(param))
        vector_unified[n] = param_max * flag
    new_scales = torch.zeros(len(tvs))
    for m in range(len(tvs)):
        for n in vector_unified:
            new_scales[m] += torch.mean(torch.abs(vector_unified[n] * masks[n][m]))
    return vector_unified, masks, scales / new_scales


SHAPES = {"a.weight": (7, 5), "b.bias": (11,), "c.weight": (3, 4, 2), "d.weight": (13, 6)}


def make_model(seed: int, tasks: int = 3, offset: float = 0.0, cancel: bool = True, narrow: bool = False,
               mirror: bool = False):
    """(base, experts) state dicts; ``cancel`` plants +a / -a pairs in tasks 0 and 1 (task 2 zero there).

    ``offset`` shifts every task vector so that the majority sign is that of the offset; ``narrow`` puts every
    |tau| in [1, 1 + 2**-8) (one radix high bin); ``mirror`` makes task 1 = -task 0 (all elected signs 0).
    """
    g = torch.Generator().manual_seed(seed)
    # base on a 2**-6 grid and task vectors on a 2**-12 grid: theta_t - theta_0 gives tau back exactly, so the
    # planted cancellations stay exact after (base + tau) - base.
    base = {n: torch.round(torch.randn(s, generator=g) * 64) / 64 for n, s in SHAPES.items()}
    tvs = []
    for t in range(tasks):
        tv = {}
        for n, s in SHAPES.items():
            if narrow:
                # on a 2**-18 grid: few repeats, so the cut bin holds many distinct values
                mag = 1.0 + torch.round(torch.rand(s, generator=g) * 2 ** 10) * 2 ** -18
                sign = torch.where(torch.rand(s, generator=g) > 0.5, 1.0, -1.0)
                tv[n] = mag * sign
            else:
                x = torch.randn(s, generator=g) + offset
                x = torch.where(torch.rand(s, generator=g) < 0.1, torch.round(x * 2) / 2, x)  # repeats, zeros
                tv[n] = x
        tvs.append(tv if narrow else {n: torch.round(v * 4096) / 4096 for n, v in tv.items()})
    if cancel and tasks >= 2:
        for n, s in SHAPES.items():
            flat0, flat1 = tvs[0][n].reshape(-1), tvs[1][n].reshape(-1)
            idx = torch.arange(0, flat0.numel(), 4)
            a = 3.0 + torch.round(torch.rand(len(idx), generator=g) * 4096) / 4096  # big: survives the trim
            flat0[idx] = a
            flat1[idx] = -a
            for t in range(2, tasks):
                tvs[t][n].reshape(-1)[idx] = 0.0
    if mirror:
        for n in SHAPES:
            tvs[1][n] = -tvs[0][n]
    experts = [{n: base[n] + tv[n] for n in SHAPES} for tv in tvs]
    for expert, tv in zip(experts, tvs):
        assert all(torch.equal(expert[n] - base[n], tv[n]) for n in SHAPES)
    return base, experts


def row_chunks(shape: tuple[int, ...], rows: int):
    """(start, stop, flat offset) of row chunks of ``rows`` rows, cut by the executor the worker uses."""
    tensor = output_tensor("t", shape, None)
    row = math.prod(shape[1:])
    return [(a, b, execute.chunk_offset(tensor, a))
            for a, b in execute.row_chunks(tensor, True, rows * row)]


def output_tensor(name, shape, job, out_dtype="float32"):
    from distmerge.tensors import OutputTensor

    return OutputTensor(name=name, shape=tuple(shape), out_dtype=out_dtype, merged=True, base=None, experts=(),
                        job=job, group=name, layer=None)


def ops_ties_global(base, experts, density, mode, lam, rows=3):
    """distmerge's ops applied chunk by chunk, with thresholds and majority sign reduced over the model."""
    names = sorted(base)
    count = len(experts)
    chunks = []  # (name, a, b, tv chunk)
    for n in names:
        for a, b, _ in row_chunks(base[n].shape, rows):
            chunks.append((n, a, b, torch.stack([e[n][a:b] - base[n][a:b] for e in experts])))
    numel = sum(base[n].numel() for n in names)
    rank = ties.trim_rank(numel, density, "paper")
    thresholds = []
    for t in range(count):
        high = sum(ties.radix_high_histogram(c[3][t]) for c in chunks)
        hb, within = ties.locate_rank(high, rank)
        low = sum(ties.radix_low_histogram(c[3][t], hb) for c in chunks)
        lb, _ = ties.locate_rank(low, within)
        thresholds.append(ties.bits_to_value(hb, lb))
    weights = [1.0] * count
    sign_total = sum(ties.elected_sign(ties.trim(c[3], thresholds)).sum(dtype=torch.float64) for c in chunks)
    zero_sign = float(torch.sign(sign_total))
    out = {n: torch.empty_like(base[n]) for n in names}
    for n, a, b, tv in chunks:
        out[n][a:b] = base[n][a:b] + lam * ties.ties_delta(tv, thresholds, weights, zero_sign, mode)
    return out, thresholds, zero_sign


def ref_zero_sign(base, experts, density):
    tv = torch.vstack([ref_state_dict_to_vector(e) for e in experts]) - ref_state_dict_to_vector(base)
    signs = torch.sign(ref_topk_values_mask(tv, density).sum(dim=0))
    return float(torch.sign(signs.sum())), int((signs == 0).sum())


TIES_CASES = [
    # (seed, tasks, offset, density, mode, lam, mirror, expected majority sign)
    (0, 3, 0.4, 0.2, "mean", 1.0, False, 1.0),
    (1, 3, -0.4, 0.2, "mean", 0.8, False, -1.0),
    (2, 3, 0.4, 0.5, "sum", 0.3, False, 1.0),
    (3, 3, -0.4, 0.3, "sum", 1.0, False, -1.0),
    (4, 4, 0.4, 0.2, "mean", 1.3, False, 1.0),
    (5, 2, 0.0, 0.4, "mean", 1.0, True, 0.0),  # task 1 = -task 0: every elected sign is 0, majority 0
]


def flat_thresholds(base, experts, density):
    tv = torch.vstack([ref_state_dict_to_vector(e) for e in experts]) - ref_state_dict_to_vector(base)
    p = tv.shape[1]
    return [float(tv[t].abs().kthvalue(p - int(p * density)).values) for t in range(len(experts))]


@pytest.mark.parametrize("seed, tasks, offset, density, mode, lam, mirror, majority", TIES_CASES)
def test_ties_global_ops_match_flat_reference(seed, tasks, offset, density, mode, lam, mirror, majority):
    base, experts = make_model(seed, tasks, offset, mirror=mirror)
    ref_majority, zero_count = ref_zero_sign(base, experts, density)
    assert ref_majority == majority and zero_count > 0  # the case exercises the zero-sign resolution
    expected = ref_ties(base, experts, density, mode, lam)
    got, thresholds, zero_sign = ops_ties_global(base, experts, density, mode, lam)
    assert zero_sign == majority
    assert thresholds == flat_thresholds(base, experts, density)
    for n in SHAPES:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n


def test_ties_global_differs_from_per_tensor_and_zero_sign_matters():
    """Guards against the comparison above being vacuous: a wrong zero sign or per-tensor trim is detected."""
    base, experts = make_model(0, 3, 0.4)
    expected = ref_ties(base, experts, 0.2, "mean", 1.0)
    got, thresholds, zero_sign = ops_ties_global(base, experts, 0.2, "mean", 1.0)
    wrong = {n: base[n] + ties.ties_delta(torch.stack([e[n] - base[n] for e in experts]), thresholds, [1.0] * 3,
                                          -zero_sign, "mean") for n in SHAPES}
    assert any(not torch.allclose(wrong[n], expected[n], atol=1e-6) for n in SHAPES)
    per_tensor = {}
    for n in SHAPES:
        tv = torch.stack([e[n] - base[n] for e in experts])
        thr = [ties.magnitude_threshold(tv[t], 0.2) for t in range(3)]
        per_tensor[n] = base[n] + ties.ties_delta(tv, thr, [1.0] * 3, zero_sign, "mean")
    assert any(not torch.allclose(per_tensor[n], expected[n], atol=1e-6) for n in SHAPES)


@pytest.mark.parametrize("seed, tasks", [(10, 3), (11, 4), (12, 2)])
def test_emr_ops_match_reference(seed, tasks):
    base, experts = make_model(seed, tasks, offset=0.0, cancel=True)
    tvs = [{n: e[n] - base[n] for n in SHAPES} for e in experts]
    ref_unified, ref_masks, ref_rescalers = ref_emr_merge(tvs)
    # distmerge: per tensor, row chunks, rescaler sums reduced over the model
    totals, unified, masks = None, {}, {}
    for n, s in SHAPES.items():
        unified[n] = torch.empty(s)
        masks[n] = torch.empty((tasks,) + s, dtype=torch.bool)
        numel = math.prod(s)
        for a, b, _ in row_chunks(s, 2):
            tv = torch.stack([e[n][a:b] - base[n][a:b] for e in experts])
            u, m = emr.elect(tv)
            unified[n][a:b], masks[n][:, a:b] = u, m
            totals = add_partials(totals, {"sums": emr.rescaler_sums(tv, u, m, numel)})
    rescalers = emr.rescalers(totals["sums"])
    assert torch.allclose(T(rescalers, dtype=torch.float32), ref_rescalers, atol=1e-6, rtol=1e-6)
    zero_mean_nonzero = 0
    for n in SHAPES:
        assert torch.allclose(unified[n], ref_unified[n].float(), atol=1e-6), n
        for t in range(tasks):
            assert torch.equal(masks[n][t], ref_masks[n][t]), (n, t)
            got = emr.task_model(base[n], unified[n], masks[n][t], rescalers[t])
            expected = base[n] + ref_unified[n] * ref_masks[n][t] * ref_rescalers[t]
            assert torch.allclose(got, expected, atol=1e-6), (n, t)
        mean = torch.stack([tv[n] for tv in tvs]).mean(0)
        zero_mean_nonzero += int(((mean == 0) & (tvs[0][n] != 0)).sum())
    assert zero_mean_nonzero > 0  # the planted (+a, -a, 0, ...) columns hit the exact-zero-mean quirk


# =====================================================================================================
# 4. Spec section 10 invariants
# =====================================================================================================


def test_dare_p0_is_identity():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(4, 33, generator=g)
    keep = dare.keep_mask(0.0, 5, "m", "t", tau.numel(), 0, tau.numel())
    assert keep.all()
    for rescale in ("inverse", "l1", "none"):
        assert torch.equal(dare.drop_and_rescale(tau, keep, 0.0, rescale), tau)


def test_dare_expectation_is_tau():
    """E[delta] = tau. Mean over S seeds of tau * B/(1-p), B ~ Bernoulli(1-p): the relative error of one element
    has std sqrt(p / ((1-p) S)); with p = 0.3, S = 3000 that is 0.012, so 6 sigma = 0.072 per element and the
    error of the mean over 64 elements has std 0.0015 (6 sigma = 0.009)."""
    p, seeds, n = 0.3, 3000, 64
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(n, generator=g).sign() * (0.5 + torch.rand(n, generator=g))
    total = torch.zeros(n, dtype=torch.float64)
    for s in range(seeds):
        total += dare.drop_and_rescale(tau, dare.keep_mask(p, s, "m", "t", n, 0, n), p, "inverse").double()
    rel = total / seeds / tau.double() - 1
    sigma = math.sqrt(p / ((1 - p) * seeds))
    assert rel.abs().max() < 6 * sigma
    assert abs(float(rel.mean())) < 6 * sigma / math.sqrt(n)
    # and not trivially: a single draw is far from tau
    single = dare.drop_and_rescale(tau, dare.keep_mask(p, 0, "m", "t", n, 0, n), p, "inverse")
    assert not torch.allclose(single, tau, atol=1e-3)


def test_ties_density_one_single_task_ops():
    g = torch.Generator().manual_seed(2)
    base, tau = torch.randn(5, 4, generator=g), torch.randn(1, 5, 4, generator=g)
    tau[0, 0, 0] = 0.0
    for mode in ("mean", "sum"):
        delta = ties.ties_delta(tau, [ties.magnitude_threshold(tau[0], 1.0)], [1.0], None, mode)
        close(base + 0.7 * delta, base + 0.7 * tau[0])


def test_emr_single_task_ops():
    g = torch.Generator().manual_seed(3)
    base, theta = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    theta[0, 0] = base[0, 0]  # tau exactly 0 there
    tv = task_vectors(base, [theta])
    unified, masks = emr.elect(tv)
    close(unified, tv[0])
    (r,) = emr.rescalers(emr.rescaler_sums(tv, unified, masks, tv[0].numel()))
    assert r == pytest.approx(1.0, abs=1e-12)
    close(emr.task_model(base, unified, masks[0], r), theta)


# =====================================================================================================
# 5. Method-level checks
# =====================================================================================================


def make_jobs(base, experts, weights=None, densities=None, drop_rates=None, method=None):
    """Jobs as the config resolves them: ``densities`` / ``drop_rates`` are per-model settings (None: the
    method's own parameter); ``method`` declares which per-model parameters a job carries."""
    count = len(experts)
    names = tuple(f"e{i}" for i in range(count))
    method = method or build_method("dare", {"then": "ties"})
    given = [{k: v for k, v in (("density", (densities or [None] * count)[i]),
                                ("drop_rate", (drop_rates or [None] * count)[i])) if v is not None}
             for i in range(count)]
    jobs = {}
    for n in sorted(base):
        per_model, per_tensor = resolve_job_settings(method, n, 0.0, given)
        per_model.pop("weight")
        jobs[n] = TensorJob(name=n, numel=base[n].numel(), model_names=names, weights=tuple(weights or [1.0] * count),
                            per_model=per_model, per_tensor=per_tensor)
    return jobs


def run_by_hand(method, base, experts, rows=3, jobs=None):
    """The engine's protocol without Ray (``execute.merge_in_memory``), ``rows`` rows a chunk: (merged, final
    state, the passes run, the method's artifacts by key)."""
    jobs = jobs or make_jobs(base, experts, method=method)
    names = sorted(base)
    tensors = [output_tensor(n, base[n].shape, jobs[n]) for n in names]
    passes = []

    def read(tensor, start, stop):
        rows_of = (lambda v: v) if start is None else (lambda v: v[start:stop])
        return rows_of(base[tensor.name]), [rows_of(e[tensor.name]) for e in experts]

    def chunker(tensor, chunked):
        return execute.row_chunks(tensor, chunked, rows * execute.row_elements(tensor))

    out, artifacts, state = execute.merge_in_memory(_CountPasses(method, passes), tensors, read, torch.float32,
                                                    chunker)
    return out, state, passes, artifacts


class _CountPasses:
    """A method seen through the executor, recording the reduction passes it asks for."""

    def __init__(self, method, passes):
        self._method, self._passes = method, passes

    def next_pass(self, state):
        name = self._method.next_pass(state)
        if name is not None:
            self._passes.append(name)
            assert len(self._passes) < 10
        return name

    def __getattr__(self, attr):
        return getattr(self._method, attr)


@pytest.mark.parametrize("method, params, key", [
    ("ties", {"foo": 1}, "parameters.foo"),
    ("task_arithmetic", {"density": 0.5}, "parameters.density"),
    ("weight_average", {"lambda": 1.0}, "parameters.lambda"),
    ("emr", {"foo": 1}, "parameters.foo"),
    ("dare", {"foo": 1}, "parameters.foo"),
    ("dare", {"then": "ties", "bar": 2}, "parameters.bar"),
    ("ties", {"density": 0}, "parameters.density"),
    ("ties", {"density": 0.0}, "parameters.density"),
    ("ties", {"density": 1.5}, "parameters.density"),
    ("ties", {"density": "high"}, "parameters.density"),
    ("ties", {"trim_scope": "layer"}, "parameters.trim_scope"),
    ("ties", {"disjoint": "max"}, "parameters.disjoint"),
    ("dare", {"drop_rate": 1.5}, "parameters.drop_rate"),
    ("dare", {"drop_rate": -0.1}, "parameters.drop_rate"),
    ("dare", {"then": "emr"}, "parameters.then"),
    ("dare", {"then": "ties", "density": 1.5}, "parameters.density"),
])
def test_build_method_rejects_bad_parameters(method, params, key):
    with pytest.raises(ConfigError) as info:
        build_method(method, params)
    assert key in str(info.value)


def test_build_method_unknown_method_and_good_parameters():
    with pytest.raises(ConfigError, match="method"):
        build_method("magic_merge", {})
    m = build_method("ties", {"lambda": 0.5, "density": 1.0})
    assert m.params.lam == 0.5 and m.params.density == 1.0
    d = build_method("dare", {"drop_rate": 1.0, "then": "ties", "density": 0.3})
    assert d.params.drop_rate == 1.0 and d.inner.params.density == 0.3
    # trim_scope global needs one density per model over the whole model
    base, experts = make_model(0, 2)
    jobs = make_jobs(base, experts)
    jobs["b.bias"] = make_jobs(base, experts, densities=[0.3, 0.3])["b.bias"]
    with pytest.raises(ConfigError, match="density"):
        build_method("ties", {"density": 0.5}).initial_state(list(jobs.values()))
    # a per-model density out of range is caught before any read
    with pytest.raises(ConfigError, match="density"):
        build_method("ties", {"density": 0.5}).initial_state(
            list(make_jobs(base, experts, densities=[0.5, 1.5]).values()))


@pytest.mark.parametrize("seed, tasks, offset, density, mode, lam, mirror, majority", TIES_CASES)
def test_ties_method_global_by_hand_matches_flat_reference(seed, tasks, offset, density, mode, lam, mirror,
                                                          majority):
    base, experts = make_model(seed, tasks, offset, mirror=mirror)
    method = build_method("ties", {"density": density, "lambda": lam, "disjoint": mode, "trim_scope": "global"})
    got, state, passes, _ = run_by_hand(method, base, experts, rows=2)
    expected = ref_ties(base, experts, density, mode, lam)
    assert passes == ["trim_high", "trim_low"]
    assert state["thresholds"] == flat_thresholds(base, experts, density)
    assert method.describe(state)["majority_sign"] == majority
    for n in SHAPES:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n


@pytest.mark.parametrize("seed, tasks, offset, density, mode, lam, mirror, majority", TIES_CASES)
def test_ties_chunks_lean_to_the_vote_so_far_and_only_overturned_ones_are_rewritten(
        seed, tasks, offset, density, mode, lam, mirror, majority, monkeypatch):
    """Each chunk merges its zero signs as the vote so far leans (a vote of 0 as -1, the rule's outcome), so
    after the first chunks only those whose lean the model-wide vote overturns are rewritten; the card still
    counts every element the rule set to -1, and the bits are the reference's."""
    from distmerge.methods.generalized import TaskVectorMerge

    rewritten, settled = [], []
    apply, record = execute.DeferredLog.apply, TaskVectorMerge.record_settled
    monkeypatch.setattr(execute.DeferredLog, "apply",
                        lambda log, outputs, outcome: rewritten.append(apply(log, outputs, outcome)) or rewritten[-1])
    monkeypatch.setattr(TaskVectorMerge, "record_settled",
                        lambda self, state, count: settled.append(count) or record(self, state, count))
    base, experts = make_model(seed, tasks, offset, mirror=mirror)
    method = build_method("ties", {"density": density, "lambda": lam, "disjoint": mode, "trim_scope": "global"})
    got, state, _, _ = run_by_hand(method, base, experts, rows=1)
    deferred = settled[-1]
    assert deferred > 0 and sum(rewritten) < deferred / 2
    assert method.describe(state)["patched_elements"] == (deferred if majority <= 0 else 0)
    expected = ref_ties(base, experts, density, mode, lam)
    for n in SHAPES:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n


def test_ties_method_exact_when_bins_are_crowded():
    # every |tau| in one radix bin: the exact threshold is picked inside it
    base, experts = make_model(20, 3, narrow=True, cancel=False)
    method = build_method("ties", {"density": 0.3})
    got, state, passes, _ = run_by_hand(method, base, experts, rows=3)
    assert passes == ["trim_high", "trim_low"]
    assert state["thresholds"] == flat_thresholds(base, experts, 0.3)
    assert max(state["ranks"]) > 5  # the exact value was picked inside a crowded bin
    expected = ref_ties(base, experts, 0.3, "mean", 1.0)
    for n in SHAPES:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n


def test_ties_method_zero_majority_patches_the_cancelled_elements():
    # elected signs: col 0 +, col 1 0 (exact cancellation), col 2 -: the majority sign is 0, so col 1 takes the
    # negative value (reference quirk). The merge writes +4 there first and the deferred patch makes it -4.
    base = {"w": T([0.5, -0.25, 1.0, 2.0])}
    taus = [T([4.0, -4.0, -1.0, -0.5]), T([2.0, 4.0, -1.0, -0.5])]
    experts = [{"w": base["w"] + tau} for tau in taus]
    got, state, passes, _ = run_by_hand(build_method("ties", {"density": 0.5}), base, experts, rows=1)
    assert passes == ["trim_high", "trim_low"]
    assert state["thresholds"] == [1.0, 1.0] and method_majority(state) == 0
    close(got["w"] - base["w"], [3.0, -4.0, -1.0, 0.0])
    assert torch.allclose(got["w"], ref_ties(base, experts, 0.5, "mean", 1.0)["w"], atol=1e-6)


def method_majority(state):
    return build_method("ties", {"density": 0.5}).describe(state)["majority_sign"]


def test_ties_method_chunking_does_not_matter():
    base, experts = make_model(30, 3, 0.2)
    method = build_method("ties", {"density": 0.25, "lambda": 0.9})
    outs = [run_by_hand(method, base, experts, rows=r)[0] for r in (1, 2, 100)]
    for n in SHAPES:
        assert torch.equal(outs[0][n], outs[1][n]) and torch.equal(outs[0][n], outs[2][n])


def test_ties_method_density_one_single_task():
    base, experts = make_model(31, 1, cancel=False)
    for scope in ("global", "tensor"):
        method = build_method("ties", {"density": 1.0, "lambda": 0.7, "trim_scope": scope})
        got, *_ = run_by_hand(method, base, experts)
        for n in SHAPES:
            assert torch.allclose(got[n], base[n] + 0.7 * (experts[0][n] - base[n]), atol=1e-6), n


def test_ties_method_tensor_scope_matches_per_tensor_reference():
    base, experts = make_model(32, 3, 0.1)
    method = build_method("ties", {"density": 0.3, "trim_scope": "tensor", "lambda": 1.0})
    got, _, passes, _ = run_by_hand(method, base, experts)
    assert passes == []
    for n in SHAPES:  # the reference applied to one tensor at a time
        expected = ref_ties({n: base[n]}, [{n: e[n]} for e in experts], 0.3, "mean", 1.0)[n]
        assert torch.allclose(got[n], expected, atol=1e-6), n


def test_emr_method_by_hand_matches_reference():
    base, experts = make_model(33, 3)
    method = build_method("emr", {})
    got, state, passes, extra = run_by_hand(method, base, experts, rows=2)
    assert passes == []  # the rescaler sums come with the merge, not a pass before it
    tvs = [{n: e[n] - base[n] for n in SHAPES} for e in experts]
    ref_unified, ref_masks, ref_rescalers = ref_emr_merge(tvs)
    assert state["rescalers"] == pytest.approx(ref_rescalers.tolist(), rel=1e-6)
    for n in SHAPES:
        assert torch.equal(got[n], base[n])  # the output model is the backbone
        unified = extra[n]
        assert torch.allclose(unified, ref_unified[n], atol=1e-6)
        masks = emr.unpack_mask(extra[f"{n}::mask"], SHAPES[n])
        assert torch.equal(masks, torch.stack(ref_masks[n]))


def test_emr_method_single_task():
    base, experts = make_model(34, 1, cancel=False)
    _, state, _, extra = run_by_hand(build_method("emr", {}), base, experts)
    assert state["rescalers"] == pytest.approx([1.0], abs=1e-9)
    for n in SHAPES:
        unified = extra[n]
        mask = emr.unpack_mask(extra[f"{n}::mask"], SHAPES[n])[0]
        theta = emr.task_model(base[n], unified, mask, state["rescalers"][0])
        assert torch.allclose(theta, experts[0][n], atol=1e-6), n


def test_dare_method_chunking_and_ops():
    base, experts = make_model(35, 2)
    method = build_method("dare", {"drop_rate": 0.6, "then": "task_arithmetic", "lambda": 0.5, "seed": 4})
    by_rows = [run_by_hand(method, base, experts, rows=r)[0] for r in (1, 3, 100)]
    for n in SHAPES:
        assert torch.equal(by_rows[0][n], by_rows[1][n]) and torch.equal(by_rows[0][n], by_rows[2][n])
        numel = base[n].numel()
        deltas = [dare.drop_and_rescale(e[n] - base[n], dare.keep_mask(0.6, 4, f"e{i}", n, numel, 0, numel), 0.6)
                  for i, e in enumerate(experts)]
        assert torch.allclose(by_rows[0][n], base[n] + 0.5 * (deltas[0] + deltas[1]), atol=1e-6), n
    # p = 0 through the method: plain task arithmetic
    got, *_ = run_by_hand(build_method("dare", {"drop_rate": 0.0, "lambda": 0.5}), base, experts)
    for n in SHAPES:
        assert torch.allclose(got[n], base[n] + 0.5 * sum(e[n] - base[n] for e in experts), atol=1e-6)


def test_deferred_sign_patches_only_exact_cancellations():
    """Elements whose trimmed values are all zero, or whose sum is nonzero, are never patched."""
    trimmed = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.0],
                            [0.0, -1.0, 1.0, 1.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0, 0.0]])
    merged, sign_sum, index, alternative = ties.merge_deferred_sign(trimmed, [1.0, 1.0, 1.0])
    assert index.tolist() == [1, 3]  # the two exact cancellations
    assert torch.equal(merged, torch.tensor([0.0, 1.0, 1.5, 1.0, 0.0]))  # zero sums merged with +1
    assert torch.equal(alternative, torch.tensor([-1.0, -1.0]))  # with -1 instead
    assert sign_sum == 1
    # merged with -1 (a chunk leaning negative): the same elements, the two values swapped
    merged, sign_sum, index, alternative = ties.merge_deferred_sign(trimmed, [1.0, 1.0, 1.0], zero_sign=-1.0)
    assert index.tolist() == [1, 3] and sign_sum == 1
    assert torch.equal(merged, torch.tensor([0.0, -1.0, 1.5, -1.0, 0.0]))
    assert torch.equal(alternative, torch.tensor([1.0, 1.0]))


# =====================================================================================================
# 6. The executor's own contracts
# =====================================================================================================


@pytest.mark.parametrize("shape, rows", [((7, 5), 1), ((7, 5), 3), ((11,), 3), ((3, 4, 2), 2), ((13, 6), 5)])
def test_mask_packer_over_row_chunks_equals_packing_the_whole_mask(shape, rows):
    """EMR streams its masks chunk by chunk; chunk sizes that are not multiples of 8 carry bits over."""
    g = torch.Generator().manual_seed(sum(shape) + rows)
    mask = torch.rand((3,) + shape, generator=g) > 0.5
    packer = emr.MaskPacker(3, shape)
    for a, b, _ in row_chunks(shape, rows):
        packer.add(mask[:, a:b])
    packed = packer.finish()
    assert packed.shape == (3, emr.packed_bytes(shape))
    assert torch.equal(packed, emr.pack_mask(mask))
    short = emr.MaskPacker(3, shape)
    short.add(mask[:, :1])
    with pytest.raises(ValueError, match="masks of .* elements packed"):
        short.finish()  # a tensor's chunks that do not add up are an error, not a mask with stale bytes


def test_emr_artifacts_chunked_equal_whole_tensor():
    base, experts = make_model(36, 3)
    by_rows = [run_by_hand(build_method("emr", {}), base, experts, rows=r)[3] for r in (1, 2, 100)]
    assert set(by_rows[0]) == {key for n in SHAPES for key in (n, f"{n}::mask")}
    for key in by_rows[0]:
        assert torch.equal(by_rows[0][key], by_rows[1][key]) and torch.equal(by_rows[0][key], by_rows[2][key])


def test_whole_tensor_methods_get_whole_tensors():
    """A method that is not chunkable sees every tensor whole, in its passes and its merge."""
    base, experts = make_model(37, 2)
    method = build_method("ties", {"density": 0.5, "trim_scope": "tensor"})
    seen = []

    class Watching:
        def __getattr__(self, attr):
            return getattr(method, attr)

        def merge(self, b, e, job, offset, state):
            seen.append((job.name, tuple(b.shape), offset))
            return method.merge(b, e, job, offset, state)

    got, *_ = run_by_hand(Watching(), base, experts, rows=1)
    assert seen == [(n, SHAPES[n], 0) for n in sorted(SHAPES)]
    want, *_ = run_by_hand(method, base, experts, rows=1)
    assert all(torch.equal(got[n], want[n]) for n in SHAPES)


def test_chunk_results_are_typed():
    base, experts = make_model(38, 2)
    job = make_jobs(base, experts)["a.weight"]
    state = build_method("emr", {}).initial_state([job])
    result = build_method("emr", {}).merge(base["a.weight"], [e["a.weight"] for e in experts], job, 0, state)
    assert isinstance(result, execute.ChunkResult) and set(result.artifacts) == {"vector", "mask"}
    assert result.deferred is None
