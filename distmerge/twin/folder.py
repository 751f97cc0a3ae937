"""The twin folder: a plain Hugging Face folder of the shared expert theta* (so anything that loads a model folder
loads theta*), plus ``twin.json`` (what makes it a twin folder), ``exclusive/`` (every task's compressed exclusive
part as safetensors factors with an index) and ``router/`` (the router's weights and JSON config).

```
twin/
  config.json  model.safetensors.index.json  model-*.safetensors  tokenizer*   theta* (the engine's merge)
  twin.json                          tasks, how theta* was merged, the compression settings (a sweep's rank
                                     view of a build adds exclusive.load_rank: the rank load() uses)
  exclusive/index.json               key -> file; keys TASK::TENSOR::us, TASK::TENSOR::v, TASK::TENSOR::delta
  exclusive/group-00000.safetensors  one file per layer group, written by the Ray task that compressed it
  router/model.safetensors  router/config.json
  twin_report.json                   relative error of every compressed tensor, router accuracy
```

A 2-D exclusive part is E = US @ V^T in the tensor's stored orientation (US: [rows, r], V: [cols, r]); a 1-D one
is kept whole (``delta``). With ``exclusive.lora: factors`` a LoRA-adapted weight's part is kept in LoRA space:
TASK::TENSOR::a_us, a_v (A_t - A* = a_us a_v^T, [r, in]) and b_us, b_v (B_t - B* = b_us b_v^T, [out, r]), beside
the shared factors __shared__::TENSOR::lora_a, lora_b and scale, so E = scale ((B* + dB)(A* + dA) - B* A*).
Nothing here is pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distmerge.errors import InputError

TWIN_JSON = "twin.json"
FORMAT = "distmerge-twin"
EXCLUSIVE = "exclusive"
EXCLUSIVE_INDEX = f"{EXCLUSIVE}/index.json"
ROUTER = "router"
REPORT = "twin_report.json"
SEPARATOR = "::"
SHARED = "__shared__"  # the key prefix of the shared LoRA factors (not a task name: those start alphanumeric)
FACTOR_KINDS = ("a_us", "a_v", "b_us", "b_v")
LOW_RANK_KINDS = ("us", "v", *FACTOR_KINDS)  # stored [n, rank]: a rank view keeps their first columns
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
            "chat_template.jinja")


def part_key(task: str, tensor: str, kind: str) -> str:
    return f"{task}{SEPARATOR}{tensor}{SEPARATOR}{kind}"


def is_twin_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / TWIN_JSON).is_file()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """``twin.json`` of a twin folder; a folder without one is refused naming the path."""
    folder = Path(folder).expanduser()
    path = folder / TWIN_JSON
    if not folder.is_dir():
        raise InputError(f"twin folder '{folder}' does not exist")
    if not path.is_file():
        raise InputError(f"'{folder}' is not a twin folder (no {TWIN_JSON}; `distmerge twin build` writes one)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"'{path}': invalid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("tasks"):
        raise InputError(f"'{path}': not a {FORMAT} manifest")
    return manifest


def check_rank(rank: Any, where: str) -> int | None:
    """A rank to read parts at (None: every stored direction); anything but a positive integer is refused."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise InputError(f"{where}: must be a positive integer, got {rank!r}")
    return rank


def check_task(manifest: dict[str, Any], task: str, folder: str | Path) -> None:
    if task not in manifest["tasks"]:
        raise InputError(f"--task: '{task}' is not a task of twin folder '{folder}' "
                         f"(tasks: {', '.join(manifest['tasks'])})")


@dataclass(frozen=True)
class LoraShared:
    """A* [r, in], B* [out, r] and the scale of one LoRA-adapted weight (``exclusive.lora: factors``)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Part:
    """One task's exclusive part of one tensor: factors (us, v), a whole delta, or LoRA-space factors."""

    us: torch.Tensor | None = None
    v: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    a_us: torch.Tensor | None = None  # A_t - A* ~ a_us a_v^T
    a_v: torch.Tensor | None = None
    b_us: torch.Tensor | None = None  # B_t - B* ~ b_us b_v^T
    b_v: torch.Tensor | None = None
    shared: LoraShared | None = None

    @property
    def in_lora_space(self) -> bool:
        return self.a_us is not None

    def dense(self) -> torch.Tensor:
        if self.delta is not None:
            return self.delta.float()
        if self.in_lora_space:
            a_star, b_star = self.shared.lora_a.float(), self.shared.lora_b.float()
            a = a_star + self.a_us.float() @ self.a_v.float().T
            b = b_star + self.b_us.float() @ self.b_v.float().T
            return self.shared.scale * (b @ a - b_star @ a_star)
        return self.us.float() @ self.v.float().T

    @property
    def rank(self) -> int:
        if self.in_lora_space:
            return max(self.a_us.shape[1], self.b_us.shape[1])
        return 0 if self.us is None else self.us.shape[1]


class ExclusiveStore:
    """The exclusive parts of a twin folder, read by key (a factor file is opened once, read lazily)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        index = self.folder / EXCLUSIVE_INDEX
        try:
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"'{index}': unreadable exclusive-part index ({exc})") from None
        self._handles: dict[str, Any] = {}
        self.parts: dict[str, dict[str, dict[str, str]]] = {}  # task -> tensor -> kind -> key
        for key in self.weight_map:
            task, tensor, kind = key.split(SEPARATOR)
            self.parts.setdefault(task, {}).setdefault(tensor, {})[kind] = key

    def tensors(self, task: str) -> list[str]:
        return sorted(self.parts.get(task, {}))

    def read_key(self, key: str) -> torch.Tensor:
        file = self.folder / EXCLUSIVE / self.weight_map[key]
        handle = self._handles.get(str(file))
        try:
            if handle is None:
                from safetensors import safe_open

                handle = safe_open(str(file), framework="pt", device="cpu")
                self._handles[str(file)] = handle
            return handle.get_tensor(key)
        except Exception as exc:
            raise InputError(f"file '{file}', tensor '{key}': read failed ({exc})") from None

    def part(self, task: str, tensor: str) -> Part | None:
        keys = self.parts.get(task, {}).get(tensor)
        if keys is None:
            return None
        if "delta" in keys:
            return Part(delta=self.read_key(keys["delta"]))
        if "a_us" in keys:
            shared = self.parts[SHARED][tensor]
            lora = LoraShared(self.read_key(shared["lora_a"]), self.read_key(shared["lora_b"]),
                              float(self.read_key(shared["scale"]).item()))
            return Part(shared=lora, **{kind: self.read_key(keys[kind]) for kind in FACTOR_KINDS})
        return Part(us=self.read_key(keys["us"]), v=self.read_key(keys["v"]))

    def close(self) -> None:
        self._handles = {}
