"""Resuming an interrupted merge from the shards it already finished.

A run's staging folder is named by a key over everything that determines its bytes (the resolved config,
the input files' sizes and modification times, the shard layout, distmerge's version), so a rerun of the
same command finds it and a changed input or config never reuses stale shards. The driver appends one
line per finished shard to a manifest, with the SHA-256 of the file as written; on resume a shard counts
only if its file still hashes to that value. A lock on the folder keeps two runs from writing the same
target at once.

Nothing read back is code. The reduction-pass state is typed data: its tensors in one safetensors file,
everything else in JSON that refers to them (``encode_state``), and both files' SHA-256 go into the manifest
once they are durable, so a torn or altered file is recomputed, never trusted. A staging folder is created
private (0700) and reused only while it still is: a folder another user owns, that others can write, or
that is a symbolic link could hold files planted by someone else, so the run refuses it
(``check_private_folder``) rather than deleting what may be another user's work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from distmerge import __version__
from distmerge.deferred import is_tensor, torch
from distmerge.errors import OutputError
from distmerge.io import writer
from distmerge.io.writer import STAGING_MARK

LOG = logging.getLogger(__name__)

MANIFEST = ".distmerge-manifest.jsonl"
PASSES_JSON = ".distmerge-passes.json"
PASSES_TENSORS = ".distmerge-passes.safetensors"
LEGACY_PASSES = ".distmerge-passes.pkl"  # pickle written by earlier versions: never read, removed on sight
LOCK = ".distmerge-lock"
HASH_BLOCK = 16 << 20
STATE_FORMAT = 1
PRIVATE_MODE = 0o700


def run_key(config_yaml: dict, checkpoints: list, plan) -> str:
    digest = hashlib.sha256()
    digest.update(__version__.encode())
    digest.update(yaml.safe_dump(config_yaml, sort_keys=True).encode())
    for checkpoint in checkpoints:
        for file in sorted({info.file for info in checkpoint.tensors.values()}):
            stat = os.stat(file)
            digest.update(f"{checkpoint.name}\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for shard in plan.shards:
        digest.update(shard.filename.encode())
        for tensor in shard.tensors:
            # "torch." as when this held a torch dtype: a run interrupted before an upgrade still resumes
            digest.update(f"\0{tensor.name}:{tuple(tensor.shape)}:torch.{tensor.out_dtype}".encode())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class RunFolder:
    """The staging folder of one run (keyed), its lock, and its manifest of finished shards."""

    def __init__(self, out: Path, key: str):
        self.out = out
        self.path = out.parent / f".{out.name}{STAGING_MARK}{key}"
        self._lock_fd: int | None = None
        self._passes: dict[str, Any] | None = None  # the manifest's verified pass-state record

    def discard(self) -> None:
        """Start over (no resume): only a folder that is ours to delete."""
        if os.path.lexists(self.path):
            check_private_folder(self.path, "staging folder")
            writer.discard(self.path)

    def open(self) -> dict[int, dict[str, Any]]:
        """Create or reopen the folder, take the lock, return the verified finished shards by index."""
        try:
            make_private_folder(self.path, "staging folder")
            self._lock_fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise OutputError(f"cannot create a folder in '{self.out.parent}': {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise OutputError(f"another distmerge run is writing '{self.out}' (lock in '{self.path}')") from None
        return self._verified()

    def _verified(self) -> dict[int, dict[str, Any]]:
        self._passes = None
        manifest = self.path / MANIFEST
        if not manifest.exists():
            return {}
        done = {}
        for line in manifest.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: the shard is redone
                continue
            if not isinstance(record, dict):
                continue
            if not _all_intact(self.path, record.get("files")):
                if "passes" in record:
                    LOG.warning("the saved pass state in %s does not match its checksum; the passes are "
                                "recomputed", self.path)
                continue
            if "passes" in record:
                self._passes = record
            elif isinstance(record.get("shard"), int):
                done[record["shard"]] = record
        # Rewrite the manifest with the survivors only, so it never lists a file that failed its check.
        survivors = list(done.values()) + ([self._passes] if self._passes else [])
        tmp = manifest.with_name(MANIFEST + ".partial")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in survivors))
        os.replace(tmp, manifest)
        return done

    def record(self, result: dict[str, Any]) -> None:
        """Append a finished shard; durable before the call returns."""
        with open(self.path / MANIFEST, "a") as f:
            f.write(json.dumps(result) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load_passes(self) -> dict | None:
        """The pass state the manifest vouches for (its files verified by ``open``), or None to recompute."""
        if self._passes is None:
            return None
        try:
            data = json.loads((self.path / PASSES_JSON).read_text())
            tensors = _load_tensors(self.path / PASSES_TENSORS) if data.get("tensors") else {}
            return decode_state(data, tensors)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            LOG.warning("the saved pass state in %s is unusable (%s); the passes are recomputed", self.path, exc)
            return None

    def save_passes(self, state: dict) -> None:
        """Write the state as data, then commit it with one manifest line holding the files' checksums."""
        data, tensors = encode_state(state)
        files = []
        if tensors:
            writer.write_safetensors(tensors, self.path / PASSES_TENSORS)
            files.append(PASSES_TENSORS)
        _write_durable(self.path / PASSES_JSON, json.dumps(data, allow_nan=False))
        files.append(PASSES_JSON)
        self._passes = {"passes": STATE_FORMAT, "files": [_file_record(self.path / name) for name in files]}
        self.record(self._passes)

    def forget(self) -> None:
        """Drop the finished shards and the pass state from the manifest: the merge runs again from its passes
        (and a resume of that must not take a shard of this one)."""
        _write_durable(self.path / MANIFEST, "")
        self._passes = None

    def clear_bookkeeping(self) -> None:
        """Before the rename: the finished model holds no run files, and has the mode a plain mkdir would
        have given it (the folder was private only while it was staging)."""
        os.chmod(self.path, 0o777 & ~current_umask())
        for name in (MANIFEST, PASSES_JSON, PASSES_TENSORS, LEGACY_PASSES, LOCK):
            (self.path / name).unlink(missing_ok=True)
        for folder in (self.path / ".patches", self.path / ".undecided"):
            if folder.exists():
                for file in folder.iterdir():
                    file.unlink()
                folder.rmdir()
        for leftover in self.path.rglob("*.partial"):  # from a worker that died while writing
            leftover.unlink()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _intact(path: Path, sha256: str, size: int) -> bool:
    try:
        return path.stat().st_size == size and file_sha256(path) == sha256
    except OSError:
        return False


def _all_intact(folder: Path, files: Any) -> bool:
    if not isinstance(files, list):
        return False
    try:
        return all(_intact(folder / f["name"], f["sha256"], f["bytes"]) for f in files)
    except (TypeError, KeyError):
        return False


def _file_record(path: Path) -> dict[str, Any]:
    return {"name": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def _write_durable(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- pass state as data -----------------------------------------------------------------------------
# JSON holds None, bools, ints, finite floats (repr round-trips exactly), strings, lists and string-keyed
# dicts as themselves; what JSON lacks is a one-key object: {"$tensor": name in the safetensors file},
# {"$float": "inf" | "-inf" | "nan"}, {"$tuple": [...]}. Anything else is a bug in a method and is refused.

TAGS = ("$tensor", "$float", "$tuple")


def encode_state(state: dict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-ready document, tensors by name) for ``state``; a TypeError names a value it cannot hold."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        kind = type(value)
        if value is None or kind in (bool, int, str):
            return value
        if kind is float:
            return value if math.isfinite(value) else {"$float": repr(value)}
        if is_tensor(value):
            if value.is_sparse or value.is_complex() or value.is_quantized:
                raise TypeError(f"pass state '{where}': a {value.layout}/{value.dtype} tensor cannot be saved "
                                "for resume")
            tensors[where] = value.detach().to("cpu").contiguous().clone()
            return {"$tensor": where}
        if kind in (list, tuple):
            items = [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return items if kind is list else {"$tuple": items}
        if kind is dict:
            for key in value:
                if type(key) is not str or key.startswith("$"):
                    raise TypeError(f"pass state '{where}': key {key!r} cannot be saved for resume (keys are "
                                    "strings not starting with '$')")
            return {key: encode(v, f"{where}.{key}" if where else key) for key, v in value.items()}
        raise TypeError(f"pass state '{where}': a {kind.__module__}.{kind.__qualname__} cannot be saved for "
                        "resume (tensors, numbers, strings, None, lists, tuples and dicts can)")

    if type(state) is not dict:
        raise TypeError(f"pass state: a {type(state).__name__}, not a dict")
    encoded = encode(state, "")
    return {"format": STATE_FORMAT, "tensors": bool(tensors), "state": encoded}, tensors


def decode_state(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict:
    """The state ``encode_state`` encoded; a ValueError for anything it would not have written."""
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise ValueError(f"not pass state of format {STATE_FORMAT}")
    used: set[str] = set()

    def decode(value: Any) -> Any:
        if value is None or type(value) in (bool, int, float, str):
            return value
        if type(value) is list:
            return [decode(v) for v in value]
        if type(value) is not dict:
            raise ValueError(f"unexpected {type(value).__name__}")
        tags = [key for key in value if key.startswith("$")]
        if not tags:
            return {key: decode(v) for key, v in value.items()}
        if len(value) != 1 or tags[0] not in TAGS:
            raise ValueError(f"unknown entry {sorted(value)}")
        tag, inner = tags[0], value[tags[0]]
        if tag == "$tensor":
            if inner not in tensors:
                raise ValueError(f"tensor '{inner}' is missing from {PASSES_TENSORS}")
            used.add(inner)
            return tensors[inner]
        if tag == "$float":
            if inner not in ("inf", "-inf", "nan"):
                raise ValueError(f"bad float {inner!r}")
            return float(inner)
        if type(inner) is not list:
            raise ValueError("a tuple that is not a list")
        return tuple(decode(v) for v in inner)

    state = decode(document.get("state"))
    if type(state) is not dict:
        raise ValueError("the state is not a dict")
    if set(tensors) - used:
        raise ValueError(f"{PASSES_TENSORS} holds tensors the state does not name: {sorted(set(tensors) - used)}")
    return state


# --- folders only this user can write ----------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would, for every thread, for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def check_private_folder(path: Path, what: str, remedy: str = "remove it (rm -r) and rerun") -> None:
    """Refuse a folder that someone else could have put files in: a symlink, another user's, or one that
    group or others can write. One line naming it and what to do."""
    info = os.lstat(path)
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif info.st_uid != os.getuid():
        problem = f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"can be written by {'others' if info.st_mode & stat.S_IWOTH else 'its group'} " \
                  f"(mode {stat.S_IMODE(info.st_mode):o})"
    if problem:
        raise OutputError(f"the {what} '{path}' {problem}, so its files cannot be trusted; {remedy}")


def make_private_folder(path: Path, what: str) -> None:
    """Create ``path`` as a 0700 folder of this user, or check that the existing one still is private."""
    try:
        path.mkdir(mode=PRIVATE_MODE)
        os.chmod(path, PRIVATE_MODE)  # mkdir's mode passes through the umask; set it exactly
    except FileExistsError:
        check_private_folder(path, what)
