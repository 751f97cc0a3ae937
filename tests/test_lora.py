"""LoRA experts: an adapter on its base reads as the model PEFT's merge_and_unload gives, tensor by tensor and
row chunk by row chunk, for Llama, Qwen2, Qwen v1, ViT, RoBERTa and GPT-2 (Conv1D) modules, rsLoRA, alpha patterns,
embedding LoRA and modules_to_save; the config forms and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from distmerge.config import load_config  # noqa: E402
from distmerge.errors import ConfigError, InputError  # noqa: E402
from distmerge.io.checkpoint import Checkpoint  # noqa: E402
from distmerge.io.lora import LoraCheckpoint, open_checkpoint  # noqa: E402
from distmerge.tiny_models import _config, _model, build_tokenizer, save_model  # noqa: E402

ARCH_TARGETS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "qwen2": dict(target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"], use_rslora=True,
                  alpha_pattern={"up_proj": 32}),
    "roberta": dict(target_modules=["query", "value", "dense", "word_embeddings"], modules_to_save=["classifier"],
                    use_rslora=True),
}


def base_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = _config(arch, 64, 32, 2, tie=False)
    return _model(arch, config)


def adapter_on(model, folder: Path, seed: int, **lora) -> tuple[Path, dict[str, torch.Tensor]]:
    """Save a LoRA adapter with random (non-zero) factors; return it and PEFT's own merged state dict."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    settings = dict(r=4, lora_alpha=8, init_lora_weights=False)
    settings.update(lora)
    peft_model = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)  # a trained head, unlike the base's
    peft_model.save_pretrained(str(folder))
    merged = peft_model.merge_and_unload()
    return folder, {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module", params=sorted(ARCH_TARGETS))
def lora_family(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora_{arch}")
    base = save_model(base_model(arch), build_tokenizer(64), root / "base")
    adapter, merged = adapter_on(base_model(arch), root / "adapter", seed=1, **ARCH_TARGETS[arch])
    return arch, base, adapter, merged


def test_an_adapter_reads_as_peft_merge_and_unload(lora_family):
    arch, base, adapter, merged = lora_family
    model = open_checkpoint(f"{base}+{adapter}", "lora")
    assert isinstance(model, LoraCheckpoint) and model.factors
    adapted = 0
    for name, info in model.tensors.items():
        if name not in merged:
            continue
        value = model.read(name)
        assert tuple(value.shape) == tuple(info.shape)
        torch.testing.assert_close(value.float(), merged[name].float(), rtol=1e-5, atol=1e-6, msg=name)
        adapted += name in model.factors
        if len(info.shape) == 2:  # rows in chunks equal the whole tensor's
            rows = [model.read(name, a, min(a + 5, info.shape[0])) for a in range(0, info.shape[0], 5)]
            torch.testing.assert_close(torch.cat(rows), value, rtol=0, atol=0)
    assert adapted == len(model.factors)
    if arch == "roberta":
        assert any(n.startswith("classifier.") for n in model.full)
        head = "classifier.out_proj.weight"
        assert not torch.equal(model.read(head), Checkpoint(str(base), "b").read(head))


def test_rslora_and_alpha_pattern_scales(lora_family):
    arch, base, adapter, _ = lora_family
    model = open_checkpoint(f"{base}+{adapter}", "lora")
    scales = {f.module.rsplit(".", 1)[-1]: f.scale for f in model.factors.values()}
    if arch == "qwen2":
        assert scales["up_proj"] == pytest.approx(32 / 4 ** 0.5) and scales["k_proj"] == pytest.approx(8 / 2)
    elif arch == "llama":
        assert all(v == pytest.approx(2.0) for v in scales.values())


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))

    base = save_model(gpt2(), build_tokenizer(64), tmp_path / "base")
    adapter, merged = adapter_on(gpt2(), tmp_path / "adapter", seed=2, target_modules=["c_attn", "c_proj"],
                                 fan_in_fan_out=True)
    model = open_checkpoint(f"{base}+{adapter}", "lora")
    assert model.settings.fan_in_fan_out and model.factors
    for name in model.factors:
        torch.testing.assert_close(model.read(name), merged[name], rtol=1e-5, atol=1e-6)
        rows = model.tensors[name].shape[0]
        torch.testing.assert_close(model.read(name, 3, rows - 2), merged[name][3:rows - 2], rtol=1e-5, atol=1e-6)


def edited_adapter(tmp_path: Path, source: Path, **changes) -> Path:
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes,message", [
    ({"use_dora": True}, r"use_dora: True is not supported"),
    ({"peft_type": "IA3"}, r"peft_type 'IA3' is not supported \(LoRA adapters only\)"),
    ({"peft_type": "PROMPT_TUNING"}, r"peft_type 'PROMPT_TUNING'"),
    ({"lora_bias": True}, r"lora_bias: True is not supported"),
])
def test_unsupported_adapter_kinds_are_refused_naming_the_field(lora_family, tmp_path, changes, message):
    _, base, adapter, _ = lora_family
    bad = edited_adapter(tmp_path, adapter, **changes)
    with pytest.raises(InputError, match=rf"model 'x', file '.*adapter_config.json': {message}"):
        open_checkpoint(f"{base}+{bad}", "x")


def test_config_forms_all_become_base_plus_adapter(lora_family, tmp_path):
    _, base, adapter, _ = lora_family
    plus = load_config({"base_model": str(base), "method": "task_arithmetic",
                        "models": [{"model": f"{base}+{adapter}", "name": "a"}]})
    beside = load_config({"base_model": str(base), "method": "task_arithmetic",
                          "models": [{"model": str(base), "lora": str(adapter), "name": "a"}]})
    alone = load_config({"base_model": str(base), "method": "task_arithmetic", "models": [str(adapter)]})
    mergekit = load_config({"merge_method": "task_arithmetic", "base_model": str(base),
                            "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]})
    sources = {plus.models[0].model, beside.models[0].model, alone.models[0].model, mergekit.models[0].model}
    assert sources == {f"{base}+{adapter}"}
    assert alone.models[0].name == "adapter"
    with pytest.raises(ConfigError, match=r"models\[0\].model: '.*' is a LoRA adapter; its base"):
        load_config({"method": "weight_average", "models": [str(adapter)]})
    on_hub = edited_adapter(tmp_path, adapter, base_model_name_or_path="distmerge-test/not-a-real-base")
    config = load_config({"method": "weight_average", "models": [str(on_hub)]})  # no base_model: the named hub id
    assert config.models[0].model == f"distmerge-test/not-a-real-base+{on_hub}"
    with pytest.raises(InputError, match="hf download distmerge-test/not-a-real-base"):
        open_checkpoint(config.models[0].model, "a")


def test_a_plain_model_with_a_plus_in_its_path_is_not_an_adapter(lora_family, tmp_path):
    import shutil

    _, base, _, _ = lora_family
    odd = tmp_path / "c++model"
    shutil.copytree(base, odd)
    assert type(open_checkpoint(str(odd), "odd")) is Checkpoint


@pytest.fixture(scope="module")
def llama_lora_experts(tmp_path_factory):
    """A Llama base, two LoRA experts on it, and the same experts as dense folders (PEFT's merge_and_unload)."""
    root = tmp_path_factory.mktemp("lora_merge")
    base = save_model(base_model("llama"), build_tokenizer(64), root / "base")
    adapters, dense = [], []
    for i, targets in enumerate((["q_proj", "v_proj", "down_proj"], ["k_proj", "gate_proj", "embed_tokens"])):
        adapter, merged = adapter_on(base_model("llama"), root / f"adapter_{i}", seed=10 + i, target_modules=targets,
                                     use_rslora=bool(i))
        model = base_model("llama")
        model.load_state_dict(merged)
        adapters.append(adapter)
        dense.append(save_model(model, build_tokenizer(64), root / f"dense_{i}"))
    return base, adapters, dense


def merged_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


# The LoRA expert is a tensor source read row chunk by row chunk on the workers: a linear method, the random,
# thresholding and rank-based sparsifiers, one with artifacts, and the whole-tensor (SVD, angle) methods.
DECIDES_BY_THRESHOLD = {"ties", "emr", "dare", "della", "breadcrumbs"}  # a value at a cut may fall either way


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"lambda": 0.7}), ("ties", {"density": 0.5}), ("emr", {}),
    ("dare", {"drop_rate": 0.5, "seed": 3}), ("della", {"density": 0.6, "epsilon": 0.2}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}), ("tsv", {}), ("iso_c", {}),
])  # not model_stock: these two adapters touch different modules, so each tensor's angle is 90 degrees and it
#     keeps the base, as the method says (its tensors are read as the others' are)
def test_every_method_merges_lora_experts_as_their_dense_models(llama_lora_experts, ray_cluster, tmp_path, method,
                                                                 params):
    from distmerge import merge

    base, adapters, dense = llama_lora_experts

    def config(models):
        return {"base_model": str(base), "method": method, "parameters": params, "out_shard_size": "40KB",
                "models": [{"name": f"e{i}", **m} for i, m in enumerate(models)]}

    # One LoRA expert in each form, mixed with a full expert where there are three.
    lora = config([{"model": f"{base}+{adapters[0]}"}, {"model": str(base), "lora": str(adapters[1])}])
    full = config([{"model": str(dense[0])}, {"model": str(dense[1])}])
    merge(lora, tmp_path / "lora", workers=2, progress=False)
    merge(full, tmp_path / "full", workers=2, progress=False)
    folder = "emr" if method == "emr" else "."  # EMR's backbone is the base; its task vector and masks are in emr/
    got, want = merged_tensors(tmp_path / "lora" / folder), merged_tensors(tmp_path / "full" / folder)
    original = merged_tensors(base)
    assert got.keys() == want.keys() and want
    changed = 0
    for name in want:
        close = torch.isclose(got[name].float(), want[name].float(), rtol=1e-4, atol=1e-5)
        assert close.float().mean() >= (0.999 if method in DECIDES_BY_THRESHOLD else 1.0), name
        changed += name not in original or not torch.equal(want[name], original[name])
    assert changed > 0


@pytest.mark.parametrize("arch", ["qwen2", "roberta"])
def test_qwen2_and_roberta_lora_experts_merge_as_their_dense_models(arch, ray_cluster, tmp_path):
    """The engine's merge of a LoRA expert (rsLoRA and an alpha pattern on Qwen2; modules_to_save, the classifier,
    on RoBERTa) beside a full expert equals the merge of PEFT's merge_and_unload() model."""
    from distmerge import merge

    base = save_model(base_model(arch), build_tokenizer(64), tmp_path / "base")
    adapter, merged = adapter_on(base_model(arch), tmp_path / "adapter", seed=5, **ARCH_TARGETS[arch])
    dense_model = base_model(arch)
    dense_model.load_state_dict(merged)
    dense = save_model(dense_model, build_tokenizer(64), tmp_path / "dense")
    full_model = base_model(arch, seed=9)
    full = save_model(full_model, build_tokenizer(64), tmp_path / "full")
    outputs = {}
    for label, lora_entry in (("lora", {"model": str(base), "lora": str(adapter)}), ("dense", {"model": str(dense)})):
        config = {"base_model": str(base), "method": "ties", "parameters": {"density": 0.7}, "out_shard_size": "40KB",
                  "models": [{"name": "a", **lora_entry}, {"name": "b", "model": str(full)}]}
        merge(config, tmp_path / f"merged-{label}", workers=2, progress=False)
        outputs[label] = merged_tensors(tmp_path / f"merged-{label}")
    got, want = outputs["lora"], outputs["dense"]
    assert got.keys() == want.keys()
    for name in want:
        close = torch.isclose(got[name].float(), want[name].float(), rtol=1e-4, atol=1e-5)
        assert close.float().mean() >= 0.999, name
    if arch == "roberta":  # the expert's own head went into the merge, not the base's
        head = "classifier.out_proj.weight"
        assert not torch.equal(want[head], merged_tensors(base)[head])


def test_lora_and_full_experts_mix_in_one_merge(llama_lora_experts, llama_family, ray_cluster, tmp_path):
    from distmerge import merge

    base, adapters, dense = llama_lora_experts
    common = {"base_model": str(base), "method": "task_arithmetic", "parameters": {"lambda": 1.0},
              "out_shard_size": "40KB"}
    mixed = {**common, "models": [{"model": f"{base}+{adapters[0]}", "name": "a"}, {"model": str(dense[1]), "name": "b"}]}
    plain = {**common, "models": [{"model": str(dense[0]), "name": "a"}, {"model": str(dense[1]), "name": "b"}]}
    merge(mixed, tmp_path / "mixed", workers=1, progress=False)
    merge(plain, tmp_path / "plain", workers=1, progress=False)
    got, want = merged_tensors(tmp_path / "mixed"), merged_tensors(tmp_path / "plain")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


class _QwenV1Block(torch.nn.Module):
    """Qwen-14B's (v1, remote-code) module names: attn.c_attn / attn.c_proj, mlp.w1 / mlp.w2 / mlp.c_proj."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.c_attn = torch.nn.Linear(hidden, 3 * hidden)
        self.attn.c_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.mlp = torch.nn.Module()
        self.mlp.w1 = torch.nn.Linear(hidden, inner, bias=False)
        self.mlp.w2 = torch.nn.Linear(hidden, inner, bias=False)
        self.mlp.c_proj = torch.nn.Linear(inner, hidden, bias=False)
        self.ln_1 = torch.nn.LayerNorm(hidden)


def _qwen_v1(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.transformer = torch.nn.Module()
    model.transformer.wte = torch.nn.Embedding(50, 16)
    model.transformer.h = torch.nn.ModuleList([_QwenV1Block(16, 24) for _ in range(2)])
    model.lm_head = torch.nn.Linear(16, 50, bias=False)
    return model


def test_qwen_v1_and_vit_module_names_read_as_peft_merge_and_unload(tmp_path):
    """The two settings' module names beyond the transformers-native ones: Qwen-14B v1's c_attn/c_proj/w1/w2
    (a remote-code model: its tensors are read, its code never runs) and ViT's attention and MLP (as transformers 5
    names them) with its classifier in modules_to_save, each against PEFT's own merge_and_unload()."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=32, num_labels=3))
    cases = {
        "qwen": (_qwen_v1(0), {"model_type": "qwen", "architectures": ["QWenLMHeadModel"]},
                 dict(target_modules=["c_attn", "c_proj", "w1", "w2"], use_rslora=True)),
        "vit": (vit, vit.config.to_dict(), dict(target_modules=["q_proj", "v_proj", "fc1"], modules_to_save=["classifier"])),
    }
    for arch, (model, config, lora) in cases.items():
        base = tmp_path / arch / "base"
        base.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
        (base / "config.json").write_text(json.dumps(config))
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "modules_to_save" in name:
                    param.add_(torch.randn_like(param) * 0.05)
        peft_model.save_pretrained(str(tmp_path / arch / "adapter"))
        merged = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
        expert = open_checkpoint(f"{base}+{tmp_path / arch / 'adapter'}", arch)
        assert isinstance(expert, LoraCheckpoint)
        adapted = {n.rsplit(".", 2)[-2] for n in expert.factors}
        assert adapted == set(lora["target_modules"]), (arch, adapted)
        for name in merged:
            torch.testing.assert_close(expert.read(name).float(), merged[name].float(), rtol=1e-5, atol=1e-6,
                                       msg=f"{arch} {name}")
        if arch == "vit":
            assert {n for n in expert.full if n.startswith("classifier.")} == {"classifier.weight", "classifier.bias"}


def test_fda_takes_lora_experts_in_every_form(llama_lora_experts):
    """FDA's experts take a LoRA expert in each form a merge config does, and read its units as the dense model's."""
    from distmerge.fda.inputs import open_inputs

    base, adapters, dense = llama_lora_experts
    forms = [{"a": f"{base}+{adapters[0]}"}, [{"name": "a", "model": str(base), "lora": str(adapters[0])}],
             {"a": str(adapters[0])}]  # the adapter alone: on the config's base
    want = open_inputs({"base": str(base), "experts": {"a": str(dense[0])}, "modules": "mlp", "layers": [0, 1]})
    for experts in forms:
        inputs = open_inputs({"base": str(base), "experts": experts, "modules": "mlp", "layers": [0, 1]})
        assert dict(inputs.config.experts)["a"] == f"{base}+{adapters[0]}"
        for layer in (0, 1):
            got, expected = inputs.read_unit(inputs.experts["a"], layer), want.read_unit(want.experts["a"], layer)
            assert got.keys() == expected.keys()
            for name in expected:
                torch.testing.assert_close(got[name].float(), expected[name].float(), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(want.read_unit(want.experts["a"], 0)[n], want.read_unit(want.base, 0)[n])
               for n in want.unit_names)  # down_proj is adapted: the unit differs from the base's
