"""Evaluation of merged models on Ray Data, scored the way the merging papers score them.

``evaluate(model, task, data, ...)`` (``runner``) is the in-process entry point; ``distmerge eval`` (``cli``) the
command. The runner chains the pipeline's stages (``workers``: the model actors and the light tasks around them)
over the rows ``data`` reads, under ``options``. Tasks and their templates are in ``tasks``, answer extraction in
``answers``, metrics in ``metrics``, code execution in ``sandbox``, generation backends in ``generate``, model
sources in ``models``, result files in ``report``, suites in ``suite``.
"""

from __future__ import annotations

_EXPORTS = {
    "evaluate": "distmerge.evaluate.runner",
    "EvalOptions": "distmerge.evaluate.options",
    "EvalResult": "distmerge.evaluate.runner",
    "ModelSource": "distmerge.evaluate.models",
    "TASKS": "distmerge.evaluate.tasks",
    "get_task": "distmerge.evaluate.tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so `distmerge --help` does not pay for numpy and the registry when it registers the eval command.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distmerge.evaluate' has no attribute {name!r}")
