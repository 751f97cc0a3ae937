"""One run, two versions of the code: ``merge_throughput.py`` of an older checkout, then of this one, on the
same models with the same page cache, and a table of seconds and peak memory per worker side by side.

    git worktree add --detach /tmp/ref-before b1eb2bf       # the code before the change
    python benchmarks/before_after.py --before /tmp/ref-before --models /work/bench/llama1b \\
        --methods task_arithmetic,ties_global,dare_ta,emr --workers 1,2 --json benchmarks/results/X.json

Each version runs its own ``merge_throughput.py`` with its own ``distmerge`` (PYTHONPATH), so each measures
itself with its own floor; the ratios that matter (``x TA``, ``x floor``) come from one process each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def measure(checkout: Path, models: Path, methods: str, workers: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, str(checkout / "benchmarks" / "merge_throughput.py"), "--models", str(models),
               "--methods", methods, "--workers", workers, "--json", str(out)]
    print(f"== {checkout}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, env=env, cwd=checkout, check=True)
    return json.loads(out.read_text())


def git_head(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True,
                          text=True).stdout.strip()[:80]


def table(before: dict, after: dict) -> list[str]:
    def rows(result):
        return {(r["label"], r["workers"]): r for r in result["rows"] if r["kind"] == "distmerge"}

    def mib(row, key):
        values = row.get(key) or []
        return "+".join(f"{v / 2**20:.0f}" for v in values) if values else "-"

    old, new = rows(before), rows(after)
    lines = ["| method | workers | before s | after s | after / before | before x TA | after x TA "
             "| peak anon MiB per worker before | after |", "|---|---|---|---|---|---|---|---|---|"]
    for key in [k for k in new if k in old]:
        a, b = old[key], new[key]
        lines.append(f"| {key[0]} | {key[1]} | {a['seconds']:.2f} | {b['seconds']:.2f} | "
                     f"{b['seconds'] / a['seconds']:.2f} | {a['x_ta']:.2f} | {b['x_ta']:.2f} | "
                     f"{mib(a, 'worker_peak_anon_bytes')} | {mib(b, 'worker_peak_anon_bytes')} |")
    for label, result in (("before", before), ("after", after)):
        floor = result.get("floor", {})
        lines.append(f"\n{label}: floor read {floor.get('read_all_seconds', 0):.2f} s + write "
                     f"{floor.get('write_seconds', 0):.2f} s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the older code")
    parser.add_argument("--models", type=Path, required=True, help="a family made by make_checkpoints.py")
    parser.add_argument("--methods", default="task_arithmetic,ties_global,dare_ta,emr")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--json", type=Path, help="both runs' results and the table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        before = measure(args.before.resolve(), args.models, args.methods, args.workers, Path(scratch) / "b.json")
        after = measure(HERE, args.models, args.methods, args.workers, Path(scratch) / "a.json")
    lines = table(before, after)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"before": {"code": git_head(args.before), **before},
                                         "after": {"code": git_head(HERE), **after}, "table": lines},
                                        indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
