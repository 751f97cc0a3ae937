"""Evaluation on Ray Data: rows stream from the data file through a pool of model actors to per-row scores, and the
driver reduces them to the task's metrics while it writes the per-example table.

```
read_json / read_parquet / read_text (or from_items, a hub dataset)  -> limit
  -> map_batches(prepare)                      tasks: the task's prompt template, reference, tests
  -> map_batches(ModelWorker, ActorPoolStrategy(size=workers))
                                               actors: load the model once; generate / classify / score tokens
  -> map_batches(score)                        tasks: answer extraction, exact match, sandboxed code runs
  -> driver: iter_batches -> Reducer (metrics) + RowWriter (parquet), in file order
```

Order is preserved (``preserve_order`` on this dataset only), so row ``index`` is the position in the data file and
a run is reproducible. Nothing holds the whole dataset: blocks stream, the driver keeps running sums (and, for
GLUE, one float per row for the correlation metrics). Actors take a fractional CPU share so the read, prepare and
score tasks always find a CPU (a pool holding every CPU starves the upstream tasks and hangs), one GPU each where
the cluster has GPUs, and set torch's thread count to their share.

The in-process API is ``evaluate(model, task, data, ...)``; ``model`` is a folder, a ``ModelSource`` (for weights
held as tensors: ``ModelSource.from_state_dict(config_dict, state_dict, tokenizer)``) or a loaded transformers
model. See ``distmerge.evaluate.models`` for what a source may carry (GLUE heads, EMR task models).

The stages are in ``workers`` (with the actors' resources), the readers in ``data``, the options in ``options``;
this module chains them and reduces the results.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from distmerge.errors import InputError
from distmerge.evaluate.data import open_dataset
from distmerge.evaluate.models import ModelSource
from distmerge.evaluate.options import LIGHT_TASK_CPUS, EvalOptions
from distmerge.evaluate.tasks import Reducer, Task, get_task
from distmerge.evaluate.workers import ModelWorker, actor_resources, prepare_batch, score_batch


@dataclass
class EvalResult:
    task: str
    model: str
    data: str
    metrics: dict[str, float]
    primary: str
    examples: int
    seconds: float
    rows_path: str | None = None
    isolation: str | None = None  # code tasks: the sandbox mode used
    rows: Any = None  # pandas DataFrame when keep_rows=True

    @property
    def score(self) -> float:
        return self.metrics[self.primary]

    def to_dict(self) -> dict[str, Any]:
        out = {"task": self.task, "model": self.model, "data": self.data, "primary": self.primary,
               "score": _json_number(self.score), "metrics": {k: _json_number(v) for k, v in self.metrics.items()},
               "examples": self.examples, "seconds": round(self.seconds, 3)}
        if self.rows_path:
            out["rows"] = self.rows_path
        if self.isolation:
            out["sandbox"] = self.isolation
        return out


def _json_number(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


# --- driver ----------------------------------------------------------------------------------------

def preflight(source: ModelSource, task: Task) -> None:
    """Checks on the driver before any actor starts: the tokenizer loads, the model has a config, a GLUE head has
    the task's label count (an actor failing in ``__init__`` reports far less clearly)."""
    from transformers import AutoConfig

    from distmerge.evaluate.models import config_folder, load_tokenizer

    load_tokenizer(source, "left")
    if source.path is None:
        return
    from distmerge.io.lora import open_checkpoint

    open_checkpoint(source.path, source.path).close()  # every weight file's header (an adapter's too), before an actor reads one
    try:
        config = AutoConfig.from_pretrained(config_folder(source.path))
    except Exception as exc:
        raise InputError(f"model '{source.path}': no loadable config.json ({exc})") from None
    if task.kind == "classify":
        labels = AutoConfig.from_pretrained(source.head_from).num_labels if source.head_from else config.num_labels
        if labels != task.num_labels:
            raise InputError(f"model '{source.head_from or source.path}' has {labels} label(s), task '{task.name}' "
                             f"needs {task.num_labels}" + ("" if source.head_from else
                                                           "; pass the task's fine-tuned model as head_from"))


def run(source: ModelSource, task: Task, data: Any, options: EvalOptions, out: Path | None = None,
        keep_rows: bool = False, on_batch: Callable[[int], None] | None = None) -> EvalResult:
    """Evaluate ``source`` on ``task`` (Ray must be initialized). Writes ``out/<task>.parquet`` when ``out`` is set;
    ``on_batch(rows scored so far)`` is called as results arrive."""
    import ray

    from distmerge.engine.ray_session import user_errors
    from distmerge.evaluate.report import RowWriter
    from distmerge.evaluate.sandbox import isolation

    started = time.monotonic()
    preflight(source, task)
    # On the driver, before any row is generated: a machine that refuses the sandbox's namespaces says so now.
    sandbox_mode = isolation(options.sandbox.allow_unsandboxed) if task.runs_code else None
    device, num_cpus, num_gpus = actor_resources(options)
    dataset, data_name = open_dataset(data, task, rows_per_block=4 * options.batch_size)
    ctx = dataset.context
    ctx.execution_options.preserve_order = True
    if options.progress is not None:
        ctx.enable_progress_bars = options.progress
    if options.limit:
        dataset = dataset.limit(options.limit)
    prepared = dataset.map_batches(prepare_batch, fn_kwargs={"task_name": task.name}, batch_format="numpy",
                                   num_cpus=LIGHT_TASK_CPUS)
    inferred = prepared.map_batches(
        ModelWorker, fn_constructor_kwargs={"source": source, "task_name": task.name, "options": options,
                                            "device": device, "num_cpus": num_cpus},
        batch_size=options.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.workers), num_cpus=num_cpus, num_gpus=num_gpus or None)
    scored = inferred.map_batches(score_batch, fn_kwargs={"task_name": task.name, "sandbox": options.sandbox},
                                  batch_format="numpy", num_cpus=LIGHT_TASK_CPUS)

    reducer = Reducer(task)
    writer = RowWriter(out / f"{task.name}.parquet", task.kind) if out is not None else None
    kept = []
    try:
        with user_errors():
            for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                table = _add_index(batch, reducer.count)
                reducer.add(table["score"].to_pylist(), table["prediction"].to_pylist(), table["label"].to_pylist(),
                            table["nll"].to_pylist(), table["tokens"].to_pylist())
                if writer is not None:
                    writer.write(table)
                if keep_rows:
                    kept.append(table)
                if on_batch is not None:
                    on_batch(reducer.count)
        rows_path = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    if reducer.count == 0:
        raise InputError(f"task '{task.name}': no rows in '{data_name}'")
    rows = None
    if keep_rows:
        import pyarrow as pa

        from distmerge.evaluate.report import select_columns

        rows = select_columns(pa.concat_tables(kept), task.kind).to_pandas()
    return EvalResult(task.name, source.describe(), data_name, reducer.metrics(), task.primary(), reducer.count,
                      time.monotonic() - started, str(rows_path) if rows_path else None,
                      sandbox_mode, rows)


def _add_index(table, start: int):
    import pyarrow as pa

    return table.append_column("index", pa.array(range(start, start + table.num_rows), type=pa.int64()))


@contextlib.contextmanager
def task_model_source(source: ModelSource, scratch: Path | None = None) -> Iterator[ModelSource]:
    """For an EMR merge and ``task_model``: the task's model materialized (``distmerge.emr_task``) in a temporary
    folder that is removed afterwards; any other source as it is."""
    if source.task_model is None:
        yield source
        return
    if source.path is None:
        raise InputError("task_model needs an EMR merge folder, not in-memory tensors")
    from distmerge.emr_task import materialize_task

    root = Path(tempfile.mkdtemp(prefix="distmerge-emr-task-", dir=str(scratch) if scratch else None))
    try:
        path = materialize_task(source.path, source.task_model, root / source.task_model)
        tokenizer = source.tokenizer
        yield replace(source, path=str(path), task_model=None, tokenizer=tokenizer)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def evaluate(model: Any, task: str, data: Any = None, *, tokenizer: Any = None, head_from: str | None = None,
             task_model: str | None = None, out: str | Path | None = None, address: str | None = None,
             keep_rows: bool = False, on_batch: Callable[[int], None] | None = None, **options: Any) -> EvalResult:
    """Score ``model`` on ``task`` over ``data`` (a jsonl/json/parquet/txt file or folder, a list of row dicts, a Ray
    Dataset, or None for the task's hub dataset). ``options`` are ``EvalOptions`` fields (batch_size, workers, limit,
    max_new_tokens, ...). Uses the running Ray instance, or starts an embedded one for the call."""
    from distmerge.engine.ray_session import ray_session

    the_task = get_task(task)
    eval_options = EvalOptions(**options)
    with ray_session(address):
        overrides = {k: v for k, v in (("head_from", head_from), ("task_model", task_model)) if v is not None}
        source = ModelSource.of(model, tokenizer, **overrides)
        out_dir = results_dir(out)
        with task_model_source(source, out_dir) as resolved:
            return run(resolved, the_task, data, eval_options, out_dir, keep_rows, on_batch)


def results_dir(out: str | Path | None) -> Path | None:
    if out is None:
        return None
    from distmerge.io.writer import results_folder

    return results_folder(out, InputError)


def quiet_ray_data() -> None:
    """Ray Data logs every execution (and that progress bars are off); the CLI shows only its errors."""
    import ray.data  # noqa: F401  (configures its loggers on import; set the level after that)

    logging.getLogger("ray.data").setLevel(logging.ERROR)


def evaluate_many(jobs: Sequence[tuple[ModelSource, Task, Any, EvalOptions]], out: Path | None,
                  on_result=None) -> list[EvalResult]:
    """Run several (source, task, data, options) jobs one after the other in the current Ray session."""
    results = []
    for source, task, data, options in jobs:
        with task_model_source(source, out) as resolved:
            result = run(resolved, task, data, options, out)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
