"""The floating dtypes a config may name, and the torch dtype each name stands for.

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

import torch

# The order is the order messages list them in.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
NAMES: tuple[str, ...] = tuple(DTYPES)
FULL_PRECISION: tuple[str, ...] = ("float32", "float64")
STORAGE: tuple[str, ...] = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name already checked against one of the tuples above."""
    return DTYPES[name]
