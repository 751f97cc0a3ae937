"""``distmerge twin build|task`` (registered by ``distmerge.cli``); ``distmerge eval TWIN_FOLDER`` routes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distmerge.cli_support import add_group, address_option, force_option, one_line_errors, out_option, workers_option


def build_cmd(
    config: Path = typer.Argument(..., help="twin.yaml: base_model, models, and shared / exclusive / router sections"),
    out: Path = out_option("twin folder to write"),
    workers: Optional[int] = workers_option("Ray workers (default: CPUs)"),
    device: str = typer.Option("auto", "--device", help="router features: auto | cpu | cuda"),
    address: Optional[str] = address_option(),
    force: bool = force_option(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars"),
) -> None:
    """Shared expert (an engine merge), compressed exclusive parts per layer group on Ray, and the router."""
    from distmerge.evaluate.runner import quiet_ray_data
    from distmerge.twin.builder import build

    if not progress:
        quiet_ray_data()  # the router features' Ray Data run logs every stage otherwise
    with one_line_errors():
        result = build(config, out, workers=workers, address=address, force=force, progress=progress, device=device)
    typer.echo(result.summary())


def task_cmd(
    folder: Path = typer.Argument(..., help="a twin folder (distmerge twin build)"),
    task: str = typer.Option(..., "--task", "-t", help="the task whose exclusive part is added"),
    out: Path = out_option("output model folder"),
    force: bool = force_option(),
) -> None:
    """theta* + E_TASK as a plain Hugging Face folder (oracle routing)."""
    from distmerge.twin.task import write_task_model

    with one_line_errors():
        path = write_task_model(folder, task, out, force=force)
    typer.echo(f"wrote {path}: the shared expert plus the exclusive part of '{task}'")


def register(app: typer.Typer) -> None:
    add_group(app, "twin", "Twin-Merging: `build` a twin folder (shared expert, low-rank exclusive parts, router); "
              "`task` writes one task's model; `distmerge eval TWIN_FOLDER` evaluates with per-sample routing.",
              {"build": build_cmd, "task": task_cmd})
