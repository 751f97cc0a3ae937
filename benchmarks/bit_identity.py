"""Bit-identity guard: every method's output on a tiny model, 1 and 2 workers, written by one checkout and
compared byte for byte with another's.

    PYTHONPATH=/tmp/ref python benchmarks/bit_identity.py write /tmp/out-ref   # the code before a change
    python benchmarks/bit_identity.py write /tmp/out-new
    python benchmarks/bit_identity.py compare /tmp/out-ref /tmp/out-new

A refactor of the method layer must leave every file it writes identical: weights, artifacts (EMR), and the
TIES deferred zero-sign patches, which only a model-wide vote decides.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(os.environ.get("DISTMERGE_BIT_FAMILY", "/tmp/distmerge-bit-family"))

TIES_VARIANTS = {
    "ties_global_paper": {},
    "ties_global_mergekit": {"convention": "mergekit"},
    "ties_global_sum": {"disjoint": "sum", "density": 0.4},
    "ties_tensor_paper": {"trim_scope": "tensor"},
    "ties_tensor_mergekit": {"trim_scope": "tensor", "convention": "mergekit"},
    "ties_tensor_l1": {"trim_scope": "tensor", "convention": "mergekit", "trim_rescale": "l1"},
}

SPARSIFY_VARIANTS = {  # name (method, then "-variant") -> parameters
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs-mergekit": {"density": 0.8, "gamma": 0.05, "convention": "mergekit"},
    "breadcrumbs-l1": {"density": 0.7, "gamma": 0.1, "rescale": "l1"},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "della": {"density": 0.6, "epsilon": 0.2, "seed": 3},
    "della-l1": {"density": 0.6, "epsilon": 0.2, "rescale": "l1", "seed": 3},
    "della-none": {"density": 0.5, "epsilon": 0.1, "rescale": "none", "lambda": 0.8},
    "della_linear": {"density": 0.6, "epsilon": 0.1, "seed": 4},
}


def cases(base: str, experts: list[str]) -> dict[str, dict]:
    """name -> config dict (either dialect)."""
    models = [{"model": e} for e in experts]
    graded = [{"model": e, "parameters": {"weight": [0.2, 1.0 + i], "density": [0.3, 0.6], "drop_rate": 0.3 + 0.1 * i}}
              for i, e in enumerate(experts)]
    out: dict[str, dict] = {
        "weight_average": {"method": "weight_average", "models": [{"model": e, "weight": 1 + i} for i, e in enumerate(experts)]},
        "weight_average_base": {"method": "weight_average", "base_model": base, "models": models},
        "task_arithmetic": {"method": "task_arithmetic", "base_model": base, "models": models, "parameters": {"lambda": 0.7}},
        "task_arithmetic_norm": {"method": "task_arithmetic", "base_model": base, "parameters": {"normalize": True},
                                 "models": [{"model": e, "weight": [0.5, 2.0]} for e in experts]},
        "emr": {"method": "emr", "base_model": base, "models": models},
    }
    for name, params in TIES_VARIANTS.items():
        out[name] = {"method": "ties", "base_model": base, "models": models, "parameters": params}
    out["ties_global_permodel"] = {"method": "ties", "base_model": base, "parameters": {"density": 0.5},
                                   "models": [{"model": e, "density": 0.2 + 0.2 * i} for i, e in enumerate(experts)]}
    out["ties_tensor_graded"] = {"method": "ties", "base_model": base, "models": graded[:],
                                 "parameters": {"trim_scope": "tensor"}}
    for i, g in enumerate(out["ties_tensor_graded"]["models"]):
        out["ties_tensor_graded"]["models"][i] = {"model": g["model"], "parameters": {k: v for k, v in g["parameters"].items() if k != "drop_rate"}}
    for then in ("task_arithmetic", "weight_average", "ties"):
        for rescale in ("inverse", "l1", "none"):
            params = {"then": then, "rescale": rescale, "drop_rate": 0.5, "seed": 3}
            out[f"dare_{then}_{rescale}"] = {"method": "dare", "base_model": base, "models": models, "parameters": params}
    out["dare_ties_tensor"] = {"method": "dare", "base_model": base, "models": models,
                               "parameters": {"then": "ties", "trim_scope": "tensor", "density": 0.5}}
    out["dare_graded"] = {"method": "dare", "base_model": base, "models": graded, "parameters": {"then": "ties", "trim_scope": "tensor"}}
    for name, params in SPARSIFY_VARIANTS.items():  # the sort-free cuts (issue 18) must stay the sorts' results
        method = name.split("-")[0]
        out[name] = {"method": method, "base_model": base, "models": models, "parameters": params}
    mk_models = [{"model": base}] + [{"model": e, "parameters": {"weight": 0.5 + i, "density": [0.4, 0.8]}} for i, e in enumerate(experts)]
    for mk in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear"):
        models_mk = mk_models if mk != "linear" else [{"model": e, "parameters": {"weight": 1 + i}} for i, e in enumerate(experts)]
        if mk in ("linear", "task_arithmetic"):
            models_mk = [{"model": m["model"], "parameters": {"weight": m.get("parameters", {}).get("weight", 1.0)}} for m in models_mk]
        parameters = {"normalize": True} if mk != "linear" else {}
        if mk.startswith(("breadcrumbs", "della")):  # mergekit's own cut and ranks, with their defaults moved
            parameters.update({"gamma": 0.05} if mk.startswith("breadcrumbs") else {"epsilon": 0.1})
        out[f"mergekit_{mk}"] = {"merge_method": mk, "base_model": base, "models": models_mk,
                                 "parameters": parameters, "dtype": "float32"}
    return out


def write(target: Path, only: list[str]) -> None:
    import ray

    from distmerge.engine.driver import merge
    from distmerge.tiny_models import build_family

    if not (ROOT / "base").exists():
        build_family(ROOT, "llama", experts=3, layers=3, hidden=32, seed=5)
    base = str(ROOT / "base")
    experts = [str(ROOT / f"expert_{i}") for i in range(3)]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             object_store_memory=200 * 1024**2)
    try:
        for workers in (1, 2):  # one worker count after the other: consecutive merges reuse warm workers
            for name, config in cases(base, experts).items():
                if only and name not in only:
                    continue
                out = target / f"{name}-w{workers}"
                try:
                    merge(config, out, workers=workers, force=True, progress=False, resume=False)
                except Exception as exc:  # recorded: an error must stay the same error
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "ERROR").write_text(f"{type(exc).__name__}: {exc}\n")
                print(name, workers, flush=True)
    finally:
        ray.shutdown()


def tensors_of(folder: Path) -> dict[str, "object"]:
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            found[f"{path.relative_to(folder)}::{key}"] = value
    return found


def compare(ref: Path, new: Path) -> int:
    import torch

    bad = 0
    cases_found = sorted(p.name for p in ref.iterdir() if not p.name.startswith("."))
    if not cases_found:
        print(f"no cases in {ref}")
        return 1
    for case in cases_found:
        a, b = ref / case, new / case
        if not b.exists():
            print(f"MISSING {case}")
            bad += 1
            continue
        if (a / "ERROR").exists() or (b / "ERROR").exists():
            same = (a / "ERROR").exists() and (b / "ERROR").exists() and (a / "ERROR").read_text() == (b / "ERROR").read_text()
            print(f"{'same error' if same else 'ERROR DIFFERS'} {case}")
            bad += not same
            continue
        ta, tb = tensors_of(a), tensors_of(b)
        diff = [k for k in ta if k not in tb or ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
        diff += [k for k in tb if k not in ta]
        if diff:
            print(f"DIFFERENT {case}: {len(diff)} tensors, e.g. {diff[0]}")
            bad += 1
    print(f"{bad} case(s) differ" if bad else "all cases bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
