"""The functionally merged model: theta0 and the task vectors held as frozen flat tensors, the coefficients apart.

Each merged tensor n is stored as theta0_n, flat [numel], and its task vectors tau_n, flat [numel, T], so that
FSDP2 (which shards dim 0) gives each rank a contiguous element range of every tensor for all tasks at once:
ranks stay balanced whatever T is, AdaMerging++'s sign election (across tasks, per element) is local, and a
rank's shard is read from the checkpoints as a row range. One ``GroupBank`` per layer group is one FSDP unit
and one gather of merged tensors: a layer's group is gathered inside that layer's forward (``layerwise``), the
groups outside the layers (embeddings, final norm, head) before the forward, and kept for its backward.

The merged weights are theta0_n + tau_n @ clamp(lambda_n, 0, 1), computed by each rank on its own rows and
then gathered (``gather.py``), so the gradients reach only the coefficients (spec algorithms.md section 6).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distmerge import dtypes
from distmerge.architectures import group_by_layer, layer_of
from distmerge.adamerging.gather import GroupRows, gather_merged
from distmerge.errors import InputError, where
from distmerge.io.checkpoint import Checkpoint, check_same_tensors
from distmerge.ops import ties as ties_ops

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over ranks (identity in one process)


def no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class TensorPlan:
    """Which tensors are merged, their shapes, groups, and which coefficient row each one trains."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[int, ...], ...]  # indices into names, one tuple per layer group (FSDP unit)
    rows: tuple[int | None, ...]  # coefficient row of each tensor; None: frozen at lambda_init
    tasks: tuple[str, ...]
    granularity: str

    @property
    def num_rows(self) -> int:
        return max((r for r in self.rows if r is not None), default=-1) + 1

    def numel(self, i: int) -> int:
        return math.prod(self.shapes[i])


def plan_tensors(base: Checkpoint, experts: dict[str, Checkpoint], exclude: tuple[str, ...],
                 freeze: tuple[str, ...], granularity: str, freeze_first_layers: float = 0.0) -> TensorPlan:
    """Every floating-point tensor of the base not excluded is merged; each expert must have it, same shape.
    Frozen (kept at lambda_init): tensors matching a ``freeze`` regex, and those of the first
    int(``freeze_first_layers`` x layers) layers."""
    excluded = [re.compile(p) for p in exclude]
    frozen = [re.compile(p) for p in freeze]
    names = sorted(n for n, info in base.tensors.items()
                   if dtypes.is_floating(info.dtype) and not any(p.search(n) for p in excluded))
    if not names:
        raise InputError(f"{where(model='base', file=str(base.folder))}: no tensor is left to merge after exclude")
    for expert in experts.values():
        check_same_tensors(expert, base, names, "base")
    layers = {name: layer_of(name)[1] for name in names}
    known = [layer for layer in layers.values() if layer is not None]
    first_trained = int(freeze_first_layers * (max(known) + 1)) if known else 0
    rows: list[int | None] = []
    trainable = 0
    for name in names:
        if any(p.search(name) for p in frozen) or (layers[name] is not None and layers[name] < first_trained):
            rows.append(None)
        elif granularity == "task":
            rows.append(0)
        else:
            rows.append(trainable)
            trainable += 1
    index = {name: i for i, name in enumerate(names)}
    groups = tuple(tuple(index[n] for n in group) for group in group_by_layer(names).values())
    return TensorPlan(names=tuple(names), shapes=tuple(tuple(base.tensors[n].shape) for n in names),
                      groups=groups, rows=tuple(rows), tasks=tuple(experts),
                      granularity=granularity)


class Coefficients(torch.nn.Module):
    """The trainable lambdas: [rows, T] (rows = 1 task-wise, one per trainable tensor layer-wise)."""

    def __init__(self, plan: TensorPlan, lambda_init: float):
        super().__init__()
        self.plan = plan
        self.lambda_init = lambda_init
        self.raw = torch.nn.Parameter(torch.full((max(plan.num_rows, 1), len(plan.tasks)), float(lambda_init)))

    def per_tensor(self, indices: tuple[int, ...] | None = None, raw: torch.Tensor | None = None) -> torch.Tensor:
        """[len(indices), T]: each tensor's coefficients (lambda_init for frozen ones), from ``raw`` if given."""
        indices = range(len(self.plan.names)) if indices is None else indices
        clamped = (self.raw if raw is None else raw).clamp(0.0, 1.0)  # the reference's lambdas(): zero gradient
        # outside [0, 1]
        fixed = torch.full((len(self.plan.tasks),), float(self.lambda_init), dtype=clamped.dtype, device=clamped.device)
        return torch.stack([fixed if self.plan.rows[i] is None else clamped[self.plan.rows[i]] for i in indices])


def compute_dtype(storage: torch.dtype) -> torch.dtype:
    """What a bank stored in ``storage`` merges in: float64 stays, anything else is float32."""
    return torch.float64 if storage == torch.float64 else torch.float32


class GroupBank(torch.nn.Module):
    """theta0 and tau of one layer group's tensors, frozen. With ``rows_multiple`` W > 1 each tensor gets zero
    rows up to a multiple of W, so that ZeRO-3's even split of the flattened [rows, T] lands on row boundaries
    and gives rank r the rows ``shard_range`` gives it (FSDP2 splits unpadded rows the same way).

    ``merge`` is a method, not the module's forward: FSDP2's module hooks would gather theta0 and every tau,
    where the merged-rows gather (``gather.py``) moves one copy."""

    world, rank = 1, 0  # which rows this rank holds and how many ranks gather them (``Bank.place``)

    def __init__(self, indices: tuple[int, ...], plan: TensorPlan, dtype: torch.dtype, rows_multiple: int = 1):
        super().__init__()
        self.indices = indices
        self.storage_dtype = dtype
        self.numels = tuple(plan.numel(i) for i in indices)
        tasks = len(plan.tasks)
        for j, numel in enumerate(self.numels):
            rows = -(-numel // rows_multiple) * rows_multiple
            self.register_parameter(f"theta{j}", torch.nn.Parameter(torch.empty(rows, dtype=dtype), requires_grad=False))
            self.register_parameter(f"tau{j}", torch.nn.Parameter(torch.empty(rows, tasks, dtype=dtype),
                                                                  requires_grad=False))

    def pairs(self):
        for j, i in enumerate(self.indices):
            yield i, getattr(self, f"theta{j}"), getattr(self, f"tau{j}")

    def merge(self, lambdas: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The merged flat tensors of this group, whole, in ``compute_dtype`` (a half-precision bank is only
        storage: the products and the coefficients' gradients are float32, float64 for a float64 bank);
        ``lambdas`` is [len(indices), T]."""
        rows = GroupRows(tuple((theta, tau) for _, theta, tau in self.local_pairs(self.world, self.rank)),
                         self.numels, self.world, compute_dtype(self.storage_dtype))
        return gather_merged(lambdas, rows)

    def local_pairs(self, world: int, rank: int):
        """(index, theta, tau) of this rank's rows (``shard_range``), as views of the rank's own storage."""
        for j, (i, theta, tau) in enumerate(self.pairs()):
            start, stop = shard_range(self.numels[j], world, rank)
            yield i, local_tensor(theta, stop - start), local_tensor(tau, stop - start)


class Bank(torch.nn.Module):
    def __init__(self, plan: TensorPlan, dtype: torch.dtype = torch.float32, rows_multiple: int = 1):
        super().__init__()
        self.plan = plan
        self.groups = torch.nn.ModuleList(GroupBank(g, plan, dtype, rows_multiple) for g in plan.groups)

    def place(self, world: int, rank: int) -> None:
        """This rank holds ``shard_range(numel, world, rank)`` of every tensor (the strategy placed them so)."""
        for group in self.groups:
            group.world, group.rank = world, rank

    def forward(self, coefficients: Coefficients, skip: frozenset[int] = frozenset()) -> dict[str, torch.Tensor]:
        """Every merged tensor outside the groups in ``skip`` (merged inside their layers: ``layerwise``), flat."""
        out = {}
        for g, group in enumerate(self.groups):
            if g in skip:
                continue
            flats = group.merge(coefficients.per_tensor(group.indices))
            for i, flat in zip(group.indices, flats):
                out[self.plan.names[i]] = flat
        return out

    def merged(self, coefficients: Coefficients, skip: frozenset[int] = frozenset()) -> dict[str, torch.Tensor]:
        """Every merged tensor outside the groups in ``skip``, in its shape."""
        shapes = dict(zip(self.plan.names, self.plan.shapes))
        return {name: flat.reshape(shapes[name]) for name, flat in self(coefficients, skip).items()}


# --- filling a (sharded) bank from the checkpoints ----------------------------------------------


def local_tensor(param: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """This rank's shard of a parameter: FSDP2's local DTensor part, ZeRO-3's partition in the parameter's
    row shape (cut to ``rows``, the real ones), or the whole tensor in one process."""
    if hasattr(param, "ds_tensor"):
        local = param.ds_tensor.view(-1, *param.ds_shape[1:])
        return local if rows is None else local[:rows]
    return param.to_local() if hasattr(param, "to_local") else param.data


def shard_range(numel: int, world: int, rank: int) -> tuple[int, int]:
    """The element range FSDP2's dim-0 sharding gives ``rank`` (torch.chunk: ceil-sized pieces, last ones short)."""
    size = -(-numel // world) if numel else 0
    start = min(numel, rank * size)
    return start, min(numel, start + size)


def read_flat(checkpoint: Checkpoint, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Elements [start, stop) of a tensor flattened, reading only the rows that hold them."""
    shape = checkpoint.info(name).shape
    if stop <= start:
        return torch.empty(0, dtype=dtype)
    if len(shape) == 0:
        return checkpoint.read(name).reshape(-1).to(dtype)[start:stop]
    row = math.prod(shape[1:])
    first, last = start // row, -(-stop // row)
    values = checkpoint.read(name, first, last).reshape(-1).to(dtype)
    return values[start - first * row: stop - first * row]


def fill_bank(bank: Bank, base: Checkpoint, experts: list[Checkpoint], world: int, rank: int) -> None:
    """Each rank reads its own element range of every tensor: no process holds a whole task vector."""
    with torch.no_grad():
        for group in bank.groups:
            for i, local_theta, local_tau in group.local_pairs(world, rank):
                name = bank.plan.names[i]
                start, stop = shard_range(bank.plan.numel(i), world, rank)
                if local_theta.shape[0] != stop - start:
                    raise RuntimeError(f"shard of '{name}' holds {local_theta.shape[0]} elements, expected "
                                       f"{stop - start}: the strategy's dim-0 split differs from torch.chunk's")
                exact = compute_dtype(local_theta.dtype)  # tau = theta_t - theta0 before any rounding to storage
                base_values = read_flat(base, name, start, stop, exact)
                local_theta.copy_(base_values)
                for t, expert in enumerate(experts):
                    local_tau[:, t].copy_(read_flat(expert, name, start, stop, exact) - base_values)


# --- AdaMerging++: TIES trim (global) and sign election on the task vectors ------------------------


@dataclass(frozen=True)
class PlusMasks:
    thresholds: tuple[float, ...]  # per task: keep |tau| >= threshold (over all merged tensors)
    zero_sign: float  # the sign given to elements whose elected sign is 0 (the global majority)


def plus_keep(tau: torch.Tensor, masks: PlusMasks) -> torch.Tensor:
    """Which entries of tau [n, T] AdaMerging++ keeps: above the task's trim threshold and agreeing with the
    elected sign (``ties_merging_split``: where sign > 0 the positive ones, else the negative ones)."""
    trimmed = ties_ops.trim(tau.T.contiguous(), masks.thresholds)
    sign = ties_ops.elected_sign(trimmed)
    sign = torch.where(sign == 0, torch.full_like(sign, masks.zero_sign), sign)
    keep = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    return keep.T


def plus_masks(taus: list[torch.Tensor], total_numel: int, density: float, reduce: AllReduce) -> PlusMasks:
    """The global trim thresholds and majority sign over every rank's local task vectors ([n, T] each), found
    exactly by the two radix-histogram passes of the TIES engine, summed over ranks by ``reduce``."""
    tasks = taus[0].shape[1] if taus else 0
    rank = ties_ops.trim_rank(total_numel, density, "paper")
    if rank == 0:
        thresholds = [ties_ops.KEEP_ALL] * tasks
    elif rank > total_numel:
        thresholds = [ties_ops.KEEP_NONE] * tasks
    else:
        high = torch.zeros(tasks, ties_ops.HIGH_BINS, dtype=torch.int64)
        for tau in taus:
            for t in range(tasks):
                high[t] += ties_ops.radix_high_histogram(tau[:, t])
        high = reduce(high)
        located = [ties_ops.locate_rank(high[t], rank) for t in range(tasks)]
        low = torch.zeros(tasks, ties_ops.HIGH_BINS, dtype=torch.int64)
        for tau in taus:
            for t in range(tasks):
                low[t] += ties_ops.radix_low_histogram(tau[:, t], located[t][0])
        low = reduce(low)
        thresholds = [ties_ops.bits_to_value(located[t][0], ties_ops.locate_rank(low[t], located[t][1])[0])
                      for t in range(tasks)]
    sign_sum = torch.zeros((), dtype=torch.float64)
    for tau in taus:
        if tau.numel():
            sign_sum += ties_ops.elected_sign(ties_ops.trim(tau.T.contiguous(), thresholds)).sum(dtype=torch.float64)
    zero_sign = float(torch.sign(reduce(sign_sum)))
    return PlusMasks(tuple(float(x) for x in thresholds), zero_sign)


def apply_plus(bank: Bank, density: float, reduce: AllReduce, world: int = 1, rank: int = 0) -> PlusMasks:
    """Replace every local tau by its AdaMerging++ selection, in place; the masks are the same on every rank."""
    taus = [tau for group in bank.groups for _, _, tau in group.local_pairs(world, rank)]
    total = sum(bank.plan.numel(i) for i in range(len(bank.plan.names)))
    masks = plus_masks(taus, total, density, reduce)
    with torch.no_grad():
        for tau in taus:
            if tau.numel():
                tau.mul_(plus_keep(tau, masks).to(tau.dtype))
    return masks
