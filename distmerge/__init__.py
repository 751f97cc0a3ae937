"""distmerge: merge fine-tuned models layer-wise on a Ray cluster."""

from distmerge.config import MergeConfig, load_config
from distmerge.engine.driver import MergeResult, merge

__version__ = "0.1.0"
__all__ = ["MergeConfig", "MergeResult", "load_config", "merge", "__version__"]
