"""torch, imported on first use: ``from distmerge.deferred import torch`` in the modules a merge's driver loads.

Why: the driver plans, ships method objects and renames the output, but never computes on a tensor; the
workers do. Importing torch takes about 1.4 s of a 2-3 s merge against a running cluster, so the driver's
modules (config, methods, ops, io, engine) name torch through this object, which imports the real module when
an attribute is first read. ``tests/test_deferred_torch.py`` checks that the driver's path leaves torch
unimported.

After the first attribute, the real module's namespace is copied into this one, so later reads are plain module
attribute lookups (no call); a name torch gains later (a submodule imported afterwards) is forwarded.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any


class DeferredModule(types.ModuleType):
    """A stand-in for a module that imports it when an attribute it does not have yet is read."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_deferred_real"] = None

    def __reduce__(self):
        # cloudpickle ships a function by value with the modules it names: unpickled, this is the real module
        return importlib.import_module, (self.__name__,)

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__") and attribute.endswith("__"):
            # dunder probes (copy, pickle, inspect) must not import the module for nothing
            raise AttributeError(attribute)
        real = self.__dict__["_deferred_real"]
        if real is None:
            real = importlib.import_module(self.__name__)
            self.__dict__["_deferred_real"] = real
            self.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
        return getattr(real, attribute)


def is_tensor(value: Any) -> bool:
    """``isinstance(value, torch.Tensor)``, without importing torch where no tensor can exist yet."""
    return "torch" in sys.modules and isinstance(value, sys.modules["torch"].Tensor)


def exports(package: str, names: dict[str, str]):
    """A package's ``__getattr__`` (PEP 562) that imports ``names[attribute]``, a module of the package, when the
    attribute is first read: the CLI registers every command group at start, and a group's package must not
    import torch and the rest of its stack until one of its commands runs."""

    def __getattr__(attribute: str) -> Any:
        if attribute not in names:
            raise AttributeError(f"module {package!r} has no attribute {attribute!r}")
        value = getattr(importlib.import_module(f"{package}.{names[attribute]}"), attribute)
        setattr(sys.modules[package], attribute, value)
        return value

    return __getattr__


def import_in_background(name: str) -> None:
    """Start importing module ``name`` on a daemon thread: for a driver that will need it only after waiting on
    its workers (TIES' pass totals arrive as torch tensors), so the import overlaps the wait. An import of the
    same module on another thread meanwhile waits for this one (the import system's module lock)."""
    if name in sys.modules:
        return
    import threading

    threading.Thread(target=_import_quietly, args=(name,), name=f"import-{name}", daemon=True).start()


def _import_quietly(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 -- the import where the module is used raises it again, where it matters
        pass


def listing(names: dict[str, str]):
    """The package's ``__dir__`` to go with ``exports``: the exported names show before they are first read."""

    def __dir__() -> list[str]:
        return sorted(names)

    return __dir__


if TYPE_CHECKING:
    import torch
else:
    torch = sys.modules.get("torch") or DeferredModule("torch")
