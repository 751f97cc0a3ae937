"""Synthetic Llama checkpoints for the merge benchmarks: a base and N experts = base + small seeded deltas.

    python benchmarks/make_checkpoints.py --size tiny --experts 3 --out /tmp/ckpt-tiny [--shard-size 1MB]

Writes ``OUT/base``, ``OUT/expert_0`` ... as Hugging Face folders in bfloat16 (config.json from LlamaConfig,
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, a word-level tokenizer) and
``OUT/family.json`` (the spec; ``complete`` once every folder is there). No model object is materialized:
names and shapes come from a model built on the meta device, and tensors are produced and written one at a
time, so peak memory is about one shard plus one float32 tensor even at the 1b size (TinyLlama's shape).

Base tensors are the transformers init (normal(0, initializer_range); norms at 1). Expert tensor =
bf16(base + delta_scale * rms(base tensor) * N(0, 1)), seeded per (seed, model, tensor). The RMS is the std
for the zero-mean weights, and 1 for the all-ones norms, which a plain std would leave without a delta.

A folder that already holds a complete family with the same spec is left as it is; a model folder is
written under a hidden name and renamed when complete, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FAMILY_FILE, INDEX_FILE, family_spec, files_bytes, fsync_path  # noqa: E402

# Llama shapes from a few MB to TinyLlama-1.1B. Params per model: ~1.6M, ~56M, ~245M, ~1.1B.
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2000),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}
# Several shards per model at every size, so that several workers have shards to write.
DEFAULT_SHARD_SIZE = {"tiny": "1MB", "small": "30MB", "medium": "100MB", "1b": "500MB"}


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[size], max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       dtype="bfloat16", architectures=["LlamaForCausalLM"])


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every saved tensor, in state-dict order, without allocating any weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def plan_shards(shapes, max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Pack tensors into shards in order, as save_pretrained does: a new shard when the next would overflow."""
    shards, size = [], 0
    for name, shape in shapes:
        nbytes = torch.Size(shape).numel() * 2
        if shards and size + nbytes <= max_bytes:
            shards[-1].append((name, shape))
            size += nbytes
        else:
            shards.append([(name, shape)])
            size = nbytes
    return shards


def shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def generator(seed: int, model: str, tensor: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{model}/{tensor}".encode()))


def base_tensor(name: str, shape, seed: int, init_std: float) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    values = torch.randn(shape, generator=generator(seed, "base", name)).mul_(init_std)
    return values.to(torch.bfloat16)


def expert_tensor(base: torch.Tensor, name: str, model: str, seed: int, delta_scale: float) -> torch.Tensor:
    values = base.float()
    scale = delta_scale * values.square().mean().sqrt().item()
    noise = torch.randn(values.shape, generator=generator(seed, model, name))
    return values.add_(noise.mul_(scale)).to(torch.bfloat16)


def write_model(folder: Path, model: str, shards, config, tokenizer, seed: int, delta_scale: float,
                base_folder: Path | None) -> None:
    """Write one model folder under a hidden name, then rename it into place."""
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    count = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        filename = shard_name(i, count)
        tensors = {}
        with contextlib.ExitStack() as stack:
            base = None if base_folder is None else stack.enter_context(safe_open(str(base_folder / filename), "pt"))
            for name, shape in shard:
                if base is None:
                    tensors[name] = base_tensor(name, shape, seed, config.initializer_range)
                else:
                    tensors[name] = expert_tensor(base.get_tensor(name), name, model, seed, delta_scale)
                weight_map[name] = filename
                total += tensors[name].numel() * 2
        save_file(tensors, str(staging / filename), metadata={"format": "pt"})
        fsync_path(staging / filename)
        del tensors
    (staging / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    config.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    os.replace(staging, folder)


def verify(folder: Path) -> None:
    """Load with transformers, check the weights are the files' and run a forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    state = model.state_dict()
    index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    for filename in sorted(set(index.values())):
        with safe_open(str(folder / filename), "pt") as handle:
            for name in handle.keys():
                if not torch.equal(handle.get_tensor(name), state[name]):
                    raise SystemExit(f"verify: {folder.name}/{name} loaded by transformers differs from the file")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    if not torch.isfinite(logits).all():
        raise SystemExit(f"verify: {folder.name} gives non-finite logits")
    print(f"verify: {folder.name} loads with AutoModelForCausalLM ({sum(t.numel() for t in state.values()):,} "
          f"params, {len(set(index.values()))} shards), logits {tuple(logits.shape)} finite", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), required=True)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard-size", help="max bytes per shard (e.g. 500MB); default by size: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_SHARD_SIZE.items()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delta-scale", type=float, default=0.01, help="expert delta, in units of the tensor's RMS")
    parser.add_argument("--verify", action="store_true",
                        help="load base and expert_0 with transformers afterwards (holds a whole model in memory)")
    args = parser.parse_args()

    from distmerge.config import parse_size
    from distmerge.tiny_models import build_tokenizer

    shard_size = args.shard_size or DEFAULT_SHARD_SIZE[args.size]
    spec = {"size": args.size, "experts": args.experts, "shard_size": shard_size,
            "shard_bytes": parse_size(shard_size, "--shard-size"), "seed": args.seed, "delta_scale": args.delta_scale,
            "dtype": "bfloat16", "shape": SIZES[args.size]}
    out = args.out.expanduser().resolve()
    existing = family_spec(out)
    if existing is not None:
        if {k: existing.get(k) for k in spec} != spec:
            raise SystemExit(f"{out} holds a different family ({ {k: existing.get(k) for k in spec} }); "
                             "choose another --out or remove it")
        if existing.get("complete"):
            print(f"{out}: complete ({args.size}, {args.experts} experts), nothing to do", flush=True)
            if args.verify:
                verify(out / "base")
                verify(out / "expert_0")
            return
    elif out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not a family made by this script; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / FAMILY_FILE).write_text(json.dumps({**spec, "complete": False}, indent=2) + "\n")

    began = time.perf_counter()
    config = llama_config(args.size)
    shards = plan_shards(tensor_shapes(config), spec["shard_bytes"])
    tokenizer = build_tokenizer(config.vocab_size)
    names = ["base"] + [f"expert_{i}" for i in range(args.experts)]
    for name in names:
        folder = out / name
        if folder.is_dir():
            print(f"{name}: already there", flush=True)
            continue
        t0 = time.perf_counter()
        write_model(folder, name, shards, config, tokenizer, args.seed, args.delta_scale,
                    None if name == "base" else out / "base")
        size = files_bytes(folder.glob("*.safetensors"))
        print(f"{name}: {len(shards)} shards, {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s", flush=True)
    params = sum(torch.Size(shape).numel() for shard in shards for _, shape in shard)
    (out / FAMILY_FILE).write_text(json.dumps({**spec, "params": params, "shards": len(shards), "complete": True},
                                              indent=2) + "\n")
    print(f"{out}: {args.size}, {params / 1e6:.1f}M params x {len(names)} models, {len(shards)} shards each, "
          f"done in {time.perf_counter() - began:.1f}s", flush=True)
    if args.verify:
        verify(out / "base")
        verify(out / "expert_0")


if __name__ == "__main__":
    main()
