"""The output tensors of a merge and where each model's value of each comes from.

Checked here, before any tensor data is read: every model has every merged tensor (tied LM heads resolve
to the input embedding), shapes agree (vocabulary rows excepted, which are reconciled), and each tensor is
either merged, or copied from the base (excluded by the config, or not floating point).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from distmerge import dtypes
from distmerge.architectures import TIED_HEADS, layer_of  # noqa: F401 (others import them from here)
from distmerge.config import MergeConfig
from distmerge.errors import ConfigError, InputError, where
from distmerge.io import vocab
from distmerge.io.checkpoint import Checkpoint
from distmerge.methods.base import TensorJob, resolve_job_settings

LOG = logging.getLogger(__name__)
ZERO_WEIGHT_SUM = 1e-8  # below it a normalizing merge would divide by (almost) zero: mergekit's cut


@dataclass(frozen=True)
class TensorSource:
    """Which stored tensor of a model gives this output tensor, and how its rows map."""

    tensor: str
    row_map: vocab.RowMap | None = None


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    out_dtype: str  # as torch names it: see ``distmerge.dtypes``
    merged: bool  # False: copied from the reference model
    base: TensorSource | None  # None without a base model
    experts: tuple[TensorSource, ...]
    job: TensorJob | None
    group: str
    layer: int | None

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * dtypes.itemsize(self.out_dtype)


@dataclass(frozen=True)
class VocabPlan:
    out_rows: int | None
    token_map: dict[str, int] | None  # union vocabulary, when tokenizer: union
    changed: bool
    model_token_maps: dict[str, dict[str, int]] | None = None  # each model's own vocabulary (union only)


def plan_vocab(config: MergeConfig, base: Checkpoint | None, experts: list[Checkpoint]) -> tuple[VocabPlan, list[int | None]]:
    models = ([base] if base else []) + experts
    rows = [vocab.input_embedding_rows(m.tensors) for m in models]
    if config.tokenizer == "union":
        maps = [vocab.load_token_map(m.folder) for m in models]
        for m, tokens in zip(models, maps):
            if tokens is None:
                raise InputError(f"{where(model=m.name, file=str(m.folder))}: tokenizer 'union' needs every model's tokenizer files")
        token_map = vocab.union_vocab(maps)
        out_rows = max(max(token_map.values()) + 1, rows[0] or 0)
        return VocabPlan(out_rows, token_map, True, {m.name: t for m, t in zip(models, maps)}), rows
    if config.tokenizer == "base":
        out_rows = rows[0]
    else:
        out_rows = rows[len(models) - len(experts) + config.names.index(config.tokenizer)]
    changed = any(r is not None and r != out_rows for r in rows)
    return VocabPlan(out_rows, None, changed), rows


def check_dtype_class(model: Checkpoint, stored: str, info, reference: str) -> None:
    """An int tensor where the reference has weights (or the other way round) is not the same tensor: merging
    it as weights, or copying past it, would both make a broken model without a word."""
    if dtypes.kind(info.dtype) != dtypes.kind(reference):
        raise InputError(f"{where(model=model.name, file=info.file, tensor=stored)}: dtype {info.dtype} "
                         f"is {dtypes.kind(info.dtype)}, the reference model's is {reference}")


def _source(model: Checkpoint, name: str, shape: tuple[int, ...], vocab_rows: int | None, vp: VocabPlan,
            dtype: str) -> TensorSource:
    stored = name
    if name not in model.tensors and TIED_HEADS.search(name):
        tied = [n for n in model.tensors if vocab.INPUT_EMBEDDING.search(n)]
        if tied:
            stored = tied[0]
    info = model.info(stored)
    check_dtype_class(model, stored, info, dtype)
    is_vocab = vp.out_rows is not None and vocab.is_vocab_tensor(stored, info.shape, vocab_rows) and \
        vocab.is_vocab_tensor(name, shape, vp.out_rows)
    if is_vocab:
        if tuple(info.shape[1:]) != tuple(shape[1:]):
            raise InputError(f"{where(model=model.name, file=info.file, tensor=stored)}: shape {list(info.shape)} does "
                             f"not match {list(shape)} beyond the vocabulary dimension")
        if vp.token_map is not None:
            tokens = vp.model_token_maps.get(model.name)
            row_map = vocab.union_row_map(vp.token_map, tokens or {}, info.shape[0], vp.out_rows)
        else:
            row_map = vocab.RowMap.positional(info.shape[0], vp.out_rows)
        return TensorSource(stored, None if row_map.identity else row_map)
    if tuple(info.shape) != tuple(shape):
        raise InputError(f"{where(model=model.name, file=info.file, tensor=stored)}: shape {list(info.shape)} does not "
                         f"match the base's {list(shape)}")
    return TensorSource(stored)


def resolve_tensors(config: MergeConfig, base: Checkpoint | None, experts: list[Checkpoint]) -> tuple[list[OutputTensor], VocabPlan, list[str]]:
    """Every output tensor with its sources; also the vocab plan and the tensors experts have but the base lacks."""
    reference = base if base is not None else experts[0]
    vp, rows = plan_vocab(config, base, experts)
    offset = 1 if base is not None else 0
    ref_rows = rows[0]
    exclude = [re.compile(p) for p in config.exclude]
    include = [re.compile(p) for p in config.include]
    names = sorted(reference.tensors)
    layers = [layer_of(n)[1] for n in names]
    num_layers = max((l for l in layers if l is not None), default=-1) + 1
    out_dtype_default = config.out_dtype or None
    method = config.build_method()
    divides = method.divides_by_weight_sum()
    model_settings = [spec.parameters for spec in config.models]
    outputs = []
    for name in names:
        info = reference.tensors[name]
        group, layer = layer_of(name)
        ref_is_vocab = vp.out_rows is not None and vocab.is_vocab_tensor(name, info.shape, ref_rows)
        shape = (vp.out_rows,) + tuple(info.shape[1:]) if ref_is_vocab else tuple(info.shape)
        floating = dtypes.is_floating(info.dtype)
        merged = floating and not any(p.search(name) for p in exclude) and \
            (not include or any(p.search(name) for p in include))
        out_dtype = out_dtype_default if (out_dtype_default is not None and floating) else info.dtype
        base_src = _source(base, name, shape, rows[0], vp, info.dtype) if base is not None else None
        expert_srcs: tuple[TensorSource, ...] = ()
        if merged or base is None:
            expert_srcs = tuple(_source(m, name, shape, rows[offset + i], vp, info.dtype) for i, m in enumerate(experts))
        else:
            for m in experts:
                if name in m.tensors:
                    check_dtype_class(m, name, m.info(name), info.dtype)
        job = None
        if merged:
            t = (layer / (num_layers - 1) if num_layers > 1 else 1.0) if layer is not None else 0.0
            per_model, per_tensor = resolve_job_settings(method, name, t, model_settings)
            weights = tuple(_number(w, f"models[{i}].weight") for i, w in enumerate(per_model.pop("weight")))
            job = TensorJob(name=name, numel=_numel(shape), model_names=config.names, weights=weights,
                            per_model=per_model, per_tensor=per_tensor)
            if divides and abs(sum(job.weights)) < ZERO_WEIGHT_SUM:
                raise ConfigError(f"models[].weight: the weights of tensor '{name}' sum to 0, and method "
                                  f"'{config.method}' divides by their sum (normalize: true)")
        outputs.append(OutputTensor(name, shape, out_dtype, merged, base_src, expert_srcs, job, group, layer))
    extra = sorted({n for m in experts for n in m.tensors} - set(reference.tensors))
    if extra:
        LOG.warning("%d tensor(s) exist in an expert but not in the base and are left out, e.g. %s", len(extra), extra[0])
    if not any(o.merged for o in outputs):
        raise ConfigError("exclude/include: no tensor is left to merge")
    return outputs, vp, extra


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
