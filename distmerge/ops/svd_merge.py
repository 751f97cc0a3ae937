"""SVD merges of whole 2-D tensors: TSV-M (Gargiulo et al. 2025) and Iso-C / Iso-CTS (Marczak et al. 2025).

Each works on the stacked task vectors ``[T, m, n]`` of one 2-D tensor, with an exact SVD
(``torch.linalg.svd``, full_matrices=False) on the inputs' device, in float32 (or float64 on request), and
returns the merged task vector Delta in that dtype; ``merge`` adds theta_0 + alpha * Delta. Tensors that are not
2-D (norms, biases) take the mean task vector, as in both official codes. The singular vectors' signs are not
unique, but every result is a product U S V^T of pairs, which is.

Followed from the official code (read at github:AntoAndGar/task_singular_vectors ``compute_and_sum_svd_mem_reduction``
and github:danielm1405/iso-merging ``src/utils/iso.py``):

* TSV-M keeps k = floor(r / T) components per task (r = min(m, n); the official int(r * (1/T)) equals it for
  T < 49), concatenates them, replaces the stacked U and V by their orthogonal polar factors (P Q^T of their SVDs,
  the Procrustes solution) and rebuilds U_perp S V_perp^T.
* Iso-C takes M = sum_t tau_t (the sum, not the mean) and returns mean(S) * U V^T, the mean over all r singular
  values, zeros included.
* Iso-CTS: k_c = int(r * common_space_fraction), then moved so that r - k_c splits evenly over the tasks
  (the official ``round((r - k_c) / T) * T``, Python's half-to-even round); each task gives the top (r - k_c)/T
  directions of tau_t - U_c U_c^T tau_t (left projection only); task parts first, then the common U_c, S_c, V_c;
  both stacks orthogonalized as in TSV, the spectrum flattened to its mean.

Neither official code fixes alpha: both choose it on validation data over 0.1, 0.2, ..., 3.0.
"""

from __future__ import annotations

from distmerge.deferred import torch

COMMON_SPACE_FRACTION = 0.8  # iso-merging config/method/iso_cts.yaml


def compute_dtype(tensor: torch.Tensor, wide: bool = False) -> torch.dtype:
    return torch.float64 if wide or tensor.dtype == torch.float64 else torch.float32


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V^T with full_matrices=False (exact, the official call).

    LAPACK's divide and conquer (gesdd, torch's CPU driver) can fail to converge on matrices with clustered
    singular values; Iso-CTS's stack of orthonormal rows on the 1.1B benchmark family did. Then the same
    decomposition runs in float64, and failing that, of the transpose (A^T = V S U^T), a different path through
    the algorithm; the factors come back in the matrix's dtype. A matrix none of these decompose raises."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass  # the fallbacks below
    wide = matrix.to(torch.float64)
    try:
        left, values, right = torch.linalg.svd(wide, full_matrices=False)
    except torch.linalg.LinAlgError:
        v, values, left_t = torch.linalg.svd(wide.T, full_matrices=False)
        left, right = left_t.T, v.T
    return left.to(matrix.dtype), values.to(matrix.dtype), right.to(matrix.dtype)


def orthogonal_polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest ``matrix`` (Frobenius): P Q^T from matrix = P Sigma Q^T."""
    left, _, right = thin_svd(matrix)
    return left @ right


def tsv_rank(rows: int, columns: int, tasks: int) -> int:
    """Components kept per task: floor(min(m, n) / T)."""
    return min(rows, columns) // tasks


def tsv_delta(task_vectors: torch.Tensor, wide: bool = False) -> torch.Tensor:
    """TSV-M's merged task vector of one 2-D tensor from ``[T, m, n]``."""
    tasks, rows, columns = task_vectors.shape
    k = tsv_rank(rows, columns, tasks)
    dtype = compute_dtype(task_vectors, wide)
    if k == 0:  # more tasks than directions: the official stacks are all zero, so is the merge
        return torch.zeros((rows, columns), dtype=dtype, device=task_vectors.device)
    lefts, values, rights = [], [], []
    for t in range(tasks):
        u, s, vh = thin_svd(task_vectors[t].to(dtype))
        lefts.append(u[:, :k])
        values.append(s[:k])
        rights.append(vh[:k, :])
    # The official code pads the stacks with zero columns up to r; they meet zero singular values, so the
    # compact stacks give the same product.
    u_perp = orthogonal_polar(torch.cat(lefts, dim=1))
    v_perp = orthogonal_polar(torch.cat(rights, dim=0))
    return (u_perp * torch.cat(values)) @ v_perp


def iso_c_delta(task_vectors: torch.Tensor, wide: bool = False) -> torch.Tensor:
    """Iso-C's merged task vector of one 2-D tensor: mean(S) U V^T of the summed task matrix."""
    total = task_vectors.to(compute_dtype(task_vectors, wide)).sum(dim=0)
    u, s, vh = thin_svd(total)
    return s.mean() * (u @ vh)


def iso_cts_split(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(k_c common directions, directions per task) with k_c + T * per_task == rank."""
    common = int(rank * common_space_fraction)
    specific_total = round((rank - common) / tasks) * tasks
    common = max(0, rank - specific_total)  # the official code can go negative for tiny r; clamp instead
    return common, (rank - common) // tasks


def iso_cts_delta(task_vectors: torch.Tensor, common_space_fraction: float = COMMON_SPACE_FRACTION,
                  wide: bool = False) -> torch.Tensor:
    """Iso-CTS's merged task vector of one 2-D tensor from ``[T, m, n]``."""
    if not 0.0 <= common_space_fraction <= 1.0:
        raise ValueError(f"common_space_fraction must be in [0, 1], got {common_space_fraction}")
    tasks, rows, columns = task_vectors.shape
    common, per_task = iso_cts_split(min(rows, columns), tasks, common_space_fraction)
    wide_vectors = task_vectors.to(compute_dtype(task_vectors, wide))
    u, s, vh = thin_svd(wide_vectors.sum(dim=0))
    common_u, common_s, common_vh = u[:, :common], s[:common], vh[:common, :]
    lefts, values, rights = [], [], []
    for t in range(tasks):
        specific = wide_vectors[t] - common_u @ (common_u.T @ wide_vectors[t])
        ut, st, vht = thin_svd(specific)
        lefts.append(ut[:, :per_task])
        values.append(st[:per_task])
        rights.append(vht[:per_task, :])
    u_perp = orthogonal_polar(torch.cat(lefts + [common_u], dim=1))
    v_perp = orthogonal_polar(torch.cat(rights + [common_vh], dim=0))
    flat = torch.cat(values + [common_s]).mean()
    return flat * (u_perp @ v_perp)


def mean_delta(task_vectors: torch.Tensor, wide: bool = False) -> torch.Tensor:
    """The rule for tensors that are not 2-D: the mean task vector."""
    return task_vectors.to(compute_dtype(task_vectors, wide)).mean(dim=0)


DELTAS = {"tsv": tsv_delta, "iso_c": iso_c_delta, "iso_cts": iso_cts_delta}


def merged_delta(method: str, task_vectors: torch.Tensor, wide: bool = False, **options) -> torch.Tensor:
    """Delta of ``method`` for one tensor ``[T, ...]``: the SVD rule for 2-D tensors, the mean otherwise."""
    if method not in DELTAS:
        raise ValueError(f"unknown SVD merge {method!r}; known: {', '.join(DELTAS)}")
    if task_vectors.dim() != 3:
        return mean_delta(task_vectors, wide)
    return DELTAS[method](task_vectors, wide=wide, **options)


def merge(method: str, base: torch.Tensor, task_vectors: torch.Tensor, alpha: float = 1.0, wide: bool = False,
          **options) -> torch.Tensor:
    """theta_0 + alpha * Delta in the base's dtype."""
    delta = merged_delta(method, task_vectors, wide, **options)
    return (base.to(delta.dtype) + alpha * delta).to(base.dtype)
