"""The quick-start demo: build a small Llama base and two experts here, merge them on an embedded Ray, load
the result with transformers and run it. Nothing is downloaded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml

from distmerge.errors import OutputError

DEMO_PARAMETERS = {
    "weight_average": {},
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"lambda": 1.0, "density": 0.2, "trim_scope": "global"},
    "dare": {"drop_rate": 0.9, "then": "task_arithmetic", "lambda": 0.5, "seed": 0},
    "breadcrumbs": {"lambda": 1.0, "density": 0.9, "gamma": 0.01},
    "della": {"lambda": 1.0, "density": 0.7, "epsilon": 0.15, "seed": 0},
    "emr": {},
}


def run_demo(out: Path, method: str = "ties", workers: int = 2, force: bool = False) -> Iterator[str]:
    import torch
    from transformers import AutoModelForCausalLM

    from distmerge.engine.driver import merge
    from distmerge.tiny_models import build_family

    if method not in DEMO_PARAMETERS:
        raise OutputError(f"--method: one of {', '.join(DEMO_PARAMETERS)}")
    out = Path(out).resolve()
    models = out / "models"
    if not (models / "base" / "config.json").exists():
        yield f"building a small Llama base and 2 experts in {models} ..."
        build_family(models, "llama", experts=2, vocab_size=512, hidden=64, layers=4, shard_size="100KB",
                     extra_tokens={1: ("[PAD]",)})
    config = {
        "base_model": str(models / "base"),
        "models": [{"model": str(models / "expert_0"), "name": "math"},
                   {"model": str(models / "expert_1"), "name": "code"}],
        "method": method,
        "parameters": DEMO_PARAMETERS[method],
        "tokenizer": "base",
        "out_shard_size": "200KB",
    }
    config_path = out / f"{method}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    yield f"config: {config_path}"
    result = merge(config_path, out / f"merged-{method}", workers=workers, force=force)
    yield result.summary()
    model = AutoModelForCausalLM.from_pretrained(str(result.out))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    yield f"loaded {result.out.name} with transformers: logits {list(logits.shape)}, finite={bool(torch.isfinite(logits).all())}"
