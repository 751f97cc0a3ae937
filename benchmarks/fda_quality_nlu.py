"""Measured quality of FDA in the encoder/classifier setting (the paper's RoBERTa-on-GLUE setting, spec §8.3).

    python benchmarks/fda_quality_nlu.py [--quick] [--seeds 0,1,2] [--work DIR] [--json FILE] [--fresh]
        [--steps N] [--extra-sigma S]

Everything is built here, on the CPU, from nothing (``fda_nlu_tasks.py`` holds the tasks and training loops):

1. a tiny RoBERTa "pretrained" base, trained with masked-language modelling on structured synthetic sequences;
2. one classification expert per task (4 tasks, 2 or 3 labels), all weights fine-tuned from the base with its
   own freshly initialized head; the encoder is saved as a ``RobertaModel`` folder (what is merged) and the head
   beside it (never merged: heads of different label counts have different shapes);
3. merges of the encoders through distmerge: task arithmetic (lambda chosen on validation), TIES (density x
   lambda chosen on validation), and FDA through ``distmerge.fda`` in the RoBERTa setting: whole encoder
   layers, anchors [64, 5, d], TA init with an elementwise alpha per expert initialized at the chosen TA
   lambda, mse adaptation, Adam lr 1e-2, batch 128, 100 epochs; once with Gaussian (sigma 0.01) and once with
   weight-row anchors;
4. evaluation: accuracy of each task with the merged encoder and that task's own expert head, on held-out
   test inputs (split by a hash of the input, disjoint from the validation inputs used to choose lambda).

Printed as a table and written as JSON with the fraction of the TA -> expert gap each FDA run recovers,
(FDA - TA) / (expert - TA) on the task-mean accuracy, plus FDA's diagnostics: the anchors' gradient alignment
(mean cosine between the anchor-induced gradient and the task vector over the layer's tensors, before and
after construction) and the adaptation loss before and after, per layer. Deterministic per seed (and torch
thread count). Trained models are cached in ``--work`` under a hash of what they depend on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fda_nlu_tasks as ft  # noqa: E402
from fda_quality import _cached, engine_merge, log, run_seeds, spread, write_result  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "fda_quality_nlu.json"
HEAD_FILE = "head.safetensors"


@dataclass(frozen=True)
class FdaSettings:
    count: int = 64  # anchors per (layer, task): the RoBERTa reference
    tokens: int = 5
    sigma: float = 0.01
    steps: int = 300  # the reference uses 1200; what fits the time budget on 2 cores
    lr: float = 1e-2
    adapt_epochs: int = 100
    adapt_lr: float = 1e-2
    adapt_batch: int = 128
    loss: str = "mse"
    extra_sigma: float | None = None  # a second Gaussian run with this sigma (a diagnostic)


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...] = ft.TASKS
    shape: ft.ModelShape = ft.ModelShape()
    base_train: ft.TrainSettings = ft.TrainSettings(steps=400, lr=2e-3, batch_size=128)
    expert_train: ft.TrainSettings = ft.TrainSettings(steps=200, lr=5e-4, batch_size=64)
    validation: int = 500  # inputs per task for choosing lambda
    test: int = 1000  # inputs per task for the reported scores
    ta_lambdas: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    ties_densities: tuple[float, ...] = (0.2, 0.5)
    ties_lambdas: tuple[float, ...] = (0.7, 1.0, 1.5)
    fda: FdaSettings = FdaSettings()
    threads: int = 2

    def base_key(self, seed: int) -> str:
        code = hashlib.sha256(Path(ft.__file__).read_bytes()).hexdigest()
        return _digest({"shape": asdict(self.shape), "base": asdict(self.base_train), "seed": seed,
                        "threads": self.threads, "code": code})

    def expert_key(self, seed: int, task: str) -> str:
        return _digest({"base": self.base_key(seed), "task": task, "expert": asdict(self.expert_train)})


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


QUICK = Settings(base_train=ft.TrainSettings(steps=40, lr=2e-3, batch_size=128),
                 expert_train=ft.TrainSettings(steps=30, lr=5e-4, batch_size=64), validation=100, test=200,
                 ta_lambdas=(0.5, 1.0), ties_densities=(0.2,), ties_lambdas=(1.0,),
                 fda=FdaSettings(steps=10, adapt_epochs=5))


# --- models -----------------------------------------------------------------------------------------------

def build_models(settings: Settings, seed: int, work: Path, fresh: bool) -> tuple[Path, dict[str, Path], dict]:
    """The base encoder and, per task, a folder with ``encoder/`` (RobertaModel) and ``head.safetensors``."""
    import torch

    record: dict = {}
    base_folder = work / f"nlu-base-{settings.base_key(seed)}"

    def train_base(staging: Path) -> dict:
        model = ft.new_mlm_model(settings.shape, seed)
        log(f"[seed {seed}] MLM pretraining of the base ({sum(p.numel() for p in model.roberta.parameters())} "
            f"encoder parameters, {settings.base_train.steps} steps)")
        losses = ft.pretrain_mlm(model, settings.base_train, seed, log)
        ft.save_encoder(model.roberta, staging)
        return {"final_mlm_loss": ft.tail_mean(losses)}

    record["base"] = _cached(base_folder, train_base, fresh, f"[seed {seed}] base")
    experts = {}
    for index, task in enumerate(settings.tasks):
        def train_expert(staging: Path, task=task, index=index) -> dict:
            encoder = ft.load_encoder(base_folder)
            head = ft.new_head(encoder.config, ft.NUM_LABELS[task], seed * 1000 + index + 1)
            torch.manual_seed(seed * 1000 + index + 1)
            log(f"[seed {seed}] fine-tuning the {task} expert ({ft.NUM_LABELS[task]} labels) from the base")
            losses = ft.finetune(encoder, head, task, settings.expert_train, seed * 1000 + index + 1, log)
            ft.save_encoder(encoder, staging / "encoder")
            ft.save_head(head, staging / HEAD_FILE)
            return {"final_loss": ft.tail_mean(losses)}

        folder = work / f"nlu-expert-{task}-{settings.expert_key(seed, task)}"
        record[f"expert:{task}"] = _cached(folder, train_expert, fresh, f"[seed {seed}] {task} expert")
        experts[task] = folder
    return base_folder, experts, record


def encoders(experts: dict[str, Path]) -> dict[str, Path]:
    return {task: folder / "encoder" for task, folder in experts.items()}


def task_vector_norms(base: Path, experts: dict[str, Path]) -> dict[str, float]:
    """|tau_t| / |theta_0| over the encoder: how far fine-tuning moved each expert."""
    import torch

    base_state = ft.load_encoder(base).state_dict()
    base_norm = torch.sqrt(sum((v.float() ** 2).sum() for v in base_state.values()))
    out = {}
    for task, folder in encoders(experts).items():
        state = ft.load_encoder(folder).state_dict()
        out[task] = float(torch.sqrt(sum(((state[n] - v).float() ** 2).sum() for n, v in base_state.items()))
                          / base_norm)
    return out


# --- evaluation -------------------------------------------------------------------------------------------

class Evaluator:
    """Accuracy of an encoder folder on every task, each with its own expert's head."""

    def __init__(self, settings: Settings, seed: int, experts: dict[str, Path]):
        self.sets = {split: {t: ft.sample(t, split, count, seed) for t in settings.tasks}
                     for split, count in (("validation", settings.validation), ("test", settings.test))}
        config = ft.load_encoder(encoders(experts)[settings.tasks[0]]).config
        self.heads = {t: ft.load_head(folder / HEAD_FILE, config) for t, folder in experts.items()}

    def score(self, encoder_folder: Path, split: str) -> dict[str, float]:
        encoder = ft.load_encoder(encoder_folder)
        return {t: ft.accuracy(encoder, self.heads[t], examples) for t, examples in self.sets[split].items()}

    def score_own_layers(self, merged: Path, experts: dict[str, Path], split: str) -> dict[str, float]:
        """Task t on the merge with every encoder layer replaced by expert t's (embeddings stay merged): the
        best a method that changes only FDA's units could reach on t."""
        out = {}
        for task, folder in encoders(experts).items():
            encoder = ft.load_encoder(merged)
            own = ft.load_encoder(folder).state_dict()
            encoder.load_state_dict({n: (own[n] if n.startswith("encoder.layer.") else v)
                                     for n, v in encoder.state_dict().items()})
            out[task] = ft.accuracy(encoder, self.heads[task], self.sets[split][task])
        return out

    def baselines(self, split: str) -> dict[str, float]:
        return {t: ft.majority_baseline(examples) for t, examples in self.sets[split].items()}


def mean(scores: dict[str, float]) -> float:
    return statistics.fmean(scores.values())


# --- merges ----------------------------------------------------------------------------------------------

def choose_on_validation(candidates: list[tuple[str, dict]], base: Path, experts: dict[str, Path], method: str,
                         evaluator: Evaluator, out_root: Path) -> tuple[str, Path, list[dict]]:
    """Merge every candidate encoder, keep the best task-mean validation accuracy (the earlier one on ties)."""
    grid, best = [], None
    for label, parameters in candidates:
        folder = engine_merge(base, encoders(experts), method, parameters, out_root / label)
        validation = evaluator.score(folder, "validation")
        grid.append({"label": label, "parameters": parameters, "validation": validation,
                     "validation_mean": mean(validation)})
        log(f"    {method} {label}: validation accuracy {mean(validation):.3f}")
        if best is None or mean(validation) > best[0]:
            best = (mean(validation), label, folder)
    return best[1], best[2], grid


def fda_config(settings: Settings, seed: int, base: Path, experts: dict[str, Path], initial: Path, lam: float,
               init: str, sigma: float) -> dict:
    """The RoBERTa setting of spec §8.3 with the TA init: α per expert, elementwise, starting at λ_TA."""
    fda = settings.fda
    return {"base": str(base), "experts": {t: str(p) for t, p in encoders(experts).items()}, "initial": str(initial),
            "modules": "block",
            "anchors": {"count": fda.count, "tokens": fda.tokens, "init": init, "sigma": sigma, "steps": fda.steps,
                        "lr": fda.lr},
            "adapt": {"param": "elementwise", "sources": "experts", "alpha_init": lam, "loss": fda.loss,
                      "lr": fda.adapt_lr, "batch_size": fda.adapt_batch, "epochs": fda.adapt_epochs},
            "resources": {"num_cpus": 1}, "seed": seed}


def unit_tensor_count(base: Path) -> int:
    """Tensors in one encoder layer: the construction loss is a sum of (1 - cos) over them."""
    from distmerge.fda.inputs import open_inputs

    config = {"base": str(base), "experts": {"base": str(base)}, "modules": "block"}
    return len(open_inputs(config).unit_names)


def run_fda(config: dict, out_root: Path, label: str, tensors: int) -> tuple[Path, dict]:
    from distmerge import fda

    anchors, out = out_root / f"anchors-{label}", out_root / label
    shutil.rmtree(anchors, ignore_errors=True)
    began = time.perf_counter()
    built = fda.construct(config, anchors, progress=False)
    construct_seconds = time.perf_counter() - began
    adapted = fda.adapt(config, anchors, out, force=True, progress=False, work=out_root / f".work-{label}")
    construct = [{"layer": r["layer"], "task": r["task"], "initial_loss": r["initial_loss"],
                  "best_loss": r["best_loss"], "best_step": r["best_step"],
                  "initial_alignment": 1 - r["initial_loss"] / tensors, "alignment": 1 - r["best_loss"] / tensors}
                 for r in built.results]
    adapt = [{k: r[k] for k in ("layer", "initial_loss", "final_loss")} for r in adapted.results]
    record = {"seconds": round(time.perf_counter() - began, 1), "construct_seconds": round(construct_seconds, 1),
              "construct": construct, "adapt": adapt,
              "mean_initial_alignment": statistics.fmean(c["initial_alignment"] for c in construct),
              "mean_alignment": statistics.fmean(c["alignment"] for c in construct),
              "mean_adapt_loss_ratio": statistics.fmean(a["final_loss"] / a["initial_loss"] for a in adapt
                                                        if a["initial_loss"] > 0)}
    return out, record


# --- one seed ---------------------------------------------------------------------------------------------

def run_seed(settings: Settings, seed: int, work: Path, fresh: bool, keep: bool) -> dict:
    began = time.perf_counter()
    base, experts, training = build_models(settings, seed, work, fresh)
    evaluator = Evaluator(settings, seed, experts)
    merges = work / f"nlu-merges-seed{seed}"
    shutil.rmtree(merges, ignore_errors=True)
    merges.mkdir(parents=True)

    test: dict[str, dict[str, float]] = {"majority_class": evaluator.baselines("test"),
                                         "base": evaluator.score(base, "test")}
    for task, folder in encoders(experts).items():
        test[f"expert:{task}"] = evaluator.score(folder, "test")
    log(f"[seed {seed}] experts on their own task: "
        + ", ".join(f"{t} {test[f'expert:{t}'][t]:.3f}" for t in experts)
        + "; base encoder with each head: " + ", ".join(f"{t} {v:.3f}" for t, v in test["base"].items()))

    log(f"[seed {seed}] task arithmetic, lambda grid {list(settings.ta_lambdas)} on validation")
    ta_label, ta_folder, ta_grid = choose_on_validation(
        [(f"ta-lambda{lam:g}", {"lambda": lam}) for lam in settings.ta_lambdas], base, experts, "task_arithmetic",
        evaluator, merges)
    ta_lambda = next(g["parameters"]["lambda"] for g in ta_grid if g["label"] == ta_label)
    test["task_arithmetic"] = evaluator.score(ta_folder, "test")
    test["ta_own_layers"] = evaluator.score_own_layers(ta_folder, experts, "test")
    labels = {"task_arithmetic": ta_label}

    log(f"[seed {seed}] TIES, density {list(settings.ties_densities)} x lambda {list(settings.ties_lambdas)}")
    ties_label, ties_folder, ties_grid = choose_on_validation(
        [(f"ties-density{d:g}-lambda{lam:g}", {"density": d, "lambda": lam})
         for d in settings.ties_densities for lam in settings.ties_lambdas], base, experts, "ties", evaluator, merges)
    test["ties"] = evaluator.score(ties_folder, "test")
    labels["ties"] = ties_label

    tensors = unit_tensor_count(base)
    variants = [("fda_ta_gauss", "gauss", settings.fda.sigma), ("fda_ta_weights", "weights", settings.fda.sigma)]
    if settings.fda.extra_sigma:
        variants.append((f"fda_ta_gauss_sigma{settings.fda.extra_sigma:g}", "gauss", settings.fda.extra_sigma))
    fda_runs = {}
    for name, init, sigma in variants:
        log(f"[seed {seed}] FDA, TA init (alpha {ta_lambda:g} per expert), {init} anchors"
            + (f" sigma {sigma:g}" if init == "gauss" else ""))
        folder, record = run_fda(fda_config(settings, seed, base, experts, ta_folder, ta_lambda, init, sigma),
                                 merges, name, tensors)
        test[name] = evaluator.score(folder, "test")
        labels[name] = f"FDA({ta_label}, {init}" + (f", sigma {sigma:g})" if init == "gauss" else ")")
        fda_runs[name] = record
        log(f"    {name}: test {_fmt(test[name])}, mean {mean(test[name]):.3f}; gradient alignment "
            f"{record['mean_initial_alignment']:.3f} -> {record['mean_alignment']:.3f}, adaptation loss x"
            f"{record['mean_adapt_loss_ratio']:.3f} ({record['seconds']}s)")

    if not keep:
        shutil.rmtree(merges, ignore_errors=True)
    return {"seed": seed, "test": test, "labels": labels, "ta_grid": ta_grid, "ties_grid": ties_grid,
            "fda": fda_runs, "training": training, "task_vector_norms": task_vector_norms(base, experts),
            "gap_recovered": gaps(test, list(experts)), "seconds": round(time.perf_counter() - began, 1)}


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{t} {v:.3f}" for t, v in scores.items())


def expert_own(test: dict[str, dict], task_names: list[str]) -> dict[str, float]:
    return {t: test[f"expert:{t}"][t] for t in task_names}


def gap_rows(test: dict[str, dict]) -> list[str]:
    return [k for k in test if k.startswith("fda_")] + ["ties", "ta_own_layers"]


def gaps(test: dict[str, dict], task_names: list[str]) -> dict[str, dict]:
    """(X − TA) / (expert − TA) per task and on the task mean (None where the gap is 0)."""
    own, ta = expert_own(test, task_names), test["task_arithmetic"]
    out = {}
    for name in gap_rows(test):
        per_task = {t: None if abs(own[t] - ta[t]) < 1e-12 else (test[name][t] - ta[t]) / (own[t] - ta[t])
                    for t in task_names}
        gap = mean(own) - mean(ta)
        out[name] = {"mean": None if abs(gap) < 1e-12 else (mean(test[name]) - mean(ta)) / gap,
                     "per_task": per_task}
    return out


# --- report -----------------------------------------------------------------------------------------------

def rows(runs: list[dict]) -> list[tuple[str, str | None]]:
    fixed = [("majority class", "majority_class"), ("base encoder + expert heads", "base"),
             ("expert (own task)", None), ("task arithmetic", "task_arithmetic"), ("TIES", "ties")]
    names = {"fda_ta_gauss": "FDA, TA init, gauss", "fda_ta_weights": "FDA, TA init, weights"}
    fda = [(names.get(k, f"FDA, TA init, {k[len('fda_ta_'):]}"), k) for k in runs[0]["test"] if k.startswith("fda_")]
    return fixed + fda + [("TA with the task's own expert layers (bound for FDA)", "ta_own_layers")]


def row_values(run: dict, key: str | None, task_names: list[str]) -> dict[str, float]:
    scores = expert_own(run["test"], task_names) if key is None else {t: run["test"][key][t] for t in task_names}
    return {**scores, "mean": statistics.fmean(scores.values())}


def summarize(runs: list[dict], task_names: list[str]) -> dict:
    summary: dict = {"accuracy": {}, "gap_recovered": {}, "fda_diagnostics": {}, "chosen": {}}
    for label, key in rows(runs):
        summary["accuracy"][label] = {}
        for column in [*task_names, "mean"]:
            m, s = spread([row_values(r, key, task_names)[column] for r in runs])
            summary["accuracy"][label][column] = {"mean": m, "std": s}
    for name in gap_rows(runs[0]["test"]):
        values = [r["gap_recovered"][name]["mean"] for r in runs if r["gap_recovered"][name]["mean"] is not None]
        if values:
            m, s = spread(values)
            summary["gap_recovered"][name] = {"mean": m, "std": s, "per_seed": values}
    for name in runs[0]["fda"]:
        summary["fda_diagnostics"][name] = {
            k: spread([r["fda"][name][k] for r in runs])[0]
            for k in ("mean_initial_alignment", "mean_alignment", "mean_adapt_loss_ratio", "seconds")}
    summary["chosen"] = {r["seed"]: r["labels"] for r in runs}
    return summary


def table(summary: dict, task_names: list[str], seeds: int) -> str:
    plus = seeds > 1
    lines = [f"| model | {' | '.join(task_names)} | mean |", "|" + "---|" * (len(task_names) + 2)]
    for label, columns in summary["accuracy"].items():
        cells = [f"{columns[c]['mean']:.3f}" + (f" ± {columns[c]['std']:.3f}" if plus else "")
                 for c in [*task_names, "mean"]]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


GAP_NAMES = {"ties": "TIES", "ta_own_layers": "Bound (TA with the task's own expert layers)"}


# --- main -------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run (under 2 minutes); its scores mean little")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "distmerge-fda-nlu",
                        help="models and merges go here (trained models are cached across runs)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--fresh", action="store_true", help="retrain the models even if cached")
    parser.add_argument("--keep-merges", action="store_true", help="keep the merged folders and anchors")
    parser.add_argument("--threads", type=int, help="torch threads in this process (default 2)")
    parser.add_argument("--steps", type=int, help="FDA construction steps (default 300; the reference: 1200)")
    parser.add_argument("--adapt-epochs", type=int, help="FDA adaptation epochs (default 100)")
    parser.add_argument("--extra-sigma", type=float, help="also run FDA with Gaussian anchors of this sigma")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.threads:
        settings = replace(settings, threads=args.threads)
    chosen = {"steps": args.steps, "adapt_epochs": args.adapt_epochs, "extra_sigma": args.extra_sigma}
    settings = replace(settings, fda=replace(settings.fda, **{k: v for k, v in chosen.items() if v is not None}))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    runs, seconds = run_seeds(seeds, settings.threads, args.work,
                              lambda seed: run_seed(settings, seed, args.work, args.fresh, args.keep_merges))
    task_names = list(settings.tasks)
    summary = summarize(runs, task_names)
    result = write_result(args.json, argv, settings, seeds, seconds, summary, runs)

    print(f"\nAccuracy on {settings.test} held-out test inputs per task, merged encoder + the task's own expert "
          f"head (seeds {seeds}{', mean ± std' if len(seeds) > 1 else ''}):\n")
    print(table(summary, task_names, len(seeds)))
    print("\nChosen on validation: " + "; ".join(
        f"seed {s}: TA {labels['task_arithmetic']}, TIES {labels['ties']}" for s, labels in summary["chosen"].items()))
    plus = len(seeds) > 1
    for name, gap in summary["gap_recovered"].items():
        label = GAP_NAMES.get(name, labels_name(name))
        print(f"{label}: recovers {gap['mean']:.1%}" + (f" ± {gap['std']:.1%}" if plus else "")
              + " of the TA -> expert gap (task-mean accuracy)")
    for name, d in summary["fda_diagnostics"].items():
        print(f"{labels_name(name)}: anchor gradient alignment (mean cos over layer tensors) "
              f"{d['mean_initial_alignment']:.3f} -> {d['mean_alignment']:.3f} after {settings.fda.steps} steps; "
              f"adaptation loss final/initial {d['mean_adapt_loss_ratio']:.3f}; {d['seconds']:.0f}s")
    print(f"\n{result['seconds']:.0f}s in all; results in {args.json}")
    return 0


def labels_name(name: str) -> str:
    return "FDA (TA init, " + name[len("fda_ta_"):].replace("_", ", ") + ")"


if __name__ == "__main__":
    sys.exit(main())
