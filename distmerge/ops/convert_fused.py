"""bfloat16 <-> float32 with the finite check in the same pass (numba), bit for bit torch's conversion.

Every input chunk is widened to the compute dtype and checked for NaN/Inf, every merged chunk narrowed to
the output dtype and checked again: as torch operations that is a conversion and then a float32 sum over the
result, two passes per chunk, on every element a merge reads or writes. Here one loop converts and looks at
each value's exponent bits. Narrowing rounds to nearest even, as torch does for every finite value; what a
NaN or Inf becomes is left open, since the verdict stops the merge.
"""

from __future__ import annotations

import numpy as np

from distmerge.deferred import torch
from distmerge.ops.compiled import kernels


def _kernels():
    return kernels(_build)


def _build(jit):
    # The checks are max-reductions over the magnitude bits (they vectorize; an or-reduction of comparisons
    # did not, and cost twice the conversion).
    @jit
    def widen(source, out):
        """bf16 bits -> float32 bits; whether every value is finite (magnitude bits below Inf's 0x7F80)."""
        largest = np.uint16(0)
        for j in range(source.shape[0]):
            bits = source[j]
            out[j] = np.uint32(bits) << np.uint32(16)
            largest = max(largest, bits & np.uint16(0x7FFF))
        return largest < np.uint16(0x7F80)

    @jit
    def narrow(source, out):
        """float32 bits -> bf16 bits rounded to nearest even; whether every result is finite: magnitude bits
        below 0x7F7F8000, from where a float32 rounds to Inf."""
        largest = np.uint32(0)
        for j in range(source.shape[0]):
            bits = source[j]
            out[j] = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            largest = max(largest, bits & np.uint32(0x7FFFFFFF))
        return largest < np.uint32(0x7F7F8000)

    @jit
    def check(source):
        """Whether every bf16 value is finite, the chunk left as it is (for loops that widen it themselves)."""
        largest = np.uint16(0)
        for j in range(source.shape[0]):
            largest = max(largest, source[j] & np.uint16(0x7FFF))
        return largest < np.uint16(0x7F80)

    return widen, narrow, check


def _unsigned_bits(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a 2- or 4-byte tensor's bits as unsigned integers."""
    signed, unsigned = {2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32)}[tensor.element_size()]
    return tensor.reshape(-1).view(signed).numpy().view(unsigned)


def _loops_for(value: torch.Tensor, dtype: torch.dtype):
    """The compiled loops where ``value`` is a contiguous CPU tensor of ``dtype`` and numba loads, else None."""
    return _kernels() if (value.dtype == dtype and value.device.type == "cpu" and value.is_contiguous()) else None


def _convert(value: torch.Tensor, source: torch.dtype, target: torch.dtype, loop: int):
    loops = _loops_for(value, source)
    if loops is None:
        return None
    out = torch.empty(value.shape, dtype=target)
    return out, bool(loops[loop](_unsigned_bits(value), _unsigned_bits(out)))


def to_float32(value: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """(``value.float()``, whether every value is finite) of a contiguous bf16 CPU tensor, in one pass;
    None for anything else, or without numba."""
    return _convert(value, torch.bfloat16, torch.float32, 0)


def bfloat16_finite(value: torch.Tensor) -> bool | None:
    """Whether a contiguous bf16 CPU tensor is free of NaN/Inf, in one pass over its bits; None for anything
    else, or without numba."""
    loops = _loops_for(value, torch.bfloat16)
    return None if loops is None else bool(loops[2](_unsigned_bits(value)))


def to_bfloat16(value: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """(``value.bfloat16()``, whether every result is finite) of a contiguous float32 CPU tensor, in one
    pass; None for anything else, or without numba."""
    return _convert(value, torch.float32, torch.bfloat16, 1)
