"""Vocabulary reconciliation: give every model's embedding and LM-head rows the output vocabulary's order
before task vectors are taken.

Each model gets a row map ``out_row -> source_row`` (``-1``: the token is new to this model; its row is the
mean of the model's existing rows, as MergeLM's ``smart_tokenizer_and_embedding_resize`` does for [PAD]).
``positional`` maps share the first rows (tokens appended at the end, the common case: 32000 vs 32001);
``union`` maps go by token string, from each model's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distmerge.architectures import INPUT_EMBEDDING, VOCAB_TENSOR  # noqa: F401 (others import them from here)
from distmerge.deferred import torch


@dataclass(frozen=True)
class RowMap:
    """out_rows entries: the source row of each output row, -1 for the mean row. None: identity."""

    source_rows: int
    out_rows: int
    rows: tuple[int, ...] | None = None  # None with source_rows == out_rows: identity

    @staticmethod
    def positional(source_rows: int, out_rows: int) -> "RowMap":
        return RowMap(source_rows, out_rows, None)

    @property
    def identity(self) -> bool:
        return self.rows is None and self.source_rows == self.out_rows

    def index(self) -> torch.Tensor:
        if self.rows is not None:
            return torch.tensor(self.rows, dtype=torch.int64)
        idx = torch.arange(self.out_rows, dtype=torch.int64)
        idx[idx >= self.source_rows] = -1
        return idx


def input_embedding_rows(tensors: dict) -> int | None:
    """Rows of the model's input embedding, found by name."""
    for name, info in tensors.items():
        if INPUT_EMBEDDING.search(name) and len(info.shape) == 2:
            return info.shape[0]
    return None


def is_vocab_tensor(name: str, shape: tuple[int, ...], vocab_rows: int | None) -> bool:
    return vocab_rows is not None and len(shape) >= 1 and shape[0] == vocab_rows and bool(VOCAB_TENSOR.search(name))


def reconcile(tensor: torch.Tensor, row_map: RowMap) -> torch.Tensor:
    """The tensor's rows in output order; new rows are the mean of the existing rows."""
    if row_map.identity:
        return tensor
    index = row_map.index()
    out = torch.empty((row_map.out_rows,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    present = index >= 0
    out[present] = tensor[index[present]]
    if (~present).any():
        out[~present] = tensor.mean(dim=0, dtype=torch.float32).to(tensor.dtype)
    return out


def union_vocab(token_maps: list[dict[str, int]]) -> dict[str, int]:
    """The first map's tokens keep their ids; tokens new in later maps are appended in their id order."""
    out = dict(token_maps[0])
    next_id = max(out.values(), default=-1) + 1
    for tokens in token_maps[1:]:
        for token, _ in sorted(tokens.items(), key=lambda kv: kv[1]):
            if token not in out:
                out[token] = next_id
                next_id += 1
    return out


def union_row_map(out_vocab: dict[str, int], model_vocab: dict[str, int], source_rows: int, out_rows: int) -> RowMap:
    rows = [-1] * out_rows
    for token, out_id in out_vocab.items():
        src = model_vocab.get(token)
        if src is not None and src < source_rows:
            rows[out_id] = src
    # rows past every token (padding rows) stay positional where the model has them
    covered = set(out_vocab.values())
    for i in range(out_rows):
        if i not in covered and i < source_rows:
            rows[i] = i
    return RowMap(source_rows, out_rows, tuple(rows))


def load_token_map(folder: Path) -> dict[str, int] | None:
    """token -> id of the tokenizer saved in a model folder, or None when there is none."""
    try:
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except Exception:
        return None
