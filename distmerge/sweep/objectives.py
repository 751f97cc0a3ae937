"""Scoring a merged model held in memory: build it from a state dict, evaluate validation tasks in parts.

* ``perplexity``: mean negative log-likelihood per predicted token of a causal LM over a list of texts
  (``nll``; ``perplexity`` = exp(nll)), summed over tokens, so parts add up to the whole.
* ``classification``: accuracy of a sequence-classification model on (text, label) pairs; string labels
  go through the model config's ``label2id``.
  Both score with the evaluator's own functions (``distmerge.evaluate.predict``), so a sweep's number is the
  number ``distmerge eval`` gives on the same data.
* ``eval``: a task of ``distmerge.evaluate`` (GLUE, GSM8K, MATH, code, perplexity), run by its in-process
  ``evaluate`` on the merged tensors (a ``ModelSource`` from the state dict) on its own Ray Data actors; the
  per-row results of each part go into the evaluator's own ``Reducer``, so every metric it reports is exact
  for the examples seen so far.

``evaluate_in_parts`` yields the cumulative metrics after each part: a sweep reports after each, which is
what lets ASHA stop a poor trial early.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from distmerge.errors import DistmergeError
from distmerge.sweep.tasks import TaskSpec, chunk_bounds

MODEL_KINDS = {"perplexity": "causal_lm", "classification": "sequence_classification"}


class EvaluationError(DistmergeError):
    """A merged model could not be scored (missing tensors, non-finite loss)."""


def build_model(model_config, state_dict: dict[str, torch.Tensor], kind: str, device: str = "cpu"):
    """The model of ``model_config`` (a transformers config, or a folder with config.json) with ``state_dict``'s
    tensors as its weights, without copying them (on the CPU; ``device`` cuda copies them to the trial's GPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = model_config if hasattr(model_config, "to_dict") else AutoConfig.from_pretrained(str(model_config))
    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    # Weights are created on the meta device and replaced by the merged tensors; buffers (rotary
    # frequencies) are computed for real, as from_pretrained would.
    with init_empty_weights():
        model = cls.from_config(config)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise EvaluationError(f"the merged state dict lacks {len(missing)} tensor(s) the model needs, e.g. "
                              f"'{missing[0]}'")
    if result.unexpected_keys:
        raise EvaluationError(f"the merged state dict has tensor(s) the model does not know, e.g. "
                              f"'{result.unexpected_keys[0]}'")
    return model.to(device).eval()


def evaluate_in_parts(models: Callable[[str, TaskSpec], Any], tokenizer, tasks: tuple[TaskSpec, ...], parts: int,
                      eval_source: Callable[[TaskSpec], Any] | None = None) -> Iterator[dict[str, float]]:
    """Cumulative metrics of every task after each of ``parts`` parts of its examples. ``models(kind, task)``
    gives the in-memory model a built-in task is scored on, ``eval_source(task)`` the ``ModelSource`` for an
    ``eval`` task (the same model for every task, unless the method builds one per task)."""
    totals: dict[str, dict[str, float]] = {t.name: {} for t in tasks if t.type != "eval"}
    reducers = {}
    for part in range(parts):
        out: dict[str, float] = {}
        for task in tasks:
            start, stop = chunk_bounds(len(task.examples), parts)[part]
            if task.type == "eval":
                reducer = reducers.get(task.name)
                if reducer is None:
                    from distmerge.evaluate.tasks import Reducer, get_task

                    reducer = reducers[task.name] = Reducer(get_task(task.task))
                _evaluator_part(eval_source(task), task, task.examples[start:stop], reducer)
                out.update(_evaluator_metrics(task, reducer))
                continue
            scorer = _nll_sums if task.type == "perplexity" else _correct_counts
            for key, value in scorer(models(MODEL_KINDS[task.type], task), tokenizer, task,
                                     task.examples[start:stop]).items():
                totals[task.name][key] = totals[task.name].get(key, 0.0) + value
        out.update(_metrics([t for t in tasks if t.type != "eval"], totals))
        yield out


def _evaluator_part(source, task: TaskSpec, rows, reducer) -> None:
    from distmerge.evaluate import evaluate

    options = {"batch_size": task.batch_size, "workers": task.workers, "progress": False}
    for key in ("max_length", "max_new_tokens", "cpus_per_worker"):
        if getattr(task, key) is not None:
            options[key] = getattr(task, key)
    table = evaluate(source, task.task, [dict(row) for row in rows], keep_rows=True, **options).rows
    column = (lambda name: table[name].tolist() if name in table else [])
    reducer.add(column("score"), column("prediction"), column("label"), column("nll"), column("tokens"))


def _evaluator_metrics(task: TaskSpec, reducer) -> dict[str, float]:
    metrics = {f"{task.name}/{key}": float(value) for key, value in reducer.metrics().items()}
    headline = metrics[task.metrics[0]]
    if not math.isfinite(headline):
        raise EvaluationError(f"task '{task.name}': {task.metrics[0]} is not finite ({headline}); the merged "
                              "model's weights overflow or contain NaN for these parameters")
    return metrics


def _metrics(tasks, totals: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for task in tasks:
        sums = totals[task.name]
        if task.type == "perplexity":
            nll = sums["nll_sum"] / max(1.0, sums["tokens"])
            if not math.isfinite(nll):
                raise EvaluationError(f"task '{task.name}': the merged model's loss is not finite ({nll}); its "
                                      "weights overflow or contain NaN for these parameters")
            out[f"{task.name}/nll"] = nll
            out[f"{task.name}/perplexity"] = math.exp(min(nll, 700.0))
            out[f"{task.name}/tokens"] = sums["tokens"]
        else:
            out[f"{task.name}/accuracy"] = sums["correct"] / max(1.0, sums["examples"])
            out[f"{task.name}/examples"] = sums["examples"]
    return out


def _batches(items, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# Without a max_length, a built-in task takes the evaluator's: its perplexity task's window, GLUE's 128 tokens.
DEFAULT_MAX_LENGTH = {"perplexity": 1024, "classification": 128}


def _max_length(model, task: TaskSpec) -> int:
    from distmerge.evaluate.predict import model_max_tokens

    return model_max_tokens(model, task.max_length or DEFAULT_MAX_LENGTH[task.type])


def _nll_sums(model, tokenizer, task: TaskSpec, texts) -> dict[str, float]:
    """The evaluator's own scoring (``distmerge eval --task perplexity``): each text in windows of max_length
    tokens, so a sweep and ``distmerge eval`` give the same number on the same data."""
    from distmerge.evaluate.predict import nll

    nll_sum, tokens = nll(model, tokenizer, list(texts), _max_length(model, task), str(model.device),
                          windows_per_pass=task.batch_size)
    return {"nll_sum": float(nll_sum.sum()), "tokens": float(tokens.sum())}


def _correct_counts(model, tokenizer, task: TaskSpec, pairs) -> dict[str, float]:
    from distmerge.evaluate.predict import classify

    label2id = getattr(model.config, "label2id", None) or {}
    max_length = _max_length(model, task)
    correct = 0
    for batch in _batches(list(pairs), task.batch_size):
        labels = []
        for _, label in batch:
            if isinstance(label, str):
                if label not in label2id:
                    raise EvaluationError(f"task '{task.name}': label {label!r} is not in the model's label2id "
                                          f"({sorted(label2id)})")
                label = label2id[label]
            labels.append(int(label))
        predicted = classify(model, tokenizer, [text for text, _ in batch], None, max_length, str(model.device))
        correct += int((torch.from_numpy(predicted).long() == torch.tensor(labels)).sum())
    return {"correct": float(correct), "examples": float(len(pairs))}
