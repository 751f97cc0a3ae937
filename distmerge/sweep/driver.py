"""``run_sweep``: validate, start the holders, run (or resume) the Tune experiment, write the outputs.

```
sweep.yaml -> spec (spaces, tasks, search) -> every space's end values checked against the merge config
  holders x N (Ray actors): read their layer groups from every input once, keep them for the sweep
  Tune trials (run_trial): trial config -> passes + merge on the holders -> state dict through the
     object store -> model in memory -> evaluation in parts, one tune.report per part (ASHA)
  -> results.csv/.parquet, best.yaml, metric_vs_<param>.png, summary.json, tune/ (TensorBoard logs)
  -> --materialize-best: the engine merges best.yaml into best_model/
```
A Twin-Merging sweep (a twin.yaml with a sweep: section) builds first and has no holders: ``distmerge.sweep.twin``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmerge.errors import ConfigError, DistmergeError, OutputError
from distmerge.io import model_files, writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.lora import open_checkpoint
from distmerge.sweep import outputs
from distmerge.sweep.spec import SweepSpec, load_sweep
from distmerge.tensors import resolve_tensors

EXPERIMENT = "sweep"
TUNE_FOLDER = "tune"  # Tune's experiment (its state is pickle): a 0700 folder of this user, checked before use
EVALUATOR_TASK_CPUS = 0.5  # the evaluator's prepare and score tasks (0.25 each) beside its model actors
STATE_FILE = "sweep_state.json"


class SweepError(DistmergeError):
    """The sweep ran but cannot give a result (every trial failed)."""


@dataclass
class SweepResult:
    out: Path
    metric: str
    mode: str
    params: tuple[str, ...]  # the searched parameters, as named in rows and best
    rows: list[dict[str, Any]]  # one per trial, best first (see distmerge.sweep.outputs)
    best: dict[str, Any] | None  # the best fully evaluated trial's row
    best_config: Path | None
    interrupted: bool
    remaining: int  # trials of the search not yet run to an end (finished, stopped early or failed)
    holder_reports: list[dict[str, Any]] = field(default_factory=list)
    best_model: Path | None = None

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)

    @property
    def trials_merged_here(self) -> int:
        """Trials whose tensors this run's holders merged (a resumed run: the remaining trials only)."""
        return max((r["merges_served"] for r in self.holder_reports), default=0)

    def summary(self) -> str:
        parts = [f"{self.count(outputs.FINISHED)} finished", f"{self.count(outputs.STOPPED)} stopped early",
                 f"{self.count(outputs.FAILED)} failed"]
        text = f"sweep in {self.out}: {len(self.rows)} trial(s), " + ", ".join(parts)
        if self.interrupted:
            text += f"; interrupted with {self.remaining} left (continue with --resume)"
        if self.best is not None:
            params = ", ".join(f"{k}={self.best[k]}" for k in self.params)
            text += (f"\nbest {self.metric} = {self.best[self.metric]:.6g} ({self.mode}) at {params} "
                     f"-> {self.best_config}")
        if self.best_model is not None:
            text += f"\nbest model merged into {self.best_model}"
        return text


def run_sweep(source: str | Path | dict, out: str | Path, *, address: str | None = None, resume: bool = False,
              materialize_best: bool = False, progress: bool = True, callbacks: list | None = None) -> SweepResult:
    """Search the merge parameters a sweep file names. Same as ``distmerge sweep``.

    ``callbacks``: extra ``ray.tune.Callback`` objects (MLflow, W&B, ...). Tune saves them with the
    experiment, so a resumed sweep runs the ones of its first run.
    """
    spec = load_sweep(source)
    out = Path(out).expanduser().resolve()
    if spec.is_twin:  # one twin build per shared value, then Tune trials over (shared values, rank)
        from distmerge.sweep.twin import run_twin_sweep

        return run_twin_sweep(spec, out, address=address, resume=resume, materialize_best=materialize_best,
                              progress=progress, callbacks=list(callbacks or []))
    experiment = out / TUNE_FOLDER / EXPERIMENT
    _check_out(spec, out, experiment, resume)
    base = Checkpoint(spec.merge["base_model"], "base") if spec.merge.get("base_model") else None
    template = spec.trial_config(spec.corner_values())
    experts = [open_checkpoint(m.model, m.name) for m in template.models]
    template.build_method().check_models({m.name: c for m, c in zip(template.models, experts)})
    outputs_, vocab_plan, _ = resolve_tensors(template, base, experts)
    check_space(spec, base, experts)
    files = _model_files(template, base, experts, vocab_plan)
    _make_sweep_folders(out)
    writer.write_json(out / STATE_FILE, spec.fingerprint())

    from distmerge.engine.ray_session import ray_session

    with ray_session(address):
        result = _run_on_ray(spec, out, experiment, resume, base, experts, template, outputs_, files, progress,
                             list(callbacks or []))
        if materialize_best and result.best_config is not None and not result.interrupted:
            from distmerge.engine.driver import merge

            target = out / "best_model"
            merge(result.best_config, target, force=True, progress=progress)
            result.best_model = target
    if result.best is None and not result.interrupted:
        errors = [r["error"] for r in result.rows if r["error"]]
        first = f" (first error: {errors[0]})" if errors else ""
        raise SweepError(f"no trial was fully evaluated{first}; see {out / 'results.csv'}")
    return result


def _check_private(out: Path) -> None:
    """Tune restores its experiment, and reads it for the results, with pickle: only from folders no one
    else could have written. ``out`` must not be writable by others (who could swap the Tune folder), and
    the Tune folder must be this user's own."""
    from distmerge.engine.resume import check_private_folder

    check_private_folder(out, "sweep folder", remedy="make it writable by you only (chmod go-w) or choose "
                                                      "another --out")
    if os.path.lexists(out / TUNE_FOLDER):
        check_private_folder(out / TUNE_FOLDER, "sweep's Tune folder", remedy="remove the sweep folder and "
                                                                                "start the sweep again")


def _make_sweep_folders(out: Path) -> None:
    from distmerge.engine.resume import make_private_folder

    if not os.path.lexists(out):
        try:
            out.mkdir(parents=True)
            out.chmod(out.stat().st_mode & ~0o022)
        except OSError as exc:
            raise OutputError(f"cannot create '{out}': {exc.strerror or exc}") from None
    _check_private(out)
    make_private_folder(out / TUNE_FOLDER, "sweep's Tune folder")


def _check_out(spec: SweepSpec, out: Path, experiment: Path, resume: bool) -> None:
    if os.path.lexists(out):
        _check_private(out)
    if resume:
        from ray.tune import Tuner

        if not Tuner.can_restore(str(experiment)):
            raise OutputError(f"'{out}' holds no sweep to resume (no Tune experiment in {experiment})")
        try:
            saved = json.loads((out / STATE_FILE).read_text())
        except (OSError, ValueError):
            raise OutputError(f"'{out / STATE_FILE}' is missing or unreadable; cannot check that the sweep "
                              "config is the one being resumed") from None
        now = spec.fingerprint()
        if saved != now:
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ConfigError(f"--resume: the sweep config differs from the one that started '{out}' "
                              f"(changed: {', '.join(changed)}); a resumed search must keep its space and scoring")
    elif experiment.exists():
        raise OutputError(f"'{out}' already holds a sweep; pass --resume to continue it, or choose another --out")


def check_space(spec: SweepSpec, base: Checkpoint | None, experts: list[Checkpoint]) -> None:
    """Every end value of every space through the merge's validation (the others at their first value), so
    that a value the merge would refuse fails the sweep now, not a trial later."""
    for space in spec.spaces:
        for value in space.corners():
            values = {**spec.corner_values(), space.name: value}
            try:
                config = spec.trial_config(values)
                method = config.build_method()
                found, _, _ = resolve_tensors(config, base, experts)
                method.initial_state([o.job for o in found if o.merged])
            except ConfigError as exc:
                raise ConfigError(f"{space.where}: the search space allows {value!r}, which the merge rejects: "
                                  f"{exc}") from None


def _model_files(config, base, experts, vocab_plan) -> dict[str, bytes]:
    """config.json (vocabulary patched) and the tokenizer, as the engine writes them next to a merge."""
    reference = base if base is not None else experts[0]
    with tempfile.TemporaryDirectory(prefix="distmerge-sweep-files-") as folder:
        staging = Path(folder)
        model_files.write_config_json(staging, reference, vocab_plan, config.out_dtype)
        model_files.write_tokenizer(staging, config, base, experts, vocab_plan)
        if not (staging / "config.json").exists():
            raise ConfigError(f"base_model: '{reference.source}' has no config.json; a sweep builds the merged "
                              "model from it to evaluate")
        return {p.name: p.read_bytes() for p in staging.iterdir() if p.is_file()}


def _run_on_ray(spec: SweepSpec, out: Path, experiment: Path, resume: bool, base, experts, template, outputs_,
                files, progress: bool, callbacks: list) -> SweepResult:
    import ray
    from ray import tune

    from distmerge.engine.ray_session import cluster_cpus
    from distmerge.engine.ray_session import get as _get
    from distmerge.sweep.holders import start_holders
    from distmerge.sweep.trial import SweepContext, run_trial

    method = template.build_method()
    holders, holder_tensors = start_holders(base, experts, outputs_, method.needs_base, template.dtype,
                                            spec.holders, spec.holder_cpus)
    try:
        max_concurrent = concurrency(spec, cluster_cpus() - spec.holder_cpus * len(holders))
        _get([h.load.remote() for h in holders])
        context = SweepContext(spec=spec, base=base, experts=experts, holders=holders,
                               holder_tensors=holder_tensors, copied_refs=[h.copied.remote() for h in holders],
                               model_files=files)
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), spec.resources_per_trial)
        if resume:
            _check_private(out)  # again, just before Tune unpickles: the holders took a while to load
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(trainable, param_space=spec.param_space(),
                               tune_config=_tune_config(spec, max_concurrent),
                               run_config=_run_config(spec, out, progress, callbacks))
        tuner.fit()
        reports = _get([h.report.remote() for h in holders])
    finally:
        for holder in holders:
            ray.kill(holder)
    return _write_outputs(spec, out, experiment, reports)


def concurrency(spec: SweepSpec, spare_cpus: float) -> int | None:
    """How many trials may run at once beside the holders. A trial of ``type: eval`` tasks also needs the
    evaluator's model actors and its light Ray Data tasks; trials that took every CPU would leave those
    waiting forever, so concurrency is capped to what fits."""
    per_trial = spec.resources_per_trial["cpu"]
    evaluator = max((t.workers * t.cpus_per_worker + EVALUATOR_TASK_CPUS for t in spec.tasks if t.type == "eval"),
                    default=0.0)
    if per_trial + evaluator > spare_cpus + 1e-9:
        detail = f" + {evaluator:g} for the evaluator's actors and tasks" if evaluator else ""
        raise ConfigError(f"sweep.resources_per_trial.cpu: a trial needs {per_trial:g} CPU(s){detail}, but the cluster "
                          f"has {spare_cpus:g} left beside the holders (sweep.holders x sweep.holder_cpus)")
    if not evaluator:
        return spec.max_concurrent_trials
    fits = max(1, int((spare_cpus + 1e-9) // (per_trial + evaluator)))
    return min(fits, spec.max_concurrent_trials or fits)


def _tune_config(spec: SweepSpec, max_concurrent: int | None):
    from ray import tune

    search_alg = None
    if spec.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=spec.seed)
    elif spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.seed)
    scheduler = None
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.eval_chunks,
                                  grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=search_alg, scheduler=scheduler,
                           num_samples=spec.num_samples, max_concurrent_trials=max_concurrent,
                           trial_dirname_creator=trial_dirname,
                           # A trial process keeps its imports, tokenizer and unmerged tensors for the next trial.
                           reuse_actors=True)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _run_config(spec: SweepSpec, out: Path, progress: bool, callbacks: list):
    from ray import tune

    from distmerge.sweep.progress import BestTrialsTable

    if progress:
        callbacks = [BestTrialsTable(spec.metric, spec.mode, spec.param_names, spec.eval_chunks), *callbacks]
    # A failed trial is reported in the table and not retried; the others go on.
    return tune.RunConfig(name=EXPERIMENT, storage_path=str(out / TUNE_FOLDER), verbose=0, callbacks=callbacks,
                          failure_config=tune.FailureConfig(max_failures=0, fail_fast=False))


def _write_outputs(spec: SweepSpec, out: Path, experiment: Path, reports: list[dict]) -> SweepResult:
    from ray.tune import ExperimentAnalysis

    _check_private(out)  # the analysis unpickles the trials
    trials = ExperimentAnalysis(str(experiment), default_metric=spec.metric, default_mode=spec.mode).trials
    rows = outputs.trial_rows(spec, trials)
    outputs.write_table(rows, out)
    outputs.write_plots(spec, rows, out)
    best = outputs.best_row(spec, rows)
    best_config = outputs.write_best_yaml(spec, best, out) if best is not None else None
    # Tune creates trials as it goes: after an interruption the ones not started yet are not in the table.
    remaining = spec.total_trials - sum(1 for r in rows if r["status"] != outputs.NOT_RUN)
    interrupted = remaining > 0
    summary = {"metric": spec.metric, "mode": spec.mode, "trials": len(rows), "interrupted": interrupted,
               "remaining": remaining, "best": best, "holders": reports}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return SweepResult(out=out, metric=spec.metric, mode=spec.mode, params=spec.param_names, rows=rows, best=best,
                       best_config=best_config, interrupted=interrupted, remaining=remaining, holder_reports=reports)
