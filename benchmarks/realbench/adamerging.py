"""AdaMerging (task-wise, layer-wise and their ++ forms) on the encoder track: ``distmerge adamerging`` with
``kind: encoder`` on the cached build of a seed (bare all-MiniLM-L6-v2 encoders, each task's Linear head in
``heads/{task}.safetensors``), adapting on the **validation** texts without their labels, scored on **test**
with each task's own head, normalized by its expert's own test accuracy (``report.score_record``).

The paper adapts on the unlabelled test inputs (spec algorithms.md section 6); here the validation texts stand
in, so the test scores are of texts the coefficients never saw, like every other row of the track. The rows of
TA, TIES, EMR, FDA (``realbench_encoder.json``) and of issue 17's methods (``realbench_encoder_next.json``) for
the same build are read from those files, not recomputed (merges are deterministic; the build key names the
checkpoints). The results file is rewritten after each variant; a variant already in it for the same build and
settings is skipped, and a variant stopped mid-run resumes from its last checkpoint (driver.run's run folder).

    python -m benchmarks.realbench.adamerging --seed 0 [--steps 500] [--batches 1] [--work /tmp/rb_work]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.realbench import data, encoder, report
from benchmarks.realbench.table import RESULTS

DEFAULT_JSON = RESULTS / "realbench_encoder_adamerging.json"
VARIANTS = {  # name -> config overrides
    "task_wise": {"granularity": "task", "plus": False},
    "layer_wise": {"granularity": "layer", "plus": False},
    "task_wise_pp": {"granularity": "task", "plus": True},
    "layer_wise_pp": {"granularity": "layer", "plus": True},
}
# Spec section 6: ViT-B/32, 8 tasks, average accuracy (%, not normalized) after 500 steps; TA and TIES the paper's.
PAPER_VIT_B32 = {"task_arithmetic": 69.1, "ties": 72.4, "task_wise": 71.09, "task_wise_pp": 73.76,
                 "layer_wise": 80.18, "layer_wise_pp": 81.15}
REFERENCE_FILES = {"table": RESULTS / "realbench_encoder.json", "next": RESULTS / "realbench_encoder_next.json"}


@dataclass(frozen=True)
class AdaSettings:
    """The paper's settings (lambda_init 0.3, Adam lr 1e-3, 500 steps, batches of 16) except ``batches``: one
    batch per task per step instead of two, which halves a step on 2 shared cores. Adam is invariant to the
    scale of the summed loss, so this only makes each step's gradient noisier; steps x lr (how far a lambda
    can travel: 0.5) stays the paper's."""
    steps: int = 500
    lr: float = 1e-3
    lambda_init: float = 0.3
    batch_size: int = 16
    batches: int = 1
    density: float = 0.2  # ++: the global trim keeps 20% of each task vector (K=20)
    shuffle: bool = True  # the paper draws shuffled batches; here one seeded shuffle of each task's rows
    workers: int = 1


def adaptation_data(datasets: dict, folder: Path) -> dict[str, Path]:
    """Each task's validation texts as jsonl with only a ``text`` field: the labels never leave this process."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in data.TASKS:
        paths[task] = folder / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps({"text": e.text}) + "\n" for e in datasets[task]["validation"]))
    return paths


def ada_config(build_dir: Path, base: Path, texts: dict[str, Path], settings: AdaSettings, variant: dict,
               max_tokens: int, seed: int) -> dict:
    return {"base": str(base), "experts": {t: str(p) for t, p in encoder.experts(build_dir).items()},
            "kind": "encoder", "pooling": "mean",
            "heads": {t: str(build_dir / "heads" / f"{t}.safetensors") for t in data.TASKS},
            "data": {t: {"path": str(p), "fields": ["text"]} for t, p in texts.items()},
            "lambda_init": settings.lambda_init, "lr": settings.lr, "steps": settings.steps,
            "batches": settings.batches, "batch_size": settings.batch_size, "density": settings.density,
            "shuffle": settings.shuffle, "max_length": max_tokens, "seed": seed, **variant,
            "resources": {"num_cpus": 1}}


def lambda_summary(lambdas: dict[str, dict[str, float]]) -> dict:
    """Per task: mean, min, max over the tensors; per task and layer group: the mean (layer-wise only varies)."""
    from distmerge.tensors import layer_of

    groups: dict[str, list[str]] = {}
    for name in lambdas:
        groups.setdefault(layer_of(name)[0], []).append(name)
    tasks = list(next(iter(lambdas.values())))
    per_task = {t: {"mean": statistics.fmean(v[t] for v in lambdas.values()),
                    "min": min(v[t] for v in lambdas.values()), "max": max(v[t] for v in lambdas.values())}
                for t in tasks}
    per_group = {g: {t: round(statistics.fmean(lambdas[n][t] for n in names), 4) for t in tasks}
                 for g, names in groups.items()}
    return {"per_task": per_task, "per_group": per_group}


def reference_rows(build: str) -> dict[str, dict]:
    """The other methods' test rows for the same build, from the track's result files."""
    rows = {}
    table = json.loads(REFERENCE_FILES["table"].read_text())
    for run in table["runs"]:
        if run["build"] == build:
            rows.update({name: {"mean_normalized": r["mean_normalized"], "normalized": r["normalized"],
                                "source": REFERENCE_FILES["table"].name,
                                "chosen": run.get("chosen", {}).get(name, {}).get("label")}
                         for name, r in run["rows"].items()})
    following = json.loads(REFERENCE_FILES["next"].read_text())
    if following.get("build") == build:
        rows.update({name: {"mean_normalized": r["mean_normalized"], "normalized": r["normalized"],
                            "source": REFERENCE_FILES["next"].name, "chosen": following["chosen"][name]["label"]}
                     for name, r in following["rows"].items()})
    return rows


def run_variant(name: str, config: dict, out: Path, scorer: encoder.Scorer, own_test: dict, workers: int, log) -> dict:
    from distmerge.adamerging.driver import run

    log(f"  {name}: granularity {config['granularity']}, plus {config['plus']}, {config['steps']} steps")
    result = run(config, out, workers=workers, force=True)
    log("    " + result.summary())
    began = time.perf_counter()
    record = report.score_record(scorer.score(out, "test"), own_test)
    history = result.history
    record.update({
        "objective_first": history[0] if history else None, "objective_last": history[-1] if history else None,
        "objective_every_50": history[::50] + history[-1:], "steps": result.steps,
        "resumed_from": result.resumed_from, "seconds": round(result.seconds, 1),
        "score_seconds": round(time.perf_counter() - began, 1), "lambdas": lambda_summary(result.lambdas)})
    log(f"    test normalized {record['mean_normalized']:.4f} ("
        + ", ".join(f"{t} {v:.3f}" for t, v in record["normalized"].items()) + ")")
    return record


def run(seed: int, work: Path, settings: AdaSettings, names: list[str], json_path: Path, log) -> dict:
    from distmerge.engine.ray_session import ray_session

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fda_quality import machine_info, versions

    build_dir = encoder.build(work, seed, encoder.TrainSettings(), log=log)  # cached: no training when built
    manifest = encoder.read_build(build_dir)
    scorer = encoder.Scorer(build_dir)
    experts = encoder.experts(build_dir)
    own_test = {t: scorer.score(p, "test", tasks=(t,))[t] for t, p in experts.items()}
    folder = work / f"adamerging-seed{seed}"
    texts = adaptation_data(scorer.datasets, folder / "data")
    record = json.loads(json_path.read_text()) if json_path.is_file() else {}
    key = str(seed)
    run_record = record.get("runs", {}).get(key, {})
    if run_record.get("build") != build_dir.name or run_record.get("settings") != asdict(settings):
        run_record = {"seed": seed, "build": build_dir.name, "settings": asdict(settings), "rows": {}}
    run_record.update({"experts_own_test": own_test, "reference_rows": reference_rows(build_dir.name),
                       "adapted_on": {t: len(scorer.datasets[t]["validation"]) for t in data.TASKS}})
    record.update({"command": "python -m benchmarks.realbench.adamerging " + " ".join(sys.argv[1:]),
                   "machine": machine_info(), "versions": versions(), "paper_vit_b32_avg_accuracy": PAPER_VIT_B32})
    record.setdefault("runs", {})[key] = run_record
    with ray_session(num_cpus=2):  # one embedded Ray (loopback, 2 CPUs) for every variant; each run borrows it
        for name in names:
            if name in run_record["rows"]:
                log(f"  {name}: in {json_path.name} already")
                continue
            config = ada_config(build_dir, Path(manifest["base"]), texts, settings, VARIANTS[name],
                                scorer.max_tokens, seed)
            run_record["rows"][name] = run_variant(name, config, folder / name, scorer, own_test, settings.workers,
                                                   log)
            json_path.write_text(json.dumps(record, indent=1) + "\n")  # each finished variant is kept
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    return run_record


REFERENCE_SHOWN = ("ta_0.3", "task_arithmetic", "ties_global", "ties_tensor", "emr", "fda_gauss", "tsv", "iso_c")


def markdown(run_record: dict) -> str:
    tasks = list(data.TASKS)
    lines = [f"| model | {' | '.join(tasks)} | mean | objective first -> last | seconds |",
             "|" + "---|" * (len(tasks) + 4)]
    for name in [n for n in VARIANTS if n in run_record["rows"]]:
        row = run_record["rows"][name]
        cells = " | ".join(f"{row['normalized'][t]:.3f}" for t in tasks)
        lines.append(f"| AdaMerging {name.replace('_pp', '++').replace('_', '-')} | {cells} | "
                     f"**{row['mean_normalized']:.3f}** | {row['objective_first']:.3f} -> {row['objective_last']:.3f} "
                     f"| {row['seconds']:.0f} |")
    for name in REFERENCE_SHOWN:
        row = run_record["reference_rows"].get(name)
        if row:
            cells = " | ".join(f"{row['normalized'][t]:.3f}" for t in tasks)
            chosen = f" ({row['chosen']})" if row.get("chosen") else ""
            lines.append(f"| {name}{chosen} | {cells} | {row['mean_normalized']:.3f} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rb_work"))
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--steps", type=int, default=AdaSettings.steps)
    parser.add_argument("--batches", type=int, default=AdaSettings.batches)
    parser.add_argument("--workers", type=int, default=AdaSettings.workers)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    settings = AdaSettings(steps=args.steps, batches=args.batches, workers=args.workers)
    run_record = run(args.seed, args.work, settings, args.variants, args.json,
                     lambda message: print(message, flush=True))
    print("\n" + markdown(run_record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
