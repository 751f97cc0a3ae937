"""Merge compute per tensor of breadcrumbs and DELLA (or any method below) against task arithmetic, on one thread,
in one process: no reading, writing or Ray, so it measures a method's compute where ``merge_throughput.py``
cannot (a busy machine, or whole-model runs too long for the session: the SVD methods on CPU).

    git archive OLD distmerge | tar -x -C /tmp/ref-before        # the code before a change (optional)
    python benchmarks/sparsify_speed.py --models /work/bench/llama1b --before /tmp/ref-before
    python benchmarks/sparsify_speed.py --models /work/bench/llama1b --methods task_arithmetic,iso_c,tsv,iso_cts,regmean

For one tensor of each shape of the family (layer 0, the embedding, the final norm), with the real task vectors
(expert - base): CPU seconds of ``method.merge`` (best of --repeat) for task_arithmetic, breadcrumbs and DELLA
(the parameters ``merge_throughput.py`` uses), then the whole model's total (each shape's time times its count
in the checkpoint). ``regmean`` solves each 2-D tensor but the embedding with Grams of 256 seeded rows per
expert (``methods_next.py``'s synthetic statistics; the solve's cost does not depend on the rows), and averages
the rest, as the method does. With ``--before``, the older checkout's breadcrumbs/DELLA sparsifiers (its
``ops/sparsify.py`` and ``methods/generalized.py``, loaded beside this one's; the rest is this checkout's) run
too, and their merged tensors are compared byte for byte with this checkout's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from distmerge.methods import build_method, generalized
from distmerge.methods.base import TensorJob

METHODS = {  # name -> (registry name, parameters, per-model parameters): merge_throughput.py's settings
    "task_arithmetic": ("task_arithmetic", {}, {}),
    "breadcrumbs": ("breadcrumbs", {}, {"density": 0.9, "gamma": 0.01}),
    "della": ("della", {}, {"density": 0.7, "epsilon": 0.15}),
    "tsv": ("tsv", {}, {}),  # methods_next.py's settings (the methods' defaults)
    "iso_c": ("iso_c", {}, {}),
    "iso_cts": ("iso_cts", {}, {}),
    "regmean": ("regmean", {}, {}),
}
DEFAULT_METHODS = "task_arithmetic,breadcrumbs,della"
SPARSIFIERS = {"breadcrumbs", "della"}  # the stages --before swaps in
GRAM_ROWS = 256


def regmean_seconds(key: str, experts: list[torch.Tensor], repeat: int) -> tuple[float, torch.Tensor]:
    """RegMean's merge of one tensor with synthetic Grams (the solve, not their reading)."""
    from distmerge.ops.regmean import gram_of_inputs, regmean_linear
    from distmerge.ops.task_vectors import weight_average

    linear = experts[0].dim() == 2 and "embed" not in key
    grams = [gram_of_inputs(torch.randn(GRAM_ROWS, experts[0].shape[1], generator=torch.Generator().manual_seed(i))
                            ).total for i in range(len(experts))] if linear else []
    best, merged = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        merged = (regmean_linear([e.float() for e in experts], grams, 0.9) if linear
                  else weight_average([e.float() for e in experts], (1.0,) * len(experts), True)).to(experts[0].dtype)
        best = min(best, time.process_time() - start)
    return best, merged


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def before_sparsifiers(checkout: Path):
    """This checkout's methods with the older checkout's breadcrumbs and DELLA stages swapped in."""
    old_ops = load_module("before_sparsify", checkout / "distmerge" / "ops" / "sparsify.py")
    old_methods = load_module("before_generalized", checkout / "distmerge" / "methods" / "generalized.py")
    old_methods.sparsify_ops = old_ops
    saved = dict(generalized.SPARSIFY)
    generalized.SPARSIFY.update(breadcrumbs=old_methods.SPARSIFY["breadcrumbs"], della=old_methods.SPARSIFY["della"])
    try:
        yield
    finally:
        generalized.SPARSIFY.update(saved)


class Family:
    def __init__(self, root: Path):
        self.root = root
        self.experts = sorted(p.name for p in root.iterdir() if p.name.startswith("expert_"))
        self.index = json.loads((root / "base" / "model.safetensors.index.json").read_text())["weight_map"]

    def load(self, model: str, key: str) -> torch.Tensor:
        with safe_open(str(self.root / model / self.index[key]), "pt") as handle:
            return handle.get_tensor(key)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """One tensor per shape (the first in the index) -> (shape, how many tensors have it)."""
        first, counts = {}, Counter()
        for key, shard in self.index.items():
            with safe_open(str(self.root / "base" / shard), "pt") as handle:
                shape = tuple(handle.get_slice(key).get_shape())
            counts[shape] += 1
            first.setdefault(shape, key)
        return {key: (shape, counts[shape]) for shape, key in first.items()}


def merge_seconds(method, base, experts, job, repeat: int) -> tuple[float, torch.Tensor]:
    best, merged = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        merged = method.merge(base, experts, job, 0, {}).merged
        best = min(best, time.process_time() - start)
    return best, merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="a family made by make_checkpoints.py")
    parser.add_argument("--before", type=Path, help="an older checkout whose sparsifiers run beside these")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "file"],
                        help="the dtype method.merge gets: float32, what a worker passes by default (its compute "
                             "dtype), or the files' own (bf16; what this script passed before 2026-12-02)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    chosen = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown or "task_arithmetic" not in chosen:
        parser.error(f"--methods: task_arithmetic and any of {', '.join(METHODS)}; unknown: {unknown}")
    torch.set_num_threads(1)
    family = Family(args.models)
    rows, totals, different = [], Counter(), 0
    variants = [("", contextlib.nullcontext)]
    if args.before:
        variants.append((" before", lambda: before_sparsifiers(args.before)))
    for key, (shape, count) in family.shapes().items():
        cast = (lambda t: t.float()) if args.compute_dtype == "float32" else (lambda t: t)
        base = cast(family.load("base", key))
        experts = [cast(family.load(e, key)) for e in family.experts]
        merged_now = {}
        for label in chosen:
            name, params, per_model = METHODS[label]
            if label == "regmean":
                seconds, _ = regmean_seconds(key, experts, args.repeat)
                rows.append({"tensor": key, "shape": list(shape), "count": count, "method": label,
                             "cpu_seconds": seconds})
                totals[label] += seconds * count
                print(f"{key} {list(shape)} x{count}: {label} {seconds * 1000:.0f} ms", flush=True)
                continue
            method = build_method(name, params)
            job = TensorJob(key, base.numel(), tuple(family.experts), (1.0,) * len(experts),
                            {k: (v,) * len(experts) for k, v in per_model.items()})
            for suffix, context in variants if label in SPARSIFIERS else variants[:1]:
                with context():
                    seconds, merged = merge_seconds(method, base, experts, job, args.repeat)
                if suffix:
                    same = merged.dtype == merged_now[label].dtype and torch.equal(
                        merged.view(torch.uint8), merged_now[label].view(torch.uint8))
                    different += not same
                else:
                    merged_now[label] = merged
                rows.append({"tensor": key, "shape": list(shape), "count": count, "method": label + suffix,
                             "cpu_seconds": seconds})
                totals[label + suffix] += seconds * count
                print(f"{key} {list(shape)} x{count}: {label + suffix} {seconds * 1000:.0f} ms", flush=True)
    ta = totals["task_arithmetic"]
    print("\nwhole model (each shape's time x its count), one thread, CPU seconds:")
    for label, seconds in totals.items():
        print(f"  {label}: {seconds:.1f} s ({seconds / ta:.1f}x TA)")
    if args.before:
        print("before and after bit-identical" if not different else f"{different} merged tensor(s) DIFFER")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "totals": dict(totals), "before": str(args.before or ""),
                                         "compute_dtype": args.compute_dtype,
                                         "different": different}, indent=1))
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
