"""``distmerge twin task``: theta* + E_task as a plain Hugging Face folder (oracle routing, a one-hot w).

Shard by shard, in the shared expert's own shard layout: each tensor is read, its exclusive part recomposed
(US @ V^T, or the whole 1-D delta) in float32 and added, and the sum streamed into the new shard in theta*'s
dtype. The folder is written into a staging folder and renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from distmerge.io import writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.twin.folder import HF_FILES, ExclusiveStore, check_task, read_manifest


def task_tensor(shared: torch.Tensor, part) -> torch.Tensor:
    if part is None:
        return shared
    return (shared.float() + part.dense()).to(shared.dtype)


def write_task_model(folder: str | Path, task: str | None, out: str | Path, force: bool = False) -> Path:
    """theta* + E_task as a plain folder; ``task=None``: theta* alone (the shared expert, for comparison)."""
    folder = Path(folder).expanduser().resolve()
    manifest = read_manifest(folder)
    if task is not None:
        check_task(manifest, task, folder)
    out = Path(out).expanduser().resolve()
    writer.check_target(out, force)
    shared = Checkpoint(str(folder), "shared")
    store = ExclusiveStore(folder)
    files: dict[str, list[str]] = {}
    for name, info in shared.tensors.items():
        files.setdefault(info.file, []).append(name)
    staging = writer.make_staging(out)
    try:
        for file, names in sorted(files.items()):
            names = sorted(names)
            entries = [(n, shared.tensors[n].dtype, tuple(shared.tensors[n].shape)) for n in names]
            shard = writer.ShardWriter(staging / Path(file).name, entries)
            try:
                for name in names:
                    part = store.part(task, name) if task is not None else None
                    shard.write(name, task_tensor(shared.read(name), part))
            except BaseException:
                shard.abort()
                raise
            shard.close()
        index = folder / "model.safetensors.index.json"
        for name in HF_FILES + (index.name,):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)
        writer.finalize(staging, out, force)
    except BaseException:
        writer.discard(staging)
        raise
    finally:
        store.close()
        shared.close()
    return out
