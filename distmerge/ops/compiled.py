"""Compiled loops (numba) for the methods whose torch formulation is many full-size passes per element.

numba is optional: ``kernels(build)`` gives None where it is missing, or where ``DISTMERGE_COMPILED=0`` is set
(to compare, or to rule the loops out), and the caller runs its torch formulation, which gives the same bits
(each fused module's tests compare the two).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distmerge.deferred import torch

LOG = logging.getLogger(__name__)
BLOCK = 2048  # elements per inner block: the per-block arrays of a few tasks stay in L1
# torch's sum (and mean) over a stacked dimension adds up to 4 rows in order, 0 + x_1 + ... + x_T; from 5 rows
# its vectorized reduction regroups the elements of a chunk's tail, from 18 most elements (measured on torch 2.13's
# CPU kernels; ``tests/test_compiled.py`` checks it). The loops that replicate such a sum bit for bit take at most
# this many tasks; a merge of more models runs the torch formulation.
ORDERED_SUM_TASKS = 4


def _lowest_bit_table() -> np.ndarray:
    table = np.zeros(64, dtype=np.int64)
    for bit in range(64):
        table[((1 << bit) * int(DE_BRUIJN)) % (1 << 64) >> 58] = bit
    return table


# A word's lowest set bit's index, for loops that visit set bits: LOWEST_BIT[((w & (0 - w)) * DE_BRUIJN) >> 58]
# (uint64). numba's count-trailing-zeros intrinsic, held by a kernel's closure, made its cache miss in every process.
DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)
LOWEST_BIT = _lowest_bit_table()


@functools.lru_cache(maxsize=1)
def jit() -> Callable | None:
    """numba's njit as these loops take it, or None without numba."""
    try:
        import numba
    except ImportError:
        LOG.debug("numba is not installed: the fused methods run as torch operations")
        return None
    # error_model numpy: a float division needs no zero check (which stops a loop vectorizing). No fastmath:
    # the bits must be torch's. cache: compiled once per machine, not in every worker.
    return numba.njit(cache=True, nogil=True, fastmath=False, boundscheck=False, error_model="numpy")


def buildable() -> bool:
    """Whether ``kernels`` can build loops here, without importing numba (or torch): for a driver that decides
    what its workers run and runs no loop itself."""
    return os.environ.get("DISTMERGE_COMPILED", "1") != "0" and importlib.util.find_spec("numba") is not None


_BUILT: dict[Callable, Any] = {}


def kernels(build: Callable[[Callable], Any]) -> Any:
    """``build(jit)``'s compiled loops (built once per process), or None without numba or when switched off."""
    if os.environ.get("DISTMERGE_COMPILED", "1") == "0":
        return None
    if build not in _BUILT:
        decorator = jit()
        if decorator is None:
            return None
        _BUILT[build] = build(decorator)
    return _BUILT[build]


def takes(*tensors: torch.Tensor, widening: bool = False) -> bool:
    """Whether compiled loops can take these chunks: on the CPU, contiguous, float32 (or, ``widening``, all
    float32 or all bfloat16: one array type for every input)."""
    accepted = (torch.float32, torch.bfloat16) if widening else (torch.float32,)
    same = not tensors or all(t.dtype == tensors[0].dtype for t in tensors)
    return same and all(t.dtype in accepted and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def widens(*tensors: torch.Tensor) -> bool:
    """Whether these chunks (as ``takes(..., widening=True)`` accepts them) need the loops that widen bfloat16."""
    return bool(tensors) and tensors[0].dtype == torch.bfloat16


def flat_views(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Flat read-only numpy views: one array type for every input (the tuple a loop indexes needs one type;
    inputs read from a memory map are read-only, converted ones are not). bfloat16 comes as its bits (uint16):
    numpy has no bfloat16."""

    def view(tensor: torch.Tensor) -> np.ndarray:
        flat = tensor.detach().reshape(-1)
        array = flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 else flat.numpy().view()
        array.flags.writeable = False
        return array

    return view(base), tuple(view(e) for e in experts)
