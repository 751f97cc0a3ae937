"""The method table of the decoder track, for the full and the LoRA experts: every method merged with distmerge
(LoRA experts as ``BASE+ADAPTER``), its lambda / density / drop rate chosen on the validation split (mean
normalized exact match), reported on test. FDA (the paper's NLG setting: MLP units, TA 0.5 as the initial
model, alpha elementwise from 1.0 on the merged delta, cos loss) runs only with ``--fda``; its anchors are
built for the trained layers only (the others carry no task vector). One JSON record per run in
benchmarks/results/realbench_decoder.json."""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.realbench import decoder, decoder_data, report, table

DEFAULT_JSON = table.RESULTS / "realbench_decoder.json"
KINDS = ("full", "lora")


@dataclass(frozen=True)
class FdaSettings:
    """The FDA paper's NLG (Llama-2-13B) setting, with fewer anchors (8192 there, for hidden 5120)."""
    count: int = 512
    tokens: int = 1
    sigma: float = 0.01
    steps: int = 200
    lr: float = 1e-2
    start_lambda: float = 0.5  # initial model TA(0.5), alpha elementwise from 1.0 on its delta
    adapt_epochs: int = 50
    adapt_lr: float = 1e-2
    loss: str = "cos"
    # Whole decoder layers (``modules: block``) have no reference setting: distmerge's default anchors for them
    # (64 sequences of 8 tokens), with the MLP runs' steps and optimizer.
    block_count: int = 64
    block_tokens: int = 8


# name -> (FDA unit, anchor init): the rows ``--fda`` adds, in this order
FDA_RUNS = {"fda_gauss": ("mlp", "gauss"), "fda_weights": ("mlp", "weights"), "fda_block_gauss": ("block", "gauss")}
# the merges whose units are compared with the experts' on real inputs (those the run made)
UNIT_ERROR_ROWS = ("base", "ta_0.5", "task_arithmetic", "ties_global", "ties_tensor", *FDA_RUNS)
# the units compared, each as the tables name it
UNIT_TEXT = {"mlp": "MLP units, u(x) = mlp(x)", "block": "whole decoder layers, u(x) = layer(x) - x"}


@dataclass(frozen=True)
class Grids:
    ta_lambdas: tuple[float, ...] = (0.5, 1.0)
    ties_densities: tuple[float, ...] = (0.2, 0.5)
    ties_lambdas: tuple[float, ...] = (1.0,)
    dare_drop_rates: tuple[float, ...] = (0.9,)
    dare_lambdas: tuple[float, ...] = (0.5, 1.0)
    fda: FdaSettings = field(default_factory=FdaSettings)
    fda_runs: tuple[str, ...] = ()  # names of FDA_RUNS


@dataclass(frozen=True)
class RunSettings:
    grids: Grids
    train: decoder.TrainSettings
    kinds: tuple[str, ...]


QUICK = Grids(ta_lambdas=(1.0,), ties_densities=(0.2,), dare_lambdas=(1.0,), fda=FdaSettings(count=32, steps=5,
                                                                                               adapt_epochs=2))
QUICK_TRAIN = decoder.TrainSettings(steps=4)

LABELS = {"base": "base model", "weight_average": "weight average",
          "task_arithmetic": "task arithmetic (lambda on validation)", "ta_0.5": "task arithmetic 0.5 (FDA's start)",
          "ties_global": "TIES, global trim", "ties_tensor": "TIES, per-tensor trim", "dare": "DARE + TA", "emr": "EMR",
          "fda_gauss": "FDA from TA 0.5, gauss anchors", "fda_weights": "FDA from TA 0.5, weight-row anchors",
          "fda_block_gauss": "FDA from TA 0.5, whole layers, gauss anchors"}


def fda_config(fda: FdaSettings, seed: int, base: Path, experts: dict[str, str], initial: Path, init: str,
               layers: list[int], unit: str = "mlp") -> dict:
    count, tokens = (fda.count, fda.tokens) if unit == "mlp" else (fda.block_count, fda.block_tokens)
    return {"base": str(base), "experts": dict(experts), "initial": str(initial), "modules": unit,
            "layers": layers,
            "anchors": {"count": count, "tokens": tokens, "init": init, "sigma": fda.sigma,
                        "steps": fda.steps, "lr": fda.lr},
            "adapt": {"param": "elementwise", "sources": "initial", "alpha_init": 1.0, "loss": fda.loss,
                      "lr": fda.adapt_lr, "batch_size": count * len(experts), "epochs": fda.adapt_epochs},
            "resources": {"num_cpus": 1}, "seed": seed}


def run_kind(kind: str, seed: int, build_dir: Path, base: Path, scorer: decoder.Scorer, base_test: dict,
             grids: Grids, layers: list[int], work: Path, log) -> dict:
    """Every row for the ``kind`` experts of one build."""
    experts = decoder.experts(build_dir, kind)
    merges = work / f"merges-decoder-seed{seed}-{kind}"
    shutil.rmtree(merges, ignore_errors=True)
    merges.mkdir(parents=True)
    tasks = list(decoder_data.TASKS)
    own_validation = {t: scorer.score(p, "validation", tasks=(t,))[t] for t, p in experts.items()}
    every = {t: scorer.score(p, "test") for t, p in experts.items()}
    own_test = {t: every[t][t] for t in tasks}
    rows = {"base": report.score_record(base_test, own_test)}
    expert_rows = {t: report.score_record(every[t], own_test) for t in tasks}
    log(f"[seed {seed} {kind}] experts on their own task (test): "
        + ", ".join(f"{t} {v:.3f}" for t, v in own_test.items()) + f"; validation: "
        + ", ".join(f"{t} {v:.3f}" for t, v in own_validation.items()))
    chosen, grids_run, folders = {}, {}, {}

    def one(name: str, method: str, candidates: list[tuple[str, dict]]) -> None:
        log(f"[seed {seed} {kind}] {LABELS.get(name, name)}")
        best, folder, grid = table.choose(candidates, method, base, experts, scorer, own_validation, merges, log)
        rows[name] = report.score_record(scorer.score_merge(folder, "test"), own_test)
        chosen[name], grids_run[name], folders[name] = best, grid, folder
        log(f"    chosen {best['label']}: test normalized {rows[name]['mean_normalized']:.4f}, "
            f"exact match {rows[name]['mean_accuracy']:.4f}")

    one("weight_average", "weight_average", [("weight-average", {})])
    one("task_arithmetic", "task_arithmetic", [(f"ta-lambda{x:g}", {"lambda": x}) for x in grids.ta_lambdas])
    for scope in ("global", "tensor"):
        one(f"ties_{scope}", "ties", [(f"ties-{scope}-density{d:g}-lambda{x:g}",
                                       {"density": d, "lambda": x, "trim_scope": scope})
                                      for d in grids.ties_densities for x in grids.ties_lambdas])
    one("dare", "dare", [(f"dare-drop{p:g}-lambda{x:g}", {"drop_rate": p, "lambda": x, "seed": seed})
                         for p in grids.dare_drop_rates for x in grids.dare_lambdas])
    one("emr", "emr", [("emr", {})])

    fda_runs = {}
    if grids.fda_runs:
        start = grids.fda.start_lambda
        initial = merges / f"ta-lambda{start:g}"
        if not initial.is_dir():
            table.merge(base, experts, "task_arithmetic", {"lambda": start}, initial)
        rows["ta_0.5"] = report.score_record(scorer.score(initial, "test"), own_test)
        for name in grids.fda_runs:
            unit, init = FDA_RUNS[name]
            log(f"[seed {seed} {kind}] {LABELS[name]}")
            config = fda_config(grids.fda, seed, base, experts, initial, init, layers, unit)
            # anchors outside ``merges`` (cleared at every start): a rerun after a crash reuses the built jobs
            folder, record = table.run_fda(config, merges, name, anchors_root=work / f"fda-decoder-seed{seed}-{kind}")
            # the cos loss is -sum cos over a layer's anchors (one batch): as a mean cosine
            record["adapt_mean_cos"] = [-loss / config["adapt"]["batch_size"] for loss in record["adapt_loss"]]
            rows[name] = report.score_record(scorer.score(folder, "test"), own_test)
            fda_runs[name] = record
            folders[name] = folder
            log(f"    test normalized {rows[name]['mean_normalized']:.4f}; construction {record['construct_seconds']}s "
                f"({record['job_seconds']:.1f}s per (layer, task) job, {record['jobs_reused']} reused), adaptation: "
                f"mean cos {record['adapt_mean_cos'][0]:.4f} -> {record['adapt_mean_cos'][1]:.4f}")
        folders["ta_0.5"] = initial
    folders["base"] = base
    log(f"[seed {seed} {kind}] unit error on real inputs")
    by_row = {name: scorer.unit_error(folders[name], experts, tuple(UNIT_TEXT)) for name in UNIT_ERROR_ROWS
              if name in folders}
    unit_error = {unit: {name: row[unit] for name, row in by_row.items()} for unit in UNIT_TEXT}
    shutil.rmtree(merges, ignore_errors=True)
    return {"rows": rows, "experts": expert_rows, "own_validation": own_validation, "chosen": chosen,
            "grids": grids_run, "fda": fda_runs, "unit_error": unit_error}


def run_seed(seed: int, work: Path, grids: Grids, train: decoder.TrainSettings, kinds: tuple[str, ...], log,
             limit: int | None = None) -> dict:
    began = time.perf_counter()
    build_dir = decoder.build(work, seed, train, log=log)
    manifest = decoder.read_build(build_dir)
    base = Path(manifest["base"])
    scorer = decoder.Scorer(build_dir, limit=limit)
    base_test = scorer.score(base, "test")
    from transformers import AutoConfig

    layers = decoder.trained_layers(AutoConfig.from_pretrained(str(base)), train)
    out = {"seed": seed, "build": build_dir.name, "training": manifest["training"], "data": manifest["data"],
           "kinds": {}}
    for kind in kinds:
        out["kinds"][kind] = run_kind(kind, seed, build_dir, base, scorer, base_test, grids, layers, work, log)
    out["seconds"] = round(time.perf_counter() - began, 1)
    return out


def summarize(runs: list[dict]) -> dict:
    tasks = list(decoder_data.TASKS)
    out = {}
    for kind in runs[0]["kinds"]:
        of_kind = [r["kinds"][kind] for r in runs]
        experts = {f"{t} expert": {c: report.spread([r["experts"][t]["accuracy"][c] for r in of_kind]) for c in tasks}
                   for t in tasks}
        for row in experts.values():
            row["mean"] = report.spread([statistics.fmean(row[t]["per_seed"][i] for t in tasks)
                                         for i in range(len(of_kind))])
        fda = {name: {k: report.spread([r["fda"][name][k] for r in of_kind])
                      for k in ("construct_seconds", "job_seconds", "seconds")}
               for name in of_kind[0]["fda"] if all(name in r["fda"] for r in of_kind)}
        for name, record in fda.items():
            record["adapt_final_cos"] = report.spread([r["fda"][name]["adapt_mean_cos"][1] for r in of_kind])
        # runs recorded before the unit error was measured have none
        measured = [r["unit_error"] for r in of_kind if "unit_error" in r]
        unit_error = {}
        for unit in measured[0] if len(measured) == len(of_kind) else ():
            unit_error[unit] = {}
            for name in measured[0][unit]:
                if all(name in m[unit] for m in measured):
                    row = {t: report.spread([m[unit][name][t] for m in measured]) for t in tasks}
                    row["mean"] = report.spread([statistics.fmean(m[unit][name][t] for t in tasks) for m in measured])
                    unit_error[unit][name] = row
        out[kind] = {"normalized": report.summarize_rows(of_kind, tasks, "normalized"),
                     "exact_match": report.summarize_rows(of_kind, tasks, "accuracy"), "experts_exact_match": experts,
                     "fda": fda, "unit_error": unit_error, "chosen": {r["seed"]: {k: v["label"] for k, v in k_run["chosen"].items()}
                                            for r, k_run in zip(runs, of_kind)}}
    return out


def print_tables(summary: dict, seeds: int) -> None:
    tasks = list(decoder_data.TASKS)
    for kind, part in summary.items():
        title = "full fine-tunes of the last layers" if kind == "full" else "LoRA experts"
        print(f"\n## {title}\n\nNormalized exact match (merged / expert on its own task), test split:\n")
        print(report.markdown(part["normalized"], tasks, LABELS, seeds))
        print("\nExact match, test split:\n")
        print(report.markdown(part["exact_match"], tasks, LABELS, seeds))
        print("\nEach expert on every task (exact match):\n")
        print(report.markdown(part["experts_exact_match"], tasks, {}, seeds))
        for unit, rows in part.get("unit_error", {}).items():
            print(f"\nUnit error on real inputs ({UNIT_TEXT[unit]}; ||u_merged(x) - u_expert(x)|| / ||u_expert(x)|| on "
                  "each task's test prompts, mean over the trained layers):\n")
            print(report.markdown(rows, tasks, LABELS, seeds))
        for name, record in part["fda"].items():
            print(f"{LABELS[name]}: construction {record['construct_seconds']['mean']:.0f}s "
                  f"({record['job_seconds']['mean']:.1f}s per (layer, task) job); adaptation: mean cos "
                  f"{record['adapt_final_cos']['mean']:.4f} at the end; {record['seconds']['mean']:.0f}s in all")
        print("\nChosen on validation: " + "; ".join(f"seed {s}: " + ", ".join(f"{k} {v}" for k, v in c.items())
                                                    for s, c in part["chosen"].items()))


def main(work: Path, seeds: list[int], json_path: Path | None, quick: bool, kinds: tuple[str, ...],
         fda_runs: tuple[str, ...], log) -> int:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fda_quality import run_seeds, write_result  # the shared Ray runner and JSON record

    grids = QUICK if quick else Grids()
    unknown = sorted(set(fda_runs) - set(FDA_RUNS))
    if unknown:
        raise SystemExit(f"realbench: unknown FDA run(s) {unknown}; known: {', '.join(FDA_RUNS)}")
    grids = Grids(**{**grids.__dict__, "fda_runs": tuple(fda_runs)})
    train = QUICK_TRAIN if quick else decoder.TrainSettings()
    json_path = json_path or (table.RESULTS / "realbench_decoder_quick.json" if quick else DEFAULT_JSON)
    runs, seconds = run_seeds(seeds, train.threads, work,
                              lambda seed: run_seed(seed, work, grids, train, kinds, log, 10 if quick else None))
    summary = summarize(runs)
    result = write_result(json_path, None, RunSettings(grids, train, kinds), seeds, seconds, summary, runs)
    print_tables(summary, len(seeds))
    print(f"\n{result['seconds']:.0f}s in all; results in {json_path}")
    return 0


def combine(files: list[Path], json_path: Path) -> int:
    """One record from the runs of several decoder ``table`` results (seeds run as separate processes)."""
    return table.combine(files, json_path, summarize, print_tables, "realbench combine --track decoder")
