"""The pipeline's stages (``distmerge.evaluate.runner`` chains them on Ray Data): ``prepare_batch`` and
``score_batch`` run as light tasks around ``ModelWorker``, the actor pool that loads the model once and generates,
classifies or scores tokens; ``actor_resources`` sizes one actor of the pool.
"""

from __future__ import annotations

from distmerge.errors import InputError
from distmerge.evaluate.models import ModelSource
from distmerge.evaluate.options import EvalOptions
from distmerge.evaluate.sandbox import SandboxLimits
from distmerge.evaluate.tasks import GLUE_FIELDS, PREPARED_COLUMNS, get_task


def _rows(batch: dict) -> list[dict]:
    columns = list(batch)
    count = len(batch[columns[0]]) if columns else 0
    return [{c: batch[c][i] for c in columns} for i in range(count)]


def prepare_batch(batch: dict, task_name: str) -> dict:
    task = get_task(task_name)
    prepared = [task.prepare(row) for row in _rows(batch)]
    return {c: [p[c] for p in prepared] for c in PREPARED_COLUMNS}


def score_batch(batch: dict, task_name: str, sandbox: SandboxLimits) -> dict:
    import numpy as np

    task = get_task(task_name)
    scores, extracted = [], []
    if task.kind == "perplexity":
        nll, tokens = batch["nll"].astype(np.float64), batch["tokens"].astype(np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = np.where(tokens > 0, np.exp(nll / np.maximum(tokens, 1)), np.nan).tolist()
        extracted = [""] * len(scores)
    else:
        for row in _rows(batch):
            score, detail = task.score(str(row["output"]), float(row["prediction"]), row, sandbox=sandbox)
            scores.append(float(score))
            extracted.append(detail)
    out = {k: v for k, v in batch.items() if k not in ("prefix", "suffix", "entry")}
    out["score"] = np.asarray(scores, dtype=np.float64)
    out["extracted"] = np.asarray(extracted, dtype=object)
    return out


class ModelWorker:
    """One actor of the pool: loads the model once, then turns prepared batches into outputs."""

    def __init__(self, source: ModelSource, task_name: str, options: EvalOptions, device: str, num_cpus: float):
        import torch
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(max(1, int(num_cpus)))
        hf_logging.disable_progress_bar()  # "Loading weights" bars from every actor
        from distmerge.evaluate import models, predict

        self.task = get_task(task_name)
        self.options, self.device = options, device
        kind = self.task.kind
        padding = "left" if kind == "generate" else "right"
        self.generator = None
        if kind == "generate" and _use_vllm(options, source, device):
            from distmerge.evaluate.generate import VllmGenerator

            self.generator = VllmGenerator(source.path, source.tokenizer if isinstance(source.tokenizer, str) else None)
            return
        self.tokenizer = models.load_tokenizer(source, padding)
        self.model = models.load_model(source, kind, self.task.num_labels, device)
        self.max_length = predict.model_max_tokens(self.model, options.max_length or self.task.max_length)
        if kind == "generate":
            from distmerge.evaluate.generate import TransformersGenerator

            self.generator = TransformersGenerator(self.model, self.tokenizer, device)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from distmerge import telemetry
        from distmerge.evaluate import predict

        prompts = [str(p) for p in batch["prompt"]]
        n = len(prompts)
        outputs, prediction = [""] * n, np.full(n, np.nan)
        nll, tokens = np.zeros(n), np.zeros(n, dtype=np.int64)
        if self.task.kind == "generate":
            outputs = self.generator.generate(prompts, self.options.max_new_tokens or self.task.max_new_tokens,
                                              self.task.stop)
        elif self.task.kind == "classify":
            pairs = [str(p) for p in batch["pair"]] if GLUE_FIELDS[self.task.name][1] else None
            prediction = predict.classify(self.model, self.tokenizer, prompts, pairs, self.max_length, self.device)
            outputs = [_label_text(p, self.task.num_labels) for p in prediction]
        else:
            nll, tokens = predict.nll(self.model, self.tokenizer, prompts, self.max_length, self.device)
        telemetry.count("distmerge_examples_evaluated", n, task=self.task.name)
        out = dict(batch)
        out["output"] = np.asarray(outputs, dtype=object)
        out["prediction"] = np.asarray(prediction, dtype=np.float64)
        out["nll"], out["tokens"] = nll, tokens
        return out


def _label_text(prediction: float, num_labels: int) -> str:
    return f"{prediction:.6g}" if num_labels == 1 else str(int(prediction))


def _use_vllm(options: EvalOptions, source: ModelSource, device: str) -> bool:
    from distmerge.evaluate.generate import vllm_available

    if options.backend == "transformers":
        return False
    from distmerge.twin import is_twin_folder

    twin = source.path is not None and is_twin_folder(source.path)
    if options.backend == "vllm" and twin:  # vLLM would run the shared expert alone, unrouted
        raise InputError(f"backend 'vllm' cannot route the twin folder '{source.path}'; use backend transformers")
    usable = vllm_available() and device == "cuda" and source.path is not None and not twin
    if options.backend == "vllm" and not usable:
        raise InputError("backend 'vllm' needs the vllm package, a GPU and a model folder")
    return usable


def actor_resources(options: EvalOptions) -> tuple[str, float, float]:
    """(device, CPUs, GPUs) of one model actor of ``options.workers``."""
    from distmerge.engine.ray_session import cluster_cpus, cluster_gpus

    gpus = cluster_gpus()
    device = options.device if options.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    if device == "cuda" and gpus <= 0:
        raise InputError("device 'cuda' asked for, but the Ray cluster has no GPU")
    # Fractional CPUs so the light tasks always find room beside the actors (see distmerge.evaluate.runner's docstring).
    num_cpus = options.cpus_per_worker or min(1.0, cluster_cpus() / (options.workers + 1))
    num_gpus = min(1.0, gpus / options.workers) if device == "cuda" else 0.0
    return device, num_cpus, num_gpus
