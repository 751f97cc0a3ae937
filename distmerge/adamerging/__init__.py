"""AdaMerging (spec algorithms.md section 6): merge coefficients learned on unlabelled inputs, as a Ray Train job.

``run(config, out)`` (``distmerge adamerging ada.yaml --out merged/``) trains the coefficients with theta0 and
the task vectors sharded over the workers by FSDP2 and writes the merge with the merge engine.
"""

from typing import TYPE_CHECKING

from distmerge.deferred import exports, listing

if TYPE_CHECKING:
    from distmerge.adamerging.config import AdaConfig, load_ada_config
    from distmerge.adamerging.driver import AdaResult, run

__all__ = ["AdaConfig", "AdaResult", "load_ada_config", "run"]

_EXPORTS = {
    "AdaConfig": "config", "load_ada_config": "config",
    "AdaResult": "driver", "run": "driver",
}

__getattr__ = exports(__name__, _EXPORTS)
__dir__ = listing(_EXPORTS)
