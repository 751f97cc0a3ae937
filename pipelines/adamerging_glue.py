"""AdaMerging on GLUE classifiers: task-wise, layer-wise and ++ coefficients learned on each task's unlabelled
validation inputs (a Ray Train job, FSDP2 workers), against task arithmetic, TIES and the experts, every model
scored on every task with the task's own head (spec algorithms.md section 6; the paper's shape for ViT-B/32:
TA 69.1, TIES 72.4, task-wise 71.1, layer-wise 80.2).

    python pipelines/adamerging_glue.py --base /m/roberta-base \\
        --expert cola=/m/roberta-base-cola --expert rte=/m/roberta-base-rte --data /m/glue --out /shared/runs/ada
    python pipelines/adamerging_glue.py --preset tiny --out /tmp/ada        # small RoBERTa models, CPU
    distmerge submit pipelines/adamerging_glue.py -- --preset tiny --out /tmp/ada

The labels of the validation files are used only to score: AdaMerging reads the text columns alone. The run
folder gets ``merged-METHOD/`` (AdaMerging folders hold lambdas.json/.parquet and a plot), ``data/TASK.jsonl``
for the tiny preset, and ``results.json`` with each task's score and the normalized score (merged / expert).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nlu_glue  # noqa: E402  (the GLUE experts, data and scoring this pipeline shares)

REQUIREMENTS: list[str] = []

VARIANTS = {  # name -> AdaMerging settings
    "adamerging-task": {"granularity": "task", "plus": False},
    "adamerging-layer": {"granularity": "layer", "plus": False},
    "adamerging-task-pp": {"granularity": "task", "plus": True},
    "adamerging-layer-pp": {"granularity": "layer", "plus": True},
}
BASELINES = ("task_arithmetic", "ties")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pipelines/adamerging_glue.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="AdaMerging (task/layer-wise, ++) of GLUE experts against task arithmetic and TIES.")
    parser.add_argument("--preset", choices=("tiny",), help="tiny: the small RoBERTa experts of nlu_glue.py "
                                                            "(2 tasks, synthetic rows; CPU, no downloads)")
    parser.add_argument("--base", help="base model folder (e.g. roberta-base)")
    parser.add_argument("--expert", action="append", default=[], metavar="TASK=PATH", help="one per GLUE task")
    parser.add_argument("--data", type=Path, help="folder with TASK.jsonl/.parquet validation files")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="AdaMerging variants (default: all four; tiny: adamerging-layer)")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    parser.add_argument("--steps", type=int, help="AdaMerging steps (default: 500; tiny: 5)")
    parser.add_argument("--batch-size", type=int, help="rows per task per batch (default: 16; tiny: 8)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: %(default)s)")
    parser.add_argument("--num-cpus", type=float, help="CPUs per Train worker (default: 1; tiny: 0.5)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per Train worker (default: 0)")
    parser.add_argument("--limit", type=int, help="evaluate at most this many rows per task")
    parser.add_argument("--device", default="auto", help="evaluation device: auto | cpu | cuda")
    parser.add_argument("--out", type=Path, default=Path.home() / "distmerge-runs" / "adamerging-glue")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded Ray)")
    parser.add_argument("--force", action="store_true", help="redo merges whose folders exist")
    args = parser.parse_args(argv)
    if args.preset and (args.base or args.expert):
        parser.error("--preset builds its own models; leave out --base/--expert")
    if not args.preset and (not args.base or not args.expert or not args.data):
        parser.error("give --preset tiny, or --base, --data and one --expert TASK=PATH per task")
    return args


def confident_heads(experts: dict[str, str]) -> None:
    """The tiny experts' heads are drawn at scale 0.02, so every prediction is near uniform and the entropy has
    no slope; scale them to 3.0 (once) so the tiny run has something to learn."""
    import torch
    from transformers import AutoModelForSequenceClassification

    for folder in experts.values():
        marker = Path(folder) / "adamerging-heads"
        if marker.exists():
            continue
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        with torch.no_grad():
            model.classifier.out_proj.weight.mul_(150.0)
        model.save_pretrained(folder, max_shard_size="100KB")
        marker.write_text("classifier.out_proj.weight scaled by 150\n")


def write_rows(folder: Path, data: dict[str, list[dict]]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task, rows in data.items():
        path = folder / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[task] = str(path)
    return paths


def data_paths(args: argparse.Namespace, tasks: list[str]) -> dict[str, str]:
    return {t: nlu_glue.task_data(args, t, {}) for t in tasks}


def adamerge(variant: str, args: argparse.Namespace, base: str, experts: dict[str, str], data: dict[str, str],
             out: Path) -> Path:
    from distmerge.adamerging import run

    target = out / f"merged-{variant}"
    if (target / "config.json").exists() and not args.force:
        return target
    tiny = args.preset == "tiny"
    config = {"base": base, "experts": experts, "data": data, **VARIANTS[variant],
              "steps": args.steps if args.steps is not None else (5 if tiny else 500),
              "batch_size": args.batch_size or (8 if tiny else 16), "checkpoint_every": 5 if tiny else 25,
              "resources": {"num_cpus": args.num_cpus or (0.5 if tiny else 1.0), "num_gpus": args.num_gpus}}
    result = run(config, target, workers=args.workers, force=args.force)
    print(f"{variant}: {result.summary()}", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    from distmerge.engine.ray_session import ray_session
    from distmerge.errors import DistmergeError

    nlu_glue.quiet_logs()
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.preset == "tiny":
        base, experts, rows = nlu_glue.build_tiny(out)
        confident_heads(experts)
        data = write_rows(out / "data", rows)
    else:
        base, experts = args.base, nlu_glue.parse_experts(args.expert)
        data = data_paths(args, list(experts))
    variants = args.variants or (["adamerging-layer"] if args.preset == "tiny" else list(VARIANTS))
    tasks = list(experts)
    scores: dict[str, dict[str, float]] = {}
    try:
        with ray_session(args.address):
            scores["individual"] = {t: nlu_glue.score(Path(experts[t]), t, experts[t], data[t], args) for t in tasks}
            for method in [*args.baselines, *variants]:
                if method in VARIANTS:
                    merged = adamerge(method, args, base, experts, data, out)
                else:
                    merged = nlu_glue.engine_merge(method, base, experts, out, args.workers, args.force)
                scores[method] = {t: nlu_glue.score(merged, t, experts[t], data[t], args) for t in tasks}
                print(f"{method}: " + ", ".join(f"{t} {s:.4f}" for t, s in scores[method].items()), flush=True)
    except DistmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    normalized = {m: {t: (s[t] / scores["individual"][t] if scores["individual"][t] else float("nan")) for t in tasks}
                  for m, s in scores.items()}
    averages = {m: sum(s.values()) / len(s) for m, s in scores.items()}
    normalized_avg = {m: sum(s.values()) / len(s) for m, s in normalized.items()}
    (out / "results.json").write_text(json.dumps({"tasks": tasks, "scores": scores, "normalized": normalized,
                                                  "average": averages, "normalized_average": normalized_avg},
                                                 indent=2))
    print(f"adamerging_glue: {len(scores) - 1} method(s) x {len(tasks)} task(s), results in {out / 'results.json'}; "
          "normalized average " + ", ".join(f"{m} {a:.4f}" for m, a in normalized_avg.items())
          + f" ({time.perf_counter() - began:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
