"""Answer extraction and metrics, checked on hand-made cases (no Ray, no models); the code sandbox is in
test_sandbox.py."""

from __future__ import annotations

import math

import pytest

from distmerge.errors import InputError
from distmerge.evaluate import answers, metrics
from distmerge.evaluate.tasks import TASKS, Reducer, get_task


# --- GSM8K ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("6 + 1 = 7 eggs.\nThe answer is: 7", 7),
    ("The answer is: 18.\n", 18),
    ("first The answer is: 3 then The answer is: 5", 5),  # the last marker wins
    ("The answer is: $1,234", 1234),
    ("The answer is: 1,234,567", 1234),  # the reference pattern allows one separator: a quirk kept on purpose
    ("The answer is: -12", -12),
    ("The answer is: 2.5", 2),  # Python's round: half to even
    ("The answer is: 3.5", 4),
    ("The answer is: 7/2", 4),  # a fraction, rounded
    ("The answer is: 5/0", 5),  # denominator 0: the numerator
    ("The answer is: none", None),
    ("no marker 42", None),  # WizardMath needs the phrase
    ("The answer is:42", None),  # ... with its space
])
def test_gsm8k_final_number(completion, expected):
    assert answers.extract_final_number(completion) == expected


def test_gsm8k_reference_and_correctness():
    assert answers.gsm8k_reference("Natalia sold 48/2 = 24 clips.\n#### 1,072") == 1072
    with pytest.raises(ValueError, match="####"):
        answers.gsm8k_reference("no final line")
    assert answers.gsm8k_correct("The answer is: 1072", 1072)
    assert not answers.gsm8k_correct("The answer is: 1071", 1072)
    assert not answers.gsm8k_correct("1072", 1072)


# --- MATH -------------------------------------------------------------------------------------------

def test_boxed_answers():
    solution = "So $x = \\frac{1}{2}$ and the area is $\\boxed{\\frac{\\sqrt{3}}{2}}$."
    assert answers.last_boxed_only_string(solution) == "\\boxed{\\frac{\\sqrt{3}}{2}}"
    assert answers.math_reference(solution) == "\\frac{\\sqrt{3}}{2}"
    assert answers.math_reference("\\boxed{1} then \\boxed{2}") == "2"
    assert answers.math_reference("\\fbox{9}") is None  # found, but remove_boxed only strips \boxed{ (reference)
    assert answers.math_reference("\\boxed{unbalanced") is None
    assert answers.math_reference("no box") is None


@pytest.mark.parametrize("a, b, equal", [
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("\\left( 3, 4 \\right)", "(3,4)", True),
    ("90^\\circ", "90", True),
    ("\\$5", "5", True),
    ("50\\%", "50", True),
    ("x = 5", "5", True),  # a short left-hand side is dropped
    ("10 \\text{ cm}", "10", True),
    ("\\sqrt2", "\\sqrt{2}", True),
    (".5", "0.5", True),  # ".5" -> "0.5" -> \frac{1}{2}
    ("3", "4", False),
    ("a \\text{ b} \\text{ c}", "a \\text{ b} \\text{ c}", True),  # two units raise; raw strings compared
    ("a \\text{ b} \\text{ c}", "a", False),
])
def test_math_equivalence(a, b, equal):
    assert answers.is_equiv(a, b) is equal


def test_math_answer_extraction():
    assert answers.extract_math_answer("Thus.\nThe answer is: \\frac{3}{4}.\nDone") == "\\frac{3}{4}"
    assert answers.extract_math_answer("The answer is: 12.") == "12"
    assert answers.extract_math_answer("so we get $\\boxed{12}$") == "12"  # boxed when the phrase is absent
    assert answers.extract_math_answer("nothing") is None
    assert answers.math_correct("The answer is: \\dfrac{1}{2}", "\\frac{1}{2}")
    assert not answers.math_correct("nothing", "1")
    assert answers.is_equiv(None, None) and not answers.is_equiv("1", None)


# --- code extraction --------------------------------------------------------------------------------

def test_code_extraction():
    fenced = "Here you go:\n```python\ndef f(x):\n\treturn x\n```\nThis returns x."
    assert answers.extract_code(fenced) == "def f(x):\n    return x"
    main = 'def f(x):\n    return x\n\nif __name__ == "__main__":\n    print(f(1))'
    assert answers.extract_code(main) == "def f(x):\n    return x"
    usage = "def f(x):\n    return x\n# Example usage\nprint(f(2))"
    assert answers.extract_code(usage) == "def f(x):\n    return x"
    tests = "def f(x):\n    return x\n# Test examples\nassert f(1) == 1"
    assert answers.extract_code(tests, fence_end="\n```", test_marker=True) == "def f(x):\n    return x"
    assert "# Test examples" in answers.extract_code(tests)  # HumanEval does not cut there
    alpaca = "The solution is: def f(x): return x\n\nThe answer is: f"
    assert answers.extract_code(alpaca) == "def f(x): return x"
    assert answers.extract_code("x ### Response: def g(): pass") == "def g(): pass"


def test_stop_strings():
    assert answers.truncate_at_stop("The answer is: 7\n\n### Instruction: more", ("Instruction:", "Response")) == \
        "The answer is: 7\n\n### "
    assert answers.truncate_at_stop("no stop here", ("Response",)) == "no stop here"


# --- metrics ----------------------------------------------------------------------------------------

def test_classification_metrics_by_hand():
    predictions, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # tp=2, fp=1, fn=1, tn=2
    assert metrics.accuracy(predictions, labels) == pytest.approx(4 / 6)
    assert metrics.f1(predictions, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert metrics.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction: undefined -> 0 (sklearn)
    assert metrics.f1([0, 0], [0, 0]) == 0.0
    # three classes: sklearn.metrics.matthews_corrcoef([0,1,2,2,1,0],[0,2,2,1,1,0]) = 0.5
    assert metrics.matthews_corrcoef([0, 2, 2, 1, 1, 0], [0, 1, 2, 2, 1, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        metrics.accuracy([1, 2], [1])


def test_correlations_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    assert metrics.pearson(x, y) == pytest.approx(3.5 / math.sqrt(5 * 4.75))  # centred sums by hand
    assert metrics.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert metrics.spearman(x, y) == pytest.approx(metrics.pearson(x, [1, 2.5, 4, 2.5]))  # ties averaged
    assert metrics.spearman(x, y) == pytest.approx(0.6324555320336759)  # scipy.stats.spearmanr
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))
    assert metrics.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_glue_metric_sets_and_headline():
    assert set(metrics.glue_metrics("mrpc", [1, 0], [1, 1])) == {"accuracy", "f1", "averaged_scores"}
    stsb = metrics.glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0])
    assert stsb["averaged_scores"] == pytest.approx((stsb["pearson"] + stsb["spearmanr"]) / 2)
    assert set(metrics.glue_metrics("cola", [1, 0], [1, 0])) == {"matthews_correlation"}
    assert get_task("cola").primary() == "matthews_correlation" and get_task("stsb").primary() == "pearson"
    assert get_task("rte").primary() == "accuracy" and get_task("humaneval").primary() == "pass@1"


def test_perplexity_and_pass_at_k():
    assert metrics.perplexity(math.log(4.0) * 10, 10) == pytest.approx(4.0)
    assert math.isnan(metrics.perplexity(1.0, 0))
    assert metrics.pass_at_k(1, 1, 1) == 1.0 and metrics.pass_at_k(1, 0, 1) == 0.0
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))


def test_reducer_adds_in_batches():
    reducer = Reducer(get_task("mrpc"))
    reducer.add([1.0, 0.0], predictions=[1, 0], labels=[1, 1])
    reducer.add([1.0], predictions=[0], labels=[0])
    assert reducer.count == 3 and reducer.metrics() == metrics.glue_metrics("mrpc", [1, 0, 0], [1, 1, 0])
    ppl = Reducer(get_task("perplexity"))
    ppl.add([0.0, 0.0], nll=[2.0, 4.0], tokens=[2, 4])
    assert ppl.metrics()["perplexity"] == pytest.approx(math.exp(1.0))


# --- task preparation -------------------------------------------------------------------------------

def test_task_templates_and_fields():
    gsm = get_task("gsm8k").prepare({"question": "How many?", "answer": "reasoning\n#### 1,000"})
    assert gsm["reference"] == "1000"
    assert gsm["prompt"].endswith("### Instruction:\nHow many?\n\n### Response: Let's think step by step.")
    mergelm_style = get_task("gsm8k").prepare({"query": "Q", "response": "#### 3"})  # MergeLM's file fields
    assert mergelm_style["reference"] == "3"
    mbpp = get_task("mbpp").prepare({"task_id": 11, "text": "Write f.", "test_list": ["assert f(1) == 1"]})
    assert "Create a Python script for this problem:\n\nWrite f.\nTest examples:\nassert f(1) == 1" in mbpp["prompt"]
    assert mbpp["suffix"] == "assert f(1) == 1\n" and mbpp["prefix"] == ""
    long = get_task("mbpp").prepare({"task_id": 493, "text": "t", "test_list": ["assert calculate_polygons(1) == 2"]})
    assert "calculate_polygons(startx, starty, endx, endy, radius)" in long["prompt"]
    human = get_task("humaneval").prepare({"prompt": "def f(x):\n    pass\n", "test": "def check(c): pass",
                                           "entry_point": "f"})
    assert "def f(x):\n\tpass" in human["prompt"] and human["suffix"].endswith("check(f)\n")
    assert (human["prefix"], human["entry"], mbpp["entry"]) == ("def f(x):\n    pass\n", "f", "")
    rte = get_task("rte").prepare({"sentence1": "a", "sentence2": "b", "label": 1})
    assert (rte["prompt"], rte["pair"], rte["label"]) == ("a", "b", 1.0)
    with pytest.raises(InputError, match="task 'rte': a row has no field 'sentence2'"):
        get_task("rte").prepare({"sentence1": "a", "label": 1})
    with pytest.raises(InputError, match="has no field 'question' or 'query'"):
        get_task("gsm8k").check_columns(["text"], "data 'x.jsonl'")
    with pytest.raises(InputError, match="unknown task 'squad'"):
        get_task("squad")
    assert {"gsm8k", "math", "mbpp", "humaneval", "perplexity", "cola", "sst2", "mrpc", "stsb", "qqp", "mnli",
            "qnli", "rte"} <= set(TASKS)


# --- results and suites -----------------------------------------------------------------------------

def test_summary_normalized_scores_and_table(tmp_path):
    import json

    from distmerge.evaluate import report
    from distmerge.evaluate.runner import EvalResult

    results = [EvalResult("sst2", "m", "d", {"accuracy": 0.9}, "accuracy", 10, 1.0),
               EvalResult("stsb", "m", "d", {"pearson": float("nan"), "spearmanr": 0.5}, "pearson", 10, 1.0),
               EvalResult("cola", "m", "d", {"matthews_correlation": 0.3}, "matthews_correlation", 10, 1.0)]
    expert_file = tmp_path / "expert.json"
    expert_file.write_text(json.dumps(report.summary([
        EvalResult("sst2", "e", "d", {"accuracy": 0.95}, "accuracy", 10, 1.0),
        EvalResult("stsb", "e", "d", {"pearson": 0.8}, "pearson", 10, 1.0)])))
    experts = report.load_expert_scores(expert_file)
    assert experts == {"sst2": 0.95, "stsb": 0.8}
    data = report.summary(results, experts)
    assert data["tasks"]["sst2"]["normalized"] == pytest.approx(100 * 0.9 / 0.95)
    assert data["tasks"]["stsb"]["score"] is None and data["tasks"]["stsb"]["normalized"] is None
    assert "normalized" not in data["tasks"]["cola"]
    assert data["mean_normalized"] == pytest.approx(100 * 0.9 / 0.95)
    text = report.table(data)
    assert "sst2" in text and "94.74" in text and "n/a" in text and "mean normalized score: 94.74" in text
    path = report.write_summary(tmp_path, data)
    assert json.loads(path.read_text())["tasks"]["stsb"]["metrics"]["pearson"] is None  # NaN is not JSON
    assert report.normalized(0.5, 0.0) is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"sst2": "high"}')
    with pytest.raises(InputError, match="score of sst2 is not a number"):
        report.load_expert_scores(bad)


def test_row_writer_appears_only_when_complete(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distmerge.evaluate.report import RowWriter

    def batch(start):
        return pa.table({"index": [start, start + 1], "prompt": ["a", "b"], "score": [1.0, 0.0],
                         "nll": [0.1, 0.2], "tokens": [3, 4], "extra": ["x", "y"]})

    writer = RowWriter(tmp_path / "perplexity.parquet", "perplexity")
    writer.write(batch(0))
    writer.write(batch(2))
    assert not (tmp_path / "perplexity.parquet").exists()
    path = writer.close()
    table = pq.read_table(path)
    assert table.column_names == ["index", "prompt", "score", "nll", "tokens"] and table["index"].to_pylist() == [0, 1, 2, 3]
    failed = RowWriter(tmp_path / "gsm8k.parquet", "perplexity")
    failed.write(batch(0))
    failed.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perplexity.parquet"]


def test_suite_validation(tmp_path):
    from distmerge.errors import ConfigError
    from distmerge.evaluate.suite import load_suite

    suite = tmp_path / "suite.yaml"
    suite.write_text("model: merged\nbatch_size: 4\ntasks:\n  - task: GSM8K\n    data: data/g.jsonl\n    limit: 5\n"
                     "  - perplexity\n  - task: sst2\n    model: /abs/other\n    head_from: experts/sst2\n")
    loaded = load_suite(suite)
    assert loaded.model == str(tmp_path / "merged")
    first, second, third = loaded.tasks
    assert (first.task, first.data, first.options) == ("gsm8k", str(tmp_path / "data/g.jsonl"),
                                                       {"batch_size": 4, "limit": 5})
    assert second.task == "perplexity" and second.data is None
    assert third.model == "/abs/other" and third.head_from == str(tmp_path / "experts/sst2")
    from distmerge.evaluate.runner import EvalOptions

    with pytest.raises(ConfigError, match="batch_size: expected an integer >= 1"):
        EvalOptions(batch_size=0)
    with pytest.raises(ConfigError, match="device: 'tpu'"):
        EvalOptions(device="tpu")
    for text, message in [
        ("tasks: []\n", "tasks: suite"),
        ("tasks:\n  - task: squad\n", "tasks[0].task: 'squad' is not a task"),
        ("tasks:\n  - task: gsm8k\n    batch: 3\n", "tasks[0].batch: unknown key"),
        ("workers: 0\ntasks: [gsm8k]\n", "workers: expected an integer >= 1"),
        ("modle: x\ntasks: [gsm8k]\n", "modle: unknown key"),
        ("tasks: [gsm8k\n", "not valid YAML"),
    ]:
        suite.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_suite(suite)


def test_load_tokenizer_leaves_the_callers_tokenizer_alone():
    from distmerge.evaluate.models import ModelSource, load_tokenizer
    from distmerge.tiny_models import build_tokenizer

    mine = build_tokenizer(64)
    mine.padding_side = "right"
    theirs = load_tokenizer(ModelSource(config={"model_type": "llama"}, tensors={}, tokenizer=mine), "left")
    assert theirs.padding_side == "left" and mine.padding_side == "right"


def test_user_errors_are_found_behind_ray_wrapping():
    """A task's DistmergeError is found through its cause chain; an actor that died in ``__init__`` leaves only
    text, from which the last distmerge error line is rebuilt; anything else is left alone."""
    from distmerge.engine.ray_session import find_user_error, user_errors
    from distmerge.errors import ConfigError

    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    original = InputError("data file 'x' does not exist")
    assert find_user_error(Wrapped(original)) is original
    try:
        try:
            raise original
        except InputError as exc:
            raise RuntimeError("re-raised") from exc
    except RuntimeError as chained:
        assert find_user_error(chained) is original
    text = RuntimeError("Traceback ...\ndistmerge.errors.InputError: first\nTraceback ...\n"
                        "distmerge.errors.ConfigError: model 'm': no config.json\n  more lines")
    found = find_user_error(text)
    assert type(found) is ConfigError and str(found) == "model 'm': no config.json"
    assert find_user_error(RuntimeError("distmerge.errors.NotAnError: x")) is None
    assert find_user_error(ValueError("plain")) is None
    with pytest.raises(InputError, match="^data file 'x' does not exist$"):
        with user_errors():
            raise Wrapped(original)
    with pytest.raises(ValueError, match="plain"):
        with user_errors():
            raise ValueError("plain")


def test_rows_in_memory_go_in_a_few_blocks_not_one_per_row():
    """Ray's from_items makes a block (a task, often a new worker process) per row; a sweep's 65 validation texts
    at batch 32 are one prepare task per 128 rows instead."""
    from distmerge.evaluate.data import in_memory_blocks

    assert [in_memory_blocks(n, 128) for n in (0, 1, 65, 128, 129, 1000)] == [1, 1, 1, 1, 2, 8]
    assert in_memory_blocks(10, 0) == 10
