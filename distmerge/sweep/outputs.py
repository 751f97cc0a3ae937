"""What a sweep leaves in its folder besides Tune's logs: the results table, best.yaml, the plots."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from distmerge.sweep.spec import SweepSpec, plain_value

FINISHED, STOPPED, FAILED, NOT_RUN = "finished", "stopped early", "failed", "not run"
TIME_COLUMNS = ("time_total_s", "merge_seconds", "eval_seconds")


def trial_rows(spec: SweepSpec, trials: list) -> list[dict[str, Any]]:
    """One row per Tune trial: status, parameters, the last reported metrics, times, the error if any."""
    metrics = [m for t in spec.tasks for m in t.metrics]
    for trial in trials:  # everything the tasks reported (the evaluator's tasks report more than their headline)
        for key in (trial.last_result or {}):
            if any(key.startswith(f"{t.name}/") for t in spec.tasks) and key not in metrics:
                metrics.append(key)
    rows = []
    for trial in trials:
        last = trial.last_result or {}
        parts = last.get("eval_parts")
        if trial.status == "ERROR":
            status = FAILED
        elif trial.status == "TERMINATED" and parts == spec.eval_chunks:
            status = FINISHED
        elif trial.status == "TERMINATED" and parts:
            status = STOPPED
        else:
            status = NOT_RUN
        row: dict[str, Any] = {"trial": trial.trial_id, "status": status}
        row.update({name: plain_value(trial.config.get(name)) for name in spec.param_names})
        row.update({m: last.get(m) for m in metrics})
        row["eval_parts"] = parts
        row.update({c: last.get(c) for c in TIME_COLUMNS})
        row["error"] = error_line(trial) if status == FAILED else ""
        rows.append(row)
    order = {FINISHED: 0, STOPPED: 1, FAILED: 2, NOT_RUN: 3}
    sign = -1 if spec.mode == "max" else 1

    def key(row):
        value = row.get(spec.metric)
        return (order[row["status"]], sign * value if isinstance(value, (int, float)) else math.inf, row["trial"])

    return sorted(rows, key=key)


def error_line(trial) -> str:
    """The last line of the trial's traceback: the exception and its message."""
    text = ""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        text = Path(path).read_text(errors="replace")
    if not text:
        error = trial.get_error() if hasattr(trial, "get_error") else None
        text = str(error or "")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed (no error message recorded)"


def best_row(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best fully evaluated trial (a trial stopped early was scored on fewer examples)."""
    finished = [r for r in rows if r["status"] == FINISHED and isinstance(r.get(spec.metric), (int, float))]
    return finished[0] if finished else None


def write_table(rows: list[dict[str, Any]], out: Path) -> Path:
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_csv(out / "results.csv", index=False)
    frame.to_parquet(out / "results.parquet", index=False)
    return out / "results.csv"


def write_best_yaml(spec: SweepSpec, best: dict[str, Any], out: Path) -> Path:
    config = spec.best_dict({name: best[name] for name in spec.param_names})
    command = "distmerge twin build" if spec.is_twin else "distmerge merge"
    header = (f"# The best trial of the sweep in this folder ({best['trial']}): {spec.metric} = "
              f"{best[spec.metric]:.6g} ({spec.mode}).\n# {command} best.yaml --out DIR\n")
    if spec.is_twin and spec.best_oversample(best) is not None:
        header += (f"# exclusive.oversample is {config['exclusive']['oversample']}, not the sweep's: the trials read "
                   "their rank from builds at the largest rank, and at this oversampling a randomized SVD (svd: "
                   "randomized, or auto on a tensor whose smaller side is > 1024) draws those builds' sketch, so "
                   "this file rebuilds the scored factors.\n")
    path = out / "best.yaml"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def plot_name(param: str) -> str:
    return "metric_vs_" + re.sub(r"[^A-Za-z0-9_.-]", "_", param) + ".png"


def write_plots(spec: SweepSpec, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """metric against each parameter: fully evaluated trials, trials stopped early, the best marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["status"] in (FINISHED, STOPPED) and isinstance(r.get(spec.metric), (int, float))]
    best = best_row(spec, rows)
    paths = []
    for param in spec.param_names:
        values = [r[param] for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({str(v) for v in values})

        def x_of(row):
            return row[param] if numeric else categories.index(str(row[param]))

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for status, style in ((FINISHED, {"color": "tab:blue", "label": "evaluated"}),
                              (STOPPED, {"color": "tab:gray", "marker": "x", "label": "stopped early (partial)"})):
            points = [r for r in scored if r["status"] == status]
            if points:
                ax.scatter([x_of(r) for r in points], [r[spec.metric] for r in points], **style)
        if best is not None:
            ax.scatter([x_of(best)], [best[spec.metric]], s=160, marker="*", color="tab:red", label="best", zorder=3)
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        elif any(s.name == param and s.kind == "loguniform" for s in spec.spaces):
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel(f"{spec.metric} ({'lower' if spec.mode == 'min' else 'higher'} is better)")
        ax.set_title(f"{spec.metric} vs {param} ({len(scored)} trials)")
        ax.grid(alpha=0.3)
        if scored:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / plot_name(param)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
