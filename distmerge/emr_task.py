"""Materialize one task's model from an EMR merge folder: theta_t = theta_0 + lambda_t * (M_t * tau_uni).

Streams shard by shard (one output shard in memory at a time) and writes the same layout as the merge,
through the same atomic staging folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distmerge.errors import InputError, where
from distmerge.io import writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.ops.emr import task_tensor

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
          "chat_template.jinja")


def materialize_task(merged: str | Path, task: str, out: str | Path, force: bool = False) -> Path:
    merged, out = Path(merged).resolve(), Path(out).expanduser().resolve()
    index_path = merged / "emr" / "index.json"
    if not index_path.exists():
        raise InputError(f"{where(file=str(index_path))}: not an EMR merge folder (no emr/index.json)")
    index = json.loads(index_path.read_text())
    tasks = index["metadata"]["tasks"]
    if task not in tasks:
        raise InputError(f"task '{task}' is not in this EMR merge (tasks: {', '.join(tasks)})")
    t = tasks.index(task)
    rescaler = float(index["metadata"]["rescalers"][t])
    writer.check_target(out, force)
    backbone = Checkpoint(str(merged), "merged")
    sidecar = Checkpoint(str(merged / "emr"), "emr")
    staging = writer.make_staging(out)
    try:
        by_file: dict[str, list[str]] = {}
        for name, info in backbone.tensors.items():
            by_file.setdefault(Path(info.file).name, []).append(name)
        for filename in sorted(by_file):
            tensors = {}
            for name in by_file[filename]:
                tensors[name] = _task_value(backbone, sidecar, name, t, rescaler)
            writer.write_safetensors(tensors, staging / filename)
        shutil.copyfile(merged / "model.safetensors.index.json", staging / "model.safetensors.index.json")
        for name in COPIED:
            if (merged / name).exists():
                shutil.copyfile(merged / name, staging / name)
        (staging / "README.md").write_text(
            f"# EMR task model: {task}\n\nMaterialized from `{merged}` with rescaler {rescaler:.6g}:\n"
            f"theta = theta_0 + lambda * (mask * unified task vector).\n")
        writer.finalize(staging, out, force)
    except BaseException:
        writer.discard(staging)
        raise
    return out


def _task_value(backbone: Checkpoint, sidecar: Checkpoint, name: str, t: int, rescaler: float) -> torch.Tensor:
    base = backbone.read(name)
    if name not in sidecar.tensors:
        return base
    return task_tensor(base, sidecar.read(name), sidecar.read(f"{name}::mask")[t : t + 1], rescaler)
