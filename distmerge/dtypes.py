"""dtype names: the floating ones a config may name (and the torch dtype each stands for), and the stored ones by
safetensors code, with their sizes and kinds, so that plans carry names and a driver needs no torch.

Every reader takes its allowed names from here, so a name means one dtype everywhere. The subsets differ on
purpose, each for one reason:

- merges and FDA (``dtype``, ``out_dtype``): all of them;
- linear algebra and optimizers (SVD-based merges' ``svd_dtype``, AdaMerging's coefficients, RegMean's Gram
  sums): ``FULL_PRECISION``, since torch's CPU SVD refuses half types and a half type rounds away the small
  steps and long sums these compute;
- what a model or its factors are loaded or stored as (evaluation, measuring, LoRA and Twin factors):
  ``STORAGE``, since no checkpoint is stored in float64 and running one in it would only be slower.
"""

from __future__ import annotations

from distmerge.deferred import torch

# The order is the order messages list them in.
NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
FULL_PRECISION: tuple[str, ...] = ("float32", "float64")
STORAGE: tuple[str, ...] = ("float32", "float16", "bfloat16")

# Stored dtypes by their safetensors code, as torch names them. Plans and headers carry these names rather than
# torch dtypes, so a merge's driver (which reads headers and plans, but never a tensor) does not import torch.
SAFETENSORS: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}
CODES: dict[str, str] = {name: code for code, name in SAFETENSORS.items()}
ITEMSIZE: dict[str, int] = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
                            "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
FLOATING: frozenset[str] = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a name (one of the tuples above, or a stored dtype's); a torch dtype is itself."""
    return getattr(torch, name_of(dtype))


def name_of(dtype: str | torch.dtype) -> str:
    """A dtype's name as torch spells it (``bfloat16``), from the name itself or a torch dtype."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def itemsize(dtype: str | torch.dtype) -> int:
    name = name_of(dtype)
    return ITEMSIZE[name] if name in ITEMSIZE else torch_dtype(name).itemsize  # the rarer ones of .bin files


def is_floating(dtype: str | torch.dtype) -> bool:
    name = name_of(dtype)
    if name in ITEMSIZE:
        return name in FLOATING
    return torch_dtype(name).is_floating_point  # the rarer ones of .bin files (float8_e5m2fnuz, ...)


def kind(dtype: str | torch.dtype) -> str:
    """floating-point, complex, boolean or integer: tensors of two kinds are never the same tensor."""
    name = name_of(dtype)
    if is_floating(name):
        return "floating-point"
    return "complex" if name.startswith("complex") else "boolean" if name == "bool" else "integer"
