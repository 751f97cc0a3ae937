"""Routed inference: theta* with every task's exclusive part applied in the forward pass, weighted per sample.

A linear layer computes x theta*^T + sum_t w_t(x) (x V_t)(US_t)^T: the T tasks' factors are concatenated once at
load (V: [in, T r], US: [out, T r]), so a batch costs two thin matmuls more than theta* alone and one batch mixes
routings without any per-sample weight matrix. Embeddings add sum_t w_t US_t[ids] V_t^T; norms (elementwise affine
in their weight and bias: LayerNorm, RMSNorm) add g(x) * sum_t w_t dweight_t + sum_t w_t dbias_t, where g(x) is
the module's output with unit weight and zero bias; biases of linear layers add sum_t w_t dbias_t.

w(x) = softmax(router(features(x))): on the first pass over a prompt (no cache yet) the model runs once as theta*
alone for the features, then routes; generation steps that follow reuse the weights. ``model.twin.fixed`` sets
the weights by hand ([batch, T], e.g. one-hot for oracle routing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distmerge.errors import InputError
from distmerge.twin.folder import FACTOR_KINDS, TWIN_JSON, ExclusiveStore, Part, check_rank, read_manifest
from distmerge.twin.router import load_router, prompt_features


class Routing:
    """The per-sample task weights every routed module of one model reads ([batch, T], or None: theta* alone)."""

    def __init__(self, router: nn.Module | None, tasks: list[str]):
        self.router, self.tasks = router, tasks
        self.weights: torch.Tensor | None = None
        self.fixed: torch.Tensor | None = None
        self.computing = False

    def per_sample(self, batch: int, dims: int, device, dtype) -> torch.Tensor | None:
        """The weights shaped [batch, 1, ..., T] to broadcast over ``dims``-dimensional activations."""
        weights = self.weights
        if weights is None:
            return None
        if weights.shape[0] != batch:
            raise RuntimeError(f"twin routing holds {weights.shape[0]} sample(s), the batch has {batch}")
        return weights.to(device=device, dtype=dtype).view(batch, *([1] * (dims - 2)), weights.shape[1])


def _expand(weights: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Per-task weights [..., T] to per-rank-column weights [..., R] (column j belongs to task owner[j])."""
    return weights.index_select(-1, owner)


class RoutedLinear(nn.Module):
    """nn.Linear (``conv1d``: GPT-2's Conv1D, weight [in, out]) plus the routed exclusive parts."""

    def __init__(self, base: nn.Module, routing: Routing, left: torch.Tensor | None, right: torch.Tensor | None,
                 owner: torch.Tensor | None, bias_delta: torch.Tensor | None):
        super().__init__()
        self.base, self.routing = base, routing
        self.register_buffer("left", left, persistent=False)  # [in, R]: x @ left
        self.register_buffer("right", right, persistent=False)  # [out, R]: (.) @ right^T
        self.register_buffer("owner", owner, persistent=False)
        self.register_buffer("bias_delta", bias_delta, persistent=False)  # [T, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.routing.per_sample(x.shape[0], x.dim(), x.device, x.dtype)
        if w is None:
            return y
        if self.left is not None:
            y = y + ((x @ self.left) * _expand(w, self.owner)) @ self.right.T
        if self.bias_delta is not None:
            y = y + w @ self.bias_delta
        return y


class RoutedLoraLinear(nn.Module):
    """nn.Linear of a LoRA-space part (``exclusive.lora: factors``): theta* = base + s B* A*, and the routed weight
    base + s (B* + sum_t w_t dB_t)(A* + sum_t w_t dA_t), dA_t = a_us a_v^T, dB_t = b_us b_v^T. With
    h = x (A* + sum w dA)^T, the output is x theta*^T + s (sum_t w_t x dA_t^T) B*^T + s sum_t w_t h dB_t^T: four thin
    matmuls over the tasks' concatenated factors, no per-sample weight."""

    def __init__(self, base: nn.Module, routing: Routing, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 factors: dict[str, torch.Tensor], owners: dict[str, torch.Tensor], bias_delta: torch.Tensor | None):
        super().__init__()
        self.base, self.routing, self.scale = base, routing, scale
        self.register_buffer("lora_a", lora_a, persistent=False)  # A* [r, in]
        self.register_buffer("lora_b", lora_b, persistent=False)  # B* [out, r]
        for kind, value in factors.items():  # a_us [r, R], a_v [in, R], b_us [out, R], b_v [r, R]
            self.register_buffer(kind, value, persistent=False)
        self.register_buffer("a_owner", owners["a"], persistent=False)
        self.register_buffer("b_owner", owners["b"], persistent=False)
        self.register_buffer("bias_delta", bias_delta, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.routing.per_sample(x.shape[0], x.dim(), x.device, x.dtype)
        if w is None:
            return y
        d_a = ((x @ self.a_v) * _expand(w, self.a_owner)) @ self.a_us.T  # sum_t w_t x dA_t^T: [..., r]
        h = x @ self.lora_a.T + d_a
        y = y + self.scale * (d_a @ self.lora_b.T + ((h @ self.b_v) * _expand(w, self.b_owner)) @ self.b_us.T)
        if self.bias_delta is not None:
            y = y + w @ self.bias_delta
        return y


class RoutedEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, routing: Routing, rows: torch.Tensor, v: torch.Tensor,
                 owner: torch.Tensor):
        super().__init__()
        self.base, self.routing = base, routing
        self.register_buffer("rows", rows, persistent=False)  # [vocab, R] = US of every task
        self.register_buffer("v", v, persistent=False)  # [dim, R]
        self.register_buffer("owner", owner, persistent=False)

    @property
    def weight(self):  # generation utilities read the input embedding's weight (device, dtype, size)
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        held = self.routing.weights
        # BERT and RoBERTa look up position ids as one [1, seq] row for the whole batch: each sample's routed
        # term then broadcasts from that row
        batch = held.shape[0] if held is not None and ids.shape[0] == 1 else ids.shape[0]
        w = self.routing.per_sample(batch, ids.dim() + 1, y.device, y.dtype)
        if w is None:
            return y
        return y + (nn.functional.embedding(ids, self.rows) * _expand(w, self.owner)) @ self.v.T


class RoutedNorm(nn.Module):
    """A module whose output is g(x) * weight + bias elementwise (LayerNorm, RMSNorm)."""

    def __init__(self, base: nn.Module, routing: Routing, weight_delta: torch.Tensor | None,
                 bias_delta: torch.Tensor | None):
        super().__init__()
        self.base, self.routing = base, routing
        self.register_buffer("weight_delta", weight_delta, persistent=False)  # [T, d]
        self.register_buffer("bias_delta", bias_delta, persistent=False)

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.routing.per_sample(x.shape[0], x.dim(), y.device, y.dtype)
        if w is None:
            return y
        if self.weight_delta is not None:
            params = {"weight": torch.ones_like(self.base.weight)}
            if getattr(self.base, "bias", None) is not None:
                params["bias"] = torch.zeros_like(self.base.bias)
            unit = torch.func.functional_call(self.base, params, (x,))
            y = y + unit * (w @ self.weight_delta)
        if self.bias_delta is not None:
            y = y + w @ self.bias_delta
        return y


# --------------------------------------------------------------------------------------------- building


def _is_norm(module: nn.Module) -> bool:
    """Elementwise-affine modules: a 1-D weight (and bias) only, named like a norm."""
    params = dict(module.named_parameters(recurse=False))
    return bool(params) and set(params) <= {"weight", "bias"} and all(p.dim() == 1 for p in params.values()) \
        and "norm" in type(module).__name__.lower()


def _stack(parts: list[tuple[int, Any]], which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of every task concatenated along the rank, and the task owning each rank column."""
    blocks = [getattr(part, which).float() for _, part in parts]
    owner = torch.cat([torch.full((block.shape[1],), task, dtype=torch.long) for (task, _), block in zip(parts, blocks)])
    return torch.cat(blocks, dim=1), owner


def _per_task(parts: list[tuple[int, Any]], tasks: int, size: int) -> torch.Tensor:
    table = torch.zeros(tasks, size)
    for task, part in parts:
        table[task] = part.delta.float()
    return table


def truncate(part: Part, rank: int | None) -> Part:
    """The first ``rank`` singular directions of a factored part (the SVD orders them by singular value, so this
    is the part a build at that rank stores, exactly so for an exact SVD)."""
    if rank is None or part.rank <= rank:
        return part
    if part.in_lora_space:
        return Part(shared=part.shared, **{kind: getattr(part, kind)[:, :rank] for kind in FACTOR_KINDS})
    return Part(us=part.us[:, :rank], v=part.v[:, :rank])


def attach_parts(model: nn.Module, store: ExclusiveStore, tasks: list[str], routing: Routing,
                 tied_head: str | None = None, rank: int | None = None) -> None:
    """Replace every module with an exclusive part by its routed version (in place)."""
    from transformers.pytorch_utils import Conv1D

    by_tensor: dict[str, list[tuple[int, Any]]] = {}
    for index, task in enumerate(tasks):
        for tensor in store.tensors(task):
            by_tensor.setdefault(tensor, []).append((index, truncate(store.part(task, tensor), rank)))
    if tied_head is not None and tied_head in by_tensor:  # a tied head is the embedding's weight: the same parts
        by_tensor.setdefault("lm_head.weight", by_tensor[tied_head])
    names = dict(model.named_modules())
    modules: dict[str, dict[str, list]] = {}
    for tensor, parts in by_tensor.items():
        module_name, _, param = tensor.rpartition(".")
        prefixed = f"{getattr(model, 'base_model_prefix', '')}.{module_name}"
        if module_name not in names and prefixed in names:  # a bare encoder's folder loaded with a head on top
            module_name = prefixed
        if module_name not in names:
            raise InputError(f"tensor '{tensor}': its exclusive part names no module of the "
                             f"{type(model).__name__}")
        modules.setdefault(module_name, {})[param] = parts
    dtype = next(model.parameters()).dtype
    for module_name, params in modules.items():
        module = names[module_name]
        unknown = set(params) - {"weight", "bias"}
        if unknown:
            raise InputError(f"tensor '{module_name}.{sorted(unknown)[0]}': no routed form for this parameter")
        weight, bias = params.get("weight"), params.get("bias")
        cast = (lambda t: None if t is None else t.to(dtype))
        lora_space = weight is not None and any(part.in_lora_space for _, part in weight)
        if lora_space:
            if not isinstance(module, nn.Linear) or not all(part.in_lora_space for _, part in weight):
                raise InputError(f"tensor '{module_name}.weight': LoRA-space parts route nn.Linear layers only, "
                                 "and every task's part of one weight must be in LoRA space")
            shared = weight[0][1].shared
            factors, owners = {}, {}
            for kind in FACTOR_KINDS:
                factors[kind], owners[kind[0]] = _stack(weight, kind)
            bias_delta = _per_task(bias, len(tasks), module.weight.shape[0]) if bias is not None else None
            routed = RoutedLoraLinear(module, routing, cast(shared.lora_a.float()), cast(shared.lora_b.float()),
                                      shared.scale, {k: cast(v) for k, v in factors.items()}, owners,
                                      cast(bias_delta))
        elif isinstance(module, (nn.Linear, Conv1D)):
            left = right = owner = None
            if weight is not None:
                if any(part.delta is not None for _, part in weight):
                    raise InputError(f"tensor '{module_name}.weight': a 2-D weight stored without factors")
                us, owner = _stack(weight, "us")
                v, _ = _stack(weight, "v")
                # Linear: W [out, in] = US V^T, so x W^T = (x V) US^T; Conv1D: W [in, out], x W = (x US) V^T.
                left, right = (v, us) if isinstance(module, nn.Linear) else (us, v)
            out_size = module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.shape[1]
            bias_delta = _per_task(bias, len(tasks), out_size) if bias is not None else None
            routed = RoutedLinear(module, routing, cast(left), cast(right), owner, cast(bias_delta))
        elif isinstance(module, nn.Embedding) and bias is None:
            us, owner = _stack(weight, "us")
            v, _ = _stack(weight, "v")
            routed = RoutedEmbedding(module, routing, cast(us), cast(v), owner)
        elif _is_norm(module):
            size = module.weight.shape[0]
            routed = RoutedNorm(module, routing, cast(_per_task(weight, len(tasks), size)) if weight else None,
                                cast(_per_task(bias, len(tasks), size)) if bias else None)
        else:
            raise InputError(f"tensor '{module_name}.{next(iter(params))}': a {type(module).__name__} has no "
                             "routed form (linear, embedding and norm layers have)")
        parent_name, _, child = module_name.rpartition(".")
        setattr(names[parent_name] if parent_name else model, child, routed)


def _route_hook(routing: Routing):
    """Before each forward of the top-level model: on a new prompt, the router's weights from theta*'s features."""

    def hook(model, args, kwargs):
        if routing.computing:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise RuntimeError("a twin model routes on input_ids (inputs_embeds alone are not supported)")
        if routing.fixed is not None:
            routing.weights = routing.fixed
            return None
        mask = kwargs.get("attention_mask")
        past = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 names it cache
        cached = past is not None and (past.get_seq_length() if hasattr(past, "get_seq_length") else 1) > 0
        cached = cached or (mask is not None and mask.dim() == 2 and mask.shape[1] > input_ids.shape[1])
        if cached and routing.weights is not None and routing.weights.shape[0] == input_ids.shape[0]:
            return None  # a generation step: the prompt's routing holds
        mask = torch.ones_like(input_ids) if mask is None else mask
        routing.weights, routing.computing = None, True
        try:
            features = prompt_features(model, input_ids, mask)
        finally:
            routing.computing = False
        with torch.inference_mode():
            routing.weights = torch.softmax(routing.router.to(features.device)(features), dim=-1)
        return None

    return hook


def load(folder: str | Path, kind: str = "causal", device: str = "cpu", dtype: torch.dtype | None = None,
         rank: int | None = None):
    """A transformers model of the twin folder with routed exclusive parts (see the module docstring).

    ``kind``: causal (AutoModelForCausalLM), classify (AutoModelForSequenceClassification) or model (AutoModel:
    the bare encoder or decoder, for callers that bring their own heads); the evaluator's generate and perplexity
    kinds are causal. ``rank``: use only the first ``rank`` directions of each part (a
    rank sweep over one build; default: twin.json's ``exclusive.load_rank``, else every stored direction). ``model.twin`` is its ``Routing`` (``fixed`` for oracle routing)."""
    import warnings

    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    check_rank(rank, "rank")
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    if rank is None:  # a Twin sweep's view of a build at one of its ranks (distmerge.sweep.twin)
        rank = check_rank(manifest.get("exclusive", {}).get("load_rank"),
                          f"'{folder / TWIN_JSON}': exclusive.load_rank")
    auto = {"classify": AutoModelForSequenceClassification, "model": AutoModel}.get(kind, AutoModelForCausalLM)
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto.from_pretrained(str(folder), **kwargs)
    except Exception as exc:
        raise InputError(f"cannot load the shared expert of twin folder '{folder}' ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]})") from None
    router, tasks = load_router(folder)
    if tasks != list(manifest["tasks"]):
        raise InputError(f"'{folder}': the router's tasks {tasks} are not twin.json's {manifest['tasks']}")
    routing = Routing(router, tasks)
    store = ExclusiveStore(folder)
    tied = manifest.get("tied_embedding") if getattr(model.config, "tie_word_embeddings", False) else None
    attach_parts(model, store, tasks, routing, tied, rank)
    store.close()
    model.twin = routing
    model.register_forward_pre_hook(_route_hook(routing), with_kwargs=True)
    return model.to(device).eval()
