"""Twin-Merging sweeps: the shared merge's parameters (lambda) and the exclusive parts' rank, on Ray Tune.

θ* changes with the shared merge's parameters, and with it every exclusive part θ_t − θ* and the router's
features, so each combination of shared values is one twin build (``distmerge.twin.build``, on the sweep's Ray),
made on the driver before the search, at the largest rank the search can ask for. A rank is then read from
that build (``twin.load(folder, rank=r)``: the first r directions of each stored part, which is what a build at
rank r stores with an exact SVD, and with a randomized one at exclusive.oversample + R - r: the same sketch, so
best.yaml holds that oversampling). The trials are Tune trials over (shared values, rank), scored by the sweep's own
objectives on the routed model, so the results table, best.yaml (a twin.yaml), ASHA and --resume are the merge
sweeps'.

```
OUT/builds/build-N/        one twin folder per combination of shared values (builds.json says which)
OUT/builds/views/          rank views of a build for ``type: eval`` tasks (twin.json with exclusive.load_rank and
                           twin_report.json at that rank, every other entry a link into the build)
OUT/best_model/            --materialize-best: the best build at the best rank (``twin.task.copy_at_rank``)
```

The builds are read from the driver's disk: trials run on the nodes that see OUT (one machine, or a shared
filesystem).
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge.errors import OutputError
from distmerge.io import writer
from distmerge.sweep.spec import SweepSpec, plain_value

BUILDS = "builds"
BUILDS_JSON = "builds.json"
VIEWS = "views"
RANK = "rank"  # the name of exclusive.rank's space
TWIN_KINDS = {"causal_lm": "causal", "sequence_classification": "classify"}  # objectives' kinds -> twin.load's


def build_spaces(spec: SweepSpec) -> list:
    return [s for s in spec.spaces if s.name != RANK]


def build_values(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the shared merge's searched values: one twin build each."""
    spaces = build_spaces(spec)
    return [dict(zip((s.name for s in spaces), combo)) for combo in itertools.product(*(s.args for s in spaces))]


def largest_rank(spec: SweepSpec) -> int | None:
    """The rank the builds store: the largest the search can ask for (None: exclusive.rank is not searched)."""
    space = next((s for s in spec.spaces if s.name == RANK), None)
    return None if space is None else max(space.corners())


def build_key(spec: SweepSpec, values: dict[str, Any]) -> str:
    return json.dumps([plain_value(values[s.name]) for s in build_spaces(spec)])


@dataclass
class TwinContext:
    """What every Twin trial needs (``tune.with_parameters``): the builds by their shared values."""

    spec: SweepSpec
    builds: dict[str, str]  # build_key -> twin folder
    tokenizer: str | None  # router.tokenizer, when the base's does not serve


def run_twin_sweep(spec: SweepSpec, out: Path, *, address: str | None, resume: bool, materialize_best: bool,
                   progress: bool, callbacks: list):
    from distmerge.engine.ray_session import ray_session
    from distmerge.sweep import driver

    experiment = out / driver.TUNE_FOLDER / driver.EXPERIMENT
    driver._check_out(spec, out, experiment, resume)
    template = spec.trial_config(spec.corner_values())  # the files named by the config are checked here
    driver._make_sweep_folders(out)
    writer.write_json(out / driver.STATE_FILE, spec.fingerprint())
    with ray_session(address):
        builds = make_builds(spec, out, resume, progress)
        result = _tune(spec, out, experiment, resume, builds, template.router.tokenizer, progress, callbacks)
        if materialize_best and result.best is not None and not result.interrupted:
            from distmerge.twin.task import copy_at_rank

            values = {name: result.best[name] for name in spec.param_names}
            result.best_model = copy_at_rank(builds[build_key(spec, values)], values.get(RANK),
                                             out / "best_model", force=True)
    if result.best is None and not result.interrupted:
        errors = [r["error"] for r in result.rows if r["error"]]
        first = f" (first error: {errors[0]})" if errors else ""
        raise driver.SweepError(f"no trial was fully evaluated{first}; see {out / 'results.csv'}")
    return result


def make_builds(spec: SweepSpec, out: Path, resume: bool, progress: bool) -> dict[str, str]:
    """One twin build per combination of shared values, at the largest rank; a resumed sweep keeps the builds
    its first run completed (the config is the same: ``--resume`` checked its fingerprint)."""
    from distmerge.twin import build
    from distmerge.twin.folder import is_twin_folder

    root = out / BUILDS
    root.mkdir(exist_ok=True)
    rank = largest_rank(spec)
    builds, records = {}, []
    for i, values in enumerate(build_values(spec)):
        folder = root / f"build-{i}"
        record = {"values": values, "folder": str(folder.relative_to(out)), "rank": rank}
        if not (resume and is_twin_folder(folder)):
            began = time.perf_counter()
            config = spec.trial_dict({**values, **({RANK: rank} if rank is not None else {})})
            built = build(config, folder, workers=spec.build_workers, force=True, progress=progress)
            record.update(seconds=round(time.perf_counter() - began, 3), factor_bytes=built.factor_bytes,
                          router=built.router)
        records.append(record)
        builds[build_key(spec, values)] = str(folder)
    writer.write_json(root / BUILDS_JSON, records)
    return builds


def _tune(spec: SweepSpec, out: Path, experiment: Path, resume: bool, builds: dict[str, str], tokenizer,
          progress: bool, callbacks: list):
    from ray import tune

    from distmerge.engine.ray_session import cluster_cpus
    from distmerge.sweep import driver

    context = TwinContext(spec=spec, builds=builds, tokenizer=tokenizer)
    trainable = tune.with_resources(tune.with_parameters(run_twin_trial, context=context), spec.resources_per_trial)
    if resume:
        driver._check_private(out)  # just before Tune unpickles
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(trainable, param_space=spec.param_space(),
                           tune_config=driver._tune_config(spec, driver.concurrency(spec, cluster_cpus())),
                           run_config=driver._run_config(spec, out, progress, callbacks))
    tuner.fit()
    return driver._write_outputs(spec, out, experiment, [])


def run_twin_trial(config: dict[str, Any], context: TwinContext) -> None:
    """Tune's function trainable for one (shared values, rank): the routed model of its build at its rank,
    scored as any trial's model."""
    import torch
    from ray import tune

    from distmerge import telemetry
    from distmerge.evaluate.models import ModelSource, load_tokenizer
    from distmerge.sweep.objectives import evaluate_in_parts
    from distmerge.twin import load

    began = time.perf_counter()
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    device = "cuda" if resources.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
    spec = context.spec
    values = {name: plain_value(config[name]) for name in spec.param_names}
    folder = context.builds[build_key(spec, values)]
    rank = values.get(RANK)
    tokenizer = load_tokenizer(ModelSource(path=folder, tokenizer=context.tokenizer), "right")
    models: dict[str, Any] = {}

    def model(kind: str, task):
        if kind not in models:
            models[kind] = load(folder, kind=TWIN_KINDS[kind], device=device, dtype=torch.float32, rank=rank)
        return models[kind]

    def eval_source(task):
        return ModelSource(path=rank_view(folder, rank), tokenizer=context.tokenizer or folder)

    load_seconds = time.perf_counter() - began
    eval_began = time.perf_counter()
    for part, metrics in enumerate(evaluate_in_parts(model, tokenizer, spec.tasks, spec.eval_chunks, eval_source), 1):
        # merge_seconds: the trial's setup before scoring (a Twin trial merges nothing; its build came first)
        tune.report({**metrics, "merge_seconds": round(load_seconds, 3),
                     "eval_seconds": round(time.perf_counter() - eval_began, 3), "eval_parts": part})
    telemetry.count("distmerge_trials_finished")


def rank_view(folder: str | Path, rank: int | None) -> str:
    """A twin folder the evaluator's actors load at ``rank``: twin.json with ``exclusive.load_rank``, every other
    entry a link into the build (made once, atomically: trials running at once may ask for the same view)."""
    folder = Path(folder)
    if rank is None:
        return str(folder)
    view = folder.parent / VIEWS / f"{folder.name}-rank-{rank}"
    if view.is_dir():
        return str(view)
    from distmerge.twin.folder import REPORT, TWIN_JSON
    from distmerge.twin.task import report_at_rank

    view.parent.mkdir(exist_ok=True)
    staging = view.parent / f".{view.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        report = report_at_rank(folder, int(rank))  # the view's own: the build's describes its own rank
        for entry in folder.iterdir():
            if entry.name != TWIN_JSON and not (entry.name == REPORT and report is not None):
                os.symlink(entry.resolve(), staging / entry.name)
        if report is not None:
            writer.write_json(staging / REPORT, report)
        manifest = json.loads((folder / TWIN_JSON).read_text())
        manifest["exclusive"]["load_rank"] = int(rank)
        writer.write_json(staging / TWIN_JSON, manifest)
        try:
            os.rename(staging, view)
        except OSError:
            if not view.is_dir():
                raise
            writer.discard(staging)  # another trial made it first
    except OSError as exc:
        writer.discard(staging)
        raise OutputError(f"cannot write the rank view '{view}': {exc.strerror or exc}") from None
    return str(view)
