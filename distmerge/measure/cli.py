"""``distmerge measure regmean``: statistics of each expert on its own data, for data-aware merges (registered by
``distmerge.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distmerge.cli_support import fail as _fail
from distmerge.errors import DistmergeError


def regmean_cmd(
    config: Path = typer.Argument(..., help="measure.yaml: tasks (name, model, data) and settings"),
    out: Path = typer.Option(..., "--out", "-o", help="statistics folder (created; reruns skip finished tasks)"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="model actors per task "
                                          "(default: the config's workers, 1)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address, or 'auto'; default: embedded"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="a progress bar per task"),
) -> None:
    """Gram matrices of every linear layer's inputs, per expert on its task's data, for `method: regmean`.

    Then merge with `method: regmean` and `parameters: {statistics: OUT}`.
    """
    from distmerge.measure.regmean import measure

    try:
        result = measure(config, out, workers=workers, address=address, progress=progress)
    except DistmergeError as exc:
        _fail(exc)
    typer.echo(result.summary())


def register(app: typer.Typer) -> None:
    measure_app = typer.Typer(no_args_is_help=True, help=(
        "Statistics of each expert on its own task's data, for data-aware merges: `regmean` (Gram matrices)."))
    measure_app.command("regmean")(regmean_cmd)
    app.add_typer(measure_app, name="measure")
