"""The compiled loops' shared pieces: the lowest-set-bit table, and numba's on-disk cache (a kernel that
misses it compiles again in every fresh worker: seconds per actor)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from distmerge.ops.compiled import DE_BRUIJN, LOWEST_BIT

pytest.importorskip("numba")


def _lowest_bit(word: int) -> int:
    w = np.uint64(word)
    with np.errstate(over="ignore"):
        return int(LOWEST_BIT[int(((w & (np.uint64(0) - w)) * DE_BRUIJN) >> np.uint64(58))])


def test_the_table_finds_every_lowest_bit():
    for bit in range(64):
        assert _lowest_bit(1 << bit) == bit
        assert _lowest_bit((1 << bit) | (1 << 63)) == bit  # higher bits do not matter
    rng = np.random.default_rng(0)
    for word in rng.integers(1, 2**63, size=2000, dtype=np.uint64):
        word = int(word) << int(rng.integers(0, 2))
        word &= (1 << 64) - 1
        if word:
            assert _lowest_bit(word) == (word & -word).bit_length() - 1


_CALL_EVERY_KERNEL = """
import json, numpy as np, torch
from distmerge.ops import convert_fused, dare_fused, emr_fused, ties_fused
for dtype in (torch.float32, torch.bfloat16):  # the loops that widen bf16 as they go are kernels of their own
    base = torch.randn(4096).to(dtype); experts = [torch.randn(4096).to(dtype) for _ in range(3)]
    ties_fused.high_histograms(base, experts, keep=True)
    ties_fused.low_histograms(base, experts, [0, -1, 5])
    ties_fused.merge_deferred_sign(base, experts, [0.5, 0.5, 0.5], [1.0, 1.0, 1.0], "mean", 1.0)
    ties_fused.merge_bracketed(base, experts, [(0.5, 0.5)] * 3, [None] * 3, [1.0, 1.0, 1.0], "mean", 1.0)
    ties_fused.merge_bracketed(base, experts, [(0.25, 0.5)] * 3, [None] * 3, [1.0, 1.0, 1.0], "mean", 1.0)
    words = [np.zeros(4096, dtype=np.uint16) for _ in experts]
    dare_fused.drop_and_sum(base, experts, words, [1, 1, 1], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0], 1.0, False)
    dare_fused.weighted_sum(base, experts, [1.0, 1.0, 1.0], 1.0, False)
    dare_fused.weighted_sum(None, experts, [1.0, 1.0, 1.0], 1.0, True)
dare_fused.rounded_sum(base, experts, [1.0, 1.0, 1.0], 1.0, False)  # bf16 compute (the last inputs: bf16)
dare_fused.rounded_sum(None, experts, [1.0, 1.0, 1.0], 1.0, True)
base = torch.randn(4096); experts = [torch.randn(4096) for _ in range(3)]
unified, masks = emr_fused.elect(base, experts)
emr_fused.pack_mask(masks)
convert_fused.to_bfloat16(convert_fused.to_float32(base.bfloat16())[0])
convert_fused.bfloat16_finite(base.bfloat16())
kernels = {f"{name}{'/bf16' if widen else ''}": k for widen in (False, True)
           for name, k in [*zip(("high_histogram", "low_histogram", "merge", "merge_checked", "merge_bracketed"),
                                ties_fused._kernels(widen)),
                           *zip(("drop_and_sum", "weighted_sum", "weight_average"), dare_fused._kernels(widen))]}
kernels.update({k.py_func.__name__: k for k in [*emr_fused._kernels(), *convert_fused._kernels()]})
kernels.update(zip(("rounded_sum", "rounded_average"), dare_fused.kernels(dare_fused._build)[2]))
print(json.dumps({name: [sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values())]
                  for name, k in kernels.items()}))
"""


def test_a_fresh_process_loads_every_kernel_from_the_cache(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "DISTMERGE_COMPILED": "1"}

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", _CALL_EVERY_KERNEL], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert all(misses > 0 for _, misses in first.values()), first  # compiled and saved
    second = run()
    fused = {"high_histogram", "low_histogram", "merge", "merge_checked", "merge_bracketed", "drop_and_sum",
             "weighted_sum", "weight_average"}
    assert set(second) == {*fused, *(f"{name}/bf16" for name in fused), "elect", "pack", "widen", "narrow", "check",
                           "rounded_sum", "rounded_average"}
    for name, (hits, misses) in second.items():
        assert hits > 0 and misses == 0, f"{name}: {hits} cache hits, {misses} misses in a second process"


def test_torch_sums_up_to_ordered_sum_tasks_rows_in_order():
    """What the loops rely on: torch's sum and mean over a stacked dimension of at most ORDERED_SUM_TASKS rows are
    0 + x_1 + ... + x_T in order, on chunk tails too (from 5 rows they are not: the loops then step aside)."""
    import torch

    from distmerge.ops.compiled import ORDERED_SUM_TASKS

    g = torch.Generator().manual_seed(0)
    for tasks in range(1, ORDERED_SUM_TASKS + 1):
        for n in (1000, 1024, 5003, 1 << 18):
            x = torch.randn(tasks, n, generator=g) * torch.logspace(-3, 3, tasks).reshape(tasks, 1)
            in_order = torch.zeros(n)
            for row in x:
                in_order = in_order + row
            assert torch.equal(x.sum(dim=0), in_order)
            assert torch.equal(x.mean(dim=0), in_order / tasks)


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lambda": 0.7}), ("weight_average", {}),
                                           ("ties", {"density": 0.5}), ("dare", {"drop_rate": 0.3}), ("emr", {})])
@pytest.mark.parametrize("experts", [5, 18])
def test_merges_of_more_models_than_sum_in_order_are_torchs(method, params, experts, monkeypatch):
    """With more models than torch sums in order, every method gives the torch formulation's bits (the loops step
    aside), from float32 chunks and from bf16 chunks handed to a widening copy."""
    import torch

    from distmerge.methods import build_method
    from distmerge.methods.execute import merge_tensor_dicts

    g = torch.Generator().manual_seed(experts)
    base = {"w": (torch.randn(1000, generator=g) * 0.05).bfloat16().float()}
    # deltas of very different sizes, so that the order of the sums shows in the rounding
    models = [{"w": (base["w"] + torch.randn(1000, generator=g) * 10.0 ** (t % 7 - 4)).bfloat16().float()}
              for t in range(experts)]
    built = build_method(method, params)
    fused, _ = merge_tensor_dicts(built, base, models)
    widening = built.with_bfloat16_inputs()
    if widening is not None:
        widened, _ = merge_tensor_dicts(widening, {"w": base["w"].bfloat16()},
                                        [{"w": m["w"].bfloat16()} for m in models])
        assert torch.equal(widened["w"].view(torch.int32), fused["w"].view(torch.int32))
    monkeypatch.setenv("DISTMERGE_COMPILED", "0")
    plain, _ = merge_tensor_dicts(built, base, models)
    assert torch.equal(fused["w"].view(torch.int32), plain["w"].view(torch.int32))
