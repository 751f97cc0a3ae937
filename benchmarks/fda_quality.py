"""Measured quality of FDA against task arithmetic and TIES, on small experts with real skills.

    python benchmarks/fda_quality.py [--quick] [--seeds 0,1,2] [--tasks reverse,add] [--work DIR]
        [--json benchmarks/results/fda_quality.json] [--fresh]

Everything is built here, on the CPU, from nothing (``fda_tasks.py`` holds the tasks and the training loop):

1. a tiny Llama "pretrained" base, trained briefly on a mixture of synthetic sequence tasks (copy, shift, and
   a little of every expert task), so that it is a real starting point that knows the format and has some
   of each skill;
2. one expert per task, fine-tuned from that base on its task only, saved as a Hugging Face folder;
3. merges through distmerge: task arithmetic (lambda chosen on a validation split from a small grid, as the
   papers do), TIES (density and lambda chosen the same way), and FDA through ``distmerge.fda`` with the
   chosen task-arithmetic merge as its initial model (the NLG setting of spec §8.5: MLP units, single-token
   anchors, elementwise alpha = 1 on the merged delta), once with Gaussian and once with weight-row anchors;
4. evaluation: exact match of greedy generation on held-out test prompts (never seen in training, and
   disjoint from the validation prompts used to choose lambda), for every model on every task.

Printed as a table and written as JSON, with the fraction of the TA -> expert gap that FDA recovers:
(FDA - TA) / (expert - TA) on the task-mean exact match. Deterministic given the seed (and the torch thread
count); ``--seeds`` runs several seeds and reports mean and spread. Trained models are cached in ``--work``
under a hash of everything they depend on (``--fresh`` rebuilds them).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fda_tasks as ft  # noqa: E402
from common import machine_info  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "fda_quality.json"


@dataclass(frozen=True)
class FdaSettings:
    modules: str = "mlp"  # mlp: the NLG unit; block: the whole decoder layer (anchors of ``tokens`` tokens)
    tokens: int | None = None
    count: int = 512  # anchors per (layer, task); NLG uses 8192 at width 5120
    sigma: float = 0.01
    steps: int = 200
    lr: float = 1e-2
    adapt_epochs: int = 50
    adapt_lr: float = 1e-2
    adapt_batch: int = 512  # as NLG: batch = anchors per task, so 2 steps per epoch with 2 tasks
    loss: str = "cos"


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...] = ("reverse", "add")
    shape: ft.ModelShape = ft.ModelShape()
    # Mostly generic skills, a little of every expert task: the base knows the format and some of each task.
    base_mixture: tuple[tuple[str, float], ...] = (("copy", 2.0), ("shift", 1.0), ("sort", 1.0), ("reverse", 0.3),
                                                   ("add", 0.3))
    base_train: ft.TrainSettings = ft.TrainSettings(steps=600, lr=3e-3)
    expert_train: ft.TrainSettings = ft.TrainSettings(steps=600, lr=1e-3)
    validation: int = 200  # prompts per task for choosing lambda
    test: int = 500  # prompts per task for the reported scores
    ta_lambdas: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    ties_densities: tuple[float, ...] = (0.2, 0.5)
    ties_lambdas: tuple[float, ...] = (0.7, 1.0, 1.3)
    fda: FdaSettings = FdaSettings()
    threads: int = 2

    def base_key(self, seed: int) -> str:
        """What the trained base depends on, including the task and training code itself."""
        code = hashlib.sha256(Path(ft.__file__).read_bytes()).hexdigest()
        return _digest({"shape": asdict(self.shape), "mixture": self.base_mixture, "base": asdict(self.base_train),
                        "seed": seed, "threads": self.threads, "code": code})

    def expert_key(self, seed: int, task: str) -> str:
        return _digest({"base": self.base_key(seed), "task": task, "expert": asdict(self.expert_train)})


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


QUICK = Settings(base_train=ft.TrainSettings(steps=200, lr=3e-3), expert_train=ft.TrainSettings(steps=150, lr=1e-3),
                 validation=60, test=120, ta_lambdas=(0.5, 1.0), ties_densities=(0.2,), ties_lambdas=(1.0,),
                 fda=FdaSettings(count=128, steps=40, adapt_epochs=20, adapt_batch=128))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- models -----------------------------------------------------------------------------------------------

def build_models(settings: Settings, seed: int, work: Path, fresh: bool) -> tuple[Path, dict[str, Path], dict]:
    """Base and experts as HF folders under ``work``, each cached under the hash of what it depends on."""
    import torch

    record: dict = {}
    base_folder = work / f"base-{settings.base_key(seed)}"

    def train_base(staging: Path) -> dict:
        model = ft.new_model(settings.shape, seed)
        log(f"[seed {seed}] training the base on {dict(settings.base_mixture)} "
            f"({sum(p.numel() for p in model.parameters())} parameters)")
        losses = ft.train(model, dict(settings.base_mixture), settings.base_train, seed, log)
        ft.save(model, staging)
        return {"final_loss": _tail_mean(losses)}

    record["base"] = _cached(base_folder, train_base, fresh, f"[seed {seed}] base")
    experts = {}
    for index, task in enumerate(settings.tasks):
        def train_expert(staging: Path, task=task, index=index) -> dict:
            model = ft.load(base_folder)
            torch.manual_seed(seed * 1000 + index + 1)
            log(f"[seed {seed}] fine-tuning the {task} expert from the base ({settings.expert_train.trainable} weights)")
            losses = ft.train(model, {task: 1.0}, settings.expert_train, seed * 1000 + index + 1, log)
            ft.save(model, staging)
            return {"final_loss": _tail_mean(losses)}

        experts[task] = work / f"expert-{task}-{settings.expert_key(seed, task)}"
        record[f"expert:{task}"] = _cached(experts[task], train_expert, fresh, f"[seed {seed}] {task} expert")
    return base_folder, experts, record


def _cached(folder: Path, build, fresh: bool, what: str) -> dict:
    """``build(staging)`` into ``folder`` unless a complete one is there; returns its training record."""
    record_path = folder / "training.json"
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    if record_path.is_file():
        log(f"{what}: reusing {folder}")
        return json.loads(record_path.read_text())
    staging = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    began = time.perf_counter()
    record = build(staging)
    record["seconds"] = round(time.perf_counter() - began, 1)
    (staging / "training.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return record


def _tail_mean(values: list[float], n: int = 50) -> float:
    tail = values[-n:]
    return round(sum(tail) / max(1, len(tail)), 5)


# --- evaluation -------------------------------------------------------------------------------------------

class Evaluator:
    """Scores a model folder on the validation or test prompts of every task (fixed per seed)."""

    def __init__(self, settings: Settings, seed: int):
        self.sets = {split: {t: ft.sample(t, split, count, seed, unique=True) for t in settings.tasks}
                     for split, count in (("validation", settings.validation), ("test", settings.test))}

    def score(self, folder: Path, split: str) -> dict[str, dict[str, float]]:
        model = ft.load(folder)
        return {t: ft.greedy_scores(model, examples) for t, examples in self.sets[split].items()}

    def unit_error(self, merged: Path, experts: dict[str, Path], modules: str) -> dict[str, float]:
        """How far the merged model's FDA units are from each expert's, on real inputs: per task t and layer l,
        ||u_merged(x) - u_t(x)|| / ||u_t(x)|| over the inputs x that expert t's own unit l sees on t's test
        prompts (teacher-forced), u the MLP or the decoder layer's residual branch (output minus input); the
        mean over layers. This is what FDA optimizes on its anchors, measured where it matters."""
        import torch

        model = ft.load(merged)
        out = {}
        for task, folder in experts.items():
            expert = ft.load(folder)
            ids, mask, _ = ft.collate(self.sets["test"][task])
            errors = []
            for layer in range(len(expert.model.layers)):
                seen = {}
                own = expert.model.layers[layer]
                unit = own.mlp if modules == "mlp" else own
                hook = unit.register_forward_hook(lambda m, args, kwargs, output: seen.update(
                    args=args, kwargs=kwargs, output=output[0] if isinstance(output, tuple) else output),
                    with_kwargs=True)
                with torch.no_grad():
                    # no cache: the merged layer is called with the same kwargs and must not extend it
                    expert(input_ids=ids, attention_mask=mask, use_cache=False)
                hook.remove()
                mine = model.model.layers[layer]
                with torch.no_grad():
                    merged_out = (mine.mlp if modules == "mlp" else mine)(*seen["args"], **seen["kwargs"])
                merged_out = merged_out[0] if isinstance(merged_out, tuple) else merged_out
                expert_out = seen["output"]
                if modules != "mlp":  # the residual branch: both outputs carry the same input x
                    merged_out, expert_out = merged_out - seen["args"][0], expert_out - seen["args"][0]
                keep = mask.bool()
                errors.append(float((merged_out - expert_out)[keep].norm() / expert_out[keep].norm()))
            out[task] = sum(errors) / len(errors)
        return out

    def score_own(self, merged: Path, experts: dict[str, Path], split: str, part: str) -> dict[str, dict[str, float]]:
        """Task t scored on the merge with every tensor whose name holds ``part`` (".mlp.": the MLPs, ".layers.":
        whole decoder layers) replaced by expert t's: what a method that changes only those tensors (FDA's unit)
        could reach at best on t while keeping the merge elsewhere."""
        out = {}
        for task, folder in experts.items():
            model = ft.load(merged)
            own = ft.load(folder).state_dict()
            model.load_state_dict({n: (own[n] if part in n else v) for n, v in model.state_dict().items()})
            out[task] = ft.greedy_scores(model, self.sets[split][task])
        return out


def task_mean(scores: dict[str, dict[str, float]], metric: str = "exact") -> float:
    return statistics.fmean(s[metric] for s in scores.values())


# --- merges ----------------------------------------------------------------------------------------------

def engine_merge(base: Path, experts: dict[str, Path], method: str, parameters: dict, out: Path) -> Path:
    from distmerge import merge

    config = {"base_model": str(base), "models": [{"model": str(p), "name": t} for t, p in experts.items()],
              "method": method, "parameters": parameters}
    merge(config, out, workers=1, force=True, progress=False)
    return out


def choose_on_validation(candidates: list[tuple[str, dict]], base: Path, experts: dict[str, Path], method: str,
                         evaluator: Evaluator, out_root: Path) -> tuple[str, Path, list[dict]]:
    """Merge every candidate, score it on validation, keep the best mean exact match (then mean token
    accuracy, then the earlier candidate)."""
    grid, best = [], None
    for label, parameters in candidates:
        folder = engine_merge(base, experts, method, parameters, out_root / label)
        validation = evaluator.score(folder, "validation")
        entry = {"label": label, "parameters": parameters, "validation": validation,
                 "validation_mean": task_mean(validation), "validation_token_mean": task_mean(validation, "token")}
        grid.append(entry)
        log(f"    {method} {label}: validation exact {entry['validation_mean']:.3f}, "
            f"token {entry['validation_token_mean']:.3f}")
        rank = (entry["validation_mean"], entry["validation_token_mean"])
        if best is None or rank > best[0]:
            best = (rank, label, folder)
    return best[1], best[2], grid


def fda_config(settings: Settings, seed: int, base: Path, experts: dict[str, Path], initial: Path,
               init: str) -> dict:
    fda = settings.fda
    return {"base": str(base), "experts": {t: str(p) for t, p in experts.items()}, "initial": str(initial),
            "modules": fda.modules,
            "anchors": {"count": fda.count, "tokens": fda.tokens, "init": init, "sigma": fda.sigma, "steps": fda.steps,
                        "lr": fda.lr},
            "adapt": {"param": "elementwise", "sources": "initial", "alpha_init": 1.0, "loss": fda.loss,
                      "lr": fda.adapt_lr, "batch_size": fda.adapt_batch, "epochs": fda.adapt_epochs},
            "resources": {"num_cpus": 1}, "seed": seed}


def run_fda(config: dict, out_root: Path, label: str) -> tuple[Path, dict]:
    from distmerge import fda

    anchors, out = out_root / f"anchors-{label}", out_root / label
    shutil.rmtree(anchors, ignore_errors=True)
    began = time.perf_counter()
    built = fda.construct(config, anchors, progress=False)
    adapted = fda.adapt(config, anchors, out, force=True, progress=False, work=out_root / f".work-{label}")
    record = {
        "seconds": round(time.perf_counter() - began, 1),
        "construct": [{k: r[k] for k in ("layer", "task", "initial_loss", "best_loss", "best_step")}
                      for r in built.results],
        "adapt": [{k: r[k] for k in ("layer", "initial_loss", "final_loss")} for r in adapted.results],
    }
    return out, record


# --- one seed ---------------------------------------------------------------------------------------------

def run_seed(settings: Settings, seed: int, work: Path, fresh: bool) -> dict:
    began = time.perf_counter()
    base, experts, training = build_models(settings, seed, work, fresh)
    evaluator = Evaluator(settings, seed)
    merges = work / f"merges-seed{seed}"
    shutil.rmtree(merges, ignore_errors=True)
    merges.mkdir(parents=True)

    test: dict[str, dict] = {}
    labels: dict[str, str] = {}
    test["base"] = evaluator.score(base, "test")
    for task, folder in experts.items():
        test[f"expert:{task}"] = evaluator.score(folder, "test")
    log(f"[seed {seed}] base {_fmt(test['base'])}; "
        + "; ".join(f"{t} expert {_fmt(test[f'expert:{t}'])}" for t in experts))

    log(f"[seed {seed}] task arithmetic, lambda grid {list(settings.ta_lambdas)} on validation")
    ta_label, ta_folder, ta_grid = choose_on_validation(
        [(f"ta-lambda{lam:g}", {"lambda": lam}) for lam in settings.ta_lambdas], base, experts, "task_arithmetic",
        evaluator, merges)
    test["task_arithmetic"] = evaluator.score(ta_folder, "test")
    labels["task_arithmetic"] = ta_label
    unit_errors = {"base": evaluator.unit_error(base, experts, settings.fda.modules),
                   "task_arithmetic": evaluator.unit_error(ta_folder, experts, settings.fda.modules)}
    test["ta_own_mlps"] = evaluator.score_own(ta_folder, experts, "test", ".mlp.")
    test["ta_own_layers"] = evaluator.score_own(ta_folder, experts, "test", ".layers.")

    log(f"[seed {seed}] TIES, density {list(settings.ties_densities)} x lambda {list(settings.ties_lambdas)}")
    ties_label, ties_folder, ties_grid = choose_on_validation(
        [(f"ties-density{d:g}-lambda{lam:g}", {"density": d, "lambda": lam})
         for d in settings.ties_densities for lam in settings.ties_lambdas], base, experts, "ties", evaluator, merges)
    test["ties"] = evaluator.score(ties_folder, "test")
    labels["ties"] = ties_label

    fda_runs = {}
    for init in ("gauss", "weights"):
        name = f"fda_ta_{init}"
        log(f"[seed {seed}] FDA, initial = {ta_label}, {init} anchors")
        folder, record = run_fda(fda_config(settings, seed, base, experts, ta_folder, init), merges, name)
        test[name] = evaluator.score(folder, "test")
        labels[name] = f"FDA({ta_label}, {init})"
        fda_runs[name] = record
        unit_errors[name] = evaluator.unit_error(folder, experts, settings.fda.modules)
        log(f"    {name}: test {_fmt(test[name])} ({record['seconds']}s)")

    if not os.environ.get("FDA_QUALITY_KEEP_MERGES"):
        shutil.rmtree(merges, ignore_errors=True)
    return {"seed": seed, "test": test, "labels": labels, "ta_grid": ta_grid, "ties_grid": ties_grid,
            "fda": fda_runs, "unit_error": unit_errors, "training": training, "gap_recovered": gaps(test, list(experts)),
            "seconds": round(time.perf_counter() - began, 1)}


def _fmt(scores: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{t} {s['exact']:.3f}" for t, s in scores.items())


def expert_own(test: dict[str, dict], task_names: list[str], metric: str = "exact") -> dict[str, float]:
    return {t: test[f"expert:{t}"][t][metric] for t in task_names}


def gaps(test: dict[str, dict], task_names: list[str]) -> dict[str, dict]:
    """Per FDA run (and the own-MLP bound): (X − TA) / (expert − TA), per task and on the task mean (None
    where the gap is 0)."""
    own = expert_own(test, task_names)
    out = {}
    for name in [k for k in test if k.startswith("fda_")] + ["ta_own_mlps", "ta_own_layers"]:
        per_task = {}
        for t in task_names:
            gap = own[t] - test["task_arithmetic"][t]["exact"]
            per_task[t] = None if abs(gap) < 1e-12 else (test[name][t]["exact"] - test["task_arithmetic"][t]["exact"]) / gap
        gap = statistics.fmean(own.values()) - task_mean(test["task_arithmetic"])
        mean = None if abs(gap) < 1e-12 else (task_mean(test[name]) - task_mean(test["task_arithmetic"])) / gap
        out[name] = {"mean": mean, "per_task": per_task}
    return out


# --- report -----------------------------------------------------------------------------------------------

ROWS = (("expert (own task)", None), ("base", "base"), ("task arithmetic", "task_arithmetic"), ("TIES", "ties"),
        ("FDA, TA init, gauss", "fda_ta_gauss"), ("FDA, TA init, weights", "fda_ta_weights"),
        ("TA with the task's own expert MLPs (bound for MLP-only FDA)", "ta_own_mlps"),
        ("TA with the task's own expert decoder layers (bound for block FDA)", "ta_own_layers"))


def row_values(run: dict, key: str | None, task_names: list[str], metric: str) -> dict[str, float]:
    scores = expert_own(run["test"], task_names, metric) if key is None else \
        {t: run["test"][key][t][metric] for t in task_names}
    return {**scores, "mean": statistics.fmean(scores.values())}


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], task_names: list[str]) -> dict:
    summary: dict = {"exact": {}, "token": {}, "gap_recovered": {}, "chosen": {}}
    for metric in ("exact", "token"):
        for label, key in ROWS:
            columns = {}
            for column in [*task_names, "mean"]:
                mean, std = spread([row_values(r, key, task_names, metric)[column] for r in runs])
                columns[column] = {"mean": mean, "std": std}
            summary[metric][label] = columns
        for task in task_names:  # every expert on every task: what each one forgets
            columns = {}
            for column in [*task_names, "mean"]:
                values = []
                for r in runs:
                    scores = {t: r["test"][f"expert:{task}"][t][metric] for t in task_names}
                    values.append(statistics.fmean(scores.values()) if column == "mean" else scores[column])
                mean, std = spread(values)
                columns[column] = {"mean": mean, "std": std}
            summary[metric][f"{task} expert, every task"] = columns
    for name in ("fda_ta_gauss", "fda_ta_weights", "ta_own_mlps", "ta_own_layers"):
        values = [r["gap_recovered"][name]["mean"] for r in runs if r["gap_recovered"][name]["mean"] is not None]
        if values:
            mean, std = spread(values)
            summary["gap_recovered"][name] = {"mean": mean, "std": std, "per_seed": values}
    summary["unit_error"] = {}
    for name in runs[0]["unit_error"]:
        columns = {}
        for column in [*task_names, "mean"]:
            values = [(statistics.fmean(r["unit_error"][name].values()) if column == "mean"
                       else r["unit_error"][name][column]) for r in runs]
            mean, std = spread(values)
            columns[column] = {"mean": mean, "std": std}
        summary["unit_error"][name] = columns
    summary["chosen"] = {r["seed"]: r["labels"] for r in runs}
    return summary


def table(summary: dict, task_names: list[str], metric: str, seeds: int) -> str:
    plus = seeds > 1
    head = f"| model | {' | '.join(task_names)} | mean |"
    lines = [head, "|" + "---|" * (len(task_names) + 2)]
    for label, columns in summary[metric].items():
        cells = [f"{columns[c]['mean']:.3f}" + (f" ± {columns[c]['std']:.3f}" if plus else "")
                 for c in [*task_names, "mean"]]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "ray", "transformers", "safetensors", "distmerge")}


# --- main -------------------------------------------------------------------------------------------------

def run_seeds(seeds: list[int], threads: int, work: Path, run_one) -> tuple[list[dict], float]:
    """``run_one(seed)`` for every seed, inside a private local Ray instance (2 CPUs, no dashboard); the runs
    and the seconds they took."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per loaded model would bury the log
    transformers_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024**2)
    try:
        runs = [run_one(seed) for seed in seeds]
    finally:
        ray.shutdown()
    return runs, time.perf_counter() - began


def write_result(path: Path, argv, settings, seeds: list[int], seconds: float, summary: dict, runs: list[dict]) -> dict:
    """The JSON record of a benchmark run: command, machine, versions, settings, summary and every run."""
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "versions": versions(), "settings": asdict(settings), "seeds": seeds,
              "seconds": round(seconds, 1), "summary": summary, "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run (minutes); its scores mean little")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--tasks", help=f"comma-separated expert tasks (default reverse,add; any of {ft.TASKS})")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "distmerge-fda-quality",
                        help="models and merges go here (trained models are cached across runs)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--fresh", action="store_true", help="retrain the models even if cached")
    parser.add_argument("--expert-weights", choices=("all", "mlp"), default="all",
                        help="what fine-tuning moves: all weights (default) or only the MLPs (FDA's NLG unit)")
    parser.add_argument("--threads", type=int, help="torch threads in this process (default 2)")
    training = parser.add_argument_group("model and training (defaults: hidden 64, 2 layers, MLP 4x; base 600 steps "
                                         "at 3e-3, experts 600 steps at 1e-3)")
    for flag, kind in (("base-steps", int), ("expert-steps", int), ("expert-lr", float), ("hidden", int),
                       ("layers", int)):
        training.add_argument(f"--{flag}", type=kind, dest=flag.replace("-", "_"))
    fda = parser.add_argument_group("FDA settings (defaults: the NLG setting scaled to this model)")
    fda.add_argument("--modules", choices=("mlp", "block"), help="FDA's unit: the MLP (default) or the whole layer")
    fda.add_argument("--tokens", type=int, help="tokens per anchor (block units; default 8)")
    for flag, kind in (("count", int), ("sigma", float), ("steps", int), ("lr", float), ("adapt-epochs", int),
                       ("adapt-lr", float), ("adapt-batch", int)):
        fda.add_argument(f"--{flag}", type=kind, dest=f"fda_{flag.replace('-', '_')}", help=f"FDA {flag}")
    fda.add_argument("--adapt-loss", choices=("cos", "mse", "l1"), dest="fda_loss", help="FDA adaptation loss")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.tasks:
        names = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        unknown = [t for t in names if t not in ft.TASKS]
        if unknown or len(names) < 2:
            raise SystemExit(f"--tasks: need at least two of {', '.join(ft.TASKS)}, got {args.tasks!r}")
        settings = replace(settings, tasks=names)
    if args.threads:
        settings = replace(settings, threads=args.threads)
    settings = replace(settings, expert_train=replace(settings.expert_train, trainable=args.expert_weights))
    if args.hidden or args.layers:
        hidden = args.hidden or settings.shape.hidden
        settings = replace(settings, shape=replace(settings.shape, hidden=hidden, intermediate=4 * hidden,
                                                   layers=args.layers or settings.shape.layers))
    if args.base_steps:
        settings = replace(settings, base_train=replace(settings.base_train, steps=args.base_steps))
    if args.expert_steps or args.expert_lr:
        settings = replace(settings, expert_train=replace(settings.expert_train, steps=args.expert_steps or
                                                          settings.expert_train.steps,
                                                          lr=args.expert_lr or settings.expert_train.lr))
    chosen = {k[len("fda_"):]: v for k, v in vars(args).items() if k.startswith("fda_") and v is not None}
    if args.modules == "block":
        chosen.update(modules="block", tokens=args.tokens or 8)
    settings = replace(settings, fda=replace(settings.fda, **chosen))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    runs, seconds = run_seeds(seeds, settings.threads, args.work,
                              lambda seed: run_seed(settings, seed, args.work, args.fresh))
    task_names = list(settings.tasks)
    summary = summarize(runs, task_names)
    result = write_result(args.json, argv, settings, seeds, seconds, summary, runs)

    print(f"\nExact match of greedy generation on {settings.test} held-out test prompts per task "
          f"(seeds {seeds}{', mean ± std' if len(seeds) > 1 else ''}):\n")
    print(table(summary, task_names, "exact", len(seeds)))
    print("\nPer-token accuracy of the same greedy outputs:\n")
    print(table(summary, task_names, "token", len(seeds)))
    print(f"\nRelative error of the merged {settings.fda.modules} units against each task's expert, on the inputs "
          "the expert's own units see on that task's test prompts (mean over layers; lower is closer):\n")
    print(table({"rows": summary["unit_error"]}, task_names, "rows", len(seeds)))
    print("\nChosen on validation: " + "; ".join(
        f"seed {s}: TA {labels['task_arithmetic']}, TIES {labels['ties']}" for s, labels in summary["chosen"].items()))
    names = {"fda_ta_gauss": "FDA (TA init, gauss)", "fda_ta_weights": "FDA (TA init, weights)",
             "ta_own_mlps": "Bound for MLP-only FDA (TA with the task's own expert MLPs)",
             "ta_own_layers": "Bound for block FDA (TA with the task's own expert decoder layers)"}
    for name, gap in summary["gap_recovered"].items():
        print(f"{names[name]}: recovers {gap['mean']:.1%}" + (f" ± {gap['std']:.1%}" if len(seeds) > 1 else "")
              + " of the TA -> expert gap (task-mean exact match)")
    print(f"\n{result['seconds']:.0f}s in all; results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
