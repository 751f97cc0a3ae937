"""Time and peak worker memory of the issue-17 methods against task arithmetic, in one run on one local Ray.

    python benchmarks/make_checkpoints.py --size small --experts 3 --out /tmp/ckpt-small
    python benchmarks/methods_next.py --models /tmp/ckpt-small --workers 2 [--json results.json]

Every method merges the same family (``make_checkpoints.py``: a base and experts) with the same workers; the
figures are the merge's wall time and each worker's peak anonymous memory (the engine's report). ``regmean``
reads statistics synthesized here (the Gram of 256 seeded rows per linear layer and expert, written in the
format ``distmerge measure regmean`` writes), so its time is the merge's alone, not the measurement's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, model_folders  # noqa: E402

GRAM_ROWS = 256

# label -> (method, parameters, takes the base)
METHODS = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.5}, True),
    "model_stock": ("model_stock", {}, True),
    "slerp": ("slerp", {"t": 0.5}, False),
    "nuslerp": ("nuslerp", {}, False),
    "tsv": ("tsv", {}, True),
    "iso_c": ("iso_c", {}, True),
    "iso_cts": ("iso_cts", {}, True),
    "regmean": ("regmean", {}, False),
}
TWO_MODELS = {"slerp", "nuslerp"}


def synthesize_statistics(experts: list[Path], root: Path) -> Path:
    """A statistics folder for every expert: Grams of seeded inputs for each 2-D ``*_proj`` / ``lm_head`` weight."""
    import torch

    from distmerge.io.checkpoint import Checkpoint
    from distmerge.measure import stats
    from distmerge.ops.regmean import gram_of_inputs

    for index, folder in enumerate(experts):
        checkpoint = Checkpoint(str(folder), folder.name)
        grams, layers = {}, {}
        for name, info in checkpoint.tensors.items():
            if not name.endswith(".weight") or len(info.shape) != 2 or "embed" in name:
                continue
            module = name[: -len(".weight")]
            generator = torch.Generator().manual_seed(index * 100003 + len(grams))
            gram = gram_of_inputs(torch.randn(GRAM_ROWS, info.shape[1], generator=generator))
            grams[module] = gram.total
            layers[module] = stats.layer_entry(checkpoint.read(name), info.shape[1], gram.count)
        # the fingerprint RegMean checks against the expert it merges (distmerge measure records it the same way)
        stats.commit_task(root, folder.name, grams, {"kind": "regmean", "task": folder.name, "model": str(folder),
                                                     "fingerprint": stats.model_fingerprint(checkpoint),
                                                     "layers": layers})
    return root


def run_one(label: str, base: Path, experts: list[Path], workers: int, scratch: Path, statistics: Path) -> dict:
    from distmerge import merge

    method, parameters, takes_base = METHODS[label]
    chosen = experts[:2] if label in TWO_MODELS else experts
    if label == "regmean":
        parameters = {**parameters, "statistics": str(statistics)}
    config = {"method": method, "parameters": parameters, "dtype": "float32",
              "models": [{"model": str(p), "name": p.name} for p in chosen]}
    if takes_base:
        config["base_model"] = str(base)
    out = scratch / label
    began = time.perf_counter()
    result = merge(config, out, workers=workers, force=True, progress=False)
    seconds = time.perf_counter() - began
    shutil.rmtree(out, ignore_errors=True)
    peaks = [r["peak_anon_bytes"] / 2**20 for r in result.worker_reports]
    return {"method": label, "models": len(chosen), "seconds": round(seconds, 2),
            "peak_worker_mib": [round(p) for p in peaks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True, help="a make_checkpoints.py family")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    labels = args.methods.split(",")
    unknown = sorted(set(labels) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")

    from distmerge.engine.ray_session import ray_session

    base, experts = model_folders(args.models)
    scratch = Path(tempfile.mkdtemp(prefix="methods-next-"))
    rows = []
    try:
        statistics = synthesize_statistics(experts, scratch / "stats") if "regmean" in labels else scratch
        with ray_session(None, num_cpus=args.workers):
            for label in labels:
                rows.append(run_one(label, base, experts, args.workers, scratch, statistics))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    reference = next((r["seconds"] for r in rows if r["method"] == "task_arithmetic"), None)
    print(f"\n| method | models | seconds | x TA | peak MiB per worker |\n|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['seconds'] / reference:.2f}" if reference else "-"
        print(f"| {row['method']} | {row['models']} | {row['seconds']} | {ratio} | "
              f"{'+'.join(map(str, row['peak_worker_mib']))} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "models": str(args.models),
                                         "workers": args.workers, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
