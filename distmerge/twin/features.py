"""Router features with Ray Data: every task's samples stream through a pool of the evaluator's model actors
(``distmerge.evaluate``: the same model loading, tokenizer, device and CPU-share rules as ``distmerge eval``), and
the driver collects one feature vector per sample.

```
read_json / read_parquet (per task) -> limit(max_samples) -> union
  -> map_batches(FeatureWorker, ActorPoolStrategy(size=workers))   actors: the shared expert, prompt_features
  -> driver: iter_batches -> features [N, hidden], task ids [N]
```
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distmerge.errors import InputError
from distmerge.evaluate.models import ModelSource
from distmerge.twin.config import RouterConfig


class FeatureWorker:
    """One actor: the shared expert loaded once, then batches of prompts to features."""

    def __init__(self, source: ModelSource, kind: str, max_length: int, device: str, num_cpus: float):
        import torch
        from transformers.utils import logging as hf_logging

        from distmerge.evaluate import models, predict

        torch.set_num_threads(max(1, int(num_cpus)))
        hf_logging.disable_progress_bar()
        self.device = device
        self.tokenizer = models.load_tokenizer(source, "right")
        self.model = models.load_model(source, kind, 0, device)
        self.max_length = predict.model_max_tokens(self.model, max_length)

    def __call__(self, batch: dict) -> dict:
        from distmerge.twin.router import prompt_features

        encoded = self.tokenizer([str(t) for t in batch["text"]], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt").to(self.device)
        features = prompt_features(self.model, encoded["input_ids"], encoded["attention_mask"])
        return {"task": batch["task"], "features": features.cpu().numpy()}


def model_kind(config: dict | None) -> str:
    """What the evaluator loads the shared expert as: a sequence classifier for encoders, else a causal LM."""
    architectures = (config or {}).get("architectures") or [""]
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)
    return "perplexity" if causal else "classify"


def check_field(path: Path, field: str, task: str) -> None:
    """The prompt column is in the task's data (its first row or schema), before Ray starts."""
    first = path if path.is_file() else next((p for p in sorted(path.iterdir()) if p.suffix in
                                              (".jsonl", ".json", ".parquet")), None)
    if first is None:
        raise InputError(f"router.data.{task}: no jsonl/json/parquet file in '{path}'")
    if first.suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(str(first)).names
    else:
        with open(first, encoding="utf-8") as handle:
            line = next((line for line in handle if line.strip()), None)
        try:
            row = json.loads(line) if line is not None else None
        except ValueError as exc:
            raise InputError(f"router.data.{task}: '{first}' is not JSON lines ({exc})") from None
        if not isinstance(row, dict):
            raise InputError(f"router.data.{task}: '{first}' has no JSON object rows")
        columns = list(row)
    if field not in columns:
        raise InputError(f"router.data.{task}: '{first}' has no column '{field}' (router.field; columns: "
                         f"{', '.join(columns[:8])})")


def _task_dataset(path: Path, task_index: int, options: RouterConfig):
    import ray.data

    read = {"num_cpus": 0.25}
    if path.suffix == ".parquet" or (path.is_dir() and any(p.suffix == ".parquet" for p in path.iterdir())):
        dataset = ray.data.read_parquet(str(path), columns=[options.field], **read)
    else:
        dataset = ray.data.read_json(str(path), file_extensions=["json", "jsonl"], **read)
    field = options.field

    def label(batch: dict) -> dict:
        texts = batch[field]
        return {"text": np.asarray([str(t) for t in texts], dtype=object),
                "task": np.full(len(texts), task_index, dtype=np.int64)}

    return dataset.limit(options.max_samples).map_batches(label, batch_format="numpy", num_cpus=0.25)


def compute_features(shared_folder: Path, tasks: tuple[str, ...], options: RouterConfig, device: str = "auto"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, hidden] float32, task index [N]) of every task's router samples, in file order."""
    import ray

    from distmerge.evaluate.options import EvalOptions
    from distmerge.evaluate.workers import actor_resources
    from distmerge.io.checkpoint import Checkpoint

    paths = {task: Path(options.data[task]).expanduser() for task in tasks}
    for task, path in paths.items():
        check_field(path, options.field, task)
    config = Checkpoint(str(shared_folder), "shared").config
    tokenizer = str(Path(options.tokenizer).expanduser()) if options.tokenizer else None
    source = ModelSource.of(shared_folder, tokenizer=tokenizer)
    device, num_cpus, num_gpus = actor_resources(EvalOptions(workers=options.workers, device=device))
    datasets = [_task_dataset(paths[task], i, options) for i, task in enumerate(tasks)]
    dataset = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    dataset.context.execution_options.preserve_order = True
    features = dataset.map_batches(
        FeatureWorker, fn_constructor_kwargs={"source": source, "kind": model_kind(config),
                                              "max_length": options.max_length, "device": device,
                                              "num_cpus": num_cpus},
        batch_size=options.feature_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.workers), num_cpus=num_cpus, num_gpus=num_gpus or None)
    rows, labels = [], []
    for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(np.asarray(batch["features"], dtype=np.float32))
        labels.append(np.asarray(batch["task"], dtype=np.int64))
    if not rows:
        raise InputError("router.data: no samples")
    labels_all = np.concatenate(labels)
    for i, task in enumerate(tasks):
        if not (labels_all == i).any():
            raise InputError(f"router.data.{task}: no samples in '{paths[task]}'")
    return np.concatenate(rows), labels_all
