"""Merge configuration: the schema (``schema``), two dialect readers that depend on it (``native``: distmerge's
``method:``; ``mergekit``: mergekit's ``merge_method:``, one table row per method) and one loader."""

from distmerge.config.loader import load_config, read_yaml
from distmerge.config.mergekit import read_mergekit
from distmerge.config.native import MODEL_KEYS, TOP_LEVEL_KEYS, model_source, read_distmerge
from distmerge.config.schema import DTYPES, MergeConfig, ModelSpec, build_config, default_name, parse_size
from distmerge.methods.base import check_setting, resolve_setting

__all__ = ["DTYPES", "MODEL_KEYS", "TOP_LEVEL_KEYS", "MergeConfig", "ModelSpec", "build_config", "check_setting",
           "default_name", "load_config", "model_source", "parse_size", "read_distmerge", "read_mergekit", "read_yaml",
           "resolve_setting"]
