"""DeepSpeed ZeRO-3, AdaMerging's other sharding strategy (``strategy: deepspeed``).

theta0 and the task vectors are built under ``deepspeed.zero.Init``, which partitions them as each layer group
is created (the bank pads rows so that partitions fall on row boundaries: ``GroupBank``). zero.Init still holds a
group whole on every rank for a moment at setup and broadcasts rank 0's copy before cutting it (the values are
then overwritten by ``fill_bank``). ZeRO-3 places the rows and nothing more: a layer group is not gathered with
``GatheredParameters`` (theta0 and every task vector, T + 1 copies) but merged on each rank's partition and
gathered merged (``gather.py``), as under FSDP2. The coefficients are a few thousand numbers: they stay
replicated and are trained by torch's Adam on gradients summed over ranks, exactly as under FSDP2, so both
strategies write the same checkpoints (safetensors + JSON; DeepSpeed's own ``save_checkpoint`` pickles) and
resume from each other's state.

DeepSpeed builds C++ ops (CPU Adam, shared-memory collectives) the first time it meets them; none is used
here, and ``deepspeed.ops.__compatible_ops__ = {}`` keeps ``init_distributed`` from compiling one.
"""

from __future__ import annotations

from typing import Any

import torch

from distmerge.adamerging.bank import Bank, TensorPlan
from distmerge.errors import ConfigError

# Every tensor partitioned (no persistence threshold); the storage dtype comes from the bf16/fp16 switches.
ZERO3_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "bf16": {"enabled": False}, "fp16": {"enabled": False},
}


HALF_SWITCH = {torch.float32: None, torch.bfloat16: "bf16", torch.float16: "fp16"}  # storage -> config switch


def deepspeed():
    """The deepspeed module, ready for ZeRO-3 on the process group Ray Train made, with no op build."""
    try:
        import deepspeed.ops
    except ImportError:
        raise ConfigError("strategy: 'deepspeed' needs the deepspeed package (pip install deepspeed)") from None
    deepspeed.ops.__compatible_ops__ = {}
    import deepspeed as ds

    ds.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl", verbose=False)
    return ds


def partitioned_bank(plan: TensorPlan, storage: torch.dtype, world: int) -> Bank:
    """The bank built partitioned, in ``storage``. zero.Init takes its dtype from the config's bf16/fp16
    switches (an explicit ``dtype`` argument is overridden on accelerators without fp16 in DeepSpeed 0.19), so
    the switch is set here."""
    ds = deepspeed()
    if storage not in HALF_SWITCH:
        raise ConfigError(f"dtype: ZeRO-3 stores float32, bfloat16 or float16, not {str(storage).split('.')[-1]}")
    config = {**ZERO3_CONFIG, **{key: {"enabled": storage == dtype} for dtype, key in HALF_SWITCH.items() if key}}
    with ds.zero.Init(config_dict_or_path=config, mem_efficient_linear=False):  # keep torch's F.linear: its own
        # linear saves tensors that activation checkpointing cannot match on recomputation
        return Bank(plan, storage, rows_multiple=world)
