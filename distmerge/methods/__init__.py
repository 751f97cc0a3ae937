"""Merge methods by name: one file each, behind this registry (``METHODS``) and ``build_method``."""

from __future__ import annotations

from typing import Any

from distmerge.errors import ConfigError
from distmerge.methods.base import MergeMethod, TensorJob, build_params, params_to_yaml
from distmerge.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from distmerge.methods.dare import Dare
from distmerge.methods.della import Della, DellaLinear
from distmerge.methods.emr import Emr
from distmerge.methods.model_stock import ModelStock
from distmerge.methods.regmean import RegMean
from distmerge.methods.slerp import NuSlerp, Slerp
from distmerge.methods.svd_merge import IsoC, IsoCts, Tsv
from distmerge.methods.task_arithmetic import TaskArithmetic
from distmerge.methods.ties import Ties
from distmerge.methods.weight_average import WeightAverage

METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls for cls in (WeightAverage, TaskArithmetic, Ties, Dare, Breadcrumbs, BreadcrumbsTies, Della, DellaLinear,
                            Emr, ModelStock, Slerp, NuSlerp, Tsv, IsoC, IsoCts, RegMean)
}


def build_method(name: str, raw_params: dict[str, Any] | None, where: str = "parameters") -> MergeMethod:
    """The method object for a config's ``method`` and ``parameters``; errors name the key."""
    if name not in METHODS:
        raise ConfigError(f"method: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    raw = dict(raw_params or {})
    cls = METHODS[name]
    if cls is Dare:
        return Dare.from_raw(raw, where, METHODS)
    return cls(build_params(cls.Params, raw, where))


def method_params_yaml(method: MergeMethod) -> dict[str, Any]:
    """Every resolved parameter of a method, as it would be written in YAML."""
    if isinstance(method, Dare):
        return method.to_yaml()
    return params_to_yaml(method.params)


__all__ = ["METHODS", "MergeMethod", "TensorJob", "build_method", "method_params_yaml"]
