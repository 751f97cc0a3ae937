"""The terminal's live view of a sweep: the best trials so far, redrawn as results arrive (Tune's own
console output is turned off; its full logs stay in the experiment folder)."""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class BestTrialsTable(Callback):
    def __init__(self, metric: str, mode: str, params: tuple[str, ...], parts: int, top: int = 5,
                 interval_s: float = 5.0):
        self.metric, self.mode, self.params, self.parts = metric, mode, params, parts
        self.top, self.interval_s = top, interval_s
        self.latest: dict[str, dict[str, Any]] = {}
        self.status: dict[str, str] = {}
        self.last_draw = 0.0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.status[trial.trial_id] = "running"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric in result:
            self.latest[trial.trial_id] = {"config": dict(trial.config), "value": result[self.metric],
                                           "parts": result.get("eval_parts", result.get("training_iteration"))}
        if time.monotonic() - self.last_draw >= self.interval_s:
            self.draw()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.status[trial.trial_id] = "done"

    def on_trial_error(self, iteration, trials, trial, **info):
        self.status[trial.trial_id] = "failed"

    def on_experiment_end(self, trials, **info):
        self.draw()

    def lines(self) -> list[str]:
        counts = {s: sum(1 for v in self.status.values() if v == s) for s in ("done", "running", "failed")}
        ranked = sorted(self.latest.items(), key=lambda kv: kv[1]["value"], reverse=self.mode == "max")
        header = (f"sweep: {counts['done']} done, {counts['running']} running, {counts['failed']} failed; "
                  f"best {self.metric} ({self.mode}):")
        columns = ["trial", *self.params, self.metric, "parts"]
        rows = [[tid, *(format_value(entry["config"].get(p)) for p in self.params), format_value(entry["value"]),
                 f"{entry['parts']}/{self.parts}"] for tid, entry in ranked[: self.top]]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        out = [header, "  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
        out += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
        return out

    def draw(self) -> None:
        self.last_draw = time.monotonic()
        print("\n".join(self.lines()), file=sys.stderr, flush=True)
