"""The compiled TIES loops (``ops/ties_fused.py``) give the torch formulation's bits, on inputs made to hit
every edge: values exactly at the threshold, zeros of both signs, elements whose trimmed values cancel, unit
and non-unit (negative included) weights, keep-all and keep-none thresholds, mean and sum, read-only inputs."""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import build_method
from distmerge.methods.base import TensorJob
from distmerge.ops import ties as ties_ops
from distmerge.ops import ties_fused
from distmerge.ops.task_vectors import task_vectors

pytestmark = pytest.mark.skipif(ties_fused._kernels() is None, reason="numba is not installed")


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _inputs(seed: int, tasks: int, n: int):
    """bf16-valued float32 inputs on a coarse grid: many exact ties, zero task vectors and cancellations."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randint(-8, 9, (n,), generator=g) * 0.125).float()
    base[torch.rand(n, generator=g) < 0.1] = -0.0
    experts = []
    for _ in range(tasks):
        step = torch.randint(-3, 4, (n,), generator=g) * 0.0625
        expert = (base + step).bfloat16().float()
        expert[torch.rand(n, generator=g) < 0.05] = -0.0
        experts.append(expert)
    return base, experts


def _torch_merge(base, experts, thresholds, weights, mode, lam, zero_sign=1):
    trimmed = ties_ops.trim(task_vectors(base, experts), thresholds)
    merged, vote, index, alternative = ties_ops.merge_deferred_sign(trimmed, weights, mode, zero_sign)
    return base + lam * merged, vote, index, base.reshape(-1)[index] + lam * alternative


CASES = [  # tasks, weights, mode, lam, thresholds as ranks of |tau| (None: keep all, "inf": keep none)
    (3, (1.0, 1.0, 1.0), "mean", 1.0, (0.5, 0.5, 0.5)),
    (3, (1.0, 1.0, 1.0), "mean", 0.7, (0.2, 0.8, 0.5)),
    (3, (1.0, 1.0, 1.0), "sum", 0.3, (0.5, 0.5, 0.5)),
    (2, (0.5, 2.0), "mean", 1.3, (0.3, 0.6)),
    (4, (1.0, -0.5, 0.25, 3.0), "mean", 0.9, (0.5, None, "inf", 0.4)),
    (4, (1.0, -0.5, 0.25, 3.0), "sum", 1.0, (0.5, None, 0.9, 0.4)),
    (1, (1.0,), "mean", 1.0, (0.5,)),
    (3, (1.0, 1.0, 1.0), "mean", 1.0, (None, None, None)),
]


def _thresholds(base, experts, quantiles):
    tv = task_vectors(base, experts)
    out = []
    for t, q in enumerate(quantiles):
        if q is None:
            out.append(ties_ops.KEEP_ALL)
        elif q == "inf":
            out.append(ties_ops.KEEP_NONE)
        else:  # a value that occurs: ties at the threshold
            out.append(float(tv[t].abs().reshape(-1).sort().values[int(q * tv[t].numel())]))
    return out


@pytest.mark.parametrize("zero_sign", [1, -1])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_fused_merge_is_the_torch_merge_bit_for_bit(case, seed, zero_sign):
    tasks, weights, mode, lam, quantiles = case
    base, experts = _inputs(seed, tasks, 5003)  # not a multiple of the block
    thresholds = _thresholds(base, experts, quantiles)
    want = _torch_merge(base, experts, thresholds, weights, mode, lam, zero_sign)
    got = ties_fused.merge_deferred_sign(base, experts, thresholds, weights, mode, lam, zero_sign)
    assert torch.equal(_bits(got[0]), _bits(want[0]))
    assert got[1] == want[1]
    assert torch.equal(got[2], want[2])
    assert torch.equal(_bits(got[3]), _bits(want[3]))
    if tasks > 1 and quantiles[0] is not None:
        assert want[2].numel() > 0  # the inputs do reach the deferred zero-sign elements
    # merged one way with the other way's values patched in is the merge the other way, the same elements deferred
    other = ties_fused.merge_deferred_sign(base, experts, thresholds, weights, mode, lam, -zero_sign)
    patched = got[0].clone().reshape(-1)
    patched[got[2]] = got[3]
    assert torch.equal(_bits(patched), _bits(other[0].reshape(-1)))
    assert torch.equal(got[2], other[2]) and other[1] == got[1]


def mixed_inputs(seed: int, tasks: int, n: int):
    """bf16 inputs where most task vectors are regular (a step within the binade: low 16 bits 0) and some are
    not (steps across a power of two, and float32 noise), as fine-tunes stored in bf16 give."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.05).bfloat16().float()
    experts = []
    for _ in range(tasks):
        expert = (base * (1 + torch.randn(n, generator=g) * 0.02)).bfloat16().float()
        noisy = torch.rand(n, generator=g) < 0.02
        expert[noisy] += torch.randn(int(noisy.sum()), generator=g) * 1e-4  # float32 values: irregular
        experts.append(expert)
    return base, experts


@pytest.mark.parametrize("seed", [0, 3])
def test_fused_histograms_are_the_radix_histograms(seed):
    base, experts = mixed_inputs(seed, 3, 7001)
    tv = task_vectors(base, experts)
    hist, kept = ties_fused.high_histograms(base, experts, keep=True)
    assert torch.equal(hist, torch.stack([ties_ops.radix_high_histogram(tv[t]) for t in range(3)]))
    for t in range(3):
        assert torch.equal(kept[t], ties_ops.radix_irregular_keys(tv[t]))
        assert 0 < kept[t].numel() < 0.2 * tv[t].numel()  # both kinds occur
    again, none = ties_fused.high_histograms(base, experts, into=hist.clone())
    assert none is None and torch.equal(again, 2 * hist)
    bins = [int(torch.mode(kept[0] >> 16).values), -1, ties_ops.high_bin_of(float(tv[2].abs().median()))]
    low = ties_fused.low_histograms(base, experts, bins)
    for t in (0, 2):
        want = ties_ops.radix_low_histogram(tv[t], bins[t])
        assert int(want[0]) > 0 or t == 0  # the median's bin holds regular values, which the pass leaves out
        want[0] = 0
        assert torch.equal(low[t], want)
        assert torch.equal(ties_ops.low_histogram_of_keys(kept[t], bins[t], torch.zeros_like(want)), want)
    assert not low[1].any()
    assert int(low[0].sum()) > 0


def test_read_only_and_writable_inputs_mix():
    """Inputs memory-mapped from a file are read-only, converted ones are not: one call takes both."""
    base, experts = _inputs(5, 3, 999)
    frozen = torch.from_numpy(experts[1].numpy().copy())
    frozen.numpy().flags.writeable = False
    mixed = [experts[0], frozen, experts[2]]
    thresholds = _thresholds(base, experts, (0.5, 0.5, 0.5))
    a = ties_fused.merge_deferred_sign(base, mixed, thresholds, (1.0,) * 3, "mean", 1.0)
    b = ties_fused.merge_deferred_sign(base, experts, thresholds, (1.0,) * 3, "mean", 1.0)
    assert torch.equal(_bits(a[0]), _bits(b[0]))


@pytest.mark.parametrize("params", [{}, {"convention": "mergekit"}, {"disjoint": "sum", "lambda": 0.6}])
def test_the_method_gives_the_same_chunks_with_and_without_numba(params, monkeypatch):
    """TIES with a global trim takes the compiled loops where they load, torch's operations elsewhere (no numba,
    a GPU, other dtypes): the chunk, its vote and its deferred elements are the same."""
    method = build_method("ties", {"density": 0.3, **params})
    base, experts = _inputs(7, 3, 17 * 241)
    base, experts = base.reshape(17, 241), [e.reshape(17, 241) for e in experts]
    job = TensorJob(name="w", numel=base.numel(), model_names=("a", "b", "c"), weights=(1.0, 1.0, 1.0),
                    per_model={"density": (0.3, 0.3, 0.3)})
    state = method.initial_state([job])

    def run():
        s = dict(state)
        while (name := method.next_pass(s)) is not None:
            totals = None
            for rows in ((0, 5), (5, 17)):  # two chunks: the in-place sums add up
                totals = method.add_stats(totals, name, base[slice(*rows)], [e[slice(*rows)] for e in experts],
                                          job, rows[0] * 241, s)
            s = method.finish_pass(name, totals, s)
        return s, method.merge(base, experts, job, 0, s)

    calls = []
    compiled = ties_fused.merge_deferred_sign
    monkeypatch.setattr(ties_fused, "merge_deferred_sign", lambda *a: calls.append(1) or compiled(*a))
    fused_state, fused = run()
    assert calls  # the compiled loop did run
    monkeypatch.setattr(ties_fused, "_kernels", lambda widen=False: None)
    torch_state, plain = run()
    assert len(calls) == 1
    assert fused_state["thresholds"] == torch_state["thresholds"]
    assert torch.equal(_bits(fused.merged), _bits(plain.merged))
    assert (fused.deferred is None) == (plain.deferred is None)
    if plain.deferred is not None:
        assert fused.deferred.vote == plain.deferred.vote
        assert torch.equal(fused.deferred.index, plain.deferred.index)
        assert torch.equal(_bits(fused.deferred.value), _bits(plain.deferred.value))


def test_the_loops_can_be_switched_off(monkeypatch):
    """DISTMERGE_COMPILED=0 rules the compiled loops out (the torch formulation runs), read at every call."""
    base, experts = _inputs(0, 2, 64)
    assert ties_fused.available(base, *experts)
    monkeypatch.setenv("DISTMERGE_COMPILED", "0")
    assert not ties_fused.available(base, *experts)
    monkeypatch.delenv("DISTMERGE_COMPILED")
    assert ties_fused.available(base, *experts)
    assert not ties_fused.available(base.double(), *(e.double() for e in experts))  # float32 only


@pytest.mark.parametrize("case", CASES[:5])
def test_bf16_chunks_widened_in_the_loops_give_the_float32_bits(case):
    """Chunks as read from a bf16 checkpoint, widened block by block inside the loops (no float32 copy of the
    chunk): the histograms, the kept keys, the merge and its deferred elements are those of the float32 chunk."""
    tasks, weights, mode, lam, quantiles = case
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(5003, generator=g) * 0.05
    # task vectors across binades (irregular keys) and on a coarse grid (ties, zeros, cancellations) in one chunk
    grid, grid_experts = _inputs(11, tasks, 5003)
    stored = [torch.cat([wide, grid]).bfloat16()]
    stored += [torch.cat([wide + torch.randn(5003, generator=g) * 0.05, e]).bfloat16() for e in grid_experts]
    base, experts = stored[0].float(), [e.float() for e in stored[1:]]  # what the conversion gave before
    assert not ties_fused.available(*stored)  # bf16 only where the caller asks for the float32 result
    assert ties_fused.available(*stored, widening=True)
    assert not ties_fused.available(base, *stored[1:], widening=True)  # one dtype for every input
    hist, kept = ties_fused.high_histograms(stored[0], stored[1:], keep=True)
    want_hist, want_kept = ties_fused.high_histograms(base, experts, keep=True)
    assert torch.equal(hist, want_hist)
    assert all(torch.equal(a, b) for a, b in zip(kept, want_kept)) and sum(k.numel() for k in kept) > 0
    bins = [int(torch.mode(k >> 16).values) if k.numel() else -1 for k in kept]
    assert torch.equal(ties_fused.low_histograms(stored[0], stored[1:], bins),
                       ties_fused.low_histograms(base, experts, bins))
    thresholds = _thresholds(base, experts, quantiles)
    got = ties_fused.merge_deferred_sign(stored[0], stored[1:], thresholds, weights, mode, lam)
    want = _torch_merge(base, experts, thresholds, weights, mode, lam)
    assert tasks == 1 or want[2].numel() > 0  # deferred elements occur
    assert torch.equal(_bits(got[0]), _bits(want[0])) and got[1] == want[1]
    assert torch.equal(got[2], want[2]) and torch.equal(_bits(got[3]), _bits(want[3]))


def test_only_the_widening_copy_of_the_method_takes_bf16():
    """``with_bfloat16_inputs`` gives a copy whose merge of bf16 chunks is the float32 merge of their values;
    the method itself, given bf16 chunks (a bf16 merge), still computes in bf16 as before."""
    method = build_method("ties", {"density": 0.4})
    widening = method.with_bfloat16_inputs()
    assert widening is not None and widening is not method and not method.widens_bfloat16
    assert build_method("ties", {"density": 0.4, "trim_scope": "tensor"}).with_bfloat16_inputs() is None
    base, experts = mixed_inputs(2, 3, 4000)
    stored = [x.bfloat16() for x in (base, *experts)]
    job = TensorJob(name="w", numel=4000, model_names=("a", "b", "c"), weights=(1.0, 1.0, 1.0),
                    per_model={"density": (0.4, 0.4, 0.4)})
    state = method.initial_state([job])
    for name in ("trim_high", "trim_low"):
        state = method.finish_pass(name, method.add_stats(None, name, stored[0].float(),
                                                          [e.float() for e in stored[1:]], job, 0, state), state)
    widened = widening.merge(stored[0], stored[1:], job, 0, state)
    want = method.merge(stored[0].float(), [e.float() for e in stored[1:]], job, 0, state)
    assert torch.equal(_bits(widened.merged), _bits(want.merged))
    assert widened.deferred.vote == want.deferred.vote
    in_bf16 = method.merge(stored[0], stored[1:], job, 0, state)
    assert in_bf16.merged.dtype == torch.bfloat16


# --- a sampled trim: the merge from estimated thresholds -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:6])
def test_a_merge_from_brackets_and_guesses_leaves_exactly_the_open_elements(case, dtype):
    """Where each threshold is bracketed or guessed, the elements with no |tau| inside a bracket get the exact
    merge's bits; the open ones, merged again from their own inputs with the thresholds, get theirs too; the two
    votes add up to the exact vote; the counts are |tau| > high and >= low."""
    tasks, weights, mode, lam, quantiles = case
    base, experts = _inputs(3, tasks, 7001)
    base, experts = base.to(dtype), [e.to(dtype) for e in experts]
    thresholds = _thresholds(base.float(), [e.float() for e in experts], quantiles)
    exact = ties_fused.merge_deferred_sign(base, experts, thresholds, weights, mode, lam)
    magnitudes = task_vectors(base.float(), [e.float() for e in experts]).abs()
    brackets = []
    for t, threshold in enumerate(thresholds):
        if threshold in (ties_ops.KEEP_ALL, ties_ops.KEEP_NONE):
            brackets.append(None)
        elif t % 2 == 0:  # a bracket around the threshold, of values that occur (ties at both ends)
            values = magnitudes[t].unique()
            at = int(torch.searchsorted(values, threshold))
            brackets.append((float(values[max(at - 2, 0)]), float(values[min(at + 3, values.numel() - 1)])))
        else:
            brackets.append((threshold, threshold))  # a guess that holds
    merged, vote, index, alternative, undecided, above, reached = ties_fused.merge_bracketed(
        base, experts, brackets, thresholds, weights, mode, lam)

    open_ = torch.zeros(base.numel(), dtype=torch.bool)
    for t, bracket in enumerate(brackets):
        if bracket is None:
            continue
        low, high = bracket
        assert int(above[t]) == int((magnitudes[t] > high).sum()) and int(reached[t]) == int((magnitudes[t] >= low).sum())
        if low < high:
            open_ |= (magnitudes[t] >= low) & (magnitudes[t] <= high)
    assert torch.equal(undecided, open_.nonzero().reshape(-1))
    assert torch.equal(_bits(merged[~open_]), _bits(exact[0][~open_]))
    again = ties_fused.merge_deferred_sign(base[undecided].contiguous(), [e[undecided].contiguous() for e in experts],
                                           thresholds, weights, mode, lam)
    assert torch.equal(_bits(again[0]), _bits(exact[0][undecided]))
    assert vote + again[1] == exact[1]
    assert torch.equal(torch.cat([index, undecided[again[2]]]).sort().values, exact[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sample_histograms_count_every_seventeenth_run_and_its_irregular_keys(dtype):
    base, experts = _inputs(4, 3, 64 * 100 + 5)
    base, experts = base.to(dtype), [(e + 1e-3 * torch.randn(e.shape)).to(dtype) for e in experts]
    hist, irregular = torch.zeros(3, ties_ops.HIGH_BINS, dtype=torch.int64), torch.zeros(3, ties_ops.HIGH_BINS, dtype=torch.int64)
    offset = 64 * 5  # the tensor's run 5: its runs 17, 34, ... are this chunk's 12, 29, ...
    size = ties_fused.sampled_high_histograms(base, experts, hist, irregular, offset)
    picked = torch.cat([torch.arange(r * 64, r * 64 + 64) for r in range(12, 100, 17)])
    assert size == picked.numel()
    tv = task_vectors(base.float()[picked], [e.float()[picked] for e in experts])
    for t in range(3):
        keys = tv[t].abs().view(torch.int32)
        assert torch.equal(hist[t], ties_ops.radix_high_histogram(tv[t]))
        assert torch.equal(irregular[t], torch.bincount(keys[(keys & 0xFFFF) != 0] >> 16, minlength=ties_ops.HIGH_BINS))
