"""One trial: its merge config, the merged tensors from the holders, the model, the scores reported to Tune."""

from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmerge.io.checkpoint import Checkpoint
from distmerge.sweep.spec import SweepSpec

_PROCESS_CACHE: dict[str, Any] = {}  # per trial process: model files folder, tokenizer, unmerged tensors


@dataclass
class SweepContext:
    """What every trial needs; shipped once through the object store (``tune.with_parameters``)."""

    spec: SweepSpec
    base: Checkpoint | None
    experts: list[Checkpoint]
    holders: list  # actor handles
    holder_tensors: list[tuple[str, ...]]  # merged tensor names per holder
    copied_refs: list  # ObjectRefs of each holder's unmerged tensors
    model_files: dict[str, bytes]  # config.json (vocabulary patched) and tokenizer files of the merged model
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # keys what a reused trial process caches


def _cache(context: SweepContext) -> dict[str, Any]:
    """What this process keeps between the trials of one sweep (Tune reuses trial processes)."""
    if _PROCESS_CACHE.get("run") != context.run_id:
        _PROCESS_CACHE.clear()
        _PROCESS_CACHE["run"] = context.run_id
    return _PROCESS_CACHE


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    """Tune's function trainable."""
    import torch
    from ray import tune

    from distmerge import telemetry
    from distmerge.sweep.objectives import build_model, evaluate_in_parts

    began = time.perf_counter()
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    device = "cuda" if resources.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
    values = {name: config[name] for name in context.spec.param_names}
    weights_of = task_weights(context, values)
    merge_seconds = time.perf_counter() - began
    model_config, tokenizer = _model_files(context)
    built: dict[tuple, Any] = {}  # the models of one task's weights at a time (a method with one model per task)

    def cached(key: tuple, task, make):
        weights_key = task.expert  # None: every task is scored on the one merged model
        if built and next(iter(built))[0] != weights_key:
            built.clear()
        if (weights_key, *key) not in built:
            built[(weights_key, *key)] = make(weights_of(task.expert))
        return built[(weights_key, *key)]

    def model(kind: str, task):
        return cached(("model", kind), task, lambda weights: build_model(model_config, weights, kind, device))

    def eval_source(task):
        from distmerge.evaluate import ModelSource

        # put into the object store once per weights, for the evaluator's actors; load_tokenizer works on a
        # copy, so the evaluator's padding side does not leak into this one
        return cached(("source",), task,
                      lambda weights: ModelSource.from_state_dict(model_config.to_dict(), weights, tokenizer))

    eval_began = time.perf_counter()
    for part, metrics in enumerate(evaluate_in_parts(model, tokenizer, context.spec.tasks,
                                                     context.spec.eval_chunks, eval_source), 1):
        tune.report({**metrics, "merge_seconds": round(merge_seconds, 3),
                     "eval_seconds": round(time.perf_counter() - eval_began, 3), "eval_parts": part})
    telemetry.count("distmerge_trials_finished")


def task_weights(context: SweepContext, values: dict[str, Any]):
    """A function from a task's expert name (None: the one merged model) to the weights that task is scored on."""
    weights, artifacts, state = merged_outputs(context, values)
    config = context.spec.trial_config(values)
    method = config.build_method()
    if not method.builds_task_models:
        return lambda expert: weights
    names = [m.name for m in config.models]
    return lambda expert: method.task_weights(weights, artifacts, state, names.index(expert))


def merged_outputs(context: SweepContext, values: dict[str, Any]):
    """(merged state dict, the method's artifacts by key, the method's final state) for these values."""
    import ray

    from distmerge.engine.ray_session import get as _get
    from distmerge.methods import execute
    from distmerge.sweep.holders import from_wire
    from distmerge.tensors import resolve_tensors

    merge_config = context.spec.trial_config(values)
    method = merge_config.build_method()
    outputs, _, _ = resolve_tensors(merge_config, context.base, context.experts)
    jobs = {o.name: o.job for o in outputs if o.merged}
    state = method.initial_state(list(jobs.values()))
    holder_jobs = [ray.put({name: jobs[name] for name in names}) for names in context.holder_tensors]

    def partial(pass_name: str, state: dict):
        totals = None
        for part in _get([h.run_pass.remote(method, pass_name, state, j)
                          for h, j in zip(context.holders, holder_jobs)]):
            if part is not None:
                totals = execute.add_partials(totals, part)
        return totals

    state = execute.run_passes(method, state, partial)
    request = uuid.uuid4().hex
    try:
        merged = _get([h.merge.remote(request, method, state, j) for h, j in zip(context.holders, holder_jobs)])
        totals = None
        for part in (m["partial"] for m in merged):  # holder order, as ``partial`` sums a pass
            if part is not None:
                totals = execute.add_partials(totals, part)
        state = method.finish_merge(totals or {}, state)
        settled, outcome = method.settle_deferred(state, sum(m["vote"] for m in merged))
        parts = _get([h.fetch.remote(request, outcome) for h in context.holders])
    except BaseException:
        for holder in context.holders:
            holder.discard.remote(request)
        raise
    if outcome is not None:
        settled = method.record_settled(settled, sum(p["deferred"] for p in parts))
    tensors, artifacts = {}, {}
    for part in [p["weights"] for p in parts] + _copied(context):
        for name, (array, dtype) in part.items():
            tensors[name] = from_wire(array, dtype)
    for part in parts:
        for key, (array, dtype) in part["artifacts"].items():
            artifacts[key] = from_wire(array, dtype)
    return tensors, artifacts, settled


def _copied(context: SweepContext) -> list[dict]:
    from distmerge.engine.ray_session import get

    cache = _cache(context)
    if "copied" not in cache:
        cache["copied"] = get(context.copied_refs)
    return cache["copied"]


def _model_files(context: SweepContext):
    """The model config and tokenizer, loaded once per process from the files the driver shipped (no shared
    filesystem). The folder they are loaded from lives only for the loading."""
    from transformers import AutoConfig, AutoTokenizer

    cache = _cache(context)
    if "files" not in cache:
        with tempfile.TemporaryDirectory(prefix="distmerge-sweep-model-") as folder:
            for name, data in context.model_files.items():
                (Path(folder) / name).write_bytes(data)
            model_config = AutoConfig.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:  # batched scoring pads; the padding is masked out
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        cache["files"] = (model_config, tokenizer)
    return cache["files"]
