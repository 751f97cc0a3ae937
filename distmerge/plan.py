"""Output tensors -> layer groups -> output shards -> workers.

The shard layout depends only on the model and ``out_shard_size``, never on the number of workers: a
worker writes whole shards, so 1 and N workers produce the same files. Shards go to workers by bytes
(largest first to the least loaded worker), each worker then processes its shards in model order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from distmerge.architectures import EMBEDDING_MODULE
from distmerge.tensors import OutputTensor

EMBED_GROUP = EMBEDDING_MODULE  # the groups planned first


@dataclass(frozen=True)
class LayerGroup:
    key: str
    layer: int | None
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ShardPlan:
    index: int
    filename: str
    groups: tuple[LayerGroup, ...]

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    @property
    def tensors(self) -> list[OutputTensor]:
        return [t for g in self.groups for t in g.tensors]


@dataclass(frozen=True)
class MergePlan:
    shards: tuple[ShardPlan, ...]
    assignment: tuple[tuple[int, ...], ...]  # worker -> shard indices, in model order

    @property
    def groups(self) -> list[LayerGroup]:
        return [g for s in self.shards for g in s.groups]


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def group_tensors(outputs: list[OutputTensor]) -> list[LayerGroup]:
    """Layer groups in model order: embeddings, then layers by index, then everything else (norm, head)."""
    by_key: dict[str, list[OutputTensor]] = {}
    layer_of: dict[str, int | None] = {}
    for tensor in outputs:
        by_key.setdefault(tensor.group, []).append(tensor)
        layer_of[tensor.group] = tensor.layer

    def order(key: str):
        layer = layer_of[key]
        if layer is not None:
            return (1, _natural(key.rsplit(".", 1)[0]), layer)
        return (0 if EMBED_GROUP.search(key) else 2, _natural(key), 0)

    return [
        LayerGroup(key, layer_of[key], tuple(sorted(by_key[key], key=lambda t: _natural(t.name))))
        for key in sorted(by_key, key=order)
    ]


def shard_groups(groups: list[LayerGroup], max_bytes: int) -> list[list[LayerGroup]]:
    shards: list[list[LayerGroup]] = []
    size = 0
    for group in groups:
        if shards and size + group.nbytes <= max_bytes:
            shards[-1].append(group)
            size += group.nbytes
        else:
            shards.append([group])
            size = group.nbytes
    return shards


def assign(sizes: list[int], workers: int) -> list[list[int]]:
    """Largest-first onto the least loaded worker; ties go to the lower worker index. Deterministic."""
    loads = [0] * workers
    owned: list[list[int]] = [[] for _ in range(workers)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        worker = min(range(workers), key=lambda w: (loads[w], w))
        loads[worker] += sizes[index]
        owned[worker].append(index)
    return [sorted(o) for o in owned]


def make_plan(outputs: list[OutputTensor], out_shard_size: int, workers: int, input_models: int) -> MergePlan:
    grouped = shard_groups(group_tensors(outputs), out_shard_size)
    count = len(grouped)
    shards = tuple(
        ShardPlan(i, f"model-{i + 1:05d}-of-{count:05d}.safetensors", tuple(groups)) for i, groups in enumerate(grouped)
    )
    # Work is reading every input plus writing the output: proportional to bytes * (inputs + 1).
    sizes = [s.nbytes * (input_models + 1) for s in shards]
    workers = max(1, min(workers, count))
    return MergePlan(shards, tuple(tuple(o) for o in assign(sizes, workers)))
