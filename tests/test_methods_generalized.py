"""Declared per-model / per-tensor parameters, and the generalized task-vector method (no Ray)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from distmerge.errors import ConfigError
from distmerge.methods import build_method
from distmerge.methods.base import MergeMethod, Setting, build_params, resolve_job_settings


@dataclass(frozen=True)
class _GradedParams:
    PER_MODEL = {"density": Setting(0.0, 1.0, lo_open=True)}
    PER_TENSOR = {"t": Setting(0.0, 1.0, default=0.25)}
    density: Any = 0.5
    t: Any = None


class _Graded(MergeMethod):
    name = "graded"
    Params = _GradedParams


# --- step 1: settings declared on Params, resolved per tensor ---------------------------------------------


def test_per_model_values_resolve_model_then_method_then_default():
    method = _Graded(build_params(_GradedParams, {"density": [0.2, 0.6]}))
    given = [{"density": 0.9, "weight": 2.0}, {}, {"density": [{"filter": "mlp", "value": 0.1}]}]
    per_model, per_tensor = resolve_job_settings(method, "model.layers.1.attn.q.weight", 0.5, given)
    # model 0 its own; model 1 the method's gradient at t = 0.5; model 2's filter misses: the method's value
    assert per_model["density"] == pytest.approx((0.9, 0.4, 0.4))
    assert per_model["weight"] == (2.0, 1.0, 1.0)
    assert per_tensor == {"t": 0.25}  # not given: the declaration's default
    per_model, _ = resolve_job_settings(method, "model.layers.0.mlp.up.weight", 0.0, given)
    assert per_model["density"] == pytest.approx((0.9, 0.2, 0.1))


def test_per_tensor_values_follow_gradients_and_filters():
    method = _Graded(build_params(_GradedParams, {"t": [0.0, 0.5, 1.0]}))
    assert [resolve_job_settings(method, "x", t, [{}])[1]["t"] for t in (0.0, 0.25, 1.0)] == [0.0, 0.25, 1.0]
    method = _Graded(build_params(_GradedParams, {"t": [{"filter": "attn", "value": 0.9}, {"filter": "mlp", "value": 0.1}]}))
    assert resolve_job_settings(method, "layers.0.attn.q", 0.0, [{}])[1]["t"] == 0.9
    assert resolve_job_settings(method, "layers.0.mlp.up", 0.0, [{}])[1]["t"] == 0.1
    assert resolve_job_settings(method, "lm_head.weight", 0.0, [{}])[1]["t"] == 0.25  # no filter: the default


@pytest.mark.parametrize("raw, key", [
    ({"t": 1.5}, "parameters.t"),
    ({"t": [0.0, 2.0]}, "parameters.t[1]"),
    ({"t": [{"filter": "a", "value": -1}]}, "parameters.t[0].value"),
    ({"density": [0.5, 0.0]}, "parameters.density[1]"),
    ({"density": "high"}, "parameters.density"),
])
def test_declared_ranges_checked_on_every_entry(raw, key):
    with pytest.raises(ConfigError) as info:
        build_params(_GradedParams, raw)
    assert str(info.value).startswith(key + ":")


def test_declared_per_model_parameters_of_the_methods():
    assert set(build_method("ties", {}).per_model_settings()) == {"weight", "density"}
    assert set(build_method("dare", {"then": "ties"}).per_model_settings()) == {"weight", "density", "drop_rate"}
    assert set(build_method("dare", {}).per_model_settings()) == {"weight", "drop_rate"}
    assert set(build_method("emr", {}).per_model_settings()) == set()


# --- step 2: the generalized task-vector merge ---------------------------------------------------------------


def test_count_consensus_by_hand():
    from distmerge.methods.generalized import count_consensus

    trimmed = torch.tensor([[1.0, -2.0, 0.0, 3.0], [2.0, -1.0, -1.0, -3.0], [-5.0, 4.0, 0.0, -1.0]])
    # signs per element: (+,+,-) -> +; (-,-,+) -> -; (0,-,0) -> -; (+,-,-) -> -
    got = count_consensus(trimmed, [1.0, 1.0, 1.0], 1.0, "sum")
    assert torch.equal(got, torch.tensor([3.0, -3.0, -1.0, -4.0]))
    got = count_consensus(trimmed, [1.0, 1.0, 1.0], 1.0, "mean")
    assert torch.equal(got, torch.tensor([1.5, -1.5, -1.0, -2.0]))
    # a tie in the count: mergekit's +1 keeps the positive entry; weights scale before the vote
    tied = torch.tensor([[2.0], [-4.0]])
    assert torch.equal(count_consensus(tied, [1.0, 1.0], 1.0, "sum"), torch.tensor([2.0]))
    assert torch.equal(count_consensus(tied, [3.0, 1.0], 1.0, "mean"), torch.tensor([2.0]))  # 3*2 / 3


def test_the_methods_are_recipes():
    from distmerge.methods.generalized import Recipe, Sparsifier

    assert build_method("ties", {"trim_scope": "tensor", "convention": "mergekit", "disjoint": "sum"}).recipe() == Recipe(
        sparsify=(Sparsifier("magnitude", scope="tensor", convention="mergekit"),), consensus="mass", combine="sum",
        zero_sign="mergekit")
    dare = build_method("dare", {"then": "ties", "seed": 4, "rescale": "l1", "lambda": 0.5}).recipe()
    assert [s.kind for s in dare.sparsify] == ["random", "magnitude"] and dare.seed == 4 and dare.lam == 0.5
    assert build_method("task_arithmetic", {"normalize": True}).recipe() == Recipe(combine="mean")
    assert not build_method("dare", {"rescale": "l1"}).chunkable() and build_method("dare", {}).chunkable()
