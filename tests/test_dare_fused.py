"""DARE then a sum as one compiled loop (``ops/dare_fused.py``) gives the torch path's bits: the same mask words,
then task arithmetic or weight average, every rescale that does not read the values, per-model drop rates
(0 and 1 included), weights and lambda; and the torch path runs where numba is missing."""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import build_method
from distmerge.methods.base import TensorJob
from distmerge.ops import dare_fused

pytestmark = pytest.mark.skipif(dare_fused._kernels() is None, reason="numba is not installed")


def _inputs(seed: int, tasks: int, shape):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16().float()
    base.view(-1)[::11] = -0.0
    return base, [(base + torch.randn(shape, generator=g) * 0.002).bfloat16().float() for _ in range(tasks)]


CASES = [
    ({"drop_rate": 0.9, "lambda": 0.5}, (0.9, 0.9, 0.9), (1.0, 1.0, 1.0)),
    ({"drop_rate": 0.3, "lambda": 1.0, "rescale": "none"}, (0.3, 0.0, 1.0), (1.0, 1.0, 1.0)),
    ({"drop_rate": 0.5, "lambda": 0.7}, (0.5, 0.2, 0.8), (0.5, -1.0, 2.0)),
    ({"drop_rate": 0.5, "then": "weight_average"}, (0.5, 0.5, 0.5), (1.0, 3.0, 0.25)),
    ({"drop_rate": 0.5, "then": "task_arithmetic", "normalize": True, "lambda": 1.2}, (0.5, 0.6, 0.7), (1.0, 2.0, 1.0)),
]


@pytest.mark.parametrize("params,rates,weights", CASES)
def test_fused_dare_gives_the_torch_bits(params, rates, weights, monkeypatch):
    method = build_method("dare", params)
    base, experts = _inputs(len(rates), 3, (37, 1000))
    job = TensorJob(name="model.layers.0.mlp.up_proj.weight", numel=base.numel() * 3, model_names=("a", "b", "c"),
                    weights=weights, per_model={"drop_rate": rates})
    offset = base.numel()  # the tensor's second third: the words are taken from the right place of the stream
    calls = []
    compiled = dare_fused.drop_and_sum
    monkeypatch.setattr(dare_fused, "drop_and_sum", lambda *a: calls.append(1) or compiled(*a))
    fused = method.merge(base, experts, job, offset, {}).merged
    assert calls
    monkeypatch.setattr(dare_fused, "_kernels", lambda widen=False: None)
    plain = method.merge(base, experts, job, offset, {}).merged
    assert len(calls) == 1
    assert torch.equal(fused.view(torch.int32), plain.view(torch.int32))


@pytest.mark.parametrize("params,rates,weights", CASES[:3])
def test_bf16_chunks_widened_in_the_loop_give_the_float32_bits(params, rates, weights, monkeypatch):
    method = build_method("dare", params)
    widening = method.with_bfloat16_inputs()
    base, experts = _inputs(len(rates), 3, (37, 1000))  # bf16 values held in float32
    job = TensorJob(name="model.layers.0.mlp.up_proj.weight", numel=base.numel(), model_names=("a", "b", "c"),
                    weights=weights, per_model={"drop_rate": rates})
    want = method.merge(base, experts, job, 0, {}).merged
    calls = []
    compiled = dare_fused.drop_and_sum
    monkeypatch.setattr(dare_fused, "drop_and_sum", lambda *a: calls.append(a[0].dtype) or compiled(*a))
    got = widening.merge(base.bfloat16(), [e.bfloat16() for e in experts], job, 0, {}).merged
    assert calls == [torch.bfloat16]  # the loop took the chunks as they came
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("params,weights", [({}, (1.0, 1.0, 1.0)), ({"lambda": 0.3}, (0.5, -1.0, 2.0)),
                                            ({"normalize": True, "lambda": 1.2}, (1.0, 2.0, 1.0)),
                                            ({"normalize": True}, (1.0, -1.0, 0.0))])
def test_task_arithmetic_loop_gives_the_torch_bits(params, weights, monkeypatch):
    """Task arithmetic is the same loop with nothing dropped: the torch path's bits, from float32 chunks and
    from bf16 chunks the widening copy takes as read (a zero weight sum left undivided, as torch's guard)."""
    method = build_method("task_arithmetic", params)
    base, experts = _inputs(4, 3, (29, 1001))
    job = TensorJob(name="w", numel=base.numel(), model_names=("a", "b", "c"), weights=weights, per_model={})
    calls = []
    compiled = dare_fused.weighted_sum
    monkeypatch.setattr(dare_fused, "weighted_sum", lambda *a: calls.append(1) or compiled(*a))
    fused = method.merge(base, experts, job, 0, {}).merged
    widened = method.with_bfloat16_inputs().merge(base.bfloat16(), [e.bfloat16() for e in experts], job, 0, {}).merged
    assert len(calls) == 2
    monkeypatch.setattr(dare_fused, "_kernels", lambda widen=False: None)
    plain = method.merge(base, experts, job, 0, {}).merged
    assert len(calls) == 2
    for got in (fused, widened):
        assert torch.equal(got.view(torch.int32), plain.view(torch.int32))


@pytest.mark.parametrize("params,weights", [({}, (1.0, 1.0, 1.0)), ({}, (0.5, 2.0, 1.5)),
                                            ({"normalize": False}, (0.5, -1.0, 2.0)), ({}, (1.0, -1.0, 0.0))])
def test_weight_average_loop_gives_the_torch_bits(params, weights, monkeypatch):
    """Weight average is the loop without a base: torch's weighted mean bit for bit, from float32 chunks and
    from bf16 chunks the widening copy takes as read; given bf16 chunks itself it still computes in bf16."""
    method = build_method("weight_average", params)
    _, experts = _inputs(6, 3, (31, 999))
    job = TensorJob(name="w", numel=experts[0].numel(), model_names=("a", "b", "c"), weights=weights, per_model={})
    calls = []
    compiled = dare_fused.weighted_sum
    monkeypatch.setattr(dare_fused, "weighted_sum", lambda *a: calls.append(a[1][0].dtype) or compiled(*a))
    fused = method.merge(None, experts, job, 0, {}).merged
    widened = method.with_bfloat16_inputs().merge(None, [e.bfloat16() for e in experts], job, 0, {}).merged
    in_bf16 = method.merge(None, [e.bfloat16() for e in experts], job, 0, {}).merged
    assert calls == [torch.float32, torch.bfloat16]  # the widening loop ran twice; the bf16 merge is the rounding loop
    monkeypatch.setattr(dare_fused, "_kernels", lambda widen=False: None)
    plain = method.merge(None, experts, job, 0, {}).merged
    for got in (fused, widened):
        assert torch.equal(got.view(torch.int32), plain.view(torch.int32))
    assert in_bf16.dtype == torch.bfloat16


def _bfloat16_inputs(seed: int, tasks: int, shape):
    """bf16 inputs whose bf16 arithmetic rounds everywhere: fine-tune-like steps, zeros of both signs, zero task
    vectors, and elements whose task vector overflows to inf (NaN where a zero weight multiplies it)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    base.view(-1)[::11] = -0.0
    experts = []
    for t in range(tasks):
        expert = (base.float() * (1 + torch.randn(shape, generator=g) * 0.05)
                  + torch.randn(shape, generator=g) * 1e-3).bfloat16()
        expert.view(-1)[t::13] = base.view(-1)[t::13]  # zero task vectors
        expert.view(-1)[7::97] = 3.0e38 if t % 2 == 0 else -3.0e38  # against the base's -3e38: inf and 0
        experts.append(expert)
    base.view(-1)[7::97] = -3.0e38
    return base, experts


@pytest.mark.parametrize("tasks", [1, 2, 3, 4])
@pytest.mark.parametrize("method_name,params,weights", [
    ("task_arithmetic", {}, (1.0, 1.0, 1.0, 1.0)), ("task_arithmetic", {"lambda": 0.3}, (0.5, -1.0, 2.0, 0.7)),
    ("task_arithmetic", {"normalize": True, "lambda": 1.2}, (1.0, 2.0, 1.0, 0.1)),
    ("task_arithmetic", {"normalize": True}, (1.0, -1.0, 0.0, 0.0)),
    ("weight_average", {}, (0.5, 2.0, 1.5, 0.3)), ("weight_average", {"normalize": False}, (0.5, -1.0, 2.0, 1.1)),
])
def test_bfloat16_compute_loop_gives_torch_bfloat16_bits(tasks, method_name, params, weights, monkeypatch):
    """Compute in bf16 (chunks handed over as bf16, not to widen): the loop rounds each operation as torch's
    bf16 kernels do, so its bits are the torch path's, inf and NaN included; a merge of more tasks than the loop
    sums in torch's order runs torch."""
    method = build_method(method_name, params)
    base, experts = _bfloat16_inputs(tasks, tasks, (37, 1001))
    weights = weights[:tasks]
    job = TensorJob(name="w", numel=base.numel(), model_names=tuple("abcd"[:tasks]), weights=weights, per_model={})
    given = base if method.needs_base else None
    calls = []
    compiled = dare_fused.rounded_sum
    monkeypatch.setattr(dare_fused, "rounded_sum", lambda *a: calls.append(1) or compiled(*a))
    got = method.merge(given, experts, job, 0, {}).merged
    assert calls == [1] and got.dtype == torch.bfloat16
    monkeypatch.setattr(dare_fused, "_kernels", lambda widen=False: None)
    want = method.merge(given, experts, job, 0, {}).merged
    assert calls == [1] and want.dtype == torch.bfloat16
    # the same bits, but for a NaN's (torch's vectorized conversion keeps the payload; a merge refuses a NaN)
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(got.float()), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    assert not bool(torch.isfinite(want.float()).all()) or (method_name == "weight_average" and tasks == 1)
