"""The non-weight files of the merged folder: config.json, tokenizer, generation config, model card and the
resolved distmerge.yaml."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from distmerge.config import MergeConfig
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.writer import write_json
from distmerge.tensors import VocabPlan

LOG = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model", "sentencepiece.bpe.model")


def write_config_json(staging: Path, reference: Checkpoint, vocab_plan: VocabPlan, out_dtype: str | None) -> None:
    config = reference.config
    if config is None:
        return
    if vocab_plan.out_rows is not None and config.get("vocab_size") not in (None, vocab_plan.out_rows) \
            and vocab_plan.changed:
        config["vocab_size"] = vocab_plan.out_rows
    if out_dtype:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = out_dtype
    write_json(staging / "config.json", config)


def write_tokenizer(staging: Path, config: MergeConfig, base: Checkpoint | None, experts: list[Checkpoint],
                    vocab_plan: VocabPlan) -> str:
    """Copy (or, for union, build) the tokenizer; returns a description for the card."""
    if config.tokenizer == "union":
        return _union_tokenizer(staging, base or experts[0], vocab_plan)
    source = base if (config.tokenizer == "base" and base is not None) else \
        experts[config.names.index(config.tokenizer)] if config.tokenizer in config.names else experts[0]
    copied = [name for name in TOKENIZER_FILES if (source.folder / name).exists()]
    for name in copied:
        shutil.copyfile(source.folder / name, staging / name)
    return f"copied from {source.name}" if copied else "none found in the source model"


def _union_tokenizer(staging: Path, reference: Checkpoint, vocab_plan: VocabPlan) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reference.folder))
    known = tokenizer.get_vocab()
    new = [tok for tok, _ in sorted(vocab_plan.token_map.items(), key=lambda kv: kv[1]) if tok not in known]
    tokenizer.add_tokens(new)
    got = tokenizer.get_vocab()
    mismatched = [t for t in new if got.get(t) != vocab_plan.token_map[t]]
    if mismatched:
        LOG.warning("union tokenizer: %d added token ids differ from the embedding rows", len(mismatched))
    tokenizer.save_pretrained(str(staging))
    return f"union of all models' vocabularies ({len(new)} tokens added to {reference.name}'s)"


def copy_generation_config(staging: Path, reference: Checkpoint) -> None:
    path = reference.folder / "generation_config.json"
    if path.exists():
        shutil.copyfile(path, staging / "generation_config.json")


def write_resolved_config(staging: Path, config: MergeConfig) -> None:
    (staging / "distmerge.yaml").write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))


def write_card(staging: Path, config: MergeConfig, summary: dict[str, Any]) -> None:
    resolved = config.to_yaml_dict()
    front = {"base_model": config.base_model or config.models[0].model, "library_name": "transformers",
             "tags": ["merge", "distmerge", config.method]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# Merged model ({config.method})", "",
             f"Made with [distmerge](https://github.com/) by **{config.method}**"
             + (f" from base `{config.base_model}`" if config.base_model else "") + ".", "",
             "## Models", ""]
    for spec in config.models:
        params = spec.parameters
        extra = f" — {params}" if params else ""
        lines.append(f"- `{spec.name}`: `{spec.model}`{extra}")
    lines += ["", "## Parameters", "", "```yaml", yaml.safe_dump({"parameters": resolved["parameters"]},
                                                                sort_keys=False).strip(), "```", ""]
    if summary.get("method_state"):
        lines += ["## Computed during the merge", "", "```yaml",
                  yaml.safe_dump(summary["method_state"], sort_keys=False).strip(), "```", ""]
    lines += summary.get("method_card") or []  # the method's own section (how to use its artifacts)
    if summary.get("timings"):
        lines += ["## Run", "", "```yaml", yaml.safe_dump(summary["timings"], sort_keys=False).strip(), "```", ""]
    lines += ["## Full configuration", "", "See `distmerge.yaml` next to this card: `distmerge merge distmerge.yaml "
              "--out DIR` reproduces this merge.", ""]
    (staging / "README.md").write_text("\n".join(lines))
