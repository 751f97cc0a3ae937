"""The statistics folder ``distmerge measure`` writes and data-aware merges read.

```
stats/
  measure.yaml                  the resolved measurement config, for the record
  <task>/grams.safetensors      one float64 (or float32) [in, in] sum of x x^T per linear layer, keyed by module
  <task>/manifest.json          written last: the commit mark (kind, the expert's fingerprint, per-layer counts)
```

``<task>`` is the name the merge config gives the expert. A manifest present means its tensors are complete
(it is removed before and written after them, both atomically, as FDA's anchors), so a rerun skips exactly the
finished tasks whose config key matches.

Each layer's entry also records the float64 sum and absolute sum of the expert's weight as the checkpoint stores
it: a merge compares them with the weight it reads, so statistics measured on another model are refused even
when a folder was renamed. Rounding into a narrower merge dtype moves the sum by at most eps * abs_sum, so the
check never refuses the right model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from distmerge.deferred import torch
from distmerge.errors import InputError

FORMAT = 1
MANIFEST = "manifest.json"
GRAMS = "grams.safetensors"
KINDS = ("regmean",)  # "fisher": diagonal Fisher information, same layout, one vector per tensor


def task_files(root: Path, task: str) -> tuple[Path, Path]:
    folder = Path(root) / task
    return folder / GRAMS, folder / MANIFEST


def model_fingerprint(checkpoint) -> dict[str, str]:
    """What identifies an expert: its config.json and its tensors' names, shapes and dtypes (hashed)."""
    config = checkpoint.config
    config_text = json.dumps(config, sort_keys=True) if config is not None else ""
    # "torch." as when dtypes were torch's: statistics measured before still match their experts
    listing = json.dumps(sorted((name, list(info.shape), f"torch.{info.dtype}") for name, info in checkpoint.tensors.items()))
    return {"config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
            "tensors_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def weight_digest(weight: torch.Tensor) -> tuple[float, float]:
    """(sum, sum of |w|) in float64: a fingerprint of one weight that survives dtype conversion (bounded)."""
    wide = weight.detach().to(torch.float64)
    return float(wide.sum()), float(wide.abs().sum())


def same_weight(weight: torch.Tensor, recorded_sum: float, recorded_abs_sum: float) -> bool:
    """Whether ``weight`` (possibly rounded into a narrower dtype) is the weight the digest was taken of."""
    total, _ = weight_digest(weight)
    eps = torch.finfo(weight.dtype).eps if weight.is_floating_point() else 0.0
    # Rounding moves each element by at most eps/2 |w|, the float64 sum order by ~1e-15 relative.
    return abs(total - recorded_sum) <= (eps + 1e-12) * recorded_abs_sum + 1e-30


def load_manifest(root: str | Path, task: str, kind: str) -> dict[str, Any]:
    """The committed manifest of ``task`` under ``root``; refused with the path when missing or of another kind."""
    root = Path(root).expanduser().resolve()
    grams, manifest_path = task_files(root, task)
    if not root.is_dir():
        raise InputError(f"statistics folder '{root}' does not exist (write it with `distmerge measure {kind}`)")
    if not manifest_path.is_file():
        raise InputError(f"statistics '{manifest_path}': missing, no committed {kind} statistics for model '{task}' "
                         f"(measure it with `distmerge measure {kind}`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"statistics '{manifest_path}': unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("layers"), dict):
        raise InputError(f"statistics '{manifest_path}': not a distmerge statistics manifest (format {FORMAT})")
    if manifest.get("kind") != kind:
        raise InputError(f"statistics '{manifest_path}': kind '{manifest.get('kind')}', the merge needs '{kind}'")
    if not grams.is_file():
        raise InputError(f"statistics '{grams}': missing beside its manifest")
    manifest["grams_path"] = str(grams)
    manifest["manifest_path"] = str(manifest_path)
    return manifest


def read_gram(path: str, module: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """One layer's stored Gram sum, read alone from its safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return handle.get_tensor(module).to(device)
    except Exception as exc:
        raise InputError(f"statistics '{path}': cannot read the Gram of '{module}' ({exc})") from None


def layer_entry(weight: torch.Tensor, features: int, tokens: int, transposed: bool = False) -> dict[str, Any]:
    """A manifest's record of one measured layer; ``weight`` as the checkpoint stores it."""
    total, abs_total = weight_digest(weight)
    logical = list(weight.T.shape if transposed else weight.shape)  # [out, in] either way
    return {"features": int(features), "tokens": int(tokens), "transposed": bool(transposed), "shape": logical,
            "weight_sum": total, "weight_abs_sum": abs_total}


def committed(root: str | Path, task: str, key: str) -> bool:
    """Whether ``task``'s statistics are complete and were measured with the config ``key``."""
    grams, manifest_path = task_files(Path(root), task)
    try:
        return grams.is_file() and json.loads(manifest_path.read_text()).get("config_key") == key
    except (OSError, ValueError, AttributeError):
        return False


def commit_task(root: str | Path, task: str, grams: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    """Write one task's Grams, then its manifest (the commit mark): an interrupted write leaves no manifest."""
    from distmerge.errors import OutputError
    from distmerge.io import writer

    grams_path, manifest_path = task_files(Path(root), task)
    try:
        grams_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create '{grams_path.parent}': {exc.strerror or exc}") from None
    manifest_path.unlink(missing_ok=True)  # from here on the tensors are not committed
    writer.write_safetensors({name: value.cpu() for name, value in grams.items()}, grams_path)
    writer.write_json(manifest_path, {"format": FORMAT, **manifest})
    return manifest_path
