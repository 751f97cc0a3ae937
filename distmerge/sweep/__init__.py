"""Hyperparameter sweeps over merge parameters on Ray Tune (``distmerge sweep``).

Inputs are read once per sweep by holder actors that keep them resident; each trial merges for its
parameters on the holders and scores the merged model in memory. See ``distmerge.sweep.driver``.
"""

from typing import TYPE_CHECKING

from distmerge.deferred import exports, listing

if TYPE_CHECKING:
    from distmerge.sweep.driver import SweepError, SweepResult, run_sweep
    from distmerge.sweep.spec import SweepSpec, load_sweep

__all__ = ["SweepError", "SweepResult", "SweepSpec", "load_sweep", "run_sweep"]

_EXPORTS = {
    "SweepError": "driver", "SweepResult": "driver", "run_sweep": "driver",
    "SweepSpec": "spec", "load_sweep": "spec",
}

__getattr__ = exports(__name__, _EXPORTS)
__dir__ = listing(_EXPORTS)
