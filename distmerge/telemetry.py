"""Progress counters exported as Ray metrics, so a running pipeline's phases show in the dashboard (Grafana/Prometheus).

Each process keeps one metric object per name; counters are created lazily because Ray metrics can only be made in
a process connected to Ray. Outside Ray (plain unit tests of pure code) the calls record nothing.
"""

from __future__ import annotations

import threading
from typing import Dict, Tuple

_LOCK = threading.Lock()
_METRICS: Dict[Tuple[str, str], object] = {}

# The counters distmerge exports; one place so the dashboard's names stay stable.
DESCRIPTIONS = {
    "distmerge_layer_groups_merged": "layer groups merged by the engine",
    "distmerge_bytes_read": "input bytes read by merge workers",
    "distmerge_anchors_constructed": "FDA (layer, task) anchor sets constructed",
    "distmerge_layers_adapted": "FDA layers adapted",
    "distmerge_fda_loss": "current FDA loss per layer (stage, layer, task)",
    "distmerge_examples_evaluated": "evaluation examples scored",
    "distmerge_trials_finished": "sweep trials finished",
    "distmerge_adamerging_objective": "AdaMerging objective at the current step (run)",
    "distmerge_adamerging_step": "AdaMerging steps done (run)",
}


def _metric(kind: str, name: str, tag_keys: Tuple[str, ...]):
    import ray

    if not ray.is_initialized():
        return None
    key = (kind, name)
    with _LOCK:
        metric = _METRICS.get(key)
        if metric is None:
            from ray.util import metrics

            cls = metrics.Counter if kind == "counter" else metrics.Gauge
            metric = cls(name, description=DESCRIPTIONS.get(name, name), tag_keys=tag_keys)
            _METRICS[key] = metric
    return metric


def count(name: str, amount: float = 1.0, **tags: str) -> None:
    """Add ``amount`` to the counter ``name`` (tags such as run="…" separate concurrent runs)."""
    if amount <= 0:
        return
    metric = _metric("counter", name, tuple(sorted(tags)))
    if metric is not None:
        metric.inc(amount, tags={k: str(v) for k, v in tags.items()})


def gauge(name: str, value: float, **tags: str) -> None:
    """Set the gauge ``name`` (e.g. the current loss of an FDA layer)."""
    metric = _metric("gauge", name, tuple(sorted(tags)))
    if metric is not None:
        metric.set(value, tags={k: str(v) for k, v in tags.items()})
