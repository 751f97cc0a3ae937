"""The methods of issue 17 on the encoder track (RegMean with its statistics measured here), as ``table.py`` runs the others: each method's parameters
chosen on the validation split (mean normalized accuracy), reported on test, for one seed's cached build.
The rows of ``table.py`` (TA, TIES, EMR, FDA) for the same build are in results/realbench_encoder.json; merges
are deterministic, so the two tables compare row for row.

    python -m benchmarks.realbench.next_methods --seed 0 [--work /tmp/rb_work] [--methods della_linear,iso_c]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.realbench import data, encoder, report
from benchmarks.realbench.table import RESULTS, choose

ALPHAS = (0.5, 1.0, 1.5, 2.0, 3.0)  # 1.5 was the edge of a first grid for TSV and Iso-C/CTS
ISO_ALPHAS = ALPHAS + (4.0, 6.0)  # Iso-C/CTS still rose at 3.0 on the first run
# (row name, method, candidates): grids as small as table.py's, around each paper's or mergekit's default
CANDIDATES = [
    # references on the same build (table.py's grids), so that the table compares within one build
    ("task_arithmetic", "task_arithmetic", [(f"ta-lambda{x:g}", {"lambda": x}) for x in (0.3, 0.5, 0.7, 1.0)]),
    ("ties_tensor", "ties", [(f"ties-tensor-density{d:g}-lambda{x:g}", {"density": d, "lambda": x,
                                                                         "trim_scope": "tensor"})
                             for d in (0.2, 0.5) for x in (1.0, 1.5)]),
    ("breadcrumbs", "breadcrumbs", [(f"breadcrumbs-lambda{x:g}", {"lambda": x, "density": 0.9, "gamma": 0.01})
                                    for x in (0.5, 1.0)]),
    ("breadcrumbs_ties", "breadcrumbs_ties", [(f"breadcrumbs-ties-density{d:g}", {"lambda": 1.0, "density": d,
                                                                                  "gamma": 0.01})
                                              for d in (0.5, 0.9)]),
    ("della", "della", [(f"della-density{d:g}", {"lambda": 1.0, "density": d, "epsilon": 0.15}) for d in (0.5, 0.7)]),
    ("della_linear", "della_linear", [(f"della-linear-density{d:g}-lambda{x:g}",
                                       {"lambda": x, "density": d, "epsilon": 0.15})
                                      for d in (0.5, 0.7) for x in (0.5, 1.0)]),
    ("model_stock", "model_stock", [("model-stock", {})]),
    ("tsv", "tsv", [(f"tsv-alpha{a:g}", {"alpha": a}) for a in ALPHAS]),
    ("iso_c", "iso_c", [(f"iso-c-alpha{a:g}", {"alpha": a}) for a in ISO_ALPHAS]),
    ("iso_cts", "iso_cts", [(f"iso-cts-alpha{a:g}", {"alpha": a}) for a in ISO_ALPHAS]),
    # RegMean's statistics: each expert's Grams on its own training texts (regmean_statistics below)
    ("regmean", "regmean", [(f"regmean-alpha{a:g}", {"alpha": a}) for a in (0.5, 0.9)]),
]
MEASURE_ROWS = 200  # training texts per expert for RegMean's Grams (of the 800 each was fine-tuned on)


def regmean_statistics(experts: dict[str, Path], work: Path, max_tokens: int) -> Path:
    """``distmerge measure regmean`` on each expert's own training texts (labels unused), as a user would."""
    from distmerge.measure.regmean import measure

    folder = work / "regmean-data"
    folder.mkdir(parents=True, exist_ok=True)
    splits = data.load_all()
    tasks = []
    for task, path in experts.items():
        rows = splits[task]["train"][:MEASURE_ROWS]
        (folder / f"{task}.jsonl").write_text("".join(json.dumps({"text": e.text}) + "\n" for e in rows))
        tasks.append({"name": task, "model": str(path), "data": str(folder / f"{task}.jsonl")})
    out = work / "regmean-stats"
    measure({"tasks": tasks, "model_class": "encoder", "max_length": max_tokens, "batch_size": 32}, out,
            progress=False)
    return out


def run(seed: int, work: Path, log, names: list[str] | None = None) -> dict:
    import ray

    began = time.perf_counter()
    build_dir = encoder.build(work, seed, encoder.TrainSettings(), log=log)  # cached: no training when built
    manifest = encoder.read_build(build_dir)
    base, experts = Path(manifest["base"]), encoder.experts(build_dir)
    scorer = encoder.Scorer(build_dir)
    merges = work / f"merges-next-seed{seed}"
    shutil.rmtree(merges, ignore_errors=True)
    merges.mkdir(parents=True)
    tasks = list(data.TASKS)
    own_validation = {t: scorer.score(p, "validation", tasks=(t,))[t] for t, p in experts.items()}
    own_test = {t: scorer.score(p, "test", tasks=(t,))[t] for t, p in experts.items()}
    rows, chosen, grids, seconds = {}, {}, {}, {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one Ray for every merge of the run
    try:
        for name, method, candidates in CANDIDATES:
            if names is not None and name not in names:
                continue
            log(f"[seed {seed}] {name}")
            started = time.perf_counter()
            if method == "regmean":
                statistics = regmean_statistics(experts, merges, scorer.max_tokens)
                candidates = [(label, {**params, "statistics": str(statistics)}) for label, params in candidates]
            best, folder, grid = choose(candidates, method, base, experts, scorer, own_validation, merges, log)
            rows[name] = report.score_record(scorer.score_merge(folder, "test"), own_test)
            chosen[name], grids[name] = best, grid
            seconds[name] = round(time.perf_counter() - started, 1)
            log(f"    chosen {best['label']}: test normalized {rows[name]['mean_normalized']:.4f}")
    finally:
        ray.shutdown()
        shutil.rmtree(merges, ignore_errors=True)
    return {"seed": seed, "build": build_dir.name, "tasks": tasks, "rows": rows, "chosen": chosen, "grids": grids,
            "seconds_per_method": seconds, "seconds": round(time.perf_counter() - began, 1)}


def merged_record(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s rows replacing or joining its own: only for the same build (same experts)."""
    if old.get("build") != new["build"] or old.get("seed") != new["seed"]:
        raise SystemExit(f"realbench: {old.get('build')} (seed {old.get('seed')}) in the record, {new['build']} "
                         f"(seed {new['seed']}) here: not the same build; write to another --json")
    out = dict(old)
    for key in ("rows", "chosen", "grids", "seconds_per_method"):
        out[key] = {**old.get(key, {}), **new[key]}
    out["seconds"] = round(old.get("seconds", 0) + new["seconds"], 1)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rb_work"))
    parser.add_argument("--json", type=Path, default=RESULTS / "realbench_encoder_next.json")
    parser.add_argument("--methods", help="only these rows (comma list), merged into --json's record of the same build")
    args = parser.parse_args(argv)
    names = args.methods.split(",") if args.methods else None
    known = [name for name, _, _ in CANDIDATES]
    if names is not None and set(names) - set(known):
        parser.error(f"--methods: unknown {sorted(set(names) - set(known))}; known: {', '.join(known)}")
    result = run(args.seed, args.work, lambda message: print(message, flush=True), names)
    if names is not None and args.json.is_file():
        result = merged_record(json.loads(args.json.read_text()), result)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| method | " + " | ".join(result["tasks"]) + " | mean | chosen |")
    print("|---|" + "---|" * (len(result["tasks"]) + 2))
    for name, row in result["rows"].items():
        cells = " | ".join(f"{row['normalized'][t]:.3f}" for t in result["tasks"])
        print(f"| {name} | {cells} | {row['mean_normalized']:.3f} | {result['chosen'][name]['label']} |")
    print(f"\n{result['seconds']:.0f}s; {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
