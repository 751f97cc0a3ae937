"""FDA anchor construction: distmerge's stage I against a plain single-process loop of the same math, one run.

    python benchmarks/fda_construct_speed.py [--base DIR --experts DIR DIR ...] [--layers 0,1] [--steps 200]
                                             [--workers N] [--json out.json]

Without ``--base``, a BERT family the shape of all-MiniLM-L6-v2 (6 layers, hidden 384, intermediate 1536, 12
heads; random weights, experts = base + seeded deltas: the cost does not depend on the values) is written to a
temporary folder. The settings are the paper's encoder ones: 64 gaussian anchors x 5 tokens (sigma 0.01), 200
AdamW steps, cos similarity, one job per (layer, task).

* distmerge: ``distmerge.fda.construct`` on an embedded Ray started before the clock (every core, one job per
  core, one torch thread per job), timed from the call to its return: reads, anchors, writes included.
* plain loop: one process, torch's default threads (every core), the jobs one after another: the unit taken from
  ``transformers``' model, ``autograd.grad`` with ``create_graph`` for the anchor gradient, the alignment loss,
  ``autograd.grad`` for the anchors, AdamW. Model loading is not timed.

Reported: seconds of wall per job (the stage's wall over the jobs), each job's own seconds, and the ratio.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

COUNT, TOKENS, SIGMA, LR, WEIGHT_DECAY = 64, 5, 0.01, 1e-2, 0.01


def build_family(root: Path, experts: int) -> tuple[Path, list[Path]]:
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        vocab_size=1000, max_position_embeddings=128)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    model.save_pretrained(root / "base")
    state = model.state_dict()
    folders = []
    for e in range(experts):
        generator = torch.Generator().manual_seed(1 + e)
        with torch.no_grad():
            for tensor in state.values():
                if tensor.is_floating_point():
                    scale = 0.01 * tensor.float().pow(2).mean().sqrt().clamp_min(1e-8)
                    tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
        model.load_state_dict(state)
        model.save_pretrained(root / f"expert_{e}")
        folders.append(root / f"expert_{e}")
        model = BertModel.from_pretrained(root / "base").eval()  # the next expert starts from the base again
        state = model.state_dict()
    return root / "base", folders


def plain_loop(base: str, experts: list[str], layers: list[int], steps: int, seed: int) -> dict:
    """The same math, written plainly, in a process of its own (torch's default threads)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel

    # eager attention: torch's fused CPU attention has no double backward
    base_model = AutoModel.from_pretrained(base, attn_implementation="eager").eval()
    expert_models = [AutoModel.from_pretrained(e, attn_implementation="eager").eval() for e in experts]
    hidden = base_model.config.hidden_size
    jobs = []
    began = time.perf_counter()
    for layer in layers:
        for task, expert_model in enumerate(expert_models):
            job_began = time.perf_counter()
            unit = base_model.encoder.layer[layer]
            target_unit = expert_model.encoder.layer[layer]
            params = [p for p in unit.parameters()]
            for p in params:
                p.requires_grad_(True)
            for p in target_unit.parameters():
                p.requires_grad_(False)
            taus = [t.detach() - p.detach() for p, t in zip(params, target_unit.parameters())]
            generator = torch.Generator().manual_seed(seed + 1000 * layer + task)
            x = (torch.randn((COUNT, TOKENS, hidden), generator=generator) * SIGMA).requires_grad_(True)
            optimizer = torch.optim.AdamW([x], lr=LR, weight_decay=WEIGHT_DECAY)
            best = float("inf")
            for _ in range(steps):
                out = unit(x)
                out = out[0] if isinstance(out, (tuple, list)) else out
                target = target_unit(x)
                target = target[0] if isinstance(target, (tuple, list)) else target
                score = F.cosine_similarity(out.reshape(COUNT, -1), target.reshape(COUNT, -1), dim=1).mean()
                grads = torch.autograd.grad(score, params, create_graph=True)
                loss = sum(1 - F.cosine_similarity(g.reshape(-1), tau.reshape(-1), dim=0) for g, tau in zip(grads, taus))
                (x.grad,) = torch.autograd.grad(loss, [x])
                best = min(best, float(loss.detach()))
                optimizer.step()
            jobs.append({"layer": layer, "task": task, "seconds": time.perf_counter() - job_began, "best_loss": best})
    return {"seconds": time.perf_counter() - began, "jobs": jobs, "threads": torch.get_num_threads()}


def distmerge_construct(base: Path, experts: list[Path], layers: list[int], steps: int, seed: int, workers: int,
                        out: Path) -> dict:
    import ray

    from distmerge.fda.construction import construct

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        config = {"base": str(base), "experts": {f"t{i}": str(e) for i, e in enumerate(experts)}, "layers": layers,
                  "modules": "block", "initial": {"method": "task_arithmetic", "lambda": 0.3},
                  "anchors": {"count": COUNT, "tokens": TOKENS, "init": "gauss", "sigma": SIGMA, "steps": steps,
                              "lr": LR, "weight_decay": WEIGHT_DECAY, "loss": "cos"},
                  "resources": {"num_cpus": 1}, "seed": seed}
        began = time.perf_counter()
        result = construct(config, out, workers=workers, progress=False)
        seconds = time.perf_counter() - began
    finally:
        ray.shutdown()
    return {"seconds": seconds, "jobs": [{"layer": r["layer"], "task": r["task"], "seconds": r["seconds"],
                                          "best_loss": r["best_loss"]} for r in result.results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--experts", type=Path, nargs="*", default=[])
    parser.add_argument("--layers", default="0,1")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    with tempfile.TemporaryDirectory(prefix="fda-construct-speed-") as tmp:
        root = Path(tmp)
        if args.base is None:
            base, experts = build_family(root / "family", 2)
            family = "synthetic BERT (6 x 384, intermediate 1536, 12 heads), 2 experts"
        else:
            base, experts = args.base.resolve(), [e.resolve() for e in args.experts]
            family = f"{base} with {len(experts)} experts"
        jobs = len(layers) * len(experts)
        print(f"plain loop: {jobs} jobs one after another", file=sys.stderr, flush=True)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            plain = pool.submit(plain_loop, str(base), [str(e) for e in experts], layers, args.steps,
                                args.seed).result()
        print(f"distmerge: {jobs} jobs on {args.workers} worker(s)", file=sys.stderr, flush=True)
        ours = distmerge_construct(base, experts, layers, args.steps, args.seed, args.workers, root / "anchors")

    plain_per_job, ours_per_job = plain["seconds"] / jobs, ours["seconds"] / jobs
    report = {"machine": machine_info(), "family": family, "layers": layers, "steps": args.steps,
              "anchors": f"{COUNT} x {TOKENS} gauss (sigma {SIGMA})", "workers": args.workers, "jobs": jobs,
              "plain_loop": plain, "distmerge": ours, "plain_seconds_per_job": plain_per_job,
              "distmerge_seconds_per_job": ours_per_job, "ratio": ours_per_job / plain_per_job}
    print(f"# FDA construction, {report['machine']['date']}: {family}, layers {layers}, {args.steps} steps, "
          f"{report['anchors']}")
    print(f"plain loop (1 process, {plain['threads']} torch threads): {plain['seconds']:.1f} s for {jobs} jobs = "
          f"{plain_per_job:.2f} s per job (each job: " + ", ".join(f"{j['seconds']:.1f}" for j in plain["jobs"]) + ")")
    print(f"distmerge construct ({args.workers} workers, 1 thread each): {ours['seconds']:.1f} s = "
          f"{ours_per_job:.2f} s per job (each job: " + ", ".join(f"{j['seconds']:.1f}" for j in ours["jobs"]) + ")")
    print(f"distmerge / plain loop, per job: {report['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
