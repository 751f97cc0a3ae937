"""Kept for imports of the old module: the mergekit dialect is ``distmerge.config.mergekit``."""

from distmerge.config.mergekit import ROWS, read_mergekit as translate_mergekit

__all__ = ["ROWS", "translate_mergekit"]
