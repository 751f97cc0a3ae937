"""``distmerge twin build|task`` (registered by ``distmerge.cli``); ``distmerge eval TWIN_FOLDER`` routes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distmerge.cli_support import fail as _fail
from distmerge.errors import DistmergeError


def build_cmd(
    config: Path = typer.Argument(..., help="twin.yaml: base_model, models, and shared / exclusive / router sections"),
    out: Path = typer.Option(..., "--out", "-o", help="twin folder to write"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="Ray workers (default: CPUs)"),
    device: str = typer.Option("auto", "--device", help="router features: auto | cpu | cuda"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address, or 'auto'; default: embedded"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars"),
) -> None:
    """Shared expert (an engine merge), compressed exclusive parts per layer group on Ray, and the router."""
    from distmerge.evaluate.runner import quiet_ray_data
    from distmerge.twin.builder import build

    if not progress:
        quiet_ray_data()  # the router features' Ray Data run logs every stage otherwise
    try:
        result = build(config, out, workers=workers, address=address, force=force, progress=progress, device=device)
    except DistmergeError as exc:
        _fail(exc)
    typer.echo(result.summary())


def task_cmd(
    folder: Path = typer.Argument(..., help="a twin folder (distmerge twin build)"),
    task: str = typer.Option(..., "--task", "-t", help="the task whose exclusive part is added"),
    out: Path = typer.Option(..., "--out", "-o", help="output model folder"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
) -> None:
    """theta* + E_TASK as a plain Hugging Face folder (oracle routing)."""
    from distmerge.twin.task import write_task_model

    try:
        path = write_task_model(folder, task, out, force=force)
    except DistmergeError as exc:
        _fail(exc)
    typer.echo(f"wrote {path}: the shared expert plus the exclusive part of '{task}'")


def register(app: typer.Typer) -> None:
    twin_app = typer.Typer(no_args_is_help=True, help=(
        "Twin-Merging: `build` a twin folder (shared expert, low-rank exclusive parts, router); `task` writes one "
        "task's model; `distmerge eval TWIN_FOLDER` evaluates with per-sample routing."))
    twin_app.command("build")(build_cmd)
    twin_app.command("task")(task_cmd)
    app.add_typer(twin_app, name="twin")
