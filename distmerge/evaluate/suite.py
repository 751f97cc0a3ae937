"""Evaluation suites: several tasks (and models) in one YAML, validated before anything runs.

```yaml
model: merged/                 # the model of every task without its own; the CLI's MODEL argument overrides it
out: results/                  # the CLI's --out overrides it
batch_size: 8                  # defaults for every task: batch_size, workers, limit, max_new_tokens, max_length
workers: 1
expert_results: experts/summary.json   # optional: normalized score = merged / expert x 100
tasks:
  - task: gsm8k
    data: data/gsm8k_test.jsonl
    limit: 200
  - task: sst2
    data: data/sst2.jsonl
    head_from: experts/sst2    # GLUE: that task's fine-tuned classifier head
    task_model: sst2           # EMR merges: evaluate this task's model
  - task: perplexity
    data: data/wiki.txt
    model: base/               # a task may name its own model
```
Relative paths are relative to the suite file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmerge import validate
from distmerge.errors import ConfigError

OPTION_KEYS = ("batch_size", "workers", "limit", "max_new_tokens", "max_length")
TASK_KEYS = {"task", "data", "model", "head_from", "task_model", "tokenizer", *OPTION_KEYS}
TOP_KEYS = {"model", "out", "tasks", "expert_results", *OPTION_KEYS}


@dataclass(frozen=True)
class SuiteTask:
    task: str
    data: str | None
    model: str | None
    head_from: str | None = None
    task_model: str | None = None
    tokenizer: str | None = None
    options: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    tasks: tuple[SuiteTask, ...]
    model: str | None = None  # the default; a task's own ``model`` wins
    out: str | None = None
    expert_results: str | None = None


def _int_option(value: Any, where: str) -> int:
    return validate.number(where, value, 1, integer=True)


def _path(value: Any, base: Path, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a path, got {value!r}")
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def load_suite(path: str | Path) -> Suite:
    from distmerge.config import read_yaml
    from distmerge.evaluate.tasks import TASKS

    path = Path(path).expanduser()
    raw = read_yaml(path, "suite")
    if not isinstance(raw, dict):
        raise ConfigError(f"suite '{path}': expected a mapping with a 'tasks' list")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key in suite '{path}' (known: {', '.join(sorted(TOP_KEYS))})")
    base = path.resolve().parent
    defaults = {k: _int_option(raw[k], k) for k in OPTION_KEYS if k in raw}
    entries = raw.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"tasks: suite '{path}' needs a non-empty list of tasks")
    tasks = []
    for i, entry in enumerate(entries):
        where = f"tasks[{i}]"
        if isinstance(entry, str):
            entry = {"task": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with 'task' and 'data'")
        validate.no_unknown(where, entry, TASK_KEYS)
        name = entry.get("task")
        if not isinstance(name, str) or name.lower() not in TASKS:
            raise ConfigError(f"{where}.task: '{name}' is not a task (one of: {', '.join(sorted(TASKS))})")
        options = dict(defaults)
        options.update({k: _int_option(entry[k], f"{where}.{k}") for k in OPTION_KEYS if k in entry})
        task_model = entry.get("task_model")
        if task_model is not None and not isinstance(task_model, str):
            raise ConfigError(f"{where}.task_model: must be a task name, got {task_model!r}")
        tasks.append(SuiteTask(
            task=name.lower(), data=_path(entry.get("data"), base, f"{where}.data"),
            model=_path(entry.get("model"), base, f"{where}.model"),
            head_from=_path(entry.get("head_from"), base, f"{where}.head_from"), task_model=task_model,
            tokenizer=_path(entry.get("tokenizer"), base, f"{where}.tokenizer"), options=options))
    return Suite(tuple(tasks), _path(raw.get("model"), base, "model"), _path(raw.get("out"), base, "out"),
                 _path(raw.get("expert_results"), base, "expert_results"))
