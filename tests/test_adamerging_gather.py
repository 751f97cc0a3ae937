"""The merged-rows gather (distmerge/adamerging/gather.py) against the plain formula: two gloo ranks, tensors
whose sizes do not divide by the world (and one that leaves a rank empty), float32 and bfloat16 storage,
row chunks smaller than a tensor; and the same code in one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from distmerge.adamerging import gather
from distmerge.adamerging.bank import compute_dtype, shard_range
from distmerge.adamerging.gather import GroupRows, gather_merged

NUMELS = (7, 1, 12, 5)
TASKS = 3


def case(storage: torch.dtype):
    """Full theta0 [n] and tau [n, T] per tensor (the same on every rank: one seed), lambdas [len, T]."""
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(n, generator=g).to(storage) for n in NUMELS]
    taus = [torch.randn(n, TASKS, generator=g).to(storage) for n in NUMELS]
    lambdas = torch.rand(len(NUMELS), TASKS, generator=g)
    return thetas, taus, lambdas


def weights(rank: int) -> list[torch.Tensor]:
    """Each rank's own loss weights: the loss differs per rank, as each rank's data does."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, generator=g) for n in NUMELS]


def reference(storage: torch.dtype, world: int):
    """The merged tensors and the gradient of sum over ranks of sum_j w_rj . merged_j, by plain autograd."""
    thetas, taus, lambdas = case(storage)
    dtype = compute_dtype(storage)
    lam = lambdas.clone().requires_grad_(True)
    merged = [theta.to(dtype) + tau.to(dtype) @ lam[j].to(dtype) for j, (theta, tau) in enumerate(zip(thetas, taus))]
    loss = sum((w.to(dtype) * m).sum() for rank in range(world) for w, m in zip(weights(rank), merged))
    loss.backward()
    return [m.detach() for m in merged], lam.grad


def rank_result(storage: torch.dtype, world: int, rank: int):
    thetas, taus, lambdas = case(storage)
    pairs = []
    for theta, tau in zip(thetas, taus):
        start, stop = shard_range(theta.numel(), world, rank)
        pairs.append((theta[start:stop], tau[start:stop]))
    lam = lambdas.clone().requires_grad_(True)
    dtype = compute_dtype(storage)
    merged = gather_merged(lam, GroupRows(tuple(pairs), NUMELS, world, dtype))
    sum((w.to(dtype) * m).sum() for w, m in zip(weights(rank), merged)).backward()
    return [m.detach() for m in merged], lam.grad


def _worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    gather.CHUNK_ELEMENTS = 2 * TASKS  # two rows at a time: every tensor above takes several chunks
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for storage in (torch.float32, torch.bfloat16):
            merged, gradient = rank_result(storage, world, rank)
            dist.all_reduce(gradient)  # as TorchCoefficients sums the coefficients' gradients over ranks
            expected_merged, expected_gradient = reference(storage, world)
            for got, expected in zip(merged, expected_merged):
                torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(gradient, expected_gradient, atol=1e-5, rtol=1e-6)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_two_ranks_gather_the_formula_and_sum_its_gradient():
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port()), nprocs=2)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_one_process_is_the_formula_with_chunks(storage, monkeypatch):
    monkeypatch.setattr(gather, "CHUNK_ELEMENTS", TASKS)  # one row at a time
    merged, gradient = rank_result(storage, 1, 0)
    expected_merged, expected_gradient = reference(storage, 1)
    for got, expected in zip(merged, expected_merged):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-5, rtol=1e-6)


def test_an_unused_output_contributes_no_gradient():
    merged_all, _ = rank_result(torch.float32, 1, 0)
    thetas, taus, lambdas = case(torch.float32)
    lam = lambdas.clone().requires_grad_(True)
    merged = gather_merged(lam, GroupRows(tuple(zip(thetas, taus)), NUMELS, 1, torch.float32))
    merged[2].sum().backward()  # the other outputs get no gradient (None in the backward)
    expected = torch.zeros_like(lambdas)
    expected[2] = taus[2].sum(0)
    torch.testing.assert_close(lam.grad, expected)
    torch.testing.assert_close(merged[2].detach(), merged_all[2])
