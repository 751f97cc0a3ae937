"""FDA (functional dual anchors, arXiv 2510.21223) on Ray: anchors per (layer, task), then layer-wise adaptation.

    from distmerge import fda
    fda.construct("fda.yaml", "anchors/")                 # stage I, resumable
    fda.adapt("fda.yaml", "anchors/", "merged/")          # stage II, the merged model written atomically

The math is in ``distmerge.ops.fda``; the config format in ``distmerge.fda.config``.
"""

from distmerge.fda.adapt import AdaptResult, adapt
from distmerge.fda.config import FdaConfig, load_fda_config
from distmerge.fda.construct import ConstructResult, construct

__all__ = ["AdaptResult", "ConstructResult", "FdaConfig", "adapt", "construct", "load_fda_config"]
