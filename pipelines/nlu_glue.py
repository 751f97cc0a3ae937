"""RoBERTa GLUE experts merged with every engine method and with FDA, each merge evaluated on every task
(the paper's NLU setting, arXiv 2510.21223 Table 7; experts as MergeLM fine-tunes them).

    python pipelines/nlu_glue.py --base /m/roberta-base \\
        --expert cola=/m/roberta-base-cola --expert sst2=/m/roberta-base-sst2 ... \\
        --data /m/glue --out /shared/runs/nlu-glue
    python pipelines/nlu_glue.py --preset tiny --out /tmp/nlu-glue       # small RoBERTa models, CPU
    distmerge submit pipelines/nlu_glue.py -- --preset tiny --out /tmp/nlu-glue

Every merge excludes the classification heads (``.*classifier.*``): each task is scored with its own
expert's head plugged onto the merged encoder, as MergeLM and EMR do. EMR is scored per task on the task's
materialized model (shared backbone + that task's mask and rescaler). FDA starts from TA(0.3) with one
elementwise alpha per expert (the reference's NLU settings; ``--fda-steps``/``--fda-epochs`` shorten it).
``--data DIR`` holds ``TASK.jsonl`` (or .parquet) validation files with GLUE's field names; without it the
tasks' hub datasets are read. The run folder gets ``merged-METHOD/``, ``emr-tasks/TASK/``, ``fda/`` and
``results.json``; the last line printed is the average score of each method.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

# pip packages beyond distmerge's own dependencies; `distmerge submit` installs them for the job.
REQUIREMENTS: list[str] = []

HEADS = r".*classifier.*"
# MergeLM's RoBERTa GLUE settings (TA and DARE scale 0.3; TIES keeps 20 % at scale 1).
METHOD_PARAMETERS = {
    "weight_average": {},
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"lambda": 1.0, "density": 0.2, "trim_scope": "global"},
    "dare": {"drop_rate": 0.9, "then": "task_arithmetic", "lambda": 0.3, "seed": 0},
    "emr": {},
}
ALL_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
TINY_TASKS = ("cola", "rte")  # two labels each, so the tiny experts share one head shape
TINY_ROWS = 48


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pipelines/nlu_glue.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge RoBERTa GLUE experts with weight_average, task_arithmetic, ties, dare, emr and FDA; "
                    "evaluate every merge on every task with the task's own classification head.")
    parser.add_argument("--preset", choices=("tiny",),
                        help="tiny: build a small RoBERTa base and two 2-label experts (cola, rte) "
                             "with synthetic validation rows here (CPU, no downloads)")
    parser.add_argument("--base", help="base model folder (e.g. roberta-base)")
    parser.add_argument("--expert", action="append", default=[], metavar="TASK=PATH",
                        help=f"a fine-tuned expert per GLUE task (repeat; tasks: {', '.join(ALL_TASKS)})")
    parser.add_argument("--data", type=Path, help="folder with TASK.jsonl/.parquet validation files "
                                                  "(default: the tasks' hub datasets)")
    parser.add_argument("--methods", nargs="+", default=[*METHOD_PARAMETERS, "fda"],
                        choices=[*METHOD_PARAMETERS, "fda"], help="what to run (default: all)")
    parser.add_argument("--limit", type=int, help="evaluate at most this many rows per task")
    parser.add_argument("--out", type=Path, default=Path.home() / "distmerge-runs" / "nlu-glue",
                        help="run folder (default: %(default)s); on storage every node sees")
    parser.add_argument("--workers", type=int, default=2, help="merge actors (default: %(default)s)")
    parser.add_argument("--fda-steps", type=int, help="anchor construction steps (default: 1200; tiny: 10)")
    parser.add_argument("--fda-epochs", type=int, help="adaptation epochs (default: 100; tiny: 2)")
    parser.add_argument("--num-gpus", type=float, help="GPUs per FDA job (default: 1; tiny: 0)")
    parser.add_argument("--device", default="auto", help="evaluation device: auto | cpu | cuda")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded Ray)")
    parser.add_argument("--force", action="store_true", help="redo merges whose folders exist")
    args = parser.parse_args(argv)
    if args.preset and (args.base or args.expert):
        parser.error("--preset builds its own models; leave out --base/--expert")
    if not args.preset and (not args.base or not args.expert):
        parser.error("give --preset tiny, or --base and one --expert TASK=PATH per task")
    return args


def parse_experts(items: list[str]) -> dict[str, str]:
    experts = {}
    for item in items:
        task, sep, path = item.partition("=")
        task = task.strip().lower()
        if not sep or task not in ALL_TASKS:
            raise SystemExit(f"error: --expert {item!r}: expected TASK=PATH with TASK one of {', '.join(ALL_TASKS)}")
        experts[task] = path
    return experts


# --- the tiny preset -----------------------------------------------------------------------------

def build_tiny(root: Path) -> tuple[str, dict[str, str], dict[str, list[dict]]]:
    """A small RoBERTa base and one expert per tiny task, all with 2-label heads, plus validation rows."""
    from distmerge.evaluate.tasks import GLUE_FIELDS

    models = root / "models"
    if not (models / f"expert_{len(TINY_TASKS) - 1}" / "config.json").exists():
        from distmerge.tiny_models import build_family

        base, experts = build_family(models, "roberta", experts=len(TINY_TASKS), shard_size="100KB")
        for folder in (base, *experts):
            _two_label_head(folder)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(4, 128)]
    data = {}
    for task in TINY_TASKS:
        first, second = GLUE_FIELDS[task]
        rows = []
        for _ in range(TINY_ROWS):
            row = {first: " ".join(rng.choices(words, k=8)), "label": rng.randrange(2)}
            if second:
                row[second] = " ".join(rng.choices(words, k=8))
            rows.append(row)
        data[task] = rows
    return str(models / "base"), {t: str(models / f"expert_{i}") for i, t in enumerate(TINY_TASKS)}, data


def _two_label_head(folder: Path) -> None:
    """Give a tiny RoBERTa checkpoint a 2-label head (GLUE's binary tasks), seeded by the folder's name."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    if model.config.num_labels == 2:
        return
    generator = torch.Generator().manual_seed(sum(folder.name.encode()))
    hidden = model.classifier.out_proj.in_features
    model.classifier.out_proj = torch.nn.Linear(hidden, 2)
    with torch.no_grad():
        model.classifier.out_proj.weight.copy_(torch.randn(2, hidden, generator=generator) * 0.02)
        model.classifier.out_proj.bias.zero_()
    model.config.num_labels = 2
    model.config.id2label, model.config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    model.save_pretrained(str(folder), max_shard_size="100KB")


# --- merges ------------------------------------------------------------------------------------

def engine_merge(method: str, base: str, experts: dict[str, str], out: Path, workers: int, force: bool) -> Path:
    from distmerge.engine.driver import merge

    target = out / f"merged-{method}"
    if (target / "config.json").exists() and not force:
        return target
    config = {"base_model": base, "models": [{"model": p, "name": t} for t, p in experts.items()],
              "method": method, "parameters": METHOD_PARAMETERS[method], "exclude": [HEADS], "tokenizer": "base"}
    result = merge(config, target, workers=workers, force=force, progress=False)
    print(result.summary(), flush=True)
    return target


def emr_task_models(merged: Path, tasks: list[str], out: Path, force: bool) -> dict[str, Path]:
    from distmerge.emr_task import materialize_task

    folders = {}
    for task in tasks:
        target = out / "emr-tasks" / task
        if force or not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            materialize_task(merged, task, target, force=True)
        folders[task] = target
    return folders


def fda_merge(args: argparse.Namespace, base: str, experts: dict[str, str], out: Path) -> Path:
    from distmerge import fda

    tiny = args.preset == "tiny"
    config = {"base": base, "experts": experts,
              "initial": {"method": "task_arithmetic", "lambda": 0.3, "exclude": [HEADS]},
              "resources": {"num_cpus": 0.5 if tiny else 1,
                            "num_gpus": args.num_gpus if args.num_gpus is not None else (0 if tiny else 1)}}
    steps = args.fda_steps if args.fda_steps is not None else (10 if tiny else None)
    epochs = args.fda_epochs if args.fda_epochs is not None else (2 if tiny else None)
    if steps is not None:
        config["anchors"] = {"steps": steps, **({"count": 16} if tiny else {})}
    if epochs is not None:
        config["adapt"] = {"epochs": epochs, **({"batch_size": 16} if tiny else {})}
    (out / "fda").mkdir(parents=True, exist_ok=True)
    built = fda.construct(config, out / "fda" / "anchors", progress=False)
    adapted = fda.adapt(config, out / "fda" / "anchors", out / "fda" / "merged", force=args.force, progress=False)
    print(f"fda: {built.jobs} anchor jobs ({built.skipped} reused), {adapted.layers} layers adapted "
          f"({adapted.skipped} reused)", flush=True)
    return adapted.out


# --- evaluation --------------------------------------------------------------------------------

def score(model: Path, task: str, expert: str, data, args: argparse.Namespace) -> float:
    from distmerge.evaluate import evaluate

    options = {"batch_size": 16, "device": args.device, "progress": False,
               **({"limit": args.limit} if args.limit else {})}
    result = evaluate(str(model), task, data, head_from=expert, **options)
    return float(result.score)


def task_data(args: argparse.Namespace, task: str, tiny_data: dict[str, list[dict]]):
    if tiny_data:
        return tiny_data[task]
    if args.data is None:
        return None
    for suffix in (".jsonl", ".json", ".parquet"):
        path = args.data / f"{task}{suffix}"
        if path.exists():
            return str(path)
    raise SystemExit(f"error: --data {args.data}: no {task}.jsonl/.json/.parquet")


def quiet_logs() -> None:
    """Ray Data reports every evaluation's execution plan and progress at INFO; keep the job log readable."""
    import logging

    import ray.data  # noqa: F401  (creates the loggers quieted below)

    for name in list(logging.root.manager.loggerDict):
        if name == "ray.data" or name.startswith("ray.data."):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not sys.stderr.isatty():
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    from distmerge.engine.ray_session import ray_session
    from distmerge.errors import DistmergeError

    quiet_logs()
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.preset == "tiny":
        base, experts, tiny_data = build_tiny(out)
    else:
        base, experts, tiny_data = args.base, parse_experts(args.expert), {}
    tasks = list(experts)
    scores: dict[str, dict[str, float]] = {}
    try:
        with ray_session(args.address):
            scores["individual"] = {t: score(Path(experts[t]), t, experts[t], task_data(args, t, tiny_data), args)
                                    for t in tasks}
            for method in args.methods:
                if method == "fda":
                    merged = fda_merge(args, base, experts, out)
                    models = {t: merged for t in tasks}
                elif method == "emr":
                    merged = engine_merge(method, base, experts, out, args.workers, args.force)
                    models = emr_task_models(merged, tasks, out, args.force)
                else:
                    merged = engine_merge(method, base, experts, out, args.workers, args.force)
                    models = {t: merged for t in tasks}
                scores[method] = {t: score(models[t], t, experts[t], task_data(args, t, tiny_data), args)
                                  for t in tasks}
                print(f"{method}: " + ", ".join(f"{t} {s:.4f}" for t, s in scores[method].items()), flush=True)
    except DistmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    averages = {m: sum(s.values()) / len(s) for m, s in scores.items()}
    (out / "results.json").write_text(json.dumps({"tasks": tasks, "scores": scores, "average": averages}, indent=2))
    print(f"nlu_glue: {len(scores) - 1} method(s) x {len(tasks)} task(s) evaluated, results in "
          f"{out / 'results.json'}; average " + ", ".join(f"{m} {a:.4f}" for m, a in averages.items())
          + f" ({time.perf_counter() - began:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
