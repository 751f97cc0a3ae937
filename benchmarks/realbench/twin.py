"""Twin-Merging on the encoder track: ``distmerge.twin.build`` on the cached build of a seed (bare all-MiniLM-L6-v2
encoders, each task's Linear head in ``heads/{task}.safetensors``), every task scored with its own head on the
routed encoder (``distmerge.twin.load(kind="model")``), normalized by its expert's own accuracy.

Rows: Twin routed (the router's softmax weights per text), Twin oracle-routed (``model.twin.fixed`` one-hot on
the text's task: theta* + E_t) and theta* alone. The shared lambda and the rank are chosen on the **validation**
split by the routed row (mean normalized accuracy), reported on **test**: one twin build per lambda at the
largest rank, the smaller ranks read from it with ``load(rank=)``. The router trains on the tasks' **train**
texts with their task ids only (at most ``router.max_samples`` per task, a seeded sample). TA, TIES and the
other methods' rows for the same build are read from the track's result files, not recomputed. Compression is
also timed per layer group, exact vs randomized SVD, Ray-free on the chosen theta*.

    python -m benchmarks.realbench.twin --seed 0 [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.realbench import data, encoder, report
from benchmarks.realbench.adamerging import reference_rows
from benchmarks.realbench.table import RESULTS

DEFAULT_JSON = RESULTS / "realbench_encoder_twin.json"
DEFAULT_WORK = Path("/tmp/distmerge-realbench")  # python -m benchmarks.realbench build's default


@dataclass(frozen=True)
class TwinGrid:
    lambdas: tuple[float, ...] = (0.3, 0.5)
    ranks: tuple[int, ...] = (8, 32, 64)  # the build keeps max(ranks); the others are its leading directions
    max_samples: int = 5500  # router samples per task, the reference's
    epochs: int = 50
    workers: int = 2


def router_data(datasets: dict, folder: Path, max_samples: int, seed: int) -> dict[str, Path]:
    """Each task's train texts (a seeded sample of at most ``max_samples``) as jsonl with only a ``text`` field:
    the router learns task ids, never a label, and never sees validation or test texts."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in data.TASKS:
        texts = [e.text for e in datasets[task]["train"]]
        random.Random(f"twin-router/{task}/{seed}").shuffle(texts)
        paths[task] = folder / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:max_samples]))
    return paths


def twin_config(base: Path, experts: dict[str, Path], texts: dict[str, Path], lam: float, rank: int,
                grid: TwinGrid, max_tokens: int, seed: int) -> dict:
    return {"base_model": str(base), "models": [{"model": str(p), "name": t} for t, p in experts.items()],
            "shared": {"method": "task_arithmetic", "parameters": {"lambda": lam}},
            "exclusive": {"rank": rank, "svd": "exact", "seed": seed},
            "router": {"data": {t: str(p) for t, p in texts.items()}, "field": "text", "max_length": max_tokens,
                       "max_samples": grid.max_samples, "epochs": grid.epochs, "seed": seed, "workers": 1}}


def twin_scores(model, scorer: encoder.Scorer, split: str, mode: str, batch_size: int = 200) -> tuple[dict, dict]:
    """Accuracy per task of a routed twin model (mode: routed | oracle), each task with its expert's head; and
    per task, how often the router's largest weight is on the text's own task and the mean weight it gets."""
    import torch

    tasks = list(data.TASKS)
    scores, routing = {}, {}
    for index, task in enumerate(tasks):
        examples = sorted(scorer.datasets[task][split], key=lambda e: len(e.text))
        correct, top, weight = 0, 0, 0.0
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                batch = encoder.encode(scorer.tokenizer, [e.text for e in chunk], scorer.max_tokens)
                model.twin.fixed = (torch.nn.functional.one_hot(torch.full((len(chunk),), index), len(tasks)).float()
                                    if mode == "oracle" else None)
                predicted = encoder.logits(model, scorer.heads[task], batch).argmax(-1)
                correct += int((predicted == torch.tensor([e.label for e in chunk])).sum())
                w = model.twin.weights
                top += int((w.argmax(-1) == index).sum())
                weight += float(w[:, index].sum())
        model.twin.fixed = None
        scores[task] = correct / len(examples)
        routing[task] = {"top1": top / len(examples), "mean_weight": weight / len(examples)}
    return scores, routing


def score_twin(folder: Path, rank: int, scorer: encoder.Scorer, split: str, own: dict, modes=("routed", "oracle")
               ) -> dict:
    from distmerge.twin import load

    model = load(folder, kind="model", rank=rank)
    out = {}
    for mode in modes:
        scores, routing = twin_scores(model, scorer, split, mode)
        out[mode] = {**report.score_record(scores, own), "routing": routing}
    return out


def time_compression(folder: Path, experts: dict[str, Path], rank: int, seed: int) -> dict:
    """Seconds per layer group of ``compress_group`` (one process, one thread, as a Ray task runs it) with the
    exact and the randomized SVD at ``rank`` on the twin folder's theta*, and the mean relative error of each."""
    from distmerge.io.checkpoint import Checkpoint
    from distmerge.lora_extract import layer_groups
    from distmerge.architectures import layer_of
    from distmerge.twin.builder import floating_tensors
    from distmerge.twin.compress import compress_group
    from distmerge.twin.config import ExclusiveConfig
    from distmerge.twin.folder import EXCLUSIVE

    names = floating_tensors(Checkpoint(str(folder), "shared"))
    out = {}
    for mode in ("exact", "randomized"):
        options = ExclusiveConfig(rank=rank, svd=mode, seed=seed)
        groups = {}
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / EXCLUSIVE).mkdir()
            for i, group in enumerate(layer_groups(names)):
                tasks = [(t, Checkpoint(str(p), t)) for t, p in experts.items()]
                began = time.perf_counter()
                result = compress_group(i, group, Checkpoint(str(folder), "shared"), tasks, options, scratch)
                label = layer_of(group[0])[0]
                groups[label] = {"seconds": round(time.perf_counter() - began, 3), "tensors": len(group),
                                 "mean_relative_error": statistics.fmean(result["errors"].values())
                                 if result["errors"] else 0.0}
        out[mode] = {"groups": groups, "seconds": round(sum(g["seconds"] for g in groups.values()), 2)}
    return out


def run(seed: int, work: Path, grid: TwinGrid, json_path: Path, log) -> dict:
    from distmerge.engine.ray_session import ray_session
    from distmerge.twin import build

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fda_quality import machine_info, versions

    began = time.perf_counter()
    build_dir = encoder.build(work, seed, encoder.TrainSettings(), log=log)  # cached: no training when built
    manifest = encoder.read_build(build_dir)
    base, experts = Path(manifest["base"]), encoder.experts(build_dir)
    scorer = encoder.Scorer(build_dir)
    own = {split: {t: scorer.score(p, split, tasks=(t,))[t] for t, p in experts.items()}
           for split in ("validation", "test")}
    folder = work / f"twin-seed{seed}"
    texts = router_data(scorer.datasets, folder / "router-data", grid.max_samples, seed)
    top_rank = max(grid.ranks)
    builds, grid_rows, shared_rows = {}, [], {}
    with ray_session(num_cpus=grid.workers):  # one embedded Ray for every build
        for lam in grid.lambdas:
            out = folder / f"lambda{lam:g}"
            log(f"[seed {seed}] twin build, TA lambda {lam:g}, rank {top_rank}")
            started = time.perf_counter()
            result = build(twin_config(base, experts, texts, lam, top_rank, grid, scorer.max_tokens, seed), out,
                           workers=grid.workers, force=True, progress=False, device="cpu")
            builds[lam] = {"seconds": round(time.perf_counter() - started, 1), "router": result.router,
                           "factor_mb": round(result.factor_bytes / 1e6, 2), "summary": result.summary()}
            log("    " + result.summary())
            shared_rows[lam] = {split: report.score_record(scorer.score(out, split), own[split])
                                for split in ("validation", "test")}
            for rank in grid.ranks:
                validation = score_twin(out, rank, scorer, "validation", own["validation"], modes=("routed",))
                grid_rows.append({"lambda": lam, "rank": rank, "validation": validation["routed"]})
                log(f"    rank {rank}: validation routed {validation['routed']['mean_normalized']:.4f}")
    best = max(grid_rows, key=lambda r: r["validation"]["mean_normalized"])  # first on ties: max keeps it
    lam, rank = best["lambda"], best["rank"]
    chosen = folder / f"lambda{lam:g}"
    tested = score_twin(chosen, rank, scorer, "test", own["test"])
    test_grid = {f"lambda{r['lambda']:g}-rank{r['rank']}": score_twin(folder / f"lambda{r['lambda']:g}", r["rank"],
                                                                       scorer, "test", own["test"])
                 for r in grid_rows}
    rows = {"twin_routed": tested["routed"], "twin_oracle": tested["oracle"], "shared_alone": shared_rows[lam]["test"]}
    report_path = chosen / "twin_report.json"
    twin_report = json.loads(report_path.read_text())
    compression = time_compression(chosen, experts, top_rank, seed)
    record = {
        "command": "python -m benchmarks.realbench.twin " + " ".join(sys.argv[1:]), "machine": machine_info(),
        "versions": versions(), "seed": seed, "build": build_dir.name, "settings": asdict(grid),
        "chosen": {"lambda": lam, "rank": rank, "label": f"lambda{lam:g}-rank{rank}",
                   "by": "validation mean normalized accuracy of the routed row"},
        "rows": rows, "experts_own": own, "reference_rows": reference_rows(build_dir.name),
        "grid_validation": grid_rows, "grid_test": test_grid,
        "shared_alone": {f"lambda{k:g}": v for k, v in shared_rows.items()},
        "builds": {f"lambda{k:g}": v for k, v in builds.items()},
        "router_samples": {t: sum(1 for _ in p.open()) for t, p in texts.items()},
        "relative_error_at_build_rank": {"mean": statistics.fmean(twin_report["relative_error"].values()),
                                         "max": max(twin_report["relative_error"].values())},
        "compression_seconds": compression, "seconds": round(time.perf_counter() - began, 1)}
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    return record


REFERENCE_SHOWN = ("ta_0.3", "task_arithmetic", "ties_global", "ties_tensor", "emr", "fda_gauss", "tsv", "iso_c")


def markdown(record: dict) -> str:
    tasks = list(data.TASKS)
    lines = [f"| model | {' | '.join(tasks)} | mean |", "|" + "---|" * (len(tasks) + 2)]
    label = record["chosen"]["label"]
    names = {"twin_routed": f"Twin routed ({label})", "twin_oracle": f"Twin oracle-routed ({label})",
             "shared_alone": f"theta* alone (TA lambda {record['chosen']['lambda']:g})"}
    for name, row in record["rows"].items():
        cells = " | ".join(f"{row['normalized'][t]:.3f}" for t in tasks)
        lines.append(f"| {names[name]} | {cells} | **{row['mean_normalized']:.3f}** |")
    for name in REFERENCE_SHOWN:
        row = record["reference_rows"].get(name)
        if row:
            cells = " | ".join(f"{row['normalized'][t]:.3f}" for t in tasks)
            chosen = f" ({row['chosen']})" if row.get("chosen") else ""
            lines.append(f"| {name}{chosen} | {cells} | {row['mean_normalized']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(TwinGrid.lambdas))
    parser.add_argument("--ranks", type=int, nargs="+", default=list(TwinGrid.ranks))
    parser.add_argument("--workers", type=int, default=TwinGrid.workers)
    args = parser.parse_args(argv)
    grid = TwinGrid(lambdas=tuple(args.lambdas), ranks=tuple(args.ranks), workers=args.workers)
    record = run(args.seed, args.work, grid, args.json, lambda message: print(message, flush=True))
    print("\n" + markdown(record) + f"\n\n{record['seconds']:.0f}s; {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
