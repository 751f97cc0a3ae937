"""Sweep TIES lambda x density on Ray Tune against a validation text set, keep the best merge.

    python pipelines/sweep_ties.py --preset tiny --out /tmp/sweep-ties                 # small Llama models, CPU, ~1 min
    python pipelines/sweep_ties.py --base meta-llama/Llama-2-13b-hf \\
        --expert WizardLM/WizardMath-13B-V1.0=math --expert layoric/llama-2-13b-code-alpaca=code \\
        --data val.jsonl --lambdas 0.5 0.8 1.0 --densities 0.1 0.2 0.3 --out /shared/runs/sweep-ties \\
        --materialize-best
    distmerge submit pipelines/sweep_ties.py -- --preset tiny --out /tmp/sweep-ties

The run folder gets ``sweep.yaml`` (what ran; ``distmerge sweep OUT/sweep.yaml --out OUT/sweep`` does the
same) and ``sweep/``: ``results.csv`` (one row per trial), ``best.yaml`` (ready for ``distmerge merge``),
``metric_vs_lambda.png``, ``metric_vs_density.png``, Tune's logs for TensorBoard in ``tune/`` and, with
``--materialize-best``, ``best_model/``. Inputs are read once by the holder actors; each trial merges in
memory and scores the validation texts (mean NLL per token, lower is better) in ``--eval-chunks`` parts, so
ASHA stops poor trials after the first parts.

``--preset tiny`` builds a small Llama base and two experts here (random weights, nothing downloaded) and
samples its validation texts from their TIES merge at lambda 1.0, density 0.5: the sweep should find that
point or one next to it. Rerun with ``--resume`` after an interruption: only the remaining trials run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# pip packages beyond distmerge's own dependencies; `distmerge submit` installs them for the job.
REQUIREMENTS: list[str] = []

TINY_TARGET = {"lambda": 1.0, "density": 0.5}
TINY_GRID = {"lambdas": [0.5, 1.0, 1.5], "densities": [0.2, 0.5, 0.8]}
DEFAULT_GRID = {"lambdas": [0.5, 0.8, 1.0, 1.2], "densities": [0.1, 0.2, 0.3, 0.5]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pipelines/sweep_ties.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Grid-search TIES lambda x density with Ray Tune (ASHA over chunked evaluation); write the "
                    "results table, best.yaml, plots, and optionally the best merged model.",
        epilog="--preset tiny runs everything on small local models on a CPU in about a minute.")
    parser.add_argument("--preset", choices=("tiny",),
                        help="tiny: build a small Llama base + 2 experts and validation texts here (CPU, no downloads)")
    parser.add_argument("--base", help="base model: local folder or hub id (not with --preset)")
    parser.add_argument("--expert", action="append", default=[], metavar="MODEL[=NAME]",
                        help="an expert: folder or hub id, optionally =NAME (repeat; not with --preset)")
    parser.add_argument("--data", type=Path, help="validation texts: a .jsonl file with a 'text' field per line")
    parser.add_argument("--lambdas", type=float, nargs="+", help="lambda grid (default: %s; tiny: %s)"
                        % (DEFAULT_GRID["lambdas"], TINY_GRID["lambdas"]))
    parser.add_argument("--densities", type=float, nargs="+", help="density grid (default: %s; tiny: %s)"
                        % (DEFAULT_GRID["densities"], TINY_GRID["densities"]))
    parser.add_argument("--trim-scope", choices=("global", "tensor"), default="global",
                        help="TIES trim: global (the paper's) or tensor (mergekit's) (default: %(default)s)")
    parser.add_argument("--eval-chunks", type=int, default=4,
                        help="evaluation parts; ASHA decides after each (default: %(default)s; 1 disables ASHA)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per text (default: %(default)s)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="default: %(default)s")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="default: %(default)s")
    parser.add_argument("--holders", type=int, default=2, help="actors keeping the inputs (default: %(default)s)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path.home() / "distmerge-runs" / "sweep-ties",
                        help="run folder (default: %(default)s); on storage every node sees")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded Ray)")
    parser.add_argument("--materialize-best", action="store_true", help="merge the best config into sweep/best_model")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
    args = parser.parse_args(argv)
    if args.preset and (args.base or args.expert or args.data):
        parser.error("--preset builds its own models and data; leave out --base/--expert/--data")
    if not args.preset and not (args.expert and args.data):
        parser.error("give --preset tiny, or --base, at least one --expert and --data")
    if args.eval_chunks < 1:
        parser.error("--eval-chunks must be at least 1")
    return args


def tiny_inputs(out: Path) -> tuple[str, list[tuple[str, str]], Path]:
    """A small Llama family and validation texts sampled from its TIES merge at TINY_TARGET."""
    from distmerge.engine.driver import merge
    from distmerge.tiny_models import build_family

    models = out / "models"
    if not (models / "base" / "config.json").exists():
        build_family(models, "llama", experts=2, vocab_size=128, hidden=32, layers=3, delta_scale=0.05)
    experts = [(str(models / "expert_0"), "math"), (str(models / "expert_1"), "code")]
    data = out / "val.jsonl"
    if not data.exists():
        target = out / "target"
        config = merge_config(str(models / "base"), experts, {**TINY_TARGET, "trim_scope": "global"}, "float32")
        merge(config, target, force=True, progress=False)
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(target, count=64, length=24)))
    return str(models / "base"), experts, data


def sample_texts(folder: Path, count: int, length: int, seed: int = 0) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        ids = model.generate(torch.full((count, 1), tokenizer.bos_token_id), do_sample=True, top_k=0,
                             max_new_tokens=length, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[1:], skip_special_tokens=True) for row in ids]


def merge_config(base: str, experts: list[tuple[str, str | None]], parameters: dict, dtype: str) -> dict:
    return {"base_model": base, "models": [{"model": m, **({"name": n} if n else {})} for m, n in experts],
            "method": "ties", "parameters": parameters, "dtype": dtype}


def sweep_file(args, base: str, experts, data: Path, grid: dict) -> dict:
    config = merge_config(base, experts, {"lambda": {"grid": grid["lambdas"]}, "density": {"grid": grid["densities"]},
                                          "trim_scope": args.trim_scope}, args.dtype)
    sweep = {"tasks": [{"name": "val", "type": "perplexity", "data": str(data), "max_length": args.max_length}],
             "metric": "val/nll", "search": "grid", "eval_chunks": args.eval_chunks,
             "scheduler": ({"name": "asha", "grace_period": 1, "reduction_factor": 2} if args.eval_chunks > 1
                           else "none"),
             "resources_per_trial": {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
             "holders": args.holders}
    if args.max_concurrent:
        sweep["max_concurrent_trials"] = args.max_concurrent
    return {**config, "sweep": sweep}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    from distmerge.engine.ray_session import ray_session
    from distmerge.errors import DistmergeError

    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with ray_session(args.address):  # one Ray for the tiny preset's target merge and the sweep
            result = run(args, out)
    except DistmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary(), flush=True)
    if args.preset == "tiny" and result.best is not None:
        print(f"sweep_ties: validation texts were sampled at lambda={TINY_TARGET['lambda']}, "
              f"density={TINY_TARGET['density']}; best found lambda={result.best['lambda']}, "
              f"density={result.best['density']}", flush=True)
    print(f"sweep_ties: {len(result.rows)} trial(s) in {time.perf_counter() - began:.1f}s; table "
          f"{result.out / 'results.csv'}", flush=True)
    return 0


def run(args, out: Path):
    """Write OUT/sweep.yaml and run it into OUT/sweep."""
    import yaml

    from distmerge.sweep import run_sweep

    if args.preset == "tiny":
        base, experts, data = tiny_inputs(out)
        grid = dict(TINY_GRID)
    else:
        base, data = args.base, args.data.expanduser().resolve()
        experts = [tuple(e.split("=", 1)) if "=" in e else (e, None) for e in args.expert]
        grid = dict(DEFAULT_GRID)
    grid = {"lambdas": args.lambdas or grid["lambdas"], "densities": args.densities or grid["densities"]}
    path = out / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_file(args, base, experts, data, grid), sort_keys=False))
    return run_sweep(path, out / "sweep", address=args.address, resume=args.resume,
                     materialize_best=args.materialize_best, progress=sys.stderr.isatty())


if __name__ == "__main__":
    sys.exit(main())
