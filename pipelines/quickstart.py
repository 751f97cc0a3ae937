"""Quickstart pipeline: merge a base model and its experts with distmerge's engine, load the result with
transformers, generate a few tokens, print a one-line summary.

    python pipelines/quickstart.py --preset tiny --out /tmp/quickstart
    python pipelines/quickstart.py --base meta-llama/Llama-2-13b-hf \\
        --expert WizardLM/WizardMath-13B-V1.0=math --expert layoric/llama-2-13b-code-alpaca=code \\
        --method ties --param density=0.2 --out /shared/runs/ties-13b
    distmerge submit pipelines/quickstart.py -- --preset tiny --out /tmp/quickstart

``--preset tiny`` builds a small Llama base and two experts here (random weights, nothing downloaded) and runs
on a CPU in well under a minute. Inside a Ray job the merge runs on the job's cluster (RAY_ADDRESS is set by
Ray); run directly, on an embedded Ray on this machine. ``--out`` must be on storage the cluster's nodes share.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# pip packages beyond distmerge's own dependencies; `distmerge submit` installs them for the job.
REQUIREMENTS: list[str] = []

METHODS = ("weight_average", "task_arithmetic", "ties", "dare", "emr")
TINY_PARAMETERS = {
    "weight_average": {},
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"lambda": 1.0, "density": 0.2, "trim_scope": "global"},
    "dare": {"drop_rate": 0.9, "then": "task_arithmetic", "lambda": 0.5, "seed": 0},
    "emr": {},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pipelines/quickstart.py",
        description="Merge a base model and experts with distmerge, load the result and generate a few tokens.")
    parser.add_argument("--preset", choices=("tiny",),
                        help="tiny: build a small Llama base + 2 experts locally (CPU, no downloads)")
    parser.add_argument("--base", help="base model: local folder or hub id (not with --preset)")
    parser.add_argument("--expert", action="append", default=[], metavar="MODEL[=NAME]",
                        help="an expert: folder or hub id, optionally =NAME (repeat; not with --preset)")
    parser.add_argument("--method", choices=METHODS, default="ties")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a method parameter, e.g. density=0.2 (repeat; values parsed as YAML scalars)")
    parser.add_argument("--out", type=Path, default=Path.home() / "distmerge-runs" / "quickstart",
                        help="run folder: models/ (tiny preset) and merged-METHOD/ (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="merge actors (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: %(default)s)")
    parser.add_argument("--shard-size", help="output shard size, e.g. 5GB (default: 100KB with --preset tiny so "
                                             "several workers get shards, else distmerge's 1GB)")
    parser.add_argument("--prompt", help="prompt to continue (default: a few tokens of the tiny vocabulary, or "
                                         "'def fibonacci(n):')")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--force", action="store_true", help="replace an existing merged folder")
    args = parser.parse_args(argv)
    if args.preset and (args.base or args.expert):
        parser.error("--preset builds its own models; leave out --base/--expert")
    if not args.preset and not args.expert:
        parser.error("give --preset tiny, or --base and at least one --expert")
    if args.workers < 1 or args.max_new_tokens < 1:
        parser.error("--workers and --max-new-tokens must be at least 1")
    return args


def parse_params(items: list[str]) -> dict:
    import yaml

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --param {item!r}: expected KEY=VALUE")
        params[key.strip()] = yaml.safe_load(value)
    return params


def tiny_models(out: Path) -> tuple[str, list[tuple[str, str]]]:
    from distmerge.tiny_models import build_family

    models = out / "models"
    if not (models / "base" / "config.json").exists():
        build_family(models, "llama", experts=2, vocab_size=256, hidden=32, layers=4, shard_size="60KB")
    return str(models / "base"), [(str(models / "expert_0"), "math"), (str(models / "expert_1"), "code")]


def merge_config(base: str | None, experts: list[tuple[str, str | None]], method: str, params: dict,
                 dtype: str, device: str, shard_size: str | None) -> dict:
    config = {"models": [{"model": m, **({"name": n} if n else {})} for m, n in experts], "method": method,
              "parameters": params, "dtype": dtype, "device": device, "tokenizer": "base"}
    if shard_size:
        config["out_shard_size"] = shard_size
    if base:
        config["base_model"] = base
    return config


def generate(folder: Path, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def quiet_progress_bars() -> None:
    """No per-shard bars in job logs (they are meant for a terminal)."""
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    from distmerge.engine.driver import merge
    from distmerge.errors import DistmergeError

    if not sys.stderr.isatty():
        quiet_progress_bars()
    out = args.out.expanduser().resolve()
    if args.preset == "tiny":
        base, experts = tiny_models(out)
        params = {**TINY_PARAMETERS[args.method], **parse_params(args.param)}
        prompt = args.prompt or "w4 w17 w42 w99"
        shard_size = args.shard_size or "100KB"
    else:
        base = args.base
        experts = [tuple(e.split("=", 1)) if "=" in e else (e, None) for e in args.expert]
        params = parse_params(args.param)
        prompt = args.prompt or "def fibonacci(n):"
        shard_size = args.shard_size
    config = merge_config(base, experts, args.method, params, args.dtype, args.device, shard_size)
    try:
        result = merge(config, out / f"merged-{args.method}", workers=args.workers, force=args.force,
                       progress=sys.stderr.isatty())
    except DistmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary(), flush=True)
    if args.method == "emr":
        # EMR writes the shared backbone; a task's model is `distmerge emr-task`. Generate with the backbone.
        print("emr: generating with the shared backbone (materialize a task with `distmerge emr-task`)")
    text = generate(result.out, prompt, args.max_new_tokens)
    print(f"quickstart: {args.method} merge of {len(experts)} expert(s) into {result.out} "
          f"({result.shards} shard(s), {result.workers} worker(s)); generated {text!r} from {prompt!r} "
          f"in {time.perf_counter() - began:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
