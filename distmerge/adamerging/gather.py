"""The merged-rows gather: each rank merges the rows of theta0 and the task vectors it holds, then the ranks
all-gather the merged tensors, and the backward reduce-scatters their gradient back to the rows.

FSDP2 and ZeRO-3 place the bank: they decide which rows of every tensor each rank holds (FSDP2's dim-0
DTensor shards, ZeRO-3's partitions). Their own gather would bring a layer group's theta0 and all T task
vectors to every rank, T + 1 copies of the group, and keep a compute-dtype copy of the task vectors for the
backward. Nothing downstream needs them: the forward only uses theta0_n + tau_n @ lambda_n. So each rank
computes that on its own rows and the ranks gather one copy; since the loss is a sum over ranks, the gradient
of a rank's rows is the sum of every rank's gradient of the gathered tensor (a reduce-scatter), and the
coefficients' gradient is that rank's local dot product tau_rows^T grad_rows, summed over ranks with the
rest of the coefficients' gradient (``TorchCoefficients``). A group is one collective each way, whatever its
number of tensors.

Memory per rank: its shard, and per group in flight about two copies of the group's merged tensors (the gathered
buffer and the tensors cut from it; in the backward the incoming gradients and the reduce-scatter's buffer), plus
row chunks of the task vectors in the compute dtype (``CHUNK_ELEMENTS``): never a whole task vector in float32. In one process the same code runs without the
collectives, so the chunked backward is what the one-process tests exercise too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 22  # task-vector elements converted to the compute dtype at a time (16 MiB in float32)


def merge_rows(theta: torch.Tensor, tau: torch.Tensor, lambdas: torch.Tensor, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """theta + tau @ lambdas for rows theta [n], tau [n, T], in ``dtype``, converting tau a chunk at a time."""
    out = torch.empty(theta.shape[0], dtype=dtype, device=theta.device) if out is None else out
    rows = max(1, CHUNK_ELEMENTS // max(1, tau.shape[1]))
    weights = lambdas.to(dtype)
    for start in range(0, theta.shape[0], rows):
        stop = min(theta.shape[0], start + rows)
        torch.addmv(theta[start:stop].to(dtype), tau[start:stop].to(dtype), weights, out=out[start:stop])
    return out


def tau_dot(tau: torch.Tensor, gradient: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tau^T @ gradient ([T]) for rows tau [n, T], gradient [n], a chunk of tau at a time."""
    total = torch.zeros(tau.shape[1], dtype=dtype, device=tau.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, tau.shape[1]))
    for start in range(0, tau.shape[0], rows):
        stop = min(tau.shape[0], start + rows)
        total.addmv_(tau[start:stop].to(dtype).T, gradient[start:stop].to(dtype))
    return total


@dataclass(frozen=True)
class GroupRows:
    """One layer group's rows on this rank: (theta [rows_j], tau [rows_j, T]) per tensor, each tensor's full
    element count, and the world they are gathered over (1: no collective)."""

    pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    numels: tuple[int, ...]
    world: int
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:  # where the shard lives: the gathered tensors and gradients go there too
        return self.pairs[0][0].device if self.pairs else torch.device("cpu")

    def piece(self, j: int) -> int:
        """Elements per rank of tensor j in the gathered buffer: torch.chunk's ceil-sized pieces, the last
        ranks' pieces padded with zeros."""
        return -(-self.numels[j] // self.world) if self.numels[j] else 0

    def offsets(self) -> list[int]:
        offsets = [0]
        for j in range(len(self.numels)):
            offsets.append(offsets[-1] + self.piece(j))
        return offsets


class GatherMerged(torch.autograd.Function):
    """lambdas [n, T] -> the n merged flat tensors of a group, whole on every rank."""

    @staticmethod
    def forward(ctx, lambdas: torch.Tensor, rows: GroupRows) -> tuple[torch.Tensor, ...]:
        ctx.rows = rows
        ctx.lambdas_like = (lambdas.dtype, lambdas.device)  # the coefficients may live apart from the shard
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros of its size
        weights = lambdas.detach().to(rows.device)
        if rows.world == 1:
            return tuple(merge_rows(theta, tau, weights[j], rows.dtype) for j, (theta, tau) in enumerate(rows.pairs))
        import torch.distributed as dist

        offsets = rows.offsets()
        local = torch.zeros(offsets[-1], dtype=rows.dtype, device=rows.device)
        for j, (theta, tau) in enumerate(rows.pairs):
            merge_rows(theta, tau, weights[j], rows.dtype, out=local[offsets[j]:offsets[j] + theta.shape[0]])
        gathered = torch.empty(rows.world * offsets[-1], dtype=rows.dtype, device=rows.device)
        dist.all_gather_single(gathered, local)
        gathered = gathered.view(rows.world, offsets[-1])
        del local
        # tensor j is the concatenation of every rank's piece j, cut to its real elements
        return tuple(gathered[:, offsets[j]:offsets[j + 1]].reshape(-1)[:rows.numels[j]].contiguous()
                     for j in range(len(rows.numels)))

    @staticmethod
    @once_differentiable
    def backward(ctx, *gradients: torch.Tensor | None):
        rows: GroupRows = ctx.rows
        tasks = rows.pairs[0][1].shape[1] if rows.pairs else 0
        out = torch.zeros(len(rows.pairs), tasks, dtype=rows.dtype, device=rows.device)
        if rows.world == 1:
            for j, ((_, tau), gradient) in enumerate(zip(rows.pairs, gradients)):
                if gradient is not None:
                    out[j] = tau_dot(tau, gradient, rows.dtype)
            return out.to(ctx.lambdas_like[1], ctx.lambdas_like[0]), None
        import torch.distributed as dist

        offsets = rows.offsets()
        padded = torch.zeros(rows.world, offsets[-1], dtype=rows.dtype, device=rows.device)
        for j, gradient in enumerate(gradients):
            if gradient is None:  # an unused output (the same on every rank): its rows of the buffer stay zero
                continue
            flat, piece = gradient.reshape(-1), rows.piece(j)
            for rank in range(rows.world):  # rank r's piece of tensor j, the last ones short or empty
                start, stop = min(rows.numels[j], rank * piece), min(rows.numels[j], (rank + 1) * piece)
                padded[rank, offsets[j]:offsets[j] + stop - start] = flat[start:stop]
        local = torch.empty(offsets[-1], dtype=rows.dtype, device=rows.device)
        dist.reduce_scatter_single(local, padded.reshape(-1), op=dist.ReduceOp.SUM)
        del padded
        for j, (theta, tau) in enumerate(rows.pairs):
            out[j] = tau_dot(tau, local[offsets[j]:offsets[j] + theta.shape[0]], rows.dtype)
        return out.to(ctx.lambdas_like[1], ctx.lambdas_like[0]), None


def gather_merged(lambdas: torch.Tensor, rows: GroupRows) -> tuple[torch.Tensor, ...]:
    """The group's merged flat tensors (``GatherMerged``); an empty group gives an empty tuple."""
    if not rows.pairs:
        return ()
    return GatherMerged.apply(lambdas, rows)
