"""The objectives AdaMerging minimizes, and the real HF model run with the merged weights.

A bare encoder (kind ``encoder``) gets its task's head in ``params`` under ``ENCODER_HEAD_PREFIX``: a
torch.nn.Linear on the pooled last hidden states, kept apart from the encoder as sentence encoders and the
paper's CLIP/ViT setting keep it.

Every objective is a sum over samples divided by the *global* batch size, so the sum over ranks of each
rank's loss (and of its gradients) is exactly the single-process loss whatever the split of the rows.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
import torch

from distmerge.errors import InputError

GLUE_FIELDS_FALLBACK = ("text",)
ENCODER_HEAD_PREFIX = "head."  # the head's weight and bias in a bare encoder's params (no encoder tensor is named so)
POOLER_PREFIX = "pooler."


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) over the last dimension (the reference's ``softmax_entropy``)."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def classifier_entropy(logits: torch.Tensor, global_batch: int) -> torch.Tensor:
    return softmax_entropy(logits).sum() / global_batch


def next_token_entropy(logits: torch.Tensor, attention_mask: torch.Tensor, global_batch: int) -> torch.Tensor:
    """Each prompt's mean next-token entropy over its attended positions (spec section 6 [design])."""
    mask = attention_mask.to(logits.dtype)
    per_token = softmax_entropy(logits) * mask
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / global_batch


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, global_batch: int) -> torch.Tensor:
    """Each sample's mean cross-entropy over its target tokens (labels -100 elsewhere), FusionBench's Llama variant."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), targets.clamp(min=0), reduction="none")
    mask = (targets >= 0).to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / global_batch


def text_fields(task: str, fields: tuple[str, ...]) -> tuple[str, ...]:
    if fields:
        return fields
    from distmerge.evaluate.tasks import GLUE_FIELDS

    if task in GLUE_FIELDS:
        first, second = GLUE_FIELDS[task]
        return (first, second) if second else (first,)
    return GLUE_FIELDS_FALLBACK


def encode(tokenizer, rows: Mapping[str, np.ndarray], fields: tuple[str, ...], target: str | None,
           max_length: int, one_segment: bool) -> dict[str, torch.Tensor]:
    """Tokenized inputs of one batch (no labels, except sft's targets given as the ``target`` column)."""
    texts = [str(x) for x in rows[fields[0]]]
    pairs = [str(x) for x in rows[fields[1]]] if len(fields) > 1 else None
    if target is not None:
        targets = [str(x) for x in rows[target]]
        prompt_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        full = tokenizer([p + " " + t for p, t in zip(texts, targets)], truncation=True, max_length=max_length,
                         padding=True, return_tensors="pt")
        labels = full["input_ids"].clone()
        for i, prompt in enumerate(prompt_ids):
            labels[i, :len(prompt)] = -100
        labels[full["attention_mask"] == 0] = -100
        return {"input_ids": full["input_ids"], "attention_mask": full["attention_mask"], "labels": labels}
    encoded = dict(tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True,
                             return_tensors="pt"))
    if one_segment:
        encoded.pop("token_type_ids", None)  # RoBERTa: one segment type (as evaluate/predict.py feeds it)
    return encoded


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, tokens, hidden] -> [batch, hidden]: the mean over attended tokens (sentence-transformers' mean
    pooling), or the first token (cls)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def encoder_logits(model, params: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor],
                   pooling: str) -> torch.Tensor:
    """The head (``ENCODER_HEAD_PREFIX`` entries of ``params``) on the pooled output of the bare encoder."""
    head = {k[len(ENCODER_HEAD_PREFIX):]: v for k, v in params.items() if k.startswith(ENCODER_HEAD_PREFIX)}
    body = {k: v for k, v in params.items() if not k.startswith(ENCODER_HEAD_PREFIX)}
    hidden = torch.func.functional_call(model, body, args=(), kwargs=dict(inputs), strict=False).last_hidden_state
    pooled = pool(hidden, inputs["attention_mask"], pooling)
    return torch.nn.functional.linear(pooled.to(head["weight"].dtype), head["weight"], head["bias"])


def batch_objective(model, params: Mapping[str, torch.Tensor], encoded: Mapping[str, torch.Tensor], kind: str,
                    objective: str, global_batch: int, pooling: str = "mean") -> torch.Tensor:
    """The loss of one batch through ``model`` with ``params`` in place of its parameters (``pooling``: kind
    encoder's, see ``pool``)."""
    inputs = {k: v for k, v in encoded.items() if k != "labels"}
    if kind == "encoder":
        return classifier_entropy(encoder_logits(model, params, inputs, pooling), global_batch)
    logits = torch.func.functional_call(model, dict(params), args=(), kwargs=inputs, strict=False).logits
    if kind == "classify":
        return classifier_entropy(logits, global_batch)
    if objective == "sft":
        return sft_loss(logits, encoded["labels"], global_batch)
    return next_token_entropy(logits, encoded["attention_mask"], global_batch)


def skeleton(base_folder: str, kind: str):
    """The base's architecture with parameters on the meta device (buffers real): the forward gets every
    parameter from ``functional_call``, so no weights are allocated or initialized here."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(base_folder)
    auto = {"classify": AutoModelForSequenceClassification, "encoder": AutoModel}.get(kind, AutoModelForCausalLM)
    extra = encoder_options(base_folder, config) if kind == "encoder" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, dtype=torch.float32, **extra)
    model.eval()  # dropout off: the reference adapts with the model in eval mode
    return model


def encoder_options(base_folder: str, config) -> dict[str, Any]:
    """A bare encoder saved without its pooler (BERT-likes whose heads pool the hidden states themselves) is
    built without one, else its pooler's parameters would be in no checkpoint."""
    import inspect

    from transformers import AutoModel

    from distmerge.io.checkpoint import Checkpoint

    model_class = AutoModel._model_mapping[type(config)]
    if "add_pooling_layer" not in inspect.signature(model_class.__init__).parameters:
        return {}
    checkpoint = Checkpoint(base_folder, "base")
    try:
        has_pooler = any(name.startswith(POOLER_PREFIX) for name in checkpoint.tensors)
    finally:
        checkpoint.close()
    return {} if has_pooler else {"add_pooling_layer": False}


def check_parameters(model, provided: set[str], where: str) -> None:
    """Every parameter of the skeleton must come from a checkpoint (tied ones resolve to their twin)."""
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = sorted(n for n, _ in model.named_parameters() if n not in provided and n not in tied)
    if missing:
        raise InputError(f"{where}: tensor '{missing[0]}' of the model is in no checkpoint "
                         f"({len(missing)} missing)")


def as_tensor_dict(values: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in values.items()}
