"""The driver's view of an FDA run's inputs: the config resolved against the base, the opened checkpoints
(headers only) and the layers to work on. Everything here is checked before any job starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge.errors import ConfigError, InputError, where
from distmerge.fda.config import load_fda_config
from distmerge.fda.schema import FdaConfig
from distmerge.fda.modules import (ModelLayout, detect_layout, fill_unit, read_unit, unit_forward, unit_module,
                                   unit_tensor_names)
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.lora import open_checkpoint


@dataclass(frozen=True)
class FdaInputs:
    config: FdaConfig  # resolved: every field set
    base: Checkpoint
    experts: dict[str, Checkpoint]  # task name -> expert, in config order
    layout: ModelLayout
    layers: tuple[int, ...]
    unit_names: tuple[str, ...]  # the unit's local tensor names (the same for every layer)

    def unit_tensors(self, layer: int) -> list[str]:
        prefix = self.layout.unit_prefix(layer)
        return [f"{prefix}.{name}" for name in self.unit_names]

    def read_unit(self, model: Checkpoint, layer: int, device: str = "cpu") -> dict[str, Any]:
        """Layer ``layer``'s unit tensors of ``model`` by local name, read lazily, in the run's dtype."""
        return read_unit(model, self.layout, layer, list(self.unit_names), self.config.dtype, device)

    def base_unit(self, layer: int, device: str = "cpu"):
        """``(forward, base tensors)`` of layer ``layer``'s unit: the module filled with the base (which checks
        the tensors fit the architecture) and evaluated with any parameters given to ``forward``."""
        module = unit_module(self.base, self.layout, layer)
        base = self.read_unit(self.base, layer, device)
        fill_unit(module, base, self.base.name, layer)
        return unit_forward(self.base, self.layout, module, device), base


def open_inputs(config: FdaConfig | str | Path | dict[str, Any]) -> FdaInputs:
    """Load and resolve the config, open base and experts, and check every unit tensor exists with one shape."""
    config = load_fda_config(config)
    base = Checkpoint(config.base, "base")
    experts = {name: open_checkpoint(source, name) for name, source in config.experts}
    layout = detect_layout(base, config.modules)
    config = config.resolve(layout.family, layout.vit_tokens)
    layers = config.layers if config.layers is not None else tuple(range(layout.num_layers))
    beyond = [layer for layer in layers if layer >= layout.num_layers]
    if beyond:
        raise ConfigError(f"layers: {beyond[0]} is out of range (the base has {layout.num_layers} layers)")
    names = tuple(unit_tensor_names(unit_module(base, layout, layers[0])))
    inputs = FdaInputs(config=config, base=base, experts=experts, layout=layout, layers=layers, unit_names=names)
    for layer in layers:
        check_unit(base, inputs.unit_tensors(layer), base)
        for expert in experts.values():
            check_unit(expert, inputs.unit_tensors(layer), base)
    return inputs


def check_unit(model: Checkpoint, tensors: list[str], reference: Checkpoint) -> None:
    """Every tensor of the unit is in ``model``, with the reference's shape."""
    for tensor in tensors:
        info = model.info(tensor)  # names model and tensor when missing
        expected = reference.info(tensor).shape
        if info.shape != expected:
            raise InputError(f"{where(model=model.name, tensor=tensor)}: shape {list(info.shape)} differs from the "
                             f"base's {list(expected)}")
