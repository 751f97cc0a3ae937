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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from distmerge import validate
from distmerge.errors import InputError
from distmerge.evaluate.models import ModelSource
from distmerge.evaluate.sandbox import SandboxLimits
from distmerge.evaluate.tasks import GLUE_FIELDS, PREPARED_COLUMNS, Reducer, Task, get_task

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "transformers", "vllm")
LIGHT_TASK_CPUS = 0.25  # read, prepare and score tasks: mostly waiting on I/O or a sandboxed child


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = 8
    workers: int = 1
    limit: int | None = None
    max_new_tokens: int | None = None  # default: the task's (the papers' limits)
    max_length: int | None = None  # classify/perplexity tokens per input; default: the task's, capped by the model
    device: str = "auto"  # auto: cuda when the cluster has GPUs
    backend: str = "auto"  # generation: auto = vllm when importable and on GPU, else transformers
    cpus_per_worker: float | None = None  # default: a share that leaves room for the light tasks
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    progress: bool | None = None  # Ray Data progress bars; None: Ray Data's default

    def __post_init__(self):
        for name in ("batch_size", "workers"):
            validate.number(name, getattr(self, name), 1, integer=True)
        for name in ("limit", "max_new_tokens", "max_length"):
            if getattr(self, name) is not None:
                validate.number(name, getattr(self, name), 1, integer=True)
        validate.choice("device", self.device, DEVICES)
        validate.choice("backend", self.backend, BACKENDS)
        if self.cpus_per_worker is not None:
            validate.number("cpus_per_worker", self.cpus_per_worker, 0, lo_open=True)


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


# --- data ------------------------------------------------------------------------------------------

def check_data(data: Any, task: Task) -> None:
    """A data file exists, has a known format and the task's fields (from its first row or its schema); without
    Ray, so a mistake is reported before a cluster starts."""
    import importlib.util

    import ray.data

    if data is None and (task.hub is None or importlib.util.find_spec("datasets") is None):
        _hub_dataset(task)  # raises the message that says to pass --data
    if data is None or isinstance(data, ray.data.Dataset):
        return  # hub datasets and Ray Datasets are checked row by row in prepare
    if isinstance(data, (list, tuple)):
        if not data:
            raise InputError(f"task '{task.name}': no rows to evaluate")
        task.check_columns(list(data[0]), "the first row")
        return
    path = Path(data).expanduser()
    if not path.exists():
        raise InputError(f"data file '{path}' does not exist")
    suffix = _suffix(path)
    first_file = path if path.is_file() else sorted(p for p in path.iterdir() if p.suffix == suffix)[0]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(str(first_file)).names
    elif suffix in (".txt", ".text"):
        columns = ["text"]
    elif path.is_file() and _starts_with_array(path):
        columns = list(_json_array(path)[0])
    else:
        columns = _first_json_row(first_file)
    task.check_columns(columns, f"data '{path}'")


def open_dataset(data: Any, task: Task):
    """A Ray Dataset of the task's input rows (checked by ``check_data``), and a name for it."""
    import ray.data

    check_data(data, task)
    read = {"num_cpus": LIGHT_TASK_CPUS}
    if data is None:
        return _hub_dataset(task), f"hub:{task.hub[0] if task.hub else task.name}"
    if isinstance(data, ray.data.Dataset):
        return data, "dataset"
    if isinstance(data, (list, tuple)):
        return ray.data.from_items(list(data)), f"{len(data)} rows"
    path = Path(data).expanduser()
    suffix = _suffix(path)
    if suffix == ".parquet":
        return ray.data.read_parquet(str(path), **read), str(path)
    if suffix in (".txt", ".text"):
        return ray.data.read_text(str(path), **read), str(path)
    if path.is_file() and _starts_with_array(path):  # one JSON array: small reference files (human-eval style)
        return ray.data.from_items(_json_array(path)), str(path)
    return ray.data.read_json(str(path), file_extensions=["json", "jsonl"], **read), str(path)


def _json_array(path: Path) -> list:
    try:
        rows = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"data file '{path}': invalid JSON ({exc})") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"data file '{path}': expected a non-empty array of JSON objects")
    return rows


def _first_json_row(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"data file '{path}': the first row is not JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise InputError(f"data file '{path}': rows must be JSON objects")
                return list(row)
    raise InputError(f"data file '{path}': no rows")


def _suffix(path: Path) -> str:
    if path.is_dir():
        suffixes = {p.suffix for p in path.iterdir() if p.is_file() and not p.name.startswith(".")}
        known = suffixes & {".parquet", ".jsonl", ".json", ".txt"}
        if len(known) != 1:
            raise InputError(f"data folder '{path}' must hold files of one format (jsonl, json, parquet or txt)")
        return known.pop()
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".json", ".txt", ".text"):
        raise InputError(f"data file '{path}': unknown format '{suffix}' (jsonl, json, parquet or txt)")
    return suffix


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4096).lstrip()[:1] == b"["


def _hub_dataset(task: Task):
    import importlib.util

    import ray.data

    if task.hub is None:
        raise InputError(f"task '{task.name}' has no known hub dataset; pass --data FILE (jsonl, json or parquet)")
    name, config, split = task.hub
    if importlib.util.find_spec("datasets") is None:
        raise InputError(f"task '{task.name}': no --data given and the 'datasets' package is not installed to fetch "
                         f"'{name}'; pass --data FILE (jsonl, json or parquet)")
    try:
        import datasets

        hf = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"task '{task.name}': could not load '{name}' from the Hugging Face Hub ({first}); offline? "
                         f"pass --data FILE (jsonl, json or parquet)") from None
    return ray.data.from_huggingface(hf)


# --- pipeline stages -------------------------------------------------------------------------------

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


# --- driver ----------------------------------------------------------------------------------------

def actor_resources(options: EvalOptions) -> tuple[str, float, float]:
    """(device, CPUs, GPUs) of one model actor of ``options.workers``."""
    from distmerge.engine.ray_session import cluster_cpus, cluster_gpus

    gpus = cluster_gpus()
    device = options.device if options.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    if device == "cuda" and gpus <= 0:
        raise InputError("device 'cuda' asked for, but the Ray cluster has no GPU")
    # Fractional CPUs so the light tasks always find room beside the actors (see the module docstring).
    num_cpus = options.cpus_per_worker or min(1.0, cluster_cpus() / (options.workers + 1))
    num_gpus = min(1.0, gpus / options.workers) if device == "cuda" else 0.0
    return device, num_cpus, num_gpus


def preflight(source: ModelSource, task: Task) -> None:
    """Checks on the driver before any actor starts: the tokenizer loads, the model has a config, a GLUE head has
    the task's label count (an actor failing in ``__init__`` reports far less clearly)."""
    from transformers import AutoConfig

    from distmerge.evaluate.models import load_tokenizer

    load_tokenizer(source, "left")
    if source.path is None:
        return
    from distmerge.io.checkpoint import Checkpoint

    Checkpoint(source.path, source.path).close()  # every weight file's header, before an actor reads one
    try:
        config = AutoConfig.from_pretrained(source.path)
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
    dataset, data_name = open_dataset(data, task)
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
