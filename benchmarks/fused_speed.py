"""Per-chunk compute of the compiled loops (``ops/*_fused.py``) against the torch formulation they replace, in one
process on one thread: each method's reduction passes and merge on one chunk of the engine's size, nanoseconds
per element of the chunk, and whether the two give the same bits.

    python benchmarks/fused_speed.py [--elements 262144] [--tasks 3] [--json out.json]

The inputs are bf16-valued float32 chunks as a worker holds them after its read (a base and T experts), so the
figures are the merge's compute alone: no reading, writing or Ray (``merge_throughput.py`` times those).
Task arithmetic's merge is printed as the yardstick. CPU time of this thread, best of --repeat rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

from distmerge.engine import allocator  # noqa: E402
from distmerge.methods import build_method  # noqa: E402
from distmerge.methods.base import TensorJob  # noqa: E402
from distmerge.methods.execute import PassMemo  # noqa: E402
from distmerge.ops import compiled  # noqa: E402

METHODS = {  # label -> (method, parameters, per-model parameters): merge_throughput.py's settings
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.5}, {}),
    "ties_global": ("ties", {"density": 0.2, "lambda": 1.0, "trim_scope": "global"}, {"density": 0.2}),
    "dare_ta": ("dare", {"drop_rate": 0.9, "then": "task_arithmetic", "lambda": 0.5}, {"drop_rate": 0.9}),
    "emr": ("emr", {}, {}),
}


def chunk(elements: int, tasks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(elements, generator=g) * 0.02).bfloat16().float()
    experts = [(base + torch.randn(elements, generator=g) * 0.002).bfloat16().float() for _ in range(tasks)]
    return base, experts


def run(method, base, experts, job):
    """Every pass over the chunk, then its merge: (final state, merged, [(pass, the state it starts from)])."""
    state, passes = method.initial_state([job]), []
    while (name := method.next_pass(state)) is not None:
        passes.append((name, state))
        state = method.finish_pass(name, method.add_stats(None, name, base, experts, job, 0, state), state)
    result = method.merge(base, experts, job, 0, state)
    if result.partial is not None:  # a reduction that comes with the merge (EMR's rescaler sums)
        state = method.finish_merge(result.partial, state)
    return state, result, passes


def chunk_work(method, base, experts, job, state, passes):
    """What a worker does per chunk: each pass's partial, from what an earlier pass kept where it can (as
    ``execute.pass_partial`` does), and the merge (a pass's finish runs once per model, not per chunk, so it is
    left out)."""
    memo = PassMemo()
    for name, before in passes:
        if method.stats_from_memo(None, name, job, 0, before, memo) is None:
            method.add_stats(None, name, base, experts, job, 0, before, memo)
    method.merge(base, experts, job, 0, state)


def seconds(fn, repeat: int, rounds: int) -> float:
    fn()  # compiles or loads the loops once
    best = float("inf")
    for _ in range(repeat):
        began = time.thread_time()
        for _ in range(rounds):
            fn()
        best = min(best, (time.thread_time() - began) / rounds)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=1 << 18, help="chunk size (the engine's: 2**18)")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if compiled.kernels(lambda jit: True) is None:
        parser.error("numba is not installed: nothing to compare")
    torch.set_num_threads(1)
    allocator.keep_freed_memory()  # as the workers run
    base, experts = chunk(args.elements, args.tasks)
    names = tuple(f"m{t}" for t in range(args.tasks))
    rows = []
    for label, (name, params, per_model) in METHODS.items():
        method = build_method(name, params)
        job = TensorJob(name="model.layers.0.mlp.up_proj.weight", numel=args.elements, model_names=names,
                        weights=(1.0,) * args.tasks, per_model={k: (v,) * args.tasks for k, v in per_model.items()})
        fused_state, fused, passes = run(method, base, experts, job)
        fused_s = seconds(lambda: chunk_work(method, base, experts, job, fused_state, passes), args.repeat, args.rounds)
        os.environ["DISTMERGE_COMPILED"] = "0"  # the torch formulation, as without numba
        try:
            plain_state, plain, plain_passes = run(method, base, experts, job)
            plain_s = seconds(lambda: chunk_work(method, base, experts, job, plain_state, plain_passes), args.repeat,
                              args.rounds)
        finally:
            del os.environ["DISTMERGE_COMPILED"]
        same = torch.equal(fused.merged.view(torch.int32), plain.merged.view(torch.int32)) and all(
            torch.equal(a, plain.artifacts[k]) for k, a in fused.artifacts.items())
        same = same and fused_state == plain_state
        rows.append({"method": label, "torch_ns_per_element": plain_s / args.elements * 1e9,
                     "compiled_ns_per_element": fused_s / args.elements * 1e9, "bit_identical": same})
        print(json.dumps(rows[-1]), flush=True)
    reference = rows[0]["torch_ns_per_element"]
    print(f"\n{args.elements} elements x {args.tasks} experts per chunk, one thread\n")
    print("| method (passes + merge) | torch ns/element | compiled ns/element | speed-up | x TA (torch) "
          "| compiled x TA | same bits |\n|---|---|---|---|---|---|---|")
    for row in rows:
        t, c = row["torch_ns_per_element"], row["compiled_ns_per_element"]
        print(f"| {row['method']} | {t:.2f} | {c:.2f} | {t / c:.1f}x | {t / reference:.1f} | {c / reference:.1f} "
              f"| {'yes' if row['bit_identical'] else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "elements": args.elements, "tasks": args.tasks,
                                         "rows": rows}, indent=2))
    return 0 if all(r["bit_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
