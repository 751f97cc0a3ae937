"""AdaMerging's per-worker memory and seconds per step at 1 and 2 Ray Train workers (FSDP2 over theta0 and the
task vectors), on a causal Llama built here with 3 experts, or on given models (``--models DIR`` with ``base``
and ``expert_*``, as ``make_checkpoints.py`` writes them), next-token entropy over random prompts.

    python benchmarks/adamerging_memory.py --hidden 256 --layers 4 --steps 6 --out /tmp/ada-bench
    python benchmarks/adamerging_memory.py --models /work/bench/llama1b --dtype bfloat16 --steps 3 \
        --batch-size 2 --max-length 16 --out /tmp/ada-1b [--merge-upfront]

``--merge-upfront`` sets ``DISTMERGE_ADAMERGING_MERGE_UPFRONT=1``: every tensor merged before the forward (one
whole merged copy per rank, the code before per-layer recomputation), for the comparison.

Prints one JSON line per worker count: the bytes of theta0 + task vectors each rank holds, each rank's peak
RSS (the process: Python, torch and Ray included), and the median seconds per step after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per Train worker")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ada-bench"))
    parser.add_argument("--models", type=Path, help="existing base/ and expert_*/ folders (no build)")
    parser.add_argument("--dtype", default="float32", help="the bank's dtype (theta0, task vectors, compute)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--merge-upfront", action="store_true", help="merge every tensor before the forward")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.merge_upfront:  # read by the Train workers, which inherit the environment of the Ray started here
        os.environ["DISTMERGE_ADAMERGING_MERGE_UPFRONT"] = "1"
    import ray

    from distmerge.adamerging.driver import prepare, train
    from distmerge.tiny_models import build_family

    root = args.out
    models = args.models or root / "models"
    if args.models is None and not (models / f"expert_{args.experts - 1}" / "config.json").exists():
        build_family(root / "models", "llama", experts=args.experts, vocab_size=args.vocab, hidden=args.hidden,
                     layers=args.layers, shard_size="50MB")
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    tasks = [f"t{i}" for i in range(args.experts)]
    for task in tasks:
        rows = [{"text": " ".join(f"w{rng.randrange(4, args.vocab)}" for _ in range(args.max_length))}
                for _ in range(64)]
        (root / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"base": str(models / "base"),
              "experts": {t: str(models / f"expert_{i}") for i, t in enumerate(tasks)},
              "data": {t: str(root / f"{t}.jsonl") for t in tasks}, "granularity": "layer", "steps": args.steps,
              "batches": 1, "batch_size": args.batch_size, "checkpoint_every": args.steps, "max_length": args.max_length,
              "dtype": args.dtype,
              "resources": {"num_cpus": args.num_cpus}}
    ray.init(address="local", num_cpus=max(2, int(max(args.workers) * args.num_cpus) + 1), include_dashboard=False,
             object_store_memory=256 * 1024**2)
    try:
        for workers in args.workers:
            folder = root / f"run-{workers}"
            shutil.rmtree(folder, ignore_errors=True)
            began = time.perf_counter()
            [result] = train([(prepare(config), folder / "result")], folder / "ray", workers)
            seconds = sorted(result["step_seconds"][1:]) or result["step_seconds"]
            print(json.dumps({"workers": workers, "params": result["parameters"], "dtype": args.dtype,
                              "merge": "upfront" if args.merge_upfront else "per layer",
                              "held_mib": [round(b / 2**20, 1) for b in result["held_bytes"]],
                              "peak_rss_mib": [round(b / 2**20) for b in result["peak_rss_bytes"]],
                              "seconds_per_step": round(seconds[len(seconds) // 2], 3),
                              "wall_s": round(time.perf_counter() - began, 1)}), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
