"""Resuming an interrupted merge from the shards it already finished.

A run's staging folder is named by a key over everything that determines its bytes (the resolved config,
the input files' sizes and modification times, the shard layout, distmerge's version), so a rerun of the
same command finds it and a changed input or config never reuses stale shards. The driver appends one
line per finished shard to a manifest, with the SHA-256 of the file as written; on resume a shard counts
only if its file still hashes to that value. A lock on the folder keeps two runs from writing the same
target at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import yaml

from distmerge import __version__
from distmerge.errors import OutputError
from distmerge.io.writer import STAGING_MARK

MANIFEST = ".distmerge-manifest.jsonl"
PASSES = ".distmerge-passes.pkl"
LOCK = ".distmerge-lock"
HASH_BLOCK = 16 << 20


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
            digest.update(f"\0{tensor.name}:{tuple(tensor.shape)}:{tensor.out_dtype}".encode())
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

    def open(self) -> dict[int, dict[str, Any]]:
        """Create or reopen the folder, take the lock, return the verified finished shards by index."""
        try:
            self.path.mkdir(exist_ok=True)
            self._lock_fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
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
        manifest = self.path / MANIFEST
        if not manifest.exists():
            return {}
        done = {}
        for line in manifest.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: the shard is redone
                continue
            if all(_intact(self.path / f["name"], f["sha256"], f["bytes"]) for f in record["files"]):
                done[record["shard"]] = record
        # Rewrite the manifest with the survivors only, so it never lists a file that failed its check.
        tmp = manifest.with_name(MANIFEST + ".partial")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
        os.replace(tmp, manifest)
        return done

    def record(self, result: dict[str, Any]) -> None:
        """Append a finished shard; durable before the call returns."""
        with open(self.path / MANIFEST, "a") as f:
            f.write(json.dumps(result) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load_passes(self):
        path = self.path / PASSES
        if not path.exists():
            return None
        try:
            return pickle.loads(path.read_bytes())
        except Exception:  # a torn file from a kill: the passes are recomputed
            return None

    def save_passes(self, state: dict) -> None:
        tmp = self.path / (PASSES + ".partial")
        tmp.write_bytes(pickle.dumps(state))
        os.replace(tmp, self.path / PASSES)

    def clear_bookkeeping(self) -> None:
        """Before the rename: the finished model holds no run files."""
        for name in (MANIFEST, PASSES, LOCK):
            (self.path / name).unlink(missing_ok=True)
        patches = self.path / ".patches"
        if patches.exists():
            for file in patches.iterdir():
                file.unlink()
            patches.rmdir()
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
