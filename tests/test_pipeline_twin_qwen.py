"""pipelines/twin_qwen.py --preset tiny end to end: a tiny Qwen2, three peft LoRA experts trained here, the twin
build on the session's Ray, every task scored as expert, shared expert, oracle-routed and routed twin; and, without
Ray, that --lora-variant reaches the twin config (a second end-to-end run with exclusive.lora: factors doubled the
test's time; the variant itself is tested in test_twin_factors)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_pipeline():
    spec = importlib.util.spec_from_file_location("twin_qwen", ROOT / "pipelines" / "twin_qwen.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    return pipeline


def test_lora_variant_reaches_the_twin_config():
    pipeline = load_pipeline()
    for flags, variant in (([], "product"), (["--lora-variant", "factors"], "factors")):
        args = pipeline.parse_args(["--preset", "tiny", *flags])
        config = pipeline.twin_config(args, "/m/base", {"a": "/m/lora_a"}, {"a": "/d/a.jsonl"})
        assert config["exclusive"] == {"rank": 8, "svd": "auto", "lora": variant}
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--preset", "tiny", "--lora-variant", "dense"])


def test_tiny_preset_texts_are_disjoint_across_lora_training_router_and_eval():
    """The count task has 64 possible texts: splits drawn on their own shared half of the eval texts with the
    experts' training texts, and the router's held-out cut repeated its training samples."""
    pipeline = load_pipeline()
    for i, task in enumerate(pipeline.TINY_TASKS):
        splits = pipeline.tiny_splits(task, 10 + i)
        assert {name: len(texts) for name, texts in splits.items()} == pipeline.TINY_SPLITS, task
        every = [text for texts in splits.values() for text in texts]
        assert len(set(every)) == len(every), task  # no text twice, within a split or across splits
        assert splits == pipeline.tiny_splits(task, 10 + i)  # seeded: the run folder's data is reproducible


def check_scores(pipeline, results: dict) -> list[str]:
    """The tasks whose expert learned its skill, after the checks every variant passes."""
    assert results["router"]["holdout_accuracy"] >= 0.8  # narrow task pools: the tasks are separable
    scores = results["scores"]
    assert sorted(scores) == sorted(pipeline.TINY_TASKS)
    for task, row in scores.items():
        assert {"expert", "shared", "twin_oracle", "twin_routed"} <= set(row), task
    learned = [t for t, row in scores.items() if row["expert"] < 0.9 * row["shared"]]
    assert learned, "no tiny expert learned its task"
    for task in learned:  # where the expert has a skill, routing recovers most of it over theta* alone
        row = scores[task]
        assert row["twin_routed"] < row["shared"] - 0.5 * (row["shared"] - row["expert"]), task
    # the evaluator's actors load the twin folder routed, as the in-process model does
    first = pipeline.TINY_TASKS[0]
    assert scores[first]["twin_routed_by_the_evaluator"] == pytest.approx(scores[first]["twin_routed"], rel=1e-4)
    return learned


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_twin_qwen_tiny_preset_runs_end_to_end(tmp_path, ray_cluster, capsys):
    pipeline = load_pipeline()
    out = tmp_path / "run"
    assert pipeline.main(["--preset", "tiny", "--out", str(out), "--quiet", "--workers", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("twin_qwen: 3 LoRA experts, router held-out accuracy")

    results = json.loads((out / "results.json").read_text())
    check_scores(pipeline, results)
    for task, row in results["scores"].items():
        # theta* + E_task (rank 8 of a rank-8 LoRA's product delta) sits between the shared expert and the expert
        assert abs(row["twin_oracle"] - row["expert"]) <= abs(row["shared"] - row["expert"]) + 1e-6, task
    manifest = json.loads((out / "twin" / "twin.json").read_text())
    assert manifest["exclusive"]["rank"] == 8 and manifest["exclusive"]["lora"] == "product"
    assert all((out / "oracle" / task / "config.json").is_file() for task in pipeline.TINY_TASKS)

