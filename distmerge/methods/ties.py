"""TIES-Merging (spec section 3): trim per task, elect a sign, merge the agreeing values.

``trim_scope: global`` is the paper's: one threshold per task over the whole model, found exactly by two
histogram passes over all actors (``distmerge.ops.ties``). ``trim_scope: tensor`` is mergekit's and PEFT's:
a threshold per tensor, no reduction pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distmerge.errors import ConfigError
from distmerge.methods.base import Setting, TaskVectorMethod, require_choice, require_number
from distmerge.methods.execute import ChunkResult, Deferred
from distmerge.ops import ties as ops


@dataclass(frozen=True)
class TiesParams:
    ALIASES = {"lambda": "lam"}
    PER_MODEL = {"density": Setting(0.0, 1.0, lo_open=True)}
    lam: float = 1.0
    density: Any = 0.2  # fraction of each task vector kept by the trim (a setting: per model, a gradient, filters)
    trim_scope: str = "global"  # global (paper) | tensor (mergekit, PEFT)
    disjoint: str = "mean"  # mean | sum
    convention: str = "paper"  # paper | mergekit: trim count and the sign given to zero-sum elements
    trim_rescale: str = "none"  # none | l1: scale each trimmed task vector back to its L1 norm (mergekit's rescale)

    def validate(self, where: str) -> None:
        require_number(where, "lambda", self.lam)
        require_choice(where, "trim_scope", self.trim_scope, ("global", "tensor"))
        require_choice(where, "disjoint", self.disjoint, ("mean", "sum"))
        require_choice(where, "convention", self.convention, ("paper", "mergekit"))
        require_choice(where, "trim_rescale", self.trim_rescale, ("none", "l1"))
        if self.trim_rescale == "l1" and self.trim_scope != "tensor":
            raise ConfigError(f"{where}.trim_rescale: 'l1' is a per-tensor rescale; it needs trim_scope 'tensor'")


class Ties(TaskVectorMethod):
    name = "ties"
    Params = TiesParams

    def densities(self, job) -> list[float]:
        return list(job.per_model["density"])

    def chunkable(self) -> bool:
        return self.params.trim_scope == "global"

    def initial_state(self, jobs):
        if self.params.trim_scope != "global" or not jobs:
            return {}
        per_task = {tuple(self.densities(job)) for job in jobs}
        if len(per_task) > 1:
            raise ConfigError("parameters.density: trim_scope 'global' needs one density per model for the whole "
                              "model; use trim_scope 'tensor' for densities that vary by tensor")
        densities = list(per_task.pop())
        for density in densities:
            require_number("models[].parameters", "density", density, 0.0, 1.0, lo_open=True)
        return {"densities": densities}

    def next_pass(self, state):
        if self.params.trim_scope != "global":
            return None
        if "high_bins" not in state:
            return "trim_high"
        if "thresholds" not in state:
            return "trim_low"
        return None

    def stats_delta(self, pass_name, base, task_vector, job, offset, state):
        count = task_vector.shape[0]
        if pass_name == "trim_high":
            hist = torch.stack([ops.radix_high_histogram(task_vector[t]) for t in range(count)])
            return {"hist": hist, "numel": task_vector[0].numel()}
        if pass_name == "trim_low":
            hist = torch.stack([
                ops.radix_low_histogram(task_vector[t], b) if b >= 0 else torch.zeros(ops.HIGH_BINS, dtype=torch.int64)
                for t, b in enumerate(state["high_bins"])
            ])
            return {"hist": hist}
        return super().stats_delta(pass_name, base, task_vector, job, offset, state)

    def finish_pass(self, pass_name, totals, state):
        state = dict(state)
        rule = self.params.convention
        if pass_name == "trim_high":
            numel = int(totals["numel"])
            high_bins, ranks, fixed = [], [], []
            for t, density in enumerate(state["densities"]):
                rank = ops.trim_rank(numel, density, rule)
                if rank == 0 or rank > numel:  # keep all / keep none: no selection needed
                    high_bins.append(-1)
                    ranks.append(0)
                    fixed.append(ops.KEEP_ALL if rank == 0 else ops.KEEP_NONE)
                    continue
                bin_index, within = ops.locate_rank(totals["hist"][t], rank)
                high_bins.append(bin_index)
                ranks.append(within)
                fixed.append(None)
            state.update(numel=numel, high_bins=high_bins, ranks=ranks, fixed=fixed)
            return state
        if pass_name == "trim_low":
            thresholds = []
            for t, b in enumerate(state["high_bins"]):
                if b < 0:
                    thresholds.append(state["fixed"][t])
                else:
                    low, _ = ops.locate_rank(totals["hist"][t], state["ranks"][t])
                    thresholds.append(ops.bits_to_value(b, low))
            state["thresholds"] = thresholds
            return state
        return super().finish_pass(pass_name, totals, state)

    def merge_delta(self, base, task_vector, job, offset, state):
        if self.params.trim_scope == "global":
            trimmed = ops.trim(task_vector, state["thresholds"])
            if self.params.convention == "mergekit":  # zero sums take +1: nothing to defer
                return base + self.params.lam * ops.merge_trimmed(trimmed, job.weights, 1.0, self.params.disjoint)
            # The zero-sign rule needs the model-wide majority sign, known only after every chunk is merged:
            # merge with +1 now and hand back the (rare) elements that would change with -1 or 0.
            delta, sign_sum, index, alternative = ops.merge_deferred_sign(trimmed, job.weights, self.params.disjoint)
            flat_base = base.reshape(-1)
            return ChunkResult(base + self.params.lam * delta,
                               deferred=Deferred(sign_sum, index, flat_base[index] + self.params.lam * alternative))
        if self.params.convention == "mergekit":
            trimmed = torch.stack([task_vector[t] * ops.mergekit_magnitude_mask(task_vector[t], d)
                                   for t, d in enumerate(self.densities(job))])
            zero_sign = 1.0
        else:
            thresholds = [ops.magnitude_threshold(task_vector[t], d) for t, d in enumerate(self.densities(job))]
            trimmed = ops.trim(task_vector, thresholds)
            zero_sign = None
        if self.params.trim_rescale == "l1":
            trimmed = torch.stack([ops.l1_rescale(trimmed[t], task_vector[t]) for t in range(trimmed.shape[0])])
        delta = ops.merge_trimmed(trimmed, job.weights, zero_sign, self.params.disjoint)
        return base + self.params.lam * delta

    def settle_deferred(self, state, vote):
        """The vote is the summed elected signs; the patches (merged with zero signs as +1) apply when the
        model-wide majority is <= 0."""
        state = {**state, "sign_sum": vote}
        if self.params.trim_scope != "global" or self.params.convention == "mergekit":
            return state, False
        return state, _sign(vote) <= 0

    def record_patched(self, state, count):
        return {**state, "patched_elements": count}

    def describe(self, state):
        if "thresholds" not in state:
            return {}
        out = {"trim_thresholds": [float(x) for x in state["thresholds"]], "trimmed_values": state.get("numel")}
        if "sign_sum" in state and self.params.convention == "paper":
            out["majority_sign"] = _sign(state["sign_sum"])
            out["patched_elements"] = state.get("patched_elements", 0)
        return out


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)
