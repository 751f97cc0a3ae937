"""``distmerge measure regmean``: statistics of each expert on its own data, for data-aware merges (registered by
``distmerge.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distmerge.cli_support import add_group, address_option, one_line_errors, out_option, workers_option


def regmean_cmd(
    config: Path = typer.Argument(..., help="measure.yaml: tasks (name, model, data) and settings"),
    out: Path = out_option("statistics folder (created; reruns skip finished tasks)"),
    workers: Optional[int] = workers_option("model actors per task (default: the config's workers, 1)"),
    address: Optional[str] = address_option(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="a progress bar per task"),
) -> None:
    """Gram matrices of every linear layer's inputs, per expert on its task's data, for `method: regmean`.

    Then merge with `method: regmean` and `parameters: {statistics: OUT}`.
    """
    from distmerge.measure.regmean import measure

    with one_line_errors():
        result = measure(config, out, workers=workers, address=address, progress=progress)
    typer.echo(result.summary())


def register(app: typer.Typer) -> None:
    add_group(app, "measure", "Statistics of each expert on its own task's data, for data-aware merges: `regmean` "
              "(Gram matrices).", {"regmean": regmean_cmd})
