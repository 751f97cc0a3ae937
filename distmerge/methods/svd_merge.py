"""The SVD merges of 2025: ``tsv`` (TSV-M, Gargiulo et al., CVPR 2025), ``iso_c`` and ``iso_cts`` (Marczak et
al., ICML 2025). Each 2-D tensor's task vectors are merged by ``distmerge.ops.svd_merge``; other tensors (norms,
biases) take the mean task vector, as both official codes do; theta = theta_0 + alpha * Delta.

Whole tensors (an SVD needs the whole matrix), one layer group at a time per actor; the SVDs run on the tensors'
device. Per-model weights do not enter the papers' formulas, so none are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from distmerge.deferred import torch
from distmerge.dtypes import FULL_PRECISION
from distmerge.errors import ConfigError, InputError
from distmerge.methods.base import TaskVectorMethod, require_choice, require_number
from distmerge.ops import svd_merge as ops

SVD_DTYPES = FULL_PRECISION


@dataclass(frozen=True)
class SvdMergeParams:
    alpha: float = 1.0  # both papers tune it on validation data (0.1 ... 3.0)
    svd_dtype: str = "float32"  # float64 for SVDs of ill-conditioned task matrices

    def validate(self, where: str) -> None:
        require_number(where, "alpha", self.alpha)
        require_choice(where, "svd_dtype", self.svd_dtype, SVD_DTYPES)

    def options(self) -> dict:
        return {}


@dataclass(frozen=True)
class TsvParams(SvdMergeParams):
    rank_fraction: float | None = None  # components kept per task, as a fraction of min(m, n); None: 1/T

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.rank_fraction is not None:
            require_number(where, "rank_fraction", self.rank_fraction, 0.0, 1.0, lo_open=True)


@dataclass(frozen=True)
class IsoCtsParams(SvdMergeParams):
    common_space_fraction: float = ops.COMMON_SPACE_FRACTION

    def validate(self, where: str) -> None:
        super().validate(where)
        require_number(where, "common_space_fraction", self.common_space_fraction, 0.0, 1.0)

    def options(self) -> dict:
        return {"common_space_fraction": self.common_space_fraction}


class SvdMerge(TaskVectorMethod):
    """Shared by the three: the op is chosen by ``name``."""

    name = "svd_merge"
    Params = SvdMergeParams
    per_model_keys = frozenset()

    def chunkable(self) -> bool:
        return False

    def merge_delta(self, base, task_vector, job, offset, state):
        wide = self.params.svd_dtype == "float64"
        try:
            delta = self.delta(task_vector, wide)
        except torch.linalg.LinAlgError as exc:
            raise InputError(f"tensor '{job.name}': {self.name}'s SVD did not converge, in float64 and transposed "
                             f"too ({str(exc).splitlines()[0]})") from None
        return (base.to(delta.dtype) + self.params.alpha * delta).to(base.dtype)

    def delta(self, task_vector: torch.Tensor, wide: bool) -> torch.Tensor:
        return ops.merged_delta(self.name, task_vector, wide, **self.params.options())

    def describe(self, state):
        return {"alpha": self.params.alpha}


class Tsv(SvdMerge):
    name = "tsv"
    Params = TsvParams

    def initial_state(self, jobs):
        fraction = self.params.rank_fraction
        tasks = len(jobs[0].model_names) if jobs else 1
        # Beyond 1/T the stacked singular vectors outnumber the dimensions and cannot be decorrelated.
        if fraction is not None and fraction * tasks > 1 + 1e-9:
            raise ConfigError(f"parameters.rank_fraction: {fraction} x {tasks} tasks keeps more components than a "
                              f"tensor has; at most 1/{tasks}")
        return {}

    def delta(self, task_vector, wide):
        fraction = self.params.rank_fraction
        if fraction is None or task_vector.dim() != 3:
            return super().delta(task_vector, wide)
        _, rows, columns = task_vector.shape
        return tsv_delta_keeping(task_vector, int(min(rows, columns) * fraction + 1e-9), wide)


class IsoC(SvdMerge):
    name = "iso_c"


class IsoCts(SvdMerge):
    name = "iso_cts"
    Params = IsoCtsParams


def tsv_delta_keeping(task_vectors: torch.Tensor, keep: int, wide: bool = False) -> torch.Tensor:
    """TSV-M's Delta keeping ``keep`` components per task (``ops.tsv_delta`` keeps floor(r / T))."""
    tasks, rows, columns = task_vectors.shape
    dtype = ops.compute_dtype(task_vectors, wide)
    if keep == 0:
        return torch.zeros((rows, columns), dtype=dtype, device=task_vectors.device)
    factors = [ops.thin_svd(task_vectors[t].to(dtype)) for t in range(tasks)]
    u_perp = ops.orthogonal_polar(torch.cat([u[:, :keep] for u, _, _ in factors], dim=1))
    v_perp = ops.orthogonal_polar(torch.cat([vh[:keep, :] for _, _, vh in factors], dim=0))
    return (u_perp * torch.cat([s[:keep] for _, s, _ in factors])) @ v_perp
