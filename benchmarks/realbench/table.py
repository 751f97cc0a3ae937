"""The method table of the encoder track: every method merged with distmerge, its lambda / density / drop
rate chosen on the validation split (mean normalized accuracy), reported on test; FDA with the paper's
encoder setting from task arithmetic 0.3, with its construction seconds per (layer, task) job and the unit
error on real inputs. One JSON record per run in benchmarks/results/realbench_encoder.json."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.realbench import data, encoder, report

RESULTS = Path(__file__).resolve().parents[1] / "results"
DEFAULT_JSON = RESULTS / "realbench_encoder.json"


@dataclass(frozen=True)
class FdaSettings:
    """The FDA paper's encoder (RoBERTa/GLUE) setting as the issue reports it, except steps (1200 there)."""
    count: int = 64
    tokens: int = 5
    sigma: float = 0.01
    steps: int = 200
    lr: float = 1e-2
    start_lambda: float = 0.3  # initial model TA(0.3), alpha per expert elementwise from 0.3
    adapt_epochs: int = 100
    adapt_lr: float = 1e-2
    adapt_batch: int = 128
    loss: str = "mse"


@dataclass(frozen=True)
class Grids:
    ta_lambdas: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    ties_densities: tuple[float, ...] = (0.2, 0.5)
    ties_lambdas: tuple[float, ...] = (1.0, 1.5)
    dare_drop_rates: tuple[float, ...] = (0.5, 0.9)
    dare_lambdas: tuple[float, ...] = (0.3, 0.5)
    fda: FdaSettings = field(default_factory=FdaSettings)


@dataclass(frozen=True)
class RunSettings:
    grids: Grids
    train: encoder.TrainSettings


QUICK = Grids(ta_lambdas=(0.3, 1.0), ties_densities=(0.2,), ties_lambdas=(1.0,), dare_drop_rates=(0.9,),
              dare_lambdas=(0.5,), fda=FdaSettings(steps=5, adapt_epochs=2))
QUICK_TRAIN = encoder.TrainSettings(steps=8)

LABELS = {"base": "base encoder + expert heads", "weight_average": "weight average",
          "task_arithmetic": "task arithmetic (lambda on validation)", "ta_0.3": "task arithmetic 0.3 (FDA's start)",
          "ties_global": "TIES, global trim", "ties_tensor": "TIES, per-tensor trim", "dare": "DARE + TA", "emr": "EMR",
          "fda_gauss": "FDA from TA 0.3, gauss anchors", "fda_weights": "FDA from TA 0.3, weight-row anchors"}


def merge(base: Path, experts: dict[str, Path], method: str, parameters: dict, out: Path) -> Path:
    from distmerge import merge as distmerge_merge

    config = {"base_model": str(base), "models": [{"model": str(p), "name": t} for t, p in experts.items()],
              "method": method, "parameters": parameters}
    distmerge_merge(config, out, workers=1, force=True, progress=False)
    return out


def choose(candidates: list[tuple[str, dict]], method: str, base: Path, experts: dict[str, Path],
           scorer: encoder.Scorer, own_validation: dict[str, float], merges: Path, log) -> tuple[dict, Path, list]:
    """Merge each candidate, keep the best mean normalized validation accuracy (the earlier on ties)."""
    grid, best = [], None
    for label, parameters in candidates:
        folder = merge(base, experts, method, parameters, merges / label)
        record = report.score_record(scorer.score_merge(folder, "validation"), own_validation)
        grid.append({"label": label, "parameters": parameters, "validation": record})
        log(f"    {label}: validation normalized {record['mean_normalized']:.4f}")
        if best is None or record["mean_normalized"] > best[0]:
            best = (record["mean_normalized"], {"label": label, "parameters": parameters}, folder)
    return best[1], best[2], grid


def fda_config(fda: FdaSettings, seed: int, base: Path, experts: dict[str, Path], initial: Path, init: str) -> dict:
    return {"base": str(base), "experts": {t: str(p) for t, p in experts.items()}, "initial": str(initial),
            "modules": "block",
            "anchors": {"count": fda.count, "tokens": fda.tokens, "init": init, "sigma": fda.sigma,
                        "steps": fda.steps, "lr": fda.lr},
            "adapt": {"param": "elementwise", "sources": "experts", "alpha_init": fda.start_lambda, "loss": fda.loss,
                      "lr": fda.adapt_lr, "batch_size": fda.adapt_batch, "epochs": fda.adapt_epochs},
            "resources": {"num_cpus": 1}, "seed": seed}


def run_fda(config: dict, merges: Path, name: str, anchors_root: Path | None = None) -> tuple[Path, dict]:
    """Construct and adapt; returns the merged folder and the record. With ``anchors_root`` the anchors live there
    and a rerun after a crash reuses the (layer, task) jobs already built (FDA's own resume: their config hash
    must match); the per-job seconds are those of the run that built each job."""
    from distmerge import fda

    anchors, out = (anchors_root or merges) / f"anchors-{name}", merges / name
    if anchors_root is None:
        shutil.rmtree(anchors, ignore_errors=True)
    anchors.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    built = fda.construct(config, anchors, progress=False)
    construct_seconds = time.perf_counter() - began
    adapted = fda.adapt(config, anchors, out, force=True, progress=False, work=merges / f".work-{name}")
    keys = ("layer", "task", "initial_loss", "best_loss", "best_step", "seconds")
    jobs = [{k: meta[k] for k in keys} for meta in (json.loads(path.read_text())
                                                    for path in sorted(anchors.glob("layer_*/task_*.json")))]
    adapt = [{k: r[k] for k in ("layer", "initial_loss", "final_loss", "seconds")} for r in adapted.results]
    # The adaptation loss is a sum over anchors: mse and l1 are >= 0 (a ratio says how far it fell), cos is
    # -sum cos (negative: the mean cosine says more); both are kept.
    positive = all(a["initial_loss"] > 0 for a in adapt)
    return out, {"seconds": round(time.perf_counter() - began, 1), "construct_seconds": round(construct_seconds, 1),
                 "jobs_reused": built.skipped, "job_seconds": statistics.fmean(j["seconds"] for j in jobs),
                 "construct": jobs, "adapt": adapt,
                 "adapt_loss_ratio": statistics.fmean(a["final_loss"] / a["initial_loss"] for a in adapt)
                 if positive and adapt else None,
                 "adapt_loss": [statistics.fmean(a["initial_loss"] for a in adapt),
                                statistics.fmean(a["final_loss"] for a in adapt)] if adapt else None}


def run_seed(seed: int, work: Path, grids: Grids, train: encoder.TrainSettings, log, limit: int | None = None) -> dict:
    began = time.perf_counter()
    build_dir = encoder.build(work, seed, train, log=log)
    manifest = encoder.read_build(build_dir)
    base, experts = Path(manifest["base"]), encoder.experts(build_dir)
    scorer = encoder.Scorer(build_dir, limit=limit)
    merges = work / f"merges-encoder-seed{seed}"
    shutil.rmtree(merges, ignore_errors=True)
    merges.mkdir(parents=True)
    tasks = list(data.TASKS)

    own_validation = {t: scorer.score(p, "validation", tasks=(t,))[t] for t, p in experts.items()}
    every = {t: scorer.score(p, "test") for t, p in experts.items()}  # each expert on every task
    own_test = {t: every[t][t] for t in tasks}
    rows = {"base": report.score_record(scorer.score(base, "test"), own_test)}
    expert_rows = {t: report.score_record(every[t], own_test) for t in tasks}
    log(f"[seed {seed}] experts on their own task (test): " + ", ".join(f"{t} {v:.3f}" for t, v in own_test.items())
        + f"; base normalized {rows['base']['mean_normalized']:.3f}")
    chosen, grids_run, folders = {}, {}, {}

    def one(name: str, method: str, candidates: list[tuple[str, dict]]) -> None:
        log(f"[seed {seed}] {LABELS.get(name, name)}")
        best, folder, grid = choose(candidates, method, base, experts, scorer, own_validation, merges, log)
        rows[name] = report.score_record(scorer.score_merge(folder, "test"), own_test)
        chosen[name], grids_run[name], folders[name] = best, grid, folder
        log(f"    chosen {best['label']}: test normalized {rows[name]['mean_normalized']:.4f}")

    one("weight_average", "weight_average", [("weight-average", {})])
    one("task_arithmetic", "task_arithmetic", [(f"ta-lambda{x:g}", {"lambda": x}) for x in grids.ta_lambdas])
    start = grids.fda.start_lambda
    folders["ta_0.3"] = merges / f"ta-lambda{start:g}"
    if not folders["ta_0.3"].is_dir():
        merge(base, experts, "task_arithmetic", {"lambda": start}, folders["ta_0.3"])
    rows["ta_0.3"] = report.score_record(scorer.score(folders["ta_0.3"], "test"), own_test)
    for scope in ("global", "tensor"):
        one(f"ties_{scope}", "ties", [(f"ties-{scope}-density{d:g}-lambda{x:g}",
                                       {"density": d, "lambda": x, "trim_scope": scope})
                                      for d in grids.ties_densities for x in grids.ties_lambdas])
    one("dare", "dare", [(f"dare-drop{p:g}-lambda{x:g}", {"drop_rate": p, "lambda": x, "seed": seed})
                         for p in grids.dare_drop_rates for x in grids.dare_lambdas])
    one("emr", "emr", [("emr", {})])

    fda_runs = {}
    for init in ("gauss", "weights"):
        name = f"fda_{init}"
        log(f"[seed {seed}] {LABELS[name]}")
        folder, record = run_fda(fda_config(grids.fda, seed, base, experts, folders["ta_0.3"], init), merges, name)
        rows[name] = report.score_record(scorer.score(folder, "test"), own_test)
        folders[name] = folder
        fda_runs[name] = record
        log(f"    test normalized {rows[name]['mean_normalized']:.4f}; construction {record['construct_seconds']}s "
            f"({record['job_seconds']:.1f}s per (layer, task) job), adaptation loss x{record['adapt_loss_ratio']:.3f}")

    log(f"[seed {seed}] unit error on real inputs")
    unit_error = {name: scorer.unit_error(folders.get(name, base), experts)
                  for name in ("base", "ta_0.3", "task_arithmetic", "ties_global", "fda_gauss", "fda_weights")}
    shutil.rmtree(merges, ignore_errors=True)
    return {"seed": seed, "build": build_dir.name, "training": manifest["training"], "data": manifest["data"],
            "rows": rows, "experts": expert_rows, "chosen": chosen, "grids": grids_run, "fda": fda_runs,
            "unit_error": unit_error, "seconds": round(time.perf_counter() - began, 1)}


def summarize(runs: list[dict]) -> dict:
    tasks = list(data.TASKS)
    unit = {name: {t: report.spread([r["unit_error"][name][t] for r in runs]) for t in tasks}
            for name in runs[0]["unit_error"]}
    for name in unit:
        unit[name]["mean"] = report.spread([statistics.fmean(r["unit_error"][name].values()) for r in runs])
    experts = {f"{t} expert": {c: report.spread([r["experts"][t]["accuracy"][c] for r in runs]) for c in tasks}
               for t in tasks}
    fda = {name: {k: report.spread([r["fda"][name][k] for r in runs])
                  for k in ("construct_seconds", "job_seconds", "adapt_loss_ratio", "seconds")
                  if all(k in r["fda"].get(name, {}) for r in runs)}
           for name in runs[0]["fda"]}
    return {"normalized": report.summarize_rows(runs, tasks, "normalized"),
            "accuracy": report.summarize_rows(runs, tasks, "accuracy"), "experts_accuracy": experts,
            "unit_error": unit, "fda": fda, "chosen": {r["seed"]: {k: v["label"] for k, v in r["chosen"].items()}
                                                        for r in runs}}


def print_tables(summary: dict, seeds: int) -> None:
    tasks = list(data.TASKS)
    print("\nNormalized accuracy (merged / expert on its own task), test split:\n")
    print(report.markdown(summary["normalized"], tasks, LABELS, seeds))
    print("\nAccuracy, test split:\n")
    print(report.markdown(summary["accuracy"], tasks, LABELS, seeds))
    print("\nEach expert on every task (its accuracy with that task's head):\n")
    experts = {k: {**v, "mean": report.spread([statistics.fmean(v[t]["per_seed"][i] for t in tasks)
                                                for i in range(len(v[tasks[0]]["per_seed"]))])}
               for k, v in summary["experts_accuracy"].items()}
    print(report.markdown(experts, tasks, {}, seeds))
    print("\nUnit error on real inputs (||u_merged(x) - u_expert(x)|| / ||u_expert(x)||, whole layers, mean over "
          "layers):\n")
    print(report.markdown(summary["unit_error"], tasks, LABELS, seeds))
    print()
    described = {"construct_seconds": "construction {:.0f}s", "job_seconds": "{:.1f}s per (layer, task) job",
                 "adapt_loss_ratio": "adaptation loss final/initial {:.3f}", "seconds": "{:.0f}s in all"}
    for name, record in summary["fda"].items():
        print(f"{LABELS[name]}: " + "; ".join(text.format(record[k]["mean"]) for k, text in described.items()
                                               if k in record))
    print("Chosen on validation: " + "; ".join(f"seed {s}: " + ", ".join(f"{k} {v}" for k, v in c.items())
                                              for s, c in summary["chosen"].items()))


def main(work: Path, seeds: list[int], json_path: Path | None, quick: bool, log) -> int:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fda_quality import run_seeds, write_result  # the shared Ray runner and JSON record

    grids = QUICK if quick else Grids()
    train = QUICK_TRAIN if quick else encoder.TrainSettings()
    json_path = json_path or (RESULTS / "realbench_encoder_quick.json" if quick else DEFAULT_JSON)
    runs, seconds = run_seeds(seeds, train.threads, work, lambda seed: run_seed(seed, work, grids, train, log, 40 if quick else None))
    summary = summarize(runs)
    result = write_result(json_path, None, RunSettings(grids, train), seeds, seconds, summary, runs)
    print_tables(summary, len(seeds))
    print(f"\n{result['seconds']:.0f}s in all; results in {json_path}")
    return 0


def combine(files: list[Path], json_path: Path, summarize=summarize, print_tables=print_tables,
            command: str = "realbench combine") -> int:
    """One record from the runs of several ``table`` results (seeds run as separate processes, side by side);
    a track passes its own ``summarize`` and ``print_tables``."""
    import json

    records = [json.loads(Path(f).read_text()) for f in files]
    runs = sorted((run for record in records for run in record["runs"]), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"realbench combine: seeds {seeds} appear more than once in {', '.join(map(str, files))}")
    if any(r["settings"] != records[0]["settings"] for r in records):
        raise SystemExit("realbench combine: the files were run with different settings")
    summary = summarize(runs)
    result = {**records[0], "command": f"{command} " + " ".join(map(str, files)), "seeds": seeds,
              "seconds": round(sum(r["seconds"] for r in records), 1), "summary": summary, "runs": runs}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    print_tables(summary, len(seeds))
    print(f"\nresults in {json_path}")
    return 0
