"""Helpers shared by the benchmark scripts: the checkpoint family layout, file lists, fsync, memory, machine."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
from datetime import datetime, timezone
from pathlib import Path

FAMILY_FILE = "family.json"  # written by make_checkpoints.py: the spec of the family, and whether it is complete
INDEX_FILE = "model.safetensors.index.json"


def family_spec(root: Path) -> dict | None:
    path = Path(root) / FAMILY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def model_folders(root: Path) -> tuple[Path, list[Path]]:
    """``root/base`` and ``root/expert_*`` in natural order."""
    root = Path(root)
    base = root / "base"
    experts = sorted((p for p in root.glob("expert_*") if p.is_dir()),
                     key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)])
    if not (base / "config.json").is_file() or not experts:
        raise SystemExit(f"{root}: expected base/ and expert_*/ model folders (see benchmarks/make_checkpoints.py)")
    return base, experts


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index (or the single model.safetensors)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {name: "model.safetensors" for name in handle.keys()}


def shard_files(folder: Path) -> list[Path]:
    """The model's safetensors shards, in file order."""
    return [Path(folder) / name for name in sorted(set(weight_map(folder).values()))]


def files_bytes(files) -> int:
    return sum(Path(f).stat().st_size for f in files)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM, which getrusage's ru_maxrss reports). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    date = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram / 2**30, 1), "platform": platform.platform(),
            "python": platform.python_version(), "date": date}


def mib(nbytes: int | float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"
