"""One loader for both dialects: a YAML file (or a parsed mapping) to a validated ``MergeConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from distmerge.config.mergekit import read_mergekit
from distmerge.config.native import read_distmerge
from distmerge.config.schema import MergeConfig
from distmerge.errors import ConfigError


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """A YAML file's contents; an unreadable file or invalid YAML is a ConfigError naming the file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {exc}") from None


def load_config(source: str | Path | dict[str, Any]) -> MergeConfig:
    """Read a YAML file (or an already-parsed dict) in either dialect and validate it."""
    raw = source if isinstance(source, dict) else read_yaml(source)
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping at the top level")
    if "merge_method" in raw:
        return read_mergekit(raw)
    return read_distmerge(raw)


