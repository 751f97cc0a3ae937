"""Oracle test for the next mergekit methods (issue 17): model_stock, nuslerp and slerp give mergekit 0.1.5's
tensors. Runs only with ``DISTMERGE_MERGEKIT_PYTHON`` (see tests/test_mergekit_oracle.py, whose helpers and tiny
family it shares).

Each case is a mergekit YAML, run by the real ``mergekit-yaml``, and the same merge in distmerge's own dialect;
where the mergekit dialect knows the method, distmerge also runs the mergekit YAML itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distmerge.config.mergekit import read_mergekit
from test_mergekit_oracle import _UNAVAILABLE, _model, _tensors, family, run_mergekit  # noqa: F401 (fixture)

pytestmark = [pytest.mark.ray, pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))]


def _native(method: str, models: list[tuple[str, dict]], base: str | None = None, **parameters) -> dict:
    config = {"method": method, "parameters": parameters, "dtype": "float32", "out_shard_size": "40KB",
              "models": [{"model": path, "name": f"m{i}", **({"parameters": params} if params else {})}
                         for i, (path, params) in enumerate(models)]}
    if base is not None:
        config["base_model"] = base
    return config


def _cases(family: dict[str, str], case: str) -> tuple[dict, dict]:
    """(mergekit YAML, the same merge in distmerge's dialect)."""
    base, e0, e1 = family["base"], family["expert_0"], family["expert_1"]
    cases = {
        "model_stock": ({"merge_method": "model_stock", "base_model": base, "models": [_model(e0), _model(e1)]},
                        _native("model_stock", [(e0, {}), (e1, {})], base)),
        "model_stock_filter_wise": (
            {"merge_method": "model_stock", "base_model": base, "models": [_model(e0), _model(e1)],
             "parameters": {"filter_wise": True}},
            _native("model_stock", [(e0, {}), (e1, {})], base, filter_wise=True)),
        "nuslerp": ({"merge_method": "nuslerp", "models": [_model(e0, weight=0.3), _model(e1, weight=0.7)]},
                    _native("nuslerp", [(e0, {"weight": 0.3}), (e1, {"weight": 0.7})])),
        "nuslerp_base": ({"merge_method": "nuslerp", "base_model": base,
                          "models": [_model(e0, weight=1.0), _model(e1, weight=0.5)]},
                         _native("nuslerp", [(e0, {"weight": 1.0}), (e1, {"weight": 0.5})], base, use_base=True)),
        "nuslerp_row_wise": ({"merge_method": "nuslerp", "models": [_model(e0, weight=0.6), _model(e1, weight=0.4)],
                              "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
                             _native("nuslerp", [(e0, {"weight": 0.6}), (e1, {"weight": 0.4})],
                                     nuslerp_flatten=False, nuslerp_row_wise=True)),
        "slerp": ({"merge_method": "slerp", "base_model": e0, "models": [_model(e0), _model(e1)],
                   "parameters": {"t": 0.3}},
                  _native("slerp", [(e0, {}), (e1, {})], t=0.3)),
        "slerp_gradient": ({"merge_method": "slerp", "base_model": e0, "models": [_model(e0), _model(e1)],
                            "parameters": {"t": [0.0, 0.5, 1.0]}},
                           _native("slerp", [(e0, {}), (e1, {})], t=[0.0, 0.5, 1.0])),
    }
    mergekit, native = cases[case]
    mergekit["dtype"] = "float32"
    return mergekit, native


CASES = ["model_stock", "model_stock_filter_wise", "nuslerp", "nuslerp_base", "nuslerp_row_wise", "slerp",
         "slerp_gradient"]


def _dialect_knows(mergekit: dict) -> bool:
    try:
        read_mergekit(mergekit)
    except Exception as exc:  # noqa: BLE001 - only "not supported" means the rows are not there yet
        if "not supported" in str(exc):
            return False
        raise
    return True


@pytest.fixture(scope="module")
def mergekit_outputs(family, tmp_path_factory) -> Path:  # noqa: F811 (the shared fixture)
    return run_mergekit({case: _cases(family, case)[0] for case in CASES}, tmp_path_factory.mktemp("mergekit_next"))


@pytest.mark.parametrize("case", CASES)
def test_matches_mergekit(case, family, mergekit_outputs, tmp_path, ray_cluster):  # noqa: F811
    from distmerge import merge

    mergekit, native = _cases(family, case)
    mergekit_path = mergekit_outputs / f"{case}.yaml"
    expected = _tensors(mergekit_outputs / case)
    runs = {"native": native}
    if _dialect_knows(mergekit):
        runs["mergekit dialect"] = str(mergekit_path)
    base = _tensors(Path(family["base"]))
    for label, config in runs.items():
        merge(config, str(tmp_path / label), workers=1, force=True, progress=False)
        actual = _tensors(tmp_path / label)
        assert sorted(actual) == sorted(expected), label
        mismatched = [f"{name}: max|diff|={(actual[name].double() - want.double()).abs().max().item():.3g}"
                      for name, want in expected.items()
                      if actual[name].dtype != want.dtype or
                      not torch.allclose(actual[name].float(), want.float(), rtol=1e-5, atol=1e-6)]
        assert not mismatched, f"{label}: {len(mismatched)}/{len(expected)} tensors differ from mergekit:\n" + \
            "\n".join(mismatched)
    moved = sum(int(not torch.equal(want, base[name])) for name, want in expected.items())
    assert moved > len(expected) // 2, "the merge left most tensors at the base: the comparison would be vacuous"
