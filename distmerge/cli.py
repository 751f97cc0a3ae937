"""The ``distmerge`` command: thin wrappers that parse, call the API, print one line on a user error."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from distmerge.cli_support import fail as _fail
from distmerge.errors import DistmergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Merge fine-tuned models layer-wise on Ray.")


@app.command("merge")
def merge_cmd(
    config: Path = typer.Argument(..., help="merge.yaml (distmerge's or mergekit's format)"),
    out: Path = typer.Option(..., "--out", "-o", help="output model folder"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="merge actors (default: cluster CPUs)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address, or 'auto'; default: embedded"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    placement: str = typer.Option("pack", "--placement",
                                  help="pack: fill nodes in turn | spread: workers on as many nodes as possible"),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="reuse the verified shards an interrupted run of the same merge left"),
) -> None:
    """Merge the models a config names into a Hugging Face model folder.

    The output is written beside the target and renamed into place at the end: a failed run leaves nothing;
    an interrupted run (Ctrl-C, a killed driver) keeps its finished shards hidden beside the target, and
    rerunning the same command reuses those whose checksums still match.
    """
    from distmerge.engine.driver import merge

    try:
        result = merge(config, out, workers=workers, address=address, force=force, progress=not quiet,
                       placement=placement, resume=resume)
    except DistmergeError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.secho("interrupted: rerun the same command to resume from the finished shards", err=True)
        raise typer.Exit(code=130)
    typer.echo(result.summary())


@app.command("emr-task")
def emr_task_cmd(
    merged: Path = typer.Argument(..., help="folder written by an EMR merge"),
    task: str = typer.Option(..., "--task", help="the task (model name) to materialize"),
    out: Path = typer.Option(..., "--out", "-o"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Write one task's model from an EMR merge: base + rescaler * (mask * unified task vector)."""
    from distmerge.emr_task import materialize_task

    try:
        path = materialize_task(merged, task, out, force=force)
    except DistmergeError as exc:
        _fail(exc)
    typer.echo(f"wrote task '{task}' to {path}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("distmerge-demo"), "--out", "-o", help="folder for the demo models and the merge"),
    method: str = typer.Option("ties", "--method", help="weight_average|task_arithmetic|ties|dare|breadcrumbs|della|emr"),
    workers: int = typer.Option(2, "--workers", "-w", min=1),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Build a small Llama base and two experts, merge them on an embedded Ray, load and run the result."""
    from distmerge.demo import run_demo

    try:
        for line in run_demo(out, method=method, workers=workers, force=force):
            typer.echo(line)
    except DistmergeError as exc:
        _fail(exc)


# Each capability keeps its commands next to its code and adds them here through ``register(app)``.
_COMMAND_MODULES = (
    "distmerge.fda.cli",
    "distmerge.evaluate.cli",
    "distmerge.sweep_cli",
    "distmerge.jobs_cli",
    "distmerge.lora_cli",
    "distmerge.measure.cli",
    "distmerge.twin.cli",
    "distmerge.adamerging.cli",
)


def _register_command_modules() -> None:
    import importlib
    import importlib.util

    for name in _COMMAND_MODULES:
        package, _, _ = name.rpartition(".")
        if package != "distmerge" and importlib.util.find_spec(package) is None:
            continue
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(app)


_register_command_modules()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    sys.exit(main())
