"""Small models built here (random weights, no downloads) for the demo, tests and benchmarks.

``build_family`` writes a base and experts = base + small seeded deltas as real Hugging Face folders (sharded
safetensors, index, config, tokenizer), so every code path sees the same layout a 13B checkpoint has.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "roberta")


def _config(arch: str, vocab_size: int, hidden: int, layers: int, tie: bool):
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2 + 8,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, tie_word_embeddings=tie)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2 + 8,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, tie_word_embeddings=tie)
    if arch == "roberta":
        from transformers import RobertaConfig

        return RobertaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                             num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=70,
                             type_vocab_size=1, num_labels=3)
    raise ValueError(f"unknown arch {arch!r} (one of {ARCHS})")


def _model(arch: str, config):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if arch == "roberta":
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def build_tokenizer(vocab_size: int, extra_tokens: tuple[str, ...] = ()):
    """A word-level tokenizer with ``vocab_size`` tokens: <unk>, <s>, </s>, <pad>, w4, w5, ..., then extras."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = specials + [f"w{i}" for i in range(len(specials), vocab_size)] + list(extra_tokens)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def save_model(model, tokenizer, path: Path, shard_size: str = "30KB", dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(path), max_shard_size=shard_size)
    tokenizer.save_pretrained(str(path))
    return path


def build_family(root: str | Path, arch: str = "llama", experts: int = 2, vocab_size: int = 128, hidden: int = 32,
                 layers: int = 3, seed: int = 0, delta_scale: float = 0.02, tie: bool = False,
                 extra_tokens: dict[int, tuple[str, ...]] | None = None, shard_size: str = "30KB",
                 dtype: torch.dtype | None = None) -> tuple[Path, list[Path]]:
    """Write ``root/base`` and ``root/expert_i``; expert i may add ``extra_tokens[i]`` (rows from the mean)."""
    root = Path(root)
    torch.manual_seed(seed)
    config = _config(arch, vocab_size, hidden, layers, tie)
    base = _model(arch, config)
    base_path = save_model(base, build_tokenizer(vocab_size), root / "base", shard_size, dtype)
    paths = []
    for i in range(experts):
        generator = torch.Generator().manual_seed(seed * 1000 + i + 1)
        expert = _model(arch, config)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in expert.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * delta_scale)
        extra = (extra_tokens or {}).get(i, ())
        tokenizer = build_tokenizer(vocab_size, extra)
        if extra:
            expert.resize_token_embeddings(vocab_size + len(extra), mean_resizing=True)
        paths.append(save_model(expert, tokenizer, root / f"expert_{i}", shard_size, dtype))
    return base_path, paths
