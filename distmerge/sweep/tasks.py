"""The validation tasks of a sweep file (``sweep.tasks``): read once, before any Ray work, and shipped to the trials.

A task is built-in (``perplexity``: texts; ``classification``: text and label) or any task of ``distmerge.evaluate``
(``type: eval``); a method with one model per task (EMR) scores each on the model of the task's ``expert``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distmerge import validate
from distmerge.errors import ConfigError

TASK_KEYS = {"name", "type", "data", "text_field", "label_field", "max_length", "batch_size", "limit", "expert"}
EVAL_TASK_KEYS = {"name", "type", "task", "data", "max_length", "batch_size", "limit", "workers",
                  "cpus_per_worker", "max_new_tokens", "expert"}
TASK_METRICS = {"perplexity": ("nll", "perplexity"), "classification": ("accuracy",)}
TASK_TYPES = (*TASK_METRICS, "eval")


@dataclass(frozen=True)
class TaskSpec:
    """A validation task; its examples are read here, once, and shipped to the trials.

    ``type: eval`` hands the merged model to ``distmerge.evaluate`` (its task registry: GLUE, GSM8K, MATH,
    HumanEval, MBPP, perplexity), which scores it on its own Ray Data actors."""

    name: str
    type: str  # perplexity | classification | eval
    data: str
    examples: tuple  # texts (perplexity), (text, label) pairs (classification), row dicts (eval)
    max_length: int | None = None  # None: the evaluator's default for the task (perplexity 1024, GLUE 128)
    batch_size: int = 8
    task: str | None = None  # eval: the evaluator's task name
    workers: int = 1  # eval: model actors per evaluation
    cpus_per_worker: float = 0.5  # eval: CPUs each model actor takes
    max_new_tokens: int | None = None  # eval, generation tasks
    expert: str | None = None  # methods with one model per task (EMR): the model whose task this is

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this task reports, the main one first."""
        if self.type == "eval":
            from distmerge.evaluate.tasks import get_task

            return (f"{self.name}/{get_task(self.task).primary()}",)
        return tuple(f"{self.name}/{m}" for m in TASK_METRICS[self.type])

    def reports(self, metric: str) -> bool:
        # The evaluator's tasks report more than their headline metric (GLUE: f1, spearman, ...).
        return metric in self.metrics or (self.type == "eval" and metric.startswith(f"{self.name}/"))



def load_tasks(value: Any) -> tuple[TaskSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError("sweep.tasks: expected a non-empty list of {name, type, data}")
    tasks, seen = [], set()
    for i, entry in enumerate(value):
        where = f"sweep.tasks[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with name, type and data")
        kind = entry.get("type")
        if kind not in TASK_TYPES:
            raise ConfigError(f"{where}.type: {kind!r} is not one of {', '.join(TASK_TYPES)}")
        allowed = EVAL_TASK_KEYS if kind == "eval" else TASK_KEYS
        unknown = set(entry) - allowed
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key for type {kind} (allowed: "
                              f"{', '.join(sorted(allowed))})")
        name = entry.get("name", entry.get("task", kind))
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{where}.name: expected a name without '/'")
        if name in seen:
            raise ConfigError(f"{where}.name: '{name}' is used twice")
        seen.add(name)
        if not isinstance(entry.get("data"), str):
            raise ConfigError(f"{where}.data: expected the path of a .jsonl file")
        limit = entry.get("limit")
        if limit is not None:
            limit = _int(entry, "limit", None, lo=1, prefix=f"{where}.")
        expert = entry.get("expert")
        if expert is not None and (not isinstance(expert, str) or not expert):
            raise ConfigError(f"{where}.expert: expected a model's name, got {expert!r}")
        if kind == "eval":
            tasks.append(replace(_eval_task(entry, name, limit, where), expert=expert))
            continue
        examples = read_examples(entry["data"], kind, entry.get("text_field", "text"),
                                 entry.get("label_field", "label"), limit, f"{where}.data")
        tasks.append(TaskSpec(name=name, type=kind, data=str(Path(entry["data"]).resolve()), examples=examples,
                              max_length=(_int(entry, "max_length", None, lo=2, prefix=f"{where}.")
                                          if "max_length" in entry else None),
                              batch_size=_int(entry, "batch_size", 8, lo=1, prefix=f"{where}."), expert=expert))
    return tuple(tasks)


def _int(raw: dict, key: str, default: int | None, lo: int, prefix: str) -> int:
    return validate.number(f"{prefix}{key}", raw.get(key, default), lo=lo, integer=True)


def _number(raw: dict, key: str, default: float, lo: float, prefix: str) -> float:
    return validate.number(f"{prefix}{key}", raw.get(key, default), lo=lo)


def _eval_task(entry: dict, name: str, limit: int | None, where: str) -> TaskSpec:
    from distmerge.errors import InputError
    from distmerge.evaluate.tasks import get_task

    try:
        task = get_task(str(entry.get("task")))
    except InputError as exc:
        raise ConfigError(f"{where}.task: {exc}") from None
    rows = read_examples(entry["data"], "rows", "", "", limit, f"{where}.data")
    try:
        task.check_columns(list(rows[0]), f"'{entry['data']}'")
    except InputError as exc:
        raise ConfigError(f"{where}.data: {exc}") from None
    return TaskSpec(
        name=name, type="eval", data=str(Path(entry["data"]).resolve()), examples=rows, task=task.name,
        max_length=_int(entry, "max_length", None, lo=2, prefix=f"{where}.") if "max_length" in entry else None,
        batch_size=_int(entry, "batch_size", 8, lo=1, prefix=f"{where}."),
        workers=_int(entry, "workers", 1, lo=1, prefix=f"{where}."),
        cpus_per_worker=_number(entry, "cpus_per_worker", 0.5, lo=0.01, prefix=f"{where}."),
        max_new_tokens=_int(entry, "max_new_tokens", None, lo=1, prefix=f"{where}.") if "max_new_tokens" in entry
        else None,
    )


def read_examples(path: str, kind: str, text_field: str, label_field: str, limit: int | None,
                  where: str) -> tuple:
    """Texts, (text, label) pairs, or whole rows (kind 'rows'), from a JSON-lines file; an error names the file
    and line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read '{path}': {exc.strerror}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{where}: '{path}' line {number} is not JSON ({exc})") from None
        if kind == "rows":
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: '{path}' line {number} is not a JSON object")
            examples.append(row)
            if limit is not None and len(examples) >= limit:
                break
            continue
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: '{path}' line {number} has no text in field '{text_field}'")
        if kind == "classification":
            label = row.get(label_field)
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise ConfigError(f"{where}: '{path}' line {number} has no integer or string label in field "
                                  f"'{label_field}'")
            examples.append((text, label))
        else:
            examples.append(text)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise ConfigError(f"{where}: '{path}' holds no examples")
    return tuple(examples)


def chunk_bounds(count: int, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of each of ``chunks`` contiguous, nearly equal parts of ``count`` examples."""
    edges = [round(i * count / chunks) for i in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))

