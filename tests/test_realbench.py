"""benchmarks/realbench: the data splits (disjoint, deterministic, from the text alone) and the normalized
scores. Nothing here trains or loads a model; the sources that need a package are skipped without it."""

import importlib.util

import pytest

from benchmarks.realbench import data, report


def test_split_is_a_partition_by_text_alone():
    texts = [f"text number {i}" for i in range(3000)]
    splits = [data.split_of(t) for t in texts]
    assert splits == [data.split_of(t) for t in texts]
    assert set(splits) == set(data.SPLITS)
    share = {s: splits.count(s) / len(texts) for s in data.SPLITS}
    assert 0.12 < share["validation"] < 0.18 and 0.22 < share["test"] < 0.28


def test_unambiguous_drops_texts_under_two_labels_and_duplicates():
    pairs = [("good", "positive"), ("good", "positive"), ("bad", "negative"), ("fine", "positive"),
             ("fine", "negative")]
    examples = data.unambiguous(pairs, ("negative", "positive"))
    assert sorted((e.text, e.label) for e in examples) == [("bad", 0), ("good", 1)]


def _installed(task: str) -> bool:
    needs = {"sentiment": "vaderSentiment", "entity": "pycountry"}.get(task)
    if needs:
        return importlib.util.find_spec(needs) is not None
    if task == "language":
        return any((data.LOCALE_ROOT / "de" / "LC_MESSAGES" / f"{d}.mo").is_file() for d in data.DOMAINS)
    return True  # topic: this interpreter's standard library


@pytest.mark.parametrize("task", data.TASKS)
def test_task_splits_are_disjoint_deterministic_and_capped(task):
    if not _installed(task):
        pytest.skip(f"the {task} source is not installed (benchmarks/realbench/requirements.txt)")
    first, again = data.task_splits(task), data.task_splits(task)
    assert first == again
    texts = {split: {e.text for e in first[split]} for split in data.SPLITS}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert len(first["validation"]) <= data.VALIDATION_PER_TASK and len(first["test"]) <= data.TEST_PER_TASK
    assert min(len(v) for v in first.values()) > 100
    for split, examples in first.items():
        assert all(data.split_of(e.text) == split for e in examples)
        assert {e.label for e in examples} == set(range(len(data.LABELS[task])))


def test_score_record_normalizes_by_each_experts_own_accuracy():
    record = report.score_record({"a": 0.45, "b": 0.8}, {"a": 0.9, "b": 0.8})
    assert record["normalized"] == {"a": 0.5, "b": 1.0}
    assert record["mean_normalized"] == pytest.approx(0.75)
    assert record["mean_accuracy"] == pytest.approx(0.625)
