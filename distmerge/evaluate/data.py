"""The rows an evaluation reads: a jsonl/json/parquet/txt file or folder, a list of row dicts, a Ray Dataset, or the
task's hub dataset. ``check_data`` checks them without Ray (a mistake is reported before a cluster starts);
``open_dataset`` opens them as a Ray Dataset for the pipeline (``distmerge.evaluate.runner``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distmerge.errors import InputError
from distmerge.evaluate.options import LIGHT_TASK_CPUS
from distmerge.evaluate.tasks import Task


def check_data(data: Any, task: Task) -> None:
    """A data file exists, has a known format and the task's fields (from its first row or its schema); without
    Ray, so a mistake is reported before a cluster starts."""
    import importlib.util

    import ray.data

    if data is None and (task.hub is None or importlib.util.find_spec("datasets") is None):
        _hub_dataset(task)  # raises the message that says to pass --data
    if data is None or isinstance(data, ray.data.Dataset):
        return  # hub datasets and Ray Datasets are checked row by row in prepare
    if isinstance(data, (list, tuple)):
        if not data:
            raise InputError(f"task '{task.name}': no rows to evaluate")
        task.check_columns(list(data[0]), "the first row")
        return
    path = Path(data).expanduser()
    if not path.exists():
        raise InputError(f"data file '{path}' does not exist")
    suffix = _suffix(path)
    first_file = path if path.is_file() else sorted(p for p in path.iterdir() if p.suffix == suffix)[0]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(str(first_file)).names
    elif suffix in (".txt", ".text"):
        columns = ["text"]
    elif path.is_file() and _starts_with_array(path):
        columns = list(_json_array(path)[0])
    else:
        columns = _first_json_row(first_file)
    task.check_columns(columns, f"data '{path}'")


def in_memory_blocks(rows: int, rows_per_block: int) -> int:
    """Blocks for rows held in memory: Ray's default is a block per row (its parallelism of 200), and every block
    is a task; a few batches a block keeps the actors fed without a task and a worker process per row."""
    return max(1, -(-rows // max(1, rows_per_block)))


def open_dataset(data: Any, task: Task, rows_per_block: int = 64):
    """A Ray Dataset of the task's input rows (checked by ``check_data``), and a name for it."""
    import ray.data

    check_data(data, task)
    read = {"num_cpus": LIGHT_TASK_CPUS}
    if data is None:
        return _hub_dataset(task), f"hub:{task.hub[0] if task.hub else task.name}"
    if isinstance(data, ray.data.Dataset):
        return data, "dataset"
    if isinstance(data, (list, tuple)):
        rows = list(data)
        return ray.data.from_items(rows, override_num_blocks=in_memory_blocks(len(rows), rows_per_block)), \
            f"{len(rows)} rows"
    path = Path(data).expanduser()
    suffix = _suffix(path)
    if suffix == ".parquet":
        return ray.data.read_parquet(str(path), **read), str(path)
    if suffix in (".txt", ".text"):
        return ray.data.read_text(str(path), **read), str(path)
    if path.is_file() and _starts_with_array(path):  # one JSON array: small reference files (human-eval style)
        rows = _json_array(path)
        return ray.data.from_items(rows, override_num_blocks=in_memory_blocks(len(rows), rows_per_block)), str(path)
    return ray.data.read_json(str(path), file_extensions=["json", "jsonl"], **read), str(path)


def _json_array(path: Path) -> list:
    try:
        rows = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"data file '{path}': invalid JSON ({exc})") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"data file '{path}': expected a non-empty array of JSON objects")
    return rows


def _first_json_row(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"data file '{path}': the first row is not JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise InputError(f"data file '{path}': rows must be JSON objects")
                return list(row)
    raise InputError(f"data file '{path}': no rows")


def _suffix(path: Path) -> str:
    if path.is_dir():
        suffixes = {p.suffix for p in path.iterdir() if p.is_file() and not p.name.startswith(".")}
        known = suffixes & {".parquet", ".jsonl", ".json", ".txt"}
        if len(known) != 1:
            raise InputError(f"data folder '{path}' must hold files of one format (jsonl, json, parquet or txt)")
        return known.pop()
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".json", ".txt", ".text"):
        raise InputError(f"data file '{path}': unknown format '{suffix}' (jsonl, json, parquet or txt)")
    return suffix


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4096).lstrip()[:1] == b"["


def _hub_dataset(task: Task):
    import importlib.util

    import ray.data

    if task.hub is None:
        raise InputError(f"task '{task.name}' has no known hub dataset; pass --data FILE (jsonl, json or parquet)")
    name, config, split = task.hub
    if importlib.util.find_spec("datasets") is None:
        raise InputError(f"task '{task.name}': no --data given and the 'datasets' package is not installed to fetch "
                         f"'{name}'; pass --data FILE (jsonl, json or parquet)")
    try:
        import datasets

        hf = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"task '{task.name}': could not load '{name}' from the Hugging Face Hub ({first}); offline? "
                         f"pass --data FILE (jsonl, json or parquet)") from None
    return ray.data.from_huggingface(hf)
