"""Lazy, tensor-by-tensor access to a checkpoint: a Hugging Face folder (one or many safetensors shards, or
PyTorch ``.bin``), a single safetensors/.bin file, or a hub id.

Opening a checkpoint reads and checks only the safetensors headers (names, dtypes, shapes, offsets against
the file size), so a corrupt or truncated file is reported before any work starts. Tensor data is read on
demand, whole or a range of rows at a time, in the process that needs it; a ``Checkpoint`` pickles without
its open file handles, so the driver can describe inputs and the actors read them.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge import dtypes
from distmerge.deferred import torch
from distmerge.errors import InputError, where

MAX_HEADER = 100 * 1024 * 1024
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
HUB_SAFETENSORS = ["*.safetensors"]
HUB_BIN = ["pytorch_model*.bin"]
BIN_NAMES = re.compile(r"^(pytorch_model|model)(-\d+-of-\d+)?\.bin$")


@dataclass(frozen=True)
class TensorInfo:
    file: str  # absolute path
    dtype: str  # as torch names it ("bfloat16"): see ``distmerge.dtypes``
    shape: tuple[int, ...]
    offset: int | None = None  # where its data starts in a safetensors file (bytes from the file's start)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


def resolve_source(source: str, model: str) -> Path:
    """A local path for a config entry: the path itself, or a hub snapshot (cached or downloaded)."""
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    if not HUB_ID.match(source):
        raise InputError(f"{where(model=model)}: '{source}' is neither an existing path nor a hub id (org/name)")
    try:
        from huggingface_hub import HfApi, snapshot_download

        try:  # download one weight format: safetensors where the repo has them, else .bin (older repos)
            files = HfApi().list_repo_files(source)
            weights = HUB_SAFETENSORS if any(f.endswith(".safetensors") for f in files) else HUB_BIN
        except Exception:
            weights = HUB_SAFETENSORS + HUB_BIN  # offline: whatever the local cache holds
        return Path(snapshot_download(source, allow_patterns=HUB_PATTERNS + weights))
    except Exception as exc:  # offline, gated, missing: one actionable message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{where(model=model)}: '{source}' is not a local path and could not be fetched from the Hugging Face "
            f"Hub ({first}). Download it where there is network (`hf download {source} --local-dir DIR`) and put "
            f"DIR in the config instead."
        ) from None


def read_safetensors_header(path: Path, model: str) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{where(model=model, file=str(path))}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise InputError(f"{where(model=model, file=str(path))}: corrupt safetensors header (not a mapping)")
    data_size = size - 8 - length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtypes.SAFETENSORS[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where(model=model, file=str(path), tensor=name)}: corrupt safetensors entry ({exc})") from None
        tensor = TensorInfo(str(path), dtype, shape, 8 + length + begin)
        if end > data_size or end - begin != tensor.nbytes:
            raise InputError(
                f"{where(model=model, file=str(path), tensor=name)}: truncated or corrupt safetensors file "
                f"(tensor data ends at byte {end} of {data_size})"
            )
        tensors[name] = tensor
    return tensors


class Checkpoint:
    """The tensors of one model, by name, read lazily."""

    def __init__(self, source: str, name: str):
        self.source = source
        self.name = name
        self.path = resolve_source(source, name)
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self._handles: dict[str, Any] = {}  # open safetensors files / loaded .bin state dicts, per process
        self.tensors: dict[str, TensorInfo] = self._index()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    # --- index ----------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise InputError(f"{where(model=self.name, file=str(index))}: unreadable index ({exc})") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f for f in files if not f.exists()]
            if missing:
                raise InputError(f"{where(model=self.name, file=str(missing[0]))}: listed in the index but missing")
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            return shards
        bins = sorted(p for p in self.path.glob("*.bin") if BIN_NAMES.match(p.name))
        if bins:
            return bins
        raise InputError(f"{where(model=self.name, file=str(self.path))}: no safetensors or .bin weights in this folder")

    def _index(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            if file.suffix == ".safetensors":
                found = read_safetensors_header(file, self.name)
            else:
                found = {k: TensorInfo(str(file), dtypes.name_of(v.dtype), tuple(v.shape)) for k, v in self._load_bin(file).items()}
            for key, info in found.items():
                if key in tensors:
                    raise InputError(f"{where(model=self.name, file=str(file), tensor=key)}: tensor stored twice")
                tensors[key] = info
        return tensors

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if str(file) not in self._handles:
            try:
                state = torch.load(file, mmap=True, weights_only=True, map_location="cpu")
            except Exception as exc:
                raise InputError(f"{where(model=self.name, file=str(file))}: cannot read PyTorch checkpoint ({exc})") from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            self._handles[str(file)] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._handles[str(file)]

    # --- metadata -------------------------------------------------------------------------------
    def json_file(self, filename: str) -> dict[str, Any] | None:
        path = self.folder / filename
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise InputError(f"{where(model=self.name, file=str(path))}: invalid JSON ({exc})") from None

    @property
    def config(self) -> dict[str, Any] | None:
        return self.json_file("config.json")

    def info(self, tensor: str) -> TensorInfo:
        try:
            return self.tensors[tensor]
        except KeyError:
            raise InputError(f"{where(model=self.name, tensor=tensor)}: missing in this model") from None

    # --- data -----------------------------------------------------------------------------------
    def read(self, tensor: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor (or rows [start, stop) of its first dimension), in its stored dtype, on the CPU."""
        info = self.info(tensor)
        try:
            if info.file.endswith(".safetensors") and info.offset is not None:
                return self._mapped(info, start, stop)
            if info.file.endswith(".safetensors"):
                handle = self._handles.get(info.file)
                if handle is None:
                    from safetensors import safe_open

                    handle = safe_open(info.file, framework="pt", device="cpu")
                    self._handles[info.file] = handle
                if start is None or not info.shape:
                    return handle.get_tensor(tensor)
                return handle.get_slice(tensor)[start:stop]
            value = self._load_bin(Path(info.file))[tensor]
            return value if start is None or not info.shape else value[start:stop]
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{where(model=self.name, file=info.file, tensor=tensor)}: read failed ({exc})") from None

    def _mapped(self, info: TensorInfo, start: int | None, stop: int | None) -> torch.Tensor:
        """The rows as a tensor over the file's pages: no copy out of the page cache before the caller's own
        conversion (safetensors' slice copies them first, a third of a merge's read time). The mapping is
        private (copy on write), so a caller that writes into what it read changes its own copy, never the file."""
        import numpy as np

        key = f"{info.file}#map"
        mapped = self._handles.get(key)
        if mapped is None:
            mapped = self._handles[key] = np.memmap(info.file, dtype=np.uint8, mode="c")
        shape = list(info.shape)
        first, count = 0, (shape[0] if shape else 1)
        if start is not None and shape:  # clamped to the rows there are, as a slice is
            first = min(max(start, 0), shape[0])
            count = min(max(stop, first), shape[0]) - first
            shape[0] = count
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else dtypes.itemsize(info.dtype)
        if count * row_bytes == 0:
            return torch.empty(shape, dtype=dtypes.torch_dtype(info.dtype))
        begin = info.offset + first * row_bytes
        data = mapped[begin:begin + count * row_bytes]
        return torch.from_numpy(data).view(dtypes.torch_dtype(info.dtype)).reshape(shape)

    def close(self) -> None:
        self._handles = {}


def check_same_tensors(checkpoint: Checkpoint, reference: Checkpoint, names, reference_label: str) -> None:
    """Every tensor of ``names`` (all ``reference``'s) is in ``checkpoint`` with the same shape; from the headers,
    so a mismatch is refused before any tensor is read or any Ray task starts."""
    for name in names:
        info = checkpoint.tensors.get(name)
        if info is None:
            raise InputError(f"{where(model=checkpoint.name, file=str(checkpoint.folder), tensor=name)}: missing (the "
                             f"{reference_label} has it)")
        expected = list(reference.tensors[name].shape)
        if list(info.shape) != expected:
            raise InputError(f"{where(model=checkpoint.name, file=info.file, tensor=name)}: shape {list(info.shape)} "
                             f"does not match the {reference_label}'s {expected}")
