"""``distmerge eval``: score a model on one task or a suite, print the table, write parquet rows and a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distmerge.cli_support import address_option, one_line_errors, workers_option


def eval_cmd(
    model: Optional[Path] = typer.Argument(None, help="model folder (a merge output); optional with a suite that names it"),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="gsm8k | math | humaneval | mbpp | cola | sst2 | "
                                       "mrpc | stsb | qqp | mnli | qnli | rte | perplexity"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="jsonl / json / parquet / txt file or folder; "
                                        "default: the task's hub dataset (needs `datasets` and network)"),
    suite: Optional[Path] = typer.Option(None, "--suite", help="suite.yaml: several tasks (see distmerge.evaluate.suite)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="results folder: <task>.parquet + summary.json"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="first N examples only"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="rows per model call (default 8)"),
    workers: Optional[int] = workers_option("model actors (default 1)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="default: the task's"),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1, help="classification/perplexity tokens"),
    task_model: Optional[str] = typer.Option(None, "--task-model", help="EMR merge: evaluate this task's model"),
    head_from: Optional[Path] = typer.Option(None, "--head-from", help="GLUE: fine-tuned model whose classifier "
                                             "head replaces the merged one"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer folder (default: the model's)"),
    expert_results: Optional[Path] = typer.Option(None, "--expert-results", help="an expert run's summary.json: "
                                                  "adds normalized = merged / expert x 100"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    address: Optional[str] = address_option(),
    progress: bool = typer.Option(False, "--progress", help="Ray Data progress bars"),
    allow_unsandboxed_code: bool = typer.Option(
        False, "--allow-unsandboxed-code", help="humaneval/mbpp where the kernel refuses the sandbox's namespaces: "
        "run the generated code anyway, guarded only by an in-process audit hook (no security boundary)"),
) -> None:
    """Score a model the way the merging papers do; flags given here apply to every task of a suite."""
    with one_line_errors():
        _run(model, task, data, suite, out, limit, batch_size, workers, max_new_tokens, max_length, task_model,
             head_from, tokenizer, expert_results, device, address, progress, allow_unsandboxed_code)


def _run(model, task, data, suite, out, limit, batch_size, workers, max_new_tokens, max_length, task_model,
         head_from, tokenizer, expert_results, device, address, progress, allow_unsandboxed_code=False) -> None:
    from distmerge.engine.ray_session import ray_session
    from distmerge.errors import ConfigError
    from distmerge.evaluate import data as eval_data
    from distmerge.evaluate import report, runner, sandbox
    from distmerge.evaluate.models import ModelSource
    from distmerge.evaluate.suite import SuiteTask, load_suite
    from distmerge.evaluate.tasks import get_task

    if (task is None) == (suite is None):
        raise ConfigError("give either --task (with --data) or --suite")
    flags = {k: v for k, v in (("limit", limit), ("batch_size", batch_size), ("workers", workers),
                               ("max_new_tokens", max_new_tokens), ("max_length", max_length)) if v is not None}
    if suite is not None:
        loaded = load_suite(suite)
        entries, out = loaded.tasks, out or (Path(loaded.out) if loaded.out else None)
        default_model = str(model) if model is not None else loaded.model
        expert_results = expert_results or (Path(loaded.expert_results) if loaded.expert_results else None)
    else:
        entries = (SuiteTask(task=get_task(task).name, data=str(data) if data else None, model=None),)
        default_model = str(model) if model is not None else None
    experts = report.load_expert_scores(expert_results) if expert_results else None

    jobs = []
    for entry in entries:
        model_path = entry.model if (suite is not None and entry.model and model is None) else default_model
        if model_path is None:
            raise ConfigError(f"task '{entry.task}': no model (pass MODEL or set 'model' in the suite)")
        source = ModelSource.of(
            model_path, tokenizer=str(tokenizer) if tokenizer else entry.tokenizer,
            head_from=str(head_from) if head_from else entry.head_from,
            task_model=task_model or entry.task_model)
        options = runner.EvalOptions(**{**entry.options, **flags}, device=device, progress=progress,
                                     sandbox=sandbox.SandboxLimits(allow_unsandboxed=allow_unsandboxed_code))
        jobs.append((source, get_task(entry.task), entry.data, options))

    for source, the_task, the_data, _ in jobs:  # user mistakes first, before a Ray cluster starts
        runner.preflight(source, the_task)
        eval_data.check_data(the_data, the_task)
    if any(the_task.runs_code for _, the_task, _, _ in jobs):
        _check_sandbox(allow_unsandboxed_code)
    out_dir = runner.results_dir(out)
    if not progress:
        runner.quiet_ray_data()

    def show(result):
        typer.echo(f"{result.task}: {result.primary} {report.fmt(result.score)} ({result.examples} examples, "
                   f"{result.seconds:.1f} s)" + (f", sandbox: {result.isolation}" if result.isolation else ""))

    with ray_session(address):
        results = runner.evaluate_many(jobs, out_dir, on_result=show)
    data_summary = report.summary(results, experts)
    typer.echo("")
    typer.echo(report.table(data_summary))
    if out_dir is not None:
        path = report.write_summary(out_dir, data_summary)
        typer.echo(f"\nwrote {path} and {', '.join(f'{r.task}.parquet' for r in results)}")


def _check_sandbox(allow_unsandboxed_code: bool) -> None:
    """Refuses (SandboxUnavailable) where generated code would run without namespaces and nobody asked for that."""
    from distmerge.evaluate import sandbox

    if sandbox.isolation(allow_unsandboxed_code) != "namespaces":
        typer.secho(f"warning: generated code runs with only an audit hook, no sandbox "
                    f"({sandbox.namespaces_refused()})", err=True, fg=typer.colors.YELLOW)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
