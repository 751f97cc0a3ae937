"""What every command module shares: a user error becomes one red line on stderr and exit status 2, and the
options several commands take (output folder, --force, Ray address and workers) are spelled once."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import typer

from distmerge.errors import DistmergeError


def fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A user error (DistmergeError) raised inside is reported by ``fail``; anything else propagates."""
    try:
        yield
    except DistmergeError as exc:
        fail(exc)


# Each command gets its own option object (a factory, not a shared constant), as typer reads them per command.
def out_option(help: str) -> Any:
    return typer.Option(..., "--out", "-o", help=help)


def force_option() -> Any:
    return typer.Option(False, "--force", help="replace an existing output folder")


def address_option() -> Any:
    return typer.Option(None, "--address", help="Ray cluster address, or 'auto'; default: embedded")


def workers_option(help: str) -> Any:
    return typer.Option(None, "--workers", "-w", min=1, help=help)


def add_group(app: typer.Typer, name: str, help: str, commands: Mapping[str, Callable[..., None]]) -> None:
    """``distmerge NAME COMMAND``: a command group (its help shown when no command is given) added to ``app``."""
    group = typer.Typer(no_args_is_help=True, help=help)
    for command, function in commands.items():
        group.command(command)(function)
    app.add_typer(group, name=name)
