"""Declared per-model / per-tensor parameters, and the generalized task-vector method (no Ray)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from distmerge.errors import ConfigError
from distmerge.methods import build_method
from distmerge.methods.base import MergeMethod, Setting, build_params, resolve_job_settings
from distmerge.ops import ties as ties_ops
from distmerge.ops import ties_fused


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


# --- step 4: breadcrumbs and DELLA as configurations ------------------------------------------------------

SHAPES = {"a.weight": (6, 5), "b.bias": (9,), "c.weight": (4, 7)}


def _family(seed: int, tasks: int = 3):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    experts = [{n: base[n] + torch.randn(s, generator=g) * 0.1 for n, s in SHAPES.items()} for _ in range(tasks)]
    return base, experts


def _merge(method, base, experts, given=None, rows=None):
    """The executor without Ray, models e0, e1, ... with per-model settings ``given``; ``rows`` a chunk."""
    from distmerge.methods import execute

    def chunker(tensor, chunked):
        return execute.row_chunks(tensor, chunked, (rows or 1 << 20) * execute.row_elements(tensor))

    return execute.merge_tensor_dicts(method, base, experts, given, chunker=chunker)


def _reference_gta(base, experts, masks, weights, lam, consensus, normalize):
    """mergekit's generalized task arithmetic, written flat: masked deltas, weights, sign mask, sum / divisor."""
    out = {}
    for n in base:
        deltas = torch.stack([(e[n] - base[n]) * m[n] for e, m in zip(experts, masks)])
        w = torch.tensor(weights).reshape(-1, *([1] * base[n].dim()))
        deltas = deltas * w
        if consensus:
            majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
            keep = (deltas.sign() == majority).float()
            mixed, divisor = (deltas * keep).sum(0), (w * keep).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed, divisor = deltas.sum(0), w.sum(0).expand_as(base[n])
        out[n] = base[n] + lam * (mixed / divisor if normalize else mixed)
    return out


@pytest.mark.parametrize("name, consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_mergekit_convention_is_mergekit_formula(name, consensus):
    from distmerge.ops.sparsify import mergekit_outlier_mask

    base, experts = _family(1)
    given = [{"density": 0.6, "gamma": 0.1, "weight": 0.7}, {"density": 0.5, "gamma": 0.0, "weight": 1.3},
             {"density": 0.9, "gamma": 0.2, "weight": 1.0}]
    method = build_method(name, {"convention": "mergekit", "lambda": 0.8})
    got, _ = _merge(method, base, experts, given)
    masks = [{n: mergekit_outlier_mask(e[n] - base[n], g["density"], g["gamma"]).float() for n in base}
             for e, g in zip(experts, given)]
    want = _reference_gta(base, experts, masks, [g["weight"] for g in given], 0.8, consensus, normalize=False)
    for n in base:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)


def test_breadcrumbs_paper_cut_by_hand():
    base = {"x": torch.zeros(10)}
    tau = torch.tensor([0.1, -0.9, 0.3, 0.5, -0.2, 1.0, 0.05, -0.6, 0.7, 0.4])
    got, _ = _merge(build_method("breadcrumbs", {"density": 0.5, "gamma": 0.1}), base, [{"x": tau}])
    # drop the largest (1.0), keep the next five: -0.9, 0.7, -0.6, 0.5, 0.4
    assert torch.equal(got["x"], torch.tensor([0.0, -0.9, 0.0, 0.5, 0.0, 0.0, 0.0, -0.6, 0.7, 0.4]))
    with pytest.raises(ConfigError, match=r"models\[e0\].*density \+ gamma must be <= 1"):
        _merge(build_method("breadcrumbs", {"density": 0.95, "gamma": 0.1}), base, [{"x": tau}])


def test_della_density_one_is_ties_and_task_arithmetic():
    base, experts = _family(2)
    given = [{"weight": w} for w in (0.5, 1.0, 1.5)]
    della, _ = _merge(build_method("della", {"density": 1.0, "epsilon": 0.0, "lambda": 0.7}), base, experts, given)
    ties, _ = _merge(build_method("ties", {"density": 1.0, "trim_scope": "tensor", "lambda": 0.7}), base, experts, given)
    linear, _ = _merge(build_method("della_linear", {"density": 1.0, "epsilon": 0.0}), base, experts, given)
    ta, _ = _merge(build_method("task_arithmetic", {}), base, experts, given)
    for n in base:
        assert torch.equal(della[n], ties[n]) and torch.equal(linear[n], ta[n])


def test_della_epsilon_zero_draws_dares_mask():
    base, experts = _family(3)
    got, _ = _merge(build_method("della_linear", {"density": 0.6, "epsilon": 0.0, "seed": 7}), base, experts)
    dare, _ = _merge(build_method("dare", {"drop_rate": 0.4, "seed": 7}), base, experts, rows=2)
    for n in base:
        torch.testing.assert_close(got[n], dare[n], rtol=1e-6, atol=1e-7)


def _magprune_flat(base, experts, name: str, density: float, epsilon: float, seed: int) -> list[torch.Tensor]:
    """Each expert's MagPrune of one tensor as the paper states it: keep probability density - epsilon + 2
    epsilon x (rank of |tau| in its row) / (row length - 1), drawn by distmerge's stream, kept values / p."""
    from distmerge.ops import sparsify as sp

    pruned = []
    for i, e in enumerate(experts):
        tau = e[name] - base[name]
        rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
        rank = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).double()
        p = ((density - epsilon) + 2 * epsilon * rank / (rows.shape[1] - 1)).reshape(tau.shape)
        keep = sp.della_keep_mask(p, seed, f"e{i}", name, tau.numel())
        pruned.append(torch.where(keep, tau.double() / p, 0.0).float())
    return pruned


def test_della_against_flat_paper_reference():
    base, experts = _family(4)
    got, _ = _merge(build_method("della", {"density": 0.5, "epsilon": 0.2, "seed": 3, "lambda": 1.2}), base, experts)
    for n in base:
        stacked = torch.stack(_magprune_flat(base, experts, n, 0.5, 0.2, 3))
        sign = torch.sign(stacked.sum(0))
        sign[sign == 0] = torch.sign(sign.sum()) or 1.0
        agree = (stacked.sign() == sign).float()
        want = base[n] + 1.2 * (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-6)


def test_della_linear_against_flat_paper_reference():
    """MagPrune, then a weighted sum (no consensus) and lambda; normalize divides by the summed weights."""
    base, experts = _family(6)
    weights = (0.5, 1.0, 2.0)
    for normalize in (False, True):
        got, _ = _merge(build_method("della_linear", {"density": 0.4, "epsilon": 0.3, "seed": 9, "lambda": 0.8,
                                                       "normalize": normalize}), base, experts,
                        [{"weight": w} for w in weights])
        for n in base:
            pruned = _magprune_flat(base, experts, n, 0.4, 0.3, 9)
            total = sum(w * t for w, t in zip(weights, pruned)) / (sum(weights) if normalize else 1.0)
            torch.testing.assert_close(got[n], base[n] + 0.8 * total, rtol=1e-6, atol=1e-6)


def test_della_merges_a_zero_dimensional_tensor_as_a_one_element_row():
    """A 0-d parameter (CLIP's logit_scale) is a row of one element: its merge is that of the same value held
    in a 1-element tensor (it raised an IndexError before)."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, generator=g)
    for name in ("della", "della_linear"):
        method = build_method(name, {"density": 0.5, "epsilon": 0.1, "seed": 1})
        scalar, _ = _merge(method, {"s": values[0]}, [{"s": values[1]}, {"s": values[2]}])
        row, _ = _merge(method, {"s": values[:1]}, [{"s": values[1:2]}, {"s": values[2:3]}])
        assert scalar["s"].shape == () and torch.equal(scalar["s"].reshape(1), row["s"]), name


def test_della_refuses_a_window_outside_zero_one_before_reading():
    base, experts = _family(5, tasks=2)
    with pytest.raises(ConfigError, match=r"models\[e1\].*tensor 'a.weight'.*epsilon"):
        _merge(build_method("della", {"density": 0.5}), base, experts, [{}, {"epsilon": 0.6}])


def test_mergekit_yaml_for_della_and_breadcrumbs():
    from distmerge.config import load_config

    def read(method, **parameters):
        return load_config({"merge_method": method, "base_model": "./base", "parameters": parameters,
                            "models": [{"model": "./base"}, {"model": "./a", "parameters": {"density": 0.4}}, {"model": "./b"}]})

    della = read("della", epsilon=0.1)
    assert della.method == "della" and della.names == ("a", "b")
    assert della.parameters == {"lambda": 1.0, "density": 1.0, "epsilon": 0.15, "rescale": "l1", "convention": "mergekit",
                                "normalize": True, "seed": 0}
    assert [m.parameters for m in della.models] == [{"density": 0.4, "epsilon": 0.1}, {"epsilon": 0.1}]
    assert read("della_linear", rescale=False).parameters["rescale"] == "none"
    assert read("della_linear").build_method().recipe().combine == "sum"
    crumbs = read("breadcrumbs_ties", gamma=0.05, normalize=True)
    assert crumbs.parameters["convention"] == "mergekit" and crumbs.build_method().recipe().consensus == "mass"
    assert crumbs.build_method().recipe().combine == "mean" and crumbs.models[1].parameters == {"gamma": 0.05}


def test_della_on_the_engine_same_files_with_one_and_two_workers(llama_family, tmp_path, ray_cluster):
    from safetensors.torch import load_file

    from distmerge import merge

    base, experts = llama_family
    config = {"method": "della", "base_model": str(base), "parameters": {"density": 0.5, "epsilon": 0.2, "seed": 11},
              "models": [{"model": str(e), "weight": 1.0 - 0.3 * i} for i, e in enumerate(experts)],
              "out_shard_size": "40KB"}
    outputs = []
    for workers in (1, 2):
        merge(config, tmp_path / f"w{workers}", workers=workers, progress=False)
        outputs.append({p.name: load_file(str(p)) for p in sorted((tmp_path / f"w{workers}").glob("*.safetensors"))})
    assert outputs[0].keys() == outputs[1].keys() and len(outputs[0]) > 1
    for shard, tensors in outputs[0].items():
        assert all(torch.equal(value, outputs[1][shard][key]) for key, value in tensors.items()), shard
    merged = {k: v for shard in outputs[0].values() for k, v in shard.items()}
    base_tensors = {k: v for p in sorted(base.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    name = "model.layers.0.mlp.up_proj.weight"
    moved = merged[name] != base_tensors[name]
    assert 0.2 < moved.float().mean() < 0.9  # about half the entries kept by either expert, none rescaled to 0


# --- the whole-model trim from a sample (``leaves_undecided``) ----------------------------------------------

SAMPLED_SHAPES = {"a.weight": (384, 128), "b.weight": (256, 192), "c.bias": (1000,)}


def _sampled_family(seed: int, grid: bool):
    """bf16-valued inputs on a coarse grid (a few |tau| values, each many times: the threshold is one of them)
    or float32 ones on a fine grid (hundreds of |tau| values: a bracket). (base + tau) - base is tau exactly;
    the task vectors lean negative (the model-wide majority sign is then -1, so the zero-sign patches apply) and
    cancel exactly in some elements (zero signs)."""
    g = torch.Generator().manual_seed(seed)
    base, experts = {}, [{} for _ in range(3)]
    for name, shape in SAMPLED_SHAPES.items():
        if grid:
            base[name] = (torch.randint(-8, 9, shape, generator=g) * 0.125).float()
            taus = []
            for _ in experts:
                step = torch.randint(-4, 5, shape, generator=g)
                step[(step > 0) & (torch.rand(shape, generator=g) < 0.2)] *= -1
                taus.append(step * 0.0625)
        else:
            base[name] = torch.round(torch.randn(shape, generator=g) * 2**16) / 2**16
            taus = [torch.round((torch.randn(shape, generator=g) - 0.05) * 0.01 * (t + 1) * 2**16) / 2**16
                    for t in range(len(experts))]
            cancel = torch.rand(shape, generator=g) < 0.3
            taus[1] = torch.where(cancel, -taus[0], taus[1])
        for expert, tau in zip(experts, taus):
            expert[name] = base[name] + tau
    return base, experts


def _merged_both_ways(params, base, experts):
    from distmerge.methods import execute

    def chunker(tensor, chunked):
        return execute.row_chunks(tensor, chunked, 40 * execute.row_elements(tensor))

    method = build_method("ties", params)
    exact = execute.merge_tensor_dicts(method, base, experts, chunker=chunker)
    sampled = execute.merge_tensor_dicts(method, base, experts, chunker=chunker, leave_undecided=True)
    for name in exact[0]:
        assert torch.equal(exact[0][name].view(torch.int32), sampled[0][name].view(torch.int32)), name
    return exact[1], sampled[1]


@pytest.mark.skipif(ties_fused._kernels() is None, reason="numba is not installed")
@pytest.mark.parametrize("grid, estimate", [(True, "guess"), (False, "bracket")])
@pytest.mark.parametrize("params", [{"density": 0.15}, {"density": 0.5, "disjoint": "sum", "lambda": 0.7},
                                    {"density": 0.35, "convention": "mergekit"}])
def test_a_sampled_trim_merges_the_exact_passes_bits(grid, estimate, params):
    """The merge from the sample's estimates gives the bits, thresholds and zero-sign patches of the exact passes:
    from a guess that held (bf16 grid inputs) or a bracket whose elements were merged again (float32)."""
    exact, sampled = _merged_both_ways({"trim_scope": "global", **params}, *_sampled_family(7, grid))
    assert sampled["estimates"] == [estimate] * 3 and "estimates" not in exact
    assert sampled["thresholds"] == exact["thresholds"]
    assert ("high_bins" in sampled) == (estimate == "bracket")  # guesses that held need no pass after the merge
    assert sampled.get("patched_elements") == exact.get("patched_elements")
    if params.get("convention") != "mergekit":
        assert exact["patched_elements"] > 0  # the zero-sign rule was exercised


@pytest.mark.skipif(ties_fused._kernels() is None, reason="numba is not installed")
@pytest.mark.parametrize("estimate", ["guess", "bracket"])
def test_an_estimate_that_misses_merges_again_from_the_exact_passes(estimate, monkeypatch):
    from distmerge.methods import generalized

    far = ties_ops.high_bin_of(1000.0) << 16  # above every |tau|: the threshold is not there
    monkeypatch.setattr(generalized, "_bracket", lambda *a: [far, far if estimate == "guess" else far | 0xFFFF])
    exact, sampled = _merged_both_ways({"trim_scope": "global", "density": 0.2}, *_sampled_family(8, True))
    assert sampled["estimates"] == "missed: merged again from exact passes"
    assert sampled["thresholds"] == exact["thresholds"]


def test_the_sample_estimate_is_a_guess_only_where_every_possible_rank_is_one_value():
    from distmerge.methods.generalized import MAX_FINITE_KEY, _bracket

    hist = torch.zeros(ties_ops.HIGH_BINS, dtype=torch.int64)
    none = torch.zeros_like(hist)
    hist[100], hist[101], hist[102] = 10_000, 80_000, 10_000  # ranks 10001..90000 in bin 101
    assert _bracket(hist, none, 0, 0.5) == [0, MAX_FINITE_KEY]  # nothing sampled: everything undecided
    assert _bracket(hist, none, 100_000, 0.5) == [101 << 16, 101 << 16]  # a guess: bin 101's regular value
    irregular = none.clone()
    irregular[101] = 40_001  # bin 101's regular values are ranks 10001..49999: rank 50000 +- 8 sd is not all there
    assert _bracket(hist, irregular, 100_000, 0.5) == [101 << 16, (101 << 16) | 0xFFFF]
    assert _bracket(hist, none, 100_000, 0.1) == [100 << 16, (101 << 16) | 0xFFFF]  # 10000 +- 8 sd: two bins
    assert _bracket(hist, none, 100_000, 0.99995) == [102 << 16, MAX_FINITE_KEY]  # past the sample's top
    assert _bracket(hist, none, 100_000, 0.00001) == [0, (100 << 16) | 0xFFFF]  # below its bottom
