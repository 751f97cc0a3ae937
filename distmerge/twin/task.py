"""``distmerge twin task``: theta* + E_task as a plain Hugging Face folder (oracle routing, a one-hot w).

Shard by shard, in the shared expert's own shard layout: each tensor is read, its exclusive part recomposed
(US @ V^T, or the whole 1-D delta) in float32 and added, and the sum streamed into the new shard in theta*'s
dtype. The folder is written into a staging folder and renamed into place.

``copy_at_rank`` writes a twin folder whose exclusive parts keep their first ``rank`` directions (a Twin sweep's
best trial, read from a build at a larger rank).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from distmerge.io import writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.twin.config import reproducing_oversample
from distmerge.twin.folder import EXCLUSIVE, EXCLUSIVE_INDEX, HF_FILES, TWIN_JSON, ExclusiveStore, check_task, \
    read_manifest


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


def copy_at_rank(folder: str | Path, rank: int | None, out: str | Path, force: bool = False) -> Path:
    """A copy of a twin folder whose factored parts keep their first ``rank`` directions (``routed.truncate``:
    for an exact SVD, what a build at that rank stores); ``None`` or a rank at least the stored one: a plain
    copy. Factor files are read with safetensors, staged and renamed into place."""
    import json

    from safetensors.torch import load_file

    from distmerge.twin.folder import LOW_RANK_KINDS, SEPARATOR

    folder = Path(folder).expanduser().resolve()
    manifest = read_manifest(folder)
    out = Path(out).expanduser().resolve()
    writer.check_target(out, force)
    staging = writer.make_staging(out)
    try:
        for entry in folder.iterdir():
            if entry.name in (EXCLUSIVE, TWIN_JSON):
                continue
            (shutil.copytree if entry.is_dir() else shutil.copyfile)(entry, staging / entry.name)
        (staging / EXCLUSIVE).mkdir()
        for file in sorted((folder / EXCLUSIVE).iterdir()):
            if rank is None or not file.name.endswith(".safetensors"):
                shutil.copyfile(file, staging / EXCLUSIVE / file.name)
                continue
            tensors = load_file(str(file))
            for key, value in tensors.items():
                if key.rsplit(SEPARATOR, 1)[-1] in LOW_RANK_KINDS and value.shape[1] > rank:
                    tensors[key] = value[:, :rank].contiguous()
            writer.write_safetensors(tensors, staging / EXCLUSIVE / file.name)
        if rank is not None:  # the index's byte total follows the smaller files
            index = json.loads((folder / EXCLUSIVE_INDEX).read_text())
            index["metadata"]["total_size"] = sum(f.stat().st_size for f in (staging / EXCLUSIVE).glob("*.safetensors"))
            writer.write_json(staging / EXCLUSIVE_INDEX, index)
            exclusive = manifest["exclusive"]
            exclusive.pop("load_rank", None)
            if exclusive.get("rank") is None or exclusive["rank"] > rank:
                if exclusive.get("rank") is not None and exclusive.get("svd") != "exact":
                    # the settings at which a build at this rank stores these factors (the build's sketch)
                    exclusive["oversample"] = reproducing_oversample(exclusive["oversample"], exclusive["rank"], rank)
                exclusive.update(rank=rank, rank_fraction=None)
        writer.write_json(staging / TWIN_JSON, manifest)
        writer.finalize(staging, out, force)
    except BaseException:
        writer.discard(staging)
        raise
    return out
