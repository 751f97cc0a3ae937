"""Twin-Merging sweeps: one twin build per shared lambda, ranks read from it, trials on Ray Tune scored as any
sweep's, the best trial's twin folder materialized at its rank; bad twin sweep files refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distmerge.errors import ConfigError
from test_twin import task_texts, twin_config

LAMBDAS = [0.3, 1.0]
RANKS = [2, 6]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from distmerge.tiny_models import build_family

    root = tmp_path_factory.mktemp("twin_sweep")
    base, experts = build_family(root, "llama", experts=2, layers=2, delta_scale=0.2)
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in task_texts(0, 12, seed=7) + task_texts(1, 12,
                                                                                                        seed=7)))
    return root, base, experts, data


def twin_sweep(root, base, experts, data, **sweep) -> dict:
    config = twin_config(root, base, [(f"t{i}", {"model": str(p)}) for i, p in enumerate(experts)],
                         {"rank": {"grid": RANKS}, "svd": "exact"},
                         {"epochs": 5, "batch_size": 32, "holdout": 0.0, "max_samples": 16})
    config["shared"] = {"method": "task_arithmetic", "parameters": {"lambda": {"grid": LAMBDAS}}}
    config["sweep"] = {"tasks": [{"name": "val", "type": "perplexity", "data": str(data), "batch_size": 16}],
                       "max_concurrent_trials": 2, "build_workers": 1, **sweep}
    return config


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_twin_sweep_picks_the_best_lambda_and_rank_and_truncation_equals_a_build_at_that_rank(ray_cluster, family,
                                                                                             tmp_path):
    import yaml

    from distmerge.io.lora import open_checkpoint
    from distmerge.sweep import load_sweep, run_sweep
    from distmerge.sweep.objectives import evaluate_in_parts
    from distmerge.twin import load
    from distmerge.twin.builder import compress_calls
    from distmerge.twin.compress import compress_group
    from distmerge.twin.config import load_twin_config
    from distmerge.twin.folder import ExclusiveStore, read_manifest
    from distmerge.twin.routed import truncate
    from distmerge.evaluate.models import ModelSource, load_tokenizer

    root, base, experts, data = family
    config = twin_sweep(root, base, experts, data)
    out = tmp_path / "sweep"
    result = run_sweep(config, out, progress=False, materialize_best=True)
    spec = load_sweep(config)
    assert spec.param_names == ("lambda", "rank")

    builds = json.loads((out / "builds" / "builds.json").read_text())
    assert [b["values"]["lambda"] for b in builds] == LAMBDAS and {b["rank"] for b in builds} == {max(RANKS)}
    rows = {(r["lambda"], r["rank"]): r for r in result.rows}
    assert sorted(rows) == [(lam, r) for lam in LAMBDAS for r in RANKS]
    assert all(r["status"] == "finished" for r in rows.values())

    # Each trial's score is its build's routed model at its rank, scored by the sweep's objective by hand.
    by_hand = {}
    for build in builds:
        folder = out / build["folder"]
        tokenizer = load_tokenizer(ModelSource(path=str(folder)), "right")
        for rank in RANKS:
            model = load(folder, rank=rank, dtype=torch.float32)
            *_, last = evaluate_in_parts(lambda kind, task: model, tokenizer, spec.tasks, spec.eval_chunks)
            by_hand[(build["values"]["lambda"], rank)] = last["val/nll"]
    for key, score in by_hand.items():
        assert rows[key]["val/nll"] == pytest.approx(score, rel=1e-6), key
    assert len({round(v, 6) for v in by_hand.values()}) == len(by_hand)  # the objective separates the trials
    best = min(by_hand, key=by_hand.get)
    assert (result.best["lambda"], result.best["rank"]) == best

    # best.yaml is the twin.yaml of that trial; best_model is its build at its rank.
    best_yaml = load_twin_config(yaml.safe_load((out / "best.yaml").read_text()))
    assert best_yaml.merge.parameters["lambda"] == best[0] and best_yaml.exclusive.rank == best[1]
    assert read_manifest(result.best_model)["exclusive"]["rank"] == best[1]
    best_build = out / builds[LAMBDAS.index(best[0])]["folder"]
    stored, materialized = ExclusiveStore(best_build), ExclusiveStore(result.best_model)
    for task in ("t0", "t1"):
        for tensor in stored.tensors(task):
            assert torch.equal(materialized.part(task, tensor).dense(), truncate(stored.part(task, tensor),
                                                                                best[1]).dense())

    # Truncating the rank-6 build to rank 2 is the rank-2 build, for every 2-D tensor (exact SVD).
    small = load_twin_config(spec.trial_dict({"lambda": LAMBDAS[0], "rank": RANKS[0]}))
    folder = out / builds[0]["folder"]
    checkpoints = [open_checkpoint(str(p), f"t{i}") for i, p in enumerate(experts)]
    (tmp_path / "rank2").mkdir()
    for call in compress_calls(small, folder, checkpoints):
        compress_group(*call[:-1], str(tmp_path / "rank2"))
    from safetensors.torch import load_file

    again = {}
    for file in (tmp_path / "rank2" / "exclusive").glob("*.safetensors"):
        again.update(load_file(str(file)))
    store, factored = ExclusiveStore(folder), 0
    for key in [k for k in again if k.endswith("::us")]:
        task, tensor, _ = key.split("::")
        part = truncate(store.part(task, tensor), RANKS[0])
        torch.testing.assert_close(part.us, again[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(part.v, again[f"{task}::{tensor}::v"], rtol=0, atol=1e-6)
        factored += 1
    assert factored >= 10


def test_bad_twin_sweep_files_name_the_key(family, tmp_path):
    from distmerge.sweep import load_sweep

    root, base, experts, data = family
    config = twin_sweep(root, base, experts, data)
    config["shared"]["parameters"]["lambda"] = {"uniform": [0.1, 0.9]}
    with pytest.raises(ConfigError, match=r"shared.parameters.lambda: a Twin sweep builds the shared expert once"):
        load_sweep(config)
    config = twin_sweep(root, base, experts, data)
    config["exclusive"]["svd"] = {"grid": ["exact", "randomized"]}
    with pytest.raises(ConfigError, match=r"exclusive.svd: only exclusive.rank can be searched"):
        load_sweep(config)
    config = twin_sweep(root, base, experts, data)
    config["exclusive"]["rank"] = {"grid": [4, 0]}
    with pytest.raises(ConfigError, match=r"exclusive.rank: the search space allows 0, which the twin config "
                                          r"rejects: exclusive.rank"):
        load_sweep(config)
    config = twin_sweep(root, base, experts, data)
    config["exclusive"] = {"rank": 4}
    config["shared"]["parameters"]["lambda"] = 0.3
    with pytest.raises(ConfigError, match=r"nothing to search"):
        load_sweep(config)
    config = twin_sweep(root, base, experts, data)
    config["sweep"]["build_workers"] = 0
    with pytest.raises(ConfigError, match=r"sweep.build_workers"):
        load_sweep(config)
    config = twin_sweep(root, base, experts, data)
    config["sweep"]["tasks"][0]["expert"] = "t0"
    with pytest.raises(ConfigError, match=r"sweep.tasks\[0\].expert: a Twin model routes"):
        load_sweep(config)
    config = twin_sweep(root, base, experts, data)
    config["method"] = "ties"
    with pytest.raises(ConfigError, match=r"method: a Twin sweep's shared merge goes under 'shared:'"):
        load_sweep(config)
    # a valid file: the searched names, and a trial's twin.yaml with both values in place
    spec = load_sweep(twin_sweep(root, base, experts, data))
    trial = spec.trial_dict({"lambda": 1.0, "rank": 2})
    assert trial["shared"] == {"method": "task_arithmetic", "parameters": {"lambda": 1.0}}
    assert trial["exclusive"] == {"rank": 2, "svd": "exact"} and "sweep" not in trial and "method" not in trial


def test_rank_view_loads_the_build_at_that_rank_and_copy_at_rank_writes_it(tmp_path, llama_family):
    """What a Twin trial hands the evaluator's actors (a view of the build with exclusive.load_rank) and what
    --materialize-best writes: both the build's routed model at the trial's rank."""
    from distmerge.sweep.twin import rank_view
    from distmerge.twin import load
    from distmerge.twin.folder import read_manifest
    from distmerge.twin.task import copy_at_rank
    from test_twin import batch_ids, local_twin

    base, experts = llama_family
    folder = local_twin(tmp_path / "build", base, experts, {"rank": 6, "svd": "exact"})
    view = rank_view(folder, 3)
    assert rank_view(folder, 3) == view and rank_view(folder, None) == str(folder)
    assert read_manifest(view)["exclusive"]["load_rank"] == 3 and "load_rank" not in read_manifest(folder)["exclusive"]
    copied = copy_at_rank(folder, 3, tmp_path / "best")
    assert read_manifest(copied)["exclusive"]["rank"] == 3
    ids, weights = batch_ids(2), torch.tensor([[0.3, 0.7], [1.0, 0.0]])
    outputs = []
    for model in (load(folder, rank=3), load(view), load(copied), load(folder)):
        model.twin.fixed = weights
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=0, atol=1e-6)
    assert not torch.allclose(outputs[3], outputs[0], atol=1e-5)  # rank 6 differs: the view really truncates


def test_best_yaml_of_a_randomized_rank_sweep_rebuilds_the_scored_factors(family, tmp_path):
    """The trials read rank r from a build at the largest rank R; with a randomized SVD best.yaml's twin build at
    rank r must draw that build's sketch (width R + oversample), or it stores other directions."""
    import yaml

    from distmerge.sweep import load_sweep
    from distmerge.sweep.outputs import write_best_yaml
    from distmerge.twin.folder import ExclusiveStore
    from distmerge.twin.routed import truncate
    from test_twin import local_twin

    root, base, experts = family[:3]
    randomized = {"svd": "randomized", "oversample": 4}  # 6 + 4 < 16, the smallest side: the sketch path
    config = twin_sweep(*family)
    config["exclusive"] = {"rank": {"grid": RANKS}, **randomized}
    spec = load_sweep(config)
    assert spec.best_dict({"lambda": 0.3, "rank": max(RANKS)})["exclusive"]["oversample"] == 4
    best = spec.best_dict({"lambda": 0.3, "rank": 2})["exclusive"]
    assert best == {"rank": 2, "svd": "randomized", "oversample": 4 + max(RANKS) - 2}
    written = write_best_yaml(spec, {"trial": "t", spec.metric: 1.0, "lambda": 0.3, "rank": 2}, tmp_path)
    text = written.read_text()
    assert "rebuilds the scored factors" in text.split("\n", 3)[2]
    assert yaml.safe_load(text)["exclusive"] == best

    built = ExclusiveStore(local_twin(tmp_path / "R", base, experts, {"rank": max(RANKS), **randomized}))
    rebuilt = ExclusiveStore(local_twin(tmp_path / "r", base, experts, best))
    narrow = ExclusiveStore(local_twin(tmp_path / "n", base, experts, {"rank": 2, **randomized}))
    compared, narrow_gap = 0, 0.0
    for task in ("t0", "t1"):
        for tensor in built.tensors(task):
            scored = truncate(built.part(task, tensor), 2)
            if scored.us is None:
                continue
            again = rebuilt.part(task, tensor)
            torch.testing.assert_close(again.us, scored.us, rtol=0, atol=1e-6)
            torch.testing.assert_close(again.v, scored.v, rtol=0, atol=1e-6)
            narrow_gap = max(narrow_gap, float((narrow.part(task, tensor).dense() - scored.dense()).abs().max()))
            compared += 1
    assert compared >= 10
    assert narrow_gap > 1e-4  # the sweep's own oversampling at rank 2 is another sketch: the test can fail


def test_copy_at_rank_and_rank_views_report_the_rank_they_hold(tmp_path, llama_family):
    """twin_report.json of best_model/ and of a rank view describes rank r, as a build at rank r reports it
    (exact SVD: the same directions), not the rank-R build it was read from; bad ranks are refused by name."""
    from distmerge.errors import InputError
    from distmerge.sweep.twin import rank_view
    from distmerge.twin import load
    from distmerge.twin.folder import REPORT, TWIN_JSON
    from distmerge.twin.task import copy_at_rank
    from test_twin import local_twin

    base, experts = llama_family
    folder = local_twin(tmp_path / "build", base, experts, {"rank": 6, "svd": "exact"})
    direct = json.loads((local_twin(tmp_path / "direct", base, experts, {"rank": 2, "svd": "exact"}) / REPORT)
                        .read_text())
    built = json.loads((folder / REPORT).read_text())
    view = Path(rank_view(folder, 2))
    for report in (copy_at_rank(folder, 2, tmp_path / "best") / REPORT, view / REPORT):
        assert not report.is_symlink()
        report = json.loads(report.read_text())
        assert report["ranks"] == direct["ranks"] and report["read_at_rank"] == 2 and report["build_rank"] == 6
        assert sorted(report["relative_error"]) == sorted(direct["relative_error"])
        for key, error in direct["relative_error"].items():
            assert report["relative_error"][key] == pytest.approx(error, rel=1e-4, abs=1e-6), key
        assert any(report["relative_error"][k] > built["relative_error"][k] + 1e-3 for k in direct["ranks"])
    assert json.loads((folder / REPORT).read_text()) == built  # the build's own report is untouched

    with pytest.raises(InputError, match=r"copy_at_rank: rank: must be a positive integer, got 0"):
        copy_at_rank(folder, 0, tmp_path / "zero")
    assert not (tmp_path / "zero").exists()
    manifest = json.loads((view / TWIN_JSON).read_text())
    for bad in ("3", 0, 2.5):
        manifest["exclusive"]["load_rank"] = bad
        (view / TWIN_JSON).write_text(json.dumps(manifest))
        with pytest.raises(InputError, match=rf"'{view / TWIN_JSON}': exclusive.load_rank: must be a positive integer"):
            load(view)
