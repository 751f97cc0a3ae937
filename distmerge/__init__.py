"""distmerge: merge fine-tuned models layer-wise on a Ray cluster."""

__version__ = "0.1.0"

from distmerge.config import MergeConfig, load_config  # noqa: E402
from distmerge.engine.driver import MergeResult, merge  # noqa: E402

__all__ = ["MergeConfig", "MergeResult", "load_config", "merge", "__version__"]
