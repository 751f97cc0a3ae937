"""Where an evaluated model's weights come from, and loading it inside an evaluation actor.

A ``ModelSource`` is either

* a **path**: a Hugging Face folder (what ``distmerge merge`` writes), loaded with ``from_pretrained``; or
* a **config dict + tensors**: ``config`` is ``model.config.to_dict()`` and ``tensors`` is a state dict
  ``{name: numpy array or torch tensor}`` or a Ray ``ObjectRef`` to one (``ModelSource.from_state_dict``
  puts numpy arrays in the object store once, so every actor maps them zero-copy). The model is built on
  the meta device and the tensors are assigned, so no random initialization is paid and no checkpoint is
  written: this is how a sweep scores a merge it holds in memory. ``tokenizer`` must then name a folder
  (or be a tokenizer object).

Options on top of either: ``head_from`` (GLUE: a fine-tuned model whose ``classifier.*`` tensors and label
count replace the merged model's, as the merging papers plug each task's own head onto the merged backbone),
``task_model`` (EMR merges: resolved by the runner to a materialized task model before the actors start).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from distmerge import dtypes
from distmerge.architectures import CLASSIFIER_HEAD
from distmerge.errors import InputError

DTYPES = ("auto", *dtypes.STORAGE)


@dataclass(frozen=True)
class ModelSource:
    path: str | None = None
    config: Mapping[str, Any] | None = None
    tensors: Any = None  # state dict, or an ObjectRef to one
    tokenizer: Any = None  # folder or tokenizer object; default: ``path``
    head_from: str | None = None
    head_pattern: str = CLASSIFIER_HEAD  # what head_from takes from the expert
    task_model: str | None = None
    dtype: str = "auto"  # auto: the checkpoint's dtype for GPUs, float32 on CPU

    def __post_init__(self):
        if (self.path is None) == (self.config is None):
            raise InputError("a model source is either a path or a config dict with tensors, not both or neither")
        if self.config is not None and self.tensors is None:
            raise InputError("a model source with a config dict needs its tensors")
        if self.config is not None and self.tokenizer is None:
            raise InputError("a model given as tensors needs a tokenizer (a folder or a tokenizer object)")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype '{self.dtype}': one of {', '.join(DTYPES)}")
        if self.path is not None and not Path(self.path).exists() and lora_split(self.path) is None:
            raise InputError(f"model '{self.path}' does not exist (evaluation takes a local model folder)")

    @classmethod
    def from_state_dict(cls, config: Mapping[str, Any], state_dict: Mapping[str, Any], tokenizer: Any,
                        **options: Any) -> "ModelSource":
        """Put ``state_dict`` into Ray's object store as numpy arrays (float32 for bfloat16, which numpy lacks)."""
        import ray
        import torch

        arrays = {}
        for name, value in state_dict.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
                value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
            arrays[name] = value
        return cls(config=dict(config), tensors=ray.put(arrays), tokenizer=tokenizer, **options)

    @classmethod
    def of(cls, model: Any, tokenizer: Any = None, **options: Any) -> "ModelSource":
        """A path, an existing ``ModelSource`` or a loaded transformers model, as a source."""
        if isinstance(model, ModelSource):
            return replace(model, **options) if options else model
        if isinstance(model, (str, Path)):
            return cls(path=str(Path(model).expanduser().resolve()), tokenizer=tokenizer, **options)
        if hasattr(model, "state_dict") and hasattr(model, "config"):
            tokenizer = tokenizer if tokenizer is not None else getattr(model.config, "_name_or_path", None) or None
            return cls.from_state_dict(model.config.to_dict(), model.state_dict(), tokenizer, **options)
        raise InputError(f"cannot evaluate a {type(model).__name__}: pass a model folder, a ModelSource or a "
                         "transformers model")

    def describe(self) -> str:
        return self.path if self.path is not None else f"in-memory {self.config.get('model_type', 'model')}"


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else None  # None: what the checkpoint stores
    return dtypes.torch_dtype(name)


def load_tokenizer(source: ModelSource, padding_side: str):
    from transformers import AutoTokenizer

    tokenizer = source.tokenizer if source.tokenizer is not None else source.path
    if isinstance(tokenizer, str) and lora_split(tokenizer) is not None:  # a LoRA expert: its adapter's or base's
        from distmerge.io.lora import LoraCheckpoint

        tokenizer = str(LoraCheckpoint(tokenizer, tokenizer).folder)
    if isinstance(tokenizer, (str, Path)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except Exception as exc:
            raise InputError(f"cannot load a tokenizer from '{tokenizer}' ({one_line(exc)})") from None
    else:
        import copy

        tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own padding side and pad token
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:  # Llama ships without one; any id works under the attention mask
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(source: ModelSource, kind: str, num_labels: int = 0, device: str = "cpu"):
    """The model for ``kind`` (generate/perplexity: causal LM; classify: sequence classifier; encoder: the bare
    model, no head, named as a checkpoint of a bare encoder names its tensors), in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {"classify": AutoModelForSequenceClassification, "encoder": AutoModel}.get(kind, AutoModelForCausalLM)
    dtype = torch_dtype(source.dtype, device)
    if source.path is not None and source.head_from is None:
        from distmerge.twin.folder import is_twin_folder

        if is_twin_folder(source.path):  # a Twin-Merging folder: routed per sample (distmerge.twin)
            from distmerge.twin import load

            return load(source.path, kind="classify" if kind == "classify" else "causal", device=device, dtype=dtype)
    lora, folder = None, source.path
    if source.path is not None and lora_split(source.path) is not None:  # BASE+ADAPTER: the base, then the deltas
        from distmerge.io.lora import LoraCheckpoint

        lora = LoraCheckpoint(source.path, source.path)
        folder = str(lora.base.folder)
    if source.path is not None:
        config = AutoConfig.from_pretrained(folder)
    else:
        config_dict = dict(source.config)
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    head = None
    if kind == "classify":
        if source.head_from is not None:
            head_config = AutoConfig.from_pretrained(source.head_from)
            config.num_labels = head_config.num_labels
            config.id2label, config.label2id = head_config.id2label, head_config.label2id
            head = _head_tensors(source)
        if num_labels and config.num_labels != num_labels:
            raise InputError(f"model '{source.describe()}' has {config.num_labels} label(s), the task needs "
                             f"{num_labels}" + ("" if source.head_from else "; pass the task's head with head_from"))
    try:
        if source.path is not None:
            kwargs = {"config": config, "ignore_mismatched_sizes": head is not None}
            if dtype is not None:
                kwargs["dtype"] = dtype
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = auto.from_pretrained(folder, **kwargs)
            if lora is not None:
                _apply_lora(model, lora)
        else:
            model = _from_tensors(auto, config, _resolve(source.tensors), dtype or torch.float32)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot load model '{source.describe()}' ({type(exc).__name__}: {one_line(exc)})") from None
    if head is not None:
        missing = set(head) - set(model.state_dict())
        if missing:
            raise InputError(f"head tensors {sorted(missing)} of '{source.head_from}' are not in the model")
        model.load_state_dict(head, strict=False)
    return model.to(device).eval()


def lora_split(path: str) -> tuple[str, str] | None:
    from distmerge.io.lora import split_source

    return split_source(str(path))


def config_folder(path: str) -> str:
    """The folder whose config.json describes the model at ``path`` (a LoRA expert's: its base's)."""
    split = lora_split(path)
    return split[0] if split is not None else path


def _apply_lora(model, lora) -> None:
    """The LoRA expert's weights (base + B A x scale for each adapted tensor, modules_to_save whole) into the
    base model, as ``peft``'s merge_and_unload gives them; the other tensors stay the base's."""
    import torch

    own = model.state_dict()
    changed = {}
    for name in (*lora.factors, *lora.full):
        if name not in own:
            raise InputError(f"model '{lora.source}': the adapter changes '{name}', which a "
                             f"{type(model).__name__} does not have")
        changed[name] = lora.read(name).to(own[name].dtype)
    with torch.no_grad():
        model.load_state_dict(changed, strict=False)


def _resolve(tensors: Any) -> Mapping[str, Any]:
    import ray

    return ray.get(tensors) if isinstance(tensors, ray.ObjectRef) else tensors


def _from_tensors(auto, config, tensors: Mapping[str, Any], dtype):
    import numpy as np
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype)
    state = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only arrays from the object store: copied by .to() below
        for name, value in tensors.items():
            tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor.clone()
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise InputError(f"tensors not in a {config.model_type} model: {unexpected[:5]}")
    result = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise InputError(f"tensors missing for {still_meta[:5]} (missing keys: {result.missing_keys[:5]})")
    return model


def _head_tensors(source: ModelSource) -> dict:
    from distmerge.io.checkpoint import Checkpoint

    checkpoint = Checkpoint(source.head_from, "head")
    pattern = re.compile(source.head_pattern)
    names = [n for n in checkpoint.tensors if pattern.fullmatch(n)]
    if not names:
        raise InputError(f"no tensors matching '{source.head_pattern}' in '{source.head_from}'")
    try:
        return {n: checkpoint.read(n).float() for n in names}
    finally:
        checkpoint.close()
