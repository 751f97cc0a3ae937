"""Results: the per-example parquet table, the summary JSON, the terminal table, normalized scores.

``<out>/<task>.parquet`` has one row per example, in data-file order:

* every task: ``index``, ``prompt`` (the full prompt for generation tasks; the text otherwise), ``score``;
* generation: ``output`` (the completion), ``reference``, ``extracted`` (the answer read from the completion, or
  for code the sandbox's verdict: passed / failed: <last error line> / timeout / killed); ``score`` is 1 or 0;
* GLUE: ``pair``, ``output`` (predicted label, or STS-B value), ``reference``, ``prediction``, ``label``;
  ``score`` is 1/0, and for STS-B minus the absolute error (higher is better, 0 is exact);
* perplexity: ``nll`` (summed over the text's predicted tokens), ``tokens``; ``score`` is the text's own
  perplexity (lower is better).

``<out>/summary.json`` holds one entry per task: the metrics, the headline metric (``primary``/``score``), the
number of examples, and, when expert results are given, ``normalized`` = merged / expert x 100 on the headline
metric (Twin-Merging's README reports GLUE this way).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from distmerge.errors import InputError

COLUMNS = {
    "generate": ("index", "prompt", "output", "reference", "extracted", "score"),
    "classify": ("index", "prompt", "pair", "output", "reference", "prediction", "label", "score"),
    "perplexity": ("index", "prompt", "score", "nll", "tokens"),
}


def select_columns(table, kind: str):
    return table.select(list(COLUMNS[kind]))


class RowWriter:
    """Appends batches to a parquet file as they arrive; the file appears under its name only when complete."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = Path(path), kind
        self.partial = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        self.writer = None

    def write(self, table) -> None:
        import pyarrow.parquet as pq

        table = select_columns(table, self.kind)
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.partial), table.schema)
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self) -> Path | None:
        if self.writer is None:
            return None
        self.writer.close()
        os.replace(self.partial, self.path)
        return self.path

    def discard(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
        self.partial.unlink(missing_ok=True)


def normalized(score: float | None, expert: float | None) -> float | None:
    """merged / expert x 100; None where either is missing or the expert scored 0."""
    if score is None or expert is None or expert == 0 or any(isinstance(v, float) and math.isnan(v)
                                                              for v in (score, expert)):
        return None
    return 100.0 * score / expert


def load_expert_scores(path: str | Path) -> dict[str, float]:
    """Headline scores per task from an expert run's ``summary.json`` (or a plain ``{task: score}`` mapping)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"expert results '{path}': unreadable ({exc})") from None
    entries = data.get("tasks", data) if isinstance(data, dict) else data
    scores = {}
    if isinstance(entries, dict):
        for task, value in entries.items():
            scores[task] = value.get("score") if isinstance(value, dict) else value
    elif isinstance(entries, list):
        for entry in entries:
            scores[entry["task"]] = entry.get("score")
    else:
        raise InputError(f"expert results '{path}': expected a summary.json or a {{task: score}} mapping")
    bad = [t for t, v in scores.items() if v is not None and not isinstance(v, (int, float))]
    if bad:
        raise InputError(f"expert results '{path}': score of {bad[0]} is not a number")
    return {t: float(v) for t, v in scores.items() if v is not None}


def summary(results: Iterable[Any], experts: Mapping[str, float] | None = None) -> dict[str, Any]:
    entries = {}
    for result in results:
        entry = result.to_dict()
        if experts and result.task in experts:
            entry["expert_score"] = experts[result.task]
            entry["normalized"] = normalized(entry["score"], experts[result.task])
        entries[result.task] = entry
    scored = [e["normalized"] for e in entries.values() if e.get("normalized") is not None]
    out: dict[str, Any] = {"tasks": entries}
    if scored:
        out["mean_normalized"] = sum(scored) / len(scored)
    return out


def write_summary(out: Path, data: Mapping[str, Any]) -> Path:
    from distmerge.io.writer import write_json

    path = Path(out) / "summary.json"
    write_json(path, data)
    return path


def table(data: Mapping[str, Any]) -> str:
    """The terminal table: one line per task with its headline metric, the others, and the normalized score."""
    rows = [("task", "examples", "metric", "score", "normalized", "other metrics")]
    for name, entry in data["tasks"].items():
        others = ", ".join(f"{k} {fmt(v)}" for k, v in entry["metrics"].items() if k != entry["primary"])
        rows.append((name, str(entry["examples"]), entry["primary"], fmt(entry["score"]),
                     fmt(entry.get("normalized"), 2) if "normalized" in entry else "", others))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if data.get("mean_normalized") is not None:
        lines.append(f"mean normalized score: {data['mean_normalized']:.2f}")
    return "\n".join(lines)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)
