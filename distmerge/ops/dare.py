"""DARE: drop each task-vector element with probability p, rescale the survivors (Yu et al. 2024; spec section 4).

The masks come from a counter-based stream: the flattened tensor is cut into fixed blocks of
``MASK_BLOCK`` elements and block j draws from numpy's PCG64 seeded by (seed, model, tensor name, j); element
i of a block is decided by the i-th 16-bit word of the block's raw stream (kept iff word >= round(p * 2**16),
so p is applied with a resolution of 2**-16). PCG64 can jump to any position, so any chunking of the work,
any number of actors and any placement see the same mask; numpy guarantees bit generators' raw streams stay
the same across versions, and the draw runs on the CPU, so a GPU run draws the same mask too. Drawing raw
words costs about a fifth of ``torch.rand`` here, which made DARE's masks the cost of the whole merge.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from distmerge.deferred import torch

MASK_BLOCK = 1 << 20
WORDS_PER_DRAW = 4  # 16-bit words in one 64-bit PCG64 output


def block_seed(seed: int, model: str, tensor: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{model}\0{tensor}\0{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def drop_threshold(drop_rate: float) -> int:
    """Words below this are dropped: round(p * 2**16), so p = 0 keeps all and p = 1 drops all."""
    return int(round(min(max(drop_rate, 0.0), 1.0) * 65536))


def _block_words(seed: int, model: str, tensor: str, block: int, lo: int, hi: int) -> np.ndarray:
    """The 16-bit words deciding elements [lo, hi) of a block (uint16)."""
    generator = np.random.PCG64(block_seed(seed, model, tensor, block))
    first, last = lo // WORDS_PER_DRAW, -(-hi // WORDS_PER_DRAW)
    generator.advance(first)
    words = generator.random_raw(last - first).astype("<u8", copy=False).view("<u2")
    return words[lo - first * WORDS_PER_DRAW: hi - first * WORDS_PER_DRAW]


def _keep_words(drop_rate: float, seed: int, model: str, tensor: str, numel: int, start: int, stop: int) -> list:
    """Per block: the kept elements of [start, stop) as a numpy bool array."""
    threshold = drop_threshold(drop_rate)
    parts = []
    for block in range(start // MASK_BLOCK, (stop - 1) // MASK_BLOCK + 1):
        block_start = block * MASK_BLOCK
        lo = max(start, block_start) - block_start
        hi = min(stop, block_start + MASK_BLOCK, numel) - block_start
        parts.append(_block_words(seed, model, tensor, block, lo, hi) >= threshold)
    return parts


def stream_words(seed: int, model: str, tensor: str, numel: int, start: int, stop: int) -> np.ndarray:
    """The 16-bit words deciding elements [start, stop) of a flattened tensor (uint16), the stream DARE uses.

    For masks with a keep probability per element (DELLA): the same words, compared per element, so such a
    mask is as placement-independent as DARE's and equals DARE's where the probability is constant.
    """
    if stop <= start:
        return np.zeros(0, dtype=np.uint16)
    parts = []
    for block in range(start // MASK_BLOCK, (stop - 1) // MASK_BLOCK + 1):
        block_start = block * MASK_BLOCK
        lo = max(start, block_start) - block_start
        hi = min(stop, block_start + MASK_BLOCK, numel) - block_start
        parts.append(_block_words(seed, model, tensor, block, lo, hi))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def stream_words_ahead(seed: int, model: str, tensor: str, numel: int, start: int, stop: int) -> np.ndarray:
    """``stream_words``, with the span right after it drawn on a helper thread meanwhile: a caller that walks a
    tensor chunk by chunk (a merge) finds the next chunk's words drawn beside its own work (PCG64's draws
    release the GIL; on the CPU they were most of what DARE adds to task arithmetic). The same words."""
    key = (seed, model, tensor, numel, start, stop)
    with _AHEAD_LOCK:
        drawn = _AHEAD.pop(key, None)
    words = drawn.result() if drawn is not None else stream_words(*key)
    if stop < numel:
        following = (seed, model, tensor, numel, stop, min(numel, 2 * stop - start))
        with _AHEAD_LOCK:
            if following not in _AHEAD:
                _AHEAD[following] = _drawer().submit(stream_words, *following)
                while len(_AHEAD) > AHEAD_SPANS:  # spans nobody asked for (a chunking that changed): the oldest go
                    _AHEAD.pop(next(iter(_AHEAD)))
    return words


AHEAD_SPANS = 16  # spans drawn ahead and not yet taken, at most (a chunk's words per model: 512 KiB)
_AHEAD: dict[tuple, Future] = {}
_AHEAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _drawer() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="distmerge-dare-words")


def keep_mask(drop_rate: float, seed: int, model: str, tensor: str, numel: int, start: int, stop: int) -> torch.Tensor:
    """Boolean keep-mask for elements [start, stop) of a tensor with ``numel`` elements (flattened)."""
    if stop <= start:
        return torch.zeros(0, dtype=torch.bool)
    parts = _keep_words(drop_rate, seed, model, tensor, numel, start, stop)
    return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))


def keep_scale(drop_rate: float, scale: float, seed: int, model: str, tensor: str, numel: int, start: int,
               stop: int) -> torch.Tensor:
    """The same mask as float32 multipliers: ``scale`` where kept, 0 where dropped (one multiply drops and rescales)."""
    if stop <= start:
        return torch.zeros(0, dtype=torch.float32)
    parts = _keep_words(drop_rate, seed, model, tensor, numel, start, stop)
    values = np.concatenate(parts) if len(parts) > 1 else parts[0]
    out = values.astype(np.float32)
    if scale != 1.0:
        out *= np.float32(scale)
    return torch.from_numpy(out)


def inverse_scale(drop_rate: float, rescale: str) -> float:
    """The survivors' factor for the rescales that do not depend on the values: 1/(1-p) or 1."""
    if rescale == "none" or drop_rate >= 1.0:
        return 1.0
    if rescale == "inverse":
        return 1.0 / (1.0 - drop_rate)
    raise ValueError(f"rescale {rescale!r} depends on the values; use drop_and_rescale")


def drop_and_rescale(task_vector: torch.Tensor, keep: torch.Tensor, drop_rate: float, rescale: str = "inverse") -> torch.Tensor:
    """delta = tau * keep / (1 - p)  ('inverse', MergeLM), or scaled to tau's L1 norm ('l1', mergekit), or unscaled.

    p = 1 drops everything and rescales nothing (MergeLM's ``mask_input_with_mask_rate``).
    """
    dropped = task_vector * keep.reshape(task_vector.shape).to(task_vector.device, task_vector.dtype)
    if rescale == "none" or drop_rate >= 1.0:
        return dropped
    if rescale == "inverse":  # a multiply by the same float as keep_scale, so both paths agree bit for bit
        return dropped * inverse_scale(drop_rate, rescale)
    if rescale == "l1":
        from distmerge.ops.ties import l1_rescale

        return l1_rescale(dropped, task_vector)
    raise ValueError(f"unknown rescale {rescale!r}")
