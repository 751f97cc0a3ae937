"""What every command module shares: a user error becomes one red line on stderr and exit status 2."""

from __future__ import annotations

import typer


def fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)
