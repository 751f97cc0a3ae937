"""Forward passes that are not generation: GLUE predictions and per-text negative log-likelihoods."""

from __future__ import annotations

from typing import Sequence

import numpy as np

ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert", "longformer")


def model_max_tokens(model, requested: int = 0) -> int:
    """``requested`` (0: no wish) capped by the positions the model has; RoBERTa's positions start after its
    padding index, so it has ``max_position_embeddings - padding_idx - 1`` of them."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 0
    if limit and config.model_type in ROBERTA_LIKE:
        limit -= (config.pad_token_id or 0) + 1
    if requested and limit:
        return min(requested, limit)
    return requested or limit or 512


def classify(model, tokenizer, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int,
             device: str = "cpu") -> np.ndarray:
    """The predicted label (argmax) per row, or the regression value when the model has one output."""
    import torch

    encoded = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt").to(device)
    if getattr(model.config, "type_vocab_size", 2) <= 1:  # RoBERTa: one segment type; pairs differ by separators
        encoded.pop("token_type_ids", None)
    with torch.inference_mode():
        logits = model(**encoded).logits.float()
    if logits.shape[-1] == 1:
        return logits[:, 0].cpu().numpy().astype(np.float64)
    return logits.argmax(dim=-1).cpu().numpy().astype(np.float64)


def token_windows(ids: Sequence[int], max_length: int) -> list[list[int]]:
    """Non-overlapping windows of at most ``max_length`` tokens; each predicts all its tokens but the first."""
    return [list(ids[i : i + max_length]) for i in range(0, len(ids), max_length)]


def nll(model, tokenizer, texts: Sequence[str], max_length: int, device: str = "cpu",
        windows_per_pass: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(summed negative log-likelihood, predicted-token count) per text, each text scored on its own."""
    import torch

    owners, windows = [], []
    for row, text in enumerate(texts):
        for window in token_windows(tokenizer(text)["input_ids"], max_length):
            if len(window) >= 2:
                owners.append(row)
                windows.append(window)
    totals = np.zeros(len(texts), dtype=np.float64)
    counts = np.zeros(len(texts), dtype=np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(windows), windows_per_pass):
        chunk = windows[start : start + windows_per_pass]
        width = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, window in enumerate(chunk):
            ids[i, : len(window)] = torch.tensor(window)
            mask[i, : len(window)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        target_lp = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        valid = mask[:, 1:].bool()
        window_nll = (-(target_lp * valid)).sum(dim=1).double().cpu().numpy()
        window_count = valid.sum(dim=1).cpu().numpy()
        for i, owner in enumerate(owners[start : start + len(chunk)]):
            totals[owner] += window_nll[i]
            counts[owner] += int(window_count[i])
    return totals, counts
