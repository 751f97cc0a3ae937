"""Per-layer merging inside the model's forward, recomputed in the backward: no rank holds a merged model.

Merging every tensor before the forward (``Bank.merged``) keeps one whole merged copy of the model alive
until the backward has used it (autograd saves each weight for the input's gradient). Here each transformer
layer computes its own merged weights when the forward reaches it, inside a non-reentrant activation
checkpoint, so they are dropped when the layer returns and computed again (gathering that layer's merged
unit again) when the backward reaches the layer. A rank then holds its shard of theta0 and the task vectors,
one layer's gathered merged weights, and the activations at layer boundaries. The tensors outside
the layers (embeddings, final norm, output head) are merged once per batch, as before.

The math is unchanged: merged_n = theta0_n + tau_n @ clamp(lambda_n, 0, 1), the gradient reaching only the
coefficients. The price is one more gather of each layer unit per batch (the recomputation), which buys the
memory of a whole merged model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from distmerge.adamerging.bank import Bank, Coefficients
from distmerge.architectures import layer_of


class LayerMerge:
    """Replaces one layer module's forward: merge its group, run it with those weights, both recomputed in
    the backward. ``group`` indexes ``bank.groups``; names are the group's tensor names relative to the layer."""

    def __init__(self, layer: torch.nn.Module, bank: Bank, group: int, coefficients: Coefficients, prefix: str):
        self.layer, self.bank, self.group, self.coefficients = layer, bank, group, coefficients
        plan = bank.plan
        self.indices = bank.groups[group].indices
        self.local_names = [plan.names[i][len(prefix) + 1:] for i in self.indices]
        self.shapes = [plan.shapes[i] for i in self.indices]
        self.original = layer.forward
        self.inside = False
        layer.forward = self  # nn.Module.__call__ looks the instance's forward up first

    def __call__(self, *args: Any, **kwargs: Any):
        if self.inside:  # functional_call below calls the layer again: run its own forward
            return self.original(*args, **kwargs)
        return checkpoint(self._merged_forward, *args, use_reentrant=False, **kwargs)

    def _merged_forward(self, *args: Any, **kwargs: Any):
        flats = self.bank.groups[self.group].merge(self.coefficients.per_tensor(self.indices))
        params = {name: flat.reshape(shape) for name, flat, shape in zip(self.local_names, flats, self.shapes)}
        self.inside = True
        try:
            return torch.func.functional_call(self.layer, params, args, kwargs, strict=False)
        finally:
            self.inside = False


def install(model: torch.nn.Module, bank: Bank, coefficients: Coefficients) -> frozenset[int]:
    """Wraps every layer of ``model`` whose tensors form one bank group; returns those groups' indices (the
    rest is merged before the forward). A group whose names do not all sit under one module is left alone."""
    modules = dict(model.named_modules())
    wrapped = set()
    for g, group in enumerate(bank.groups):
        keys = {layer_of(bank.plan.names[i]) for i in group.indices}
        if len(keys) != 1:
            continue
        (prefix, index), = keys
        if index is None or prefix not in modules:
            continue
        LayerMerge(modules[prefix], bank, g, coefficients, prefix)
        wrapped.add(g)
    return frozenset(wrapped)
