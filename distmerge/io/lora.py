"""A PEFT LoRA adapter on its base, read as a model: every tensor of the base, with each adapted tensor's
rows computed as base + (B @ A) * scale on demand, in the process that reads them.

So every method, the engine, sweeps and FDA take LoRA experts as they take full ones, one row chunk at a time,
and no process builds a merged expert. The delta follows PEFT's ``get_delta_weight``: ``lora_alpha / r``
(``/ sqrt(r)`` with rsLoRA; ``alpha_pattern`` per module, r from the factors' shapes), transposed for
``fan_in_fan_out`` layers (GPT-2's Conv1D) and for embeddings; ``modules_to_save`` tensors and trained biases
are full weights stored in the adapter. Adapter kinds whose delta is not B @ A (DoRA, IA3, prompt tuning ...)
are refused naming the field.

A source is ``BASE+ADAPTER`` (mergekit's syntax); ``distmerge.config`` writes every other form into it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge import dtypes
from distmerge.deferred import torch
from distmerge.errors import InputError, where
from distmerge.io.checkpoint import Checkpoint, TensorInfo, read_safetensors_header, resolve_source

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = {  # saved key suffix -> (factor, kind)
    ".lora_A.weight": ("A", "linear"), ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"), ".lora_embedding_B": ("B", "embedding"),
}
# Options whose adapters are not a plain B @ A delta: refused rather than merged wrong.
UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters",
                       "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config", "kasa_config",
                       "monteclora_config")


@dataclass(frozen=True)
class LoraSettings:
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    alpha_pattern: dict[str, float]

    def scale(self, module: str, rank: int) -> float:
        alpha = self.alpha
        for pattern, value in self.alpha_pattern.items():  # PEFT's get_pattern_key: a full match of a name suffix
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


@dataclass(frozen=True)
class LoraFactors:
    """Where one adapted tensor's factors are stored, and how they combine."""

    module: str  # the saved key without its factor suffix
    a_key: str
    b_key: str
    kind: str  # linear | embedding
    rank: int
    scale: float


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def split_source(source: str) -> tuple[str, str] | None:
    """(base, adapter) for a ``BASE+ADAPTER`` source; None for a plain model. A '+' inside a path that is
    itself an existing model is not a split."""
    if "+" not in source or Path(source).expanduser().exists():
        return None
    base, _, adapter = source.rpartition("+")
    return (base, adapter) if base and adapter else None


def read_settings(config_path: Path, model: str) -> LoraSettings:
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{where(model=model, file=str(config_path))}: unreadable adapter config ({exc})") from None
    kind = raw.get("peft_type")
    if kind != "LORA":
        raise InputError(f"{where(model=model, file=str(config_path))}: peft_type {kind!r} is not supported "
                         "(LoRA adapters only)")
    for option in UNSUPPORTED_OPTIONS:
        if raw.get(option):
            raise InputError(f"{where(model=model, file=str(config_path))}: {option}: {raw[option]!r} is not "
                             "supported (plain LoRA only: its delta is B @ A)")
    alpha = raw.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"{where(model=model, file=str(config_path))}: lora_alpha {alpha!r} is not a number")
    return LoraSettings(alpha=float(alpha), rslora=bool(raw.get("use_rslora")),
                        fan_in_fan_out=bool(raw.get("fan_in_fan_out")),
                        alpha_pattern=dict(raw.get("alpha_pattern") or {}))


class LoraCheckpoint(Checkpoint):
    """An adapter on its base, with the tensors a ``Checkpoint`` has; reads add the adapter's delta."""

    def __init__(self, source: str, name: str):
        split = split_source(source)
        if split is None:
            raise InputError(f"{where(model=name)}: '{source}' is not of the form BASE+ADAPTER")
        base_source, adapter_source = split
        self.source = source
        self.name = name
        self.base = Checkpoint(base_source, name)
        self.path = resolve_source(adapter_source, name)
        if not is_adapter_folder(self.path):
            raise InputError(f"{where(model=name, file=str(self.path))}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        self.settings = read_settings(self.path / ADAPTER_CONFIG, name)
        self.adapter_file = self._weights_file()
        self._handles = {}
        self._cache: dict[str, torch.Tensor] = {}
        stored = self._stored()
        self.folder = self.path if _has_tokenizer(self.path) else self.base.folder
        self.factors, full = self._plan(stored)
        self.tensors = dict(self.base.tensors)
        self.full: dict[str, str] = full  # base tensor name -> key of a full tensor in the adapter file
        for target, key in full.items():
            self.tensors[target] = stored[key]
        for target in self.factors:
            under = self.tensors[target]
            self.tensors[target] = TensorInfo(str(self.adapter_file), under.dtype, under.shape)
        if not self.factors and not self.full:
            raise InputError(f"{where(model=name, file=str(self.adapter_file))}: the adapter holds no LoRA factors")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_cache"] = {}, {}
        return state

    # --- index ----------------------------------------------------------------------------------
    def _weights_file(self) -> Path:
        for filename in ADAPTER_WEIGHTS:
            if (self.path / filename).is_file():
                return self.path / filename
        raise InputError(f"{where(model=self.name, file=str(self.path))}: no {' or '.join(ADAPTER_WEIGHTS)} in the "
                         "adapter folder")

    def _stored(self) -> dict[str, TensorInfo]:
        if self.adapter_file.suffix == ".safetensors":
            return read_safetensors_header(self.adapter_file, self.name)
        return {k: TensorInfo(str(self.adapter_file), dtypes.name_of(v.dtype), tuple(v.shape)) for k, v in self._bin().items()}

    def _bin(self) -> dict[str, torch.Tensor]:
        key = str(self.adapter_file)
        if key not in self._handles:
            try:
                state = torch.load(self.adapter_file, mmap=True, weights_only=True, map_location="cpu")
            except Exception as exc:
                raise InputError(f"{where(model=self.name, file=key)}: cannot read the adapter ({exc})") from None
            self._handles[key] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._handles[key]

    def _plan(self, stored: dict[str, TensorInfo]) -> tuple[dict[str, LoraFactors], dict[str, str]]:
        """The adapted base tensors with their factors, and the full tensors the adapter replaces."""
        pairs: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        full: dict[str, str] = {}
        for key in stored:
            suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                if ".lora_" in key:
                    raise InputError(f"{self._where(key)}: unknown LoRA tensor (not lora_A/lora_B)")
                # A full tensor (modules_to_save, a trained bias, the base weight PEFT saves beside an adapted
                # embedding as base_layer); one the base lacks (a new head) is kept under its own name and, like
                # any tensor only an expert has, left out of the merge with a warning.
                full[self._target(key.replace(".base_layer.", "."), required=False)] = key
                continue
            factor, kind = LORA_SUFFIXES[suffix]
            module = key[: -len(suffix)]
            pairs.setdefault(module, {})[factor] = key
            kinds[module] = kind
        factors = {}
        for module, keys in pairs.items():
            if set(keys) != {"A", "B"}:
                missing = "B" if "A" in keys else "A"
                raise InputError(f"{self._where(next(iter(keys.values())))}: lora_{missing} of this module is missing")
            target = self._target(module + ".weight")
            a, b = stored[keys["A"]].shape, stored[keys["B"]].shape
            expected = self._delta_shape(kinds[module], a, b)
            under = stored[full[target]].shape if target in full else self.base.tensors[target].shape
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or expected != tuple(under):
                raise InputError(f"{self._where(keys['A'])}: factors {list(a)} and {list(b)} do not make the "
                                 f"weight's {list(under)}")
            rank = a[0]
            factors[target] = LoraFactors(module, keys["A"], keys["B"], kinds[module], rank,
                                          self.settings.scale(_peft_name(module), rank))
        return factors, full

    def _delta_shape(self, kind: str, a: tuple, b: tuple) -> tuple:
        if len(a) != 2 or len(b) != 2:
            return ()
        if kind == "embedding" or self.settings.fan_in_fan_out:
            return (a[1], b[0])
        return (b[0], a[1])

    def _target(self, key: str, required: bool = True) -> str:
        """The base tensor a saved key stands for: PEFT's prefix removed, then an exact name, else the one base
        tensor it is a dotted suffix of (an adapter trained on the bare model, a base saved with its head)."""
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if name in self.base.tensors:
            return name
        candidates = [n for n in self.base.tensors if n.endswith("." + name)] or \
            [n for n in self.base.tensors if name.endswith("." + n)]
        if len(candidates) == 1:
            return candidates[0]
        if not required and not candidates:
            return name
        found = "no" if not candidates else f"{len(candidates)}"
        raise InputError(f"{self._where(key)}: {found} tensor of the base model '{self.base.source}' matches it")

    def _where(self, key: str) -> str:
        return where(model=self.name, file=str(self.adapter_file), tensor=key)

    # --- metadata -------------------------------------------------------------------------------
    def json_file(self, filename: str) -> dict[str, Any] | None:
        found = super().json_file(filename)
        return found if found is not None else self.base.json_file(filename)

    # --- data -----------------------------------------------------------------------------------
    def read(self, tensor: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the adapted model's tensor; adapted tensors come back in float32, so a small
        delta is not rounded away in the base's bfloat16."""
        factors = self.factors.get(tensor)
        if tensor in self.full:  # the weight the adapter was trained on, where it stores one
            value = self._adapter_tensor(self.full[tensor])
            value = value if start is None or not value.shape else value[start:stop]
        else:
            value = self.base.read(tensor, start, stop)
        if factors is None:
            return value
        return value.float() + self.delta_rows(factors, start, stop)

    def delta_rows(self, factors: LoraFactors, start: int | None, stop: int | None) -> torch.Tensor:
        """(B @ A) * scale, rows [start, stop), in float32, as a sum of r outer products in a fixed order: a
        matmul's blocking depends on the row count, and a row must not change with the chunk it is read in."""
        a = self._adapter_tensor(factors.a_key).float()
        b = self._adapter_tensor(factors.b_key).float()
        rows = slice(start, stop)
        if factors.kind == "embedding" or self.settings.fan_in_fan_out:  # delta = (B @ A)^T = A^T B^T
            left, right = a[:, rows].T, b.T
        else:
            left, right = b[rows], a
        delta = torch.zeros((left.shape[0], right.shape[1]), dtype=torch.float32)
        for k in range(factors.rank):
            delta.addcmul_(left[:, k : k + 1], right[k : k + 1])
        return delta.mul_(factors.scale)

    def factor_tensors(self, factors: LoraFactors) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as stored, without the scale."""
        return self._adapter_tensor(factors.a_key), self._adapter_tensor(factors.b_key)

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        if key not in self._cache:  # the factors are small (r x d); a process keeps those it has read
            if self.adapter_file.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    with safe_open(str(self.adapter_file), framework="pt", device="cpu") as handle:
                        self._cache[key] = handle.get_tensor(key)
                except Exception as exc:
                    raise InputError(f"{self._where(key)}: read failed ({exc})") from None
            else:
                self._cache[key] = self._bin()[key]
        return self._cache[key]

    def close(self) -> None:
        self._handles, self._cache = {}, {}
        self.base.close()


def _peft_name(module: str) -> str:
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def open_checkpoint(source: str, name: str) -> Checkpoint:
    """A model by config source: ``BASE+ADAPTER`` is a LoRA expert, anything else a plain checkpoint."""
    return LoraCheckpoint(source, name) if split_source(source) is not None else Checkpoint(source, name)
