"""Metrics as GLUE's ``evaluate`` metric computes them (sklearn/scipy definitions), in numpy only.

Edge cases follow sklearn: F1 and Matthews are 0 when undefined (no positives, or a constant prediction);
Pearson/Spearman are NaN for a constant input (scipy returns NaN there too).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _arrays(predictions: Sequence, references: Sequence) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape != r.shape:
        raise ValueError(f"predictions {p.shape} and references {r.shape} differ in shape")
    return p, r


def accuracy(predictions: Sequence, references: Sequence) -> float:
    p, r = _arrays(predictions, references)
    return float(np.mean(p == r)) if p.size else float("nan")


def f1(predictions: Sequence, references: Sequence, positive: int = 1) -> float:
    """Binary F1 of the ``positive`` label (GLUE's MRPC/QQP)."""
    p, r = _arrays(predictions, references)
    tp = float(np.sum((p == positive) & (r == positive)))
    fp = float(np.sum((p == positive) & (r != positive)))
    fn = float(np.sum((p != positive) & (r == positive)))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions: Sequence, references: Sequence) -> float:
    """Matthews correlation for any number of classes (sklearn's multiclass formula; binary is the usual MCC)."""
    p, r = _arrays(predictions, references)
    labels = np.union1d(p, r)
    index = {label: i for i, label in enumerate(labels.tolist())}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.float64)
    np.add.at(confusion, (np.array([index[x] for x in r.tolist()], dtype=np.int64),
                          np.array([index[x] for x in p.tolist()], dtype=np.int64)), 1.0)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, samples = np.trace(confusion), confusion.sum()
    cov_ytyp = correct * samples - np.dot(t_sum, p_sum)
    cov_ypyp = samples**2 - np.dot(p_sum, p_sum)
    cov_ytyt = samples**2 - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = (np.asarray(v, dtype=np.float64) for v in _arrays(x, y))
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.dot(a, b) / denominator) if denominator else float("nan")


def rankdata(values: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (scipy's ``rankdata(method='average')``)."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    ranks = np.empty(len(v), dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_v)) + 1]
    ends = np.r_[starts[1:], len(v)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(rankdata(x), rankdata(y))


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token)."""
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased pass@k estimator of the Codex paper (1 - C(n-c, k) / C(n, k)); pass@1 of one greedy sample is
    that sample's pass/fail."""
    if samples - correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(samples - correct + 1, samples + 1)))


def glue_metrics(task: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """The metrics GLUE's ``evaluate`` metric reports for ``task``, plus MergeLM's ``averaged_scores`` where it
    reports more than one."""
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(predictions, references)}
    if task == "stsb":
        result = {"pearson": pearson(predictions, references), "spearmanr": spearman(predictions, references)}
    elif task in ("mrpc", "qqp"):
        result = {"accuracy": accuracy(predictions, references), "f1": f1(predictions, references)}
    else:
        return {"accuracy": accuracy(predictions, references)}
    result["averaged_scores"] = float(np.mean(list(result.values())))
    return result
