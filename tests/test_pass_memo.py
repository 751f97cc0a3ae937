"""A reduction pass keeps what the next needs (``execute.PassMemo``): TIES' second trim pass counts the irregular
keys the first kept instead of reading the model again, and finds the same exact thresholds."""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import build_method, execute
from distmerge.methods.base import TensorJob
from distmerge.ops import ties_fused
from test_ties_fused import mixed_inputs

SHAPE = (40, 257)


def _family(seed: int, tasks: int = 3):
    base, experts = mixed_inputs(seed, tasks, SHAPE[0] * SHAPE[1])
    return base.reshape(SHAPE), [e.reshape(SHAPE) for e in experts]


def _passes(method, base, experts, memo, rows=7):
    """Both trim passes over one tensor in chunks of ``rows`` rows; (state, rows read in each pass)."""
    job = TensorJob(name="w", numel=base.numel(), model_names=tuple(f"e{i}" for i in range(len(experts))),
                    weights=(1.0,) * len(experts), per_model={"density": (0.2,) * len(experts)})

    class Tensor:
        name, shape = "w", SHAPE

    Tensor.job = job
    read_rows: dict[str, int] = {}

    def read(tensor, start, stop):
        read_rows[current] = read_rows.get(current, 0) + (stop - start)
        return base[start:stop], [e[start:stop] for e in experts]

    def chunker(tensor, chunked):
        return execute.row_chunks(tensor, chunked, rows * SHAPE[1])

    state = method.initial_state([job])
    while (current := method.next_pass(state)) is not None:
        totals = execute.pass_partial(method, current, state, [Tensor], read, chunker, memo)
        state = method.finish_pass(current, totals, state)
    return state, read_rows


def _exact(base, experts, density=0.2):
    tv = torch.stack([e - base for e in experts]).reshape(len(experts), -1).abs()
    p = tv.shape[1]
    return [float(tv[t].kthvalue(p - int(p * density)).values) for t in range(len(experts))]


def _irregular_in_bin(base, experts, high_bins):
    from distmerge.ops import ties as ties_ops

    return [(ties_ops.radix_irregular_keys(e - base) >> 16) == b for e, b in zip(experts, high_bins)]


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_second_pass_reads_nothing_and_finds_the_same_thresholds(seed, compiled, monkeypatch):
    if compiled and ties_fused._kernels() is None:
        pytest.skip("numba is not installed")
    if not compiled:
        monkeypatch.setattr(ties_fused, "_kernels", lambda widen=False: None)
    base, experts = _family(seed)
    method = build_method("ties", {"density": 0.2})
    kept, reads = _passes(method, base, experts, execute.PassMemo())
    read_again, reads_without = _passes(method, base, experts, None)
    assert kept["thresholds"] == read_again["thresholds"] == _exact(base, experts)
    assert reads == {"trim_high": SHAPE[0]}
    assert reads_without == {"trim_high": SHAPE[0], "trim_low": SHAPE[0]}
    regular = [n - int(k.sum()) for n, k in zip(kept["in_bin"], _irregular_in_bin(base, experts, kept["high_bins"]))]
    assert all(r > 0 for r in regular)  # the cut's bin held regular values, which the second pass never saw


def test_a_full_memo_keeps_whole_chunks_and_the_rest_is_read():
    base, experts = _family(2)
    method = build_method("ties", {"density": 0.2})
    everything = execute.PassMemo()
    _passes(method, base, experts, everything)
    memo = execute.PassMemo(budget_bytes=everything.nbytes // 2)
    state, reads = _passes(method, base, experts, memo)
    assert state["thresholds"] == _exact(base, experts)
    assert not memo.accepting and 0 < memo.nbytes <= memo.budget
    assert 0 < reads["trim_low"] < SHAPE[0]  # the chunks that did not fit, and only those


def test_float32_task_vectors_are_all_irregular_and_still_exact():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(SHAPE, generator=g)
    experts = [base + torch.randn(SHAPE, generator=g) * 1e-3 for _ in range(2)]
    state, reads = _passes(build_method("ties", {"density": 0.2}), base, experts, execute.PassMemo())
    assert state["thresholds"] == _exact(base, experts)
    assert reads == {"trim_high": SHAPE[0]}


def test_memo_pages(monkeypatch):
    monkeypatch.setattr(execute.PassMemo, "PAGE", 5)
    memo = execute.PassMemo(budget_bytes=4 * 12)
    rows = [torch.arange(3, dtype=torch.int32), torch.arange(10, 17, dtype=torch.int32)]
    assert memo.keep("a", rows)
    assert memo.keep("b", [torch.zeros(0, dtype=torch.int32), torch.tensor([7, 8], dtype=torch.int32)])
    assert not memo.keep("c", [torch.ones(1, dtype=torch.int32)])  # 13 values > 12: refused whole
    assert not memo.accepting and memo.kept("c") is None and memo.nbytes == 48
    got = memo.kept("a")
    assert [r.tolist() for r in got] == [[0, 1, 2], list(range(10, 17))]  # the second row spans two pages
    assert [r.tolist() for r in memo.kept("b")] == [[], [7, 8]]
    memo.clear()
    assert memo.accepting and memo.kept("a") is None and memo.nbytes == 0
