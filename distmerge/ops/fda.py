"""FDA (functional dual anchors) math: anchor construction and layer adaptation, for one layer unit.

Pure tensor functions, no I/O and no Ray. A *unit* is the part of a layer FDA works on (Llama: the MLP of a
decoder layer; RoBERTa/ViT: the whole encoder layer). Its parameters are passed as ``{name: tensor}`` dicts
and it is evaluated with ``torch.func.functional_call``, so the same module serves the base, every expert
and the merged parameters.

Conventions follow the reference code (Sphere-AI-Lab/FDA, see the spec §8.2-8.4), not the paper's Eq. 1:

* the anchor gradient is g_k = dS/dθ_k at θ0, S the *similarity* between the base's and the expert's
  outputs on the anchors, so that a step that increases S from θ0 moves along τ_k = θ_t,k − θ0,k;
* construction minimizes L(X) = Σ_k (1 − cos(vec g_k, vec τ_k)) (a sum over the unit's tensors) with AdamW
  (weight decay 0.01 on X), one closure per step, and keeps the X with the lowest loss *evaluated before*
  the step, which need not be the last iterate;
* the expert's output stays in the graph of X during construction (the reference does not detach it);
* adaptation losses are sums over the batch: −Σ cos, Σ (·)², Σ |·|; Adam, shuffled batches, fixed epochs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

SIMILARITIES = ("cos", "mse", "l1")
PARAMETERIZATIONS = ("elementwise", "raw")

Params = dict[str, torch.Tensor]
UnitForward = Callable[[Params, torch.Tensor], torch.Tensor]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from (seed, layer, task, ...): the same job draws the same numbers wherever it runs."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def unit_forward(module: torch.nn.Module) -> UnitForward:
    """``forward(params, x)``: the module evaluated with the given parameters (first output if it returns a tuple)."""

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(module, params, (x,))
        return out[0] if isinstance(out, (tuple, list)) else out

    return forward


# --- similarity and the anchor gradient -------------------------------------------------------------


def similarity(output: torch.Tensor, target: torch.Tensor, kind: str = "cos") -> torch.Tensor:
    """S for construction (higher = more alike): mean over anchors of the cosine of the flattened outputs, or
    −MSE / −L1 (means over all elements), as the reference's ``anchor_loss``."""
    if kind == "cos":
        n = output.shape[0]
        return F.cosine_similarity(output.reshape(n, -1), target.reshape(n, -1), dim=1).mean()
    if kind == "mse":
        return -F.mse_loss(output, target, reduction="mean")
    if kind == "l1":
        return -F.l1_loss(output, target, reduction="mean")
    raise ValueError(f"unknown similarity {kind!r} (one of {', '.join(SIMILARITIES)})")


def anchor_gradients(forward: UnitForward, base: Params, expert: Params, anchors: torch.Tensor,
                     kind: str = "cos", create_graph: bool = True) -> Params:
    """g_k = dS(X; θ)/dθ_k at θ = θ0, with S comparing φ_θ(X) to φ_θt(X).

    ``base`` must hold leaf tensors that require grad. With ``create_graph`` the result stays differentiable
    in X (the second-order term construction descends on)."""
    names = list(base)
    score = similarity(forward(base, anchors), forward(expert, anchors), kind)
    grads = torch.autograd.grad(score, [base[n] for n in names], create_graph=create_graph)
    return dict(zip(names, grads))


def alignment_loss(grads: Params, task_vector: Params) -> torch.Tensor:
    """Σ_k (1 − cos(vec g_k, vec τ_k)) over the unit's tensors (a sum, not a mean)."""
    total = None
    for name, grad in grads.items():
        cos = F.cosine_similarity(grad.reshape(-1), task_vector[name].reshape(-1), dim=0)
        total = (1 - cos) if total is None else total + (1 - cos)
    if total is None:
        raise ValueError("the unit has no parameters")
    return total


def gradient_cosines(forward: UnitForward, base: Params, expert: Params, anchors: torch.Tensor,
                     kind: str = "cos") -> dict[str, float]:
    """cos(vec g_k, vec τ_k) per tensor, for diagnostics and tests (no graph kept)."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in base.items()}
    grads = anchor_gradients(forward, leaves, expert, anchors.detach(), kind, create_graph=False)
    return {n: float(F.cosine_similarity(g.reshape(-1), (expert[n] - base[n]).reshape(-1), dim=0))
            for n, g in grads.items()}


# --- anchor initialization ------------------------------------------------------------------------


def gauss_anchors(count: int, shape: tuple[int, ...], sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Init (I): σ·N(0, I), shape [count, *shape]."""
    return torch.randn((count, *shape), generator=generator) * sigma


def weight_rows(params: Params, hidden: int) -> torch.Tensor:
    """Rows of the unit's 2-D weights whose input dimension is the hidden size (Llama MLP: gate_proj and
    up_proj, not down_proj), concatenated in the order given."""
    # down_proj maps the intermediate size back to the hidden size: never a source of rows, even when the MLP
    # is square and its input dimension happens to equal the hidden size.
    rows = [p.detach().reshape(-1, hidden) for name, p in params.items()
            if p.ndim == 2 and p.shape[1] == hidden and not name.endswith("down_proj.weight")]
    if not rows:
        raise ValueError(f"no 2-D weight with input dimension {hidden} to draw anchor rows from")
    return torch.cat(rows, dim=0)


def weight_anchors(rows: torch.Tensor, count: int, tokens: int | None, generator: torch.Generator) -> torch.Tensor:
    """Init (II): ``count`` (× ``tokens``) rows drawn without replacement by a random permutation.

    With too few rows, every row is kept in order and the rest are means of random row pairs, as the NLG
    reference pads (NLU/Vision assert instead; padding is the more useful behaviour and is used for all)."""
    needed = count * (tokens or 1)
    available = rows.shape[0]
    if available >= needed:
        picked = rows[torch.randperm(available, generator=generator)[:needed]]
    else:
        extra = needed - available
        i = torch.randint(0, available, (extra,), generator=generator)
        j = torch.randint(0, available, (extra,), generator=generator)
        picked = torch.cat([rows, (rows[i] + rows[j]) / 2], dim=0)
    return picked.reshape(count, tokens, rows.shape[1]) if tokens else picked.reshape(count, rows.shape[1])


# --- stage I: construction ------------------------------------------------------------------------


@dataclass
class ConstructionResult:
    anchors: torch.Tensor  # the best X seen (detached)
    best_loss: float
    best_step: int  # the step whose closure evaluated the best X (0 = the initial anchors)
    initial_loss: float
    losses: list[float] = field(default_factory=list)  # the loss at every closure, before each step


def construct_anchors(forward: UnitForward, base: Params, expert: Params, init: torch.Tensor, *, steps: int,
                      lr: float = 1e-2, weight_decay: float = 0.01, kind: str = "cos",
                      on_step: Callable[[int, float], None] | None = None) -> ConstructionResult:
    """Optimize the anchors X so that the gradient they induce at θ0 aligns with τ (Alg. 1, stage I)."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in base.items()}
    expert = {n: t.detach() for n, t in expert.items()}
    task_vector = {n: expert[n] - leaves[n].detach() for n in leaves}
    x = init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([x], lr=lr, weight_decay=weight_decay)
    best = {"loss": float("inf"), "x": x.detach().clone(), "step": 0}
    losses: list[float] = []

    def evaluate() -> torch.Tensor:
        return alignment_loss(anchor_gradients(forward, leaves, expert, x, kind), task_vector)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = evaluate()
        # Only X is optimized: differentiate w.r.t. X alone instead of filling .grad of θ0 too.
        (x.grad,) = torch.autograd.grad(loss, [x])
        value = float(loss.detach())
        if value < best["loss"]:  # X as evaluated here, i.e. before this step moves it
            best.update(loss=value, x=x.detach().clone(), step=len(losses))
        losses.append(value)
        return loss

    for step in range(steps):
        optimizer.step(closure)
        if on_step is not None:
            on_step(step, losses[-1])
    if not losses:  # zero steps: the initial anchors, with their loss for the record
        best.update(loss=float(evaluate().detach()))
    initial_loss = losses[0] if losses else best["loss"]
    return ConstructionResult(anchors=best["x"], best_loss=best["loss"], best_step=best["step"],
                              initial_loss=initial_loss, losses=losses)


# --- stage II: adaptation -------------------------------------------------------------------------


def adaptation_loss(output: torch.Tensor, target: torch.Tensor, kind: str = "cos") -> torch.Tensor:
    """Sum over the batch: −Σ cos(flattened rows), Σ squared error, or Σ absolute error."""
    if kind == "cos":
        n = output.shape[0]
        return -F.cosine_similarity(output.reshape(n, -1), target.reshape(n, -1), dim=1).sum()
    if kind == "mse":
        return F.mse_loss(output, target, reduction="sum")
    if kind == "l1":
        return F.l1_loss(output, target, reduction="sum")
    raise ValueError(f"unknown adaptation loss {kind!r} (one of {', '.join(SIMILARITIES)})")


class ElementwiseMerge:
    """θ(α) = θ0 + Σ_s α_s ⊙ (θ_s − θ0) with an α of each tensor's shape per source (Eq. 6, granularity
    ``elementwise``), evaluated as ``start + Σ_s (α_s − α_init) ⊙ δ_s``: the same function, but exactly
    ``start`` (e.g. the initial merge, bit for bit) while α is untouched. Only α is trained."""

    def __init__(self, base: Params, sources: list[Params], alpha_init: float, start: Params | None = None):
        self.alpha_init = float(alpha_init)
        self.deltas = [{n: src[n].detach() - base[n].detach() for n in base} for src in sources]
        if start is None:
            start = {n: base[n].detach() + self.alpha_init * sum(d[n] for d in self.deltas) for n in base}
        self.start = {n: start[n].detach() for n in base}
        self.alphas = [{n: torch.full_like(base[n], self.alpha_init, requires_grad=True) for n in base}
                       for _ in sources]

    def trainable(self) -> list[torch.Tensor]:
        return [a for alphas in self.alphas for a in alphas.values()]

    def params(self) -> Params:
        out = {}
        for n, start in self.start.items():
            value = start
            for alphas, deltas in zip(self.alphas, self.deltas):
                value = value + (alphas[n] - self.alpha_init) * deltas[n]
            out[n] = value
        return out


class RawWeights:
    """Eq. 5: the unit's raw parameters trained from a starting point (θ0), every tensor trainable."""

    def __init__(self, start: Params):
        self.weights = {n: t.detach().clone().requires_grad_(True) for n, t in start.items()}

    def trainable(self) -> list[torch.Tensor]:
        return list(self.weights.values())

    def params(self) -> Params:
        return dict(self.weights)


@dataclass
class AdaptationResult:
    params: Params  # the adapted unit (detached)
    initial_loss: float  # full-set loss before training
    final_loss: float  # full-set loss after training
    epoch_losses: list[float] = field(default_factory=list)  # mean batch loss per epoch


def full_loss(forward: UnitForward, params: Params, anchors: torch.Tensor, targets: torch.Tensor, kind: str,
              batch_size: int) -> float:
    with torch.no_grad():
        return sum(float(adaptation_loss(forward(params, anchors[i:i + batch_size]), targets[i:i + batch_size], kind))
                   for i in range(0, anchors.shape[0], batch_size))


def adapt_unit(forward: UnitForward, model: ElementwiseMerge | RawWeights, anchors: torch.Tensor,
               targets: torch.Tensor, *, epochs: int, lr: float, batch_size: int, kind: str = "cos",
               generator: torch.Generator, on_epoch: Callable[[int, float], None] | None = None) -> AdaptationResult:
    """Fit the unit so that it reproduces the experts' outputs on their anchors (stage II).

    ``anchors``/``targets`` are every task's anchors and the expert outputs on them, concatenated. Each epoch
    visits them in a fresh order drawn from ``generator`` (on the CPU, so the order is device-independent)."""
    targets = targets.detach()
    anchors = anchors.detach()
    initial = full_loss(forward, model.params(), anchors, targets, kind, batch_size)
    optimizer = torch.optim.Adam(model.trainable(), lr=lr) if epochs > 0 else None
    epoch_losses = []
    count = anchors.shape[0]
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator).to(anchors.device)
        total, batches = 0.0, 0
        for start in range(0, count, batch_size):
            index = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = adaptation_loss(forward(model.params(), anchors[index]), targets[index], kind)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        epoch_losses.append(total / max(batches, 1))
        if on_epoch is not None:
            on_epoch(epoch, epoch_losses[-1])
    params = {n: t.detach() for n, t in model.params().items()}
    final = full_loss(forward, params, anchors, targets, kind, batch_size) if epochs > 0 else initial
    return AdaptationResult(params=params, initial_loss=initial, final_loss=final, epoch_losses=epoch_losses)
