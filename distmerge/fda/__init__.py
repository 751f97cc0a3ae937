"""FDA (functional dual anchors, arXiv 2510.21223) on Ray: anchors per (layer, task), then layer-wise adaptation.

    from distmerge import fda
    fda.construct("fda.yaml", "anchors/")                 # stage I, resumable
    fda.adapt("fda.yaml", "anchors/", "merged/")          # stage II, the merged model written atomically
    fda.choose_sigma("fda.yaml")                          # the paper's sigma choice on one layer (App. C.5)

The math is in ``distmerge.ops.fda``; the config's fields in ``distmerge.fda.schema``, its reader in
``distmerge.fda.config``.
"""

from typing import TYPE_CHECKING

from distmerge.deferred import exports, listing

if TYPE_CHECKING:
    from distmerge.fda.adaptation import AdaptResult, adapt
    from distmerge.fda.config import load_fda_config
    from distmerge.fda.construction import ConstructResult, construct
    from distmerge.fda.schema import FdaConfig
    from distmerge.fda.sigma import SigmaResult, choose_sigma

__all__ = ["AdaptResult", "ConstructResult", "FdaConfig", "SigmaResult", "adapt",
           "choose_sigma", "construct", "load_fda_config"]

_EXPORTS = {
    "AdaptResult": "adaptation", "adapt": "adaptation",
    "load_fda_config": "config",
    "ConstructResult": "construction", "construct": "construction",
    "FdaConfig": "schema",
    "SigmaResult": "sigma", "choose_sigma": "sigma",
}

__getattr__ = exports(__name__, _EXPORTS)
__dir__ = listing(_EXPORTS)
