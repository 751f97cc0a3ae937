"""Twin-Merging costs: compression time per tensor (exact vs randomized SVD) and routed inference throughput and
memory against the shared expert alone, at batch 1 and 32.

    python benchmarks/twin_bench.py --out benchmarks/results/twin.json                 # CPU, small model
    python benchmarks/twin_bench.py --device cuda --shapes 4096x4096 5120x13824 --hidden 1024 --layers 8

Compression: one random delta per shape with a decaying spectrum (singular values ~ 1/i^0.7), rank r; the time of
``compress_delta`` with svd=exact and svd=randomized (oversample 10, 4 power iterations), and the relative
Frobenius errors of both. Inference: a Llama of ``--hidden``/``--layers`` built here (random weights) with
``--tasks`` LoRA-free experts (base + seeded deltas), a twin folder written by ``distmerge twin build`` (rank r),
then forward passes over random prompts of ``--seq`` tokens: theta* alone, the twin model with fixed weights (the
factors' cost only) and the twin model routing (the router pass over the prompt included).

On the CPU each forward's working memory is the peak RSS above the RSS before the call. glibc keeps freed heap
memory, so that figure reads 0 after the warm-ups unless large blocks are mmapped and returned: run with
``MALLOC_MMAP_THRESHOLD_=65536`` for the memory (which also slows allocation: take throughput from a run without it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def timed(function, repeat: int, device: str) -> float:
    """Median seconds of ``function()`` over ``repeat`` runs after one warm-up."""
    function()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def decaying_delta(shape: tuple[int, int], device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    m, n = shape
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=generator))[0]
    return ((u / torch.arange(1, k + 1).float() ** 0.7) @ v.T).to(device)


def bench_compression(shapes: list[tuple[int, int]], rank: int, device: str, repeat: int) -> list[dict]:
    from distmerge.twin.compress import compress_delta
    from distmerge.twin.config import ExclusiveConfig

    rows = []
    for shape in shapes:
        delta = decaying_delta(shape, device)
        row = {"shape": list(shape), "rank": rank, "device": device}
        for mode in ("exact", "randomized"):
            options = ExclusiveConfig(rank=rank, svd=mode)
            row[f"{mode}_s"] = round(timed(lambda: compress_delta(delta, options, seed=1), repeat, device), 4)
            part = compress_delta(delta, options, seed=1)
            row[f"{mode}_error"] = round(float(torch.linalg.norm(delta - part.dense()) / torch.linalg.norm(delta)), 5)
        row["speedup"] = round(row["exact_s"] / row["randomized_s"], 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def build_twin(root: Path, hidden: int, layers: int, tasks: int, rank: int) -> Path:
    import numpy as np

    from distmerge.tiny_models import build_family
    from distmerge.twin import build

    # llama: transformers 5 reloads a qwen2 folder's word-level test tokenizer as BPE, which encodes nothing
    base, experts = build_family(root / "family", "llama", experts=tasks, vocab_size=512, hidden=hidden,
                                 layers=layers, shard_size="200MB")
    data = {}
    for t in range(tasks):
        generator = np.random.default_rng(t)
        path = root / f"t{t}.jsonl"
        lo = 4 + t * (500 // tasks)
        path.write_text("".join(json.dumps({"text": " ".join(f"w{x}" for x in generator.integers(lo, lo + 40, 16))})
                                + "\n" for _ in range(32)))
        data[f"t{t}"] = str(path)
    config = {"base_model": str(base), "models": [{"model": str(p), "name": f"t{i}"} for i, p in enumerate(experts)],
              "exclusive": {"rank": rank}, "router": {"data": data, "epochs": 5, "batch_size": 32}}
    return build(config, root / "twin", progress=False, force=True, device="cpu").out


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def forward_extra_mib(function) -> float | None:
    """Peak RSS during ``function()`` minus the RSS before it, in MiB (Linux: writing 5 to clear_refs resets the
    peak); None where the kernel does not allow the reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = status_kib("VmRSS")
    function()
    return round((status_kib("VmHWM") - before) / 1024, 1)


def bench_inference(folder: Path, batches: list[int], seq: int, device: str, repeat: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from distmerge.twin import load

    shared = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    twin = load(folder, device=device, dtype=torch.float32)
    tasks = len(twin.twin.tasks)
    rows = []
    for batch in batches:
        ids = torch.randint(4, 500, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
        row = {"batch": batch, "seq": seq, "device": device, "shared_bytes": model_bytes(shared),
               "twin_bytes": model_bytes(twin)}

        def forward(model):
            with torch.inference_mode():
                model(input_ids=ids)

        row["shared_tok_s"] = round(batch * seq / timed(lambda: forward(shared), repeat, device))
        twin.twin.fixed = torch.softmax(torch.randn(batch, tasks), -1).to(device)
        row["twin_fixed_tok_s"] = round(batch * seq / timed(lambda: forward(twin), repeat, device))
        twin.twin.fixed = None
        row["twin_routed_tok_s"] = round(batch * seq / timed(lambda: forward(twin), repeat, device))
        if device == "cuda":
            for name, model in (("shared", shared), ("twin_routed", twin)):
                torch.cuda.reset_peak_memory_stats()
                forward(model)
                row[f"{name}_peak_mib"] = torch.cuda.max_memory_allocated() >> 20
        else:  # the forward's own working memory: the process's peak RSS above what it held before the call
            for name, model, fixed in (("shared", shared, None), ("twin_fixed", twin, "fixed"), ("twin_routed", twin, None)):
                twin.twin.fixed = torch.softmax(torch.randn(batch, tasks), -1) if fixed else None
                row[f"{name}_forward_extra_mib"] = forward_extra_mib(lambda: forward(model))
            twin.twin.fixed = None
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def context() -> dict:
    """Where and under what load the figures were taken (the machine may be shared: the load says how much)."""
    import importlib.metadata as md

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_info

    return {"machine": machine_info(), "load_before": [round(x, 2) for x in os.getloadavg()],
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "torch_threads": torch.get_num_threads(),
            "versions": {p: md.version(p) for p in ("torch", "ray", "transformers", "distmerge")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "1024x2816", "2048x5632"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path("/tmp/distmerge-twin-bench"))
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-compression", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    result = {"command": "python benchmarks/twin_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
              **context(), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "compression": [] if args.skip_compression else bench_compression(shapes, args.rank, args.device,
                                                                                 args.repeat)}
    if not args.skip_inference:
        folder = build_twin(args.root, args.hidden, args.layers, args.tasks, args.rank)
        result["inference"] = bench_inference(folder, args.batches, args.seq, args.device, args.repeat)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
