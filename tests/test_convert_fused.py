"""bf16 <-> float32 with the finite check in one compiled pass: torch's bits, and the same verdict on NaN/Inf."""

import numpy as np
import pytest
import torch

from distmerge.methods.execute import converted, is_finite
from distmerge.ops import convert_fused

pytest.importorskip("numba")


def _float32_bits(n: int, seed: int) -> torch.Tensor:
    """Every kind of float32: random bits, subnormals, values that round to bf16's largest or past it, Inf, NaN."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    bits[:200] = rng.integers(1, 0x007FFFFF, size=200).astype(np.uint32)  # subnormals
    edge = np.array([0x7F7F7FFF, 0x7F7F8000, 0x7F7E8000, 0x7F7EFFFF, 0x7F800000, 0x7FC00000, 0x00000000],
                    dtype=np.uint32)
    bits[200:207] = edge
    bits[207:214] = edge | np.uint32(0x80000000)
    return torch.from_numpy(bits.view(np.float32).copy())


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


def test_narrowing_is_torchs_rounding_for_every_finite_value():
    values = _float32_bits(1 << 16, 0)
    finite = torch.isfinite(values.bfloat16())
    out, all_finite = convert_fused.to_bfloat16(values)
    assert not all_finite
    assert torch.equal(_bits(out)[finite], _bits(values.bfloat16())[finite])
    # what NaN/Inf become is left open: the verdict stops the merge


def test_widening_is_exact():
    raw = torch.from_numpy(np.random.default_rng(1).integers(-2**15, 2**15, size=1 << 16, dtype=np.int16))
    values = raw.view(torch.bfloat16)
    out, all_finite = convert_fused.to_float32(values)
    assert not all_finite  # random bits hold Inf/NaN exponents
    finite = torch.isfinite(values)
    assert torch.equal(_bits(out)[finite], _bits(values.float())[finite])


def test_the_bf16_check_on_every_bit_pattern():
    """The check that leaves a bf16 chunk as it is (loops that widen it themselves): isfinite of every one of
    the 65,536 patterns, alone in a chunk of finite values."""
    patterns = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = torch.isfinite(patterns)
    assert not finite.all() and finite.any()
    chunk = torch.full((7,), 0.5, dtype=torch.bfloat16)
    for pattern, want in zip(patterns[::97].tolist() + [float("inf"), float("nan")],
                             finite[::97].tolist() + [False, False]):
        chunk[3] = pattern
        assert convert_fused.bfloat16_finite(chunk) is want
    assert convert_fused.bfloat16_finite(patterns) is False
    assert convert_fused.bfloat16_finite(patterns[finite]) is True
    assert convert_fused.bfloat16_finite(patterns.float()) is None  # bf16 only


@pytest.mark.parametrize("bits, finite", [(0x7F7F7FFF, True), (0xFF7F7FFF, True), (0x7F7F8000, False),
                                          (0xFF7F8000, False), (0x7F7E8000, True), (0x00000001, True)])
def test_the_verdict_at_bf16s_largest_value(bits, finite):
    """Below 0x7F7F8000 a float32 rounds to bf16's largest finite value; from there it rounds to Inf."""
    chunk = torch.full((9,), 0.25)
    chunk.view(torch.int32)[4] = torch.tensor(bits, dtype=torch.int64).to(torch.int32)
    narrowed, verdict = convert_fused.to_bfloat16(chunk)
    assert verdict is finite is bool(torch.isfinite(chunk.bfloat16()).all())
    if finite:
        assert torch.equal(_bits(narrowed), _bits(chunk.bfloat16()))


@pytest.mark.parametrize("value, finite", [(1.0, True), (-3.0e38, True), (3.3961e38, True), (3.4e38, False),
                                           (float("inf"), False), (float("-inf"), False), (float("nan"), False)])
def test_the_verdict_is_is_finite_of_the_result(value, finite):
    chunk = torch.full((5, 7), 0.5)
    chunk[3, 2] = value
    narrowed, verdict = convert_fused.to_bfloat16(chunk)
    assert verdict is finite and is_finite(chunk.bfloat16()) is finite
    assert narrowed.shape == chunk.shape
    widened, verdict = convert_fused.to_float32(chunk.bfloat16())
    assert verdict is is_finite(chunk.bfloat16())


def test_shapes_and_what_the_loops_leave_to_torch():
    assert convert_fused.to_float32(torch.tensor(1.5, dtype=torch.bfloat16))[0].shape == ()
    assert convert_fused.to_float32(torch.empty(0, 3, dtype=torch.bfloat16))[1] is True
    strided = torch.ones(4, 6, dtype=torch.bfloat16)[:, ::2]
    assert convert_fused.to_float32(strided) is None  # not contiguous
    assert convert_fused.to_float32(torch.ones(3, dtype=torch.float16)) is None
    # converted() falls back to torch for those, with the same verdicts
    value, finite = converted(strided, "cpu", torch.float32)
    assert value.dtype == torch.float32 and finite
    value, finite = converted(torch.full((3,), 1e5), "cpu", torch.float16)
    assert value.dtype == torch.float16 and not finite  # past float16's range
    value, finite = converted(torch.arange(4), "cpu", torch.float32)
    assert value.dtype == torch.int64 and finite  # integers are not converted


def test_switched_off_the_torch_path_gives_the_same(monkeypatch):
    values = torch.randn(1000).bfloat16()
    fused = converted(values, "cpu", torch.float32)
    monkeypatch.setenv("DISTMERGE_COMPILED", "0")
    assert convert_fused.to_float32(values) is None
    plain = converted(values, "cpu", torch.float32)
    assert torch.equal(fused[0], plain[0]) and fused[1] is plain[1] is True
