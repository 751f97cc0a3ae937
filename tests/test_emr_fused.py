"""The compiled EMR election and mask packing (``ops/emr_fused.py``) give ``ops.emr``'s bits: the unified
vector (signed zeros included), the masks, the packed bytes and the rescaler sums, on inputs full of ties,
zeros and exact-zero means; and the method's artifacts and rescalers are the same with or without numba."""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import build_method
from distmerge.methods.base import TensorJob
from distmerge.methods.execute import add_partials
from distmerge.ops import emr as emr_ops
from distmerge.ops import emr_fused
from distmerge.ops.task_vectors import task_vectors

pytestmark = pytest.mark.skipif(emr_fused._kernels() is None, reason="numba is not installed")


def _inputs(seed: int, tasks: int, n: int):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randint(-8, 9, (n,), generator=g) * 0.125).float()
    base[torch.rand(n, generator=g) < 0.1] = -0.0
    experts = [(base + torch.randint(-2, 3, (n,), generator=g) * 0.0625).bfloat16().float() for _ in range(tasks)]
    return base, experts


def _bits(x):
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("tasks,n", [(3, 5003), (2, 2048), (1, 17), (4, 40000)])
def test_fused_election_is_the_torch_election(tasks, n):
    base, experts = _inputs(tasks, tasks, n)
    tv = task_vectors(base, experts)
    unified, masks = emr_ops.elect(tv)
    assert bool((tv.mean(0) == 0).any())  # exact-zero means (flag -1) occur
    got_unified, got_masks, abs_task, abs_masked = emr_fused.elect(base, experts, with_sums=True)
    assert torch.equal(_bits(got_unified), _bits(unified))
    assert torch.equal(got_masks, masks)
    assert torch.equal(emr_ops.magnitude_sums(abs_task, abs_masked, 12345),
                       emr_ops.rescaler_sums(tv, unified, masks, 12345))
    plain_unified, plain_masks = emr_fused.elect(base, experts)
    assert torch.equal(_bits(plain_unified), _bits(unified)) and torch.equal(plain_masks, masks)


def test_fused_packing_is_pack_mask():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 8 * 999, generator=g) < 0.3
    assert torch.equal(emr_fused.pack_mask(mask), emr_ops.pack_mask(mask))
    with pytest.raises(ValueError, match="multiple of 8"):
        emr_fused.pack_mask(mask[:, :13])


def test_the_method_gives_the_same_artifacts_and_rescalers_without_numba(monkeypatch):
    method = build_method("emr", {})
    base, experts = _inputs(9, 3, 13 * 97)
    base, experts = base.reshape(13, 97), [e.reshape(13, 97) for e in experts]
    job = TensorJob(name="w", numel=base.numel(), model_names=("a", "b", "c"), weights=(1.0, 1.0, 1.0))

    def run():
        assert method.next_pass({}) is None  # the rescaler sums come with the merge: one read of the inputs
        totals = None
        stream = method.artifact_stream(type("T", (), {"name": "w", "job": job, "shape": (13, 97)})(), torch.float32)
        pieces = []
        for rows in ((0, 6), (6, 13)):  # 6 * 97 mask bits: the packer carries the odd bits over
            result = method.merge(base[slice(*rows)], [e[slice(*rows)] for e in experts], job, rows[0] * 97, {})
            pieces += stream.add(result.artifacts)
            totals = add_partials(totals, result.partial)
        return method.finish_merge(totals, {}), pieces + stream.finish()

    calls = []
    compiled = emr_fused.elect
    monkeypatch.setattr(emr_fused, "elect", lambda *a, **k: calls.append(1) or compiled(*a, **k))
    fused_state, fused = run()
    assert len(calls) == 2  # one call a chunk: the election, with its sums
    monkeypatch.setattr(emr_fused, "_kernels", lambda: None)
    plain_state, plain = run()
    assert len(calls) == 2
    assert fused_state["rescalers"] == plain_state["rescalers"]
    # the rescalers a pass over the same chunks gave before the merge took the sums over: the same bits
    passed = None
    for rows in ((0, 6), (6, 13)):
        chunk_base, chunk_experts = base[slice(*rows)], [e[slice(*rows)] for e in experts]
        tv = torch.stack([e - chunk_base for e in chunk_experts])
        unified, masks = emr_ops.elect(tv)
        passed = add_partials(passed, {"sums": emr_ops.rescaler_sums(tv, unified, masks, job.numel)})
    assert fused_state["rescalers"] == emr_ops.rescalers(passed["sums"])
    assert [k for k, _ in fused] == [k for k, _ in plain]
    for (_, a), (_, b) in zip(fused, plain):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype == torch.uint8 else _bits(a),
                                                  b.view(torch.uint8) if b.dtype == torch.uint8 else _bits(b))
