"""Deferred element patches (TIES' zero-sign rule): recorded chunk by chunk, applied in memory or to a file."""

import torch
from safetensors.torch import load_file, save_file

from distmerge.io.writer import patch_safetensors
from distmerge.methods.execute import Deferred, DeferredLog


def _log(numel: int) -> DeferredLog:
    log = DeferredLog()
    log.add("w", 0, Deferred(3, torch.tensor([1, 4]), torch.tensor([10.0, 40.0])), torch.bfloat16, numel)
    log.add("w", 6, Deferred(-1, torch.tensor([0, 2]), torch.tensor([60.0, 80.0])), torch.bfloat16, numel)
    log.add("w", 12, Deferred(0, torch.tensor([], dtype=torch.int64), torch.tensor([])), torch.bfloat16, numel)
    return log


def test_indices_are_int32_where_they_reach_and_offsets_are_added():
    log = _log(12)
    index, value = log.joined()["w"]
    assert index.dtype == torch.int32 and index.tolist() == [1, 4, 6, 8]
    assert value.dtype == torch.bfloat16 and value.tolist() == [10.0, 40.0, 60.0, 80.0]
    assert log.vote == 2
    assert _log(2**31).joined()["w"][0].dtype == torch.int32  # its last index is 2**31 - 1
    assert _log(2**31 + 1).joined()["w"][0].dtype == torch.int64  # a tensor int32 cannot index


def test_patches_apply_in_memory_and_to_a_file(tmp_path):
    log = _log(12)
    weights = torch.zeros(3, 4, dtype=torch.bfloat16)
    other = torch.ones(5, dtype=torch.bfloat16)
    path = tmp_path / "model.safetensors"
    save_file({"other": other, "w": weights}, str(path))
    want = torch.zeros(12, dtype=torch.bfloat16)
    want[[1, 4, 6, 8]] = torch.tensor([10.0, 40.0, 60.0, 80.0], dtype=torch.bfloat16)

    outputs = {"w": weights.clone()}
    assert log.apply(outputs) == 4
    assert torch.equal(outputs["w"].reshape(-1), want)

    assert patch_safetensors(path, log.joined()) == 4
    stored = load_file(str(path))
    assert torch.equal(stored["w"].reshape(-1), want)
    assert torch.equal(stored["other"], other)  # the neighbouring tensor untouched
