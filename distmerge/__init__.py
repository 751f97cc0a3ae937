"""distmerge: merge fine-tuned models layer-wise on a Ray cluster."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from distmerge.config import MergeConfig, load_config  # noqa: E402

if TYPE_CHECKING:
    from distmerge.engine.driver import MergeResult, merge

__all__ = ["MergeConfig", "MergeResult", "load_config", "merge", "__version__"]


def __getattr__(name: str):
    # The engine (and Ray with it) loads on first use, so the Ray-free layers (ops, methods, the AdaMerging
    # bank) import where Ray is not installed, as on a GPU machine used for the CUDA checks.
    if name in ("merge", "MergeResult"):
        from distmerge.engine import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'distmerge' has no attribute {name!r}")
