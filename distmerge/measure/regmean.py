"""``distmerge measure regmean``: each expert's Gram matrices G = sum x x^T of the inputs of its linear layers,
on its own task's data, for the ``regmean`` merge.

```
read_json / read_parquet / read_text  -> limit            Ray Data: rows stream from the data file
  -> driver: iter_batches -> GramActor.add (round robin)   model actors: tokenize, forward, hooks on every
                                                           Linear (and GPT-2 Conv1D) sum x x^T over the
                                                           non-padding tokens, in float64, on the model's device
  -> GramActor.totals, summed in actor order               one reduction per task
  -> stats/<task>/grams.safetensors, then manifest.json    the commit mark (distmerge.measure.stats)
```

Only the running sums live in an actor (one [in, in] float64 matrix per layer); batches reach it as text, so
nothing else crosses the object store. A task whose manifest matches its config key is skipped, so an
interrupted run resumes with the tasks it lacks.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from distmerge.errors import InputError, OutputError
from distmerge.measure import stats
from distmerge.measure.config import MeasureConfig, MeasureTask, load_measure_config

LOG = logging.getLogger(__name__)
KIND = "regmean"
IN_FLIGHT_PER_ACTOR = 2  # one batch computing, one waiting: the actor never idles, the driver holds little
MODEL_KINDS = {"causal_lm": "perplexity", "sequence_classification": "classify", "encoder": "encoder"}  # evaluate.models


@dataclass
class MeasureResult:
    out: Path
    tasks: int
    skipped: int
    tokens: dict[str, int]
    seconds: float

    def summary(self) -> str:
        measured = ", ".join(f"{name} {count} tokens" for name, count in self.tokens.items()) or "nothing new"
        return (f"measured regmean statistics into {self.out}: {self.tasks - self.skipped} task(s) "
                f"({measured}), {self.skipped} already committed, in {self.seconds:.1f}s")


class TextColumn:
    """What ``evaluate.data.open_dataset`` asks of a task: the columns its rows need."""

    hub = None

    def __init__(self, task: MeasureTask):
        self.name, self.field = task.name, task.text_field

    def check_columns(self, columns, where: str) -> None:
        if self.field not in columns:
            raise InputError(f"{where}: no column '{self.field}' (the text_field of task '{self.name}'; "
                             f"columns: {', '.join(map(str, columns))})")


def linear_modules(model, stored: set[str]) -> dict[str, tuple[int, bool]]:
    """{module name: (input features, weight stored transposed)} of the layers RegMean solves: nn.Linear, and
    transformers' Conv1D (GPT-2, weight [in, out]), whose weight the checkpoint stores under the same name."""
    import torch

    found = {}
    for name, module in model.named_modules():
        if f"{name}.weight" not in stored:
            continue  # tied heads and modules the checkpoint names otherwise
        if isinstance(module, torch.nn.Linear):
            found[name] = (module.in_features, False)
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            found[name] = (module.weight.shape[0], True)
    return found


class GramAccumulator:
    """Forward hooks summing x x^T over the tokens the attention mask keeps, per layer, in float64."""

    def __init__(self, model, modules: dict[str, tuple[int, bool]]):
        import torch

        self.device = next(model.parameters()).device
        self.totals = {name: torch.zeros((features, features), dtype=torch.float64, device=self.device)
                       for name, (features, _) in modules.items()}
        self.tokens = dict.fromkeys(modules, 0)
        self.mask = None
        owned = dict(model.named_modules())
        self.handles = [owned[name].register_forward_hook(self._hook(name)) for name in modules]

    def _hook(self, name: str):
        import torch

        def hook(module, inputs, output):
            x = inputs[0]
            if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
                rows = x[self.mask]  # padding tokens excluded
            else:
                rows = x.reshape(-1, x.shape[-1])  # a head on pooled states: one row per example
            wide = rows.to(torch.float64)
            self.totals[name].addmm_(wide.T, wide)
            self.tokens[name] += int(wide.shape[0])

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class GramActor:
    """One model actor: loads the expert once, then adds the Grams of every batch of texts it is given."""

    def __init__(self, model_path: str, stored: list[str], config: MeasureConfig, device: str, num_cpus: float):
        import torch
        from transformers.utils import logging as hf_logging

        from distmerge.evaluate import models, predict
        from distmerge.evaluate.models import ModelSource

        torch.set_num_threads(max(1, int(num_cpus)))
        hf_logging.disable_progress_bar()
        source = ModelSource(path=model_path, dtype=config.dtype)
        self.device = device
        self.tokenizer = models.load_tokenizer(source, "right")
        self.model = models.load_model(source, MODEL_KINDS[config.model_class], 0, device)
        self.max_length = predict.model_max_tokens(self.model, config.max_length)
        self.modules = linear_modules(self.model, set(stored))
        if not self.modules:
            raise InputError(f"model '{model_path}': no linear layer whose weight the checkpoint stores by its "
                             f"module name (model_class '{config.model_class}' names them otherwise?)")
        self.sums = GramAccumulator(self.model, self.modules)

    def layers(self) -> dict[str, tuple[int, bool]]:
        return self.modules

    def add(self, texts: list[str]) -> int:
        """The texts' non-padding tokens, after adding their Grams."""
        import torch

        from distmerge import telemetry

        encoded = self.tokenizer([str(t) for t in texts], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt").to(self.device)
        if getattr(self.model.config, "type_vocab_size", 2) <= 1:  # RoBERTa: one segment type
            encoded.pop("token_type_ids", None)
        self.sums.mask = encoded["attention_mask"].bool()
        with torch.inference_mode():
            self.model(**encoded)
        tokens = int(self.sums.mask.sum())
        telemetry.count("distmerge_measure_tokens", tokens, kind=KIND)
        return tokens

    def totals(self) -> tuple[dict[str, Any], dict[str, int]]:
        return {name: value.cpu() for name, value in self.sums.totals.items()}, dict(self.sums.tokens)


LIGHT_TASK_CPUS = 0.5  # Ray Data's read tasks beside the actors


def room_for_two_pools(workers: int, actor_cpus: float, actor_gpus: float, cpus: float, gpus: float) -> bool:
    """Whether the next task's actors can load while this task's run, and Ray Data's reads still find a CPU. Where
    they cannot, the next task's actors would take the CPUs this task's reads wait for, and nothing would move."""
    fits_cpus = 2 * workers * actor_cpus + LIGHT_TASK_CPUS <= cpus + 1e-9
    return fits_cpus and 2 * workers * actor_gpus <= gpus + 1e-9


def start_actors(task: MeasureTask, config: MeasureConfig, checkpoint) -> list:
    """The task's model actors, loading its expert (they load while earlier tasks are measured)."""
    import ray

    from distmerge.evaluate.options import EvalOptions
    from distmerge.evaluate.workers import actor_resources

    device, num_cpus, num_gpus = actor_resources(EvalOptions(workers=config.workers, device=config.device))
    remote = ray.remote(GramActor)
    stored = sorted(checkpoint.tensors)
    return [remote.options(name=f"distmerge-measure-{task.name}-{i}", num_cpus=num_cpus,
                           num_gpus=num_gpus or None).remote(task.model, stored, config, device, num_cpus)
            for i in range(config.workers)]


def measure_task(task: MeasureTask, config: MeasureConfig, key: str, fingerprint: dict, checkpoint, out: Path,
                 actors: list, progress: bool) -> int:
    """Stream one task's rows through its actors, reduce their sums and commit them; the tokens measured."""
    from tqdm import tqdm

    from distmerge.dtypes import torch_dtype
    from distmerge.engine.ray_session import get
    from distmerge.evaluate.data import open_dataset

    dataset, data_name = open_dataset(task.data, TextColumn(task))
    if task.limit:
        dataset = dataset.limit(task.limit)
    dataset.context.execution_options.preserve_order = True  # the same rows reach the same actor on a rerun
    layers = get(actors[0].layers.remote())
    bar = tqdm(total=task.limit, desc=f"measure {task.name}", unit="row", disable=not progress, file=sys.stderr)
    pending: dict[Any, int] = {}
    for index, batch in enumerate(dataset.iter_batches(batch_size=config.batch_size, batch_format="numpy")):
        texts = [str(t) for t in batch[task.text_field]]
        while len(pending) >= IN_FLIGHT_PER_ACTOR * len(actors):
            _drain(pending, bar)
        pending[actors[index % len(actors)].add.remote(texts)] = len(texts)
    while pending:
        _drain(pending, bar)
    bar.close()
    parts = get([actor.totals.remote() for actor in actors])  # in actor order: a fixed reduction order
    totals, tokens = parts[0]
    for more_totals, more_tokens in parts[1:]:
        for name in totals:
            totals[name] = totals[name] + more_totals[name]
            tokens[name] += more_tokens[name]
    if not any(tokens.values()):
        raise InputError(f"task '{task.name}': no tokens in '{data_name}' (empty texts?)")
    dtype = torch_dtype(config.stats_dtype)
    entries = {name: stats.layer_entry(checkpoint.read(f"{name}.weight"), features, tokens[name], transposed)
               for name, (features, transposed) in layers.items()}
    manifest = {"kind": KIND, "task": task.name, "model": task.model, "fingerprint": fingerprint, "config_key": key,
                "data": data_name, "text_field": task.text_field, "max_length": config.max_length,
                "stats_dtype": config.stats_dtype, "tokens": max(tokens.values()), "layers": entries}
    stats.commit_task(out, task.name, {name: value.to(dtype) for name, value in totals.items()}, manifest)
    return max(tokens.values())


def _drain(pending: dict, bar) -> None:
    import ray

    from distmerge.engine.ray_session import get

    done, _ = ray.wait(list(pending), num_returns=1)
    for ref in done:
        get(ref)
        bar.update(pending.pop(ref))


def measure(config: MeasureConfig | str | Path | dict, out: str | Path, *, workers: int | None = None,
            address: str | None = None, progress: bool = True,
            on_task: Callable[[str, int], None] | None = None) -> MeasureResult:
    """RegMean statistics of every task into ``out`` (created if needed; committed tasks are skipped)."""
    from distmerge.engine.ray_session import ray_session
    from distmerge.evaluate.data import check_data
    from distmerge.evaluate.runner import quiet_ray_data
    from distmerge.io import writer
    from distmerge.io.lora import open_checkpoint

    began = time.perf_counter()
    if not isinstance(config, MeasureConfig):
        config = load_measure_config(config, KIND)
    if workers is not None:
        from dataclasses import replace

        config = replace(config, workers=workers)
    out = writer.results_folder(out, OutputError, "statistics folder")
    todo = []
    for task in config.tasks:  # every header and data file checked before a cluster starts
        checkpoint = open_checkpoint(task.model, task.name)  # a LoRA expert (BASE+ADAPTER) too
        fingerprint = stats.model_fingerprint(checkpoint)
        check_data(task.data, TextColumn(task))
        key = config.task_key(task, fingerprint)
        if not stats.committed(out, task.name, key):
            todo.append((task, key, fingerprint, checkpoint))
    import yaml

    (out / "measure.yaml").write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))  # for the record
    tokens = {}
    if todo:
        import ray

        from distmerge.engine.ray_session import user_errors

        with ray_session(address), user_errors():
            quiet_ray_data()
            pools: dict[int, list] = {}

            def pool(index: int) -> list:
                if index not in pools:
                    task, _, _, checkpoint = todo[index]
                    pools[index] = start_actors(task, config, checkpoint)
                return pools[index]

            from distmerge.engine.ray_session import cluster_cpus, cluster_gpus
            from distmerge.evaluate.options import EvalOptions
            from distmerge.evaluate.workers import actor_resources

            _, actor_cpus, actor_gpus = actor_resources(EvalOptions(workers=config.workers, device=config.device))
            prefetch = room_for_two_pools(config.workers, actor_cpus, actor_gpus, cluster_cpus(), cluster_gpus())
            try:
                for index, (task, key, fingerprint, checkpoint) in enumerate(todo):
                    actors = pool(index)
                    if prefetch and index + 1 < len(todo):
                        pool(index + 1)  # the next expert loads while this one is measured
                    tokens[task.name] = measure_task(task, config, key, fingerprint, checkpoint, out, actors,
                                                     progress)
                    for actor in pools.pop(index):  # its resources go to the tasks still waiting
                        ray.kill(actor)
                    if on_task is not None:
                        on_task(task.name, tokens[task.name])
            finally:
                for actor in (a for actors in pools.values() for a in actors):
                    ray.kill(actor)
    writer.fsync_dir(out)
    return MeasureResult(out, len(config.tasks), len(config.tasks) - len(todo), tokens, time.perf_counter() - began)
