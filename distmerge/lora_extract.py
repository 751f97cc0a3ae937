"""``distmerge lora extract``: any merged model as a LoRA adapter on its base, by truncated SVD of each delta.

Per 2-D linear tensor, delta = merged - base is replaced by its best rank-R approximation (Eckart-Young):
B = U_R S_R^(1/2), A = S_R^(1/2) V_R^T (or B = U_R S_R, A = V_R^T without ``distribute_scale``), by
``torch.linalg.svd`` (exact) or ``torch.svd_lowrank`` (randomized, with oversampling and power iterations)
where the tensor is large. Embeddings, heads and 1-D tensors that changed are kept whole (PEFT's
modules_to_save), or skipped, as mergekit's ``mergekit-extract-lora`` offers. One Ray task per layer group; each
tensor's randomized SVD is seeded from its name, so results do not depend on the number of workers. The
relative Frobenius error of every tensor is written to ``lora_extract.json`` in the adapter folder.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distmerge import dtypes
from distmerge.architectures import TIED_HEADS, group_by_layer
from distmerge.errors import ConfigError, InputError, where
from distmerge.io.checkpoint import Checkpoint
from distmerge.io.lora import open_checkpoint
from distmerge.io.lora_writer import Factors, adapter_config, adapter_state, module_of, write_adapter
from distmerge.io.vocab import INPUT_EMBEDDING
from distmerge.io.writer import check_target
from distmerge.plan import EMBED_GROUP

REPORT = "lora_extract.json"
SVD_MODES = ("auto", "exact", "randomized")
AUTO_EXACT_BELOW = 1024  # auto: exact SVD when the smaller side is at most this, else randomized
FACTOR_DTYPES = dtypes.STORAGE
FAN_IN_FAN_OUT_TYPES = ("gpt2",)  # Conv1D layers store the weight as [in, out]


@dataclass(frozen=True)
class ExtractOptions:
    rank: int
    svd: str = "auto"
    oversample: int = 10
    niter: int = 4
    distribute_scale: bool = True
    embed_lora: bool = False  # embeddings as lora_embedding factors instead of full tensors
    skip_full: bool = False  # drop changed tensors that are not decomposed, instead of keeping them whole
    min_full_change: float = 0.0  # keep a full tensor only if ||delta|| / ||base|| exceeds this
    seed: int = 0
    dtype: str = "float32"  # of the factors; the error is measured on the stored ones

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"--rank: must be a positive integer, got {self.rank!r}")
        if self.svd not in SVD_MODES:
            raise ConfigError(f"--svd: one of {', '.join(SVD_MODES)}, got {self.svd!r}")
        if self.oversample < 0 or self.niter < 0:
            raise ConfigError("--oversample and --niter: must be >= 0")
        if self.dtype not in FACTOR_DTYPES:
            raise ConfigError(f"--dtype: one of {', '.join(FACTOR_DTYPES)}, got {self.dtype!r}")
        if not (self.min_full_change >= 0 and math.isfinite(self.min_full_change)):
            raise ConfigError(f"--min-full-change: must be a number >= 0, got {self.min_full_change!r}")


@dataclass
class ExtractResult:
    out: Path
    errors: dict[str, float]  # tensor -> relative Frobenius error of its factors
    ranks: dict[str, int]
    full: list[str]
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        worst = max(self.errors.items(), key=lambda kv: kv[1], default=("-", 0.0))
        mean = sum(self.errors.values()) / len(self.errors) if self.errors else 0.0
        return (f"wrote a LoRA adapter to {self.out}: {len(self.ranks)} module(s) at rank up to "
                f"{max(self.ranks.values(), default=0)}, {len(self.full)} full tensor(s), {len(self.skipped)} "
                f"skipped; relative error mean {mean:.3g}, worst {worst[1]:.3g} ({worst[0]}); per tensor in {REPORT}")


# --------------------------------------------------------------------------------------------- the maths


def truncated_svd(delta: torch.Tensor, rank: int, mode: str = "auto", oversample: int = 10, niter: int = 4,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_r) of a 2-D float tensor, r = min(rank, min(shape))."""
    rank = min(rank, min(delta.shape))
    exact = mode == "exact" or (mode == "auto" and min(delta.shape) <= AUTO_EXACT_BELOW)
    if exact or rank + oversample >= min(delta.shape):  # a sketch as wide as the matrix gains nothing
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # svd_lowrank draws its sketch from the global generator
    try:
        u, s, v = torch.svd_lowrank(delta, q=rank + oversample, niter=niter)
    finally:
        torch.random.set_rng_state(generator_state)
    return u[:, :rank], s[:rank], v[:, :rank]


def low_rank_factors(delta: torch.Tensor, options: ExtractOptions, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the truncated SVD of ``delta`` (float32)."""
    u, s, v = truncated_svd(delta, options.rank, options.svd, options.oversample, options.niter, seed)
    if options.distribute_scale:
        root = s.sqrt()
        return root[:, None] * v.T, u * root
    return v.T.contiguous(), u * s


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    norm = torch.linalg.norm(delta)
    return float(torch.linalg.norm(delta - approx) / norm) if norm > 0 else 0.0


def module_types(config: dict[str, Any] | None) -> dict[str, str]:
    """Module name -> linear | conv1d | embedding | other, from the architecture built on the meta device (no
    weights); empty when transformers cannot build it (the name rules then decide)."""
    try:
        import transformers
        from torch import nn
        from transformers.pytorch_utils import Conv1D

        model_class = getattr(transformers, ((config or {}).get("architectures") or [""])[0])
        with torch.device("meta"):
            model = model_class(model_class.config_class.from_dict(config))
    except Exception:
        return {}
    kinds = {nn.Linear: "linear", Conv1D: "conv1d", nn.Embedding: "embedding"}
    return {name: next((k for cls, k in kinds.items() if isinstance(module, cls)), "other")
            for name, module in model.named_modules()}


def tensor_role(name: str, shape: tuple[int, ...], embed_lora: bool, module_type: str | None = None,
                fan_in_fan_out: bool = False) -> str:
    """linear, conv1d (a weight stored [in, out]), embedding (as lora_embedding factors) or full."""
    if len(shape) != 2 or module_of(name)[1] != "weight" or module_type == "other":
        return "full"
    if module_type is None:  # an architecture transformers could not build: by name
        is_embedding = INPUT_EMBEDDING.search(name) or EMBED_GROUP.search(module_of(name)[0].rsplit(".", 1)[-1])
        module_type = "embedding" if is_embedding else ("conv1d" if fan_in_fan_out else "linear")
    if module_type == "embedding":
        return "embedding" if embed_lora else "full"
    if TIED_HEADS.search(name):
        return "full"  # the head: vocabulary rows, kept whole as mergekit does
    return module_type


def extract_tensor(name: str, role: str, merged: torch.Tensor, base: torch.Tensor,
                   options: ExtractOptions) -> dict[str, Any] | None:
    """One tensor's result: factors, a full value, 'skip', or None when it did not change."""
    if torch.equal(merged, base):
        return None
    delta = merged.float() - base.float()
    if role == "full":
        change = float(torch.linalg.norm(delta) / max(float(torch.linalg.norm(base.float())), 1e-30))
        if options.skip_full or change <= options.min_full_change:
            return {"skip": True, "change": change}
        return {"full": merged, "change": change}
    # PEFT's orientation: B @ A is [out, in] for a Linear, the transpose for an embedding ([dim, rows]) and for
    # a Conv1D (stored [in, out], PEFT's fan_in_fan_out).
    target = delta if role == "linear" else delta.T
    a, b = low_rank_factors(target, options, seed=options.seed ^ zlib.crc32(name.encode()))
    a, b = a.to(dtypes.torch_dtype(options.dtype)), b.to(dtypes.torch_dtype(options.dtype))
    return {"factors": ("embedding" if role == "embedding" else "linear", a, b),
            "error": relative_error(target, b.float() @ a.float())}


def extract_group(merged: Checkpoint, base: Checkpoint, roles: dict[str, str],
                  options: ExtractOptions) -> dict[str, Any]:
    torch.set_num_threads(1)  # one Ray CPU per task; and one thread count, so results do not vary with placement
    results = {}
    for name, role in roles.items():
        results[name] = extract_tensor(name, role, merged.read(name), base.read(name), options)
    merged.close()
    base.close()
    return results


# --------------------------------------------------------------------------------------------- the command


def check_models(merged: Checkpoint, base: Checkpoint) -> list[str]:
    """The floating tensors to compare; a merged tensor the base lacks or shapes differently is refused."""
    names = []
    for name, info in sorted(merged.tensors.items()):
        under = base.tensors.get(name)
        if under is None:
            raise InputError(f"{where(model=merged.name, file=info.file, tensor=name)}: not in the base model "
                             f"'{base.source}'")
        if tuple(under.shape) != tuple(info.shape):
            raise InputError(f"{where(model=merged.name, file=info.file, tensor=name)}: shape {list(info.shape)} "
                             f"does not match the base's {list(under.shape)}")
        if dtypes.is_floating(info.dtype):
            names.append(name)
    return names


def layer_groups(names: list[str]) -> list[list[str]]:
    """The names by layer group, the groups in key order (the order of the Ray tasks and the output files)."""
    groups = group_by_layer(names)
    return [groups[key] for key in sorted(groups)]


def extract(merged_source: str, base_source: str, out: str | Path, options: ExtractOptions,
            workers: int | None = None, address: str | None = None, force: bool = False) -> ExtractResult:
    from distmerge.engine.ray_session import ray_session

    options.check()
    out = Path(out).expanduser()
    check_target(out, force)
    merged = open_checkpoint(merged_source, "merged")
    base = Checkpoint(base_source, "base")
    names = check_models(merged, base)
    types = module_types(base.config)
    by_name = (base.config or {}).get("model_type") in FAN_IN_FAN_OUT_TYPES
    roles = {n: tensor_role(n, tuple(base.tensors[n].shape), options.embed_lora, types.get(module_of(n)[0]), by_name)
             for n in names}
    # PEFT's flag is per adapter, yet it sets each layer's own orientation by its type (Linear: off, Conv1D: on).
    fan_in_fan_out = "conv1d" in roles.values()
    groups = [{n: roles[n] for n in group} for group in layer_groups(names)]
    results: dict[str, Any] = {}
    with ray_session(address, num_cpus=workers):
        for part in run_per_group(extract_group, [(merged, base, group, options) for group in groups], workers):
            results.update(part)
    return write_result(out, results, merged, base, base_source, options, fan_in_fan_out, force)


def run_per_group(function: Callable[..., Any], calls: list[tuple], workers: int | None = None,
                  desc: str | None = None) -> Iterator[Any]:
    """``function(*call)`` for every call as one single-CPU Ray task, at most ``workers`` (default: the cluster's
    CPUs) in flight, so a layer group's tensors are in memory only while its task runs; results as they finish.
    Ray must be running. ``desc`` names a progress bar (and the tasks in the dashboard)."""
    import sys

    import ray
    from tqdm import tqdm

    from distmerge.engine.ray_session import get

    options = {"num_cpus": 1} if desc is None else {"num_cpus": 1, "name": desc}
    task = ray.remote(**options)(function)
    in_flight = max(1, workers or int(ray.cluster_resources().get("CPU", 1)))
    pending, queue = [], list(calls)
    with tqdm(total=len(queue), desc=desc, unit="group", disable=desc is None, file=sys.stderr) as bar:
        while queue or pending:
            while queue and len(pending) < in_flight:
                pending.append(task.remote(*queue.pop(0)))
            done, pending = ray.wait(pending, num_returns=1)
            yield get(done[0])
            bar.update(1)


def write_result(out: Path, results: dict[str, Any], merged: Checkpoint, base: Checkpoint, base_source: str,
                 options: ExtractOptions, fan_in_fan_out: bool, force: bool) -> ExtractResult:
    factors, full, errors, skipped, changes = {}, {}, {}, [], {}
    for name in sorted(results):
        result = results[name]
        if result is None:
            continue
        if "factors" in result:
            kind, a, b = result["factors"]
            factors[name] = Factors(kind, a, b)
            errors[name] = result["error"]
        elif "full" in result:
            full[name] = result["full"]
            changes[name] = result["change"]
        else:
            skipped.append(name)
            changes[name] = result["change"]
    state, adapted, saved = adapter_state(factors, full, sorted(merged.tensors), merged.read)
    architectures = (base.config or {}).get("architectures") or [""]
    task_type = "CAUSAL_LM" if re.search(r"ForCausalLM$", architectures[0]) else None
    settings = adapter_config(factors, adapted, saved, full, base_source, fan_in_fan_out, task_type)
    ranks = {module_of(n)[0]: f.rank for n, f in factors.items()}
    report = {"rank": options.rank, "svd": options.svd, "dtype": options.dtype, "oversample": options.oversample,
              "niter": options.niter,
              "distribute_scale": options.distribute_scale, "relative_error": errors, "ranks": ranks,
              "full": {n: changes[n] for n in full}, "skipped": {n: changes[n] for n in skipped}}
    write_adapter(out, state, settings, force, extra_json={REPORT: report})
    return ExtractResult(out, errors, ranks, sorted(full), skipped)
