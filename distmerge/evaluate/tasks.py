"""The task registry: what each benchmark reads, how it prompts, how long it generates, how a row is scored and how
scores reduce to the metric the papers report.

Every task turns an input row into one *prepared* row with the same columns (so one Ray Data pipeline serves
all of them):

=============  ==============================================================================================
``prompt``     the generation prompt (with the paper's template), the text to classify, or the text to score
``pair``       the second text of a GLUE pair ("" otherwise)
``reference``  the reference answer as text (GSM8K number, MATH boxed answer, GLUE label, "" for perplexity)
``label``      GLUE label or STS-B target (NaN otherwise)
``prefix``     code tasks: program text before the completion (HumanEval's prompt)
``suffix``     code tasks: the tests that judge it (HumanEval's ``check(entry_point)``, MBPP's asserts)
``entry``      code tasks: the name the tests take from the completion although ``prefix`` defines it
=============  ==============================================================================================

Templates and limits follow MergeLM's ``inference_llms_instruct_math_code.py`` (which the DARE and FDA papers
use): WizardMath's template for GSM8K/MATH with stops ``Instruction:``/``Response:`` and 1024/2048 new tokens;
the Alpaca code template ("Create a Python script for this problem:") for HumanEval and MBPP with 2048 new
tokens, tabs for 4 spaces in the prompt, MBPP task 493's overlong tests replaced by its signature. MBPP
programs are the completion, judged by the ``test_list`` asserts (bigcode-evaluation-harness, as MergeLM
evaluates its dump); HumanEval programs are prompt + completion, judged by the tests + ``check(entry_point)``
(human-eval). The generated program and the tests run in separate sandboxes (``sandbox``): the tests see the
completion's functions through proxies, so a completion can neither read the tests nor forge their verdict.
GLUE reads sentence pairs as MergeLM's ``glue_data_loader`` (max 128 tokens); the headline metric is the one
the EMR and FDA tables average (CoLA Matthews, STS-B Pearson, accuracy elsewhere), with MergeLM's averaged
scores (MRPC/QQP accuracy+F1, STS-B Pearson+Spearman) reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from distmerge.errors import InputError
from distmerge.evaluate import answers, metrics

PREPARED_COLUMNS = ("prompt", "pair", "reference", "label", "prefix", "suffix", "entry")

WIZARDMATH_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: Let's think step by step."
)
ALPACA_CODE_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\n"
    "### Instruction:\nCreate a Python script for this problem:\n{instruction}\n\n### Response:"
)
MATH_STOPS = ("Instruction:", "Instruction", "Response:", "Response")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # generate | classify | perplexity
    description: str
    prepare: Callable[[Mapping[str, Any]], dict]
    # (output, prediction, prepared row, sandbox limits) -> (row score, extracted answer or run status)
    score: Callable[..., tuple[float, str]] | None = None
    metric: str = "accuracy"  # generation: the name of the mean of per-row scores
    max_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    num_labels: int = 0  # classify: 1 = regression
    max_length: int = 0  # classify/perplexity: tokens per input (0 = the model's limit)
    hub: tuple[str, str | None, str] | None = None  # (dataset, config, split) for `datasets`
    runs_code: bool = False
    fields: tuple[tuple[str, ...], ...] = field(default=())  # accepted names, per required input

    def primary(self) -> str:
        if self.kind == "perplexity":
            return "perplexity"
        if self.kind == "classify":
            return GLUE_PRIMARY[self.name]
        return self.metric

    def check_columns(self, columns: Sequence[str], source: str) -> None:
        for names in self.fields:
            if not any(n in columns for n in names):
                wanted = " or ".join(f"'{n}'" for n in names)
                raise InputError(f"task '{self.name}': {source} has no field {wanted} "
                                 f"(fields: {', '.join(columns) or 'none'})")


def _first(row: Mapping[str, Any], names: Sequence[str], task: str) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise InputError(f"task '{task}': a row has no field {' or '.join(repr(n) for n in names)} "
                     f"(fields: {', '.join(row)})")


def _prepared(prompt: str, reference: str = "", pair: str = "", label: float = math.nan, prefix: str = "",
              suffix: str = "", entry: str = "") -> dict:
    return {"prompt": prompt, "pair": pair, "reference": reference, "label": float(label), "prefix": prefix,
            "suffix": suffix, "entry": entry}


def _as_list(value: Any) -> list:
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value) if value is not None else []


# --- GSM8K / MATH ----------------------------------------------------------------------------------

GSM8K_QUESTION, GSM8K_ANSWER = ("question", "query"), ("answer", "response")
MATH_PROBLEM, MATH_SOLUTION = ("problem", "instruction", "question"), ("answer", "solution", "output")


def _prepare_gsm8k(row):
    question = _first(row, GSM8K_QUESTION, "gsm8k")
    answer = _first(row, GSM8K_ANSWER, "gsm8k")
    try:
        reference = answers.gsm8k_reference(str(answer)) if "####" in str(answer) else int(str(answer).replace(",", ""))
    except ValueError as exc:
        raise InputError(f"task 'gsm8k': unreadable answer ({exc})") from None
    return _prepared(WIZARDMATH_PROMPT.format(instruction=question), reference=str(reference))


def _score_gsm8k(output, prediction, row, sandbox=None):
    extracted = answers.extract_final_number(output)
    correct = extracted is not None and float(extracted) == float(row["reference"])
    return float(correct), "" if extracted is None else str(extracted)


def _prepare_math(row):
    problem = _first(row, MATH_PROBLEM, "math")
    if row.get("answer") is not None:  # datasets that ship the final answer (MATH-500 style)
        reference = str(row["answer"])
    else:
        solution = str(_first(row, ("solution", "output"), "math"))
        reference = answers.math_reference(solution) or ""  # "" = no boxed answer: never correct, as in MergeLM
    return _prepared(WIZARDMATH_PROMPT.format(instruction=problem), reference=reference)


def _score_math(output, prediction, row, sandbox=None):
    extracted = answers.extract_math_answer(output)
    reference = row["reference"] or None
    correct = extracted is not None and answers.is_equiv(extracted, reference)
    return float(correct), "" if extracted is None else extracted


# --- code ------------------------------------------------------------------------------------------

def _prepare_humaneval(row):
    prompt = str(_first(row, ("prompt",), "humaneval"))
    test = str(_first(row, ("test",), "humaneval"))
    entry = str(_first(row, ("entry_point",), "humaneval"))
    return _prepared(ALPACA_CODE_PROMPT.format(instruction=prompt.replace("    ", "\t")),
                     reference=str(row.get("canonical_solution") or ""), prefix=prompt,
                     suffix=f"{test}\n\ncheck({entry})\n", entry=entry)


def _prepare_mbpp(row):
    text = str(_first(row, ("text", "prompt"), "mbpp"))
    tests = [str(t) for t in _as_list(_first(row, ("test_list",), "mbpp"))]
    task_id = row.get("task_id")
    prompt = f"\n{text}\nTest examples:"
    if task_id is not None and int(task_id) == 493:  # MergeLM: this task's tests are too long for the prompt
        prompt += "\ncalculate_polygons(startx, starty, endx, endy, radius)"
    else:
        prompt += "".join(f"\n{t}" for t in tests)
    return _prepared(ALPACA_CODE_PROMPT.format(instruction=prompt.replace("    ", "\t")),
                     reference=str(row.get("code") or ""), suffix="\n".join(tests) + "\n")


def _score_code(test_marker: bool):
    def score(output, prediction, row, sandbox=None):
        from distmerge.evaluate.sandbox import run_program

        fence_end = "\n```" if test_marker else "```"
        code = answers.extract_code(output, fence_end=fence_end, test_marker=test_marker)
        entry = str(row.get("entry") or "")
        # The prompt runs on both sides: the completion needs its imports and helpers, the tests need the dataset's
        # own helpers (HumanEval/32's poly), not the completion's versions of them.
        result = run_program(f"{row['prefix']}{code}\n", str(row["suffix"]), sandbox, setup=str(row["prefix"]),
                             entry_points=(entry,) if entry else ())
        detail = result.status
        if result.status == "failed" and result.stderr.strip():
            detail += ": " + result.stderr.strip().splitlines()[-1][:200]
        return float(result.passed), detail

    return score


# --- GLUE ------------------------------------------------------------------------------------------

GLUE_FIELDS = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
}
GLUE_LABELS = {"cola": 2, "sst2": 2, "mrpc": 2, "stsb": 1, "qqp": 2, "mnli": 3, "qnli": 2, "rte": 2}
GLUE_PRIMARY = {"cola": "matthews_correlation", "stsb": "pearson", "sst2": "accuracy", "mrpc": "accuracy",
                "qqp": "accuracy", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}


def _prepare_glue(name: str):
    first, second = GLUE_FIELDS[name]

    def prepare(row):
        label = _first(row, ("label",), name)
        return _prepared(str(_first(row, (first,), name)), pair=str(_first(row, (second,), name)) if second else "",
                         reference=str(label), label=float(label))

    return prepare


def _score_glue(name: str):
    def score(output, prediction, row, sandbox=None):
        if GLUE_LABELS[name] == 1:
            return -abs(prediction - row["label"]), ""  # STS-B: higher is better, 0 is exact
        return float(prediction == row["label"]), ""

    return score


# --- perplexity ------------------------------------------------------------------------------------

def _prepare_text(row):
    return _prepared(str(_first(row, ("text", "content"), "perplexity")))


# --- registry --------------------------------------------------------------------------------------

def _registry() -> dict[str, Task]:
    tasks = {
        "gsm8k": Task("gsm8k", "generate", "GSM8K: exact match of the final number (WizardMath prompt)",
                      _prepare_gsm8k, _score_gsm8k, "accuracy", 1024, MATH_STOPS,
                      hub=("openai/gsm8k", "main", "test"), fields=(GSM8K_QUESTION, GSM8K_ANSWER)),
        "math": Task("math", "generate", "MATH: normalized final answer vs the solution's \\boxed{} (WizardMath prompt)",
                     _prepare_math, _score_math, "accuracy", 2048, MATH_STOPS,
                     fields=(MATH_PROBLEM, MATH_SOLUTION)),
        "humaneval": Task("humaneval", "generate", "HumanEval: pass@1 of the greedy completion (Alpaca code prompt)",
                          _prepare_humaneval, _score_code(False), "pass@1", 2048, (),
                          hub=("openai/openai_humaneval", None, "test"), runs_code=True,
                          fields=(("prompt",), ("test",), ("entry_point",))),
        "mbpp": Task("mbpp", "generate", "MBPP: pass@1 of the greedy completion against test_list (Alpaca code prompt)",
                     _prepare_mbpp, _score_code(True), "pass@1", 2048, (),
                     hub=("google-research-datasets/mbpp", "full", "test"), runs_code=True,
                     fields=(("text", "prompt"), ("test_list",))),
        "perplexity": Task("perplexity", "perplexity", "perplexity of a causal LM, each text scored on its own",
                           _prepare_text, None, "perplexity", max_length=1024, fields=(("text", "content"),)),
    }
    for name, (first, second) in GLUE_FIELDS.items():
        split = "validation_matched" if name == "mnli" else "validation"
        tasks[name] = Task(name, "classify", f"GLUE {name}: {GLUE_PRIMARY[name]} of a sequence classifier",
                           _prepare_glue(name), _score_glue(name), GLUE_PRIMARY[name], num_labels=GLUE_LABELS[name],
                           max_length=128, hub=("nyu-mll/glue", name, split),
                           fields=tuple((f,) for f in (first, second) if f) + (("label",),))
    return tasks


TASKS: dict[str, Task] = _registry()


def get_task(name: str) -> Task:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise InputError(f"unknown task '{name}' (one of: {', '.join(sorted(TASKS))})") from None


class Reducer:
    """Running totals of one task's per-row results; ``metrics()`` gives the task's figures at any point."""

    def __init__(self, task: Task):
        self.task = task
        self.count = 0
        self.score_sum = 0.0
        self.nll_sum = 0.0
        self.token_sum = 0
        self.predictions: list[float] = []
        self.labels: list[float] = []

    def add(self, scores: Sequence[float], predictions: Sequence[float] = (), labels: Sequence[float] = (),
            nll: Sequence[float] = (), tokens: Sequence[int] = ()) -> None:
        self.count += len(scores)
        self.score_sum += float(sum(scores))
        if self.task.kind == "classify":
            self.predictions.extend(float(p) for p in predictions)
            self.labels.extend(float(x) for x in labels)
        elif self.task.kind == "perplexity":
            self.nll_sum += float(sum(nll))
            self.token_sum += int(sum(tokens))

    def metrics(self) -> dict[str, float]:
        if self.task.kind == "classify":
            if self.task.num_labels == 1:
                return metrics.glue_metrics(self.task.name, self.predictions, self.labels)
            as_int = [int(p) for p in self.predictions], [int(x) for x in self.labels]
            return metrics.glue_metrics(self.task.name, *as_int)
        if self.task.kind == "perplexity":
            return {"perplexity": metrics.perplexity(self.nll_sum, self.token_sum), "tokens": float(self.token_sum)}
        return {self.task.metric: self.score_sum / self.count if self.count else float("nan")}
