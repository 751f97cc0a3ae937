"""Scores as records and tables: accuracy per task, normalized to each task's expert (the FDA paper's
measure: merged accuracy / the expert's accuracy on its own task), means and spreads over seeds."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Callable


def normalized(scores: dict[str, float], own: dict[str, float]) -> dict[str, float]:
    return {t: scores[t] / own[t] if own[t] else 0.0 for t in own}


def score_record(scores: dict[str, float], own: dict[str, float]) -> dict:
    norm = normalized(scores, own)
    return {"accuracy": scores, "mean_accuracy": statistics.fmean(scores.values()), "normalized": norm,
            "mean_normalized": statistics.fmean(norm.values())}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def summarize_rows(runs: list[dict], tasks: list[str], field: str) -> dict[str, dict[str, dict]]:
    """Row -> column (each task, then "mean") -> mean/std/per-seed of ``field`` (accuracy | normalized) over
    the runs, for the rows every run has, in the first run's order."""
    names = [n for n in runs[0]["rows"] if all(n in r["rows"] for r in runs)]
    out = {}
    for name in names:
        columns = {}
        for t in tasks:
            columns[t] = spread([r["rows"][name][field][t] for r in runs])
        columns["mean"] = spread([statistics.fmean(r["rows"][name][field][t] for t in tasks) for r in runs])
        out[name] = columns
    return out


def markdown(summary: dict[str, dict[str, dict]], tasks: list[str], labels: dict[str, str], seeds: int,
             digits: int = 3) -> str:
    lines = [f"| model | {' | '.join(tasks)} | mean |", "|" + "---|" * (len(tasks) + 2)]
    for name, columns in summary.items():
        cells = [f"{columns[c]['mean']:.{digits}f}" + (f" ± {columns[c]['std']:.{digits}f}" if seeds > 1 else "")
                 for c in [*tasks, "mean"]]
        lines.append(f"| {labels.get(name, name)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def emr_scores(score: Callable[..., dict[str, float]], merged: Path, split: str, tasks) -> dict[str, float]:
    """An EMR merge (``emr/`` inside) scores task t with its own task model; any other folder as it is.
    ``score(folder, split, tasks=...)`` is the track's scorer."""
    merged = Path(merged)
    if not (merged / "emr" / "index.json").is_file():
        return score(merged, split)
    from distmerge.emr_task import materialize_task

    out = {}
    with tempfile.TemporaryDirectory(dir=merged.parent) as scratch:
        for task in tasks:
            folder = materialize_task(merged, task, Path(scratch) / task)
            out.update(score(folder, split, tasks=(task,)))
    return out
