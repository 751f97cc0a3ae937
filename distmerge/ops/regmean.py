"""RegMean (Jin et al., ICLR 2023): per linear layer, the weight minimizing sum_t ||X_t W^T - X_t W_t^T||^2.

W^T = (sum_t G~_t)^-1 sum_t G~_t W_t^T with G_t = X_t^T X_t over the inputs the layer sees when expert t runs on
task t's data, and G~ = alpha G + (1 - alpha) diag(G) shrinking the off-diagonal (spec methods-next.md).

Following the official code (github:bloomberg/dataless-model-merging, ``avg_merger.regmean_mean_params`` and
``local_trainer.compute_grams``): its Gram is the per-task mean over tokens, X^T X / N_t (``GramSum.mean``), so a
task with more measured tokens does not outweigh the others; its ``reduce_non_diag(G, a)`` is G~ with alpha = a;
model weights w_t scale G~_t (its ``coeff * n_model``; the common factor cancels); biases and every tensor that
is not a linear weight take the simple average. Its experiment configs use a = 0.1 in 9 of 10 RegMean
configs (0.9 in one, and in the demo notebook's commented line); the default is the caller's choice.

Statistics are sums, so they reduce over batches, data shards and workers; they accumulate in float64, where the
order of the additions moves a sum by ~1e-16 relative: far below the float32 they may be stored in, but not
bitwise. A fixed reduction order (by shard index) makes them bitwise reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distmerge.deferred import torch



@dataclass(frozen=True)
class GramSum:
    """sum over tokens of x x^T (float64 [in, in]) and the number of tokens summed."""

    total: torch.Tensor
    count: int

    def __add__(self, other: "GramSum") -> "GramSum":
        if self.total.shape != other.total.shape:
            raise ValueError(f"cannot add Gram sums of shapes {tuple(self.total.shape)} and {tuple(other.total.shape)}")
        return GramSum(self.total + other.total.to(self.total.device), self.count + other.count)

    def mean(self) -> torch.Tensor:
        """X^T X / N: the official RegMean's Gram."""
        if self.count <= 0:
            raise ValueError("a Gram sum of no tokens has no mean")
        return self.total / self.count


def empty_gram(features: int, device: torch.device | str = "cpu") -> GramSum:
    return GramSum(torch.zeros((features, features), dtype=torch.float64, device=device), 0)


def gram_of_inputs(inputs: torch.Tensor, token_mask: torch.Tensor | None = None) -> GramSum:
    """The Gram sum of one batch of a linear layer's inputs ``[..., in]``; ``token_mask [...]`` drops padding.

    The official code sums over every position, padding included; a mask is how to leave padding out.
    """
    rows = inputs.reshape(-1, inputs.shape[-1])
    if token_mask is not None:
        rows = rows[token_mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
    wide = rows.to(torch.float64)  # bf16/fp16/fp32 activations convert exactly; products then round at 2**-53
    return GramSum(wide.T @ wide, int(wide.shape[0]))


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G): the diagonal kept, the rest scaled by alpha."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"regmean alpha must be in [0, 1], got {alpha}")
    shrunk = gram * alpha
    shrunk.diagonal().copy_(gram.diagonal())
    return shrunk


def regmean_linear(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float,
                   model_weights: Sequence[float] | None = None) -> torch.Tensor:
    """The merged weight [out, in] of one linear layer from the experts' weights and Grams [in, in].

    Solved in float64 (``solve_gram_system``); returned in the first weight's dtype and device.
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(f"regmean needs one Gram per expert weight, got {len(weights)} weights, {len(grams)} Grams")
    scales = [1.0] * len(weights) if model_weights is None else [float(w) for w in model_weights]
    device = weights[0].device
    system = torch.zeros_like(grams[0], dtype=torch.float64, device=device)
    rhs = torch.zeros((weights[0].shape[1], weights[0].shape[0]), dtype=torch.float64, device=device)
    average = torch.zeros_like(rhs)
    for weight, gram, scale in zip(weights, grams, scales):
        if gram.shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"Gram of shape {tuple(gram.shape)} does not fit a weight of shape {tuple(weight.shape)}")
        shrunk = shrink_off_diagonal(gram.to(device, torch.float64), alpha) * scale
        weight_t = weight.to(torch.float64).T
        system += shrunk
        rhs += shrunk @ weight_t
        average += scale * weight_t
    total_scale = sum(scales)
    average /= total_scale if abs(total_scale) > 1e-12 else 1.0
    return solve_gram_system(system, rhs, average).T.to(weights[0].dtype)


def solve_gram_system(system: torch.Tensor, rhs: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """X with system X = rhs, system symmetric positive semi-definite.

    Cholesky first: the summed Gram is symmetric, so it costs half of LU, and ``cholesky_ex`` reports a singular
    matrix without raising. A singular sum means input directions no task ever fed (always-zero features):
    the data says nothing about the weights along them, so those take ``anchor`` (the experts' weighted average)
    and the rest is the least-squares solution, X = anchor + pinv(system) (rhs - system anchor). Not
    ``torch.linalg.lstsq``: on CUDA its only driver (gels) assumes full rank, and its minimum-norm answer would
    set the unseen directions to 0 instead of the average.
    """
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    pseudo_inverse = torch.linalg.pinv(system, hermitian=True)
    return anchor + pseudo_inverse @ (rhs - system @ anchor)
