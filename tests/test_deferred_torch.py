"""A merge's driver never imports torch (``distmerge.deferred``): it plans and ships work, the workers compute.

Importing torch is 1.4 s of a small merge against a running cluster; these tests fail when a module on the
driver's path touches torch at import or while planning a task-arithmetic merge.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import merge_config

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (where torch is not imported yet); it prints one JSON line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cli_and_a_planned_merge_leave_torch_unimported(llama_family, tmp_path):
    base, experts = llama_family
    config = merge_config(base, experts, "task_arithmetic", **{"lambda": 0.5})
    config["out_dtype"] = "bfloat16"
    result = run_fresh(f"""
        import json, pickle, sys
        import distmerge.cli
        from distmerge import dtypes
        from distmerge.config import load_config
        from distmerge.engine.resume import run_key
        from distmerge.engine.worker import WorkerSpec
        from distmerge.io.checkpoint import Checkpoint
        from distmerge.io.lora import open_checkpoint
        from distmerge.plan import make_plan
        from distmerge.tensors import resolve_tensors

        config = load_config({config!r})
        method = config.build_method()
        base = Checkpoint(config.base_model, "base")
        experts = [open_checkpoint(spec.model, spec.name) for spec in config.models]
        outputs, _, _ = resolve_tensors(config, base, experts)
        state = method.initial_state([o.job for o in outputs if o.merged])
        plan = make_plan(outputs, config.out_shard_size, 2, 3)
        key = run_key(config.to_yaml_dict(), [base, *experts], plan)
        spec = WorkerSpec(base=base, experts=experts, method=method, plan=plan, staging="/nonexistent",
                          dtype=config.dtype, device="cpu", num_threads=1, worker_index=0, faults={{}})
        shipped = len(pickle.dumps(spec))
        print(json.dumps({{"torch": "torch" in sys.modules, "outputs": len(outputs), "shipped": shipped,
                          "dtypes": sorted({{o.out_dtype for o in outputs}}), "key": key}}))
    """)
    assert result["torch"] is False
    assert result["outputs"] > 0 and result["shipped"] > 0
    assert result["dtypes"] == ["bfloat16"]


@pytest.mark.ray
def test_a_whole_task_arithmetic_merge_leaves_the_driver_without_torch(llama_family, tmp_path):
    base, experts = llama_family
    config = merge_config(base, experts, "task_arithmetic", **{"lambda": 0.5})
    out = tmp_path / "merged"
    result = run_fresh(f"""
        import json, sys
        import ray
        from distmerge.engine.driver import merge

        ray.init(num_cpus=1, include_dashboard=False)
        merged = merge({config!r}, {str(out)!r}, workers=1, progress=False)
        print(json.dumps({{"torch": "torch" in sys.modules, "shards": merged.shards}}))
    """)
    assert result["torch"] is False and result["shards"] > 0
    assert (out / "model.safetensors.index.json").exists()


def test_deferred_torch_imports_on_first_attribute_and_then_reads_like_the_module():
    result = run_fresh("""
        import copy, json, sys
        from distmerge.deferred import DeferredModule, is_tensor

        stand_in = DeferredModule("torch")
        before = "torch" in sys.modules
        copy.copy([stand_in])  # dunder probes do not import it
        probed = "torch" in sys.modules
        not_a_tensor = is_tensor(1.0)
        import pickle
        from ray import cloudpickle
        import distmerge.deferred

        def uses_torch():  # shipped by value, as Ray ships a closure: it names the stand-in
            return distmerge.deferred.torch.float16

        shipped = cloudpickle.dumps([stand_in, uses_torch])
        pickled_without_import = "torch" not in sys.modules
        dtype = stand_in.bfloat16
        import torch
        print(json.dumps({"before": before, "probed": probed, "after": "torch" in sys.modules,
                          "same": dtype is torch.bfloat16 and stand_in.Tensor is torch.Tensor,
                          "copied": "zeros" in vars(stand_in), "is_tensor": is_tensor(torch.zeros(1)),
                          "not_a_tensor": not_a_tensor, "late": stand_in.distributed is torch.distributed,
                          "pickled_without_import": pickled_without_import,
                          "unpickled": [pickle.loads(shipped)[0] is torch, pickle.loads(shipped)[1]() is torch.float16]}))
    """)
    assert result == {"before": False, "probed": False, "after": True, "same": True, "copied": True,
                      "is_tensor": True, "not_a_tensor": False, "late": True, "pickled_without_import": True,
                      "unpickled": [True, True]}


def test_package_exports_import_their_module_on_first_read():
    result = run_fresh("""
        import json, sys
        from distmerge import fda

        lazy = "distmerge.fda.construction" not in sys.modules
        import distmerge.fda.adaptation  # a submodule imported first must not shadow the function
        construct = fda.construct
        print(json.dumps({"lazy": lazy, "callable": callable(construct) and callable(fda.adapt),
                          "name": construct.__module__}))
    """)
    assert result == {"lazy": True, "callable": True, "name": "distmerge.fda.construction"}


def test_auto_device_follows_the_clusters_gpus_not_the_drivers():
    from distmerge.engine.driver import resolve_device

    assert resolve_device("auto", 0.0) == "cpu" and resolve_device("auto", 2.0) == "cuda"
    assert resolve_device("cuda:1", 0.0) == "cuda:1" and resolve_device("cpu", 4.0) == "cpu"
