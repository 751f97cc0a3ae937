"""``Checkpoint.read`` maps safetensors files instead of copying out of them: the same tensors and rows as the
safetensors library gives, every stored dtype, and a caller writing into what it read never changes the file."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distmerge.io.checkpoint import Checkpoint

TENSORS = {
    "bf16": torch.randn(7, 5).bfloat16(), "f16": torch.randn(3).half(), "f32": torch.randn(4, 3, 2),
    "f64": torch.randn(2, 2, dtype=torch.float64), "i64": torch.arange(12).reshape(3, 4),
    "i8": torch.arange(-3, 3, dtype=torch.int8), "u8": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
    "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5),
    "f8": torch.randn(5, 3).to(torch.float8_e4m3fn),
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("read")
    save_file(TENSORS, folder / "model.safetensors")
    return folder


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:  # no equality on float8: compare the bytes
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_whole_tensors_and_row_ranges_are_the_librarys(stored, name):
    checkpoint = Checkpoint(str(stored), "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about a read-only numpy array
        with safe_open(str(stored / "model.safetensors"), "pt") as library:
            assert _same(checkpoint.read(name), library.get_tensor(name))
            if TENSORS[name].dim():
                for start, stop in ((0, 1), (1, 3), (2, 100), (5, 2), (0, 0)):
                    assert _same(checkpoint.read(name, start, stop), library.get_slice(name)[start:stop]), (start, stop)


def test_writing_into_a_read_tensor_leaves_the_file_alone(stored):
    before = (stored / "model.safetensors").read_bytes()
    rows = Checkpoint(str(stored), "m").read("f32", 1, 3)
    rows.zero_()
    assert (stored / "model.safetensors").read_bytes() == before
    assert torch.equal(Checkpoint(str(stored), "m").read("f32"), TENSORS["f32"])
