"""Oracle test: distmerge on mergekit YAML gives the tensors the real mergekit gives.

Runs only when ``DISTMERGE_MERGEKIT_PYTHON`` names a Python interpreter that has mergekit installed (its own
venv: mergekit pins its own transformers/torch, so it is never installed into distmerge's venv). Create one
with ``export DISTMERGE_MERGEKIT_PYTHON=$(bash benchmarks/mergekit_env.sh /tmp/mkvenv)``.

Each case writes one mergekit YAML, merges it with the real mergekit (every case in one subprocess, CPU) and
with ``distmerge.merge``, then compares every output tensor. Only deterministic settings are covered: DARE runs
at density 1, where mergekit's random drop is a no-op.
"""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

MERGEKIT_PYTHON = os.environ.get("DISTMERGE_MERGEKIT_PYTHON", "")


def _mergekit_available(python: str) -> str | None:
    """None if ``python`` can import mergekit, else the reason it cannot."""
    if not python:
        return "DISTMERGE_MERGEKIT_PYTHON is not set (see benchmarks/mergekit_env.sh)"
    if not os.path.isfile(python):
        return f"DISTMERGE_MERGEKIT_PYTHON={python!r} is not a file"
    try:
        probe = subprocess.run([python, "-c", "import mergekit.scripts.run_yaml"], capture_output=True, text=True,
                               timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    if probe.returncode != 0:
        return f"{python} cannot import mergekit: {probe.stderr.strip().splitlines()[-1:]}"
    return None


_UNAVAILABLE = _mergekit_available(MERGEKIT_PYTHON)
pytestmark = [pytest.mark.ray, pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))]


# --- the cases ----------------------------------------------------------------------------------------------

def _model(path: str, **params) -> dict:
    return {"model": path, "parameters": params} if params else {"model": path}


def _config(family: dict[str, str], case: str) -> dict:
    base, e0, e1 = family["base"], family["expert_0"], family["expert_1"]
    ties_models = [_model(e0, weight=1.0, density=0.4), _model(e1, weight=0.5, density=0.7)]
    cases = {
        "linear": {"merge_method": "linear", "models": [_model(e0, weight=0.3), _model(e1, weight=0.7)]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base,
                            "models": [_model(e0, weight=0.5), _model(e1, weight=1.0)],
                            "parameters": {"lambda": 0.8}},
        "ties": {"merge_method": "ties", "base_model": base, "models": ties_models},
        "ties_normalize_false": {"merge_method": "ties", "base_model": base, "models": ties_models,
                                 "parameters": {"normalize": False}},
        "dare_linear_density1": {"merge_method": "dare_linear", "base_model": base,
                                 "models": [_model(e0, weight=0.5, density=1.0), _model(e1, weight=1.0, density=1.0)]},
        "dare_ties_density1": {"merge_method": "dare_ties", "base_model": base,
                               "models": [_model(e0, weight=1.0, density=1.0), _model(e1, weight=0.5, density=1.0)]},
        "ties_bf16": {"merge_method": "ties", "base_model": base, "models": ties_models},
        "ties_rescale": {"merge_method": "ties", "base_model": base, "models": ties_models,
                         "parameters": {"rescale": True}},
        # breadcrumbs: 0.1 + 0.6 <= 1 cuts as the paper; 0.5 + 0.6 > 1 shrinks the outlier cut (0.1.5's clamp)
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base,
                        "models": [_model(e0, weight=1.0, density=0.6, gamma=0.1), _model(e1, weight=0.5, density=0.5)],
                        "parameters": {"gamma": 0.6, "lambda": 0.9}},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base,
                             "models": [_model(e0, weight=1.0, density=0.7), _model(e1, weight=0.6, density=0.4)],
                             "parameters": {"gamma": 0.05, "normalize": True}},
        # DELLA draws at random except at density 1 (keep all): the consensus, normalize and rescale path
        "della_density1": {"merge_method": "della", "base_model": base,
                           "models": [_model(e0, weight=1.0, density=1.0), _model(e1, weight=0.5, density=1.0)],
                           "parameters": {"epsilon": 0.1, "lambda": 1.1}},
        "della_linear_density1": {"merge_method": "della_linear", "base_model": base,
                                  "models": [_model(e0, weight=1.0, density=1.0), _model(e1, weight=0.5, density=1.0)],
                                  "parameters": {"epsilon": 0.1, "lambda": 0.9}},
        "ties_min_keep": {"merge_method": "ties", "base_model": base,
                          "models": [_model(e0, weight=1.0, density=0.02), _model(e1, weight=0.5, density=0.02)]},
    }
    config = cases[case]
    config["dtype"] = "bfloat16" if case.endswith("_bf16") else "float32"
    return config


KNOWN_GAPS: dict[str, str] = {}
CASES = ["linear", "task_arithmetic", "ties", "ties_normalize_false", "dare_linear_density1", "dare_ties_density1",
         "ties_rescale", "ties_min_keep", "ties_bf16", "breadcrumbs", "breadcrumbs_ties", "della_density1",
         "della_linear_density1", *KNOWN_GAPS]


# --- helpers ------------------------------------------------------------------------------------------------

# Every case's merge in one mergekit process: its imports (torch, transformers, mergekit: 10-20 s on 2 cores) cost
# more than these tiny merges.
RUN_ALL = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config_path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    text = open(config_path).read()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out, MergeOptions(quiet=True),
              config_source=text)
"""


def run_mergekit(configs: dict[str, dict], root: Path) -> Path:
    """Merge each ``{case: mergekit config}`` with the real mergekit into ``root/case`` (``root/case.yaml`` kept)."""
    arguments = []
    for case, config in configs.items():
        path = root / f"{case}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        arguments += [str(path), str(root / case)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    # The venv's python may be a symlink to the system one: keep the venv path (no resolve()).
    result = subprocess.run([MERGEKIT_PYTHON, "-c", RUN_ALL, *arguments], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, f"mergekit failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return root


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(glob.glob(str(folder / "*.safetensors")))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, "pt") as shard:
            for key in shard.keys():
                assert key not in out, f"{key} appears in two shards of {folder}"
                out[key] = shard.get_tensor(key)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    """A tiny float32 Llama base and two experts, shared by every case."""
    from distmerge.tiny_models import build_family

    base, experts = build_family(tmp_path_factory.mktemp("mergekit_oracle"), "llama", experts=2)
    return {"base": str(base), **{p.name: str(p) for p in experts}}


@pytest.fixture(scope="module")
def family_bf16(tmp_path_factory) -> dict[str, str]:
    """The same in bfloat16: many tied magnitudes at the trim cut."""
    from distmerge.tiny_models import build_family

    base, experts = build_family(tmp_path_factory.mktemp("mergekit_oracle_bf16"), "llama", experts=2,
                                 dtype=torch.bfloat16)
    return {"base": str(base), **{p.name: str(p) for p in experts}}


@pytest.fixture(scope="module")
def mergekit_outputs(family, family_bf16, tmp_path_factory) -> Path:
    configs = {case: _config(family_bf16 if case.endswith("_bf16") else family, case) for case in CASES}
    return run_mergekit(configs, tmp_path_factory.mktemp("mergekit_runs"))


# --- the test -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[c])) if c in KNOWN_GAPS else c
             for c in CASES]
)
def test_matches_mergekit(case, request, mergekit_outputs, tmp_path, ray_cluster):
    from distmerge import merge

    family = request.getfixturevalue("family_bf16" if case.endswith("_bf16") else "family")
    # bf16 arithmetic may round the last bit differently; a wrong trim or sign moves values by a whole delta.
    rtol, atol = (8e-3, 1e-3) if case.endswith("_bf16") else (1e-5, 1e-6)

    merge(str(mergekit_outputs / f"{case}.yaml"), str(tmp_path / "distmerge"), workers=2, force=True, progress=False)

    expected, actual = _tensors(mergekit_outputs / case), _tensors(tmp_path / "distmerge")
    assert sorted(actual) == sorted(expected)
    base = _tensors(Path(family["base"]))
    mismatched, moved = [], 0
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
        if not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
            mismatched.append(f"{name}: max|diff|={(got.double() - want.double()).abs().max().item():.3g}")
        moved += int(not torch.equal(want, base[name]))
    assert not mismatched, f"{len(mismatched)}/{len(expected)} tensors differ from mergekit:\n" + "\n".join(mismatched)
    assert moved > len(expected) // 2, "the merge left most tensors at the base: the comparison would be vacuous"
