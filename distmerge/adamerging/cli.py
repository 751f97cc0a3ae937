"""``distmerge adamerging ada.yaml --out merged/``: merge coefficients learned on unlabelled data (registered by
``distmerge.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distmerge.cli_support import fail as _fail
from distmerge.errors import DistmergeError


def adamerging_cmd(
    config: Path = typer.Argument(..., help="AdaMerging config (ada.yaml): base, experts, data, granularity, plus, ..."),
    out: Path = typer.Option(..., "--out", "-o", help="output model folder (lambdas.json/.parquet, a plot and the "
                                                      "run's config are written into it)"),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Ray Train workers; theta0 and the task vectors "
                                                                  "are sharded over them (FSDP2)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address, or 'auto'; default: embedded"),
    max_failures: int = typer.Option(1, "--max-failures", min=0, help="worker-group restarts from the last "
                                                                      "checkpoint before the run fails"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
) -> None:
    """AdaMerging (task-wise, layer-wise, ++) as a Ray Train job; running it again after a kill resumes."""
    from distmerge.adamerging.driver import run

    try:
        result = run(config, out, workers=workers, address=address, force=force, max_failures=max_failures)
    except DistmergeError as exc:
        _fail(exc)
    typer.echo(result.summary())


def register(app: typer.Typer) -> None:
    app.command("adamerging")(adamerging_cmd)
