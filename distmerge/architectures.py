"""The one naming table: what the tensor names of the supported architectures say a tensor is.

Llama, Mistral, Qwen2 (``model.layers.N.``), GPT-2 and Qwen-1 (``transformer.h.N.``), GPT-NeoX
(``gpt_neox.layers.N.``), BERT/RoBERTa/ViT (``encoder.layer.N.``), T5 (``block.N.``), CLIP (``resblocks.N.``).
Layer groups, embeddings, heads, tied weights and FDA's layer units are read from here by the planner
(``plan``, ``tensors``), vocabulary reconciliation (``io.vocab``), LoRA output, Twin, AdaMerging, FDA and the
evaluator, so a new architecture is one edit in this file.
"""

from __future__ import annotations

import re


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in names)


# --- layers -------------------------------------------------------------------------------------------
LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block", "resblocks")
# "(prefix).layers.(N)." and the like: the layer's module path and its number
LAYER = re.compile(rf"^(.*?(?:^|\.)(?:{_alternatives(LAYER_CONTAINERS)})\.(\d+))\.")


def layer_of(name: str) -> tuple[str, int | None]:
    """(layer group key, layer index); a tensor outside the layers is grouped by its module."""
    match = LAYER.match(name)
    if match:
        return match.group(1), int(match.group(2))
    return (name.rsplit(".", 1)[0] if "." in name else name), None


def group_by_layer(names) -> dict[str, list[str]]:
    """Tensor names by layer group key (``layer_of``); the groups and the names in each in the order they come."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name)[0], []).append(name)
    return groups


# --- embeddings and heads -----------------------------------------------------------------------------
INPUT_EMBEDDINGS = ("embed_tokens", "word_embeddings", "wte", "embed_in", "tok_embeddings", "shared")
POSITION_EMBEDDINGS = ("wpe", "position_embeddings", "embed_positions", "token_type_embeddings", "pos_embed")
EMBEDDING_CONTAINERS = ("embeddings", "patch_embed")  # BERT/RoBERTa/ViT keep theirs under `embeddings.`
OUTPUT_HEADS = ("lm_head", "embed_out", "output")  # rows indexed by the vocabulary, as the input embedding
TIED_HEAD_MODULES = ("lm_head", "embed_out")  # may be absent from a checkpoint that ties them to the embedding

INPUT_EMBEDDING = re.compile(rf"(^|\.)({_alternatives(INPUT_EMBEDDINGS)})\.weight$")
TIED_HEADS = re.compile(rf"(^|\.)({_alternatives(TIED_HEAD_MODULES)})\.weight$")
VOCAB_TENSOR = re.compile(rf"(^|\.)({_alternatives(INPUT_EMBEDDINGS + OUTPUT_HEADS)})(\.|$)|final_logits_bias$")
# A module path (a layer group's key, or a module's name) inside the embeddings: planned first, in model order.
EMBEDDING_MODULE = re.compile(
    rf"(^|\.)({_alternatives(INPUT_EMBEDDINGS + POSITION_EMBEDDINGS + EMBEDDING_CONTAINERS)})(\.|$)")

# What GLUE merges leave out (MergeLM, EMR, AdaMerging): each task keeps its own classifier head.
CLASSIFIER_HEAD = r".*classifier.*"

# --- FDA's layer units --------------------------------------------------------------------------------
FDA_FAMILIES = {
    "decoder": ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "phi3",
                "internlm2", "yi"),
    "encoder": ("roberta", "bert", "xlm-roberta", "camembert", "electra"),
    "vit": ("vit",),
}
# (family, modules) -> where the unit of layer l sits in tensor names
FDA_UNITS = {
    ("decoder", "mlp"): "layers.{layer}.mlp",
    ("decoder", "block"): "layers.{layer}",
    ("encoder", "block"): "encoder.layer.{layer}",
    ("vit", "block"): "encoder.layer.{layer}",
}
