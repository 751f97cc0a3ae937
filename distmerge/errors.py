"""Exceptions a user can act on. The CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class DistmergeError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(DistmergeError):
    """The merge configuration is invalid; the message names the key."""


class InputError(DistmergeError):
    """An input checkpoint is unusable; the message names the model, file and tensor."""


class MergeError(DistmergeError):
    """The merge computed values that would make a broken model (NaN/Inf); the message names the tensor."""


class OutputError(DistmergeError):
    """The output location cannot be written as asked."""


def where(model: str | None = None, file: str | None = None, tensor: str | None = None) -> str:
    """'model 'x', file 'y', tensor 'z'' for error messages, leaving out what is unknown."""
    parts = []
    if model:
        parts.append(f"model '{model}'")
    if file:
        parts.append(f"file '{file}'")
    if tensor:
        parts.append(f"tensor '{tensor}'")
    return ", ".join(parts)
