"""FDA on the paper's NLG setting (arXiv 2510.21223 §4.1, Table 3): Llama-2-13B with WizardMath-13B-V1.0 and
llama-2-13b-code-alpaca, task arithmetic (lambda 0.5) as the initial merge, the MLP of every decoder layer
adapted, 8192 single-token anchors of the hidden size (5120) per task and layer, 200 construction steps,
50 adaptation epochs (elementwise alpha = 1 on the TA delta, cos loss, Adam lr 1e-2, batch 8192).

    python pipelines/nlg_fda.py --out /shared/runs/nlg-fda                       # the paper's models (hub ids)
    python pipelines/nlg_fda.py --base /m/Llama-2-13b-hf --math /m/WizardMath-13B-V1.0 \\
        --code /m/llama-2-13b-code-alpaca --out /shared/runs/nlg-fda --init weights
    python pipelines/nlg_fda.py --preset tiny --out /tmp/nlg-fda                  # small Llama models, CPU, ~1 min
    distmerge submit pipelines/nlg_fda.py -- --preset tiny --out /tmp/nlg-fda

The run folder gets ``fda.yaml`` (the resolved settings), ``anchors/`` (stage I, one file per layer and task)
and ``merged/`` (the FDA model). A rerun resumes: finished (layer, task) anchors and adapted layers are kept.
Each job declares ``--num-gpus`` (default 1: one GPU per job, jobs queue on a GPU cluster; 0 runs on CPUs).
Inside a Ray job the stages run on the job's cluster (RAY_ADDRESS); run directly, on an embedded Ray.
With ``--eval gsm8k=DATA`` (repeatable: math, mbpp, humaneval, ... as Table 3) the merged model is scored
afterwards by ``distmerge.evaluate``; without it (or without that package) the pipeline ends with the model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# pip packages beyond distmerge's own dependencies; `distmerge submit` installs them for the job.
REQUIREMENTS: list[str] = []

PAPER = {
    "base": "meta-llama/Llama-2-13b-hf",
    "math": "WizardLM/WizardMath-13B-V1.0",
    "code": "layoric/llama-2-13b-code-alpaca",
    "anchors": 8192, "steps": 200, "epochs": 50, "batch_size": 8192,
}
TINY = {"anchors": 64, "steps": 25, "epochs": 5, "batch_size": 64, "hidden": 32, "layers": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pipelines/nlg_fda.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="FDA on Llama-2-13B + WizardMath + code-alpaca (the paper's NLG setting): construct anchors, "
                    "adapt every layer's MLP starting from TA(0.5), write the merged model.",
        epilog="Defaults are the paper's; --preset tiny runs the same pipeline on small local models on a CPU.")
    parser.add_argument("--preset", choices=("tiny",),
                        help="tiny: build a small Llama base + math/code experts here (random weights, CPU, no "
                             "downloads) and run everything end to end in about a minute")
    parser.add_argument("--base", help=f"base model, folder or hub id (default: {PAPER['base']})")
    parser.add_argument("--math", help=f"math expert (default: {PAPER['math']})")
    parser.add_argument("--code", help=f"code expert (default: {PAPER['code']})")
    parser.add_argument("--out", type=Path, default=Path.home() / "distmerge-runs" / "nlg-fda",
                        help="run folder (default: %(default)s); on storage every node sees")
    parser.add_argument("--init", choices=("gauss", "weights"), default="gauss",
                        help="anchor init: gauss (sigma 0.01) or rows of the expert's weights (default: gauss)")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.5, help="TA scale of the initial merge")
    parser.add_argument("--anchors", type=int, help="anchors per task and layer (default: 8192; tiny: 64)")
    parser.add_argument("--steps", type=int, help="construction steps (default: 200; tiny: 25)")
    parser.add_argument("--epochs", type=int, help="adaptation epochs (default: 50; tiny: 5)")
    parser.add_argument("--layers", type=int, nargs="+", help="only these layers (default: all)")
    parser.add_argument("--num-gpus", type=float, help="GPUs per job (default: 1; tiny: 0)")
    parser.add_argument("--num-cpus", type=float, help="CPUs per job (default: 1; tiny: 0.5)")
    parser.add_argument("--memory", help="memory per job, e.g. 40GB (default: not declared)")
    parser.add_argument("--workers", type=int, help="jobs in flight at once (default: as resources admit)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded Ray)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default: %(default)s, as the reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", action="append", default=[], metavar="TASK=DATA",
                        help="after the merge, score merged/ on TASK (gsm8k, math, mbpp, humaneval, ...) over the "
                             "DATA file with distmerge.evaluate; repeat per task; results in OUT/eval/TASK")
    parser.add_argument("--eval-limit", type=int, help="evaluate only the first N examples of each task")
    parser.add_argument("--force", action="store_true", help="replace an existing merged/ folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.preset and (args.base or args.math or args.code):
        parser.error("--preset builds its own models; leave out --base/--math/--code")
    return args


def build_tiny_models(root: Path) -> dict[str, str]:
    """A small Llama base and two experts (base + seeded deltas), built once per run folder."""
    from distmerge.tiny_models import build_family

    if not (root / "expert_1" / "config.json").is_file():
        build_family(root, "llama", experts=2, hidden=TINY["hidden"], layers=TINY["layers"], seed=0)
    return {"base": str(root / "base"), "math": str(root / "expert_0"), "code": str(root / "expert_1")}


def fda_config(args: argparse.Namespace, models: dict[str, str]) -> dict:
    tiny = args.preset == "tiny"
    preset = TINY if tiny else PAPER
    config = {
        "base": models["base"],
        "experts": {"math": models["math"], "code": models["code"]},
        "initial": {"method": "task_arithmetic", "lambda": args.lam},
        "modules": "mlp",
        "anchors": {"count": args.anchors or preset["anchors"], "init": args.init, "sigma": 0.01,
                    "steps": args.steps if args.steps is not None else preset["steps"], "lr": 0.01, "loss": "cos"},
        "adapt": {"param": "elementwise", "sources": "initial", "alpha_init": 1.0, "loss": "cos", "lr": 0.01,
                  "batch_size": preset["batch_size"],
                  "epochs": args.epochs if args.epochs is not None else preset["epochs"]},
        "resources": {"num_cpus": args.num_cpus or (0.5 if tiny else 1),
                      "num_gpus": args.num_gpus if args.num_gpus is not None else (0 if tiny else 1)},
        "seed": args.seed,
        "dtype": args.dtype,
    }
    if args.memory:
        config["resources"]["memory"] = args.memory
    if args.layers:
        config["layers"] = args.layers
    return config


def evaluate_merged(merged: Path, evals: list[str], limit: int | None, out: Path) -> str:
    """Score the merged model on each TASK=DATA with distmerge.evaluate (when installed); a summary fragment."""
    if not evals:
        return ""
    try:
        from distmerge.evaluate import evaluate
    except ImportError:
        print("note: distmerge.evaluate is not installed; skipping --eval", file=sys.stderr)
        return ""
    scores = []
    for spec in evals:
        task, _, data = spec.partition("=")
        result = evaluate(str(merged), task, data or None, out=out / task, limit=limit)
        scores.append(f"{task} {result.score:.3f}")
    return "; " + ", ".join(scores)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import yaml

    from distmerge import fda
    from distmerge.engine.ray_session import ray_session
    from distmerge.errors import DistmergeError

    began = time.perf_counter()
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.preset == "tiny":
        models = build_tiny_models(out / "models")
    else:
        models = {k: getattr(args, k) or PAPER[k] for k in ("base", "math", "code")}
    config = fda_config(args, models)
    (out / "fda.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        with ray_session(args.address):
            built = fda.construct(config, out / "anchors", workers=args.workers, progress=not args.quiet)
            adapted = fda.adapt(config, out / "anchors", out / "merged", workers=args.workers, force=args.force,
                                progress=not args.quiet)
            scores = evaluate_merged(out / "merged", args.eval, args.eval_limit, out / "eval")
    except DistmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ran = adapted.results
    loss = (f", adapt loss {sum(r['initial_loss'] for r in ran) / len(ran):.3f} -> "
            f"{sum(r['final_loss'] for r in ran) / len(ran):.3f} per layer") if ran else ""
    print(f"nlg_fda: {built.jobs} anchor jobs ({built.skipped} reused), {adapted.layers} layers adapted "
          f"({adapted.skipped} reused){loss}, model in {adapted.out}{scores} ({time.perf_counter() - began:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
