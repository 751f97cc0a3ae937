"""``distmerge sweep``: search merge parameters on Ray Tune (registered by ``distmerge.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distmerge.cli_support import fail as _fail
from distmerge.errors import DistmergeError


def sweep_cmd(
    config: Path = typer.Argument(..., help="sweep.yaml: a merge config (or a twin.yaml) whose parameters may be "
                                            "search spaces, plus a 'sweep:' section (tasks, metric, search, "
                                            "scheduler)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for results.csv, best.yaml, plots and Tune's logs"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address, or 'auto'; default: embedded"),
    materialize_best: bool = typer.Option(False, "--materialize-best",
                                          help="merge the best config in full into OUT/best_model (a Twin "
                                               "sweep: its build at the best rank)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted sweep in OUT (its remaining trials)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no live table of the best trials"),
) -> None:
    """Search merge parameters (lambda, density, drop rate, weights) against validation tasks."""
    from distmerge.sweep import run_sweep

    try:
        result = run_sweep(config, out, address=address, resume=resume, materialize_best=materialize_best,
                           progress=not quiet)
    except DistmergeError as exc:
        _fail(exc)
    typer.echo(result.summary())
    if result.interrupted:
        raise typer.Exit(code=130)  # as an interrupted command does; --resume continues it


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_cmd)
