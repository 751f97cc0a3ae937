"""Which tensors form FDA's unit of layer l, and the unit as a module filled from lazy reads.

The unit is the MLP of a decoder layer (Llama, Mistral, Qwen2: spec §8.5, the NLG setting), a whole decoder
layer (``modules: block``: attention, MLP and norms, evaluated on anchor token sequences with the model's
rotary positions and a causal mask), or a whole encoder layer (RoBERTa/BERT, ViT). The module is cut from a
model skeleton built on the meta device (``accelerate.init_empty_weights``), so no process ever materializes
more than the unit's own tensors.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass

import torch

from distmerge.architectures import FDA_FAMILIES, FDA_UNITS
from distmerge.dtypes import torch_dtype
from distmerge.errors import ConfigError, InputError, where
from distmerge.fda.schema import FAMILY_DEFAULTS
from distmerge.io.checkpoint import Checkpoint

DECODER_TYPES = set(FDA_FAMILIES["decoder"])
ENCODER_TYPES = set(FDA_FAMILIES["encoder"])
VIT_TYPES = set(FDA_FAMILIES["vit"])
UNIT_CORE = FDA_UNITS
# "(prefix)layers.(N)." and the like: the unit core with any prefix and the layer number captured
UNIT_PATTERNS = {key: re.compile("^(.*?)" + re.escape(core).replace(re.escape("{layer}"), r"(\d+)") + r"\.")
                 for key, core in UNIT_CORE.items()}


@dataclass(frozen=True)
class ModelLayout:
    family: str  # decoder | encoder | vit (the FdaConfig defaults)
    model_type: str
    hidden_size: int
    num_layers: int
    modules: str  # mlp | block
    tensor_prefix: str  # what precedes the unit core in tensor names ("model." for LlamaForCausalLM)
    vit_tokens: int | None = None

    @property
    def unit_core(self) -> str:
        return UNIT_CORE[(self.family, self.modules)]

    def unit_prefix(self, layer: int) -> str:
        return self.tensor_prefix + self.unit_core.format(layer=layer)


def model_family(config: dict, model: str) -> str:
    model_type = config.get("model_type")
    if model_type in DECODER_TYPES:
        return "decoder"
    if model_type in ENCODER_TYPES:
        return "encoder"
    if model_type in VIT_TYPES:
        return "vit"
    supported = sorted(DECODER_TYPES | ENCODER_TYPES | VIT_TYPES)
    raise InputError(f"{where(model=model)}: FDA does not know the architecture {model_type!r} "
                     f"(supported: {', '.join(supported)})")


def detect_layout(checkpoint: Checkpoint, modules: str | None = None) -> ModelLayout:
    """The base model's family, sizes and where its layer units are, from config.json and tensor names.

    ``modules`` None takes the family's unit (decoder: the MLP; encoder/ViT: the whole layer). Encoders and
    ViT have only whole-layer units."""
    config = checkpoint.config
    if config is None:
        raise InputError(f"{where(model=checkpoint.name, file=str(checkpoint.folder))}: no config.json; FDA needs "
                         "the architecture to build a layer")
    family = model_family(config, checkpoint.name)
    modules = modules or FAMILY_DEFAULTS[family]["modules"]
    if (family, modules) not in UNIT_CORE:
        raise ConfigError(f"modules: '{modules}' is not supported for {family} models (use "
                          f"'{FAMILY_DEFAULTS[family]['modules']}': a whole encoder layer is FDA's unit there)")
    pattern = UNIT_PATTERNS[(family, modules)]
    prefixes = {m.group(1) for name in checkpoint.tensors if (m := pattern.match(name))}
    if len(prefixes) != 1:
        raise InputError(f"{where(model=checkpoint.name)}: cannot find the '{modules}' units of its layers "
                         f"(tensors like '{UNIT_CORE[(family, modules)].format(layer=0)}.*')")
    vit_tokens = None
    if family == "vit" and config.get("image_size") and config.get("patch_size"):
        vit_tokens = (int(config["image_size"]) // int(config["patch_size"])) ** 2 + 1
    try:
        hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{where(model=checkpoint.name)}: config.json lacks hidden_size/num_hidden_layers") from None
    return ModelLayout(family=family, model_type=config["model_type"], hidden_size=hidden, num_layers=layers,
                       modules=modules, tensor_prefix=prefixes.pop(), vit_tokens=vit_tokens)


@functools.lru_cache(maxsize=4)
def _skeleton(config_json: str):
    """The whole model on the meta device (no memory), eager attention so double backprop works."""
    import accelerate
    import transformers

    raw = json.loads(config_json)
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    config._attn_implementation = "eager"
    names = config.architectures or []
    cls = getattr(transformers, names[0], None) if names else None
    with accelerate.init_empty_weights():
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    return model


def unit_module(checkpoint: Checkpoint, layout: ModelLayout, layer: int) -> torch.nn.Module:
    """A private copy of layer ``layer``'s unit, on the meta device, in eval mode (no dropout)."""
    config = dict(checkpoint.config or {})
    skeleton = _skeleton(json.dumps(config, sort_keys=True))
    core = layout.unit_core.format(layer=layer)
    candidates = [name for name, _ in skeleton.named_modules() if name == core or name.endswith("." + core)]
    exact = [name for name in candidates if name == layout.unit_prefix(layer)]
    chosen = exact or candidates
    if len(chosen) != 1:
        raise InputError(f"{where(model=checkpoint.name)}: layer {layer} has no unique '{core}' module in "
                         f"{type(skeleton).__name__}")
    module = copy.deepcopy(skeleton.get_submodule(chosen[0]))
    module.eval()
    module.requires_grad_(False)
    return module


def unit_tensor_names(module: torch.nn.Module) -> list[str]:
    """The unit's tensors (parameters, then persistent buffers), in the module's order."""
    return list(module.state_dict().keys())


def read_unit(checkpoint: Checkpoint, layout: ModelLayout, layer: int, names: list[str], dtype: str,
              device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The unit's tensors of one model by local name, read lazily, as ``dtype`` on ``device``."""
    prefix = layout.unit_prefix(layer)
    out = {}
    for local in names:
        full = f"{prefix}.{local}"
        tensor = checkpoint.read(full)
        if not torch.is_floating_point(tensor):
            raise InputError(f"{where(model=checkpoint.name, tensor=full)}: not a floating-point tensor")
        out[local] = tensor.to(device=device, dtype=torch_dtype(dtype))
    return out


def fill_unit(module: torch.nn.Module, params: dict[str, torch.Tensor], model: str, layer: int) -> torch.nn.Module:
    """Put real tensors into the meta module; checks they are exactly the module's tensors and shapes."""
    try:
        module.load_state_dict(params, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise InputError(f"{where(model=model)}: layer {layer}'s tensors do not fit the architecture "
                         f"({' '.join(first[:3])})") from None
    leftover = [n for n, b in module.named_buffers() if b.is_meta]
    if leftover:
        raise InputError(f"{where(model=model)}: layer {layer} has buffers that are not stored in the checkpoint "
                         f"({', '.join(leftover)}); FDA cannot build this unit")
    return module


def unit_forward(checkpoint: Checkpoint, layout: ModelLayout, module: torch.nn.Module,
                 device: str | torch.device = "cpu"):
    """``forward(params, x)`` for the unit: x is [count, d] (MLP) or [count, tokens, d] (whole layers).

    A decoder layer also needs positions: its anchors are read as sequences at positions 0..tokens-1, with the
    model's own rotary embedding and a causal mask, as the layer sees text. Encoder layers take no mask, as the
    reference (spec §8.7.6)."""
    from distmerge.ops import fda

    if (layout.family, layout.modules) != ("decoder", "block"):
        return fda.unit_forward(module)
    skeleton = _skeleton(json.dumps(dict(checkpoint.config or {}), sort_keys=True))
    rotary = [m for name, m in skeleton.named_modules() if name.endswith("rotary_emb") and ".layers." not in name]
    if len(rotary) != 1:
        raise InputError(f"{where(model=checkpoint.name)}: modules 'block' needs one model-level rotary embedding "
                         f"to give anchor tokens their positions; {type(skeleton).__name__} has {len(rotary)}")
    rotary_emb = copy.deepcopy(rotary[0]).to(device)

    def forward(params, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"a decoder block takes anchors [count, tokens, hidden], got {list(x.shape)}")
        tokens = x.shape[1]
        positions = torch.arange(tokens, device=x.device)[None]
        cos, sin = rotary_emb(x, positions)
        mask = torch.full((tokens, tokens), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        out = torch.func.functional_call(module, params, (x,), {
            "attention_mask": mask[None, None], "position_ids": positions, "position_embeddings": (cos, sin)})
        return out[0] if isinstance(out, (tuple, list)) else out

    return forward
