"""``distmerge twin task``: theta* + E_task as a plain Hugging Face folder (oracle routing, a one-hot w).

Shard by shard, in the shared expert's own shard layout: each tensor is read, its exclusive part recomposed
(US @ V^T, or the whole 1-D delta) in float32 and added, and the sum streamed into the new shard in theta*'s
dtype. The folder is written into a staging folder and renamed into place.

``copy_at_rank`` writes a twin folder whose exclusive parts keep their first ``rank`` directions (a Twin sweep's
best trial, read from a build at a larger rank).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from distmerge.io import writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.twin.config import reproducing_oversample
from distmerge.twin.folder import EXCLUSIVE, EXCLUSIVE_INDEX, HF_FILES, LOW_RANK_KINDS, REPORT, SEPARATOR, TWIN_JSON, \
    ExclusiveStore, check_rank, check_task, read_manifest


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


def error_at_rank(error: float, us: torch.Tensor, rank: int) -> float:
    """The relative error of a factored part's first ``rank`` directions, from its error at every stored direction
    and the stored singular values (the column norms of US). Exact for a truncated SVD, exact or randomized: the
    residual E - D_R is orthogonal to the stored directions, so |E|^2 = |E - D_R|^2 + sum s^2 and dropping
    directions r+1..R adds their s^2 to the residual."""
    squares = us.float().square().sum(dim=0)
    total = float(squares.sum())
    if total == 0.0 or us.shape[1] <= rank:
        return error
    return math.sqrt(error**2 + (1.0 - error**2) * float(squares[rank:].sum()) / total)


def report_at_rank(folder: Path, rank: int) -> dict[str, Any] | None:
    """``twin_report.json`` of ``folder`` read at ``rank`` (None: the folder has none): ranks capped at ``rank``,
    factored parts' errors recomputed (``error_at_rank``). A LoRA-space part's error is of its recomposed product
    (scale ((B* + dB)(A* + dA) - B* A*) against the expert), which the stored factors alone do not give: those
    truncated are listed apart, as the build's."""
    path = folder / REPORT
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    store = ExclusiveStore(folder)
    errors, at_build = {}, {}
    try:
        for key, error in report.get("relative_error", {}).items():
            task, tensor = key.split(SEPARATOR, 1)
            part = store.part(task, tensor)
            if part is None or part.delta is not None or part.rank <= rank:
                errors[key] = error
            elif part.in_lora_space:
                at_build[key] = error
            else:
                errors[key] = error_at_rank(error, part.us, rank)
    finally:
        store.close()
    report.update(relative_error=errors, ranks={k: min(v, rank) for k, v in report.get("ranks", {}).items()},
                  read_at_rank=rank, build_rank=read_manifest(folder)["exclusive"].get("rank"))
    if at_build:
        report["relative_error_at_build_rank"] = at_build
        report["note"] = ("relative_error_at_build_rank: LoRA-space parts truncated to read_at_rank; their errors "
                          "are the build's, at build_rank (the product's error at the lower rank needs the experts)")
    return report


def copy_at_rank(folder: str | Path, rank: int | None, out: str | Path, force: bool = False) -> Path:
    """A copy of a twin folder whose factored parts keep their first ``rank`` directions (``routed.truncate``:
    what a build at that rank stores, with an exact SVD, or a randomized one at the oversampling twin.json then
    records), and ``twin_report.json`` at that rank (``report_at_rank``); ``None`` or a rank at least the stored
    one: a plain copy. Factor files are read with safetensors, staged and renamed into place."""
    from safetensors.torch import load_file

    check_rank(rank, "copy_at_rank: rank")
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
            report = report_at_rank(folder, rank)
            if report is not None:
                writer.write_json(staging / REPORT, report)
        writer.write_json(staging / TWIN_JSON, manifest)
        writer.finalize(staging, out, force)
    except BaseException:
        writer.discard(staging)
        raise
    return out
