"""The generalized task-vector merge: one composable recipe of which TIES, DARE, Breadcrumbs, DELLA and task
arithmetic are configurations (as mergekit's generalized task arithmetic, with the papers' variants).

Per tensor, with tau_t = theta_t - theta_0:

1. **sparsify**: each stage of ``Recipe.sparsify`` in turn maps the stacked task vectors to sparser ones:
   ``random`` (DARE: drop each element with ``drop_rate``), ``magnitude`` (keep the ``density`` largest |tau|,
   per tensor or with one exact threshold per model over the whole model), ``breadcrumbs`` (drop the ``gamma``
   largest and the smallest, keep ``density``), ``della`` (MagPrune: keep with a probability rising with the
   magnitude's rank in its row, ``density`` +/- ``epsilon``); each with its rescale (``inverse``: 1/keep
   probability, the DARE and DELLA papers'; ``l1``: back to the tensor's L1 norm, mergekit's; ``none``);
2. **consensus**: ``none``, ``mass`` (TIES: the sign of sum_t w_t tau'_t) or ``count`` (the majority of signs);
   only the values agreeing with the elected sign are kept;
3. **combine**: ``sum`` of w_t tau'_t, or ``mean`` (divided by the summed weights, of the agreeing models under
   a consensus: mergekit's ``normalize``);
4. theta_0 + lambda * that.

The randomness (``random``, ``della``) is distmerge's counter-based stream per (seed, model, tensor, block), so
any chunking and any actor layout draw the same masks. The whole-model magnitude trim (``scope: global``) is
found exactly by two histogram passes; its zero-sign rule (the model-wide majority sign) is a deferred decision.
Where the caller can place undecided elements after the merge (``leaves_undecided``) and the compiled TIES loop
runs, the two passes over the inputs become one over a sample of them, which estimates each threshold: a guess
(one value: where the sample's possible ranks of the cut all fall on one value, as with bf16 fine-tunes) or a
bracket of whole high bins. The merge counts the values above and at the estimate, which checks it; it leaves
the elements with a value inside a bracket undecided, and the two histogram passes then run over those
elements alone before they are merged. An estimate the counts refute makes the merge run again from the exact
passes. The outputs are the exact passes' bits either way.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from distmerge.deferred import torch
from distmerge.errors import ConfigError, MergeError
from distmerge.methods.base import TaskVectorMethod, require_number, stack_task_vectors
from distmerge.methods.execute import LEANING, ChunkResult, Deferred
from distmerge.ops import dare as dare_ops
from distmerge.ops import dare_fused
from distmerge.ops import compiled
from distmerge.ops.compiled import ORDERED_SUM_TASKS
from distmerge.ops import sparsify as sparsify_ops
from distmerge.ops import ties as ties_ops
from distmerge.ops import ties_fused
from distmerge.ops.task_vectors import broadcast_weights, task_arithmetic

SPARSIFIERS = ("random", "magnitude", "breadcrumbs", "della")
CONSENSUS = ("none", "mass", "count")
COMBINE = ("sum", "mean")
CONVENTIONS = ("paper", "mergekit")
SAMPLE_PASS = "trim_sample"  # estimates of the whole-model trim's thresholds, from a sample of the inputs
TRIM_PASSES = ("trim_high", "trim_low", SAMPLE_PASS)  # and its two exact histogram passes
# An estimate spans the sample's rank of the threshold +- this many standard deviations of a rank in a sample
# of independent values (a sample of runs varies more than that; an estimate that misses costs a second merge).
BRACKET_SIGMAS = 8.0
MAX_FINITE_KEY = 0x7F7FFFFF  # the float32 bits of the largest finite value


@dataclass(frozen=True)
class Sparsifier:
    """One sparsifying stage. Its per-model numbers (``density``, ``drop_rate``, ``gamma``, ``epsilon``) come
    from the tensor's job, so they may vary by model and by tensor."""

    kind: str  # random | magnitude | breadcrumbs | della
    rescale: str = "none"  # inverse | l1 | none
    scope: str = "tensor"  # magnitude only: global (one exact threshold per model over the whole model) | tensor
    convention: str = "paper"  # paper | mergekit: magnitude's trim count, breadcrumbs' cut

    @property
    def whole_tensor(self) -> bool:
        """True when a chunk's result depends on the rest of the tensor (a per-tensor sort or L1 norm)."""
        if self.kind == "magnitude":
            return self.scope == "tensor"
        return self.kind == "breadcrumbs" or self.rescale == "l1"


@dataclass(frozen=True)
class Recipe:
    sparsify: tuple[Sparsifier, ...] = ()
    consensus: str = "none"  # none | mass | count
    combine: str = "sum"  # sum | mean
    zero_sign: str = "paper"  # an element whose elected sign is 0: paper (majority sign) | mergekit (+1)
    lam: float = 1.0
    seed: int = 0

    def check(self, where: str) -> None:
        for stage in self.sparsify:
            if stage.kind not in SPARSIFIERS:
                raise ConfigError(f"{where}: unknown sparsifier {stage.kind!r} (one of {', '.join(SPARSIFIERS)})")
        if self.consensus not in CONSENSUS or self.combine not in COMBINE or self.zero_sign not in CONVENTIONS:
            raise ConfigError(f"{where}: consensus/combine/zero_sign {self.consensus}/{self.combine}/{self.zero_sign}")
        if self.global_stage() is not None and self.consensus == "count":
            raise ConfigError(f"{where}: consensus 'count' takes a per-tensor trim")

    def global_stage(self) -> int | None:
        """The index of the whole-model magnitude trim, if any (the passes see the stages before it)."""
        found = [i for i, s in enumerate(self.sparsify) if s.kind == "magnitude" and s.scope == "global"]
        return found[0] if found else None

    @property
    def deferred_sign(self) -> bool:
        """The paper's zero-sign rule over a whole-model trim: decided once every chunk is merged."""
        return self.global_stage() is not None and self.consensus != "none" and self.zero_sign == "paper"


class TaskVectorMerge(TaskVectorMethod):
    """A method that is a configuration of the generalized merge: it says its ``recipe()``; the rest is here.

    Registry row (class attributes): ``name``, ``Params`` (whose defaults are the method's), ``paper`` and
    ``mergekit_name`` (the mergekit ``merge_method`` it matches, None if mergekit lacks it).
    """

    paper: str | None = None
    mergekit_name: str | None = None

    def recipe(self) -> Recipe:
        raise NotImplementedError

    # --- planning -------------------------------------------------------------------------------
    def chunkable(self) -> bool:
        return not any(stage.whole_tensor for stage in self.recipe().sparsify)

    def initial_state(self, jobs):
        recipe = self.recipe()
        if recipe.global_stage() is None or not jobs:
            return {}
        per_task = {tuple(job.per_model["density"]) for job in jobs}
        if len(per_task) > 1:
            raise ConfigError("parameters.density: trim_scope 'global' needs one density per model for the whole "
                              "model; use trim_scope 'tensor' for densities that vary by tensor")
        densities = list(per_task.pop())
        for density in densities:
            require_number("models[].parameters", "density", density, 0.0, 1.0, lo_open=True)
        return {"densities": densities}

    def leaves_undecided(self, state):
        """The sampled trim (module docstring) where the compiled TIES loop takes every chunk (asked in the
        driver, which runs no loop: numba's presence, not an import of it and torch)."""
        recipe = self.recipe()
        if (not state or not self._ties_loop(recipe) or not compiled.buildable()
                or len(state["densities"]) > ORDERED_SUM_TASKS):
            return state
        return {**state, "sampled": True}

    def merge_again(self, state):
        if not state.get("missed"):
            return None
        return {"densities": state["densities"], "estimates": "missed: merged again from exact passes"}

    def samples(self, pass_name):
        return pass_name == SAMPLE_PASS

    def next_pass(self, state):
        if self.recipe().global_stage() is None or state.get("missed"):
            return None
        if state.get("sampled"):
            if "bracket" not in state:
                return SAMPLE_PASS
            if "below" not in state or "thresholds" in state:  # the merge first; then passes over its undecided
                return None
        if "high_bins" not in state:
            return "trim_high"
        if "thresholds" not in state:
            return "trim_low"
        return None

    # --- passes: exact whole-model magnitude thresholds by radix selection --------------------------
    def stats(self, pass_name, base, experts, job, offset, state):
        if pass_name in TRIM_PASSES and self.recipe().global_stage() is not None:
            return self.add_stats(None, pass_name, base, experts, job, offset, state)
        return super().stats(pass_name, base, experts, job, offset, state)

    def add_stats(self, totals, pass_name, base, experts, job, offset, state, memo=None):
        recipe = self.recipe()
        stop = recipe.global_stage()
        if pass_name not in TRIM_PASSES or stop is None:
            return super().add_stats(totals, pass_name, base, experts, job, offset, state, memo)
        totals = totals if totals is not None else _trim_totals(pass_name, len(experts))
        if pass_name == SAMPLE_PASS:
            base, experts = self._loop_inputs(base, experts)
            totals["sampled"] += ties_fused.sampled_high_histograms(base, experts, totals["hist"], totals["irregular"],
                                                                     offset)
            totals["numel"] += experts[0].numel()
            return totals
        keep = memo is not None and memo.accepting and pass_name == "trim_high"
        kept = None
        if stop == 0 and ties_fused.available(base, *experts, widening=self.widens_bfloat16):
            # The trim is the first stage: the same counts in one loop over the inputs, added in place.
            if pass_name == "trim_high":
                _, kept = ties_fused.high_histograms(base, experts, into=totals["hist"], keep=keep)
            else:
                ties_fused.low_histograms(base, experts, state["high_bins"], into=totals["hist"])
        else:
            base, experts = self._float32(base, experts)
            task_vector = self.sparsified(stack_task_vectors(base, experts), job, offset, state, recipe.sparsify[:stop])
            kept = _add_trim_counts(totals, pass_name, task_vector, state, keep)
        if pass_name == "trim_high":
            totals["numel"] += experts[0].numel()
            if kept is not None:
                memo.keep((job.name, offset), kept)
        return totals

    def stats_from_memo(self, totals, pass_name, job, offset, state, memo):
        """The second pass from the irregular keys the first kept: their low bits in the cut's bin."""
        if pass_name != "trim_low" or self.recipe().global_stage() is None:
            return None
        kept = memo.kept((job.name, offset))
        if kept is None:
            return None
        totals = totals if totals is not None else _trim_totals(pass_name, len(kept))
        for t, high_bin in enumerate(state["high_bins"]):
            if high_bin >= 0:
                ties_ops.low_histogram_of_keys(kept[t], high_bin, totals["hist"][t])
        return totals

    def finish_pass(self, pass_name, totals, state):
        state = dict(state)
        rule = self.recipe().sparsify[self.recipe().global_stage()].convention
        if pass_name == SAMPLE_PASS:
            numel, sampled = int(totals.get("numel", 0)), int(totals.get("sampled", 0))
            brackets, ranks, fixed = [], [], []
            for t, density in enumerate(state["densities"]):
                rank = ties_ops.trim_rank(numel, density, rule)
                if rank == 0 or rank > numel:  # keep all / keep none: no selection needed
                    brackets.append(None)
                    fixed.append(ties_ops.KEEP_ALL if rank == 0 else ties_ops.KEEP_NONE)
                else:
                    brackets.append(_bracket(totals["hist"][t], totals["irregular"][t], sampled, rank / numel))
                    fixed.append(None)
                ranks.append(rank)
            state.update(numel=numel, ranks=ranks, fixed=fixed, bracket=brackets,
                         estimates=["exact" if b is None else "guess" if b[0] == b[1] else "bracket" for b in brackets])
            if all(b is None for b in brackets):
                state["thresholds"] = fixed
            return state
        if pass_name == "trim_high" and state.get("sampled"):
            totals = totals or _trim_totals(pass_name, len(state["densities"]))  # nothing was left undecided
            return _within_brackets(totals["hist"], state)
        if pass_name == "trim_high":
            numel = int(totals["numel"])
            ranks, fixed = [], []
            for density in state["densities"]:
                rank = ties_ops.trim_rank(numel, density, rule)
                selects = 0 < rank <= numel  # else keep all / keep none: no selection needed
                ranks.append(rank if selects else None)
                fixed.append(None if selects else ties_ops.KEEP_ALL if rank == 0 else ties_ops.KEEP_NONE)
            state.update(numel=numel, fixed=fixed, **_located(totals["hist"], ranks))
            return state
        if pass_name == "trim_low":
            thresholds = []
            for t, b in enumerate(state["high_bins"]):
                if b < 0:
                    thresholds.append(state["fixed"][t])
                else:
                    # the second pass counts the irregular values only: the rest of the bin has low bits 0
                    low_counts = totals["hist"][t].clone()
                    low_counts[0] = state["in_bin"][t] - int(low_counts.sum())
                    low, _ = ties_ops.locate_rank(low_counts, state["ranks"][t])
                    thresholds.append(ties_ops.bits_to_value(b, low))
            state["thresholds"] = thresholds
            return state
        return super().finish_pass(pass_name, totals, state)

    def finish_merge(self, totals, state):
        """A sampled trim's estimates checked against the merge's counts: a guess that held is the threshold; a
        bracket that holds it leaves its rank among the undecided elements to the passes over them."""
        if not state.get("sampled") or "thresholds" in state:
            return state
        tasks = len(state["densities"])
        above, reached = (totals.get(key, torch.zeros(tasks, dtype=torch.int64)) for key in ("trim_above", "trim_reached"))
        brackets, fixed, below = list(state["bracket"]), list(state["fixed"]), [0] * tasks
        for t, bracket in enumerate(brackets):
            if bracket is None:
                continue
            below[t] = state["numel"] - int(reached[t])
            if not below[t] < state["ranks"][t] <= int(reached[t]) - int(above[t]) + below[t]:
                return {**state, "missed": True}
            if bracket[0] == bracket[1]:
                fixed[t], brackets[t] = _key_value(bracket[0]), None
        state = {**state, "bracket": brackets, "fixed": fixed, "below": below}
        if all(b is None for b in brackets):
            state["thresholds"] = fixed
        return state

    # --- the merge ------------------------------------------------------------------------------
    def merge(self, base, experts, job, offset, state):
        recipe = self.recipe()
        if state.get("sampled") and "thresholds" not in state:  # from the sample's estimates
            if not ties_fused.available():
                raise MergeError("TIES' sampled trim needs numba on every worker (the driver found it; this worker "
                                 "cannot import it): install numba on every node, or set DISTMERGE_COMPILED=0")
            base, experts = self._loop_inputs(base, experts)
            brackets = [None if b is None else (_key_value(b[0]), _key_value(b[1])) for b in state["bracket"]]
            zero_sign = _zero_sign(recipe, state)
            merged, vote, index, value, undecided, above, reached = ties_fused.merge_bracketed(
                base, experts, brackets, state["fixed"], job.weights, recipe.combine, recipe.lam, zero_sign)
            return ChunkResult(merged, deferred=_deferred(recipe, vote, index, value, zero_sign), undecided=undecided,
                               partial={"trim_above": above, "trim_reached": reached})
        if self._fused_ties(recipe, base, experts):
            zero_sign = _zero_sign(recipe, state)
            merged, vote, index, value = ties_fused.merge_deferred_sign(base, experts, state["thresholds"], job.weights,
                                                                        recipe.combine, recipe.lam, zero_sign)
            return ChunkResult(merged, deferred=_deferred(recipe, vote, index, value, zero_sign))
        if self._fused_dare(recipe, base, experts):
            return ChunkResult(self._dare_then_sum(recipe, base, experts, job, offset))
        if self._fused_sum(recipe, base, experts):
            return ChunkResult(dare_fused.weighted_sum(base, experts, job.weights, recipe.lam, recipe.combine == "mean"))
        if self._rounded_sum(recipe, base, experts):
            return ChunkResult(dare_fused.rounded_sum(base, experts, job.weights, recipe.lam, recipe.combine == "mean"))
        base, experts = self._float32(base, experts)
        # stack_task_vectors gives a fresh tensor: the stages may work on it in place
        trimmed = self.sparsified(stack_task_vectors(base, experts), job, offset, state, recipe.sparsify)
        return self.combined(recipe, base, trimmed, job.weights, state)

    widens_bfloat16 = False  # set on the copy ``with_bfloat16_inputs`` gives

    def with_bfloat16_inputs(self):
        recipe = self.recipe()
        if not ((self._ties_loop(recipe) and ties_fused.available()) or
                ((self._dare_loop(recipe) or self._sum_loop(recipe)) and dare_fused.available())):
            return None
        widening = copy.copy(self)
        widening.widens_bfloat16 = True
        return widening

    @staticmethod
    def _ties_loop(recipe: Recipe) -> bool:
        """TIES over a whole-model trim alone (the paper's TIES): one compiled loop does the chunk."""
        return recipe.global_stage() == 0 and len(recipe.sparsify) == 1 and recipe.consensus == "mass"

    @staticmethod
    def _dare_loop(recipe: Recipe) -> bool:
        """DARE then a plain (weighted) sum, with a rescale that does not depend on the values."""
        only_drop = len(recipe.sparsify) == 1 and recipe.sparsify[0].kind == "random"
        return only_drop and recipe.sparsify[0].rescale != "l1" and recipe.consensus == "none"

    @staticmethod
    def _sum_loop(recipe: Recipe) -> bool:
        """Task arithmetic: nothing sparsified, no consensus."""
        return not recipe.sparsify and recipe.consensus == "none"

    def _loops_take(self, loops, base, experts) -> bool:
        """Whether a fused module's merge loops (``ties_fused``, ``dare_fused``) take this chunk: a base, at most
        ORDERED_SUM_TASKS tasks (the loops sum them in torch's order; the trim passes count, in any order, and take
        every task count), and inputs of a dtype they take."""
        return (base is not None and len(experts) <= ORDERED_SUM_TASKS
                and loops.available(base, *experts, widening=self.widens_bfloat16))

    def _fused_ties(self, recipe: Recipe, base, experts) -> bool:
        return self._ties_loop(recipe) and self._loops_take(ties_fused, base, experts)

    def _fused_dare(self, recipe: Recipe, base, experts) -> bool:
        return self._dare_loop(recipe) and self._loops_take(dare_fused, base, experts)

    def _fused_sum(self, recipe: Recipe, base, experts) -> bool:
        return self._sum_loop(recipe) and self._loops_take(dare_fused, base, experts)

    def _rounded_sum(self, recipe: Recipe, base, experts) -> bool:
        """Task arithmetic computed in bfloat16 (inputs handed over as bfloat16, not to widen)."""
        return (self._sum_loop(recipe) and base is not None and len(experts) <= ORDERED_SUM_TASKS
                and not self.widens_bfloat16 and dare_fused.rounds_bfloat16(base, *experts))

    def _loop_inputs(self, base, experts):
        """The chunk as the TIES loop takes it (a sampled trim runs every chunk through it): as read where it
        can, else widened to float32 on the CPU (the same values, so the same bits)."""
        if ties_fused.available(base, *experts, widening=self.widens_bfloat16):
            return base, experts
        loop_input = (lambda t: t.to("cpu", torch.float32).contiguous())
        return loop_input(base), [loop_input(e) for e in experts]

    def _float32(self, base, experts):
        """The inputs for the torch formulation: widened where this copy was handed bfloat16 to widen itself
        (a chunk no loop can take)."""
        if not self.widens_bfloat16:
            return base, experts
        widen = (lambda t: t.float() if t is not None and t.dtype == torch.bfloat16 else t)
        return widen(base), [widen(e) for e in experts]

    @staticmethod
    def _dare_then_sum(recipe: Recipe, base, experts, job, offset: int) -> torch.Tensor:
        """``_random`` then ``task_arithmetic`` in one compiled loop, from the same mask words."""
        stop = offset + base.numel()
        rates = job.per_model["drop_rate"]
        words = [dare_ops.stream_words_ahead(recipe.seed, model, job.name, job.numel, offset, stop)
                 for model in job.model_names]
        return dare_fused.drop_and_sum(base, experts, words, [dare_ops.drop_threshold(r) for r in rates],
                                       [dare_ops.inverse_scale(r, recipe.sparsify[0].rescale) for r in rates],
                                       job.weights, recipe.lam, recipe.combine == "mean")

    def sparsified(self, task_vector: torch.Tensor, job, offset: int, state: dict,
                   stages: tuple[Sparsifier, ...]) -> torch.Tensor:
        for stage in stages:
            task_vector = SPARSIFY[stage.kind](self, stage, task_vector, job, offset, state)
        return task_vector

    def combined(self, recipe: Recipe, base: torch.Tensor, trimmed: torch.Tensor, weights, state: dict) -> ChunkResult:
        lam = recipe.lam
        if recipe.consensus == "none":
            return ChunkResult(task_arithmetic(base, trimmed, weights, lam, recipe.combine == "mean"))
        if recipe.deferred_sign:
            # The zero-sign rule needs the model-wide majority sign, known only after every chunk is merged:
            # merge with the sign the vote so far leans to and hand back the elements that the other would change.
            zero_sign = _zero_sign(recipe, state)
            delta, sign_sum, index, alternative = ties_ops.merge_deferred_sign(trimmed, weights, recipe.combine,
                                                                               zero_sign)
            flat_base = base.reshape(-1)
            return ChunkResult(base + lam * delta,
                               deferred=_deferred(recipe, sign_sum, index, flat_base[index] + lam * alternative,
                                                  zero_sign))
        zero_sign = 1.0 if recipe.zero_sign == "mergekit" else None
        if recipe.consensus == "count":
            delta = count_consensus(trimmed, weights, zero_sign, recipe.combine)
        else:
            delta = ties_ops.merge_trimmed(trimmed, weights, zero_sign, recipe.combine)
        return ChunkResult(base + lam * delta)

    # --- deferred decisions and reporting ---------------------------------------------------------
    def deferred_outcome(self, vote):
        """The sign zero signs take: the majority of the elected signs (the vote), where a majority of 0 acts
        as -1 (it selects the negative values)."""
        if not self.recipe().deferred_sign:
            return None
        return 1 if vote > 0 else -1

    def settle_deferred(self, state, vote):
        return {**state, "sign_sum": vote}, self.deferred_outcome(vote)

    def record_settled(self, state, count):
        # the card counts the elements the rule set otherwise than mergekit's +1, however they were merged
        return {**state, "patched_elements": count if self.deferred_outcome(state["sign_sum"]) < 0 else 0}

    def describe(self, state):
        if "thresholds" not in state:
            return {}
        out = {"trim_thresholds": [float(x) for x in state["thresholds"]], "trimmed_values": state.get("numel")}
        if "estimates" in state:  # how the merge started: from a sample's estimates, or exact passes after a miss
            out["trim_estimates"] = state["estimates"]
        if "sign_sum" in state and self.recipe().deferred_sign:
            out["majority_sign"] = _sign(state["sign_sum"])
            out["patched_elements"] = state.get("patched_elements", 0)
        return out


def _trim_totals(pass_name: str, tasks: int) -> dict:
    hist = torch.zeros((tasks, ties_ops.HIGH_BINS), dtype=torch.int64)
    if pass_name == SAMPLE_PASS:
        return {"hist": hist, "irregular": torch.zeros_like(hist), "numel": 0, "sampled": 0}
    return {"hist": hist, "numel": 0} if pass_name == "trim_high" else {"hist": hist}


def _bracket(hist: torch.Tensor, irregular: torch.Tensor, sampled: int, fraction: float) -> list[int]:
    """The estimate of the value of ascending rank ``fraction`` of the model, from the high histogram of a sample
    of ``sampled`` of its values (``irregular``: of those with nonzero low bits), as float32 bits [low, high]:
    a guess (low == high) where the ranks it may have in the sample all fall on one bin's regular values (all
    equal), else a bracket of whole bins."""
    if sampled == 0:
        return [0, MAX_FINITE_KEY]
    spread = BRACKET_SIGMAS * math.sqrt(sampled * fraction * (1.0 - fraction)) + 1.0
    low_rank, high_rank = math.floor(fraction * sampled - spread), math.ceil(fraction * sampled + spread)
    if low_rank < 1 or high_rank > sampled:
        low = 0 if low_rank < 1 else ties_ops.locate_rank(hist, low_rank)[0] << 16
        high = MAX_FINITE_KEY if high_rank > sampled else (ties_ops.locate_rank(hist, high_rank)[0] << 16) | ties_ops.LOW_MASK
        return [low, min(high, MAX_FINITE_KEY)]
    (low_bin, low_within), (high_bin, high_within) = (ties_ops.locate_rank(hist, r) for r in (low_rank, high_rank))
    if low_bin == high_bin and high_within <= int(hist[low_bin]) - int(irregular[low_bin]):
        return [low_bin << 16, low_bin << 16]  # a bin's regular values come first: its lowest value
    return [low_bin << 16, min((high_bin << 16) | ties_ops.LOW_MASK, MAX_FINITE_KEY)]


def _key_value(key: int) -> float:
    return ties_ops.bits_to_value(key >> 16, key & ties_ops.LOW_MASK)


def _within_brackets(hist: torch.Tensor, state: dict) -> dict:
    """``finish_pass('trim_high')`` of a sampled trim, over the undecided elements: each bracketed threshold's
    rank among them (every value inside a bracket is an undecided element's; the merge counted those below)."""
    # ranks among the undecided elements: theirs below the bracket (other tasks' undecided ones) come first
    ranks = [None if bracket is None else state["ranks"][t] - state["below"][t] + int(hist[t][:bracket[0] >> 16].sum())
             for t, bracket in enumerate(state["bracket"])]
    return {**state, **_located(hist, ranks)}


def _located(hist: torch.Tensor, ranks: list[int | None]) -> dict[str, list[int]]:
    """Where each task's rank falls in its high histogram: {high_bins, ranks (within the bin), in_bin (the
    bin's count)}; a task without a rank (None: nothing to select) gets bin -1."""
    located = {"high_bins": [], "ranks": [], "in_bin": []}
    for t, rank in enumerate(ranks):
        bin_index, within = ties_ops.locate_rank(hist[t], rank) if rank is not None else (-1, 0)
        located["high_bins"].append(bin_index)
        located["ranks"].append(within)
        located["in_bin"].append(int(hist[t][bin_index]) if rank is not None else 0)
    return located


def _add_trim_counts(totals: dict, pass_name: str, task_vector: torch.Tensor, state: dict,
                     keep: bool) -> list[torch.Tensor] | None:
    """The torch formulation of a trim pass's counts, added into ``totals``; with ``keep``, the first pass's
    irregular keys of each task (what the second pass needs)."""
    kept: list[torch.Tensor] | None = [] if keep else None
    for t in range(task_vector.shape[0]):
        if pass_name == "trim_high":
            totals["hist"][t] += ties_ops.radix_high_histogram(task_vector[t])
            if kept is not None:
                kept.append(ties_ops.radix_irregular_keys(task_vector[t]))
        elif state["high_bins"][t] >= 0:
            low = ties_ops.radix_low_histogram(task_vector[t], state["high_bins"][t])
            low[0] = 0  # the regular values: the first pass counted them
            totals["hist"][t] += low
    return kept


# --- the sparsifiers: (method, stage, stacked task vectors, job, chunk offset, state) -> stacked ------------


def _random(method, stage: Sparsifier, task_vector, job, offset, state):
    """DARE: drop with the model's drop_rate, rescale kept entries (in place on the fresh stack)."""
    seed = method.recipe().seed
    stop = offset + task_vector[0].numel()
    for t, model in enumerate(job.model_names):
        rate = job.per_model["drop_rate"][t]
        if stage.rescale == "l1":  # the factor depends on the values
            keep = dare_ops.keep_mask(rate, seed, model, job.name, job.numel, offset, stop)
            task_vector[t] = dare_ops.drop_and_rescale(task_vector[t], keep, rate, "l1")
            continue
        scale = dare_ops.keep_scale(rate, dare_ops.inverse_scale(rate, stage.rescale), seed, model, job.name,
                                    job.numel, offset, stop)
        task_vector[t].mul_(scale.to(task_vector.device).reshape(task_vector[t].shape))
    return task_vector


def _magnitude(method, stage: Sparsifier, task_vector, job, offset, state):
    """TIES' trim: keep the density largest |tau| of each model, per tensor or over the whole model."""
    if stage.scope == "global":
        return ties_ops.trim(task_vector, state["thresholds"])
    densities = job.per_model["density"]
    if stage.convention == "mergekit":
        trimmed = torch.stack([task_vector[t] * ties_ops.mergekit_magnitude_mask(task_vector[t], d)
                               for t, d in enumerate(densities)])
    else:
        thresholds = [ties_ops.magnitude_threshold(task_vector[t], d) for t, d in enumerate(densities)]
        trimmed = ties_ops.trim(task_vector, thresholds)
    if stage.rescale == "l1":
        trimmed = torch.stack([ties_ops.l1_rescale(trimmed[t], task_vector[t]) for t in range(trimmed.shape[0])])
    return trimmed


def _breadcrumbs(method, stage: Sparsifier, task_vector, job, offset, state):
    """Drop the gamma largest |tau| and the smallest, keep density (per tensor)."""
    density, gamma = job.per_model["density"], job.per_model["gamma"]
    outlier_mask = _mergekit_outlier_mask if stage.convention == "mergekit" else _native_outlier_mask
    count = task_vector.shape[0]

    def keep(t):
        return outlier_mask(task_vector[t], density[t], gamma[t], job.name, job.model_names[t])

    if stage.rescale == "l1":
        return torch.stack([sparsify_ops.masked_l1_rescale(task_vector[t], keep(t)) for t in range(count)])
    for t in range(count):  # in place on the fresh stack (x * False: -0 for negative x, as before)
        task_vector[t].mul_(keep(t))
    return task_vector


def _native_outlier_mask(values, density, gamma, tensor, model):
    try:
        return sparsify_ops.outlier_mask(values, density, gamma)
    except ValueError as exc:
        raise ConfigError(f"tensor '{tensor}', model '{model}': {exc}") from None


def _mergekit_outlier_mask(values, density, gamma, tensor, model):
    return sparsify_ops.mergekit_outlier_mask(values, density, gamma)


def _della(method, stage: Sparsifier, task_vector, job, offset, state):
    """MagPrune: Bernoulli keep with rank-based probabilities per row, counter-based draw, rescale."""
    seed = method.recipe().seed
    density, epsilon = job.per_model["density"], job.per_model["epsilon"]
    out = []
    for t, model in enumerate(job.model_names):
        try:
            out.append(sparsify_ops.della_prune(task_vector[t], density[t], epsilon[t], stage.rescale, seed, model,
                                                job.name, job.numel, offset))
        except ValueError as exc:
            raise ConfigError(f"tensor '{job.name}', model '{model}': {exc}") from None
    return torch.stack(out)


SPARSIFY = {"random": _random, "magnitude": _magnitude, "breadcrumbs": _breadcrumbs, "della": _della}


def count_consensus(trimmed: torch.Tensor, weights, zero_sign: float | None, combine: str) -> torch.Tensor:
    """Keep the values whose sign is the majority of the models' signs (mergekit's ``count``), then combine as
    TIES' disjoint merge does (``mean``: over the summed weights of the agreeing models)."""
    weighted = trimmed if all(w == 1.0 for w in weights) else trimmed * broadcast_weights(weights, trimmed)
    sign = torch.sign(weighted.sign().sum(dim=0))
    if zero_sign is None:
        zero_sign = ties_ops.majority_sign(sign)
    return ties_ops.disjoint_merge(weighted, weights, sign, zero_sign, combine)


def _zero_sign(recipe: Recipe, state: dict) -> int:
    """The sign a chunk takes for its zero signs: mergekit's +1, or (the paper's majority rule, deferred) the
    majority the vote seen so far leans to."""
    return state.get(LEANING, 1) if recipe.deferred_sign else 1


def _deferred(recipe: Recipe, vote: int, index, value, zero_sign: int) -> Deferred | None:
    # without the paper's zero-sign rule, zero signs are +1: the merge as it stands
    return Deferred(vote, index, value, zero_sign) if recipe.deferred_sign else None


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


__all__ = ["COMBINE", "CONSENSUS", "SPARSIFIERS", "Recipe", "Sparsifier", "TaskVectorMerge", "count_consensus"]
